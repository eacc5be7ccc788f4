"""Train the seven Derm7pt concept heads (multi-class per criterion, class-balanced) on encoder features.

Trained on Derm7pt ``train`` + ``extra``, regularisation selected per criterion on ``val`` by macro-F1.

    python -m training.concepts --out models/artifacts/derm7pt_concepts.safetensors
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer

from agent.labels import SEVEN_POINT
from training.data import aligned, load_features, source_table

app = typer.Typer(add_completion=False)
C_GRID = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)


def criteria_metrics(truth: dict[str, list[str]], pred: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """Per-criterion accuracy and macro-F1 (over the values present in truth or prediction)."""
    from sklearn.metrics import accuracy_score, f1_score

    out = {}
    for crit in SEVEN_POINT:
        if crit in truth and crit in pred:
            out[crit] = {
                "accuracy": round(float(accuracy_score(truth[crit], pred[crit])), 4),
                "macro_f1": round(float(f1_score(truth[crit], pred[crit], average="macro", zero_division=0)), 4),
            }
    if out:
        out["mean"] = {m: round(float(np.mean([v[m] for v in out.values()])), 4) for m in ("accuracy", "macro_f1")}
    return out


@app.command()
def main(
    out: Path = typer.Option(Path("models/artifacts/derm7pt_concepts.safetensors")),
    report: Path = typer.Option(Path("models/artifacts/derm7pt_concepts.metrics.json")),
):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import StandardScaler

    from models.heads import Head, HeadSet

    rows, f = aligned(source_table("derm7pt"), load_features("derm7pt"))
    split = np.array([r["split"] for r in rows])
    tr, va = np.isin(split, ["train", "extra"]), split == "val"
    scaler = StandardScaler().fit(f["features"][tr])
    x = scaler.transform(f["features"])
    heads, chosen, truth, pred, majority = {}, {}, {}, {}, {}
    for crit in SEVEN_POINT:
        y = np.array([r[crit] for r in rows])
        best = None
        for c in C_GRID:
            clf = LogisticRegression(C=c, class_weight="balanced", max_iter=3000).fit(x[tr], y[tr])
            score = f1_score(y[va], clf.predict(x[va]), average="macro", zero_division=0)
            if best is None or score > best[0]:
                best = (score, c, clf)
        _, c, clf = best
        chosen[crit] = c
        classes = [str(k) for k in clf.classes_]
        weight, bias = clf.coef_.T, clf.intercept_
        if len(classes) == 2:  # sklearn's binary LR has one column: expand to a 2-way softmax
            weight = np.stack([-weight[:, 0] / 2, weight[:, 0] / 2], axis=1)
            bias = np.array([-bias[0] / 2, bias[0] / 2])
        heads[crit] = Head(crit, classes, weight.astype(np.float32), bias.astype(np.float32))
        truth[crit] = list(y[va])
        pred[crit] = list(clf.predict(x[va]))
        values, counts = np.unique(y[tr], return_counts=True)
        majority[crit] = [values[counts.argmax()]] * int(va.sum())
    metrics = {
        "val": criteria_metrics(truth, pred),
        "val_majority_baseline": criteria_metrics(truth, majority),
        "C": chosen,
        "n_train": int(tr.sum()),
        "n_val": int(va.sum()),
    }
    hs = HeadSet(scaler.mean_.astype(np.float32), scaler.scale_.astype(np.float32), heads, inputs="sklesion features (2048)",
                 meta={"id": "derm7pt-concept-heads", "min_confidence": 0.5, "metrics": metrics,
                       "trained_on": "Derm7pt train+extra (CC BY-NC-ND 4.0), selected on val"})
    out.parent.mkdir(parents=True, exist_ok=True)
    hs.save(out)
    report.write_text(json.dumps(metrics, indent=2))
    typer.echo(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    app()
