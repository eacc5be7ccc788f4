"""Two-fold estimate of the fusion recipe over all of isic2018_val and all held-out DermNet photos: `dermgraph train
fusion` once as shipped (fit on the isic2018_val `calib` half and the even DermNet half) and once swapped (`report`,
odd), each scored on the halves it did not fit, pooled.

The shipped artifact is evaluated on one half (249 images: balanced accuracy's 95 % interval is about ±0.1; 133
photos for DermNet); pooling the two folds scores the same recipe on every image, with the classifier alone on the
same cases beside it (dermoscopy). Derm7pt `val` is never fitted on, so both folds score all of it (shown per fold).
Writes `<out>/two_fold.json` and each fold's trainer outputs under `<out>/<half>/`.

    python scripts/fusion_two_fold.py [--config configs/train/fusion.yaml] [--set key=value ...] [--out runs/fusion_two_fold]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from evals.metrics import bootstrap_ci, diagnosis_metrics
from training.fusion import DERMNET_HALVES, ISIC_HALVES, other_half

HALVES = ISIC_HALVES
DERMNET_FIT = dict(zip(ISIC_HALVES, DERMNET_HALVES))  # the swapped fold swaps the clinical halves too: calib + even, report + odd


def read_predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def figures(rows: Sequence[dict], n_bootstrap: int = 1000) -> dict[str, Any]:
    """The agent's label, acceptance and set figures on ``rows`` (``predictions.jsonl`` rows), and the
    classifier alone's label on the same cases where the rows carry it."""
    y = np.array([r["label"] for r in rows])
    p = np.array([r["decided"] for r in rows])
    accepted = np.array([r["accepted"] for r in rows], bool)
    right = y == p
    m = diagnosis_metrics(list(y), list(p))
    out: dict[str, Any] = {"n": len(rows), "accuracy": round(m["accuracy"], 4), "balanced_accuracy": round(m["balanced_accuracy"], 4),
                           "balanced_accuracy_ci": [round(v, 4) for v in bootstrap_ci(lambda a, b: diagnosis_metrics(list(a), list(b))["balanced_accuracy"], y, p, n=n_bootstrap)],
                           "mel_sensitivity": round(m["mel_sensitivity"], 4) if "mel" in set(y) else None,
                           "coverage": round(float(accepted.mean()), 4), "accuracy_on_accepted": round(float(right[accepted].mean()), 4) if accepted.any() else None,
                           "set_coverage": round(float(np.mean([t in r["prediction_set"] for t, r in zip(y, rows)])), 4),
                           "set_size": round(float(np.mean([len(r["prediction_set"]) for r in rows])), 3),
                           "top5": round(float(np.mean([t in r["top5"] for t, r in zip(y, rows)])), 4)}  # fmt: skip
    cls = [r.get("experts_top", {}).get("classifier") for r in rows]
    if all(cls):
        mc = diagnosis_metrics(list(y), cls)
        out["classifier_alone"] = {"accuracy": round(mc["accuracy"], 4), "balanced_accuracy": round(mc["balanced_accuracy"], 4),
                                   "mel_sensitivity": round(mc["mel_sensitivity"], 4) if "mel" in set(y) else None}  # fmt: skip
    return out


def pool(folds: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Evaluation rows by set: each isic2018_val half from the fold that did not fit it, pooled; Derm7pt `val` per fold.
    Refuses folds whose isic2018_val rows overlap or miss a half (a fold fitted on what it scores)."""
    isic = {h: [r for r in rows if r["source"] == "isic2018_val"] for h, rows in folds.items()}
    for h, rows in isic.items():
        if any(r["split"] == h for r in rows):
            raise ValueError(f"the fold fitted on the {h} half scored {h} cases")
    ids = [r["id"] for rows in isic.values() for r in rows]
    if len(ids) != len(set(ids)):
        raise ValueError("the two folds scored the same isic2018_val case twice")
    out = {f"isic2018_val {other_half(f, HALVES)} half (fit on {f})": isic[f] for f in folds}
    out["isic2018_val, both halves"] = [r for rows in isic.values() for r in rows]
    for f, rows in folds.items():
        out[f"Derm7pt val (fit on isic2018_val {f})"] = [r for r in rows if r["source"] == "derm7pt"]
    dermnet = {f: [r for r in rows if r["source"] == "dermnet"] for f, rows in folds.items()}
    if any(dermnet.values()):
        ids = [r["id"] for rows in dermnet.values() for r in rows]
        if len(ids) != len(set(ids)):
            raise ValueError("the two folds scored the same DermNet photo twice")
        for f, rows in dermnet.items():
            out[f"DermNet held-out, {other_half(DERMNET_FIT[f], DERMNET_HALVES)} half (fit on the {DERMNET_FIT[f]} half)"] = rows
        out["DermNet held-out, both halves"] = [r for rows in dermnet.values() for r in rows]
    return out


def table(res: dict[str, dict]) -> str:
    lines = ["| set | n | accuracy (top-1) | top-5 | balanced acc. [95 % CI] | mel. sens. | accepted | acc. on accepted | 90 % sets (size) | classifier alone acc / BACC |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, f in res.items():
        ca = f.get("classifier_alone") or {}
        lines.append(f"| {name} | {f['n']} | {f['accuracy']:.3f} | {f['top5']:.3f} | {f['balanced_accuracy']:.3f} [{f['balanced_accuracy_ci'][0]:.3f}, {f['balanced_accuracy_ci'][1]:.3f}] | "
                     f"{'-' if f['mel_sensitivity'] is None else format(f['mel_sensitivity'], '.3f')} | {f['coverage']:.3f} | {f['accuracy_on_accepted']} | "
                     f"{f['set_coverage']:.3f} ({f['set_size']:.2f}) | {ca.get('accuracy', '-')} / {ca.get('balanced_accuracy', '-')} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from training.config import load_train_config
    from training.fusion import Config, train

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/train/fusion.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="key=value, as `dermgraph train fusion --set`")
    ap.add_argument("--out", type=Path, default=Path("runs/fusion_two_fold"))
    a = ap.parse_args(argv)
    folds = {}
    for half in HALVES:
        cfg = load_train_config(Config, a.config, [*a.overrides, f"isic_fit_half={half}", f"dermnet_fit_half={DERMNET_FIT[half]}", f"out_dir={a.out / half}",
                                                   "artifact=null"])  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):  # each fold's own report table is in <out>/<half>/
            summary = train(cfg)
        folds[half] = read_predictions(Path(summary["predictions"]))
    res = {name: figures(rows) for name, rows in pool(folds).items()}
    (a.out / "two_fold.json").write_text(json.dumps(res, indent=1))
    print(table(res))


if __name__ == "__main__":
    main()
