"""Agent configuration: pydantic models loaded from YAML, overridable with ``dotted.key=value`` strings."""

from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from agent.limits import InputLimits


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class BackendRef(_Strict):
    """A model served by a named backend (see ``models.backends.BACKENDS``)."""

    backend: str = Field(description="Backend name, e.g. 'transformers', 'openai-compatible', 'vllm'.")
    model: str = Field(description="Registry id, local path, or hub id / served model name.")
    options: dict[str, Any] = Field(default_factory=dict, description="Extra backend keyword arguments (base_url, dtype, ...).")


class EncoderConfig(_Strict):
    classifier: BackendRef = Field(
        default_factory=lambda: BackendRef(backend="sklesion", model="sklesion-xception"),
        description="Lesion classifier whose pooled features every trained head and the case index use.",
    )
    tta_views: list[Literal["hflip", "vflip", "rot90"]] = Field(
        default_factory=list,
        description="Test-time views the lesion classifier also sees (CCT, models.tta): the share on which it keeps the label is "
        "a verifier signal where the fusion artifact's acceptance model uses 'tta_agreement'. Empty: none (one forward pass per view).",
    )
    second_expert: BackendRef | None = Field(
        default_factory=lambda: BackendRef(
            backend="efficientnet",
            model="efficientnet-lite0-derm",
            options={"views": ["hflip", "vflip", "rot90"], "view_heads": ["dermnet"], "views_if": "modality=clinical",
                     "members": ["efficientnet-lite0-derm-continued"], "members_if": "modality=dermoscopy"},
        ),
        description="Second visual expert (a multi-task EfficientNet-Lite0 trained by `dermgraph train encoder`): its HAM10000 head "
        "for dermoscopy and its DermNet head for clinical photos, read by the fusion stacker where the artifact lists 'effnet', and its "
        "7-point criteria heads (morphology.kind 'second-expert'). Options views / view_heads / views_if: test-time views (CCT) whose "
        "mean the listed heads give, for the images whose own modality head calls them clinical (by default the DermNet head only: the "
        "dermoscopy stacker was fitted on cross-fitted single-view outputs, and dermoscopy images skip the extra passes). Option view_size "
        "(FixRes): those images' view heads and pooled features at that resolution instead of the trained 224 px; not the default (README: "
        "+0.065 s per clinical photo for +0.8 / +3 points of fused top-1 / top-5), and the clinical case index must be rebuilt with the same "
        "options. Options members / members_if: an output ensemble, other experts of the same heads whose probabilities are averaged in for the "
        "images whose own modality head names that modality (by default the CPU continuation, efficientnet-lite0-derm-continued, on images "
        "called dermoscopy: one extra pass where the views are not spent; README: A second visual expert). None: not run.",
    )
    clinical_probe: str | None = Field(
        "dermnet-probe",
        description="Registry id or path of the clinical feature probe (`dermgraph train probe`, models.probe): DermNet classes from the "
        "lesion classifier's and EfficientNet-Lite0's ImageNet features, read by the clinical stacker where the fusion artifact lists "
        "'probe'. It runs (one ImageNet pass) on the images the second expert's modality head calls clinical, or on every image without "
        "that head. None: not run.",
    )


