"""The public result of ``Agent.diagnose``: a pydantic model that round-trips through JSON and renders in notebooks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from agent.review import ReviewRequest, effective_findings, reviewed_view
from agent.state import CaseState, ClaimCheckResult, DifferentialItem, Evidence, Finding, ModalityResult, PatientMetadata, ReasoningStep, ReviewLog, TraceEntry

SCHEMA_VERSION = "2"

if TYPE_CHECKING:
    from agent.config import AgentConfig


def versions(config: AgentConfig) -> dict[str, Any]:
    """Package and model versions of ``config`` (the configured LLM included; a Diagnosis lists it only for a case
    where it ran, see :func:`case_versions`)."""
    from importlib import metadata

    out: dict[str, Any] = {"config": config.fingerprint()}
    for pkg in ("dermgraph", "torch", "transformers", "langgraph", "faiss-cpu"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    out["models"] = {
        "classifier": config.encoder.classifier.model,
        "second_expert": getattr(config.encoder.second_expert, "model", None),
        "clinical_probe": config.encoder.clinical_probe,
        "modality_head": config.modality.head,
        "modality_probe": config.modality.imagenet_probe if config.modality.imagenet_weight > 0 else None,
        "describer": describer_model(config),
        "kb_index": config.retrieval.kb_index,
        "case_index": config.retrieval.case_index,
        "llm": config.reasoner.llm.model,
        "fusion": config.reasoner.fusion,
    }
    return out


def case_versions(versions: dict[str, Any], llm_ran: bool) -> dict[str, Any]:
    """``versions`` as recorded with one case: the LLM (model id and sha256) only when it ran for the case."""
    if llm_ran:
        return versions
    out = dict(versions)
    for key in ("models", "sha256"):
        if isinstance(out.get(key), dict) and "llm" in out[key]:
            out[key] = {k: v for k, v in out[key].items() if k != "llm"}
    return out


def describer_model(config: AgentConfig) -> str | None:
    """The model whose findings the morphology node reports (the second expert's criteria heads, the concept heads or a VLM)."""
    kind = config.morphology.kind
    if kind == "vlm":
        return getattr(config.morphology.vlm, "model", None)
    if kind == "second-expert" and config.encoder.second_expert is not None:
        return config.encoder.second_expert.model
    return config.morphology.heads


def model_hashes(config: AgentConfig) -> dict[str, str]:
    """sha256 of every model artifact this process resolved for ``config`` (role → sha256): the registry's
    verified hash (the wheel for ``pypi:``, the file or directory manifest for ``pkg:``/``path:``), or the hash
    of a local path. Models that were never loaded (test doubles, skipped nodes) are absent."""
    from models.integrity import used_sha256

    refs = {
        "classifier": config.encoder.classifier.model,
        "second_expert": getattr(config.encoder.second_expert, "model", None),
        "clinical_probe": config.encoder.clinical_probe,
        "modality_head": config.modality.head,
        "modality_probe": config.modality.imagenet_probe if config.modality.imagenet_weight > 0 else None,
        "modality_encoder": config.modality.encoder,
        "describer": describer_model(config),
        "text_embedder": config.retrieval.text_embedder,
        "kb_index": config.retrieval.kb_index,
        "case_index": config.retrieval.case_index,
        "llm": config.reasoner.llm.model,
        "fusion": config.reasoner.fusion,
        "consistency_model": config.verifier.consistency_model,
    }
    out = {}
    for role, ref in refs.items():
        sha = used_sha256(ref) if isinstance(ref, str) else None
        if sha:
            out[role] = sha
    return out


class Diagnosis(BaseModel):
    """Everything the agent concluded about one image, with the evidence and the full trace."""

    schema_version: str = SCHEMA_VERSION
    image_sha256: str = Field(description="Hash of the decoded pixels (identifies the case; no image data is stored).")
    image_size: tuple[int, int]
    input_warnings: list[str] = Field(
        default_factory=list, description="What about the input was changed or not used (image scaled or composited, a site not recognised), "
        "and a retrieval the configuration left empty (a case index without the route's sources)."
    )
    question: str | None = None
    metadata: PatientMetadata | None = None
    modality: ModalityResult | None = None
    findings: list[Finding] = Field(default_factory=list)
    description: str = ""
    limitations: list[str] = Field(default_factory=list)
    seven_point_score: int | None = None
    evidence: list[Evidence] = Field(default_factory=list, description="All retrieved evidence, then the knowledge-base passages the reasoning consulted.")
    cited: list[str] = Field(default_factory=list, description="Ids of the evidence the rationale cites.")
    differential: list[DifferentialItem] = Field(
        default_factory=list,
        description="The decided label first (== label: the fusion's decision model at its melanoma operating point, which need not be the "
        "most probable candidate), then the other candidates by calibrated probability; probabilities sum to 1.",
    )
    prediction_set: list[str] = Field(default_factory=list, description="Conformal prediction set: holds the true diagnosis with probability >= 1 - prediction_set_alpha.")
    prediction_set_alpha: float | None = None
    prediction_set_calibration: str | None = None
    prediction_set_group: str | None = Field(None, description="Calibration group whose threshold the set used (images like this source's), or None (pooled).")
    reasoning_steps: list[ReasoningStep] = Field(default_factory=list, description="Observation, knowledge, expert, fusion and verdict steps; each cites ids that exist in the case.")
    summary_check: ClaimCheckResult | None = Field(None, description="The LLM's summary and its claim check (shown in the rationale only when it passed).")
    label: str | None = Field(None, description="Top diagnosis (also given when the verdict is 'abstain', for evaluation).")
    label_name: str | None = None
    rationale: str = ""
    reasoner_source: Literal["stacker", "llm", "fallback"] | None = Field(
        None, description="What produced the decision: 'stacker' (fusion stacker, no LLM: the default), 'llm' (the stacker with the LLM's "
        "scores), 'fallback' (the LLM's output was unusable; the stacker without it). See ReasonerResult.source."
    )
    verdict: Literal["accept", "abstain", "pending"] = Field(description="'pending' while the case awaits review before any verdict.")
    confidence: float = Field(0.0, description="Probability of the top diagnosis.")
    self_consistency: float | None = None
    morphology_agreement: float | None = None
    acceptance_score: float | None = Field(None, description="Estimated probability that the label is right (risk-controlled acceptance).")
    acceptance_threshold: float | None = Field(None, description="The score the modality's target accuracy requires (None: not calibrated).")
    reasons: list[str] = Field(default_factory=list)
    rounds: int = 0
    trace: list[TraceEntry] = Field(default_factory=list)
    versions: dict[str, Any] = Field(default_factory=dict)
    # Review (agent.review); left out of the JSON when the case was never paused, so batch records are unchanged.
    status: Literal["complete", "awaiting_review", "running", "incomplete"] = Field(
        "complete", exclude_if=lambda v: v == "complete", description="'running': being run in this process; 'incomplete': a persisted run stopped before it finished (process killed)."
    )
    case_id: str | None = Field(None, exclude_if=lambda v: v is None, description="Thread id of a persisted case.")
    review_request: ReviewRequest | None = Field(None, exclude_if=lambda v: v is None, description="What the reviewer is asked (status awaiting_review).")
    review: ReviewLog | None = Field(None, exclude_if=lambda v: v is None, description="Reviews so far: who, when, changes, override.")
    thumbnail: str | None = Field(None, exclude=True, repr=False, description="PNG data URI for notebook rendering (never serialised).")

    @classmethod
    def from_state(
        cls, state: CaseState, versions: dict[str, Any], thumbnail: str | None = None, *, case_id: str | None = None, request: ReviewRequest | None = None
    ) -> "Diagnosis":
        """``request``: the pending review request when the case is paused (status 'awaiting_review')."""
        r, v = state.reasoning, state.verification
        m = reviewed_view(state).morphology  # the findings the diagnosis rests on (the reviewer's, if edited)
        verdict = v.decision if v and v.decision in ("accept", "abstain") else "abstain"
        reasons = list(v.reasons) if v else ["verification did not complete"]
        if request is not None:
            if request.stage == "morphology" or v is None:
                verdict, reasons = "pending", ["awaiting review of the findings"]
            else:
                reasons.append("awaiting review")
        elif v and v.decision == "revise":
            reasons.append("revision rounds exhausted")
        if state.review is not None and state.review.override:
            reasons.append(f"reviewer's diagnosis: {state.review.override} (overrides the model's {r.top.label if r else None})")
        return cls(
            image_sha256=state.image_sha256,
            image_size=state.image_size,
            input_warnings=list(dict.fromkeys([*state.input_warnings, *(state.metadata.site_warnings() if state.metadata else []),
                                               *(state.retrieval.warnings if state.retrieval else [])])),
            question=state.question,
            metadata=state.metadata,
            modality=state.modality,
            findings=effective_findings(state),
            description=m.description if m else "",
            limitations=m.limitations if m else [],
            seven_point_score=m.seven_point_score if m else None,
            evidence=(list(state.retrieval.evidence) if state.retrieval else []) + (list(r.consulted) if r else []),
            cited=r.cited if r else [],
            differential=r.differential if r else [],
            prediction_set=r.prediction_set if r else [],
            prediction_set_alpha=r.prediction_set_alpha if r else None,
            prediction_set_calibration=r.prediction_set_calibration if r else None,
            prediction_set_group=r.prediction_set_group if r else None,
            reasoning_steps=(list(r.steps) if r else []) + ([v.step] if v and v.step else []),
            summary_check=r.summary_check if r else None,
            label=r.top.label if r else None,
            label_name=r.top.name if r else None,
            rationale=" ".join(x for x in ((r.rationale if r else ""), (v.step.text if v and v.step else "")) if x),
            reasoner_source=r.source if r else None,
            verdict=verdict,
            confidence=v.confidence if v else 0.0,
            self_consistency=v.self_consistency if v and r else None,
            morphology_agreement=v.morphology_agreement if v else None,
            acceptance_score=v.acceptance_score if v else None,
            acceptance_threshold=v.acceptance_threshold if v else None,
            reasons=reasons,
            rounds=state.round,
            trace=state.trace,
            versions=case_versions(versions, bool(r and r.llm_ran)),
            thumbnail=thumbnail,
            status="awaiting_review" if request is not None else "complete",
            case_id=case_id,
            review_request=request,
            review=state.review,
        )

    @property
    def final_label(self) -> str | None:
        """The reviewer's overriding diagnosis if there is one, else the model's top label."""
        return self.review.override if self.review is not None and self.review.override else self.label

    def summary(self) -> str:
        """A few human-readable lines (what the CLI prints)."""
        mod = self.modality
        lines = [f"input warning: {w}" for w in self.input_warnings]  # before the results they may affect
        lines.append(f"modality: {mod.label} (p={mod.confidence:.2f})" if mod else "modality: -")
        if self.case_id:
            lines.insert(0, f"case: {self.case_id}" + (" (AWAITING REVIEW)" if self.status == "awaiting_review" else ""))
        if self.description:
            lines.append(f"findings: {self.description}")
        if self.differential:
            lines.append("differential (decided label first, then by probability): " + ", ".join(f"{d.name} {d.probability:.2f}" for d in self.differential[:4]))
        if self.prediction_set and self.prediction_set_alpha is not None:
            names = {d.label: d.name for d in self.differential}
            like = f" (threshold of images like {self.prediction_set_group}'s)" if self.prediction_set_group else ""
            lines.append(f"{round((1 - self.prediction_set_alpha) * 100)}% prediction set{like}: {{{', '.join(names.get(c, c) for c in self.prediction_set)}}}")
        elif self.prediction_set_calibration:
            lines.append(f"prediction set: none calibrated ({self.prediction_set_calibration})")
        lines.append(f"verdict: {self.verdict.upper()}" + (f" — {self.label_name} (p={self.confidence:.2f})" if self.label_name else ""))
        lines += [f"  - {r}" for r in self.reasons]
        if self.reasoning_steps:
            lines.append("reasoning:")
            lines += [f"  {i}. [{st.kind}] {st.text}" for i, st in enumerate(self.reasoning_steps, 1)]
        elif self.rationale:
            lines.append(f"rationale: {self.rationale}")
        if self.summary_check is not None and self.summary_check.passed:
            lines.append(f"summary (LLM, claim-checked): {self.summary_check.text}")
        if self.summary_check is not None and not self.summary_check.passed:
            lines.append(f"(LLM summary withheld: failed the claim check: {'; '.join(self.summary_check.failures)})")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from agent.render import diagnosis_html

        return diagnosis_html(self)

    def __str__(self) -> str:
        return self.summary()


