"""Cross-fitted second-expert outputs: folds keep a lesion's images together, bundles round-trip, a cross-fitted
output wins over an in-sample one (training.encoder)."""

import numpy as np
import pytest

from training.encoder import CROSSFIT_TABLES, bundle_crossfit, crossfit_outputs, crossfit_split, expert_outputs, fold_of, head_outputs_npz


def _recs(source, n, per_group=1):
    return [{"source": source, "image": f"{source}/{i}.jpg", "group": f"g{i // per_group}"} for i in range(n)]


def test_folds_partition_each_table_and_keep_groups_together():
    sets = {"train_ham": _recs("ham10000", 60, per_group=3), "train_derm7pt": _recs("derm7pt", 30), "train_dermnet": _recs("dermnet", 40),
            "val_isic2018": _recs("isic2018_val", 10)}  # fmt: skip
    held_all = {n: [] for n in CROSSFIT_TABLES}
    for k in range(3):
        kept, held = crossfit_split(sets, 3, k)
        assert "val_isic2018" not in kept  # selection sets are never split
        for n in CROSSFIT_TABLES:
            assert sorted(kept[n] + held[n]) == list(range(len(sets[n]))) and not set(kept[n]) & set(held[n])
            held_all[n] += held[n]
        groups_held = {sets["train_ham"][i]["group"] for i in held["train_ham"]}
        assert not groups_held & {sets["train_ham"][i]["group"] for i in kept["train_ham"]}  # a lesion is in one fold only
    assert all(sorted(v) == list(range(len(sets[n]))) for n, v in held_all.items())  # each image held out exactly once
    assert fold_of(sets["train_ham"][0], 3) == fold_of(sets["train_ham"][1], 3)
    assert {fold_of(r, 3, seed=0) for r in sets["train_dermnet"]} == {0, 1, 2}


def test_bundle_round_trip_and_crossfit_wins_over_in_sample(tmp_path):
    recs = _recs("derm7pt", 4)
    probs = {"ham": np.eye(7)[[0, 1, 2, 3]], "modality": np.eye(4)[[1, 1, 1, 1]]}
    head_outputs_npz(tmp_path / "cf" / "derm7pt__effnet.npz", recs[:2], {k: v[:2] for k, v in probs.items()}, {"fold": np.array([0, 1])})
    bundle = bundle_crossfit(tmp_path / "cf", tmp_path / "cf.npz", {"fold_models": {"fold0": {"best_epoch": 3}}})
    got = crossfit_outputs(bundle, "derm7pt")
    assert list(got["ids"]) == ["derm7pt/0.jpg", "derm7pt/1.jpg"] and np.allclose(got["probs_ham"], probs["ham"][:2])
    assert crossfit_outputs(bundle, "ham10000") is None and crossfit_outputs(tmp_path / "cf", "ham10000") is None
    # The shipped expert's cached outputs on all four images: in-sample on the first two, which the cross-fitted ones replace.
    shipped = {"ham": np.eye(7)[[6, 6, 6, 6]]}
    head_outputs_npz(tmp_path / "features" / "derm7pt__effnet.npz", recs, shipped)
    out = expert_outputs("derm7pt", tmp_path / "features", bundle)
    assert {k: (int(v[0]["ham"].argmax()), v[1]) for k, v in out.items()} == {
        "derm7pt/0.jpg": (0, True), "derm7pt/1.jpg": (1, True), "derm7pt/2.jpg": (6, False), "derm7pt/3.jpg": (6, False)}


def test_reasoner_rows_get_the_second_opinion_the_agent_would_see_and_never_an_in_sample_one(tmp_path):
    """training.reasoner_data.attach_expert_probs: cross-fitted outputs for the expert's training images, the shipped
    expert's cached ones for unseen images, nothing for a training image the cross-fitting missed."""
    from models.efficientnet import expert_info
    from models.resolve import resolve
    from training.reasoner_data import CaseRow, attach_expert_probs

    heads = expert_info(resolve("efficientnet-lite0-derm", progress=False))["heads"]
    rows = [CaseRow(f"derm7pt:{i}", "derm7pt", split, f"derm7pt/{i}.jpg", "nv", np.zeros(7), np.zeros(4)) for i, split in enumerate(["train", "extra", "val", "train"])]
    recs = [{"source": "derm7pt", "image": r.image} for r in rows]
    head_outputs_npz(tmp_path / "cf" / "derm7pt__effnet.npz", recs[:2], {"ham": np.eye(7)[[0, 1]], "dermnet": np.full((2, len(heads["dermnet"])), 1 / len(heads["dermnet"]))})
    head_outputs_npz(tmp_path / "features" / "derm7pt__effnet.npz", recs, {"ham": np.eye(7)[[6, 6, 5, 6]]})
    counts = attach_expert_probs(rows, tmp_path / "features", tmp_path / "cf")
    assert counts == {"crossfit": 2, "shipped": 1, "none": 1}
    top = [heads["ham"][int(np.argmax(r.expert_heads["ham"]))] if r.expert_heads else None for r in rows]
    assert top == [heads["ham"][0], heads["ham"][1], heads["ham"][5], None]  # row 3: a training image without a cross-fitted output
    assert "dermnet" in rows[0].expert_heads and "dermnet" not in rows[2].expert_heads


