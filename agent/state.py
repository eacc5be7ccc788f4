"""Typed graph state. Each node owns exactly one output field; ``trace`` is append-only."""

from __future__ import annotations

import math
import operator
from datetime import datetime
from typing import Annotated, Any, Literal

from langgraph.channels.untracked_value import UntrackedValue
from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_serializer
from pydantic_core import PydanticCustomError

Modality = Literal["clinical", "dermoscopy", "histopathology", "not_skin"]
Decision = Literal["accept", "revise", "abstain"]


class PatientMetadata(BaseModel):
    """Optional patient context. Unknown keys are errors so that typos are not silently ignored."""

    model_config = ConfigDict(extra="forbid")

    age: float | None = Field(None, ge=0, le=120, description="Age in years.")
    sex: Literal["female", "male", "unknown"] | None = Field(None, description="Sex as recorded.")
    site: str | None = Field(
        None, description="Anatomical site, e.g. 'back', 'face', 'lower extremity' (models.sklesion.SITE_VOCABULARY). Free text is accepted; "
        "a site outside the vocabulary is not used and the Diagnosis says so in input_warnings (site_warnings)."
    )
    fitzpatrick: Literal["I", "II", "III", "IV", "V", "VI"] | None = Field(None, description="Fitzpatrick skin type.")
    history: str | None = Field(None, max_length=2000, description="Free-text history (changes, symptoms, duration).")

    @field_validator("age", mode="before")
    @classmethod
    def _finite_age(cls, v: Any) -> Any:
        # NaN passes no comparison, so the range check alone reports a confusing "less than or equal to 120 (got nan)".
        try:
            finite = v is None or math.isfinite(float(v))
        except (TypeError, ValueError):
            return v  # not a number: pydantic's own message
        if not finite:
            raise PydanticCustomError("finite_number", "age must be a finite number of years (0 to 120)")
        return v

    @field_validator("sex", mode="before")
    @classmethod
    def _norm_sex(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = v.strip().lower()
            return {"f": "female", "m": "male", "": None}.get(v, v)
        return v

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)

    def site_warnings(self) -> list[str]:
        """A warning when ``site`` is outside the lesion classifier's site vocabulary: it then reads the site as
        unknown, so the site is reported as not used (with the likely intended site and the accepted values)."""
        from models.sklesion import LOCATIONS, site_known, suggest_site

        if self.site is None or not self.site.strip() or site_known(self.site):
            return []
        close = suggest_site(self.site)
        hint = f"did you mean {close!r}? " if close else ""
        groups = ", ".join(loc for loc in LOCATIONS if loc != "unknown")
        return [f"site {self.site!r} is not a recognised body site and was not used (the lesion classifier read it as unknown); {hint}"
                f"give one of {groups}, or a specific site such as back, chest, face, scalp, forearm, hand, thigh, foot, acral"]


