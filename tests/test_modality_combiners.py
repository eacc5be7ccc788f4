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
    key = "head and expert, mean, weight 0.5 (the previous default)"
    assert res[key]["all"] == 1.0 and set(res[key]) == {"all", "a", "b"}
    assert not any(k.startswith("the agent") for k in res)  # no probe in these predictions
    np.savez(tmp_path / "old.npz", y=y, tags=y, head=_onehot(idx), expert=_onehot(idx))
    with pytest.raises(SystemExit, match="no fold ids"):
        mc.run(tmp_path / "old.npz")


def test_with_the_probe_the_agents_combination_and_nested_shares_are_scored():
    y = np.array([0, 1, 2, 3] * 6)
    fold = np.repeat([0, 1, 2], 8)
    wrong = (y + 1) % 4
    head, expert = _onehot(wrong), _onehot(wrong, p=0.6)
    probe = _onehot(y, p=0.9)  # only the probe is right: every fold's shares give it the most weight
    p, chosen = mc.nested_shares(head, expert, probe, y, fold, np.ones(len(y), bool))
    assert mc.accuracy(p, y, fold >= 0) == 1.0 and all(s[0] > s[1] and s[0] > 1 / 3 for s in chosen.values()), chosen


def test_run_adds_the_agents_combination_when_the_predictions_have_the_probe(tmp_path):
    y = np.array(["clinical", "dermoscopy", "histopathology", "not_skin"] * 6)
    idx = np.array([0, 1, 2, 3] * 6)
    np.savez(tmp_path / "p.npz", y=y, tags=y, head=_onehot(idx), expert=_onehot((idx + 1) % 4), probe=_onehot(idx), fold=np.repeat([0, 1, 2], 8),
             headline=np.ones(24, bool))
    res = mc.run(tmp_path / "p.npz")
    agent = [k for k in res if k.startswith("the agent")]
    assert agent == ["the agent: geometric mean, probe 0.33, expert 0.33"] and res[agent[0]]["all"] == 1.0
    assert res["head, probe and expert, geometric mean, shares nested"]["all"] == 1.0
