"""Micro-batched execution (agent.batched) gives the sequential path's records, field for field."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from agent import Agent
from agent.batch import Case, run_batch
from agent.batched import BatchedAgent, CachingEmbedder, CachingLLM, batched_case_diagnose
from agent.testing import FakeClassifier, FakeClinicalProbe, FakeModalityProbe, FakeSecondExpert, backends, concept_heads, fusion_model
from models.vocabulary import HAM_CLASSES

TIMING_KEYS = {"started_at", "duration_s", "seconds", "cases_per_second"}


class VaryingClassifier(FakeClassifier):
    """Probabilities that depend on the image (its red level), so cases differ: some accept, some abstain."""

    def predict(self, images, metadata=None):
        out = super().predict(images, metadata)
        for i, im in enumerate(images):
            r = float(np.asarray(im, dtype=np.float32)[..., 0].mean()) / 255.0
            p = np.full(len(HAM_CLASSES), (1 - r) / (len(HAM_CLASSES) - 1), dtype=np.float32)
            p[HAM_CLASSES.index("mel")] = r
            out.probs[i] = p
        return out


def no_llm_fusion():
    """The fusion double without the LLM among the experts (like the shipped default artifact)."""
    fm = fusion_model()
    C = len(HAM_CLASSES)
    d = fm.modalities["dermoscopy"]
    fm.modalities["dermoscopy"] = dataclasses.replace(d, experts=d.experts[:3], coef=d.coef[:, : 3 * C], centre={k: v for k, v in d.centre.items() if k != "llm"})
    c = fm.modalities["clinical"]
    fm.modalities["clinical"] = dataclasses.replace(c, experts=["knn"], coef=c.coef[:1])
    return fm


def _images(tmp_path, n):
    paths = []
    for i in range(n):
        p = tmp_path / f"case{i:03d}.png"
        Image.new("RGB", (40 + i % 5, 32), (int(255 * i / n), (37 * i) % 256, 90)).save(p)
        paths.append(p)
    return paths


def _strip(value):
    """A record without timings (trace start times and durations, run statistics)."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _run(tmp_path, name, cases, agent, batch_size):
    out = tmp_path / f"{name}.jsonl"
    if batch_size is None:
        run_batch(cases, out, lambda c: json.loads(agent.diagnose(c.image, question=c.question, metadata=c.metadata or None).model_dump_json()), progress=False)
    else:
        run_batch(cases, out, batched_case_diagnose(agent, cases, batch_size), progress=False)
    return [_strip(json.loads(line)) for line in out.read_text().splitlines()]


@pytest.mark.parametrize("llm_fused", [False, True])
def test_batched_records_equal_sequential(tmp_path, llm_fused):
    paths = _images(tmp_path, 31)
    (tmp_path / "broken.jpg").write_text("not an image")
    cases = [Case(p.stem, p, metadata={"age": 40 + i} if i % 3 else {}) for i, p in enumerate(paths)]
    cases.insert(7, Case("broken", tmp_path / "broken.jpg"))
    cases[3].question = "changed recently?"
    fusion = fusion_model if llm_fused else no_llm_fusion
    # Findings say nevus while classifier/cases/LLM lean melanoma: with the LLM fused the verifier asks for revisions.
    make = lambda: Agent(  # noqa: E731
        backends=backends(classifier=VaryingClassifier(), fusion=fusion(), concept_heads=concept_heads({"pigment_network": "typical"}), second_expert=FakeSecondExpert(),
                          clinical_probe=FakeClinicalProbe(), modality_probe=FakeModalityProbe()),
        overrides=["verifier.max_rounds=2", "verifier.target_accuracy={dermoscopy: 0.8}", f"reasoner.llm_summary={llm_fused}"],
    )
    seq_agent, bat_agent = make(), make()
    seq = _run(tmp_path, "seq", cases, seq_agent, None)
    bat = _run(tmp_path, "bat", cases, bat_agent, batch_size=8)
    assert len(seq) == len(bat) == 32
    for a, b in zip(seq, bat):
        assert a == b
    ok = [r for r in seq if r["status"] == "ok"]
    verdicts = {r["diagnosis"]["verdict"] for r in ok}
    assert {"accept", "abstain"} <= verdicts, verdicts
    assert [r["status"] for r in seq].count("error") == 1
    if llm_fused:
        assert any(r["diagnosis"]["rounds"] == 2 for r in ok)
        # First rounds' scorings and summaries came from the micro-batches' calls; revise rounds ran per case.
        llm = bat_agent.runtime.llm
        first_rounds = sum(r["diagnosis"]["verdict"] != "rejected" for r in ok)
        assert llm.hits == 2 * first_rounds, (llm.hits, first_rounds)
        assert llm.inner.scored == seq_agent.runtime.llm.scored and len(llm.inner.chats) == len(seq_agent.runtime.llm.chats)
    else:
        assert not isinstance(bat_agent.runtime.llm, CachingLLM)  # the configuration does not use the LLM
    # the encoder ran once per micro-batch (4 of 8), not once per case
    assert bat_agent.runtime.classifier.inner.calls == 4
    assert bat_agent.runtime.classifier.misses == 0 and bat_agent.runtime.cases.misses == 0
    assert seq_agent.runtime.classifier.calls == 31
    assert bat_agent.runtime.second_expert.inner.calls == 4 and bat_agent.runtime.second_expert.misses == 0  # batched as the encoder
    assert all(r["diagnosis"]["trace"][0]["outputs"]["encoding"]["expert_probs"]["effnet"] for r in ok)
    # The probe (run on every image: this expert has no modality head to rule dermoscopy out) is batched too.
    assert bat_agent.runtime.clinical_probe.inner.calls == 4 and bat_agent.runtime.clinical_probe.misses == 0
    assert seq_agent.runtime.clinical_probe.calls == 31
    assert bat_agent.runtime.modality_probe.inner.calls == 4 and bat_agent.runtime.modality_probe.misses == 0  # every image, batched
    assert seq_agent.runtime.modality_probe.calls == 31
    assert all(r["diagnosis"]["trace"][0]["outputs"]["encoding"]["expert_probs"]["probe_dermnet"] for r in ok)