class ModalityConfig(_Strict):
    head: str = Field("modality-head", description="Registry id of the trained modality head.")
    encoder: str | None = Field(
        None,
        description="Registry id or path of a fine-tuned encoder delta (dermgraph train modality with finetune:) whose features the head "
        "was trained on. None: the shared lesion encoder's features, computed once per case.",
    )
    imagenet_probe: str | None = Field(
        "modality-probe",
        description="Registry id or path of the modality probe (a linear model on the frozen ImageNet EfficientNet-Lite0's features: "
        "`dermgraph train modality` with inputs: imagenet-stages) combined with the head (None: not used).",
    )
    imagenet_weight: float = Field(
        1 / 3, ge=0, le=1, description="Share of the modality probe in the combination (where it is configured)."
    )
    second_expert_weight: float = Field(
        1 / 3, ge=0, le=1, description="Share of the second visual expert's modality head in the combination (where the expert runs; 0: not "
        "used). The three opinions share equally by default (nothing tuned). Whole sources held out: head 0.974, probe 0.987, the "
        "geometric mean of the three 0.989 (the head's mean with the expert's, the previous default: 0.981); centre-30% crops of held-out "
        "DermNet photos 0.989 (0.972 without the expert's head: it knows close-ups). README, 'Modality'."
    )
    combine: Literal["geometric", "arithmetic"] = Field(
        "geometric", description="How the opinions are combined: the weighted geometric mean (renormalised) or the weighted arithmetic mean "
        "of their probabilities; the head's weight is 1 minus the others'."
    )
    min_confidence: float = Field(0.5, ge=0, le=1, description="Below this the modality is reported as uncertain.")
    ood_reject: bool = Field(True, description="Reject images whose features are farther from the training data than the head's calibrated OOD threshold.")

    @model_validator(mode="after")
    def _weights_leave_the_head_some(self) -> "ModalityConfig":
        if self.imagenet_probe is not None and self.imagenet_weight + self.second_expert_weight > 1 + 1e-9:
            raise ValueError(f"modality.imagenet_weight ({self.imagenet_weight:g}) + second_expert_weight ({self.second_expert_weight:g}) exceed 1: "
                             "the head's weight is 1 minus their sum")
        return self


DEFAULT_CONCEPT_HEADS = "derm7pt-concept-heads"


class MorphologyConfig(_Strict):
    kind: Literal["concept-heads", "second-expert", "vlm"] = Field(
        "concept-heads",
        description="Structured 7-point findings from the concept heads on the lesion classifier's features, from the second visual "
        "expert's criteria heads (the concept heads where it gives none; pair with a fusion artifact fitted with findings_from: effnet), "
        "or a VLM describer.",
    )
    heads: str = Field(DEFAULT_CONCEPT_HEADS, description="Registry id or path of the 7-point concept heads (on the lesion encoder's or the second "
                       "expert's features, as the artifact says; the fusion artifact must have been fitted on their findings).")
    vlm: BackendRef | None = Field(None, description="VLM used when kind='vlm' (users bring weights).")
    vlm_prompt: str = Field(
        "Describe the morphology of this skin lesion image in clinical terms (colours, structures, borders, vessels). Do not give a diagnosis.",
    )


class RetrievalConfig(_Strict):
    kb_index: str = Field("kb-index", description="Registry id or path of the knowledge-base FAISS index.")
    case_index: str = Field("case-index", description="Registry id or path of the image-text case index (the lesion classifier's features).")
    expert_case_index: str | None = Field(
        "case-index-effnet", description="Case index over the second visual expert's features, searched where the route says case_features: second_expert (None: none)."
    )
    text_embedder: str = Field("all-minilm-l6-v2")
    k_knowledge: int = Field(3, ge=0, le=32)
    k_cases: int = Field(8, ge=0, le=64)
    knn_temperature: float = Field(0.05, gt=0, description="Softmax temperature over case similarities.")


class ReasonerConfig(_Strict):
    llm: BackendRef = Field(default_factory=lambda: BackendRef(backend="transformers", model="smollm2-135m-instruct"))
    fusion: str = Field("fusion-stacker", description="Registry id or path of the fusion artifact (stacker, conformal scores, risk control; `dermgraph train fusion`).")
    classifier_display_weight: float = Field(
        0.2214, gt=0, le=1, description="The prompt shows the classifier's probabilities raised to this power and renormalised (the LLM's scores were calibrated on prompts rendered so)."
    )
    conformal_alpha: float = Field(0.1, gt=0, lt=1, description="Miscoverage of the prediction set: it holds the true diagnosis with probability >= 1 - alpha.")
    llm_summary: bool = Field(
        False,
        description="Ask the LLM for a one-line summary of the steps, shown only if it passes the claim check (agent.claims). Off by default: "
        "the untuned 135M LLM mostly writes claims the check cannot verify, and it costs ~2 s per case on a CPU.",
    )
    knowledge_steps: int = Field(3, ge=0, le=10, description="Candidates (top and prediction set, in order) that get a knowledge-base step.")
    rationale_tokens: int = Field(40, ge=8, le=1024, description="Token budget of the rationale (a 135M model drifts when it writes long).")
    retries: int = Field(2, ge=0, le=5, description="Re-asks of the LLM when its output is unusable.")
    num_samples: int = Field(
        1,
        ge=1,
        le=16,
        description=(
            "k LLM scorings for confidence consistency: the first unperturbed, the others with shuffled candidate/evidence "
            "order (CCT-style). With k=1 the consistency check compares the fused answer with each single expert "
            "(classifier, retrieved cases) instead; k>=3 is recommended where the LLM runs on a GPU."
        ),
    )
    max_candidates: int = Field(7, ge=2, le=20)


