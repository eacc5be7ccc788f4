"""Smoke runs of the head trainers (modality, concept heads, consistency verifier) on the tiny feature
cache, their config validation, determinism of their data building, and the CLI entry point."""

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from training.cli import run_training, trainer_module
from training.config import load_train_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "train"
NODES = ("modality", "concepts", "verifier")


def _overrides(tiny_features, out_dir):
    return [f"feature_dir={tiny_features}", f"out_dir={out_dir}"]


@pytest.mark.slow
@pytest.mark.weights
@pytest.mark.parametrize("node", NODES)
def test_smoke_run_writes_head_log_summary_registry_and_before_after(node, tiny_features, tmp_path):
    summary = run_training(node, CONFIGS / f"{node}_smoke.yaml", _overrides(tiny_features, tmp_path))

    assert json.loads((tmp_path / "summary.json").read_text())["trainer"] == node
    assert (tmp_path / "config.yaml").exists()
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("train_loss" in r for r in log) and log[-1]["event"] == "final"
    weights = Path(summary["weights"])
    assert weights.exists() and weights.stat().st_size < 10 * 2**20
    # The before/after table compares on the same val data and is printed and kept in the summary.
    assert summary["before_after"]["table"].count("|") > 10

    from models.registry import load_registry

    reg = load_registry([Path(summary["registry"])])
    spec = reg[summary["config"]["register_as"]]
    assert spec.source.startswith("path:") and Path(spec.source[5:]) == weights.resolve()

    if node == "concepts":
        from models.heads import HeadSet

        hs = HeadSet.load(weights)
        assert len(hs.heads) == 7 and summary["before_after"]["shipped"] is not None
    elif node == "modality":
        from models.heads import HeadSet

        hs = HeadSet.load(weights)
        assert hs.heads["modality"].classes == ["clinical", "dermoscopy", "histopathology", "not_skin"] and hs.ood is not None
        assert summary["before_after"]["shipped_heldout"] is not None  # read from the shipped head's metadata
    else:
        from models.verifier import ConsistencyModel

        m = ConsistencyModel.load(weights)
        assert 0 <= m.threshold <= 1
        assert set(summary["before_after"]["rule"]) >= {"all", "swapped_only", "perturbed_only"}


@pytest.mark.slow
@pytest.mark.weights
def test_data_building_is_deterministic_given_the_seed(tiny_features):
    from training import modality, verifier

    cfg = load_train_config(modality.Config, CONFIGS / "modality_smoke.yaml", [f"feature_dir={tiny_features}"])
    a, b = modality.build_dataset(cfg), modality.build_dataset(cfg)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))

    vcfg = load_train_config(verifier.Config, CONFIGS / "verifier_smoke.yaml", [f"feature_dir={tiny_features}"])
    rows, f = verifier._derm7pt(vcfg)
    cs = {c: 0.01 for c in verifier.SEVEN_POINT}
    f1 = verifier.crossfit_findings(f["features"], rows, cs, 2, seed=0)
    f2 = verifier.crossfit_findings(f["features"], rows, cs, 2, seed=0)
    assert f1 == f2

    def pairs(seed):
        truth = [r["ham"] for r in rows]
        return [(p[1], p[2], p[3]) for p in verifier.make_pairs(f1, truth, sorted(set(truth)), np.random.default_rng(seed), negatives=1)]

    assert pairs(0) == pairs(0)
    assert pairs(0) != pairs(1)  # the seed does drive the sampled negatives


@pytest.mark.parametrize("node", NODES)
def test_unknown_config_key_is_a_validation_error(node):
    with pytest.raises(ValidationError):
        load_train_config(trainer_module(node).Config, CONFIGS / f"{node}_smoke.yaml", ["no_such_option=1"])
    for path in (CONFIGS / f"{node}.yaml", CONFIGS / f"{node}_smoke.yaml"):
        load_train_config(trainer_module(node).Config, path)  # the shipped configs validate


@pytest.mark.slow
@pytest.mark.weights
def test_cli_train_verifier_with_overrides(tiny_features, tmp_path):
    from dermgraph.cli import app

    res = CliRunner().invoke(app, ["train", "verifier", "--config", str(CONFIGS / "verifier_smoke.yaml"),
                                   "--set", f"feature_dir={tiny_features}", "--set", f"out_dir={tmp_path}", "--set", "c_grid=[0.3]"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "summary.json").read_text())["config"]["c_grid"] == [0.3]
    assert "AUROC" in res.output


