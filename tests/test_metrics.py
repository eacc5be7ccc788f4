import numpy as np
import pytest

from evals.metrics import (
    accuracy, accuracy_at_coverage, balanced_accuracy, bootstrap_ci, diagnosis_metrics, expected_calibration_error,
    macro_f1, risk_coverage, sensitivity_specificity,
)


def test_basic_metrics():
    y = ["mel", "mel", "nv", "nv", "nv", "bcc"]
    p = ["mel", "nv", "nv", "nv", "mel", "bcc"]
    assert accuracy(y, p) == pytest.approx(4 / 6)
    assert balanced_accuracy(y, p) == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    sens, spec = sensitivity_specificity(y, p, "mel")
    assert sens == 0.5 and spec == 0.75
    # macro-F1 by hand: mel 0.5, nv 2/3, bcc 1
    assert macro_f1(y, p) == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert diagnosis_metrics(y, p)["mel_sensitivity"] == 0.5


def test_ece_perfect_and_overconfident():
    assert expected_calibration_error([1.0, 1.0], [True, True]) == 0
    assert expected_calibration_error([0.9] * 10, [True] * 5 + [False] * 5) == pytest.approx(0.4)


def test_risk_coverage_orders_by_score():
    cov, risk, aurc = risk_coverage([0.9, 0.8, 0.1], [True, True, False])
    assert list(cov) == pytest.approx([1 / 3, 2 / 3, 1])
    assert list(risk) == pytest.approx([0, 0, 1 / 3])
    assert aurc == pytest.approx(1 / 9)
    assert accuracy_at_coverage([0.9, 0.8, 0.1], [True, True, False], 2 / 3) == 1.0


def test_bootstrap_ci_contains_point_estimate():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200).astype(str)
    p = np.where(rng.random(200) < 0.8, y, "x")
    lo, hi = bootstrap_ci(accuracy, y, p, n=300)
    assert lo < accuracy(y, p) < hi and hi - lo < 0.2


def test_mcnemar_counts_only_discordant_pairs_and_paired_difference_is_signed_b_minus_a():
    from evals.metrics import accuracy, mcnemar_exact, paired_difference

    a = [True] * 10 + [False] * 10
    b = [True] * 10 + [True] * 9 + [False]
    got = mcnemar_exact(a, b)
    assert got["only_a_right"] == 0 and got["only_b_right"] == 9 and got["p"] < 0.01
    assert mcnemar_exact(a, a) == {"only_a_right": 0, "only_b_right": 0, "p": 1.0}
    y = ["mel"] * 20
    d = paired_difference(accuracy, y, ["mel" if k else "nv" for k in a], ["mel" if k else "nv" for k in b], n=200)
    assert d["difference"] == 0.45 and 0 < d["ci95"][0] <= 0.45 <= d["ci95"][1]
