"""Consistency verifier: accept only what the calibration says it can stand behind; send real
disagreements back to the reasoner; otherwise abstain and say what would resolve the case.

Acceptance is risk-controlled: the fusion artifact's acceptance model scores the probability that the
top label is right from every signal (fused confidence, margin, prediction-set size, expert agreement,
the findings model), and the case is accepted only when that score reaches the SGR threshold
(Geifman & El-Yaniv 2017) for the modality's ``verifier.target_accuracy``: on the calibration data the
accuracy of accepted cases then meets the target with probability >= 1 - ``risk_delta``.
"""

from __future__ import annotations

import math

from agent.consistency import contradictions, morphology_agreement, self_consistency
from agent.nodes.base import NodeOutput
from agent.nodes.encode import second_expert_head
from agent.runtime import Backends
from agent.state import CaseState, ReasoningStep, Verdict
from agent.steps import observed_findings

REFER = "refer to a dermatologist"


def _abstain(reasons: list[str], confidence: float = 0.0, consistency: float = 0.0, agreement=None, score=None, resolve: str | None = None, **extra) -> Verdict:
    text = "Abstained: " + "; ".join(reasons) + f". Recommendation: {REFER}."
    if resolve:
        text += f" What would help: {resolve}."
    return Verdict(decision="abstain", confidence=confidence, self_consistency=consistency, morphology_agreement=agreement, consistency_score=score,
                   reasons=reasons + [REFER], step=ReasoningStep(kind="verdict", text=text, data={"decision": "abstain", **extra}), **_scores(extra))  # fmt: skip


def _scores(extra: dict) -> dict:
    return {k: extra[k] for k in ("acceptance_score", "acceptance_threshold", "target_accuracy") if k in extra}


def trained_consistency(state: CaseState, rt: Backends) -> tuple[float | None, float | None, str | None]:
    """(P(consistent), threshold, model id) from the trained verifier, or Nones when it is not configured
    or cannot score this case (no findings, or a diagnosis it has no expected findings for)."""
    cfg = rt.config.verifier
    if cfg.consistency_model is None or not (state.morphology and state.morphology.findings):
        return None, None, None
    model = rt.consistency_model
    top = state.reasoning.top
    observed = {f.criterion: f.probs for f in state.morphology.findings if f.probs}
    expert = state.encoding.classifier_probs.get(top.label) if state.encoding is not None else None
    score = model.score(observed, top.label, expert)
    if score is None:
        return None, None, None
    threshold = cfg.consistency_threshold if cfg.consistency_threshold is not None else model.threshold
    return score, threshold, model.model_id


def _resolution(state: CaseState, names: dict[str, str]) -> str:
    """What would let the agent (or a reader) decide an abstained case."""
    r = state.reasoning
    mod = state.modality.label
    if mod == "clinical":
        return "a dermoscopic image of the lesion (the clinical-photo path is not calibrated to the target accuracy), or a dermatologist's examination"
    if len(r.prediction_set) > 1:
        return "distinguishing " + " from ".join(names.get(c, c) for c in r.prediction_set[:3]) + " needs a dermatologist's examination or a biopsy"
    return "a dermatologist's examination (the experts do not agree with enough confidence)"


