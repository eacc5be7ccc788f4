"""training.modality_heldout: each fold's expert never trains on, nor selects with, the sources the fold holds out."""

import numpy as np
import pytest

from training import encoder
from training.modality_heldout import fold_tables, held_kinds


def _rec(source, image, **extra):
    return {"source": source, "image": image, **extra}


def _sets():
    classes = [f"d{i}" for i in range(6)]
    return {
        "train_ham": [_rec("ham10000", f"h{i}") for i in range(4)],
        "train_derm7pt": [_rec("derm7pt", f"s{i}") for i in range(3)],
        "val_derm7pt": [_rec("derm7pt", "v0")],
        "val_isic2018": [_rec("isic2018_val", "i0")],
        "train_dermnet": [_rec("dermnet", f"n{i}", label=classes[i]) for i in range(6)],
        "val_dermnet": [_rec("dermnet", f"m{i}", label=classes[i]) for i in range(6)],
        "train_histology": [_rec("histology", f"t{i}", slide=f"slide{i}") for i in (0, 1, 3, 4)],
        "val_histology": [_rec("histology", f"t{i}", slide=f"slide{i}") for i in (2, 5)],
    }, classes


def test_fold_tables_drop_the_held_sources_from_training_and_selection():
    sets, classes = _sets()
    held = {"dermoscopy:derm7pt", "clinical:1", "histology:0"}
    out = fold_tables(sets, classes, held, 3)
    assert out["train_derm7pt"] == [] and out["val_derm7pt"] == []  # the whole dataset, selection included
    assert len(out["train_ham"]) == 4 and len(out["val_isic2018"]) == 1
    assert [r["label"] for r in out["train_dermnet"]] == ["d0", "d2", "d3", "d5"]  # classes 1 and 4 (1 mod 3) held out
    assert [r["label"] for r in out["val_dermnet"]] == ["d0", "d2", "d3", "d5"]
    # Histology: validation slides join training (selection never reads them), slides 0 and 3 (0 mod 3) held out.
    assert "val_histology" not in out and sorted(r["slide"] for r in out["train_histology"]) == ["slide1", "slide2", "slide4", "slide5"]
    assert sum(map(len, sets.values())) == 4 + 3 + 1 + 1 + 6 + 6 + 4 + 2  # the caller's tables are not changed


def test_held_kinds_are_the_folds_synthetic_groups():
    groups = np.array(["synthetic:noise", "synthetic:chart", "dermoscopy:ham10000", "synthetic:solid"])
    assert held_kinds(groups, np.array([True, False, True, True])) == ["noise", "solid"]


def test_encoder_trains_only_the_named_not_skin_kinds():
    recs = encoder._synthetic_records(2, 0)
    assert {r["image"].split(":")[0] for r in encoder._kinds(recs, ["chart", "noise"])} == {"chart", "noise"}
    assert encoder._kinds(recs, None) is recs
    with pytest.raises(ValueError, match="unknown not_skin_kinds.*valid: solid"):
        encoder._kinds(recs, ["photos"])


def test_shipped_config_validates_and_unknown_keys_are_errors():
    from pathlib import Path

    from pydantic import ValidationError

    from training.cli import trainer_module
    from training.config import load_train_config

    path = Path(__file__).resolve().parent.parent / "configs" / "train" / "modality_heldout.yaml"
    mod = trainer_module("modality-heldout")
    cfg = load_train_config(mod.Config, path)
    assert cfg.encoder.name == "encoder_cpu.yaml" and cfg.second_expert_weight is None
    load_train_config(encoder.Config, cfg.encoder, cfg.encoder_set)  # the fold recipe's overrides are valid
    with pytest.raises(ValidationError):
        load_train_config(mod.Config, path, ["no_such_option=1"])


