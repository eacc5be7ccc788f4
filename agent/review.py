"""Clinician in the loop: the ``review`` node pauses a case with LangGraph's ``interrupt()`` and resumes
it with a validated :class:`ReviewDecision` sent as ``Command(resume=...)``.

Edited findings replace the model's findings for the nodes that run after the review (retrieval,
reasoner, verifier: :func:`reviewed_view`); the model's own ``morphology`` and differential stay in
the state untouched, and an overriding diagnosis is recorded next to them, never in their place.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agent.nodes.base import NodeOutput
from agent.state import CaseState, DifferentialItem, Finding, FindingChange, ReviewLog, ReviewRecord  # noqa: F401
from models.vocabulary import SEVEN_POINT

When = Literal["never", "always", "on_abstain", "on_revise"]
Where = Literal["morphology", "verify"]


class NotAwaitingReview(ValueError):
    """The case exists but is not paused for review (finished, or never paused)."""


class ReviewFinding(BaseModel):
    criterion: str
    value: str
    confidence: float | None = Field(None, description="The model's confidence in its value (None for a reviewer's value).")
    options: list[str] = Field(default_factory=list, description="Values the reviewer may choose from (the 7-point vocabulary).")


class ReviewRequest(BaseModel):
    """What a reviewer is shown when a case pauses (the ``interrupt()`` payload)."""

    case_id: str
    stage: Where = Field(description="Where the case paused: after 'morphology' (before any diagnosis) or after 'verify'.")
    modality: str | None = None
    modality_confidence: float | None = None
    findings: list[ReviewFinding] = Field(default_factory=list)
    description: str = ""
    differential: list[DifferentialItem] = Field(default_factory=list)
    verdict: Literal["accept", "revise", "abstain"] | None = None
    reasons: list[str] = Field(default_factory=list)
    cited: list[str] = Field(default_factory=list, description="Evidence ids the rationale cites.")
    rationale: str = ""
    question: str | None = None
    image_sha256: str = ""
    policy: dict[str, Any] = Field(default_factory=dict, description="The review policy the case runs under (applied again on resume).")


class ReviewDecision(BaseModel):
    """A reviewer's answer (the ``Command(resume=...)`` value). Findings are validated against the 7-point vocabulary."""

    model_config = ConfigDict(extra="forbid")

    reviewer: str = Field(min_length=1, max_length=120, description="Who reviewed (an id, not a name, where possible).")
    findings: dict[str, str] = Field(default_factory=dict, description="Corrected findings: criterion -> value.")
    diagnosis: str | None = Field(None, max_length=120, description="Confirmed (= the model's top label) or overriding diagnosis code.")
    note: str | None = Field(None, max_length=4000)

    @field_validator("findings")
    @classmethod
    def _vocabulary(cls, v: dict[str, str]) -> dict[str, str]:
        for criterion, value in v.items():
            if criterion not in SEVEN_POINT:
                raise ValueError(f"unknown criterion {criterion!r}; valid: {', '.join(SEVEN_POINT)}")
            if value not in SEVEN_POINT[criterion]:
                raise ValueError(f"{criterion}: unknown value {value!r}; valid: {', '.join(SEVEN_POINT[criterion])}")
        return v

    @field_validator("reviewer", "diagnosis", "note", mode="before")  # before the length checks: a blank reviewer is no reviewer
    @classmethod
    def _strip(cls, v: str | None) -> str | None:
        return v.strip() if isinstance(v, str) else v


def effective_findings(state: CaseState) -> list[Finding]:
    if state.review is not None and state.review.findings is not None:
        return state.review.findings
    return state.morphology.findings if state.morphology else []


def reviewed_view(state: CaseState) -> CaseState:
    """The state as the nodes after a review see it: the reviewed findings in place of the model's.

    A copy; the stored state keeps the model's own ``morphology``."""
    if state.review is None or state.review.findings is None or state.morphology is None:
        return state
    from agent.nodes.morphology import seven_point_score, verbalise

    findings = state.review.findings
    morph = state.morphology.model_copy(
        update={
            "findings": findings,
            "description": verbalise(findings) + " (findings confirmed or corrected by a reviewer)",
            "seven_point_score": seven_point_score(findings),
        }
    )
    return state.model_copy(update={"morphology": morph})


def build_request(state: CaseState, case_id: str, stage: Where, pol: dict[str, Any] | None = None) -> ReviewRequest:
    """The reviewer's view of the case (pure: safe to rebuild when LangGraph re-runs the node on resume)."""
    current = {f.criterion: f for f in effective_findings(state)}
    model = {f.criterion: f for f in (state.morphology.findings if state.morphology else [])}
    findings = []
    if state.modality is not None and state.modality.label == "dermoscopy":
        for criterion, options in SEVEN_POINT.items():
            f = current.get(criterion)
            m = model.get(criterion)
            findings.append(
                ReviewFinding(
                    criterion=criterion,
                    value=f.value if f else "absent",
                    confidence=m.confidence if m is not None and f is not None and m.value == f.value else None,
                    options=list(options),
                )
            )
    r, v = state.reasoning, state.verification
    return ReviewRequest(
        case_id=case_id,
        stage=stage,
        modality=state.modality.label if state.modality else None,
        modality_confidence=state.modality.confidence if state.modality else None,
        findings=findings,
        description=reviewed_view(state).morphology.description if state.morphology else "",
        differential=r.differential if r and stage == "verify" else [],
        verdict=v.decision if v and stage == "verify" else None,
        reasons=list(v.reasons) if v and stage == "verify" else [],
        cited=list(r.cited) if r and stage == "verify" else [],
        rationale=r.rationale if r and stage == "verify" else "",
        question=state.question,
        image_sha256=state.image_sha256,
        policy=pol or {},
    )