def test_batched_agent_handles_repeats_and_unannounced_requests(tmp_path):
    p = _images(tmp_path, 1)[0]
    agent = Agent(backends=backends())
    ba = BatchedAgent(agent, [(p, None, None)] * 5, batch_size=4)
    first = [ba.diagnose(p) for _ in range(5)]
    extra = ba.diagnose(p, question="unannounced")  # falls through to Agent.diagnose
    ref = Agent(backends=backends()).diagnose(p)
    assert all(_strip(d.model_dump(mode="json")) == _strip(ref.model_dump(mode="json")) for d in first)
    assert extra.question == "unannounced"
    assert agent.runtime.classifier.inner.calls == 2  # 2 prefetches (4 + 1); the unannounced case hits the cache


def test_caching_embedder_answers_prefetched_texts_and_falls_through():
    class Emb:
        model_id = "e"
        calls = []

        def embed(self, texts):
            self.calls.append(list(texts))
            return np.array([[len(t), 1.0] for t in texts], np.float32)

    e = CachingEmbedder(Emb())
    e.prefetch(["a", "bb", "a"])
    assert np.array_equal(e.embed(["bb"]), [[2, 1]]) and e.model_id == "e"
    assert np.array_equal(e.embed(["ccc"]), [[3, 1]])
    assert e.inner.calls == [["a", "bb"], ["ccc"]] and (e.hits, e.misses) == (1, 1)


def test_bench_reports_modes_floors_and_equality(tmp_path):
    from agent.bench import format_report, run_bench

    paths = _images(tmp_path, 3)
    agent = Agent(backends=backends(classifier=VaryingClassifier(), fusion=no_llm_fusion()))
    r = run_bench(tmp_path, n=5, batch_size=2, latency_repeats=2, repeats=2, agent=agent)
    assert r["cases"] == 5 and r["config_fingerprint"] == agent.config.fingerprint() and r["repeats"] == 2
    assert [m["mode"] for m in r["modes"]] == ["sequential", "batched"] and [m["batch_size"] for m in r["modes"]] == [1, 2]
    for m in r["modes"]:
        assert {"encoder forward", "FAISS case search"} <= set(m["floors_s"]) and m["cases_per_s"] > 0 and m["peak_rss_mb"] > 0
        assert {"encode", "retrieve", "reason", "verify"} <= set(m["nodes_s"])
    assert r["batched_equals_sequential"] == {"identical_records": 5, "of": 5, "identical_decisions": 5, "max_abs_numeric_diff": 0.0}
    assert r["warm_latency_s"]["repeats"] == 2 and "overhead" in format_report(r) and len(paths) == 3
    # the batched mode leaves the runtime as it found it
    assert type(agent.runtime.classifier).__name__ == "VaryingClassifier"


def test_bench_times_the_llm_alone_where_the_configuration_uses_it(tmp_path):
    from agent.bench import run_bench

    _images(tmp_path, 3)
    agent = Agent(backends=backends(classifier=VaryingClassifier(), fusion=fusion_model()), overrides=["reasoner.llm_summary=true"])
    r = run_bench(tmp_path, n=4, batch_size=2, latency_repeats=0, agent=agent)
    assert r["llm_used"] == ["candidate scoring", "summary"]
    for m in r["modes"]:
        assert {"LLM candidate scoring", "LLM summary"} <= set(m["floors_s"])
    assert r["batched_equals_sequential"]["identical_records"] == 4
    assert not isinstance(agent.runtime.llm, CachingLLM)  # the floor's probe is taken off again


