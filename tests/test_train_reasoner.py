"""Reasoner training: rewards (pure), case building (determinism, no leaks, the agent's exact prompt),
SFT and GRPO smoke runs with the real 135M weights, and adapter loading in the agent's LLM backend."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agent.prompts import is_format_valid, parse_answer, write_answer
from training.rewards import (
    calibration_reward,
    completion_text,
    consistency_reward,
    correctness_reward,
    format_checks,
    format_reward,
    make_consistency_reward,
)

CANDS = ["melanoma", "melanocytic nevus", "basal cell carcinoma"]
TAGS = ["E1", "E2", "E3"]
OBSERVED = json.dumps({"blue_whitish_veil": {"present": 0.9, "absent": 0.1}, "pigment_network": {"atypical": 0.2, "typical": 0.8}})
EXPECTED = json.dumps({"melanoma": {"blue_whitish_veil": ["present"], "pigment_network": ["atypical"]},
                       "melanocytic nevus": {"blue_whitish_veil": ["absent"], "pigment_network": ["typical"]}})  # fmt: skip
GOOD = "Diagnosis: melanoma\nRationale: A blue-whitish veil [E1] and similar melanoma cases [E3] fit."


def kw(n: int, **over):
    base = {"label_name": ["melanoma"] * n, "candidates": [CANDS] * n, "tags": [TAGS] * n, "observed": [OBSERVED] * n,
            "expected": [EXPECTED] * n, "classifier_top": ["melanoma"] * n}  # fmt: skip
    base.update(over)
    return base


# --------------------------------------------------------------------------- rewards (fast, no weights)


def test_parse_answer_and_completion_forms():
    assert parse_answer(GOOD) == ("melanoma", "A blue-whitish veil [E1] and similar melanoma cases [E3] fit.")
    assert parse_answer(write_answer(*parse_answer(GOOD))) == parse_answer(GOOD)
    assert parse_answer("melanoma, because [E1]") == (None, None)
    assert completion_text([{"role": "assistant", "content": GOOD}]) == GOOD
    assert correctness_reward([None], [[{"role": "assistant", "content": GOOD}]], **kw(1)) == [1.0]


def test_correctness_reward():
    outs = ["Diagnosis: Melanoma.\nRationale: x", "Diagnosis: melanocytic nevus\nRationale: y", "melanoma"]
    assert correctness_reward([None] * 3, outs, **kw(3)) == [1.0, 0.0, 0.0]


def test_format_reward_checks_each_part():
    outs = [
        GOOD,
        "Diagnosis: squamous cell carcinoma\nRationale: A blue-whitish veil [E1] and similar cases fit.",  # not a candidate
        "Diagnosis: melanoma\nRationale: A blue-whitish veil and similar cases fit well.",  # no tag
        "Diagnosis: melanoma\nRationale: A blue-whitish veil [E9] and similar cases fit.",  # tag not in prompt
        "Diagnosis: melanoma\nRationale: Candidates: melanoma; nevus [E1] Image modality: x",  # template echo
        "Diagnosis: melanoma",  # no rationale
    ]
    r = format_reward([None] * len(outs), outs, **kw(len(outs)))
    assert r == [1.0, 0.75, 0.5, 0.75, 0.75, 0.25]
    assert is_format_valid(GOOD, CANDS, TAGS) and not is_format_valid(outs[3], CANDS, TAGS)
    assert format_checks(outs[4], CANDS, TAGS)["rationale"] is False


def test_consistency_reward_scores_the_stated_diagnosis():
    outs = [GOOD, "Diagnosis: melanocytic nevus\nRationale: typical network [E2]", "Diagnosis: basal cell carcinoma\nRationale: [E1]", "nonsense"]
    r = consistency_reward([None] * 4, outs, **kw(4))
    # melanoma: mean(0.9 veil, 0.2 atypical) = 0.55; nevus: mean(0.1, 0.8) = 0.45; bcc has no expectation; unparseable: 0.
    assert r == pytest.approx([0.55, 0.45, 0.0, 0.0])


def test_consistency_reward_accepts_a_trained_scorer():
    seen = []

    def scorer(observed, expected, diagnosis):
        seen.append((diagnosis, expected))
        return 0.9 if diagnosis == "melanoma" else 0.1

    reward = make_consistency_reward(scorer)
    assert reward.__name__ == "consistency_reward"  # TRL logs rewards by function name
    assert reward([None, None], [GOOD, "Diagnosis: melanocytic nevus\nRationale: [E2]"], **kw(2)) == [0.9, 0.1]
    assert seen[0] == ("melanoma", {"blue_whitish_veil": ["present"], "pigment_network": ["atypical"]})


def test_calibration_reward_wants_conflict_flagged_exactly_when_present():
    hedge = "Diagnosis: melanoma\nRationale: A veil [E1], although the classifier prefers nevus."
    plain = "Diagnosis: melanoma\nRationale: A veil [E1] and similar cases [E3]."
    agree = kw(2, classifier_top=["melanoma"] * 2)
    conflict = kw(2, classifier_top=["melanocytic nevus"] * 2)
    assert calibration_reward([None] * 2, [hedge, plain], **agree) == [0.0, 1.0]
    assert calibration_reward([None] * 2, [hedge, plain], **conflict) == [1.0, 0.0]


def test_rewards_are_pure():
    args = ([None], [GOOD])
    k = kw(1)
    before = json.dumps(k, sort_keys=True)
    for f in (correctness_reward, format_reward, consistency_reward, calibration_reward):
        assert f(*args, **k) == f(*args, **k)
    assert json.dumps(k, sort_keys=True) == before


# --------------------------------------------------------------------------- data helpers (fast)


def test_perturbation_matches_the_error_profile():
    from training.reasoner_data import fit_temperature, perturb_probs

    row = [0.0] * 7
    row[4], row[5] = 0.5, 0.5  # true mel: top is mel or nv half of the time each
    profile = {"confusion": [row if i == 4 else [1.0 / 7] * 7 for i in range(7)]}
    p = np.array([0.01, 0.01, 0.01, 0.01, 0.94, 0.01, 0.01], np.float32)
    rng = np.random.default_rng(0)
    tops = [int(perturb_probs(p, "mel", profile, 1.0, rng).argmax()) for _ in range(400)]
    assert set(tops) == {4, 5} and 0.4 < tops.count(5) / 400 < 0.6
    sharp = np.tile(p, (10, 1))
    t = fit_temperature(sharp, 0.6)
    assert t > 1
    soft = perturb_probs(p, "mel", {"confusion": [[0, 0, 0, 0, 1, 0, 0]] * 7}, t, rng)
    assert abs(float(soft.max()) - 0.6) < 0.01 and abs(float(soft.sum()) - 1) < 1e-5


def test_stratified_subset_is_deterministic_and_keeps_rare_classes():
    from training.reasoner_data import stratified_subset

    items = [{"id": f"c{i}", "label": "nv"} for i in range(90)] + [{"id": f"m{i}", "label": "mel"} for i in range(9)] + [{"id": "d0", "label": "df"}]
    a = stratified_subset(items, 20, seed=1)
    assert a == stratified_subset(list(reversed(items)), 20, seed=1)
    counts = {c: sum(x["label"] == c for x in a) for c in ("nv", "mel", "df")}
    assert len(a) == 20 and counts["df"] == 1 and counts["mel"] >= 2
    sqrt = stratified_subset(items, 20, seed=1, power=0.5)
    assert sum(x["label"] == "mel" for x in sqrt) > counts["mel"]


def test_reward_curve_plot(tmp_path):
    from training.reasoner_grpo import plot_reward_curves

    hist = [{"step": s, "reward": 0.1 * s, "rewards/correctness_reward/mean": 0.05 * s, "rewards/format_reward/mean": 0.5} for s in range(1, 5)]
    hist.append({"step": 4, "train_runtime": 1.0})
    out = plot_reward_curves(hist, tmp_path / "curves.png", {"correctness": 1.0, "format": 0.5})
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_metrics():
    from evals.protocols.reasoner import metrics

    outs = [
        {"label": "mel", "pred": "mel", "format_valid": True, "agreement": 0.6},
        {"label": "mel", "pred": "nv", "format_valid": False, "agreement": None},
        {"label": "nv", "pred": "nv", "format_valid": True, "agreement": 0.2},
    ]
    m = metrics(outs)
    assert m["accuracy"] == pytest.approx(2 / 3, abs=1e-4)
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["mel_sensitivity"] == 0.5
    assert m["format_valid"] == pytest.approx(2 / 3, abs=1e-4)
    assert m["consistency_rate"] == pytest.approx(1 / 3, abs=1e-4)


def test_registry_accepts_adapter_entries(tmp_path, monkeypatch):
    import yaml

    from models.registry import load_registry

    (tmp_path / "a").mkdir()
    path = tmp_path / "reg.yaml"
    path.write_text(yaml.safe_dump({"models": [{"id": "my-lora", "role": "adapter", "source": "path:a", "format": "peft-lora"}]}))
    monkeypatch.setenv("DERMGRAPH_MODELS", str(path))
    spec = load_registry()["my-lora"]
    assert spec.role == "adapter" and spec.source == f"path:{(tmp_path / 'a').resolve()}"


def test_adapter_merges_into_the_transformers_backend(tmp_path):
    """A PEFT adapter (registry id or directory) changes the backend's scores; model_id names it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from models.backends.hf_llm import TransformersLLM
    from agent.testing import build_tiny_llama

    base_dir = build_tiny_llama(tmp_path / "tiny")
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    peft.save_pretrained(tmp_path / "lora")

    conv = [{"role": "user", "content": "Describe the lesion"}]
    base = TransformersLLM(str(base_dir))
    tuned = TransformersLLM(str(base_dir), adapter=str(tmp_path / "lora"))
    a = base.score_continuations(conv, "Diagnosis: ", ["melanoma", "nevus"])
    b = tuned.score_continuations(conv, "Diagnosis: ", ["melanoma", "nevus"])
    assert not np.allclose(a, b)
    assert tuned.model_id == "tiny+lora" and base.model_id == "tiny"
    assert not any("lora" in n for n, _ in tuned.model.named_parameters())  # merged, plain weights
    with pytest.raises(ValueError, match="not a PEFT adapter"):
        TransformersLLM(str(base_dir), adapter=str(tmp_path)).model


