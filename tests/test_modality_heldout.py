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
