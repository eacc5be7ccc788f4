"""Fit the reasoner's fusion weights on images the lesion classifier has not seen.

Calibration set: Derm7pt ``train``+``extra`` (mapped to the HAM10000 classes) and the ``calib`` half of
``isic2018_val`` (a deterministic class-stratified half; the other half, ``report``, and Derm7pt ``val``
are kept for reporting). Never HAM10000: the classifier was trained on it.

Stage 1 (no LLM) fits classifier + kNN weights from cached features. Stage 2 (``--records``) refits
with the LLM's candidate distribution taken from an agent batch run over the calibration cases.

    python -m training.calibrate_fusion                        # stage 1
    dermgraph batch .cache/calib_cases.csv --out .cache/calib.jsonl --set verifier.max_rounds=1
    python -m training.calibrate_fusion --records .cache/calib.jsonl   # stage 2
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import typer

from models.vocabulary import HAM_CLASSES, derm7pt_to_ham
from training.data import aligned, load_features, source_table

app = typer.Typer(add_completion=False)
EPS = 1e-4


def isic_half(image_id: str, dx: str, rows_by_class: dict[str, list[str]]) -> str:
    """'calib' or 'report': alternate within each class in sha1 order (deterministic, class-stratified)."""
    ids = rows_by_class[dx]
    return "calib" if ids.index(image_id) % 2 == 0 else "report"


def isic_split(rows: list[dict[str, str]]) -> dict[str, str]:
    """image_id → 'calib'/'report' for isic2018_val."""
    by_class: dict[str, list[str]] = {}
    for r in rows:
        by_class.setdefault(r["dx"], []).append(r["image_id"])
    for k in by_class:
        by_class[k].sort(key=lambda i: hashlib.sha1(i.encode()).hexdigest())
    return {r["image_id"]: isic_half(r["image_id"], r["dx"], by_class) for r in rows}


def calibration_cases() -> list[dict]:
    """Rows (source, image, label, part) for calibration and reporting (isic 'report' and derm7pt 'val' are report-only)."""
    out = []
    isic = source_table("isic2018_val")
    half = isic_split(isic)
    for r in isic:
        out.append({"source": "isic2018_val", "image": r["image"], "id": f"isic2018_val:{r['image_id']}", "label": r["dx"], "part": half[r["image_id"]]})
    for r in source_table("derm7pt"):
        lab = derm7pt_to_ham(r["diagnosis"])
        if lab is None:
            continue
        part = "report" if r["split"] == "val" else "calib"
        out.append({"source": "derm7pt", "image": r["image"], "id": f"derm7pt:{r['case_index']}", "label": lab, "part": part})
    return out


def expert_inputs(cases: list[dict], case_index: str | Path, k: int = 8, temperature: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """(N,7) classifier probs and (N,7) kNN probs for cases, from cached features; self-matches excluded."""
    from agent.config import DEFAULT_ROUTING
    from retrieval.cases import CaseRetriever, knn_label_distribution

    retriever = CaseRetriever(case_index)
    clf, knn = np.zeros((len(cases), 7)), np.zeros((len(cases), 7))
    by_source: dict[str, list[int]] = {}
    for i, c in enumerate(cases):
        by_source.setdefault(c["source"], []).append(i)
    for source, idx in by_source.items():
        rows = [{"image": cases[i]["image"], "_i": str(i)} for i in idx]
        rows, f = aligned(rows, load_features(source))
        hits = retriever.search(f["features"], k=k + 1, sources=DEFAULT_ROUTING["dermoscopy"].case_sources)
        for r, p, h in zip(rows, f["probs"], hits):
            i = int(r["_i"])
            clf[i] = p
            h = [x for x in h if x.id != cases[i]["id"] and x.record.get("image") != cases[i]["image"]][:k]
            d = knn_label_distribution(h, HAM_CLASSES, temperature)
            knn[i] = [d[c] for c in HAM_CLASSES]
    return clf, knn


def fit(clf: np.ndarray, knn: np.ndarray, llm: np.ndarray | None, y: np.ndarray, l2_bias: float = 1.0, balanced: bool = True) -> dict:
    """Weights and per-class biases minimising (class-balanced) NLL of the fused distribution."""
    from scipy.optimize import minimize

    feats = [np.log(np.clip(clf, EPS, 1)), np.log(np.clip(knn, EPS, 1))] + ([np.log(np.clip(llm, EPS, 1))] if llm is not None else [])
    n_w = len(feats)
    counts = np.bincount(y, minlength=7).astype(float)
    w_case = (1.0 / np.maximum(counts, 1))[y] if balanced else np.ones(len(y))
    w_case = w_case / w_case.sum()

    def loss(theta):
        w, b = theta[:n_w], theta[n_w:]
        z = sum(wi * f for wi, f in zip(w, feats)) + b
        z = z - z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        return -(w_case * logp[np.arange(len(y)), y]).sum() + l2_bias * 1e-2 * (b**2).sum()

    theta0 = np.concatenate([np.ones(1), np.zeros(n_w - 1), np.zeros(7)])
    res = minimize(loss, theta0, method="L-BFGS-B", bounds=[(0, 5)] * n_w + [(-5, 5)] * 7)
    w, b = res.x[:n_w], res.x[n_w:]
    params = {"w_classifier": round(float(w[0]), 4), "w_knn": round(float(w[1]), 4), "bias": {c: round(float(v), 4) for c, v in zip(HAM_CLASSES, b)}}
    params["w_llm"] = round(float(w[2]), 4) if llm is not None else 0.0
    return params


def fit_llm_weight(params: dict, clf: np.ndarray, knn: np.ndarray, llm: np.ndarray, y: np.ndarray, balanced: bool = True) -> dict:
    """Fit ``w_llm`` alone (grid search, class-balanced NLL) on top of fixed stage-1 parameters."""
    from agent.fusion import fuse

    counts = np.bincount(y, minlength=7).astype(float)
    w_case = (1.0 / np.maximum(counts, 1))[y] if balanced else np.ones(len(y))
    best = None
    for w in np.round(np.arange(0.0, 2.01, 0.1), 2):
        trial = {**params, "w_llm": float(w)}
        nll = 0.0
        for i in range(len(y)):
            p = fuse(HAM_CLASSES, trial, classifier=dict(zip(HAM_CLASSES, clf[i])), knn=dict(zip(HAM_CLASSES, knn[i])), llm=dict(zip(HAM_CLASSES, llm[i])))
            nll -= w_case[i] * np.log(max(p[HAM_CLASSES[y[i]]], EPS))
        if best is None or nll < best[0]:
            best = (nll, float(w))
    return {k: v for k, v in params.items() if k != "w_morphology_on_revise"} | {"w_llm": best[1]}


def _predict(params: dict, clf, knn, llm=None) -> np.ndarray:
    from agent.fusion import fuse

    out = []
    for i in range(len(clf)):
        p = fuse(HAM_CLASSES, params, classifier=dict(zip(HAM_CLASSES, clf[i])), knn=dict(zip(HAM_CLASSES, knn[i])),
                 llm=dict(zip(HAM_CLASSES, llm[i])) if llm is not None else None)
        out.append(next(iter(p)))
    return np.array(out)


@app.command()
def main(
    out: Path = typer.Option(Path("models/artifacts/fusion.json")),
    case_index: Path = typer.Option(Path("models/artifacts/case_index")),
    records: Path | None = typer.Option(None, help="Agent batch records over the calibration cases (stage 2: adds the LLM weight)."),
    write_cases: Path | None = typer.Option(None, help="Write the calibration cases as a batch CSV (for stage 2) and exit."),
    balanced: bool = typer.Option(True, help="Class-balanced NLL (favours sensitivity on rare classes such as melanoma)."),
):
    from evals.metrics import diagnosis_metrics
    from models.paths import data_dir

    cases = calibration_cases()
    if write_cases:
        write_cases.parent.mkdir(parents=True, exist_ok=True)
        with write_cases.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["id", "image", "label", "part"])
            w.writeheader()
            for c in cases:
                w.writerow({"id": c["id"], "image": str(data_dir() / c["source"] / c["image"]), "label": c["label"], "part": c["part"]})
        typer.echo(f"wrote {len(cases)} cases to {write_cases}")
        return
    clf, knn = expert_inputs(cases, case_index)
    y = np.array([HAM_CLASSES.index(c["label"]) for c in cases])
    part = np.array([c["part"] for c in cases])
    llm = None
    if records:
        by_id = {}
        for line in records.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("status") != "ok":
                continue
            reason = [t for t in rec["diagnosis"]["trace"] if t["node"] == "reason"]
            lp = reason[0]["outputs"]["reasoning"].get("llm_probs") if reason else None
            if lp:
                by_id[rec["id"]] = [lp.get(c, 0.0) for c in HAM_CLASSES]
        have = np.array([c["id"] in by_id for c in cases])
        cases = [c for c, h in zip(cases, have) if h]
        clf, knn, y, part = clf[have], knn[have], y[have], part[have]
        llm = np.array([by_id[c["id"]] for c in cases])
    cal = part == "calib"
    if llm is None:
        params = fit(clf[cal], knn[cal], None, y[cal], balanced=balanced)
    else:
        # Stage 2 has few cases: keep the stage-1 weights and biases, fit only the LLM's weight.
        stage1 = json.loads(out.read_text())["dermoscopy"]
        params = fit_llm_weight(stage1, clf[cal], knn[cal], llm[cal], y[cal], balanced=balanced)
    labels = np.array(HAM_CLASSES)
    report = {}
    for name, m in (("calib", cal), ("report", ~cal)):
        if not m.any():
            continue  # stage 2 only has LLM outputs for calibration cases
        yy = labels[y[m]]
        report[name] = {
            "classifier_alone": diagnosis_metrics(yy, labels[clf[m].argmax(1)]),
            "knn_alone": diagnosis_metrics(yy, labels[knn[m].argmax(1)]),
            "fused": diagnosis_metrics(yy, _predict(params, clf[m], knn[m], llm[m] if llm is not None else None)),
        }
    doc = {
        "id": "fusion-calibration",
        "dermoscopy": {**params, "w_morphology_on_revise": 1.0},
        "clinical": {"w_knn": 1.0, "w_llm": params["w_llm"]},
        "fitted_on": (
            "the 'calib' half of isic2018_val (all non-nevus + 60 nevus cases; the LLM sees the agent's real prompt)"
            if records
            else "Derm7pt train+extra and the 'calib' half of isic2018_val (images unseen by the sklesion classifier)"
        ),
        "balanced": balanced,
        "stage": 2 if records else 1,
        "metrics": report,
    }
    out.write_text(json.dumps(doc, indent=2))
    typer.echo(json.dumps(doc, indent=2))


if __name__ == "__main__":
    app()
