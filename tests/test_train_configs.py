"""Every shipped trainer configuration validates against its trainer's Config (unknown keys are errors), so a
recipe in configs/train cannot drift from the code it runs (the GPU job's and pack's files: tests/test_gpu_job.py)."""

from pathlib import Path

import pytest

from training.cli import TRAINERS, trainer_module
from training.config import load_train_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "train"
OWN_TESTS = ("gpu_job", "gpu_pack")  # validated section by section in tests/test_gpu_job.py


def _trainer(path: Path) -> str | None:
    """The trainer a config file belongs to: the longest trainer name its file name starts with ('-' as '_')."""
    names = [t for t in TRAINERS if path.stem.startswith(t.replace("-", "_"))]
    return max(names, key=len, default=None)


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS.glob("*.yaml") if not p.stem.startswith(OWN_TESTS)), ids=lambda p: p.name)
def test_trainer_config_validates(path):
    trainer = _trainer(path)
    assert trainer is not None, f"{path.name}: its name starts with no trainer of training.cli.TRAINERS (rename it, or give it a test of its own)"
    cfg = load_train_config(trainer_module(trainer).Config, path, [])
    assert cfg.seed is not None


def test_cpu_continuation_recipe_starts_from_the_shipped_expert():
    from training.encoder import Config

    cfg = load_train_config(Config, CONFIGS / "encoder_cpu_continue.yaml", [])
    assert cfg.device == "cpu" and cfg.train_from == "stem" and cfg.image_size == 224 and cfg.ema_decay
    assert cfg.init is not None and Path(cfg.init).name == "efficientnet_lite0_derm.safetensors"


def test_overwrite_artifact_is_common_and_unknown_keys_get_a_hint():
    from pydantic import ValidationError

    for node in ("verifier", "encoder", "probe"):
        mod = trainer_module(node)
        assert load_train_config(mod.Config, None, []).overwrite_artifact is False
        assert load_train_config(mod.Config, None, ["overwrite_artifact=true"]).overwrite_artifact is True
    with pytest.raises(ValidationError, match="did you mean 'overwrite_artifact'.*valid top-level keys: .*out_dir"):
        load_train_config(trainer_module("verifier").Config, None, ["overwrite_artefact=true"])
    with pytest.raises(ValidationError, match="did you mean 'ham'.*valid keys of mix"):
        load_train_config(trainer_module("encoder").Config, None, ["mix.hamm=3"])


def test_verifier_table_says_when_no_shipped_model_is_compared():
    from training.verifier import shipped_header

    assert shipped_header(None) == "no shipped model to compare" and shipped_header("consistency-verifier") == "shipped consistency-verifier"