def verify(state: CaseState, rt: Backends) -> NodeOutput:
    from models.stacker import acceptance_features, top_candidate
    from models.tta import tta_agreement

    cfg = rt.config.verifier
    mod = state.modality
    if mod is None or mod.rejected:
        verdict = _abstain([f"image rejected: {mod.reason if mod else 'unreadable'}"], resolve="a sharp, well-lit image of the skin lesion")
        return NodeOutput({"verification": verdict}, inputs={"modality": mod.label if mod else None})
    if state.reasoning is None:
        verdict = _abstain([f"no diagnosis model for {mod.label} images; findings and evidence are reported for a specialist"],
                           resolve="review by a dermatopathologist" if mod.label == "histopathology" else None)  # fmt: skip
        return NodeOutput({"verification": verdict}, inputs={"modality": mod.label})

    r = state.reasoning
    top = r.top
    names = {d.label: d.name for d in r.differential}
    consistency = self_consistency(top.label, r.samples[1:])
    observed = observed_findings(state)
    agreement, contra = None, []
    entry = rt.knowledge.entry_for_label(top.label)
    if observed and entry is not None and entry.expected_7pt:
        agreement = morphology_agreement(observed, entry.expected_7pt)
        contra = contradictions(observed, entry.expected_7pt, threshold=cfg.min_morphology_agreement)

    model = rt.fusion
    mf = model.modalities.get(mod.label)
    target = cfg.target_accuracy.get(mod.label)
    inputs = {"top": top.label, "p": top.probability, "round": state.round, "samples": r.samples, "prediction_set": r.prediction_set}
    if mf is None or target is None or not len(mf.acceptance_kappa):
        why = f"no risk calibration for {mod.label} images" + ("" if target is not None else " (no target accuracy configured)")
        verdict = _abstain([why], top.probability, consistency, agreement, resolve=_resolution(state, names))
        return NodeOutput({"verification": verdict}, inputs=inputs, model_id="risk-control")

    tops = {e: (max(p, key=p.get) if p else None) for e, p in r.expert_probs.items() if e != "morphology"}
    probs = {d.label: d.probability for d in r.differential}
    # The second visual expert's agreement is a signal whether or not the stacker fuses it.
    second_top = top_candidate(second_expert_head(state, rt.config), list(probs))
    tta = tta_agreement(state.encoding.tta_probs if state.encoding else None, top.label, list(probs))
    signals = acceptance_features(probs, r.prediction_set, tops, r.expert_probs.get("morphology"), top.label, second_top, tta)
    score = mf.acceptance_score(signals)
    theta, info = mf.threshold(target, cfg.risk_delta)
    extra = {"acceptance_score": round(score, 4), "acceptance_threshold": None if math.isinf(theta) else round(theta, 4), "target_accuracy": target}
    problems = []
    if math.isinf(theta):
        problems.append(f"no acceptance threshold kept accepted {mod.label} cases ≥ {target:.0%} accurate on the calibration data (acceptance score {score:.2f})")
    elif score < theta:
        problems.append(f"acceptance score {score:.2f} below the threshold {theta:.2f} that keeps accepted {mod.label} cases ≥ {target:.0%} accurate")
    if mod.confidence < rt.config.modality.min_confidence:
        problems.append(f"modality uncertain (p={mod.confidence:.2f})")
    cscore, cthreshold, cmodel = trained_consistency(state, rt)
    if cscore is not None and cscore < cthreshold:
        problems.append(f"findings do not match {top.name} (P(consistent) {cscore:.2f} < {cthreshold:.2f}, {cmodel})")
        contra = contra or [f"the findings fit {top.name} poorly (P(consistent)={cscore:.2f})"]

    llm_top = max(r.llm_probs, key=r.llm_probs.get) if r.llm_probs else None
    disagreement = llm_top is not None and llm_top != top.label
    # A revision can only change the answer where the LLM (which reads the feedback) is one of the fused experts.
    can_revise = "llm" in mf.experts
    if not problems:
        text = (f"Accepted {top.name} (p={top.probability:.2f}): acceptance score {score:.2f} ≥ {theta:.2f}, the threshold at which accepted "
                f"{mod.label} cases reached {target:.0%} accuracy on calibration data ({info.get('accepted')} of {info.get('n')} accepted).")  # fmt: skip
        verdict = Verdict(decision="accept", confidence=top.probability, self_consistency=consistency, morphology_agreement=agreement, consistency_score=cscore,
                          reasons=[text], step=ReasoningStep(kind="verdict", text=text, data={"decision": "accept", **extra}), **extra)  # fmt: skip
    elif can_revise and state.round < cfg.max_rounds and (disagreement or contra):
        why = []
        if contra:
            why.append("; ".join(contra))
        if disagreement:
            why.append(f"the language model prefers {names.get(llm_top, llm_top)} while the experts' fusion prefers {top.name}")
        feedback = f"{top.name} is questionable: {'; '.join(why)}. Weigh candidates whose expected morphology matches the findings."
        text = f"Sent back to the reasoner: {'; '.join(problems)}; {'; '.join(why)}."
        verdict = Verdict(decision="revise", confidence=top.probability, self_consistency=consistency, morphology_agreement=agreement, consistency_score=cscore,
                          reasons=problems, feedback=feedback, step=ReasoningStep(kind="verdict", text=text, data={"decision": "revise", **extra}), **extra)  # fmt: skip
    else:
        verdict = _abstain(problems, top.probability, consistency, agreement, cscore, resolve=_resolution(state, names), **extra)
    return NodeOutput({"verification": verdict}, inputs=inputs, model_id=cmodel or "risk-control")
