"""Review inside the graph: interrupt() with a typed request, Command(resume=...) with a validated decision."""

import pytest
from PIL import Image
from pydantic import ValidationError

from agent import Agent
from agent.review import NotAwaitingReview, ReviewDecision
from agent.testing import backends, concept_heads

NODES = ["encode", "modality", "morphology", "retrieve", "reason", "verify"]


def img(colour=(150, 90, 70)):
    return Image.new("RGB", (64, 48), colour)


@pytest.fixture
def store(tmp_path):
    return f"review.checkpointer={tmp_path / 'cases.sqlite'}"


def test_default_never_leaves_graph_and_output_unchanged(store):
    plain = Agent(backends=backends()).diagnose(img())
    assert [t.node for t in plain.trace] == NODES
    data = plain.model_dump(mode="json")
    assert not {"status", "case_id", "review_request", "review"} & set(data)
    # A persisted case with the default policy never pauses and gives the same answer.
    kept = Agent(backends=backends(), overrides=[store]).diagnose(img(), thread_id="case-1")
    assert kept.status == "complete" and [t.node for t in kept.trace] == NODES
    assert (kept.label, kept.verdict, kept.differential) == (plain.label, plain.verdict, plain.differential)


def test_pause_after_verify_then_edit_findings_reruns_and_records_diff(store):
    agent = Agent(backends=backends(), overrides=[store])
    d = agent.diagnose(img(), thread_id="c1", review="always")
    assert d.status == "awaiting_review" and d.case_id == "c1"
    req = d.review_request
    assert req.stage == "verify" and req.modality == "dermoscopy" and req.verdict == "accept"
    assert req.differential[0].label == "mel" and req.cited and set(req.cited) <= {e.id for e in d.evidence}
    veil = next(f for f in req.findings if f.criterion == "blue_whitish_veil")
    assert veil.value == "present" and 0 < veil.confidence <= 1 and veil.options == ["absent", "present"]
    assert [p.case_id for p in agent.pending()] == ["c1"]

    # A new process (new Agent) resumes it from the checkpointer.
    again = Agent(backends=backends(), overrides=[store])
    r = again.resume("c1", {"reviewer": "dr-a", "findings": {"blue_whitish_veil": "absent", "pigment_network": "typical"}, "note": "no veil"})
    nodes = [t.node for t in r.trace]
    assert nodes[:7] == NODES + ["review"] and nodes[7:10] == ["retrieve", "reason", "verify"]
    step = r.trace[6]
    assert step.model_id == "reviewer:dr-a" and any("blue_whitish_veil: present -> absent" in n for n in step.notes)
    rec = r.review.records[0]
    assert rec.reviewer == "dr-a" and rec.action == "edit" and rec.at is not None
    assert {(c.criterion, c.model, c.reviewer) for c in rec.changes} == {("blue_whitish_veil", "present", "absent"), ("pigment_network", "atypical", "typical")}
    # Retrieval, reasoner and verifier saw the reviewer's findings; the model's own morphology stays in the trace.
    assert "no blue-whitish veil" in [t for t in r.trace if t.node == "retrieve"][-1].outputs["retrieval"]["query"]
    assert r.trace[2].outputs["morphology"]["findings"][5]["value"] == "present"
    assert {f.criterion: f.value for f in r.findings}["blue_whitish_veil"] == "absent"
    # The corrected findings contradict melanoma: the findings model now favours a nevus and melanoma's fused probability drops.
    reasons = [t.outputs["reasoning"] for t in r.trace if t.node == "reason"]
    morph = reasons[-1]["expert_probs"]["morphology"]
    assert max(morph, key=morph.get) == "nv"
    p_mel = lambda x: next(d["probability"] for d in x["differential"] if d["label"] == "mel")  # noqa: E731
    assert p_mel(reasons[-1]) < p_mel(reasons[0])
    # where=verify: the updated answer comes back for sign-off
    assert r.status == "awaiting_review" and r.review_request.verdict == r.verdict


