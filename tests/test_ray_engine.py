"""``dermgraph batch --engine ray``: a local Ray runtime (loopback, 2 CPUs) gives the local engine's records."""

import json
from pathlib import Path

import pytest

from agent.batch import Case, run_batch
from agent.batched import batched_case_diagnose
from tests.test_batched import VaryingClassifier, _images, _strip, no_llm_fusion

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

OVERRIDES = ["verifier.target_accuracy={dermoscopy: 0.8}"]


def double_agent(config):
    """Agent with test doubles (module level: Ray pickles it by reference)."""
    from agent import Agent
    from agent.testing import backends

    return Agent(config, backends=backends(classifier=VaryingClassifier(), fusion=no_llm_fusion()))


@pytest.fixture(scope="module")
def local_ray():
    here = Path(__file__).resolve().parent
    # pytest imports this file as a top-level module (tests/ has no __init__): workers need both folders on their path.
    path = f"{here.parent}:{here}"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}}, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


def test_ray_engine_gives_local_records_and_resumes(tmp_path, local_ray):
    from agent.config import load_config
    from agent.ray_engine import run_ray_batch

    paths = _images(tmp_path, 15)
    (tmp_path / "broken.jpg").write_text("not an image")
    cases = [Case(p.stem, p, metadata={"age": 50} if i % 2 else {}) for i, p in enumerate(paths)]
    cases.insert(5, Case("broken", tmp_path / "broken.jpg"))
    config = load_config(None, OVERRIDES)

    local_out = tmp_path / "local.jsonl"
    # Batch size 1 on both sides: a batched forward's float noise depends on which cases share a batch, and a resumed
    # run groups them differently (tests/test_batched.py compares batched with sequential on fixed batches).
    run_batch(cases, local_out, batched_case_diagnose(double_agent(config), cases, 1), progress=False)
    local = [_strip(json.loads(line)) for line in local_out.read_text().splitlines()]

    ray_out = tmp_path / "ray.jsonl"
    # A first run over 6 cases, then a resumed run over all 16: finished ids are skipped.
    run_ray_batch(cases[:6], ray_out, config, actors=2, batch_size=1, agent_factory=double_agent, progress=False)
    stats = run_ray_batch(cases, ray_out, config, resume=True, actors=2, batch_size=1, agent_factory=double_agent, progress=False)
    got = [_strip(json.loads(line)) for line in ray_out.read_text().splitlines()]
    assert stats["skipped"] == 6 and stats["ok"] + stats["error"] == 10
    # Everything a user reads is equal; ``versions`` and trace metadata describe the process that ran the case
    # (a Ray worker starts fresh, the local engine runs after the rest of the suite in this process).
    def decisions(r):
        d = r.get("diagnosis") or {}
        return {k: v for k, v in r.items() if k != "diagnosis"} | {k: v for k, v in d.items() if k not in ("versions", "trace")}

    assert len(got) == 16 and [decisions(r) for r in got] == [decisions(r) for r in local]
    assert [r["status"] for r in got].count("error") == 1
    with pytest.raises(FileExistsError):
        run_ray_batch(cases, ray_out, config, agent_factory=double_agent, progress=False)
