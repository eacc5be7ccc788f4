"""Metric functions: small, pure, tested. Inputs are plain sequences of labels / probabilities."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from models.vocabulary import SEVEN_POINT


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
    if not stats:  # n == 0 (no resampling asked for) or every resample undefined
        return float("nan"), float("nan")
    lo, hi = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def mcnemar_exact(a_right: Sequence[bool], b_right: Sequence[bool]) -> dict[str, Any]:
    """Exact two-sided McNemar test of two systems' correctness on the same cases (binomial test on the discordant pairs)."""
    from scipy.stats import binomtest

    a, b = np.asarray(a_right, bool), np.asarray(b_right, bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"only_a_right": only_a, "only_b_right": only_b, "p": round(float(p), 5)}


def paired_difference(metric: Callable[..., float], y: Sequence, a: Sequence, b: Sequence, n: int = 2000, seed: int = 0) -> dict[str, float]:
    """``metric(y, b) - metric(y, a)`` with a percentile-bootstrap 95% CI resampling cases (the same resample for both systems)."""
    y, a, b = np.asarray(y), np.asarray(a), np.asarray(b)
    lo, hi = bootstrap_ci(lambda yy, aa, bb: metric(yy, bb) - metric(yy, aa), y, a, b, n=n, seed=seed)
    return {"difference": round(metric(y, b) - metric(y, a), 4), "ci95": [round(lo, 4), round(hi, 4)]}


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


def macro_roc_auc(y: Sequence[str], proba: np.ndarray, labels: Sequence[str]) -> float:
    """Macro one-vs-rest ROC-AUC: ``proba[:, j]`` scores class ``labels[j]``; classes without both
    positives and negatives in ``y`` are skipped (NaN when none is left)."""
    from sklearn.metrics import roc_auc_score

    y, proba = np.asarray(y), np.asarray(proba, float)
    aucs = []
    for j, c in enumerate(labels):
        pos = y == c
        if pos.any() and (~pos).any():
            aucs.append(roc_auc_score(pos, proba[:, j]))
    return float(np.mean(aucs)) if aucs else float("nan")


# --------------------------------------------------------------------------- label-coded metrics
# The functions below work on a confusion matrix, so a bootstrap resample costs one bincount.


