"""The second visual expert in the live agent: its heads in the encoding, its clinical candidates, its place in the fusion."""

import numpy as np
from PIL import Image

from agent import Agent
from agent.nodes.encode import dermnet_label_probs
from agent.testing import FakeCases, FakeKnowledge, FakeSecondExpert, backends, fusion_model, modality_heads


def img():
    return Image.new("RGB", (64, 48), (150, 90, 70))


def _with_effnet(model, modality: str, weight: float, extra: int = 0):
    """The fusion double with 'effnet' added to one modality's stacker (weight on its log-probabilities)."""
    mf = model.modalities[modality]
    mf.experts = list(mf.experts) + ["effnet"]
    if mf.kind == "conditional_logit":
        mf.coef = np.concatenate([mf.coef, [weight]])
        mf.meta["extra_candidates"] = extra
    else:
        C = len(mf.classes)
        mf.coef = np.concatenate([mf.coef, weight * np.eye(C)], axis=1)
        mf.centre["effnet"] = np.full(C, np.log(1.0 / C))
    return model


def test_dermnet_head_is_named_as_the_case_index_names_labels_and_merged_labels_add_up():
    got = dermnet_label_probs(["Melanoma", "Psoriasis", "melanoma"], [0.2, 0.5, 0.3], FakeKnowledge())
    assert got == {"mel": 0.5, "Psoriasis": 0.5}


def test_encoding_carries_both_heads_and_the_trace_names_both_models():
    second = FakeSecondExpert()
    state = Agent(backends=backends(second_expert=second)).run(img(), until="encode")
    heads = state.encoding.expert_probs
    assert second.calls == 1
    assert abs(heads["effnet"]["nv"] - 0.7) < 1e-6 and set(heads["effnet"]) == {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}
    assert heads["effnet_dermnet"] == {"Psoriasis": 0.6, "Eczema": 0.3, "mel": 0.1}
    assert state.trace[0].model_id == "fake-classifier+fake-second-expert"
    # No second expert configured: nothing run, nothing recorded.
    assert Agent(backends=backends()).run(img(), until="encode").encoding.expert_probs == {}


def test_findings_come_from_the_experts_criteria_heads_else_the_concept_heads_with_a_note():
    from agent.config import AgentConfig

    cfg = AgentConfig.model_validate({"morphology": {"kind": "second-expert"}})
    expert = FakeSecondExpert(criteria={"pigment_network": "typical", "streaks": "irregular"})  # the concept-head double: atypical network, veil
    state = Agent(cfg, backends=backends(second_expert=expert)).run(img(), until="morphology")
    assert state.encoding.expert_criteria["pigment_network"]["typical"] == 0.8
    found = {f.criterion: (f.value, f.confidence) for f in state.morphology.findings}
    assert found["pigment_network"] == ("typical", 0.8) and found["streaks"] == ("irregular", 0.8) and found["blue_whitish_veil"] == ("absent", 0.8)
    step = state.trace[-1]
    assert step.model_id == "fake-second-expert" and "criteria heads" in step.inputs["uses"] and not step.notes
    # The default (concept-heads) ignores the expert's criteria.
    by_heads = Agent(backends=backends(second_expert=expert)).run(img(), until="morphology")
    assert by_heads.trace[-1].model_id == "test-heads" and not by_heads.trace[-1].notes
    assert {f.criterion: f.value for f in by_heads.morphology.findings} != {c: v for c, (v, _) in found.items()}
    # An expert without criteria heads: the concept heads describe, and the trace says so.
    state = Agent(cfg, backends=backends(second_expert=FakeSecondExpert())).run(img(), until="morphology")
    assert state.encoding.expert_criteria == {} and state.morphology.findings == by_heads.morphology.findings
    assert state.trace[-1].model_id == "test-heads" and "concept heads describe" in state.trace[-1].notes[0]