class ImageEncoding(BaseModel):
    """What the image encoder/lesion classifier saw. Features stay out of serialised output."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model_id: str
    classifier_probs: dict[str, float] = Field(description="Raw lesion-classifier probabilities (uncalibrated).")
    features: Any = Field(default=None, repr=False, description="Pooled image features (np.ndarray).")
    tta_probs: list[dict[str, float]] = Field(default_factory=list, description="The lesion classifier on each test-time view (encoder.tta_views), in order.")
    expert_probs: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="The second visual expert's heads as label → probability: 'effnet' (HAM10000 classes), 'effnet_dermnet' "
        "(DermNet classes, named as the case index names them) and 'effnet_modality'; and the clinical feature probe's DermNet classes "
        "as 'probe_dermnet' (where it ran: encoder.clinical_probe).",
    )
    expert_criteria: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="The second visual expert's 7-point criteria heads: criterion -> value -> probability (empty without them)."
    )
    stats: Any = Field(default=None, repr=False, description="Colour/texture statistics (np.ndarray).")
    expert_features: Any = Field(default=None, repr=False, description="The second visual expert's pooled features (np.ndarray; None without it).")

    @field_serializer("features", "stats", "expert_features", when_used="json")
    def _no_arrays(self, value):
        return None

    @model_serializer(mode="wrap")
    def _arrays_stay_in_python(self, handler, info):
        # JSON output (trace, Diagnosis) never carries the arrays; a python dump keeps them so that a
        # checkpointer can restore a paused case's features for retrieval after the review.
        data = handler(self)
        if info.mode_is_json():
            data.pop("features", None)
            data.pop("stats", None)
            data.pop("expert_features", None)
        return data


class ModalityResult(BaseModel):
    label: Modality = Field(description="Predicted modality, or 'not_skin' when rejected.")
    confidence: float = Field(ge=0, le=1)
    probs: dict[str, float] = Field(description="Head probabilities over the known classes.")
    ood_score: float | None = Field(None, description="Distance of the features to the training data (higher = stranger).")
    rejected: bool = Field(False, description="True when the image is judged not to be a usable skin image.")
    reason: str | None = None


class Finding(BaseModel):
    criterion: str = Field(description="Criterion name, e.g. 'pigment_network'.")
    value: str = Field(description="Most probable value, e.g. 'atypical'.")
    confidence: float = Field(ge=0, le=1)
    probs: dict[str, float] = Field(default_factory=dict)


class MorphologyResult(BaseModel):
    findings: list[Finding] = Field(default_factory=list)
    description: str = Field(description="Short clinical description verbalising the findings.")
    limitations: list[str] = Field(default_factory=list, description="What the describer could not assess.")
    seven_point_score: int | None = Field(None, description="7-point checklist score from the predicted findings.")


class Evidence(BaseModel):
    id: str = Field(description="Citable id, e.g. 'kb:melanoma#dermoscopy' or 'case:derm7pt:123'.")
    kind: Literal["knowledge", "case"]
    title: str
    text: str
    label: str | None = Field(None, description="Diagnosis label the evidence is about (HAM10000 code where mappable).")
    source: str = Field(description="Where it comes from (knowledge base, dataset name).")
    score: float = Field(description="Similarity to the query.")


class RetrievalResult(BaseModel):
    evidence: list[Evidence] = Field(default_factory=list)
    knn_probs: dict[str, float] = Field(default_factory=dict, description="Similarity-weighted label votes of retrieved cases.")
    query: str = ""
    warnings: list[str] = Field(default_factory=list, exclude_if=lambda v: not v,
                                description="What made retrieval come back empty for a reason the user can fix (e.g. a case index without the route's sources).")


class ReasoningStep(BaseModel):
    """One checkable step of the reasoning. ``evidence`` holds ids that exist in the case: retrieved or
    consulted evidence (``kb:…``, ``case:…``), observed findings (``finding:<criterion>``) and experts
    (``expert:<name>``)."""

    kind: Literal["observation", "knowledge", "expert", "fusion", "verdict"]
    text: str = Field(description="The step in words (rendered from ``data``; what the rationale is made of).")
    evidence: list[str] = Field(default_factory=list)
    data: dict[str, Any] = Field(default_factory=dict, description="The values the text states (finding, value, confidence, probabilities, ...).")


class ClaimCheckResult(BaseModel):
    """Outcome of the claim check of a generated text (see ``agent.claims``)."""

    text: str
    passed: bool
    failures: list[str] = Field(default_factory=list)


class DifferentialItem(BaseModel):
    label: str = Field(description="Candidate code (HAM10000 class or knowledge-base label).")
    name: str
    probability: float = Field(ge=0, le=1)


class ReasonerResult(BaseModel):
    differential: list[DifferentialItem] = Field(
        description="The decided label first (the fusion's decision model; it need not have the highest probability), then the other "
        "candidates by calibrated probability; probabilities sum to 1."
    )
    rationale: str
    cited: list[str] = Field(default_factory=list, description="Evidence ids the rationale cites (all exist in retrieval).")
    source: Literal["stacker", "llm", "fallback"] = Field(
        description="What produced the decision: 'stacker' = the fusion stacker over the non-LLM experts (the fusion artifact does not read "
        "the LLM; the default); 'llm' = the stacker with the LLM's candidate scores among its experts; 'fallback' = the artifact reads the "
        "LLM but its output was unusable, so the stacker fused the others."
    )
    llm_ran: bool = Field(
        False, exclude_if=lambda v: not v, description="The LLM ran for this case (scored candidates or wrote the summary) in this or an earlier round."
    )
    llm_probs: dict[str, float] | None = Field(None, description="The LLM's own distribution over candidates, before fusion.")
    samples: list[str] = Field(default_factory=list, description="Top labels of the k perturbed re-scorings (confidence consistency).")
    round: int = 0
    notes: list[str] = Field(default_factory=list)
    expert_probs: dict[str, dict[str, float]] = Field(default_factory=dict, description="Each expert's own distribution over the candidates (classifier, knn, morphology, llm).")
    contributions: dict[str, dict[str, float]] = Field(default_factory=dict, description="Expert → candidate → its additive contribution to the fused logit (centred).")
    prediction_set: list[str] = Field(default_factory=list, description="Split-conformal set: contains the true diagnosis with probability >= 1 - alpha.")
    prediction_set_alpha: float | None = None
    prediction_set_calibration: str | None = Field(None, description="The calibration data of the prediction set.")
    prediction_set_group: str | None = Field(None, description="The calibration group whose conformal threshold the set used (group-conditional calibration), or None.")
    steps: list[ReasoningStep] = Field(default_factory=list, description="Observation, knowledge, expert and fusion steps (the verifier adds the verdict).")
    consulted: list[Evidence] = Field(default_factory=list, description="Knowledge-base passages looked up for the knowledge steps (citable like retrieved evidence).")
    summary_check: ClaimCheckResult | None = Field(None, description="The LLM's summary and its claim check; shown only when it passed.")

    @property
    def top(self) -> DifferentialItem:
        return self.differential[0]


class Verdict(BaseModel):
    decision: Decision
    confidence: float = Field(ge=0, le=1, description="Probability of the top diagnosis.")
    morphology_agreement: float | None = Field(None, description="0..1 agreement of findings with the KB's expected morphology for the top diagnosis.")
    self_consistency: float = Field(ge=0, le=1, description="Share of the k sampled outputs agreeing with the top label.")
    consistency_score: float | None = Field(None, description="Trained verifier's P(consistent | findings, top diagnosis), when verifier.consistency_model is set.")
    reasons: list[str] = Field(default_factory=list)
    feedback: str | None = Field(None, description="What the reasoner is asked to reconsider on 'revise'.")
    acceptance_score: float | None = Field(None, description="Estimated probability that the top label is right (the acceptance model's score).")
    acceptance_threshold: float | None = Field(None, description="SGR threshold for the modality's target accuracy (None: no calibration, abstain).")
    target_accuracy: float | None = None
    step: ReasoningStep | None = Field(None, description="The verdict as a reasoning step.")


class TraceEntry(BaseModel):
    step: int
    node: str
    model_id: str | None = None
    started_at: datetime
    duration_s: float
    inputs: dict[str, Any] = Field(default_factory=dict, description="Summary of what the node read.")
    outputs: dict[str, Any] = Field(default_factory=dict, description="What the node wrote (its own field).")
    notes: list[str] = Field(default_factory=list)


class FindingChange(BaseModel):
    criterion: str
    model: str | None = Field(description="The model's value (None when it reported none).")
    reviewer: str
    model_confidence: float | None = None


class ReviewRecord(BaseModel):
    """One completed review (agent.review): who, when, and what changed relative to the model."""

    reviewer: str
    at: datetime
    stage: Literal["morphology", "verify"]
    action: Literal["confirm", "edit", "override"]
    changes: list[FindingChange] = Field(default_factory=list)
    model_label: str | None = Field(None, description="The model's top diagnosis when the reviewer decided.")
    override: str | None = Field(None, description="The reviewer's diagnosis when it differs from the model's.")
    note: str | None = None


class ReviewLog(BaseModel):
    """The review node's field: every review of the case and the findings now in force."""

    records: list[ReviewRecord] = Field(default_factory=list)
    findings: list[Finding] | None = Field(None, description="Findings after the reviewers' edits; None = the model's findings.")
    override: str | None = Field(None, description="The latest overriding diagnosis (the model's differential is kept).")

    @property
    def last(self) -> ReviewRecord | None:
        return self.records[-1] if self.records else None


class CaseState(BaseModel):
    """The graph state. Inputs first, then one field per node, then the trace."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    # Untracked: a checkpointer (paused review cases) never stores pixels; no node after a review reads them.
    image: Annotated[Any, UntrackedValue(Any)] = Field(default=None, exclude=True, repr=False, description="The RGB PIL image (never serialised).")
    image_sha256: str = ""
    image_size: tuple[int, int] = (0, 0)
    input_warnings: list[str] = Field(default_factory=list)
    question: str | None = None
    metadata: PatientMetadata | None = None
    exclude_cases: list[str] = Field(default_factory=list, description="Case-index ids retrieval never returns (leave-one-out evaluation, training data).")

    encoding: ImageEncoding | None = None
    modality: ModalityResult | None = None
    morphology: MorphologyResult | None = None
    retrieval: RetrievalResult | None = None
    reasoning: ReasonerResult | None = None
    verification: Verdict | None = None
    round: int = Field(0, description="Reasoner rounds so far (the verifier bounds it).")
    review: ReviewLog | None = Field(None, description="Reviewer decisions (agent.review); None unless the case was reviewed.")
    trace: Annotated[list[TraceEntry], operator.add] = Field(default_factory=list)