# --------------------------------------------------------------------------- case building (real heads, KB, case index)


@pytest.fixture(scope="module")
def agent():
    from training.reasoner_data import make_agent

    return make_agent()


@pytest.fixture(scope="module")
def built(tiny_features, agent):
    from training.reasoner_data import ReasonerDataConfig, build_training_cases

    cfg = ReasonerDataConfig(ham_classes=["akiec", "df"], ham_per_class=2)
    a = build_training_cases(cfg, tiny_features, seed=3, agent=agent)
    b = build_training_cases(cfg, tiny_features, seed=3, agent=agent)
    return a, b


@pytest.mark.weights
@pytest.mark.data
@pytest.mark.slow
def test_cases_are_deterministic_and_keep_report_sets_out(built, tiny_features):
    from training.reasoner_data import ReasonerDataConfig, build_training_cases, report_rows

    (a, info), (b, _) = built
    assert a == b and len(a) >= 10
    report = {r.id for r in report_rows(tiny_features)}
    assert report and not report & {r["id"] for r in a}
    assert {r["source"] for r in a} <= {"derm7pt", "ham10000"} and all(r["split"] != "val" for r in a)
    assert info["ham10000"] == 4 and all(r["perturbed"] == (r["source"] == "ham10000") for r in a)
    with pytest.raises(ValueError, match="report set"):
        build_training_cases(ReasonerDataConfig(derm7pt_splits=["train", "val"]), tiny_features)


