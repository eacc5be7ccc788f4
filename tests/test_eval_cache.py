"""Prediction cache: key stability, torn lines, import of ``dermgraph batch`` records."""

import json

from PIL import Image

from agent import Agent
from agent.batch import read_cases, run_batch
from agent.testing import backends
from evals.cache import AGENT, PredictionCache, case_key


def test_case_key_is_stable_and_sensitive():
    k = case_key("abc", "cfg1", None, {"age": 60, "sex": "M"})
    assert k == case_key("abc", "cfg1", "", {"sex": "male", "age": 60.0, "site": None})  # same inputs, normalised
    assert len({k, case_key("abd", "cfg1", None, {"age": 60, "sex": "M"}), case_key("abc", "cfg2", None, {"age": 60, "sex": "M"}),
                case_key("abc", "cfg1", "melanoma?", {"age": 60, "sex": "M"}), case_key("abc", "cfg1", None, {}),
                case_key("abc", "cfg1", None, {"age": 60, "sex": "M"}, kind="modality")}) == 6  # fmt: skip


def test_torn_last_line_is_ignored_then_cut_before_appending(tmp_path):
    root = tmp_path / "predictions"
    root.mkdir()
    (root / "main.jsonl").write_text(json.dumps({"key": "a", "status": "ok"}) + "\n" + '{"key": "b", "sta')
    cache = PredictionCache(root)
    assert len(cache) == 1 and "a" in cache and cache.get("b") is None
    cache.put("b", {"status": "ok"})
    lines = (root / "main.jsonl").read_text().splitlines()
    assert [json.loads(x)["key"] for x in lines] == ["a", "b"]
    other = PredictionCache(root, shard="worker-1")
    other.put("c", {"status": "ok"})
    assert len(PredictionCache(root)) == 3  # every shard is read


def test_import_batch_records_match_the_cases_keys(tmp_path):
    """Records written by ``dermgraph batch`` (same code path: run_batch + Agent.diagnose) are keyed from
    their own image hash, config and inputs, so a benchmark case with the same image and inputs hits them."""
    from evals.predictions import case_keys
    from evals.base import Benchmark, DatasetSpec, EvalCase, ProtocolContext

    for i, colour in enumerate([(150, 90, 70), (90, 60, 50), (200, 120, 100)]):
        Image.new("RGB", (40, 30), colour).save(tmp_path / f"c{i}.png")
    (tmp_path / "cases.csv").write_text("image,label,age,sex\nc0.png,mel,60,male\nc1.png,nv,,\nc2.png,nv,,\n")
    agent = Agent(backends=backends())
    out = tmp_path / "results.jsonl"
    cases = read_cases(tmp_path / "cases.csv")

    def diagnose(case):
        return json.loads(agent.diagnose(case.image, question=case.question, metadata=case.metadata or None).model_dump_json())

    run_batch(cases, out, diagnose, progress=False)
    with out.open("a") as f:
        f.write('{"id": "torn", "status": "o')  # a run still writing
    cache = PredictionCache(tmp_path / "eval" / "predictions")
    stats = cache.import_records(out, fingerprint=agent.config.fingerprint())
    assert stats == {"imported": 3, "accepted_other_config": 0, "already_cached": 0, "other_config": 0, "not_ok": 0}
    assert cache.import_records(out, fingerprint=agent.config.fingerprint())["already_cached"] == 3
    assert PredictionCache(tmp_path / "other").import_records(out, fingerprint="0000")["other_config"] == 3
    accepted = PredictionCache(tmp_path / "acc")
    assert accepted.import_records(out, fingerprint="0000", accept_configs=[agent.config.fingerprint()])["accepted_other_config"] == 3

    bench = Benchmark(name="t", task="diagnosis", dataset=DatasetSpec(path="cases.csv"))
    ecases = [EvalCase(id=c.id, image=c.image, label=c.label, metadata=c.metadata) for c in cases]
    ctx = ProtocolContext(bench=bench, cases=ecases, out_dir=tmp_path / "eval", cache=cache, agent_config=agent.config)
    keys = case_keys(ctx, AGENT, agent.config.fingerprint())
    assert all(cache.get(k)["diagnosis"]["image_sha256"] for k in keys)
    # the same image with other metadata is another case
    ctx.cases = [EvalCase(id="x", image=ecases[1].image, label="nv", metadata={"age": 30})]
    assert cache.get(case_keys(ctx, AGENT, agent.config.fingerprint())[0]) is None
