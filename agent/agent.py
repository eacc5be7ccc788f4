"""``Agent``: the public entry point (``diagnose``, ``stream``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from agent.cases import PersistedCases
from agent.config import AgentConfig, apply_overrides, load_config
from agent.diagnosis import Diagnosis, model_hashes, versions  # noqa: F401  (versions: also imported from here)
from agent.state import CaseState, PatientMetadata, TraceEntry


@dataclass
class StepEvent:
    """Emitted by ``Agent.stream`` after each node; the last event carries the Diagnosis."""

    node: str
    entry: TraceEntry | None
    diagnosis: Diagnosis | None = None


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
        self._graphs: dict[tuple[str | None, str | None], Any] = {}
        self._versions: dict[str, Any] | None = None

    @property
    def graph(self):
        """The whole compiled graph."""
        return self.graph_part()

    def graph_part(self, start_at: str | None = None, stop_after: str | None = None):
        """The compiled graph from node ``start_at`` to node ``stop_after`` (see ``agent.graph.build_graph``)."""
        key = (start_at, stop_after)
        if key not in self._graphs:
            from agent.graph import build_graph

            self._graphs[key] = build_graph(self.runtime, start_at=start_at, stop_after=stop_after)
        return self._graphs[key]

    def prepare(self, img, question: str | None = None, metadata: dict | PatientMetadata | None = None, *, exclude_cases=()) -> CaseState:
        """The input state of a case: the question and metadata checked against the config's input limits,
        the image read and validated (``ImageInputError`` if it cannot be); ``exclude_cases``: case-index ids
        retrieval must never return (leave-one-out evaluation)."""
        from agent.imageio import load_image
        from agent.limits import InputLimits, check_metadata, check_question

        limits = self.config.limits or InputLimits()
        question = check_question(question, limits)  # text first: cheap, and no model has loaded yet
        meta = check_metadata(metadata, limits)
        loaded = load_image(img, max_pixels=limits.max_image_pixels)
        return CaseState(
            image=loaded.image,
            image_sha256=loaded.sha256,
            image_size=tuple(loaded.image.size),
            input_warnings=list(loaded.warnings),
            question=question,
            metadata=meta,
            exclude_cases=sorted(exclude_cases),
        )

    def run(self, case, question: str | None = None, metadata: dict | PatientMetadata | None = None, *,
            start_at: str | None = None, until: str | None = None) -> CaseState:
        """Run the graph on ``case`` (an image, or a :class:`CaseState` from :meth:`prepare` or built
        from cached outputs) from node ``start_at`` up to and including node ``until``; returns the state.

        >>> state = agent.run("lesion.jpg", until="morphology")    # encode, modality, morphology only
        """
        state = case if isinstance(case, CaseState) else self.prepare(case, question, metadata)
        final = self.graph_part(start_at, until).invoke(state)
        return CaseState.model_validate(final) if isinstance(final, dict) else final

    def _finish(self, final: CaseState, thumb: str | None = None) -> Diagnosis:
        from agent.imageio import thumbnail_data_uri

        if self._versions is None:
            self._versions = versions(self.config)
        shas = model_hashes(self.config)  # per case: a node skipped on the first case may load its model later
        vers = {**self._versions, "sha256": shas} if shas else self._versions
        return Diagnosis.from_state(final, vers, thumbnail=thumb or thumbnail_data_uri(final.image))

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
            return self._finish(self.run(state), thumb)
        return self._diagnose_persisted(state, thumb, thread_id, review)

    def _initial_state(self, img, question, metadata) -> tuple[CaseState, str]:
        """(:meth:`prepare`'s state, its thumbnail): the hook ``agent.batched`` replaces to hand in prepared states."""
        from agent.imageio import thumbnail_data_uri

        state = self.prepare(img, question, metadata)
        return state, thumbnail_data_uri(state.image)

    def stream(self, img, question: str | None = None, metadata: dict | PatientMetadata | None = None) -> Iterator[StepEvent]:
        """Yield a ``StepEvent`` as each node finishes; the final event has ``diagnosis`` set."""
        final = None
        for mode, chunk in self.graph.stream(self.prepare(img, question, metadata), stream_mode=["updates", "values"]):
            if mode == "values":
                final = chunk
                continue
            for node, delta in chunk.items():
                entries = (delta or {}).get("trace") or [None]
                yield StepEvent(node=node, entry=entries[-1])
        state = CaseState.model_validate(final) if isinstance(final, dict) else final
        yield StepEvent(node="__end__", entry=None, diagnosis=self._finish(state))