class VerifierConfig(_Strict):
    target_accuracy: dict[str, float] = Field(
        default_factory=lambda: {"dermoscopy": 0.85, "clinical": 0.85},
        description="Per modality, the accuracy accepted cases must reach (the risk the SGR threshold controls). A modality "
        "not listed here, or without calibration data in the fusion artifact, always abstains.",
    )
    risk_delta: float = Field(0.1, gt=0, lt=1, description="SGR confidence: the accepted-case risk bound holds with probability 1 - delta over the calibration draw.")
    min_morphology_agreement: float = Field(0.35, ge=0, le=1, description="Below this the findings contradict a diagnosis (phrases the revise feedback; the MAVIC reward).")
    max_rounds: int = Field(2, ge=1, le=5, description="Reasoner rounds before the verifier must accept or abstain.")
    consistency_model: str | None = Field(
        None,
        description="Registry id or path of a trained consistency verifier (training/verifier.py). None: the rule score "
        "(morphology_agreement vs min_morphology_agreement). When set, its calibrated P(consistent | findings, diagnosis) "
        "replaces the rule score in the morphology check and is recorded in the verdict.",
    )
    consistency_threshold: float | None = Field(
        None, ge=0, le=1, description="Below this P(consistent) the findings contradict the top diagnosis. None: the threshold stored in the model."
    )


class Route(_Strict):
    """Which experts run for one image modality."""

    describer: bool = Field(False, description="The structured 7-point describer (concept heads) assesses this modality.")
    case_sources: list[str] = Field(default_factory=list, description="Case-index sources searched for similar cases ([]: no case retrieval).")
    case_features: Literal["encoder", "second_expert"] = Field(
        "encoder", description="Whose features find similar cases: the lesion classifier's (retrieval.case_index) or the second visual expert's "
        "(retrieval.expert_case_index; the classifier's index when the configuration has no second expert)."
    )
    classifier: bool = Field(False, description="The lesion classifier's probabilities are an expert (shown to the reasoner, fused); its classes are the candidates.")
    reasoner: bool = Field(False, description="A diagnosis is reasoned (False: the verifier abstains after findings and evidence are gathered).")


DEFAULT_ROUTING: dict[str, Route] = {
    "dermoscopy": Route(describer=True, case_sources=["ham10000", "derm7pt", "isic2018"], classifier=True, reasoner=True),
    "clinical": Route(case_sources=["dermnet"], case_features="second_expert", reasoner=True),
    "histopathology": Route(),
    "not_skin": Route(),
}
"""The shipped routing: dermoscopy gets every expert; a clinical photo's neighbours are clinical photos, found with
the second visual expert's features (fine-tuned on clinical photos: k-NN top-1 0.37 vs 0.18 with the dermoscopy
network's, scripts/knn_by_features.py), and its candidates come from them; histopathology is described, not
diagnosed. A clinical photo's neighbours among dermoscopy images are not evidence."""


class ReviewConfig(_Strict):
    """Clinician in the loop (agent.review): when a case pauses for a reviewer, and where paused cases are kept."""

    when: Literal["never", "always", "on_abstain", "on_revise"] = Field("never", description="Pause for review: never (batch), always, or when the verifier abstains / asks for a revision.")
    where: Literal["morphology", "verify"] = Field("verify", description="After 'morphology' (correct findings before the diagnosis) or after 'verify' (sign off or override).")
    max_reviews: int = Field(3, ge=1, le=20, description="At most this many pauses per case.")
    checkpointer: str = Field(
        "~/.local/share/dermgraph/cases.sqlite",
        description="Where paused cases are kept: a SQLite file path, or a postgresql:// URL (extra 'postgres').",
    )


