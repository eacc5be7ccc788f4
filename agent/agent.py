"""``Agent``: the public entry point (``diagnose``, ``stream``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from agent.cases import PersistedCases
from agent.config import AgentConfig, apply_overrides, load_config
from agent.diagnosis import Diagnosis
from agent.state import CaseState, PatientMetadata, TraceEntry


@dataclass
class StepEvent:
    """Emitted by ``Agent.stream`` after each node; the last event carries the Diagnosis."""

    node: str
    entry: TraceEntry | None
    diagnosis: Diagnosis | None = None


def versions(config: AgentConfig) -> dict[str, Any]:
    """Package and model versions recorded with every result."""
    from importlib import metadata

    out: dict[str, Any] = {"config": config.fingerprint()}
    for pkg in ("dermgraph", "torch", "transformers", "langgraph", "faiss-cpu"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    out["models"] = {
        "classifier": config.encoder.classifier.model,
        "modality_head": config.modality.head,
        "describer": config.morphology.heads if config.morphology.kind == "concept-heads" else getattr(config.morphology.vlm, "model", None),
        "kb_index": config.retrieval.kb_index,
        "case_index": config.retrieval.case_index,
        "llm": config.reasoner.llm.model,
        "fusion": config.reasoner.fusion,
    }
    return out


def model_hashes(config: AgentConfig) -> dict[str, str]:
    """sha256 of every model artifact this process resolved for ``config`` (role → sha256): the registry's
    verified hash (the wheel for ``pypi:``, the file or directory manifest for ``pkg:``/``path:``), or the hash
    of a local path. Models that were never loaded (test doubles, skipped nodes) are absent."""
    from models.integrity import used_sha256

    refs = {
        "classifier": config.encoder.classifier.model,
        "modality_head": config.modality.head,
        "modality_encoder": config.modality.encoder,
        "describer": config.morphology.heads if config.morphology.kind == "concept-heads" else getattr(config.morphology.vlm, "model", None),
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


class Agent(PersistedCases):
    """The dermgraph agent. Models load lazily on the first case.

    >>> agent = Agent()                                  # shipped offline CPU defaults
    >>> d = agent.diagnose("lesion.jpg", metadata={"age": 60, "sex": "male", "site": "back"})
    >>> d.verdict, d.label, d.differential[:3]
    """

    def __init__(self, config: AgentConfig | str | Path | None = None, *, overrides: list[str] | None = None, backends: dict[str, Any] | None = None):
        if isinstance(config, AgentConfig):
            self.config = apply_overrides(config, overrides)
        else:
            self.config = load_config(config, overrides)
        from agent.runtime import Runtime

        self.runtime = Runtime(self.config, backends)
        self._graph = None
        self._versions: dict[str, Any] | None = None

    @property
    def graph(self):
        if self._graph is None:
            from agent.graph import build_graph

            self._graph = build_graph(self.runtime)
        return self._graph

    def _initial_state(self, img, question, metadata) -> tuple[CaseState, str]:
        from agent.imageio import load_image, thumbnail_data_uri
        from agent.limits import InputLimits, check_metadata, check_question

        limits = self.config.limits or InputLimits()
        question = check_question(question, limits)  # text first: cheap, and no model has loaded yet
        meta = check_metadata(metadata, limits)
        loaded = load_image(img, max_pixels=limits.max_image_pixels)
        state = CaseState(
            image=loaded.image,
            image_sha256=loaded.sha256,
            image_size=tuple(loaded.image.size),
            input_warnings=list(loaded.warnings),
            question=question,
            metadata=meta,
        )
        return state, thumbnail_data_uri(loaded.image)

    def _finish(self, final: CaseState, thumb: str) -> Diagnosis:
        if self._versions is None:
            self._versions = versions(self.config)
        shas = model_hashes(self.config)  # per case: a node skipped on the first case may load its model later
        vers = {**self._versions, "sha256": shas} if shas else self._versions
        return Diagnosis.from_state(final, vers, thumbnail=thumb)

    def diagnose(
        self,
        img,
        question: str | None = None,
        metadata: dict | PatientMetadata | None = None,
        *,
        thread_id: str | None = None,
        review: str | dict | None = None,
    ) -> Diagnosis:
        """Diagnose one image (path, bytes, PIL image or array). Raises ``ImageInputError`` for unreadable input and
        ``agent.limits.InputError`` for a question or metadata outside the configured limits.

        With a ``thread_id`` or a review policy (``review="always"``, ``{"when": "on_abstain", "where": "morphology"}``,
        or the config's ``review`` section) the case is persisted in the checkpointer under that id (a new
        uuid when none is given) and may come back with ``status == "awaiting_review"`` and its
        ``review_request``; continue it with :meth:`resume`."""
        state, thumb = self._initial_state(img, question, metadata)
        configured = self.config.review is not None and self.config.review.when != "never"
        if thread_id is None and review is None and not configured:
            final = self.graph.invoke(state)
            return self._finish(CaseState.model_validate(final) if isinstance(final, dict) else final, thumb)
        return self._diagnose_persisted(state, thumb, thread_id, review)

    def stream(self, img, question: str | None = None, metadata: dict | PatientMetadata | None = None) -> Iterator[StepEvent]:
        """Yield a ``StepEvent`` as each node finishes; the final event has ``diagnosis`` set."""
        state, thumb = self._initial_state(img, question, metadata)
        current = state.model_dump()
        current["image"] = state.image
        for update in self.graph.stream(state, stream_mode="updates"):
            for node, delta in update.items():
                delta = delta or {}
                for key, value in delta.items():
                    current[key] = current.get(key, []) + value if key == "trace" else value
                entries = delta.get("trace") or [None]
                yield StepEvent(node=node, entry=entries[-1])
        final = CaseState.model_validate(current)
        yield StepEvent(node="__end__", entry=None, diagnosis=self._finish(final, thumb))