def test_clinical_candidates_gain_the_experts_top_labels_and_its_vote_moves_the_fusion():
    cases = FakeCases([("dermnet:a", "Acne vulgaris", 0.9), ("dermnet:b", "Eczema", 0.6)])
    plain = Agent(backends=backends(modality_heads=modality_heads("clinical"), cases=cases)).diagnose(img())
    assert "Psoriasis" not in {x.label for x in plain.differential}

    model = _with_effnet(fusion_model(), "clinical", 2.0, extra=1)
    d = Agent(backends=backends(modality_heads=modality_heads("clinical"), cases=cases, second_expert=FakeSecondExpert(), fusion=model)).diagnose(img())
    labels = [x.label for x in d.differential]
    assert "Psoriasis" in labels and "mel" not in labels  # one extra candidate: the expert's top label the cases did not propose
    assert d.differential[0].label == "Psoriasis"  # the expert's weight carries it over the similar cases
    step = next(s for s in d.reasoning_steps if s.kind == "expert" and s.data["expert"] == "effnet")
    assert "second visual expert" in step.text and "expert:effnet" in step.evidence


def test_dermoscopy_reads_the_experts_ham_head_and_a_missing_expert_is_imputed():
    model = _with_effnet(fusion_model(), "dermoscopy", 3.0)
    with_it = Agent(backends=backends(second_expert=FakeSecondExpert(ham={"nv": 0.98, "mel": 0.01, "bkl": 0.01}), fusion=model)).diagnose(img())
    p_with = {x.label: x.probability for x in with_it.differential}
    without = Agent(backends=backends(fusion=_with_effnet(fusion_model(), "dermoscopy", 3.0))).diagnose(img())
    p_without = {x.label: x.probability for x in without.differential}
    assert p_with["nv"] > p_without["nv"]
    fusion_step = next(s for s in without.reasoning_steps if s.kind == "fusion")
    assert "second visual expert" in fusion_step.text  # named as not available


def test_the_evaluation_accepts_the_second_experts_citations_and_scores_it_alone():
    import json

    from evals.protocols.diagnosis import grounding, system_predictions

    cases = FakeCases([("dermnet:a", "Acne vulgaris", 0.9), ("dermnet:b", "Eczema", 0.6)])
    model = _with_effnet(fusion_model(), "clinical", 2.0, extra=1)
    d = Agent(backends=backends(modality_heads=modality_heads("clinical"), cases=cases, second_expert=FakeSecondExpert(), fusion=model)).diagnose(img())
    doc = json.loads(d.model_dump_json())
    g = grounding(doc, FakeKnowledge())
    assert g["citations_exist"] and not g["missing_citations"]
    assert system_predictions(doc)["effnet"][0] == "Psoriasis"


def test_the_llm_prompt_shows_the_second_expert_over_the_candidates_and_omits_the_line_without_it():
    from agent.testing import TestLLM

    def prompts(second):
        llm = TestLLM()
        Agent(backends=backends(second_expert=second, llm=llm, fusion=fusion_model())).diagnose(img())  # this fusion fuses the LLM: it is asked
        return [m["content"] for c in llm.calls for m in c["conversation"] if m["role"] == "user"]

    with_it = prompts(FakeSecondExpert(ham={"nv": 0.7, "mel": 0.2, "bkl": 0.1}))
    assert with_it and all("Second visual expert: " in p for p in with_it)
    line = next(ln for ln in with_it[0].splitlines() if ln.startswith("Second visual expert: "))
    shown = dict(part.rsplit(" ", 1) for part in line.removeprefix("Second visual expert: ").split(", "))
    assert list(shown.values())[0] == "0.70" and len(shown) <= 4  # renormalised over the candidates, most probable first
    assert not any("Second visual expert" in p for p in prompts(None))


