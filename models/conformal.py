"""Split-conformal prediction sets and selective classification with guaranteed risk (pure NumPy/SciPy).

Prediction sets (Vovk et al.; Sadinle et al. 2019 "LAC"; Romano et al. 2020 "APS"): with calibration
scores s_i of the true label, the set {c : score(c) <= q̂}, q̂ the ⌈(n+1)(1-α)⌉-th smallest s_i, contains
the true label with probability >= 1-α for an exchangeable test case.

Selective risk (Geifman & El-Yaniv 2017, "Selective classification for deep neural networks", SGR):
the lowest acceptance threshold whose Clopper-Pearson upper bound on the error rate of accepted
calibration cases is <= r*, the bound taken at δ/⌈log2 n⌉ for the binary search's union bound, so that
the risk of accepted cases is <= r* with probability >= 1-δ over the calibration draw.
"""

from __future__ import annotations

import math
from typing import Literal, Mapping, Sequence

import numpy as np

Score = Literal["lac", "aps"]


def true_label_scores(probs: np.ndarray, y: np.ndarray, score: Score = "lac") -> np.ndarray:
    """Nonconformity of the true label per row of ``probs`` (rows sum to 1; y = -1: the truth is not a
    candidate, which no finite set covers: +inf)."""
    probs = np.asarray(probs, float)
    y = np.asarray(y, int)
    out = np.full(len(y), np.inf)
    ok = y >= 0
    if score == "lac":
        out[ok] = 1.0 - probs[ok, y[ok]]
    elif score == "aps":
        # Non-randomised APS: mass of the labels ranked at or above the true one.
        p_true = probs[ok, y[ok]]
        out[ok] = np.where(probs[ok] >= p_true[:, None], probs[ok], 0.0).sum(axis=1)
    else:
        raise ValueError(f"unknown conformal score {score!r}; valid: lac, aps")
    return out


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """q̂: the ⌈(n+1)(1-α)⌉-th smallest score (inf when n is too small for 1-α)."""
    s = np.sort(np.asarray(scores, float))
    n = len(s)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    k = math.ceil((n + 1) * (1 - alpha))
    return float("inf") if k > n or n == 0 else float(s[k - 1])


def prediction_set(probs: Mapping[str, float], qhat: float, score: Score = "lac") -> list[str]:
    """Labels in the conformal set, most probable first (never empty: the top label is always kept)."""
    ranked = sorted(probs.items(), key=lambda kv: -kv[1])
    if not ranked:
        return []
    if math.isinf(qhat):
        return [c for c, _ in ranked]
    if score == "lac":
        keep = [c for c, p in ranked if 1.0 - p <= qhat + 1e-12]
    elif score == "aps":
        keep, mass = [], 0.0
        for c, p in ranked:
            mass += p
            if mass > qhat + 1e-12:
                break
            keep.append(c)
    else:
        raise ValueError(f"unknown conformal score {score!r}; valid: lac, aps")
    return keep or [ranked[0][0]]


def clopper_pearson_upper(errors: int, n: int, delta: float) -> float:
    """One-sided (1-δ) upper confidence bound on a binomial error rate."""
    from scipy.stats import beta

    if n == 0:
        return 1.0
    if errors >= n:
        return 1.0
    return float(beta.ppf(1 - delta, errors + 1, n - errors))


def sgr_threshold(kappa: np.ndarray, correct: np.ndarray, target_risk: float, delta: float = 0.1) -> tuple[float, dict]:
    """SGR: the acceptance threshold θ (accept iff κ >= θ) of largest coverage whose risk bound is <= target.

    Returns (θ, info); θ = +inf when no threshold meets the target (abstain on everything).
    """
    kappa = np.asarray(kappa, float)
    correct = np.asarray(correct, bool)
    n = len(kappa)
    if n == 0:
        return float("inf"), {"n": 0, "reason": "no calibration data"}
    order = np.argsort(-kappa, kind="stable")
    ks, errs = kappa[order], np.cumsum(~correct[order])
    steps = max(1, math.ceil(math.log2(n)))
    d = delta / steps
    # Binary search over the number accepted m (most confident first), as in the paper.
    lo, hi, best = 1, n, 0
    while lo <= hi:
        m = (lo + hi) // 2
        bound = clopper_pearson_upper(int(errs[m - 1]), m, d)
        if bound <= target_risk:
            best, lo = m, m + 1
        else:
            hi = m - 1
    if best == 0:
        return float("inf"), {"n": n, "accepted": 0, "coverage": 0.0, "bound": None, "target_risk": target_risk, "delta": delta}
    theta = float(ks[best - 1])
    acc = kappa >= theta  # ties at θ are accepted too
    m = int(acc.sum())
    e = int((~correct[acc]).sum())
    return theta, {"n": n, "accepted": m, "coverage": round(m / n, 4), "empirical_risk": round(e / m, 4),
                   "bound": round(clopper_pearson_upper(e, m, d), 4), "target_risk": target_risk, "delta": delta}  # fmt: skip


def risk_coverage(kappa: Sequence[float], correct: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, risk) when accepting the m most confident cases, m = 1..n."""
    kappa, correct = np.asarray(kappa, float), np.asarray(correct, bool)
    order = np.argsort(-kappa, kind="stable")
    m = np.arange(1, len(kappa) + 1)
    return m / len(kappa), np.cumsum(~correct[order]) / m


def max_coverage_at_accuracy(kappa: Sequence[float], correct: Sequence[bool], target_accuracy: float) -> tuple[float, float]:
    """Highest coverage whose accepted cases (most confident first) reach ``target_accuracy``, and that accuracy."""
    cov, risk = risk_coverage(kappa, correct)
    ok = np.flatnonzero(1 - risk >= target_accuracy)
    if not len(ok):
        return 0.0, float("nan")
    i = ok[-1]
    return float(cov[i]), float(1 - risk[i])
