"""Encoder fine-tuning for the modality head: Xception stages, encoder deltas, the trainer's smoke run,
and the agent pairing a head with the encoder it was trained on."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from training.config import load_train_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "train"


def test_stages_run_in_pieces_equal_the_whole_network():
    from models.xception import Xception

    torch.manual_seed(0)
    net = Xception().eval()
    x = torch.randn(1, 3, 71, 71)
    with torch.no_grad():
        whole = net.forward_map(x)
        mid = net.forward_stages(x, "entry", "block13")
        assert torch.equal(net.forward_stages(mid, "block13"), whole)
        assert torch.equal(net.forward_stages(x, "entry", "entry"), x)  # an empty range is the identity
    # Every parameter belongs to exactly one stage.
    owned = [id(p) for s in net.STAGES for m in net.stage_modules(s) for p in m.parameters()]
    assert sorted(owned) == sorted(id(p) for p in net.parameters())
    with pytest.raises(ValueError, match="valid"):
        net.stage_modules("block15")


def test_unknown_stage_in_the_config_is_a_validation_error():
    from training import modality

    with pytest.raises(ValidationError, match="unknown Xception stage"):
        load_train_config(modality.Config, CONFIGS / "modality_finetune_smoke.yaml", ["finetune.unfreeze_from=block99"])


def test_sample_per_tag_caps_each_tag_deterministically():
    from training.modality_encoder import sample_per_tag

    tags = np.array(["a"] * 10 + ["b"] * 2 + ["c"] * 5)
    sel = sample_per_tag(tags, 3, seed=0)
    assert list(np.unique(tags[sel], return_counts=True)[1]) == [3, 2, 3]
    assert np.array_equal(sel, sample_per_tag(tags, 3, seed=0)) and not np.array_equal(sel, sample_per_tag(tags, 3, seed=1))
    assert np.array_equal(sample_per_tag(tags, None, 0), np.arange(len(tags)))


def _images(shared_data, n=3):
    import csv

    with open(shared_data / "isic2018_val" / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:n]
    return [Image.open(shared_data / "isic2018_val" / r["image"]).convert("RGB") for r in rows]


@pytest.mark.weights
def test_an_untouched_delta_reproduces_the_shared_encoder_and_a_bad_one_is_refused(shared_data, tmp_path):
    from safetensors.torch import save_file

    from models.finetuned_encoder import FinetunedEncoder, delta_state_dict, save_delta
    from models.resolve import resolve
    from models.sklesion import SklesionClassifier, build_model

    base = build_model(resolve("sklesion-xception"))
    path = save_delta(base.backbone, "block13", tmp_path / "delta.safetensors", base_id="sklesion-xception", base_sha256=None, meta={"id": "same"})
    keys = delta_state_dict(base.backbone, "block13")
    assert keys and all(k.startswith(("backbone.block13.", "backbone.block14_")) for k in keys)
    imgs = _images(shared_data)
    enc = FinetunedEncoder(path)
    assert enc.model_id == "same"
    np.testing.assert_allclose(enc.embed_images(imgs), SklesionClassifier().predict(imgs).features, rtol=0, atol=1e-5)

    # A changed stage changes the features.
    changed = {k: (v * 1.5 if k.endswith("block14_sepconv2_bn.weight") else v) for k, v in keys.items()}
    save_file(changed, str(tmp_path / "changed.safetensors"), metadata={"dermgraph": json.dumps({"format": "xception-delta", "id": "c"})})
    assert not np.allclose(FinetunedEncoder(tmp_path / "changed.safetensors").embed_images(imgs[:1]), enc.embed_images(imgs[:1]))

    wrong = {"backbone.block14_sepconv2_bn.weight": torch.ones(7)}
    save_file(wrong, str(tmp_path / "wrong.safetensors"), metadata={"dermgraph": json.dumps({"format": "xception-delta"})})
    with pytest.raises(ValueError, match="does not fit"):
        FinetunedEncoder(tmp_path / "wrong.safetensors").embed_images(imgs[:1])
    stale = {"format": "xception-delta", "base": "sklesion-xception", "base_sha256": "0" * 64}
    save_file(keys, str(tmp_path / "stale.safetensors"), metadata={"dermgraph": json.dumps(stale)})
    with pytest.raises(ValueError, match="registry now points at"):
        FinetunedEncoder(tmp_path / "stale.safetensors").embed_images(imgs[:1])
    save_file({"x": torch.ones(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a dermgraph encoder delta"):
        FinetunedEncoder(tmp_path / "other.safetensors")


@pytest.fixture(scope="module")
def finetuned(tiny_features, tmp_path_factory):
    from training.cli import run_training

    out = tmp_path_factory.mktemp("modality_finetune")
    summary = run_training("modality", CONFIGS / "modality_finetune_smoke.yaml", [f"feature_dir={tiny_features}", f"out_dir={out}"])
    return out, summary


@pytest.mark.slow
@pytest.mark.weights
def test_finetune_smoke_run_writes_encoder_head_log_and_before_after(finetuned):
    from models.finetuned_encoder import read_delta
    from models.heads import HeadSet
    from models.registry import load_registry
    from models.resolve import sha256_file

    out, summary = finetuned
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stages = {r.get("stage") for r in log}
    assert {"frozen", "tuned", "finetune_fold0", "finetune_final"} <= stages
    assert all(np.isfinite(r["loss"]) for r in log if "loss" in r) and log[-1]["event"] == "final"
    tensors, info = read_delta(Path(summary["encoder"]))
    assert info["base"] == "sklesion-xception" and info["unfreeze_from"] == "block14" and info["id"] == "modality-smoke-encoder"
    assert all(k.startswith("backbone.block14_") for k in tensors)
    hs = HeadSet.load(Path(summary["weights"]))
    assert hs.meta["encoder_sha256"] == sha256_file(Path(summary["encoder"]))
    # Frozen and tuned features are compared on the same held-out images.
    ba = summary["before_after"]
    assert ba["rows"][0][0] == "all" and ba["frozen_heldout"] is not None and "fine-tuned encoder" in ba["table"]
    reg = load_registry([Path(summary["registry"])])
    assert reg["modality-smoke-encoder"].role == "image_embedder" and reg["modality-smoke-finetuned"].role == "head"


@pytest.mark.slow
@pytest.mark.weights
def test_agent_reads_modality_from_the_paired_tuned_encoder(finetuned, shared_data, monkeypatch):
    from agent.agent import Agent
    from agent.config import AgentConfig
    from agent.nodes.modality import modality_inputs
    from models.finetuned_encoder import FinetunedEncoder
    from models.heads import HeadSet
    from models.image_stats import image_stats
    from agent.testing import backends

    out, summary = finetuned
    monkeypatch.setenv("DERMGRAPH_MODELS", str(out / "registry.yaml"))
    doubles = backends()
    del doubles["modality_heads"]
    cfg = AgentConfig().model_copy(deep=True)
    cfg.modality.head, cfg.modality.encoder = "modality-smoke-finetuned", "modality-smoke-encoder"
    img = _images(shared_data, 1)[0]
    d = Agent(cfg, backends=doubles).diagnose(img)
    step = next(s for s in d.trace if s.node == "modality")
    assert "fine-tuned encoder modality-smoke-encoder" in step.inputs["uses"]
    hs = HeadSet.load(Path(summary["weights"]))
    x = modality_inputs(FinetunedEncoder(Path(summary["encoder"])).embed_images([img])[0], image_stats(img))
    expected = np.array(hs.heads["modality"].classes)[hs.predict_proba(x)["modality"][0].argmax()]
    assert d.modality.confidence == pytest.approx(float(hs.predict_proba(x)["modality"][0].max()), abs=1e-4)
    assert d.modality.label in (expected, "not_skin")  # not_skin only through the OOD reject

    # A tuned head without its encoder, or the shared head with one, is a configuration error.
    cfg.modality.encoder = None
    with pytest.raises(ValueError, match="set modality.encoder"):
        Agent(cfg, backends=doubles).diagnose(img)
    cfg.modality.head, cfg.modality.encoder = "modality-head", "modality-smoke-encoder"
    with pytest.raises(ValueError, match="unset modality.encoder"):
        Agent(cfg, backends=doubles).diagnose(img)