def test_clinical_micro_batches_search_the_second_experts_index_once_and_never_load_the_dermoscopy_one(tmp_path):
    """The retrieve node searches a clinical photo's similar cases in the second expert's index with its features: the
    prefetch must search that index (one query matrix per micro-batch), not the dermoscopy index."""
    from agent.testing import FakeCases, modality_heads

    class Recording(FakeCases):
        def __init__(self, hits):
            super().__init__(hits)
            self.queries: list[tuple[int, int]] = []  # (rows, width) per search call

        def search(self, features, k=8, **kw):
            f = np.asarray(features)
            self.queries.append((1 if f.ndim == 1 else len(f), f.shape[-1]))
            return super().search(features, k, **kw)

    hits = [("dermnet:x", "Psoriasis", 0.9), ("dermnet:y", "Eczema", 0.8)]
    paths = _images(tmp_path, 6)
    cases = [Case(p.stem, p) for p in paths]

    def make():
        xception, effnet = Recording(hits), Recording([("dermnet:z", "Psoriasis", 0.95)])
        return Agent(backends=backends(modality_heads=modality_heads("clinical"), cases=xception, expert_cases=effnet,
                                       second_expert=FakeSecondExpert(), fusion=no_llm_fusion())), xception, effnet  # fmt: skip

    (seq_agent, _, seq_effnet), (bat_agent, bat_xception, bat_effnet) = make(), make()
    seq = _run(tmp_path, "seq", cases, seq_agent, None)
    bat = _run(tmp_path, "bat", cases, bat_agent, batch_size=4)
    assert seq == bat and all(r["status"] == "ok" for r in seq)
    assert all({e["id"] for e in r["diagnosis"]["evidence"] if e["kind"] == "case"} == {"case:dermnet:z"} for r in bat)
    assert seq_effnet.queries == [(1, 8)] * 6
    assert bat_effnet.queries == [(4, 8), (2, 8)]  # one query matrix per micro-batch, the expert's 8-wide features
    assert bat_xception.queries == [] and "cases" not in bat_agent.runtime.__dict__  # the dermoscopy index: never searched, never wrapped
    assert bat_agent.runtime.expert_cases.misses == 0 and bat_agent.runtime.expert_cases.hits == 6


def test_default_micro_batch_is_16_unless_a_cpu_runs_the_llm(tmp_path):
    """Without --batch-size: micro-batches of 16 (faster on a 2-core CPU too, README Performance), except per case on a CPU
    under a configuration that calls the LLM, whose batched calls were slower there."""
    from agent.batched import config_calls_llm, default_batch_size
    from agent.config import AgentConfig

    assert (default_batch_size("cpu"), default_batch_size("cuda"), default_batch_size("cuda:1", True), default_batch_size("cpu", True)) == (16, 16, 16, 1)
    assert not config_calls_llm(AgentConfig()) and config_calls_llm(AgentConfig.model_validate({"reasoner": {"llm_summary": True}}))
    cases = [Case(p.stem, p) for p in _images(tmp_path, 3)]
    plain = batched_case_diagnose(Agent(backends=backends(fusion=no_llm_fusion())), cases)
    assert plain.batched_agent.batch_size == 16
    with_llm = batched_case_diagnose(Agent(backends=backends(fusion=fusion_model())), cases)  # this double fuses the LLM
    assert not hasattr(with_llm, "batched_agent")


def test_a_resumed_batch_prefetches_only_the_cases_still_to_do(tmp_path):
    class Counting(FakeClassifier):
        encoded = 0

        def predict(self, images, metadata=None):
            Counting.encoded += len(images)
            return super().predict(images, metadata)

    cases = [Case(p.stem, p) for p in _images(tmp_path, 10)]
    out = tmp_path / "run.jsonl"
    agent = Agent(backends=backends(classifier=Counting(), fusion=no_llm_fusion()))
    run_batch(cases[::2], out, batched_case_diagnose(agent, cases[::2], 4), progress=False)  # every other case done
    Counting.encoded = 0
    agent = Agent(backends=backends(classifier=Counting(), fusion=no_llm_fusion()))
    stats = run_batch(cases, out, batched_case_diagnose(agent, cases, 4), resume=True, progress=False)
    assert (stats["skipped"], stats["ok"]) == (5, 5)
    assert Counting.encoded == 5  # micro-batches of the 5 cases without records (4 + 1), none of the done ones
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == sorted(c.id for c in cases) and len(ids) == len(set(ids))
