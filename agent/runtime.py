"""Backends the nodes call, created lazily from the config on first use (never at import)."""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any, Protocol

from agent.config import DEFAULT_CONCEPT_HEADS, AgentConfig, BackendRef
from models.resolve import resolve_artifact

if TYPE_CHECKING:
    from models.heads import HeadSet
    from models.protocols import LLM, VLM, ImageClassifier, TextEmbedder
    from models.stacker import FusionModel


def _backend(kind: str, ref: BackendRef, device: str) -> Any:
    from models.backends import create, resolve_class

    kwargs = dict(ref.options)
    cls = resolve_class(kind, ref.backend)
    # Local backends take a device; remote ones (openai-compatible) do not.
    if "device" in inspect.signature(cls).parameters:
        kwargs.setdefault("device", device)
    if ref.backend == "sklesion":
        kwargs.setdefault("weights", None if ref.model == "sklesion-xception" else ref.model)
    else:
        kwargs.setdefault("model", ref.model)
    return create(kind, ref.backend, **kwargs)


class Backends(Protocol):
    """What a node may use: the configuration and the backends, by role. :class:`Runtime` is the real one."""

    config: AgentConfig
    classifier: ImageClassifier
    second_expert: Any
    clinical_probe: Any
    modality_probe: Any
    modality_heads: HeadSet
    modality_encoder: Any
    concept_heads: HeadSet
    vlm: VLM
    text_embedder: TextEmbedder
    kb: Any
    knowledge: Any
    consistency_model: Any
    cases: Any
    expert_cases: Any
    llm: LLM
    fusion: FusionModel


