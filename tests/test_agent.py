"""The graph end to end with test doubles: routing, node ownership, trace, fallback, verifier loop."""

import json

import numpy as np
import pytest
from PIL import Image

from agent import Agent
from agent.diagnosis import Diagnosis
from agent.testing import TestLLM, backends, modality_heads


def img(colour=(150, 90, 70)):
    return Image.new("RGB", (64, 48), colour)


def test_dermoscopy_case_is_accepted_with_cited_evidence():
    d = Agent(backends=backends()).diagnose(img(), metadata={"age": 60, "sex": "male", "site": "back"})
    assert d.modality.label == "dermoscopy"
    assert d.verdict == "accept" and d.label == "mel"
    assert abs(sum(x.probability for x in d.differential) - 1) < 1e-6
    assert [x.probability for x in d.differential] == sorted((x.probability for x in d.differential), reverse=True)
    evidence_ids = {e.id for e in d.evidence}
    assert d.cited and set(d.cited) <= evidence_ids
    assert "[kb:melanoma#checklist]" in d.rationale  # the knowledge step cites the passage it consulted
    assert [t.node for t in d.trace] == ["encode", "modality", "morphology", "retrieve", "reason", "verify"]
    assert [t.step for t in d.trace] == list(range(1, 7))
    assert all(t.duration_s >= 0 for t in d.trace)
    # each node writes only its own field
    assert set(d.trace[1].outputs) == {"modality"} and set(d.trace[4].outputs) == {"reasoning", "round"}


def test_json_round_trip_and_no_image_data():
    d = Agent(backends=backends()).diagnose(img())
    text = d.model_dump_json()
    again = Diagnosis.model_validate_json(text)
    assert again.model_dump() == d.model_dump()
    assert "thumbnail" not in json.loads(text) and '"features":' not in text and '"stats":' not in text
    assert "<img" in d._repr_html_()


def test_rejected_image_abstains_without_reasoning():
    b = backends(modality_heads=modality_heads("not_skin"))
    d = Agent(backends=b).diagnose(img())
    assert d.verdict == "abstain" and d.label is None
    assert any("refer to a dermatologist" in r for r in d.reasons)
    assert [t.node for t in d.trace] == ["encode", "modality", "verify"]
    assert b["llm"].scored == 0


def test_ood_features_are_rejected():
    d = Agent(backends=backends(modality_heads=modality_heads("dermoscopy", ood_threshold=-1.0))).diagnose(img())
    assert d.modality.rejected and "OOD" in d.modality.reason and d.verdict == "abstain"


def test_histopathology_gets_limitations_and_abstains():
    d = Agent(backends=backends(modality_heads=modality_heads("histopathology"))).diagnose(img())
    assert d.findings == [] and d.limitations
    assert d.verdict == "abstain"
    assert [t.node for t in d.trace] == ["encode", "modality", "morphology", "retrieve", "verify"]


def test_clinical_uses_clinical_neighbours_only():
    d = Agent(backends=backends(modality_heads=modality_heads("clinical"))).diagnose(img())
    assert [x.label for x in d.differential] == ["Acne vulgaris"]
    assert not d.findings


def test_real_disagreement_triggers_revision_then_bounded_rounds():
    # Findings say nevus (typical network, no veil); classifier, cases and LLM say melanoma; a strict target.
    from agent.testing import concept_heads

    b = backends(concept_heads=concept_heads({"pigment_network": "typical"}))
    agent = Agent(backends=b, overrides=["verifier.max_rounds=2", "verifier.target_accuracy={dermoscopy: 0.95}"])
    d = agent.diagnose(img())
    nodes = [t.node for t in d.trace]
    assert nodes.count("reason") == 2 and nodes.count("verify") == 2
    first_verdict = [t for t in d.trace if t.node == "verify"][0].outputs["verification"]
    assert first_verdict["decision"] == "revise" and "pigment network" in first_verdict["feedback"]
    # the revision feeds the feedback to the LLM prompt
    second_reason = [t for t in d.trace if t.node == "reason"][1]
    assert second_reason.inputs["feedback"]
    assert d.rounds == 2 and d.verdict in ("accept", "abstain")
    assert d.reasoning_steps[-1].kind == "verdict"