@pytest.mark.weights
@pytest.mark.data
@pytest.mark.slow
def test_no_case_retrieves_its_own_image(built, agent, tiny_features):
    from agent.config import DEFAULT_ROUTING
    from training.reasoner_data import derm7pt_rows

    records = built[0][0]
    for r in records:
        assert f"case:{r['id']}" not in r["evidence_ids"]
        assert any(e.startswith("case:") for e in r["evidence_ids"])
    # Without the exclusion the query's own image is its nearest case: the leak is real.
    row = derm7pt_rows(["train"], tiny_features)[0]
    hits = agent.runtime.cases.search(row.features[None], k=3, sources=DEFAULT_ROUTING["dermoscopy"].case_sources)[0]
    assert hits[0].id == row.id
    # HAM10000 cases exclude every image of their lesion (near-duplicates).
    from training.data import source_table

    table = source_table("ham10000")
    lesion_of = {f"ham10000:{r['image_id']}": r["lesion_id"] for r in table}
    images_of: dict[str, set[str]] = {}
    for r in table:
        images_of.setdefault(r["lesion_id"], set()).add(f"case:ham10000:{r['image_id']}")
    ham = [r for r in records if r["source"] == "ham10000"]
    assert ham and all(not set(r["evidence_ids"]) & images_of[lesion_of[r["id"]]] for r in ham)


