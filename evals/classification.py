"""Scoring of single-label predictions: headline metrics with bootstrap CIs, per-class recall, confusion.

Shared by the diagnosis, modality and fairness code so that every table uses the same definitions
(those of :func:`evals.metrics.diagnosis_metrics`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from evals.metrics import bootstrap_ci, coded_metric, confusion_matrix, encode_labels, recall_per_class

BASE_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_precision")


def headline_names(positive: str | None, requested: Sequence[str] = ()) -> list[str]:
    """The headline metric names: ``requested`` (a benchmark's ``metrics``) or the defaults."""
    names = list(BASE_METRICS) + ([f"{positive}_sensitivity", f"{positive}_specificity"] if positive else [])
    if requested:
        unknown = [m for m in requested if m not in names]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; available: {', '.join(names)}")
        return list(requested)
    return names


def _metric_fn(name: str, vocab: list[str], positive: str | None):
    if positive and name.startswith(f"{positive}_"):
        return coded_metric(name.removeprefix(f"{positive}_"), len(vocab), vocab.index(positive) if positive in vocab else None)
    return coded_metric(name, len(vocab))


def headline(y: Sequence[str], p: Sequence[str], labels: Sequence[str], names: Sequence[str], positive: str | None = None,
             n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:  # fmt: skip
    """``{metric: {"value": v, "ci95": [lo, hi]}}``; CIs by the percentile bootstrap over cases (same seed
    for every metric, so the resamples are shared). A metric that is undefined (no positive case) is None."""
    out: dict[str, dict[str, Any]] = {}
    if len(y) == 0:
        return {m: {"value": None, "ci95": None} for m in names}
    yc, pc, vocab = encode_labels(list(y), list(p), list(labels))
    for name in names:
        if positive and name.startswith(f"{positive}_") and positive not in vocab:
            out[name] = {"value": None, "ci95": None}
            continue
        fn = _metric_fn(name, vocab, positive)
        v = fn(yc, pc)
        if np.isnan(v):
            out[name] = {"value": None, "ci95": None}
            continue
        ci = bootstrap_ci(fn, yc, pc, n=n_boot, seed=seed) if n_boot > 0 and len(y) > 1 else (v, v)
        out[name] = {"value": round(float(v), 4), "ci95": [round(ci[0], 4), round(ci[1], 4)]}
    return out


def score(y: Sequence[str], p: Sequence[str], labels: Sequence[str], names: Sequence[str], positive: str | None = None,
          n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Headline metrics with CIs, per-class recall and the confusion matrix over ``labels`` (plus any
    predicted value outside them, e.g. 'none' for no answer, as an extra column)."""
    extra = sorted(set(p) - set(labels))
    cm_labels = list(labels) + extra
    return {
        "n": len(y),
        "headline": headline(y, p, labels, names, positive, n_boot, seed),
        "per_class_recall": {k: round(v, 4) for k, v in recall_per_class(y, p, list(labels)).items()},
        "support": {c: int(sum(1 for t in y if t == c)) for c in labels},
        "confusion": {"labels": cm_labels, "matrix": confusion_matrix(y, p, cm_labels).tolist()},
    }


def fmt(m: dict[str, Any] | None, digits: int = 3) -> str:
    """``0.735 [0.70, 0.77]`` for a ``{"value", "ci95"}`` metric ('-' when undefined)."""
    if not m or m.get("value") is None:
        return "-"
    v = f"{m['value']:.{digits}f}"
    ci = m.get("ci95")
    return f"{v} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else v