@pytest.mark.data
@pytest.mark.weights
@pytest.mark.slow
def test_smoke_run_scores_every_held_out_image_by_a_fold_expert_that_never_trained_on_its_source(tiny_features, tmp_path):
    """The whole protocol on the tiny feature cache and the encoder's smoke recipe: every image of the head's dataset is
    scored once, by the head and the expert of the fold that held its source out; the fold experts' training tables
    lack the held-out dermoscopy dataset."""
    import json
    from pathlib import Path

    import yaml

    from training.cli import run_training

    configs = Path(__file__).resolve().parent.parent / "configs" / "train"
    mod_cfg = tmp_path / "modality.yaml"
    mod_cfg.write_text(yaml.safe_dump({**yaml.safe_load((configs / "modality_smoke.yaml").read_text()), "feature_dir": str(tiny_features)}))
    overrides = [f"out_dir={tmp_path / 'out'}", f"modality={mod_cfg}", f"encoder={configs / 'encoder_smoke.yaml'}",
                 f"encoder_set=[cache_dir={tmp_path / 'images'}, threads=1]"]  # fmt: skip
    summary = run_training("modality-heldout", configs / "modality_heldout.yaml", overrides)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    pred = np.load(tmp_path / "out" / "predictions.npz", allow_pickle=True)
    assert summary["n"] == metrics["n"] == len(pred["y"]) == len(set(pred["refs"])) > 50
    assert np.allclose(pred["expert"].sum(1), 1, atol=1e-3) and np.allclose(pred["head"].sum(1), 1, atol=1e-3)
    assert sorted(set(pred["fold"].tolist())) == [0, 1, 2] and int(pred["headline"].sum()) == metrics["n"]
    folds = {f["fold"]: f for f in metrics["folds"]}
    assert sorted(folds) == [0, 1, 2] and sum(f["n"] for f in folds.values()) == metrics["n"]
    held = {f["fold"]: {g for g in f["held_out"] if g.startswith("dermoscopy:")} for f in folds.values()}
    assert held == {0: {"dermoscopy:ham10000"}, 1: {"dermoscopy:derm7pt"}, 2: {"dermoscopy:isic2018_val"}}
    assert folds[0]["trained"]["train_ham"] == 0 < folds[1]["trained"]["train_ham"] and folds[1]["trained"]["train_derm7pt"] == 0 < folds[0]["trained"]["train_derm7pt"]
    assert set(metrics["agent_decision"]) == set(metrics["head"]) == set(metrics["expert"]) == set(metrics["probe"]) and 0 <= metrics["agent_decision"]["all"] <= 1
    assert np.allclose(pred["probe"].sum(1), 1, atol=1e-3) and metrics["agent"] == {"second_expert_weight": 1 / 3, "imagenet_weight": 1 / 3, "combine": "geometric"}


def test_headline_accuracy_leaves_the_dermoscopy_crop_views_out():
    from training.modality import Config, _heldout_metrics, headline_rows

    cfg = Config(dermoscopy_views=["full", "centre70"])
    tags = np.array(["ham10000:full", "ham10000:centre70", "derm7pt:centre70", "dermnet:crop50", "histology:full", "synthetic"])
    assert headline_rows(tags, cfg).tolist() == [True, False, False, True, True, True]
    y = np.array(["dermoscopy", "dermoscopy", "dermoscopy", "clinical", "histopathology", "not_skin"])
    pred = np.array(["dermoscopy", "clinical", "clinical", "clinical", "histopathology", "not_skin"], dtype=object)
    m = _heldout_metrics(y, pred, tags, cfg)
    assert m["heldout_accuracy"] == 1.0 and m["heldout_accuracy_all_views"] == round(4 / 6, 4)
    assert m["heldout_accuracy_by_source"]["ham10000:centre70"] == 0.0
    assert headline_rows(tags, Config()).all()
    tags2 = np.array(["histology:full", "histology:colour", "ham10000:colour"])
    assert headline_rows(tags2, Config(dermoscopy_views=["full", "colour"], histology_views=["full", "colour"])).tolist() == [True, False, False]


def test_colour_view_is_a_fixed_colour_variant_of_each_image():
    from PIL import Image

    from training.views import make_view

    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8))
    b = Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8))
    va, vb = np.asarray(make_view(a, "colour")), np.asarray(make_view(b, "colour"))
    assert va.shape == np.asarray(a).shape and np.array_equal(va, np.asarray(make_view(a, "colour")))  # cached features stay valid
    assert not np.array_equal(va, np.asarray(a))
    gain = lambda v, im: v.reshape(-1, 3).mean(0) / np.asarray(im).reshape(-1, 3).mean(0)  # noqa: E731
    assert not np.allclose(gain(va, a), gain(vb, b), atol=1e-3)  # each image its own variant


@pytest.mark.data
@pytest.mark.weights
@pytest.mark.slow
def test_dermoscopy_crop_views_train_with_their_source_and_are_held_out_with_it(tiny_features, tmp_path):
    import shutil

    from training.modality import Config, build_dataset, source_folds

    feats = tmp_path / "features"
    shutil.copytree(tiny_features, feats)
    for src in ("ham10000", "derm7pt", "isic2018_val"):
        shutil.copy(feats / f"{src}__full.npz", feats / f"{src}__centre70.npz")
    base = Config(feature_dir=feats, clinical_views=["full"], n_synthetic=1)
    cfg = base.model_copy(update={"dermoscopy_views": ["full", "centre70"]})
    _, y0, g0, t0, _ = build_dataset(base)
    x, y, groups, tags, refs = build_dataset(cfg)
    crops = np.array([t.endswith(":centre70") for t in tags])
    assert crops.sum() == sum(t.endswith(":full") and t.split(":")[0] in cfg.dermoscopy_sources for t in t0) > 0
    assert set(y[crops]) == {"dermoscopy"} and len(y) == len(y0) + crops.sum()
    assert {r.split(":")[2] for r in refs[crops]} == {"centre70"}
    for held in source_folds(groups, cfg):  # a crop is held out exactly when its source is
        for src in cfg.dermoscopy_sources:
            rows = np.array([t.startswith(src + ":") for t in tags])
            assert len(set(held[rows])) == 1
