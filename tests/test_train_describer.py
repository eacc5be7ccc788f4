"""The feature VLM describer: prompt/feature splicing (tiny random Llama), its data builder, the smoke
training run through ``dermgraph train``, and the agent's ``feature-vlm`` morphology backend."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from models.vocabulary import SEVEN_POINT, parse_findings

REPO = Path(__file__).resolve().parents[1]


class _Tok:
    """A tiny word-level tokenizer with a ChatML template (enough for FeatureVLM without real weights)."""

    def __init__(self) -> None:
        words = "<pad> <|im_start|> <|im_end|> <empty_output> system user assistant \n".split(" ")
        self.vocab = {w: i for i, w in enumerate(words)}
        self.pad_token_id, self.eos_token_id, self.unk_token_id = 0, 2, None
        self.pad_token = "<pad>"
        self.eos_token = "<|im_end|>"

    def convert_tokens_to_ids(self, t):
        return self.vocab[t]

    def _id(self, w):
        return self.vocab.setdefault(w, len(self.vocab)) % 100

    def __call__(self, text, add_special_tokens=False):
        import re

        return {"input_ids": [self._id(w) for w in re.findall(r"<\|im_start\|>|<\|im_end\|>|<empty_output>|\n|[^\s<]+", text)]}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


@pytest.fixture
def tiny_vlm():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.backends.feature_vlm_net import FeatureVLM, FeatureVLMConfig

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128))  # fmt: skip
    cfg = FeatureVLMConfig(feature_dim=6, use_probs=False, n_visual_tokens=3, projector_hidden=8, projector_dropout=0.0)
    return FeatureVLM(lm, _Tok(), cfg)


def test_image_embeddings_land_on_the_placeholders_and_labels_mask_the_prompt(tiny_vlm):
    import torch

    from training.describer_vlm import TurnCollator

    vlm = tiny_vlm
    feats = np.random.default_rng(0).normal(size=(2, 6)).astype(np.float32)
    batch = TurnCollator(vlm, feats, max_length=64)([
        {"row": 0, "question": "describe it", "answer": "no streaks"},
        {"row": 1, "question": "is a veil present ?", "answer": "yes a veil and more words"},
    ])  # fmt: skip
    ids, labels = batch["input_ids"], batch["labels"]
    placeholder = ids == vlm.image_token_id
    assert placeholder.sum(1).tolist() == [3, 3]
    # Labels: -100 on the whole prompt (placeholders included) and on padding; the answer is supervised.
    for r in range(2):
        prompt_len = len(vlm.prompt_ids(["describe it", "is a veil present ?"][r]))
        assert (labels[r, :prompt_len] == -100).all()
        n = int(batch["attention_mask"][r].sum())
        assert (labels[r, prompt_len:n] == ids[r, prompt_len:n]).all() and (labels[r, n:] == -100).all()
        assert labels[r, n - 1] == vlm.tokenizer.eos_token_id  # learns to stop

    captured = {}
    decoder = vlm.lm.get_decoder()
    handle = decoder.register_forward_hook(lambda m, a, kw, out: captured.update(kw), with_kwargs=True)
    out = vlm(input_ids=ids, attention_mask=batch["attention_mask"], labels=labels, image_features=batch["image_features"])
    handle.remove()
    embeds = captured["inputs_embeds"]
    visual = vlm.projector(batch["image_features"])
    for r in range(2):
        pos = placeholder[r].nonzero().flatten()
        assert torch.allclose(embeds[r, pos], visual[r])
        text = ~placeholder[r]
        assert torch.allclose(embeds[r, text], vlm.lm.get_input_embeddings()(ids[r, text]))
    assert torch.isfinite(out.loss)
    out.loss.backward()  # gradients reach the projector through the spliced embeddings
    assert vlm.projector.net[1].weight.grad.abs().sum() > 0


def test_generate_uses_the_features_and_round_trips_through_save(tiny_vlm, tmp_path):
    import torch

    vlm = tiny_vlm
    with torch.no_grad():
        for p in vlm.projector.parameters():
            p.normal_(0, 3.0)
    feats = np.random.default_rng(1).normal(size=(2, 6)).astype(np.float32)
    ids = vlm.prompt_ids("describe it")
    x = vlm.features_input(feats)
    with torch.no_grad():
        a = vlm.lm(input_ids=torch.tensor([ids, ids]), image_features=x).logits[:, -1]
        b = vlm.lm(input_ids=torch.tensor([ids, ids])).logits[:, -1]  # no features: plain token embeddings
    assert not torch.allclose(a[0], a[1]) and torch.allclose(b[0], b[1])
    gen = vlm.generate_ids(feats, ["describe it", "describe it"], max_new_tokens=3)
    assert [g[0] for g in gen if g] == [int(a[r].argmax()) for r in range(2) if gen[r]]  # greedy from the features
    assert all(len(g) <= 3 for g in gen)
    vlm.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"feature_vlm.json", "projector.safetensors"}


def test_canonical_targets_parse_back_to_the_source_criteria():
    from models.vocabulary import SEVEN_POINT_PHRASES
    from training.describer_data import criterion_turn, describe

    rng = random.Random(0)
    total = ok = 0
    for _ in range(500):
        crit = {c: rng.choice(list(vals)) for c, vals in SEVEN_POINT_PHRASES.items()}
        got = parse_findings(describe(crit, rng))
        total += len(SEVEN_POINT)
        ok += sum(got.get(c) == crit[c] for c in SEVEN_POINT)
        c = rng.choice(list(SEVEN_POINT))
        _, answer = criterion_turn(c, crit[c], rng)
        assert parse_findings(answer).get(c) == crit[c], answer
    assert ok / total >= 0.95
    assert set(SEVEN_POINT_PHRASES) == set(SEVEN_POINT) and all(set(SEVEN_POINT_PHRASES[c]) == set(v) for c, v in SEVEN_POINT.items())


@pytest.mark.slow
def test_built_turns_are_deterministic_and_keep_val_out(tiny_features):
    from training.describer_data import build_turns, load_cases

    a, xa = build_turns(tiny_features, n_turns=40, seed=3, ham_fraction=0.3, balance=0.5)
    b, xb = build_turns(tiny_features, n_turns=40, seed=3, ham_fraction=0.3, balance=0.5)
    assert a == b and np.array_equal(xa, xb)
    val_ids = {r["image"] for r in load_cases(tiny_features, ("val",))[0]}
    assert val_ids and not val_ids & {t.case_id for t in a}
    assert {t.kind for t in a} >= {"describe", "ham"}
    train_rows, _ = load_cases(tiny_features, ("train", "extra"))
    for t in a:
        if t.kind == "describe":
            truth = {c: train_rows[t.row][c] for c in SEVEN_POINT}
            assert parse_findings(t.answer) == truth


@pytest.mark.weights
@pytest.mark.slow
def test_smoke_training_writes_adapter_projector_metrics_and_table(tiny_features, tmp_path, monkeypatch):
    from training.cli import run_training

    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    summary = run_training("describer", REPO / "configs/train/describer_smoke.yaml",
                           [f"feature_dir={tiny_features}", f"out_dir={out}", f"artifact={tmp_path / 'artifact'}"])  # fmt: skip
    for stage in ("stage1", "stage2"):
        assert (out / stage / "projector.safetensors").is_file() and (out / stage / "feature_vlm.json").is_file()
    assert (out / "stage2" / "adapter_model.safetensors").is_file() and (out / "stage2" / "adapter_config.json").is_file()
    assert not (out / "stage1" / "adapter_config.json").exists()  # stage 1 trains the projector only
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {s: [r["loss"] for r in records if r.get("stage") == s and "loss" in r] for s in ("stage1", "stage2")}
    assert all(len(v) >= 2 and all(math.isfinite(x) for x in v) for v in losses.values())
    assert summary["stages"]["stage2"]["trainable_params"] > summary["stages"]["stage1"]["trainable_params"]
    for key in ("concept_heads", "vlm_stage1", "vlm_stage2"):
        assert 0 <= summary["eval"][key]["metrics"]["mean"]["macro_f1"] <= 1
    assert "concept heads" in summary["table"] and "stage 2" in summary["table"]
    assert (tmp_path / "artifact" / "adapter_model.safetensors").is_file()
    reg = (out / "registry.yaml").read_text()
    assert "feature-vlm" in reg and "path:stage2" in reg
    assert json.loads((out / "summary.json").read_text())["trainer"] == "describer"


def _case(modality: str):
    from agent.state import CaseState, ImageEncoding, ModalityResult

    probs = {c: 1 / 7 for c in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")} | {"mel": 0.5}
    features = np.abs(np.random.default_rng(0).normal(size=2048)).astype(np.float32)
    return CaseState(encoding=ImageEncoding(model_id="x", classifier_probs=probs, features=features),
                     modality=ModalityResult(label=modality, confidence=0.9, probs={modality: 0.9}))  # fmt: skip


class FeatureDescriberDouble:
    """A feature-based VLM backend double: records what the node passes, answers a fixed description."""

    needs_features = True
    modalities = ("dermoscopy",)
    model_id = "feature-double"

    def __init__(self):
        self.calls = []

    def generate(self, images, prompts, *, features=None, probs=None, max_new_tokens=128, temperature=0.0):
        self.calls.append((features, probs))
        return ["Dermoscopy shows an atypical pigment network; no streaks; a blue-whitish veil; no vessels."] * len(prompts)


def test_morphology_node_gives_feature_backends_the_encoder_output_and_skips_unlearned_modalities():
    from agent.config import load_config
    from agent.nodes.morphology import describe
    from agent.runtime import Runtime

    double = FeatureDescriberDouble()
    rt = Runtime(load_config(overrides=["morphology.kind=vlm"]), overrides={"vlm": double})
    case = _case("dermoscopy")
    out = describe(case, rt)
    features, probs = double.calls[0]
    assert features.shape == (1, 2048) and np.array_equal(features[0], case.encoding.features)
    assert probs.shape == (1, 7) and probs[0, 4] == 0.5  # HAM class order: mel is the 5th
    found = {f.criterion: f.value for f in out.update["morphology"].findings}
    assert found == {"pigment_network": "atypical", "streaks": "absent", "blue_whitish_veil": "present", "vascular_structures": "absent"}
    assert out.model_id == "feature-double" and out.inputs["uses"] == "encoder features"

    skipped = describe(_case("clinical"), rt)
    assert len(double.calls) == 1 and skipped.update["morphology"].findings == []
    assert "trained on dermoscopy only" in skipped.update["morphology"].limitations[0]


@pytest.mark.weights
@pytest.mark.slow
def test_agent_morphology_node_runs_the_feature_vlm_backend(tmp_path):
    """The trained describer plugged in by config: the node passes encoder features, parses findings."""
    from agent.config import load_config
    from agent.nodes.morphology import describe
    from agent.runtime import Runtime

    rt = Runtime(load_config(REPO / "configs/agent/vlm_describer.yaml"))
    state = _case("dermoscopy")
    out = describe(state, rt)
    result = out.update["morphology"]
    assert result.description and out.model_id == "feature-vlm-describer"
    # The shipped describer has learned the description format: it states every criterion.
    assert {f.criterion for f in result.findings} == set(SEVEN_POINT)
    assert all(f.value in SEVEN_POINT[f.criterion] for f in result.findings)