def test_override_is_recorded_next_to_the_models_differential(store):
    agent = Agent(backends=backends(), overrides=[store])
    agent.diagnose(img(), thread_id="c2", review="always")
    r = agent.resume("c2", ReviewDecision(reviewer="dr-b", diagnosis="nv", note="clinically a nevus"))
    assert r.status == "complete" and r.label == "mel" and r.differential[0].label == "mel"
    assert r.review.override == "nv" and r.final_label == "nv" and r.review.records[0].action == "override"
    assert any("overrides the model's mel" in x for x in r.reasons)
    assert [t.node for t in r.trace][-1] == "review"
    with pytest.raises(NotAwaitingReview):
        agent.resume("c2", {"reviewer": "dr-b"})
    assert agent.pending() == []


def test_confirm_ends_the_case(store):
    agent = Agent(backends=backends(), overrides=[store])
    agent.diagnose(img(), thread_id="c3", review="always")
    r = agent.resume("c3", {"reviewer": "dr-c", "diagnosis": "mel"})
    assert r.status == "complete" and r.verdict == "accept" and r.review.records[0].action == "confirm" and r.review.override is None


def test_pause_after_morphology_before_any_diagnosis(store):
    agent = Agent(backends=backends(), overrides=[store])
    d = agent.diagnose(img(), thread_id="c4", review={"when": "always", "where": "morphology"})
    assert d.status == "awaiting_review" and d.verdict == "pending" and not d.differential
    assert [t.node for t in d.trace] == ["encode", "modality", "morphology"]
    assert d.review_request.stage == "morphology" and d.review_request.verdict is None
    r = agent.resume("c4", {"reviewer": "dr-d", "findings": {"blue_whitish_veil": "present"}})  # no change
    assert r.status == "complete" and [t.node for t in r.trace] == ["encode", "modality", "morphology", "review", "retrieve", "reason", "verify"]
    assert r.review.records[0].action == "confirm" and r.review.findings is None


def test_on_abstain_pauses_only_abstentions(store):
    agent = Agent(backends=backends(), overrides=[store, "review.when=on_abstain"])
    assert agent.diagnose(img()).status == "complete"
    strict = "verifier.target_accuracy={dermoscopy: 0.95}"  # findings against melanoma + a strict target: not accepted
    doubtful = Agent(backends=backends(concept_heads=concept_heads({"pigment_network": "typical"})), overrides=[store, "review.when=on_abstain", strict, "verifier.max_rounds=1"])
    d = doubtful.diagnose(img())
    assert d.status == "awaiting_review" and d.review_request.verdict == "abstain" and d.case_id


def test_on_revise_pauses_before_the_revision(store):
    b = backends(concept_heads=concept_heads({"pigment_network": "typical"}))
    agent = Agent(backends=b, overrides=[store, "verifier.target_accuracy={dermoscopy: 0.95}"])
    d = agent.diagnose(img(), thread_id="c5", review="on_revise")
    assert d.review_request.verdict == "revise" and [t.node for t in d.trace] == NODES
    r = agent.resume("c5", {"reviewer": "dr-e"})  # no edits: the revision round goes on
    assert [t.node for t in r.trace][6:9] == ["review", "reason", "verify"]


def test_decisions_are_validated(store):
    with pytest.raises(ValidationError, match="valid: absent, present"):
        ReviewDecision(reviewer="x", findings={"blue_whitish_veil": "maybe"})
    with pytest.raises(ValidationError, match="unknown criterion"):
        ReviewDecision(reviewer="x", findings={"veil": "absent"})
    with pytest.raises(ValidationError):
        ReviewDecision(reviewer="", findings={})
    with pytest.raises(ValidationError, match="at least 1 character"):  # whitespace is stripped before the length check
        ReviewDecision(reviewer="   ", findings={})
    assert ReviewDecision(reviewer="  dr-a ").reviewer == "dr-a"
    agent = Agent(backends=backends(), overrides=[store])
    agent.diagnose(img(), thread_id="c6", review="always")
    with pytest.raises(ValueError, match="unknown diagnosis"):
        agent.resume("c6", {"reviewer": "x", "diagnosis": "not-a-disease"})
    with pytest.raises(KeyError):
        agent.resume("nope", {"reviewer": "x"})
    for bad in ("../outside-the-store", "a/b", "", "x" * 65):
        with pytest.raises(ValueError, match="invalid case id"):
            agent.case(bad)
    with pytest.raises(ValueError, match="already exists"):
        agent.diagnose(img(), thread_id="c6", review="always")
    assert [p.case_id for p in agent.pending()] == ["c6"]  # the invalid resumes changed nothing


