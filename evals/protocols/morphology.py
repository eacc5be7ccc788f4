"""Protocol 4: seven-point criteria (Derm7pt) from the agent's morphology describer.

Predictions come from the structured findings of the concept heads, or, when the describer is a VLM
(``morphology.kind: vlm``) or a record has no structured findings, are parsed from the free-text
description with :func:`models.vocabulary.parse_findings`. A criterion the text does not mention is
read as ``absent`` (option ``unmentioned``: 'absent' or 'skip'). Per-criterion accuracy and macro-F1
are :func:`evals.metrics.criteria_metrics` (the same numbers as the concept heads' model card);
the means get bootstrap CIs. A full agent record of the case is used when cached (e.g. imported from
``dermgraph batch``); otherwise only encode → modality → morphology run.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from evals.base import Predictions, ProtocolContext, ProtocolResult
from models.vocabulary import SEVEN_POINT, parse_findings


def morphology_of(record: dict[str, Any]) -> dict[str, Any]:
    """``{"findings": [...], "description": str}`` of a cached record (partial run or full Diagnosis)."""
    if "diagnosis" in record:
        d = record["diagnosis"]
        return {"findings": d.get("findings") or [], "description": d.get("description") or ""}
    m = record.get("morphology") or {}
    return {"findings": m.get("findings") or [], "description": m.get("description") or ""}


def predicted_criteria(morph: dict[str, Any], free_text: bool = False) -> tuple[dict[str, str], str]:
    """Criterion → value, and where it came from ('structured' or 'text')."""
    if morph["findings"] and not free_text:
        return {f["criterion"]: f["value"] for f in morph["findings"]}, "structured"
    return parse_findings(morph["description"]), "text"


def _mean_metric(sizes: list[int], name: str):
    """Mean over criteria of accuracy or macro-F1 (over the values in truth or prediction, as sklearn's
    ``f1_score(average="macro")``) on integer-coded columns ``t0, p0, t1, p1, ...``; fast enough to bootstrap."""

    def fn(*cols: np.ndarray) -> float:
        vals = []
        for k, size in enumerate(sizes):
            t, p = cols[2 * k], cols[2 * k + 1]
            if name == "accuracy":
                vals.append((t == p).mean())
                continue
            cm = np.bincount(t * size + p, minlength=size * size).reshape(size, size)
            tp, s_, q_ = np.diag(cm), cm.sum(1), cm.sum(0)
            present = (s_ + q_) > 0
            vals.append(np.mean(2 * tp[present] / (s_ + q_)[present]))
        return float(np.mean(vals))

    return fn


def run(ctx: ProtocolContext) -> ProtocolResult:
    return score_predictions(ctx, predict(ctx))


def predict(ctx: ProtocolContext) -> Predictions:
    """The encode + modality + morphology partial run of every case (or a full agent record of it), cached."""
    from evals.predictions import DESCRIBE, ensure_predictions

    return Predictions(*ensure_predictions(ctx, DESCRIBE, reuse_agent=True))


def score_predictions(ctx: ProtocolContext, predictions: Predictions) -> ProtocolResult:
    """The 7-point criteria figures from the records alone."""
    from evals.metrics import criteria_metrics
    from evals.report import md_table

    opts = ctx.options
    n_boot, seed = int(opts.get("n_bootstrap", 1000)), int(opts.get("seed", 0))
    unmentioned = opts.get("unmentioned", "absent")
    criteria = [c for c in SEVEN_POINT if c in (ctx.bench.dataset.extra_columns or list(SEVEN_POINT))]
    records, pstats = predictions.records, predictions.stats
    free_text = ctx.agent_config is not None and ctx.agent_config.morphology.kind == "vlm"
    truth: dict[str, list[str]] = {c: [] for c in criteria}
    pred: dict[str, list[str]] = {c: [] for c in criteria}
    sources: dict[str, int] = {}
    mentioned = n = n_err = 0
    for case, rec in zip(ctx.cases, records):
        if rec is None:
            continue
        if rec.get("status") != "ok":
            n_err += 1
            continue
        values, src = predicted_criteria(morphology_of(rec), free_text)
        if not values and src == "structured":
            continue
        sources[src] = sources.get(src, 0) + 1
        n += 1
        for c in criteria:
            mentioned += c in values
            v = values.get(c)
            if v is None and unmentioned == "skip":
                continue
            truth[c].append(case.extra[c])
            pred[c].append(v or "absent")
    if n == 0:
        raise ValueError(f"benchmark {ctx.bench.name!r}: no case has findings to score (is the describer producing any?)")
    per = criteria_metrics(truth, pred)
    mean = per.pop("mean", {})
    majority = criteria_metrics(truth, {c: [max(set(truth[c]), key=truth[c].count)] * len(truth[c]) for c in criteria if truth[c]})
    maj_mean = majority.pop("mean", {})
    metrics: dict[str, Any] = {"n_scored": n, "n_errors": n_err, "criteria": per, "sources": sources,
                               "mention_rate": round(mentioned / (n * len(criteria)), 4), "majority_baseline": {"criteria": majority, "mean": maj_mean},
                               "predictions": pstats, "headline": {}}  # fmt: skip
    # Bootstrap the case-level resampling only when every criterion is scored on the same cases.
    same_cases = len({len(truth[c]) for c in criteria}) == 1
    for m in ("accuracy", "macro_f1"):
        entry: dict[str, Any] = {"value": mean.get(m)}
        if same_cases and n_boot and n > 1:
            cols, sizes = [], []
            for c in criteria:
                vocab = {v: i for i, v in enumerate(sorted(set(truth[c]) | set(pred[c])))}
                cols += [np.array([vocab[v] for v in truth[c]]), np.array([vocab[v] for v in pred[c]])]
                sizes.append(len(vocab))
            lo, hi = _bootstrap(_mean_metric(sizes, m), cols, n_boot, seed)
            entry["ci95"] = [round(lo, 4), round(hi, 4)]
        metrics["headline"][f"mean_{m}"] = entry
    from evals.classification import fmt

    rows = [[c, len(truth[c]), f"{v['accuracy']:.3f}", f"{v['macro_f1']:.3f}", f"{majority.get(c, {}).get('accuracy', float('nan')):.3f}", f"{majority.get(c, {}).get('macro_f1', float('nan')):.3f}"] for c, v in per.items()]
    rows.append(["**mean**", "", fmt(metrics["headline"]["mean_accuracy"]), fmt(metrics["headline"]["mean_macro_f1"]), f"{maj_mean.get('accuracy', float('nan')):.3f}", f"{maj_mean.get('macro_f1', float('nan')):.3f}"])
    tables = {"Seven-point criteria (95% CI on the means)": md_table(["criterion", "n", "accuracy", "macro-F1", "majority acc.", "majority macro-F1"], rows)}
    from evals import plots

    bars = {c: {"accuracy": {"value": v["accuracy"]}, "macro_f1": {"value": v["macro_f1"]}} for c, v in per.items()}
    plot_paths = {"Per-criterion accuracy and macro-F1": plots.grouped_bars(bars, ["accuracy", "macro_f1"], ctx.out_dir / "plots" / "criteria.png", f"{ctx.bench.name}: 7-point criteria")}
    notes = [f"Findings from: {', '.join(f'{k} ({v})' for k, v in sources.items())}; criteria mentioned in {metrics['mention_rate']:.0%} of case x criterion pairs; unmentioned read as {unmentioned!r}.",
             "Majority baseline: the most frequent truth value of each criterion in the scored cases."]  # fmt: skip
    return ProtocolResult(metrics=metrics, tables=tables, plots=plot_paths, n_cases=n, notes=notes)


def _bootstrap(fn, cols: list[np.ndarray], n: int, seed: int) -> tuple[float, float]:
    from evals.metrics import bootstrap_ci

    return bootstrap_ci(fn, *cols, n=n, seed=seed)
