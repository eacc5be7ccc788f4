"""``scripts/clinical_views.py`` (combinations of experts, sizes and test-time views of the DermNet head, their cost
and the halves they are selected and reported on) and ``scripts/dermnet_probe_curve.py`` (probe accuracy per number
of training photos per class)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

spec = importlib.util.spec_from_file_location("clinical_views", Path(__file__).resolve().parent.parent / "scripts" / "clinical_views.py")
cv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cv)


def test_cost_counts_the_primary_pass_once_and_scales_with_area():
    assert cv.cost(["S"], 224, ("orig", "hflip", "vflip", "rot90"), "S") == 4.0  # the agent's default: photo + 3 views
    assert cv.cost(["S"], 224, ("orig",), "S") == 1.0
    assert cv.cost(["C"], 224, ("orig",), "S") == 2.0  # another network: the primary's modality pass is paid too
    assert cv.cost(["S", "C"], 224, ("orig", "hflip"), "S") == 4.0
    assert cv.cost(["S"], 448, ("orig",), "S") == 5.0  # 4 passes' area, plus the primary's own 224-px pass


def test_combinations_average_passes_and_select_on_the_fit_half():
    y = np.array([0, 1, 0, 1])
    fit = np.array([True, True, False, False])
    right = np.eye(2)[y] * 0.8 + 0.1
    wrong = right[:, ::-1]
    passes = {("S", 224, v): right for v in cv.VIEW_SETS["photo+3 views"]}
    passes.update({("C", 224, v): (wrong if v == "orig" else right) for v in cv.VIEW_SETS["photo+3 views"]})
    rows = cv.combinations(passes, y, fit, "S")
    assert len(rows) == 3 * len(cv.VIEW_SETS)  # S, C, S+C at one size
    c_photo = next(r for r in rows if r["experts"] == ["C"] and r["views"] == "photo")
    assert c_photo["fit_top1"] == 0.0 and c_photo["eval_top1"] == 0.0
    c_all = next(r for r in rows if r["experts"] == ["C"] and r["views"] == "photo+3 views")
    assert c_all["fit_top1"] == 1.0  # three right views outvote the wrong photo
    assert rows[0]["fit_top1"] + rows[0]["fit_top5"] == 2.0 and rows[-1]["experts"] == ["C"]
    from training.encoder import topk  # what the script scores with

    assert topk(y, right, 1) == 1.0 and topk(y, wrong, 2) == 1.0
    with pytest.raises(KeyError):
        cv.combinations({("S", 224, "orig"): right}, y, fit, "S")  # every view of every size is needed


def test_probe_curve_draws_n_per_class_from_the_training_photos_only():
    spec = importlib.util.spec_from_file_location("dermnet_probe_curve", Path(__file__).resolve().parent.parent / "scripts" / "dermnet_probe_curve.py")
    pc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pc)
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 10)
    held = np.zeros(30, bool)
    held[::5] = True
    pick = pc.draw(y, np.flatnonzero(~held), 4, rng)
    assert len(pick) == 12 and not held[pick].any() and (np.bincount(y[pick]) == 4).all()
    assert (np.bincount(y[pc.draw(y, np.flatnonzero(~held), 50, rng)]) == 8).all()  # a class with fewer: all of it
    x = np.eye(3)[y] + 0.01 * rng.standard_normal((30, 3))
    res = pc.curve(x, y, held, [2, 8], repeats=2)
    assert [r["per_class"] for r in res] == [2, 8] and res[-1]["top1"] == 1.0 and res[-1]["top5"] == 1.0