@pytest.mark.slow
@pytest.mark.weights
def test_concepts_from_a_user_csv_extracts_features_on_the_fly(shared_data, tmp_path):
    import csv

    from models.vocabulary import SEVEN_POINT
    from training.data import source_table

    rows = [r for r in source_table("derm7pt") if r["split"] in ("train", "val")][:10]
    with open(tmp_path / "mine.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["image", "split", *SEVEN_POINT])
        w.writeheader()
        for i, r in enumerate(rows):
            w.writerow({"image": f"derm7pt/{r['image']}", "split": "val" if i % 3 == 0 else "train", **{c: r[c] for c in SEVEN_POINT}})
    out = tmp_path / "run"
    summary = run_training("concepts", CONFIGS / "concepts_smoke.yaml", [f"data={tmp_path / 'mine.csv'}", f"image_root={shared_data}", f"feature_dir={tmp_path}", f"out_dir={out}"])
    assert list(tmp_path.glob("user_*__full.npz")) and summary["metrics"]["n_train"] == 6 and summary["metrics"]["n_val"] == 4


@pytest.mark.slow
@pytest.mark.weights
def test_concepts_on_the_second_experts_features_say_so_and_compare_with_the_shipped_heads_on_theirs(tiny_features, tmp_path):
    """features: second-expert reads <source>__effnet.npz; the artifact records it (the agent then feeds it the
    expert's features), and the before/after still scores the shipped heads on the lesion encoder's features."""
    from models.heads import HeadSet

    z = np.load(tiny_features / "derm7pt__full.npz")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "derm7pt__effnet.npz", ids=z["ids"], probs=z["probs"], features=rng.normal(size=(len(z["ids"]), 16)).astype(np.float16))
    summary = run_training("concepts", CONFIGS / "concepts_smoke.yaml", [*_overrides(tiny_features, tmp_path / "run"), "features=second-expert",
                                                                         f"expert_feature_dir={tmp_path}"])  # fmt: skip
    hs = HeadSet.load(summary["weights"])
    assert hs.feature_kind == "second-expert" and hs.mean.shape == (16,) and "second visual expert" in hs.inputs
    assert summary["before_after"]["shipped"] is not None  # the shipped heads, on the 2048-d lesion features of the same val rows
    with pytest.raises(ValueError, match="with `data`, use features: lesion-encoder"):
        run_training("concepts", CONFIGS / "concepts_smoke.yaml", [*_overrides(tiny_features, tmp_path / "run2"), "features=second-expert",
                                                                   f"data={tmp_path / 'mine.csv'}"])  # fmt: skip


def test_round_robin_takes_groups_in_turn_and_stops_when_they_run_out():
    from training.data import round_robin

    groups = {"b": [1, 2, 3], "a": [10], "c": [20, 21]}
    assert round_robin(groups, 4) == [10, 1, 20, 2]
    assert round_robin(groups, 100) == [10, 1, 20, 2, 21, 3]


@pytest.mark.slow
@pytest.mark.weights
def test_the_modality_probe_smoke_run_reads_imagenet_features_and_loads_as_the_agents_probe(tiny_features, tmp_path):
    """`inputs: imagenet-stages` on the tiny cache: ImageNet features computed once from the images and cached by ref, the
    held-out folds run, and the artifact is a FeatureProbe whose predictions equal the head applied to those features."""
    from models.probe import IMAGENET_STAGE_FEATURES, FeatureProbe, imagenet_inputs
    from training import modality

    overrides = [*_overrides(tiny_features, tmp_path), "inputs=imagenet-stages", "artifact_id=modality-probe-smoke", "register_as=modality-probe-smoke"]
    summary = run_training("modality", CONFIGS / "modality_smoke.yaml", overrides)
    weights = Path(summary["weights"])
    assert weights.name == "modality_probe.safetensors" and 0 < summary["metrics"]["heldout_accuracy"] <= 1
    cache = np.load(tiny_features / "imagenet_stages__modality.npz")
    cfg = load_train_config(modality.Config, CONFIGS / "modality_smoke.yaml", overrides)
    _, _, _, _, refs = modality.build_dataset(cfg)
    assert set(cache["ids"].tolist()) == set(refs.tolist())  # every image once, keyed by ref
    probe = FeatureProbe(weights)
    assert probe.kind == IMAGENET_STAGE_FEATURES and probe.classes == ["clinical", "dermoscopy", "histopathology", "not_skin"]
    ref = str(refs[0])
    got = probe.predict([modality.load_image(ref)])
    want = probe.heads.predict_proba(imagenet_inputs(cache["features"][cache["ids"].tolist().index(ref)], stages=True))["modality"]
    np.testing.assert_allclose(got, want, atol=1e-4)