class Runtime:
    """Holds the agent's backends. Each property builds its backend once, when a node first needs it.

    Ready-made backends (test doubles, a served model) are given by role in ``overrides``, e.g.
    ``{"llm": TestLLM()}``; a key that names no role is an error listing the valid ones.
    """

    def __init__(self, config: AgentConfig, overrides: dict[str, Any] | None = None):
        self.config = config
        self._overrides = dict(overrides or {})
        self._device_checked = False
        unknown = sorted(set(self._overrides) - set(BACKEND_ROLES))
        if unknown:
            raise ValueError(f"unknown backend role(s) {', '.join(map(repr, unknown))}; valid: {', '.join(BACKEND_ROLES)}")

    def _get(self, name: str, build):
        if name in self._overrides:
            return self._overrides[name]
        if not self._device_checked:  # before the first model loads: a missing GPU is one clear error, not torch's
            from agent.config import check_device

            check_device(self.config.device)
            self._device_checked = True
        return build()

    @functools.cached_property
    def classifier(self):
        return self._get("classifier", lambda: _backend("classifier", self.config.encoder.classifier, self.config.device))

    @functools.cached_property
    def second_expert(self):
        """The second visual expert (``encoder.second_expert``), or None when the configuration has none."""
        ref = self.config.encoder.second_expert
        return self._get("second_expert", lambda: None if ref is None else _backend("classifier", ref, self.config.device))

    @functools.cached_property
    def imagenet_encoder(self):
        """EfficientNet-Lite0 with its ImageNet weights (pooled features and stage statistics), shared by the probes that
        read them, so a case pays one pass for both (:class:`models.probe.ImageNetEncoder`)."""

        def build():
            from models.probe import ImageNetEncoder

            return ImageNetEncoder(self.config.device, stages=True)

        return self._get("imagenet_encoder", build)

    def _probe(self, ref: str | None, setting: str, kinds: tuple[str, ...], classes: set[str] | None = None):
        """The :class:`models.probe.FeatureProbe` ``ref`` names, refused (one clear error, at load) unless it reads one of
        ``kinds`` and, with ``classes``, predicts exactly those; stage-feature probes share :attr:`imagenet_encoder`."""
        if ref is None:
            return None
        from models.probe import FeatureProbe

        probe = FeatureProbe(resolve_artifact(ref), self.config.device)
        if probe.kind not in kinds or (classes is not None and set(probe.classes) != classes):
            raise ValueError(f"{setting} {ref!r} is a probe of {probe.kind} over {probe.classes[:6]}{' ...' if len(probe.classes) > 6 else ''}; "
                             f"{setting} needs one reading {' or '.join(kinds)}" + (f" over {sorted(classes)}" if classes is not None else ""))
        if probe.stages:  # a pooled-features-only probe keeps its own encoder (it reads a different output)
            probe.imagenet = self.imagenet_encoder
        return probe

    @functools.cached_property
    def clinical_probe(self):
        """The clinical feature probe (``encoder.clinical_probe``, :class:`models.probe.FeatureProbe`), or None."""
        from models.probe import PROBE_FEATURES, PROBE_STAGE_FEATURES

        ref = self.config.encoder.clinical_probe
        return self._get("clinical_probe", lambda: self._probe(ref, "encoder.clinical_probe", (PROBE_FEATURES, PROBE_STAGE_FEATURES)))

    @functools.cached_property
    def modality_probe(self):
        """The modality probe (``modality.imagenet_probe``, :class:`models.probe.FeatureProbe` on ImageNet features), or None
        (none configured, or its ``imagenet_weight`` is 0: nothing loads and no pass is spent on it)."""
        from models.probe import IMAGENET_STAGE_FEATURES
        from models.vocabulary import MODALITIES

        cfg = self.config.modality
        return self._get("modality_probe", lambda: self._probe(cfg.imagenet_probe, "modality.imagenet_probe", (IMAGENET_STAGE_FEATURES,), set(MODALITIES))
                         if cfg.imagenet_weight > 0 else None)  # fmt: skip

    @functools.cached_property
    def modality_heads(self):
        from models.heads import HeadSet

        return self._get("modality_heads", lambda: HeadSet.load(resolve_artifact(self.config.modality.head)))

    @functools.cached_property
    def modality_encoder(self):
        """The fine-tuned encoder the modality head needs, or None when it reads the shared features.

        A head trained on tuned features records the encoder's sha256; a missing or different encoder is an error."""

        def build():
            needed = self.modality_heads.meta.get("encoder_sha256")
            ref = self.config.modality.encoder
            if ref is None:
                if needed:
                    raise ValueError(
                        f"modality head {self.config.modality.head!r} was trained on the features of fine-tuned encoder "
                        f"{self.modality_heads.meta.get('encoder')!r}: set modality.encoder to it"
                    )
                return None
            from models.finetuned_encoder import FinetunedEncoder
            from models.resolve import sha256_file

            if not needed:
                raise ValueError(f"modality head {self.config.modality.head!r} was trained on the shared encoder's features; unset modality.encoder")
            path = resolve_artifact(ref)
            if sha256_file(path) != needed:
                raise ValueError(f"modality.encoder {ref!r} is not the encoder modality head {self.config.modality.head!r} was trained with (sha256 differs)")
            return FinetunedEncoder(path, device=self.config.device)

        return self._get("modality_encoder", build)

    @functools.cached_property
    def concept_heads(self):
        from models.heads import HeadSet

        return self._get("concept_heads", lambda: HeadSet.load(resolve_artifact(self.config.morphology.heads)))

    @functools.cached_property
    def vlm(self):
        ref = self.config.morphology.vlm
        if ref is None and "vlm" not in self._overrides:
            raise ValueError("morphology.kind='vlm' needs morphology.vlm = {backend: ..., model: ...}")
        return self._get("vlm", lambda: _backend("vlm", ref, self.config.device))

    @functools.cached_property
    def text_embedder(self):
        def build():
            from models.backends.sentence import SentenceEmbedder

            return SentenceEmbedder(model=self.config.retrieval.text_embedder, device=self.config.device)

        return self._get("text_embedder", build)

    @functools.cached_property
    def kb(self):
        def build():
            from retrieval.kb import KBRetriever

            return KBRetriever(resolve_artifact(self.config.retrieval.kb_index), self.text_embedder)

        return self._get("kb", build)

    @functools.cached_property
    def knowledge(self):
        """The knowledge base entries (expected morphology per diagnosis, names, aliases)."""

        def build():
            from retrieval.kb import KnowledgeBase

            return KnowledgeBase()

        return self._get("knowledge", build)

    @functools.cached_property
    def consistency_model(self):
        """The trained consistency verifier named by ``verifier.consistency_model``."""

        def build():
            from models.verifier import ConsistencyModel

            ref = self.config.verifier.consistency_model
            if ref is None:
                raise ValueError("verifier.consistency_model is not set")
            return ConsistencyModel.load(resolve_artifact(ref))

        return self._get("consistency_model", build)

    @functools.cached_property
    def cases(self):
        def build():
            from retrieval.cases import CaseRetriever

            return CaseRetriever(resolve_artifact(self.config.retrieval.case_index))

        return self._get("cases", build)

    @functools.cached_property
    def expert_cases(self):
        """The case index over the second visual expert's features (``retrieval.expert_case_index``), or None."""

        def build():
            from retrieval.cases import CaseRetriever

            ref = self.config.retrieval.expert_case_index
            return None if ref is None else CaseRetriever(resolve_artifact(ref))

        return self._get("expert_cases", build)

    @functools.cached_property
    def llm(self):
        return self._get("llm", lambda: _backend("llm", self.config.reasoner.llm, self.config.device))

    @functools.cached_property
    def fusion(self):
        """The fusion artifact (:class:`models.stacker.FusionModel`), refused if its findings model was fitted on another
        describer's findings than ``morphology.kind`` gives."""
        from models.stacker import FusionModel

        def load():
            model = FusionModel.load(resolve_artifact(self.config.reasoner.fusion))
            fitted = model.meta.get("findings_from", "concept-heads")
            given = {"concept-heads": "concept-heads", "second-expert": "effnet"}.get(self.config.morphology.kind)
            if model.morphology_expert is not None and given is not None and fitted != given:
                raise ValueError(f"fusion artifact {self.config.reasoner.fusion!r} was fitted on {fitted} findings but morphology.kind is "
                                 f"{self.config.morphology.kind!r}: refit it (dermgraph train fusion --set findings_from={given}) or set morphology.kind")
            heads = model.meta.get("findings_heads", DEFAULT_CONCEPT_HEADS)  # artifacts from before the field: the shipped heads
            if model.morphology_expert is not None and given == "concept-heads" and heads != self.config.morphology.heads:
                raise ValueError(f"fusion artifact {self.config.reasoner.fusion!r} was fitted on the findings of concept heads {heads!r} but "
                                 f"morphology.heads is {self.config.morphology.heads!r} (findings_heads): refit it on those heads' findings "
                                 "(python -m training.fusion_data --agent-config <yours>, then dermgraph train fusion) or set morphology.heads")
            return model

        return self._get("fusion", load)


BACKEND_ROLES: tuple[str, ...] = tuple(n for n, v in vars(Runtime).items() if isinstance(v, functools.cached_property))
"""The roles ``Agent(backends=...)`` accepts (the :class:`Backends` members a node may use)."""