@pytest.mark.weights
@pytest.mark.data
@pytest.mark.slow
def test_prompt_is_exactly_the_agents(built, agent, tiny_features):
    """The agent's reason node, on the same state, sends the LLM exactly the training prompt; the target
    names the truth and cites tags shown in the prompt."""
    from agent.agent import Agent
    from training.reasoner_data import derm7pt_rows, render_state

    class Recorder:
        model_id = "recorder"

        def __init__(self):
            self.convs = []

        def score_continuations(self, conversation, prefix, continuations):
            self.convs.append(conversation)
            return np.zeros(len(continuations))

        def chat(self, conversations, **kw):
            return ["An atypical pattern [E1] fits it well enough."]

    records = {r["id"]: r for r in built[0][0]}
    row = next(r for r in derm7pt_rows(["train", "extra"], tiny_features) if r.id in records)
    rec = records[row.id]
    state = render_state(row, agent)
    from agent.testing import fusion_model

    recorder = Recorder()
    # A stacker that fuses the LLM (the shipped one may not).
    Agent(agent.config, backends={"llm": recorder, "fusion": fusion_model()}).run(state, start_at="reason", until="reason")
    assert recorder.convs[0] == rec["prompt"]
    target = rec["completion"][0]["content"]
    assert target.startswith(f"Diagnosis: {rec['label_name']}\nRationale: ")
    assert is_format_valid(target, rec["candidates"], rec["tags"])


# --------------------------------------------------------------------------- smoke runs with the real weights


@pytest.fixture(scope="module")
def sft_run(tiny_features, tmp_path_factory):
    from training.cli import run_training

    out = tmp_path_factory.mktemp("sft")
    return run_training("reasoner-sft", "configs/train/reasoner_sft_smoke.yaml", [f"feature_dir={tiny_features}", f"out_dir={out}"]), out


@pytest.mark.weights
@pytest.mark.data
@pytest.mark.slow
def test_sft_smoke(sft_run):
    summary, out = sft_run
    assert summary["steps"] == 2 and summary["tokens"]["dropped_too_long"] == 0
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size < 10_000_000
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == "smollm2-135m-instruct"
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in logs)
    assert (out / "cases.jsonl").exists()


@pytest.mark.weights
@pytest.mark.data
@pytest.mark.slow
def test_grpo_smoke_and_adapter_in_the_agent_backend(sft_run, tiny_features, tmp_path):
    from models.backends.hf_llm import TransformersLLM
    from training.cli import run_training
    from training.reasoner_data import read_jsonl

    _, sft = sft_run
    summary = run_training(
        "reasoner-grpo",
        "configs/train/reasoner_grpo_smoke.yaml",
        [f"feature_dir={tiny_features}", f"out_dir={tmp_path}", f"init_adapter={sft / 'adapter'}", f"cases={sft / 'cases.jsonl'}",
         f"artifact={tmp_path / 'artifact'}", "register_as=test-reasoner-lora"],  # fmt: skip
    )
    assert summary["steps"] == 2
    assert (tmp_path / "reward_curves.png").read_bytes()[:4] == b"\x89PNG"
    logs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/correctness_reward/mean" in r and "rewards/consistency_reward/mean" in r for r in logs)
    assert (tmp_path / "artifact" / "adapter_model.safetensors").exists()
    assert "test-reasoner-lora" in (tmp_path / "registry.yaml").read_text()

    rec = read_jsonl(sft / "cases.jsonl")[0]
    base = TransformersLLM("smollm2-135m-instruct")
    tuned = TransformersLLM("smollm2-135m-instruct", adapter=str(sft / "adapter"))
    a = base.score_continuations(rec["prompt"], "Diagnosis: ", rec["candidates"])
    b = tuned.score_continuations(rec["prompt"], "Diagnosis: ", rec["candidates"])
    assert not np.allclose(a, b) and tuned.model_id == "smollm2-135m-instruct+adapter"


def test_rewards_put_the_assistant_prefix_back():
    """GRPO prompts may end with the agent's 'Diagnosis: ' prefix; the completion is then the rest."""
    rest = GOOD.removeprefix("Diagnosis: ")
    k = kw(1, completion_prefix=["Diagnosis: "])
    assert correctness_reward([None], [rest], **k) == [1.0]
    assert format_reward([None], [rest], **k) == [1.0]
    assert consistency_reward([None], [rest], **k) == pytest.approx([0.55])
    assert correctness_reward([None], [rest], **kw(1)) == [0.0]
