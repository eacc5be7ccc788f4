"""The default agent with its real weights on real images from ../shared/data (marked; run in CI)."""

import json
import socket

import pytest

from agent.diagnosis import Diagnosis

pytestmark = [pytest.mark.weights, pytest.mark.data, pytest.mark.slow]

CASES = {
    "dermoscopy": ("isic2018_val", "images/ISIC_0034529.jpg"),
    "clinical": ("dermnet", None),
    "histopathology": ("histology", None),
}


def _first_image(root, source):
    import csv

    name = {"dermnet": "labels.csv", "histology": "labels.csv"}[source]
    with open(root / source / name, newline="") as f:
        return root / source / next(csv.DictReader(f))["image"]


@pytest.fixture(scope="module")
def agent():
    from agent import Agent

    return Agent(overrides=["reasoner.num_samples=1", "reasoner.rationale_tokens=16"])


@pytest.mark.parametrize("modality", list(CASES))
def test_default_agent_on_real_images(agent, shared_data, modality):
    source, rel = CASES[modality]
    path = shared_data / source / rel if rel else _first_image(shared_data, source)
    d = agent.diagnose(path)
    assert d.modality.label == modality
    assert [t.node for t in d.trace][:2] == ["encode", "modality"]
    assert all(t.model_id for t in d.trace if t.node in ("encode", "modality"))
    if modality == "dermoscopy":
        assert len(d.findings) == 7 and d.description.startswith("Dermoscopy")
        assert abs(sum(x.probability for x in d.differential) - 1) < 1e-6
        assert d.cited and set(d.cited) <= {e.id for e in d.evidence}
        assert any(e.kind == "case" for e in d.evidence) and any(e.kind == "knowledge" for e in d.evidence)
    elif modality == "histopathology":
        assert d.verdict == "abstain" and not d.findings and d.limitations
    else:
        assert d.differential and not d.findings
    again = Diagnosis.model_validate_json(d.model_dump_json())
    assert again.label == d.label and len(again.trace) == len(d.trace)


def test_diagnose_works_offline_once_weights_are_cached(agent, shared_data, no_network):
    from agent import Agent

    # `agent` (module fixture) has already cached every weight; a fresh agent must load them with sockets blocked.
    fresh = Agent(overrides=["reasoner.num_samples=1", "reasoner.rationale_tokens=16"])
    d = fresh.diagnose(shared_data / "isic2018_val" / CASES["dermoscopy"][1])
    with pytest.raises(OSError):
        socket.create_connection(("203.0.113.1", 80), timeout=1)
    assert d.label is not None
    json.loads(d.model_dump_json())
