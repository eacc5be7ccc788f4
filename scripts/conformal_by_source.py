"""Per-source coverage of the fusion's conformal sets, measured on its FIT cases only (no evaluation half).

For the dermoscopy fit cases of ``configs/train/fusion.yaml`` (isic2018_val ``calib`` + Derm7pt train/extra),
with the stacker's out-of-fold probabilities: the coverage on each source of sets calibrated on the other
source, and of pooled sets (5-fold over the fit cases), for the LAC and APS scores, class-conditional (Mondrian)
LAC and LAC by the predicted source (the default), with the mean set size. Shows how much of the per-source
coverage gap is the sources' difference rather than the calibration.

    python scripts/conformal_by_source.py [--config configs/train/fusion.yaml] [--alpha 0.1]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from models.conformal import conformal_quantile, prediction_set
    from training.config import load_train_config
    from training.fusion import Config, add_morphology_outputs, choose_stacker, conformal_scores, fit_set_groups, load_parts

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=Path("configs/train/fusion.yaml"))
    ap.add_argument("--alpha", type=float, default=0.1)
    a = ap.parse_args()
    cfg = load_train_config(Config, a.config, [])
    parts = load_parts(cfg.experts_file, cfg.extra_experts, cfg.clinical_extra_candidates, cfg.findings_from, candidate_experts=cfg.clinical_experts)
    add_morphology_outputs(parts, cfg)
    fit = [r for r in parts["derm_fit"] if r["source"] in cfg.fit_sources]
    _, _, oof = choose_stacker(fit, list(cfg.dermoscopy_experts), cfg)
    src = np.array([r["source"] for r in fit])
    y = np.array([r["label"] for r in fit])
    fold = np.random.default_rng(cfg.seed).permutation(len(fit)) % 5
    sources = sorted(set(src))
    out: dict[str, dict] = {}

    def covered(i: int, members: list[str]) -> bool:
        return fit[i]["label"] in members

    for score in ("lac", "aps"):
        s = conformal_scores(fit, oof, score)
        res: dict = {}
        for cal in sources:
            q = conformal_quantile(s[src == cal], a.alpha)
            for test in sources:
                if test != cal:
                    sets = [prediction_set(oof[i], q, score) for i in np.flatnonzero(src == test)]
                    res[f"calibrated on {cal} -> {test}"] = {"coverage": round(float(np.mean([covered(i, st) for i, st in zip(np.flatnonzero(src == test), sets)])), 3),
                                                             "mean_size": round(float(np.mean([len(st) for st in sets])), 2)}  # fmt: skip
        hits: dict[str, list[bool]] = {k: [] for k in sources}
        sizes: list[int] = []
        for j in range(5):
            q = conformal_quantile(s[fold != j], a.alpha)
            for i in np.flatnonzero(fold == j):
                st = prediction_set(oof[i], q, score)
                hits[src[i]].append(covered(i, st))
                sizes.append(len(st))
        res["pooled, 5-fold"] = {**{k: round(float(np.mean(v)), 3) for k, v in hits.items()}, "mean_size": round(float(np.mean(sizes)), 2)}
        out[score] = res
    s = conformal_scores(fit, oof, "lac")
    hits = {k: [] for k in sources}
    sizes = []
    for j in range(5):
        tr = fold != j
        q_all = conformal_quantile(s[tr], a.alpha)
        q = {c: conformal_quantile(s[tr & (y == c)], a.alpha) if (tr & (y == c)).sum() >= 9 else q_all for c in set(y)}
        for i in np.flatnonzero(fold == j):
            st = [c for c, p in oof[i].items() if 1 - p <= q.get(c, q_all)] or [max(oof[i], key=oof[i].get)]
            hits[src[i]].append(covered(i, st))
            sizes.append(len(st))
    out["lac, class-conditional (Mondrian), pooled 5-fold"] = {**{k: round(float(np.mean(v)), 3) for k, v in hits.items()}, "mean_size": round(float(np.mean(sizes)), 2)}
    # Group-conditional by the predicted source (conformal_groups: source, the default): out-of-fold groups from the
    # trainer's linear model over the Xception features, one threshold per group.
    groups = fit_set_groups(fit, [], cfg).calibration_group
    hits, sizes = {k: [] for k in sources}, []
    for j in range(5):
        tr = fold != j
        for i in np.flatnonzero(fold == j):
            st = prediction_set(oof[i], conformal_quantile(s[tr & (groups == groups[i])], a.alpha), "lac")
            hits[src[i]].append(covered(i, st))
            sizes.append(len(st))
    out["lac, by predicted source (Mondrian; the default), pooled 5-fold"] = {**{k: round(float(np.mean(v)), 3) for k, v in hits.items()},
                                                                              "mean_size": round(float(np.mean(sizes)), 2)}  # fmt: skip
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
