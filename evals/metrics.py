"""Metric functions: small, pure, tested. Inputs are plain sequences of labels / probabilities."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def accuracy(y: Sequence[str], p: Sequence[str]) -> float:
    y, p = np.asarray(y), np.asarray(p)
    return float((y == p).mean()) if len(y) else float("nan")


def recall_per_class(y: Sequence[str], p: Sequence[str], labels: Sequence[str] | None = None) -> dict[str, float]:
    """Recall (sensitivity) of each class present in ``y``."""
    y, p = np.asarray(y), np.asarray(p)
    labels = labels if labels is not None else sorted(set(y))
    return {c: float((p[y == c] == c).mean()) for c in labels if (y == c).any()}


def balanced_accuracy(y: Sequence[str], p: Sequence[str]) -> float:
    """Mean per-class recall over the classes present in ``y``."""
    r = recall_per_class(y, p)
    return float(np.mean(list(r.values()))) if r else float("nan")


def macro_f1(y: Sequence[str], p: Sequence[str], labels: Sequence[str] | None = None) -> float:
    y, p = np.asarray(y), np.asarray(p)
    labels = labels if labels is not None else sorted(set(y) | set(p))
    f1s = []
    for c in labels:
        tp = ((p == c) & (y == c)).sum()
        fp = ((p == c) & (y != c)).sum()
        fn = ((p != c) & (y == c)).sum()
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else float("nan")


def sensitivity_specificity(y: Sequence[str], p: Sequence[str], positive: str = "mel") -> tuple[float, float]:
    """Sensitivity and specificity of predicting ``positive`` vs the rest."""
    y, p = np.asarray(y) == positive, np.asarray(p) == positive
    sens = float((p & y).sum() / y.sum()) if y.any() else float("nan")
    spec = float((~p & ~y).sum() / (~y).sum()) if (~y).any() else float("nan")
    return sens, spec


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[bool], bins: int = 10) -> float:
    """ECE with equal-width confidence bins."""
    c, k = np.asarray(confidence, float), np.asarray(correct, float)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (c > lo) & (c <= hi) if lo > 0 else (c >= lo) & (c <= hi)
        if m.any():
            ece += m.mean() * abs(k[m].mean() - c[m].mean())
    return float(ece)


def risk_coverage(score: Sequence[float], correct: Sequence[bool]) -> tuple[np.ndarray, np.ndarray, float]:
    """Coverage, selective risk (error rate among the most confident) and AURC, ordering by ``score``."""
    s, k = np.asarray(score, float), np.asarray(correct, float)
    order = np.argsort(-s, kind="stable")
    k = k[order]
    n = np.arange(1, len(k) + 1)
    risk = np.cumsum(1 - k) / n
    coverage = n / len(k)
    return coverage, risk, float(risk.mean())


def accuracy_at_coverage(score: Sequence[float], correct: Sequence[bool], coverage: float) -> float:
    """Accuracy on the ``coverage`` fraction of cases with the highest score."""
    s, k = np.asarray(score, float), np.asarray(correct, float)
    n = max(1, int(round(coverage * len(k))))
    return float(k[np.argsort(-s, kind="stable")[:n]].mean())


def bootstrap_ci(metric: Callable[..., float], *arrays: Sequence, n: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap (1-alpha) CI of ``metric(*arrays)`` resampling cases with replacement."""
    rng = np.random.default_rng(seed)
    arrs = [np.asarray(a) for a in arrays]
    m = len(arrs[0])
    stats = []
    for _ in range(n):
        idx = rng.integers(0, m, m)
        v = metric(*(a[idx] for a in arrs))
        if not np.isnan(v):
            stats.append(v)
    lo, hi = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def diagnosis_metrics(y: Sequence[str], p: Sequence[str], positive: str = "mel") -> dict[str, float]:
    """Headline diagnosis metrics: accuracy, balanced accuracy, macro-F1, melanoma sensitivity/specificity."""
    sens, spec = sensitivity_specificity(y, p, positive)
    return {
        "n": len(y),
        "accuracy": round(accuracy(y, p), 4),
        "balanced_accuracy": round(balanced_accuracy(y, p), 4),
        "macro_f1": round(macro_f1(y, p, sorted(set(y))), 4),
        f"{positive}_sensitivity": round(sens, 4),
        f"{positive}_specificity": round(spec, 4),
    }