def test_member_outputs_are_averaged_where_the_agents_members_if_would_run_them():
    """A fold's member outputs (``__member``) join the fold model's as the agent's ensemble does: every head (and its
    view mean) averaged for the images ``members_if`` picks, judged on the fold model's own output; member keys dropped."""
    from training.encoder import MODALITIES, member_mean

    derm = np.eye(4)[MODALITIES.index("dermoscopy")] * 0.9 + 0.025
    clin = np.eye(4)[MODALITIES.index("clinical")] * 0.9 + 0.025
    probs = {"ham": np.array([0.8, 0.2]), "ham__member": np.array([0.4, 0.6]), "ham__views": np.array([0.7, 0.3]), "ham__views__member": np.array([0.5, 0.5]),
             "modality": derm, "modality__member": derm}  # fmt: skip
    both = member_mean(probs, "modality=dermoscopy")
    assert set(both) == {"ham", "ham__views", "modality"}
    assert np.allclose(both["ham"], [0.6, 0.4]) and np.allclose(both["ham__views"], [0.6, 0.4])
    assert np.allclose(member_mean({**probs, "modality": clin}, "modality=dermoscopy")["ham"], [0.8, 0.2])  # the member does not run on clinical photos
    assert np.allclose(member_mean(probs)["ham"], [0.6, 0.4])  # no condition: every image
    own = {"ham": np.array([0.8, 0.2])}
    assert member_mean(own, "modality=dermoscopy") == own  # no member outputs: the fold model's alone
    with pytest.raises(ValueError, match="members_if 'modality=photo'"):
        member_mean(probs, "modality=photo")


def test_cross_fitted_outputs_take_the_agents_view_means_and_keep_only_the_experts_own_heads():
    """training.encoder.agent_outputs: the ensemble mean, then the view mean for the agent's view heads where its
    views_if holds; no ``__views`` key survives (the replayed expert knows only its own heads)."""
    from training.encoder import MODALITIES, agent_outputs

    derm = np.eye(4)[MODALITIES.index("dermoscopy")] * 0.9 + 0.025
    clin = np.eye(4)[MODALITIES.index("clinical")] * 0.9 + 0.025
    probs = {"ham": np.array([0.8, 0.2]), "ham__member": np.array([0.4, 0.6]), "ham__views": np.array([0.7, 0.3]), "ham__views__member": np.array([0.5, 0.5]),
             "dermnet": np.array([0.9, 0.1]), "dermnet__views": np.array([0.3, 0.7]), "modality": clin, "modality__views": clin}  # fmt: skip
    out, missing = agent_outputs(probs, "modality=clinical", ["dermnet"], "modality=clinical")
    assert set(out) == {"ham", "dermnet", "modality"} and not missing
    assert np.allclose(out["dermnet"], [0.3, 0.7]) and np.allclose(out["ham"], [0.6, 0.4])  # view mean; ensemble mean of the single views
    out, _ = agent_outputs({**probs, "modality": derm}, None, ["dermnet"], "modality=clinical")
    assert np.allclose(out["dermnet"], [0.9, 0.1])  # views_if fails: the single view, as the agent gives it
    out, missing = agent_outputs(probs, None, ["ham", "crit_streaks"])
    assert np.allclose(out["ham"], [0.6, 0.4]) and missing  # no condition: every image; a view head without view means is reported
    with pytest.raises(ValueError, match="views_if 'modality=photo'"):
        agent_outputs(probs, None, ["dermnet"], "modality=photo")