def test_findings_enter_the_decision_in_the_first_round():
    # Identical classifier/cases/LLM; only the findings differ: the fused melanoma probability moves with them.
    from agent.testing import concept_heads

    mel = Agent(backends=backends()).diagnose(img())
    nev = Agent(backends=backends(concept_heads=concept_heads({"pigment_network": "typical"}))).diagnose(img())
    p = lambda d: {x.label: x.probability for x in d.differential}["mel"]  # noqa: E731
    assert p(nev) < p(mel)
    first = [t for t in nev.trace if t.node == "reason"][0].outputs["reasoning"]
    assert first["round"] == 1 and "morphology" in first["expert_probs"]


def test_unusable_llm_output_falls_back_to_fusion_and_says_so():
    llm = TestLLM(["Candidates: melanoma; nevus", "{{{", "Image modality: dermoscopy"], scores=None)
    d = Agent(backends=backends(llm=llm)).diagnose(img())
    assert d.reasoner_source == "fallback"
    reason_trace = [t for t in d.trace if t.node == "reason"][0]
    assert any("fallback" in n or "unusable" in n for n in reason_trace.notes)
    assert d.differential and d.label == "mel"


def test_json_path_for_chat_only_backends():
    reply = '{"diagnosis": "melanocytic nevus", "differential": {"melanocytic nevus": 0.7, "melanoma": 0.3}, "rationale": "Regular structures [E2] favour a nevus over melanoma."}'
    d = Agent(backends=backends(llm=TestLLM([reply], scores=None))).diagnose(img())
    assert d.reasoner_source == "llm"
    reason_out = [t for t in d.trace if t.node == "reason"][0].outputs["reasoning"]
    assert reason_out["llm_probs"]["nv"] == pytest.approx(0.7)


def test_no_summary_by_default():
    llm = TestLLM()
    d = Agent(backends=backends(llm=llm)).diagnose(img())
    assert llm.chats == [] and d.summary_check is None and "Summary:" not in d.rationale


def test_unusable_summary_is_retried_then_left_out():
    llm = TestLLM(["Candidates: melanoma", "Image modality: x", "Give the most likely"])
    d = Agent(backends=backends(llm=llm), overrides=["reasoner.llm_summary=true"]).diagnose(img())
    assert len(llm.chats) == 3  # 1 + retries(2)
    assert d.rationale.startswith("Image modality") and "Summary:" not in d.rationale
    assert d.cited


def test_summary_failing_the_claim_check_is_withheld_and_traced():
    llm = TestLLM(["Melanoma is a type of benign keratosis with arborizing vessels [case:nowhere]."])
    d = Agent(backends=backends(llm=llm), overrides=["reasoner.llm_summary=true"]).diagnose(img())
    assert "Summary:" not in d.rationale and "type of benign keratosis" not in d.rationale
    assert d.summary_check is not None and not d.summary_check.passed
    kinds = {f.split(":")[0] for f in d.summary_check.failures}
    assert {"citation", "finding"} <= kinds
    assert any("claim check" in n for n in [t for t in d.trace if t.node == "reason"][0].notes)


def test_supported_summary_is_shown():
    llm = TestLLM(["The atypical pigment network and the blue-whitish veil fit melanoma [E1]."])
    d = Agent(backends=backends(llm=llm), overrides=["reasoner.llm_summary=true"]).diagnose(img())
    assert d.summary_check.passed and "Summary: The atypical pigment network" in d.rationale


