"""Protocol: modality classification (clinical / dermoscopy / histopathology / not_skin).

Only the encoder and the modality node run per image (cached like the agent's records; a full agent
record of the same case and configuration is used when the cache has one). The prediction is the
node's final label, so an OOD-rejected image counts as 'not_skin'. Results by ``group_columns``
(e.g. the source dataset) use :mod:`evals.fairness`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from evals.base import Predictions, ProtocolContext, ProtocolResult
from evals.classification import fmt, headline_names, score
from models.vocabulary import MODALITIES


def modality_of(record: dict[str, Any]) -> dict[str, Any] | None:
    """The modality result of a cached record (partial run or full Diagnosis)."""
    if "diagnosis" in record:
        return record["diagnosis"].get("modality")
    return record.get("modality")


def run(ctx: ProtocolContext) -> ProtocolResult:
    return score_predictions(ctx, predict(ctx))


def predict(ctx: ProtocolContext) -> Predictions:
    """The encode + modality partial run of every case (or a full agent record of it), cached."""
    from evals.predictions import MODALITY, ensure_predictions

    return Predictions(*ensure_predictions(ctx, MODALITY, reuse_agent=True))


def score_predictions(ctx: ProtocolContext, predictions: Predictions) -> ProtocolResult:
    """The modality figures from the records alone."""
    from evals.benchmark import canonical_label
    from evals.fairness import fairness, fairness_tables, group_values
    from evals.report import md_table

    opts = ctx.options
    n_boot, seed = int(opts.get("n_bootstrap", 1000)), int(opts.get("seed", 0))
    records, pstats = predictions.records, predictions.stats
    canon = canonical_label(ctx.bench)
    ok = [(c, r) for c, r in zip(ctx.cases, records) if r is not None and r.get("status") == "ok" and c.label is not None]
    n_err = sum(1 for r in records if r is not None and r.get("status") != "ok")
    if not ok:
        raise ValueError(f"benchmark {ctx.bench.name!r}: no case with a label and a successful prediction to score")
    cases = [c for c, _ in ok]
    mods = [modality_of(r) or {} for _, r in ok]
    y = [c.label for c in cases]
    p = [canon(m.get("label")) or "none" for m in mods]
    labels = list(ctx.bench.labels) or list(MODALITIES)
    names = headline_names(None, ctx.bench.metrics)
    res = score(y, p, labels, names, None, n_boot, seed)
    rejected = np.array([bool(m.get("rejected")) for m in mods])
    groups = group_values(cases, opts)
    fair = fairness(groups, y, p, labels, names, None, n_boot, seed, int(opts.get("min_group_size", 10))) if groups else {}
    trace_s = [sum(t.get("duration_s", 0) for t in (r.get("trace") or []) if t.get("node") in ("encode", "modality")) for _, r in ok if "trace" in r]
    metrics = {
        "n_scored": len(ok), "n_errors": n_err, "labels": labels, "headline": res["headline"],
        "per_class_recall": res["per_class_recall"], "support": res["support"], "confusion": res["confusion"],
        "rejected_rate": round(float(rejected.mean()), 4), "fairness": fair, "predictions": pstats,
        "mean_node_seconds_per_case": round(float(np.mean(trace_s)), 4) if trace_s else None,
    }  # fmt: skip
    tables = {
        f"Modality, {len(ok)} cases (95% CI)": md_table(names, [[fmt(res["headline"][m]) for m in names]]),
        "Per-class recall": md_table(["class", "n", "recall"], [[c, res["support"][c], f"{res['per_class_recall'][c]:.3f}"] for c in labels if res["support"][c]]),
    }
    tables.update(fairness_tables(fair, names))
    from evals import plots

    d = ctx.out_dir / "plots"
    plot_paths = {"Confusion matrix": plots.confusion_matrix(res["confusion"]["matrix"], res["confusion"]["labels"], d / "confusion_modality.png", f"{ctx.bench.name}: modality")}
    for g, f in fair.items():
        plot_paths[f"By {g}"] = plots.fairness_bars(f, [m for m in ("accuracy", "balanced_accuracy") if m in names] or names[:1], d / f"groups_{g}.png", f"{ctx.bench.name}: by {g}")
    notes = [f"OOD-rejected images count as 'not_skin' ({int(rejected.sum())} of {len(ok)})."]
    if n_err:
        notes.append(f"{n_err} cases failed and are not scored.")
    return ProtocolResult(metrics=metrics, tables=tables, plots=plot_paths, n_cases=len(ok), notes=notes)