def test_clinical_photos_find_similar_cases_with_the_second_experts_features_and_dermoscopy_keeps_the_classifiers():
    class Recording(FakeCases):
        def __init__(self, hits):
            super().__init__(hits)
            self.queries = []

        def search(self, features, k=8, **kw):
            self.queries.append(np.asarray(features).shape[-1])
            return super().search(features, k, **kw)

    hits = [("dermnet:x", "Psoriasis", 0.9), ("dermnet:y", "Eczema", 0.8)]
    xception, effnet = Recording(hits), Recording([("dermnet:z", "Psoriasis", 0.95)])
    second = FakeSecondExpert()  # pooled features of width 8; the classifier double's are wider
    d = Agent(backends=backends(modality_heads=modality_heads("clinical"), cases=xception, expert_cases=effnet, second_expert=second, fusion=fusion_model())).diagnose(img())
    assert effnet.queries == [8] and xception.queries == []
    cited = {e.id for e in d.evidence if e.kind == "case"}
    assert cited == {"case:dermnet:z"} and any("case-index-effnet" in (t.model_id or "") for t in d.trace if t.node == "retrieve")
    # Without the expert (or its index) the classifier's index answers, as before.
    xception.queries.clear()
    Agent(backends=backends(modality_heads=modality_heads("clinical"), cases=xception, expert_cases=effnet, fusion=fusion_model())).diagnose(img())
    assert xception.queries and len(effnet.queries) == 1
    xception.queries.clear()
    Agent(backends=backends(cases=xception, expert_cases=effnet, second_expert=second, fusion=fusion_model())).diagnose(img())  # dermoscopy
    assert xception.queries and len(effnet.queries) == 1


def test_a_fusion_artifact_fitted_on_other_findings_is_refused(tmp_path):
    """The findings model reads the describer's findings: an artifact fitted on the concept heads' refuses the
    second expert's criteria (and the other way round), naming the fix."""
    import pytest

    from agent.config import AgentConfig
    from agent.runtime import Runtime
    from agent.testing import fusion_model

    model = fusion_model()
    path = model.save(tmp_path / "fusion.json")  # no findings_from: fitted on the concept heads, as before the option
    ok = Runtime(AgentConfig.model_validate({"reasoner": {"fusion": str(path)}}))
    assert ok.fusion.morphology_expert is not None
    bad = Runtime(AgentConfig.model_validate({"reasoner": {"fusion": str(path)}, "morphology": {"kind": "second-expert"}}))
    with pytest.raises(ValueError, match="findings_from=effnet"):
        bad.fusion
    model.meta["findings_from"] = "effnet"
    model.save(path)
    assert Runtime(AgentConfig.model_validate({"reasoner": {"fusion": str(path)}, "morphology": {"kind": "second-expert"}})).fusion is not None


def test_a_fusion_artifact_fitted_on_other_concept_heads_is_refused(tmp_path):
    """Concept heads are swappable (morphology.heads): the artifact names the heads whose findings it was fitted on
    (none: the shipped heads), and other heads are refused."""
    import pytest

    from agent.config import AgentConfig
    from agent.runtime import Runtime
    from agent.testing import fusion_model

    model = fusion_model()
    path = model.save(tmp_path / "fusion.json")
    cfg = lambda heads: AgentConfig.model_validate({"reasoner": {"fusion": str(path)}, "morphology": {"heads": heads}})  # noqa: E731
    assert Runtime(cfg("derm7pt-concept-heads")).fusion is not None
    with pytest.raises(ValueError, match="findings_heads"):
        Runtime(cfg("my-heads")).fusion
    model.meta["findings_heads"] = "my-heads"
    model.save(path)
    assert Runtime(cfg("my-heads")).fusion is not None
    with pytest.raises(ValueError, match="'my-heads' but morphology.heads is 'derm7pt-concept-heads'"):
        Runtime(cfg("derm7pt-concept-heads")).fusion


