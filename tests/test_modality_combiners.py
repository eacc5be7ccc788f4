"""``scripts/modality_combiners.py``: combinations of the two modality heads chosen on the other folds only."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

spec = importlib.util.spec_from_file_location("modality_combiners", Path(__file__).resolve().parent.parent / "scripts" / "modality_combiners.py")
mc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mc)


def _onehot(idx, n=4, p=0.7):
    out = np.full((len(idx), n), (1 - p) / (n - 1))
    out[np.arange(len(idx)), idx] = p
    return out


def test_each_folds_weight_is_chosen_on_the_other_folds():
    y = np.array([0, 1, 2, 3] * 6)
    fold = np.repeat([0, 1, 2], 8)
    wrong = (y + 1) % 4
    # The head is right on folds 0 and 1, the expert on fold 2 only.
    head = _onehot(np.where(fold < 2, y, wrong))
    expert = _onehot(np.where(fold == 2, y, wrong), p=0.6)
    headline = np.ones(len(y), bool)
    p, chosen = mc.nested_weight(head, expert, y, fold, headline, mc.arithmetic)
    assert chosen[2] <= 0.5  # chosen on folds 0-1, where the head is right: fold 2 follows the head and gets it wrong
    assert mc.accuracy(p, y, fold == 2) == 0.0 and mc.accuracy(p, y, fold < 2) == 1.0
    lr = mc.nested_logistic(head, expert, y, fold, headline)
    assert np.allclose(lr.sum(1), 1)


def test_run_reads_the_trainers_predictions_and_refuses_a_file_without_folds(tmp_path):
    y = np.array(["clinical", "dermoscopy", "histopathology", "not_skin"] * 6)
    idx = np.array([0, 1, 2, 3] * 6)
    fold = np.repeat([0, 1, 2], 8)
    np.savez(tmp_path / "p.npz", y=y, tags=np.array(["a", "b"] * 12), head=_onehot(idx), expert=_onehot(idx), fold=fold, headline=np.ones(24, bool))
    res = mc.run(tmp_path / "p.npz")
    assert res["mean, weight 0.5 (the agent)"]["all"] == 1.0 and set(res["mean, weight 0.5 (the agent)"]) == {"all", "a", "b"}
    np.savez(tmp_path / "old.npz", y=y, tags=y, head=_onehot(idx), expert=_onehot(idx))
    with pytest.raises(SystemExit, match="no fold ids"):
        mc.run(tmp_path / "old.npz")