class AgentConfig(_Strict):
    """Everything the agent needs. Defaults are the shipped, offline, CPU configuration."""

    device: str = Field("cpu", description="'cpu', 'cuda', 'cuda:N' (GPU index N) or 'mps'; the machine that builds the models must have it.")
    seed: int = 0
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    modality: ModalityConfig = Field(default_factory=ModalityConfig)
    morphology: MorphologyConfig = Field(default_factory=MorphologyConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    reasoner: ReasonerConfig = Field(default_factory=ReasonerConfig)
    verifier: VerifierConfig = Field(default_factory=VerifierConfig)
    limits: InputLimits | None = Field(None, description="Input bounds (question, metadata strings); None: the InputLimits defaults.")
    review: ReviewConfig | None = Field(None, description="None: never pause (the batch default).")
    routing: dict[str, Route] | None = Field(
        None, description="Per-modality routing (which experts run for each modality). A table given in a file replaces the whole table (a "
        "modality left out gets no experts); a dotted override routing.<modality>.<key>=value changes that key of the current table "
        "(the shipped one when none was given). None: DEFAULT_ROUTING."
    )

    @field_validator("device", mode="before")
    @classmethod
    def _known_device(cls, v: Any) -> Any:
        # Checked here so that a typo fails with the valid values, not as torch's error after models begin to load.
        if isinstance(v, str) and _DEVICE.fullmatch(v.strip()):
            return v.strip()
        raise PydanticCustomError("device", "unknown device {device}; valid: cpu, cuda, cuda:N (N a GPU index), mps", {"device": repr(v)})

    def route(self, modality: str) -> Route:
        """The experts that run for ``modality`` (a modality without a row gets none)."""
        return (self.routing if self.routing is not None else DEFAULT_ROUTING).get(modality, Route())

    def fingerprint(self) -> str:
        """Stable hash of the configuration (keys caches and result records).

        Fields left at None are dropped first: None means "feature off", so adding a new optional
        feature does not invalidate earlier caches and records of configurations that do not use it."""
        import hashlib
        import json

        # Review settings change who signs a case off, not what the models predict.
        data = _drop_none(self.model_dump(mode="json", exclude={"review"}))
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


_DEVICE = re.compile(r"cpu|cuda(:\d+)?|mps")


def check_device(device: str) -> None:
    """ValueError when ``device`` names an accelerator this machine does not have. Called where models are built
    (:class:`agent.runtime.Runtime`, the CLI before a local run), not when a configuration loads: a Ray driver on a
    CPU-only head node validates a ``device=cuda`` configuration for its GPU actors."""
    if device == "cpu":
        return
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device={device}: CUDA is not available on this machine ({why}); use device=cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"device={device}: there is no GPU {index} (this machine has {torch.cuda.device_count()}: cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device=mps: Apple MPS is not available on this machine; use device=cpu")


ARTIFACT_FIELDS: dict[str, str] = {
    "encoder.clinical_probe": "head",
    "modality.head": "head",
    "modality.imagenet_probe": "head",
    "modality.encoder": "",
    "morphology.heads": "head",
    "retrieval.kb_index": "index",
    "retrieval.case_index": "index",
    "retrieval.expert_case_index": "index",
    "reasoner.fusion": "calibration",
    "verifier.consistency_model": "head",
}
"""Settings that name an artifact (registry id, source URI or local path) → the registry role of their valid ids."""