def test_replayed_rows_from_a_bundle_with_views_and_members_carry_only_the_experts_heads(tmp_path):
    """A cross-fitted bundle made with crossfit_views and a member (``__views``, ``__member`` keys) must reach the
    replayed expert as the agent's outputs: its own heads only (the replay backend refuses others)."""
    from models.efficientnet import expert_info
    from models.resolve import resolve
    from training.encoder import MODALITIES
    from training.reasoner_data import CaseRow, attach_expert_probs

    heads = expert_info(resolve("efficientnet-lite0-derm", progress=False))["heads"]
    rows = [CaseRow(f"derm7pt:{i}", "derm7pt", "train", f"derm7pt/{i}.jpg", "nv", np.zeros(7), np.zeros(4)) for i in range(2)]
    recs = [{"source": "derm7pt", "image": r.image} for r in rows]
    derm = np.tile(np.eye(4)[MODALITIES.index("dermoscopy")], (2, 1))
    outs = {"ham": np.eye(7)[[0, 1]], "ham__views": np.eye(7)[[2, 2]], "ham__member": np.eye(7)[[0, 3]], "ham__views__member": np.eye(7)[[2, 2]],
            "modality": derm, "modality__views": derm, "modality__member": derm}  # fmt: skip
    head_outputs_npz(tmp_path / "cf" / "derm7pt__effnet.npz", recs, outs)

    class Ref:  # encoder.second_expert as the default agent configures it
        options = {"views": ["hflip"], "view_heads": ["dermnet"], "views_if": "modality=clinical", "members": ["m"], "members_if": "modality=dermoscopy"}

    assert attach_expert_probs(rows, None, tmp_path / "cf", Ref()) == {"crossfit": 2, "shipped": 0, "none": 0}
    assert all(set(r.expert_heads) <= set(heads) for r in rows)
    assert np.allclose(rows[1].expert_heads["ham"], (np.eye(7)[1] + np.eye(7)[3]) / 2)  # the ensemble mean, single view (ham is no view head)
    Ref.options = {**Ref.options, "view_heads": ["ham"], "views_if": None}
    attach_expert_probs(rows, None, tmp_path / "cf", Ref())
    assert np.allclose(rows[0].expert_heads["ham"], np.eye(7)[2])  # the agent averages ham over views: the bundle's view mean


@pytest.mark.data
def test_findings_of_heads_on_the_experts_features_are_cross_fitted_on_its_cross_fitted_features(shared_data, tmp_path):
    """Concept heads on the second expert's features: Derm7pt train/extra findings come from heads refitted without
    each case, on the fold models' features (the expert trained on those images); without them, a clear refusal."""
    from agent.testing import constant_heads
    from models.vocabulary import SEVEN_POINT
    from training.data import source_table
    from training.fusion_data import crossfit_derm7pt_findings

    table = [r for r in source_table("derm7pt") if r["split"] in ("train", "extra")]
    heads = constant_heads({c: (vals, "absent") for c, vals in SEVEN_POINT.items()}, 16)
    heads.meta.update({"features": "second-expert", "metrics": {"C": {c: 0.01 for c in SEVEN_POINT}}})
    heads.save(tmp_path / "heads.safetensors")
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(len(table), 16))
    feats[:, 0] += np.array([r["blue_whitish_veil"] == "present" for r in table]) * 3.0  # one learnable criterion
    probs = {"ham": np.full((len(table), 7), 1 / 7), "features": feats}
    head_outputs_npz(tmp_path / "cf" / "derm7pt__effnet.npz", table, probs, {"fold": np.zeros(len(table), int)})
    found = crossfit_derm7pt_findings(tmp_path, heads=str(tmp_path / "heads.safetensors"), expert_crossfit=tmp_path / "cf")
    assert sorted(found) == sorted(f"derm7pt:{r['case_index']}" for r in table)
    veil = np.array([found[f"derm7pt:{r['case_index']}"]["blue_whitish_veil"]["present"] for r in table])
    present = np.array([r["blue_whitish_veil"] == "present" for r in table])
    assert veil[present].mean() > veil[~present].mean() + 0.3  # refitted on the features, not the constant heads' answer
    with pytest.raises(ValueError, match="crossfit_features: \\[derm7pt\\]"):
        crossfit_derm7pt_findings(tmp_path, heads=str(tmp_path / "heads.safetensors"))
    head_outputs_npz(tmp_path / "old" / "derm7pt__effnet.npz", table, {"ham": probs["ham"]}, {"fold": np.zeros(len(table), int)})
    with pytest.raises(ValueError, match="in-sample on Derm7pt train/extra"):
        crossfit_derm7pt_findings(tmp_path, heads=str(tmp_path / "heads.safetensors"), expert_crossfit=tmp_path / "old")
