"""Split-conformal sets and SGR risk control (models.conformal)."""

import math

import numpy as np
import pytest

from models.conformal import (
    clopper_pearson_upper,
    conformal_quantile,
    max_coverage_at_accuracy,
    prediction_set,
    sgr_threshold,
    true_label_scores,
)


def _synthetic(n, k=5, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)) * 2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in p])  # labels drawn from the model: calibrated by construction
    return p, y


@pytest.mark.parametrize("score", ["lac", "aps"])
@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_coverage_holds_on_exchangeable_data(score, alpha):
    p, y = _synthetic(6000)
    cal, test = slice(0, 3000), slice(3000, None)
    q = conformal_quantile(true_label_scores(p[cal], y[cal], score), alpha)
    labels = [str(i) for i in range(p.shape[1])]
    covered = [str(t) in prediction_set(dict(zip(labels, row)), q, score) for row, t in zip(p[test], y[test])]
    if score == "lac":
        assert abs(np.mean(covered) - (1 - alpha)) < 0.03
    else:  # non-randomised APS is conservative: at least 1 - alpha, with some slack above
        assert 1 - alpha - 0.02 < np.mean(covered) < 1 - alpha + 0.08


def test_quantile_is_the_finite_sample_rank():
    s = np.arange(1, 10) / 10.0  # 0.1 .. 0.9, n = 9
    assert conformal_quantile(s, 0.2) == pytest.approx(0.8)  # ceil(10 * 0.8) = 8th smallest
    assert math.isinf(conformal_quantile(s[:3], 0.1))  # too few points for 90%


def test_set_is_never_empty_and_ordered():
    probs = {"a": 0.5, "b": 0.3, "c": 0.2}
    assert prediction_set(probs, 0.0) == ["a"]  # lac would keep nothing; the top label stays
    assert prediction_set(probs, 0.75) == ["a", "b"]
    assert prediction_set(probs, 0.8) == ["a", "b", "c"]
    assert prediction_set(probs, 0.8, "aps") == ["a", "b"]
    assert prediction_set(probs, math.inf) == ["a", "b", "c"]


def test_truth_outside_candidates_scores_infinite():
    s = true_label_scores(np.array([[0.6, 0.4]]), np.array([-1]))
    assert math.isinf(s[0])


def test_clopper_pearson_bounds_the_rate():
    assert clopper_pearson_upper(0, 100, 0.05) == pytest.approx(1 - 0.05 ** (1 / 100), rel=1e-6)
    assert clopper_pearson_upper(10, 100, 0.05) > 0.10
    assert clopper_pearson_upper(5, 5, 0.05) == 1.0


def test_sgr_meets_the_target_on_fresh_data():
    rng = np.random.default_rng(1)
    kappa = rng.uniform(size=4000)
    correct = rng.uniform(size=4000) < kappa  # P(correct | κ) = κ
    theta, info = sgr_threshold(kappa[:2000], correct[:2000], target_risk=0.15, delta=0.1)
    assert info["bound"] <= 0.15 and info["empirical_risk"] < 0.15
    accepted = kappa[2000:] >= theta
    assert 1 - correct[2000:][accepted].mean() <= 0.15 + 0.02
    assert 0.1 < accepted.mean() < 0.5


def test_sgr_abstains_when_the_target_is_unreachable():
    theta, info = sgr_threshold(np.linspace(0, 1, 50), np.zeros(50, bool), target_risk=0.1)
    assert math.isinf(theta) and info["coverage"] == 0.0


def test_max_coverage_at_accuracy():
    cov, acc = max_coverage_at_accuracy([0.9, 0.8, 0.7, 0.6], [True, True, False, False], 0.6)
    assert cov == 0.75 and acc == pytest.approx(2 / 3)