def check_references(config: AgentConfig, skip: typing.Iterable[str] = ()) -> None:
    """ValueError, one plain line naming the setting and the valid ids of its kind (and the likely one), for the first
    artifact setting (:data:`ARTIFACT_FIELDS`, less ``skip``) that is neither a registered id, a source URI nor an
    existing path. For callers that build the models themselves: a test double given for a role needs no artifact."""
    from models.registry import SCHEMES, load_registry

    registry = load_registry()
    for key, role in ARTIFACT_FIELDS.items():
        section, _, name = key.partition(".")
        ref = getattr(getattr(config, section), name)
        if key in skip or ref is None or ref in registry or ref.partition(":")[0] in SCHEMES or Path(ref).expanduser().exists():
            continue
        ids = sorted(i for i, spec in registry.items() if not role or spec.role == role)
        close = difflib.get_close_matches(ref, ids, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ValueError(f"{key}={ref}: not a registered model id, a source URI ({', '.join(s + ':' for s in SCHEMES)}) or an existing path"
                         f"{hint} (registered {role or 'model'} ids: {', '.join(ids)})")


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        if node.get(part) is None:  # a missing or disabled (None) section starts empty
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ValueError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def _override_items(overrides: list[str] | None) -> list[tuple[str, Any]]:
    """``["reasoner.num_samples=5"]`` → ``[("reasoner.num_samples", 5)]``; values are parsed as YAML."""
    out = []
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            out.append((key.strip(), yaml.safe_load(raw)))
        except yaml.YAMLError as exc:
            raise ValueError(f"override {item!r}: value is not valid YAML ({_one_line(exc)})") from None
    return out


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["reasoner.num_samples=5", "device=cuda"]`` → nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for key, value in _override_items(overrides):
        _set_dotted(out, key, value)
    return out


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> AgentConfig:
    """Load an AgentConfig from YAML (optional) plus dotted overrides. Unknown keys raise a ValidationError."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"--config {p}: {'is a directory' if p.is_dir() else 'no such file'}; give a YAML file")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8-sig")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ValueError(f"{p}: not valid YAML ({_one_line(exc)})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: top level must be a mapping")
        data = loaded
    # Overrides apply to the validated file, defaults filled in, so that a dotted key inside a defaulted section
    # (encoder.second_expert.options.views) keeps that section's other defaults.
    return apply_overrides(_validate(data), overrides)


def apply_overrides(config: AgentConfig, overrides: list[str] | None) -> AgentConfig:
    """A copy of ``config`` with dotted overrides applied (validated like a loaded file). Each override sets the value
    at its path and keeps the rest: ``encoder.second_expert.options.views=[]`` keeps the expert's model and other
    options, while ``verifier.target_accuracy={clinical: 0.85}`` replaces the whole mapping. ``routing.<modality>.<key>``
    starts from the shipped routing (DEFAULT_ROUTING) when the configuration has none, so it changes that one key."""
    if not overrides:
        return config
    data = config.model_dump()
    items = _override_items(overrides)
    if data.get("routing") is None and any(key.startswith("routing.") for key, _ in items):
        data["routing"] = {m: r.model_dump() for m, r in DEFAULT_ROUTING.items()}
    for key, value in items:
        _set_dotted(data, key, value)
    out = _validate(data)
    if out.routing == DEFAULT_ROUTING:
        out.routing = None  # the shipped table: same behaviour, and the same fingerprint as the default
    return out


def _validate(data: dict[str, Any]) -> AgentConfig:
    """``AgentConfig.model_validate`` whose unknown-key errors name the section's valid keys and the likely one."""
    return validate_explained(AgentConfig, data)


M = typing.TypeVar("M", bound=BaseModel)


def validate_explained(cls: type[M], data: Any) -> M:
    """``cls.model_validate(data)``; a ValidationError's unknown keys (``extra_forbidden``) get the valid keys of their
    section and the likely one (difflib), the rest of each error as pydantic wrote it. Shared by the trainers' configs."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ValidationError.from_exception_data(exc.title, [_explain(cls, e) for e in exc.errors()]) from None


def _explain(cls: type[BaseModel], err: Any) -> dict[str, Any]:
    """A pydantic error as ``from_exception_data`` takes it; an unknown key gets the valid keys and a close match."""
    loc = tuple(err["loc"])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        valid = _section_keys(cls, loc[:-1])
        if valid:
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            where = f"keys of {'.'.join(map(str, loc[:-1]))}" if loc[:-1] else "top-level keys"
            msg = f"{msg}; {hint}valid {where}: {', '.join(valid)}"
    # No context: pydantic leaves the message as it is (braces in it are not placeholders).
    return {"type": PydanticCustomError(err["type"], msg), "loc": loc, "input": err.get("input")}


def _section_keys(cls: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the model at ``loc`` inside ``cls`` ([] when ``loc`` is not a model)."""
    t: Any = cls
    for part in loc:
        t = _unwrap(t)
        if _is_model(t) and part in t.model_fields:
            t = t.model_fields[part].annotation
        elif typing.get_origin(t) is dict:  # routing: the part is a modality, the value a Route
            t = typing.get_args(t)[1]
        else:
            return []
    t = _unwrap(t)
    return list(t.model_fields) if _is_model(t) else []


def _unwrap(t: Any) -> Any:
    """``X | None`` → X."""
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return args[0] if len(args) == 1 else t
    return t


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)