def test_steps_cite_only_evidence_of_the_case():
    d = Agent(backends=backends()).diagnose(img())
    ids = {e.id for e in d.evidence} | {f"finding:{f.criterion}" for f in d.findings} | {f"expert:{e}" for e in ("classifier", "knn", "morphology", "llm")}
    kinds = [s.kind for s in d.reasoning_steps]
    assert kinds[0] == "observation" and kinds[-1] == "verdict" and {"knowledge", "expert", "fusion"} <= set(kinds)
    for step in d.reasoning_steps:
        assert set(step.evidence) <= ids, step
    assert d.prediction_set and d.prediction_set[0] == d.label and d.prediction_set_alpha == 0.1


def test_prediction_set_uses_the_threshold_of_the_images_calibration_group():
    from agent.testing import FEAT, fusion_model
    from models.stacker import SetGroups

    fm = fusion_model()
    mf = fm.modalities["dermoscopy"]
    n = len(mf.calibration_scores)
    mf.calibration_scores = np.where(np.arange(n) % 2 == 0, 1.0, 0.001)  # group "wide": every label; group "tight": top label only
    pooled = Agent(backends=backends(fusion=fm)).diagnose(img())
    assert pooled.prediction_set_group is None
    for bias, name, wide in ((5.0, "wide", True), (-5.0, "tight", False)):  # the group model's intercept decides the group here
        mf.set_groups = SetGroups(["tight", "wide"], np.zeros(FEAT), np.ones(FEAT), np.zeros((1, FEAT)), np.array([bias]), (np.arange(n) % 2 == 0).astype(int))
        d = Agent(backends=backends(fusion=fm)).diagnose(img())
        assert d.prediction_set_group == name and f"look like {name}'s" in d.prediction_set_calibration
        assert (len(d.prediction_set) == len(d.differential)) is wide and d.prediction_set[0] == d.label


def test_stream_yields_each_step_then_the_diagnosis():
    events = list(Agent(backends=backends()).stream(img()))
    assert [e.node for e in events[:-1]] == ["encode", "modality", "morphology", "retrieve", "reason", "verify"]
    assert events[-1].diagnosis is not None and len(events[-1].diagnosis.trace) == 6
    assert [e.entry.node for e in events[:-1]] == [t.node for t in events[-1].diagnosis.trace]
    d = Agent(backends=backends()).diagnose(img())
    assert events[-1].diagnosis.differential == d.differential and events[-1].diagnosis.rationale == d.rationale


def test_metadata_is_validated():
    with pytest.raises(Exception, match="extra|forbid|permitted"):
        Agent(backends=backends()).diagnose(img(), metadata={"agee": 3})


def test_self_consistency_uses_k_samples():
    llm = TestLLM()
    Agent(backends=backends(llm=llm), overrides=["reasoner.num_samples=4"]).diagnose(img())
    assert llm.scored == 4


def test_clinical_disagreement_abstains_and_says_what_would_help():
    # The LLM prefers something the retrieved cases do not: the acceptance score drops below the threshold.
    llm = TestLLM(scores={"Acne vulgaris": -5.0, "melanoma": -1.0})
    from agent.testing import FakeCases

    cases = FakeCases([("dermnet:a", "Acne vulgaris", 0.9), ("dermnet:b", "Acne vulgaris", 0.88), ("dermnet:c", "mel", 0.5)])
    d = Agent(backends=backends(modality_heads=modality_heads("clinical"), llm=llm, cases=cases)).diagnose(img())
    assert d.verdict == "abstain"
    assert "dermoscopic image" in d.reasoning_steps[-1].text
    ok = Agent(backends=backends(modality_heads=modality_heads("clinical"), llm=TestLLM(scores={"Acne vulgaris": -1.0}), cases=cases))
    assert ok.diagnose(img()).verdict == "accept"