def confusion_matrix(y: Sequence[str], p: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Counts ``[truth, prediction]`` over ``labels``; predictions outside ``labels`` are dropped
    (they still lower recall: the truth row simply does not count them as correct).

    >>> confusion_matrix(["a", "b", "b"], ["a", "a", "x"], ["a", "b"]).tolist()
    [[1, 0], [1, 0]]
    """
    index = {c: i for i, c in enumerate(labels)}
    k = len(labels)
    cm = np.zeros((k, k), dtype=int)
    for t, q in zip(y, p):
        if t in index and q in index:
            cm[index[t], index[q]] += 1
    return cm


def encode_labels(y: Sequence[str], p: Sequence[str], labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Integer codes for truth and prediction over ``labels`` plus any other value seen (appended,
    sorted), so that fast metrics see every prediction."""
    extra = sorted((set(y) | set(p)) - set(labels))
    vocab = list(labels) + extra
    index = {c: i for i, c in enumerate(vocab)}
    return np.array([index[v] for v in y], dtype=int), np.array([index[v] for v in p], dtype=int), vocab


def _cm_codes(y: np.ndarray, p: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(y * k + p, minlength=k * k).reshape(k, k)


def coded_metric(name: str, k: int, positive: int | None = None) -> Callable[[np.ndarray, np.ndarray], float]:
    """A fast metric on integer-coded labels (see :func:`encode_labels`), with the same definitions as
    :func:`diagnosis_metrics`: balanced accuracy, macro-F1 and macro precision average over the classes
    present in the truth; ``sensitivity``/``specificity`` are for class ``positive``."""

    def fn(y: np.ndarray, p: np.ndarray) -> float:
        if len(y) == 0:
            return float("nan")
        cm = _cm_codes(np.asarray(y), np.asarray(p), k)
        tp = np.diag(cm).astype(float)
        support, predicted = cm.sum(1), cm.sum(0)
        present = support > 0
        if name == "accuracy":
            return float(tp.sum() / len(y))
        if name == "balanced_accuracy":
            return float((tp[present] / support[present]).mean())
        if name == "macro_f1":
            denom = (support + predicted)[present]
            return float(np.where(denom > 0, 2 * tp[present] / np.maximum(denom, 1), 0).mean())
        if name == "macro_precision":
            return float(np.where(predicted[present] > 0, tp[present] / np.maximum(predicted[present], 1), 0).mean())
        if name in ("sensitivity", "specificity"):
            if positive is None:
                raise ValueError(f"{name} needs a positive class")
            pos_true, pos_pred = support[positive], cm[:, positive].sum()
            if name == "sensitivity":
                return float(cm[positive, positive] / pos_true) if pos_true else float("nan")
            neg = len(y) - pos_true
            return float((neg - (pos_pred - cm[positive, positive])) / neg) if neg else float("nan")
        raise ValueError(f"unknown metric {name!r}")

    return fn


def macro_precision(y: Sequence[str], p: Sequence[str]) -> float:
    """Mean precision over the classes present in ``y`` (a class never predicted counts 0).

    >>> macro_precision(["a", "a", "b"], ["a", "b", "b"])
    0.75
    """
    yc, pc, vocab = encode_labels(y, p, sorted(set(y)))
    return coded_metric("macro_precision", len(vocab))(yc, pc)


def reliability_bins(confidence: Sequence[float], correct: Sequence[bool], bins: int = 10) -> list[dict[str, float]]:
    """Equal-width confidence bins (the same edges as :func:`expected_calibration_error`): for each,
    the range, the number of cases, mean confidence and accuracy (None when empty)."""
    c, k = np.asarray(confidence, float), np.asarray(correct, float)
    edges = np.linspace(0, 1, bins + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (c > lo) & (c <= hi) if lo > 0 else (c >= lo) & (c <= hi)
        out.append({
            "lo": round(float(lo), 4), "hi": round(float(hi), 4), "n": int(m.sum()),
            "confidence": round(float(c[m].mean()), 4) if m.any() else None,
            "accuracy": round(float(k[m].mean()), 4) if m.any() else None,
        })  # fmt: skip
    return out


def per_group(values: Sequence[str], metric: Callable[..., float], *arrays: Sequence) -> dict[str, dict[str, float]]:
    """``metric(*arrays)`` within each group of ``values``: ``{group: {"n": n, "value": v}}``.

    >>> per_group(["f", "f", "m"], accuracy, ["a", "b", "a"], ["a", "a", "a"])
    {'f': {'n': 2, 'value': 0.5}, 'm': {'n': 1, 'value': 1.0}}
    """
    g = np.asarray(values)
    arrs = [np.asarray(a) for a in arrays]
    return {str(v): {"n": int((g == v).sum()), "value": metric(*(a[g == v] for a in arrs))} for v in sorted(set(g.tolist()))}


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


def with_ci(metric: Callable[..., float], *arrays: Any, n: int = 1000, seed: int = 0, digits: int = 4) -> dict[str, Any]:
    """``{"value": metric(*arrays), "ci95": [lo, hi]}`` with a percentile bootstrap over cases
    (``ci95`` None for ``n=0`` or fewer than two cases; both None when the value is undefined)."""
    import math

    value = float(metric(*arrays))
    if not math.isfinite(value):
        return {"value": None, "ci95": None}
    out: dict[str, Any] = {"value": round(value, digits), "ci95": None}
    if n > 0 and len(arrays[0]) > 1:
        lo, hi = bootstrap_ci(metric, *arrays, n=n, seed=seed)
        out["ci95"] = [round(lo, digits), round(hi, digits)]
    return out
