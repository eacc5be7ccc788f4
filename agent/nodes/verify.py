"""Consistency verifier: accept, send back to the reasoner with the disagreement, or abstain."""

from __future__ import annotations

from agent.consistency import contradictions, morphology_agreement, self_consistency
from agent.nodes.base import NodeOutput
from agent.runtime import Backends
from agent.state import CaseState, Verdict

REFER = "refer to a dermatologist"


def _abstain(reasons: list[str], confidence: float = 0.0, consistency: float = 0.0, agreement=None, score=None) -> Verdict:
    return Verdict(decision="abstain", confidence=confidence, self_consistency=consistency, morphology_agreement=agreement, consistency_score=score, reasons=reasons + [REFER])


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


def verify(state: CaseState, rt: Backends) -> NodeOutput:
    cfg = rt.config.verifier
    mod = state.modality
    if mod is None or mod.rejected:
        verdict = _abstain([f"image rejected: {mod.reason if mod else 'unreadable'}"])
        return NodeOutput({"verification": verdict}, inputs={"modality": mod.label if mod else None})
    if state.reasoning is None:
        verdict = _abstain([f"no diagnosis model for {mod.label} images; findings and evidence are reported for a specialist"])
        return NodeOutput({"verification": verdict}, inputs={"modality": mod.label})

    r = state.reasoning
    top = r.top
    consistency = self_consistency(top.label, r.samples[1:])
    agreement, contra = None, []
    if state.morphology and state.morphology.findings:
        entry = rt.knowledge.entry_for_label(top.label)
        if entry is not None and entry.expected_7pt:
            observed = {f.criterion: f.probs for f in state.morphology.findings}
            agreement = morphology_agreement(observed, entry.expected_7pt)
            contra = contradictions(observed, entry.expected_7pt)

    score, threshold, model_id = trained_consistency(state, rt)
    problems = []
    if top.probability < cfg.accept_confidence:
        problems.append(f"low confidence in {top.name} (p={top.probability:.2f} < {cfg.accept_confidence})")
    min_consistency = cfg.min_self_consistency_by_modality.get(mod.label, cfg.min_self_consistency)
    if consistency < min_consistency:
        problems.append(f"sampled answers disagree with {top.label} (consistency {consistency:.2f} < {min_consistency}; samples {r.samples[1:]})")
    if score is not None:
        # The trained score replaces the rule score; rule contradictions only phrase the feedback.
        morphology_problem = score < threshold
        if morphology_problem:
            problems.append(f"findings do not match {top.name} (P(consistent) {score:.2f} < {threshold:.2f}, {model_id})")
            contra = contra or [f"the findings fit {top.name} poorly (P(consistent)={score:.2f})"]
        else:
            contra = []
    elif agreement is not None and agreement < cfg.min_morphology_agreement:
        problems.append(f"findings do not match {top.name} (agreement {agreement:.2f} < {cfg.min_morphology_agreement})")
    if mod.confidence < rt.config.modality.min_confidence:
        problems.append(f"modality uncertain (p={mod.confidence:.2f})")

    inputs = {"top": top.label, "p": top.probability, "round": state.round, "samples": r.samples}
    if not problems:
        summary = f"{top.name}: p={top.probability:.2f}, consistency {consistency:.2f}"
        if agreement is not None:
            summary += f", morphology agreement {agreement:.2f}"
        if score is not None:
            summary += f", P(consistent) {score:.2f}"
        verdict = Verdict(decision="accept", confidence=top.probability, self_consistency=consistency, morphology_agreement=agreement, consistency_score=score, reasons=[summary])
    elif state.round < cfg.max_rounds and (contra or consistency < min_consistency):
        feedback = "; ".join(contra) if contra else "the ranking is unstable under re-ordering of the evidence"
        verdict = Verdict(decision="revise", confidence=top.probability, self_consistency=consistency, morphology_agreement=agreement, consistency_score=score,
                          reasons=problems, feedback=f"{top.name} is questionable: {feedback}. Weigh candidates whose expected morphology matches the findings.")  # fmt: skip
    else:
        verdict = _abstain(problems, top.probability, consistency, agreement, score)
    return NodeOutput({"verification": verdict}, inputs=inputs, model_id=model_id or "consistency-rules")