def apply_decision(state: CaseState, decision: ReviewDecision, stage: Where, at: datetime) -> tuple[ReviewLog, list[FindingChange]]:
    current = {f.criterion: f for f in effective_findings(state)}
    model = {f.criterion: f for f in (state.morphology.findings if state.morphology else [])}
    changes: list[FindingChange] = []
    for criterion, value in decision.findings.items():
        before = current.get(criterion)
        if before is not None and before.value == value:
            continue
        m = model.get(criterion)
        changes.append(FindingChange(criterion=criterion, model=m.value if m else None, reviewer=value, model_confidence=m.confidence if m else None))
    log = (state.review or ReviewLog()).model_copy(deep=True)
    if changes:
        merged = dict(current)
        for c in changes:
            # A reviewer's value is certain for the downstream checks: a one-hot distribution over the vocabulary.
            merged[c.criterion] = Finding(criterion=c.criterion, value=c.reviewer, confidence=1.0, probs={v: float(v == c.reviewer) for v in SEVEN_POINT[c.criterion]})
        log.findings = [merged[k] for k in SEVEN_POINT if k in merged] + [f for k, f in merged.items() if k not in SEVEN_POINT]
    model_label = state.reasoning.top.label if state.reasoning else None
    override = decision.diagnosis if decision.diagnosis and decision.diagnosis != model_label else None
    if override:
        log.override = override
    action = "override" if override else "edit" if changes else "confirm"
    log.records.append(
        ReviewRecord(reviewer=decision.reviewer, at=at, stage=stage, action=action, changes=changes, model_label=model_label, override=override, note=decision.note)
    )
    return log, changes


def review_node(state: CaseState, rt) -> NodeOutput:
    """Pause for a reviewer. Everything before ``interrupt()`` is a pure function of the state, because
    LangGraph runs this node again from its start when the case is resumed."""
    from langgraph.config import get_config
    from langgraph.types import interrupt

    stage: Where = "verify" if state.verification is not None else "morphology"
    config = get_config()
    case_id = str(config.get("configurable", {}).get("thread_id", ""))
    request = build_request(state, case_id, stage, policy(rt, config).model_dump())
    decision = interrupt(request.model_dump(mode="json"), response_schema=ReviewDecision)
    log, changes = apply_decision(state, decision, stage, datetime.now(timezone.utc))
    record = log.last
    inputs = {"stage": stage, "model_findings": {f.criterion: f.value for f in state.morphology.findings} if state.morphology else {}}
    if state.reasoning:
        inputs["model_top"] = state.reasoning.top.label
    notes = [f"reviewed by {record.reviewer}: {record.action}"]
    notes += [f"{c.criterion}: {c.model} -> {c.reviewer}" for c in changes]
    if record.override:
        notes.append(f"diagnosis overridden: {record.model_label} -> {record.override} (the model's differential is kept)")
    return NodeOutput({"review": log}, inputs=inputs, model_id=f"reviewer:{record.reviewer}", notes=notes)


# --- routing -------------------------------------------------------------------------------------


class ReviewPolicy(BaseModel):
    when: When = "never"
    where: Where = "verify"
    max_reviews: int = Field(3, ge=1, le=20)


def policy(rt, config: dict[str, Any] | None) -> ReviewPolicy:
    """The review policy of this run: ``configurable.review`` (per call) over the config's ``review`` section."""
    base = rt.config.review if rt is not None and getattr(rt.config, "review", None) is not None else None
    data = {"when": base.when, "where": base.where, "max_reviews": base.max_reviews} if base is not None else {}
    override = ((config or {}).get("configurable") or {}).get("review")
    if isinstance(override, str):
        override = {"when": override}
    if isinstance(override, BaseModel):
        override = override.model_dump(exclude_unset=True)
    if override:
        data.update({k: v for k, v in override.items() if k in ReviewPolicy.model_fields})
    return ReviewPolicy.model_validate(data)


def _reviews(state: CaseState) -> int:
    return len(state.review.records) if state.review else 0


def wants_review_after_morphology(state: CaseState, p: ReviewPolicy) -> bool:
    return p.where == "morphology" and p.when == "always" and _reviews(state) == 0


def wants_review_after_verify(state: CaseState, p: ReviewPolicy) -> bool:
    if p.when == "never" or state.verification is None or _reviews(state) >= p.max_reviews:
        return False
    decision = state.verification.decision
    if p.where == "morphology":
        # Findings review: a case that already had its findings reviewed runs on without pausing again;
        # on_abstain/on_revise bring the findings to a reviewer when the verifier doubts the answer.
        if _reviews(state):
            return False
        return (p.when == "on_abstain" and decision == "abstain") or (p.when == "on_revise" and decision == "revise")
    if p.when == "always":
        return decision in ("accept", "abstain")
    return (p.when == "on_abstain" and decision == "abstain") or (p.when == "on_revise" and decision == "revise")


def after_review(state: CaseState) -> str:
    """Edited findings (or a case paused before retrieval) run retrieval, reasoner and verifier again;
    a pending revision goes back to the reasoner; otherwise the case ends."""
    record = state.review.last if state.review else None
    if record is None:
        raise ValueError("review node produced no record")
    if record.changes or record.stage == "morphology" and state.verification is None:
        return "retrieve"
    if state.verification is not None and state.verification.decision == "revise":
        return "reason"
    return "__end__"
