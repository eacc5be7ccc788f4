"""Morphology describer: structured 7-point findings for dermoscopy, or a VLM description by config."""

from __future__ import annotations

import numpy as np

from agent.nodes.base import NodeOutput
from agent.runtime import Backends
from agent.state import CaseState, Finding, MorphologyResult
from models.vocabulary import HAM_CLASSES, SEVEN_POINT, SEVEN_POINT_PHRASES, SEVEN_POINT_SCORING, parse_findings


def seven_point_score(findings: list[Finding]) -> int:
    """7-point checklist score (Argenziano 1998) of the predicted findings; >= 3 suggests melanoma."""
    return sum(SEVEN_POINT_SCORING.get((f.criterion, f.value), 0) for f in findings)


def verbalise(findings: list[Finding], min_confidence: float = 0.0) -> str:
    """Turn findings into a short clinical description with per-finding confidence."""
    present = [f for f in findings if f.value not in ("absent",)]
    absent = [f for f in findings if f.value == "absent"]
    parts = []
    if present:
        parts.append(
            "Dermoscopy shows "
            + "; ".join(f"{SEVEN_POINT_PHRASES.get(f.criterion, {}).get(f.value, f.value)} (p={f.confidence:.2f})" for f in present)
            + "."
        )
    else:
        parts.append("Dermoscopy shows none of the seven-point structures with confidence.")
    if absent:
        parts.append(
            "Not seen: " + ", ".join(f"{SEVEN_POINT_PHRASES.get(f.criterion, {}).get('absent', f.criterion)} (p={f.confidence:.2f})" for f in absent) + "."
        )
    uncertain = [f.criterion.replace("_", " ") for f in findings if f.confidence < min_confidence]
    if uncertain:
        parts.append("Uncertain: " + ", ".join(uncertain) + ".")
    return " ".join(parts)


def _colour_summary(stats: np.ndarray | None) -> str:
    if stats is None:
        return ""
    r, g, b = float(stats[0]), float(stats[4]), float(stats[8])
    tone = "reddish" if r > g + 0.08 and r > b + 0.05 else "brownish" if r > b + 0.05 else "bluish/grey" if b >= r else "neutral"
    return f" Overall colour is {tone} (mean RGB {r:.2f}/{g:.2f}/{b:.2f})."


def _not_learned(state: CaseState, what_is_assessed: str) -> NodeOutput:
    """The result for a modality the describer was not trained on: no findings, and why."""
    modality = state.modality.label
    what = {
        "clinical": "a clinical photograph",
        "histopathology": "a histopathology (H&E) image",
    }.get(modality, "this image")
    limits = [
        f"the {what_is_assessed}; it has not learned {what}",
        "no structured morphology is reported, to avoid inventing findings",
    ]
    desc = f"Recognised as {what}. Structured morphology is not available for this modality.{_colour_summary(state.encoding.stats)}"
    result = MorphologyResult(findings=[], description=desc, limitations=limits)
    return NodeOutput({"morphology": result}, inputs={"modality": modality}, model_id=None, notes=["describer skipped: modality not learned"])


def _finding(criterion: str, probs: dict[str, float]) -> Finding:
    value = max(probs, key=probs.get)
    return Finding(criterion=criterion, value=value, confidence=round(float(probs[value]), 4), probs={c: round(float(v), 4) for c, v in probs.items()})


def describe_concepts(state: CaseState, rt: Backends) -> NodeOutput:
    modality = state.modality.label
    if not rt.config.route(modality).describer:
        return _not_learned(state, "shipped describer only assesses the seven dermoscopic 7-point criteria")
    if rt.config.morphology.kind == "second-expert" and state.encoding.expert_criteria:
        crit = state.encoding.expert_criteria
        findings = [_finding(c, crit[c]) for c in SEVEN_POINT if c in crit]
        return _findings_output(state, findings, 0.5, "the second visual expert's criteria heads", rt.second_expert.model_id)
    notes = ["the second visual expert gave no 7-point criteria: the concept heads describe"] if rt.config.morphology.kind == "second-expert" else []
    heads = rt.concept_heads
    if heads.feature_kind == "second-expert":
        if state.encoding.expert_features is None:
            raise ValueError(f"morphology.heads {rt.config.morphology.heads!r} reads the second visual expert's features, and this run has none "
                             "(set encoder.second_expert, or heads on the lesion encoder's features)")
        x, uses = np.asarray(state.encoding.expert_features), "the second visual expert's features"
    else:
        x, uses = np.asarray(state.encoding.features), "encoder features"
    probs = heads.predict_proba(x[None])
    findings = [_finding(c, dict(zip(head.classes, map(float, probs[c][0])))) for c, head in heads.heads.items()]
    return _findings_output(state, findings, float(heads.meta.get("min_confidence", 0.5)), uses, heads.meta.get("id"), notes)


def _findings_output(state: CaseState, findings: list[Finding], min_conf: float, uses: str, model_id: str | None, notes: list[str] | None = None) -> NodeOutput:
    result = MorphologyResult(
        findings=findings,
        description=verbalise(findings, min_conf),
        limitations=[f"criteria with confidence < {min_conf:.2f} are uncertain"] if any(f.confidence < min_conf for f in findings) else [],
        seven_point_score=seven_point_score(findings),
    )
    return NodeOutput({"morphology": result}, inputs={"modality": state.modality.label, "uses": uses}, model_id=model_id, notes=notes or [])


def describe_vlm(state: CaseState, rt: Backends) -> NodeOutput:
    cfg = rt.config.morphology
    prompt = cfg.vlm_prompt
    if state.question:
        prompt += f" Context from the user: {state.question}"
    vlm = rt.vlm
    kwargs = {}
    if getattr(vlm, "needs_features", False):
        # Feature-based describers (models.backends.feature_vlm) read the encoder's output, not pixels.
        if state.modality.label not in getattr(vlm, "modalities", (state.modality.label,)):
            return _not_learned(state, "feature VLM describer was trained on dermoscopy only")
        enc = state.encoding
        kwargs = {"features": np.asarray(enc.features)[None], "probs": np.array([[enc.classifier_probs.get(c, 0.0) for c in HAM_CLASSES]])}
    text = vlm.generate([state.image], [prompt], max_new_tokens=160, **kwargs)[0].strip()
    parsed = parse_findings(text)
    findings = [Finding(criterion=c, value=v, confidence=0.5) for c, v in parsed.items()]
    limits = ["free-text VLM description: findings parsed from text, confidences not calibrated"]
    if not text:
        limits.append("the VLM returned an empty description")
    result = MorphologyResult(
        findings=findings,
        description=text or "No description produced.",
        limitations=limits,
        seven_point_score=seven_point_score(findings) if findings else None,
    )
    used = vlm.prompt_used(prompt) if hasattr(vlm, "prompt_used") else prompt
    inputs = {"prompt": used, **({"uses": "encoder features"} if kwargs else {})}
    return NodeOutput({"morphology": result}, inputs=inputs, model_id=vlm.model_id)


def describe(state: CaseState, rt: Backends) -> NodeOutput:
    """Dispatch on config: the concept heads (default) or the second expert's criteria heads, or a VLM."""
    if rt.config.morphology.kind == "vlm":
        return describe_vlm(state, rt)
    return describe_concepts(state, rt)