def test_rendered_thumbnail_is_escaped_and_must_be_an_image_data_uri():
    from agent.diagnosis import Diagnosis
    from agent.render import diagnosis_html

    base = {"image_sha256": "0" * 64, "image_size": (8, 8), "verdict": "abstain"}
    evil = '" onerror="alert(1)'
    assert 'onerror="alert' not in diagnosis_html(Diagnosis(**base, thumbnail=evil))
    assert "<img" not in diagnosis_html(Diagnosis(**base, thumbnail="javascript:alert(1)"))
    good = "data:image/png;base64,iVBORw0KGgo="
    assert f'<img src="{good}"' in diagnosis_html(Diagnosis(**base, thumbnail=good))


def test_modality_without_calibration_abstains_and_says_so():
    from agent.testing import fusion_model

    fm = fusion_model()
    del fm.modalities["clinical"]
    with pytest.raises(ValueError, match="no stacker for 'clinical'"):
        Agent(backends=backends(modality_heads=modality_heads("clinical"), fusion=fm)).diagnose(img())
    d = Agent(backends=backends(), overrides=["verifier.target_accuracy={clinical: 0.85}"]).diagnose(img())
    assert d.verdict == "abstain" and any("no risk calibration for dermoscopy" in r for r in d.reasons)


def test_partial_runs_stop_where_asked_and_keep_the_routing():
    b = backends()
    agent = Agent(backends=b)
    state = agent.run(img(), until="morphology")
    assert [t.node for t in state.trace] == ["encode", "modality", "morphology"]
    assert state.morphology is not None and state.retrieval is None and b["llm"].scored == 0
    full = agent.diagnose(img())
    assert state.morphology.findings == full.findings and state.modality == full.modality
    # A rejected image ends the run at the modality node, as the whole graph skips the describer.
    rejected = Agent(backends=backends(modality_heads=modality_heads("not_skin"))).run(img(), until="morphology")
    assert [t.node for t in rejected.trace] == ["encode", "modality"] and rejected.verification is None
    with pytest.raises(ValueError, match="unknown node 'retrieval'; valid: encode, modality"):
        agent.run(img(), until="retrieval")


def test_a_run_can_start_from_given_encoder_outputs_and_leave_cases_out():
    agent = Agent(backends=backends())
    encoded = agent.run(img(), until="encode")
    state = encoded.model_copy(update={"exclude_cases": ["ham10000:a"]})
    after = agent.run(state, start_at="modality", until="retrieve")
    assert [t.node for t in after.trace] == ["encode", "modality", "morphology", "retrieve"]
    ids = [e.id for e in after.retrieval.evidence if e.kind == "case"]
    assert ids and "case:ham10000:a" not in ids
    assert "case:ham10000:a" in [e.id for e in agent.run(img(), until="retrieve").retrieval.evidence]


def test_unknown_backend_roles_are_rejected_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown backend role\(s\) 'lmm'; valid: classifier, .*llm"):
        Agent(backends={**backends(), "lmm": TestLLM()})


def test_routing_is_one_table_in_the_config():
    from agent.config import DEFAULT_ROUTING, AgentConfig

    table = {m: r.model_dump() for m, r in DEFAULT_ROUTING.items()}
    assert AgentConfig().route("dermoscopy").classifier and not AgentConfig().route("clinical").classifier
    # A clinical photo routed to no reasoner is described and retrieved, then the verifier abstains.
    table["clinical"]["reasoner"] = False
    cfg = AgentConfig.model_validate({"routing": table})
    b = backends(modality_heads=modality_heads("clinical"))
    d = Agent(cfg, backends=b).diagnose(img())
    assert [t.node for t in d.trace] == ["encode", "modality", "morphology", "retrieve", "verify"] and d.verdict == "abstain"
    assert b["llm"].scored == 0 and any(e.kind == "case" for e in d.evidence)
    # Dermoscopy without case retrieval: no case evidence, the rest unchanged.
    table["dermoscopy"]["case_sources"] = []
    d = Agent(AgentConfig.model_validate({"routing": table}), backends=backends()).diagnose(img())
    assert d.evidence and not any(e.kind == "case" for e in d.evidence)
    assert AgentConfig().fingerprint() == AgentConfig.model_validate({"routing": None}).fingerprint()