def test_checkpoints_hold_no_pixels(store, tmp_path):
    agent = Agent(backends=backends(), overrides=[store])
    agent.diagnose(img((201, 17, 133)), thread_id="c7", review="always")
    blob = b"".join(p.read_bytes() for p in tmp_path.glob("cases.sqlite*"))  # the database and its WAL
    assert b"IHDR" not in blob and b"PIL" not in blob
    assert agent.case("c7").review_request is not None


def test_stream_without_a_checkpointer_never_pauses(store):
    agent = Agent(backends=backends(), overrides=[store, "review.when=always"])
    events = list(agent.stream(img()))
    assert [e.node for e in events[:-1]] == NODES and events[-1].diagnosis.status == "complete"


def test_clinical_cases_have_no_findings_to_correct(store):
    from agent.testing import modality_heads

    agent = Agent(backends=backends(modality_heads=modality_heads("clinical")), overrides=[store])
    d = agent.diagnose(img(), thread_id="c8", review="always")
    assert d.review_request.findings == []
    with pytest.raises(ValueError, match="no 7-point findings"):
        agent.resume("c8", {"reviewer": "x", "findings": {"blue_whitish_veil": "absent"}})
    r = agent.resume("c8", {"reviewer": "x", "diagnosis": "Acne vulgaris"})
    assert r.status == "complete" and r.review.last.action == "confirm"


def test_postgres_needs_its_extra():
    import importlib.util

    from agent.persistence import open_checkpointer

    if importlib.util.find_spec("langgraph.checkpoint.postgres") is not None:
        pytest.skip("the postgres extra is installed")
    with pytest.raises(ImportError, match=r"dermgraph\[postgres\]"):
        open_checkpointer("postgresql://user@localhost/dermgraph")


@pytest.mark.skipif(not __import__("os").environ.get("DERMGRAPH_TEST_POSTGRES"), reason="set DERMGRAPH_TEST_POSTGRES=postgresql://... to test the Postgres store")
def test_postgres_store_pauses_and_resumes():
    import os
    import uuid

    url = os.environ["DERMGRAPH_TEST_POSTGRES"]
    case = "pg-" + uuid.uuid4().hex[:8]
    agent = Agent(backends=backends(), overrides=[f"review.checkpointer={url}"])
    d = agent.diagnose(img(), thread_id=case, review="always")
    assert d.status == "awaiting_review" and case in agent.case_ids() and case in [p.case_id for p in agent.pending()]
    again = Agent(backends=backends(), overrides=[f"review.checkpointer={url}"])
    r = again.resume(case, {"reviewer": "dr-pg", "findings": {"blue_whitish_veil": "absent"}})
    assert [t.node for t in r.trace][6] == "review" and r.review.records[0].changes[0].reviewer == "absent"


def test_a_run_that_stopped_midway_is_reported_incomplete(store):
    from agent.testing import TestLLM

    class Crash(TestLLM):
        def score_continuations(self, *a, **k):
            raise RuntimeError("worker died")

    with pytest.raises(RuntimeError):
        Agent(backends=backends(llm=Crash()), overrides=[store]).diagnose(img(), thread_id="c9", review="always")
    d = Agent(backends=backends(), overrides=[store]).case("c9")
    assert d.status == "incomplete" and d.verdict == "abstain" and "reason" in d.reasons[0]
    assert [t.node for t in d.trace] == ["encode", "modality", "morphology", "retrieve"]