def test_modality_is_the_mean_of_the_head_and_the_experts_modality_head():
    """The head (a double sure of dermoscopy, p = 0.88) and an expert sure of a clinical photo: with the expert's weight
    0.5 in the arithmetic mean (the previous default), clinical; weight 0 (today's default) gives the head alone; no
    expert modality head, the head alone."""
    from agent.config import AgentConfig

    expert = FakeSecondExpert(modality={"clinical": 0.98, "dermoscopy": 0.02})
    mean = AgentConfig.model_validate({"modality": {"second_expert_weight": 0.5, "combine": "arithmetic"}})
    state = Agent(mean, backends=backends(second_expert=expert)).run(img(), until="modality")
    assert state.encoding.expert_probs["effnet_modality"]["clinical"] == 0.98
    head = Agent(AgentConfig.model_validate({"modality": {"second_expert_weight": 0}}), backends=backends(second_expert=expert)).run(img(), until="modality")
    assert head.modality.label == "dermoscopy"
    p_head = head.modality.probs
    assert state.modality.label == "clinical"
    assert abs(state.modality.probs["clinical"] - (0.5 * p_head["clinical"] + 0.49)) < 1e-3
    assert "second visual expert's modality head" in state.trace[-1].inputs["uses"]
    plain = Agent(mean, backends=backends(second_expert=FakeSecondExpert())).run(img(), until="modality")
    assert plain.modality.probs == p_head and "second visual expert" not in plain.trace[-1].inputs["uses"]
    # The default: the geometric mean, the expert's share a third (no modality probe among these doubles: the head has the rest).
    default = Agent(backends=backends(second_expert=expert)).run(img(), until="modality")
    ph = np.array([p_head[c] for c in ("clinical", "dermoscopy")])
    want = ph ** (2 / 3) * np.array([0.98, 0.02]) ** (1 / 3)
    assert default.trace[-1].inputs["opinions"]["second_expert"]["clinical"] == 0.98
    assert abs(default.modality.probs["clinical"] / default.modality.probs["dermoscopy"] - want[0] / want[1]) < 0.02 * want[0] / want[1]


def _expert_feature_heads(values: dict[str, str]):
    """Concept heads that read the second expert's pooled features (FakeSecondExpert's are 8-dimensional)."""
    from agent.testing import constant_heads
    from models.vocabulary import SEVEN_POINT

    heads = constant_heads({c: (vals, values.get(c, "absent")) for c, vals in SEVEN_POINT.items()}, 8)
    heads.meta["features"] = "second-expert"
    return heads


def test_concept_heads_on_the_second_experts_features_describe_from_them():
    heads = _expert_feature_heads({"pigment_network": "atypical"})
    state = Agent(backends=backends(concept_heads=heads, second_expert=FakeSecondExpert())).run(img(), until="morphology")
    found = {f.criterion: f.value for f in state.morphology.findings}
    assert found["pigment_network"] == "atypical" and found["streaks"] == "absent"
    step = [t for t in state.trace if t.node == "morphology"][0]
    assert step.inputs["uses"] == "the second visual expert's features"
    # Without a second expert there are no such features: a clear error, not findings from the wrong encoder.
    import pytest

    with pytest.raises(ValueError, match="reads the second visual expert's features"):
        Agent(backends=backends(concept_heads=heads)).run(img(), until="morphology")


def test_head_sets_say_whose_features_they_read_and_refuse_unknown_kinds(tmp_path):
    import pytest

    heads = _expert_feature_heads({})
    heads.save(tmp_path / "h.safetensors")
    from models.heads import HeadSet

    assert HeadSet.load(tmp_path / "h.safetensors").feature_kind == "second-expert"
    heads.meta.pop("features")
    assert heads.feature_kind == "lesion-encoder"  # artifacts from before the field
    heads.meta["features"] = "clip"
    with pytest.raises(ValueError, match="valid: lesion-encoder, second-expert"):
        heads.feature_kind


def test_the_shipped_heads_on_the_experts_features_read_its_1280_dimensional_features():
    from models.heads import HeadSet
    from models.resolve import resolve

    hs = HeadSet.load(resolve("derm7pt-concept-heads-effnet"))
    assert hs.feature_kind == "second-expert" and hs.mean.shape == (1280,) and len(hs.heads) == 7
    assert hs.meta["metrics"]["val"]["mean"]["macro_f1"] > HeadSet.load(resolve("derm7pt-concept-heads")).meta["metrics"]["val"]["mean"]["macro_f1"]
    assert HeadSet.load(resolve("derm7pt-concept-heads")).feature_kind == "lesion-encoder"
