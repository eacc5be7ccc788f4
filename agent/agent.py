"""``Agent``: the public entry point (``diagnose``, ``stream``)."""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

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


class Agent:
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
        self._saver = None
        self._persistent_graph = None
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    @property
    def graph(self):
        if self._graph is None:
            from agent.graph import build_graph

            self._graph = build_graph(self.runtime)
        return self._graph

    @property
    def checkpointer(self):
        """Where persisted cases live (``review.checkpointer``; SQLite by default). Opened on first use."""
        if self._saver is None:
            from agent.config import ReviewConfig
            from agent.persistence import open_checkpointer

            self._saver = open_checkpointer((self.config.review or ReviewConfig()).checkpointer)
        return self._saver

    @property
    def persistent_graph(self):
        """The graph compiled with the checkpointer: cases can pause for review and survive the process."""
        if self._persistent_graph is None:
            from agent.graph import build_graph

            self._persistent_graph = build_graph(self.runtime, checkpointer=self.checkpointer)
        return self._persistent_graph

    def _initial_state(self, img, question, metadata) -> tuple[CaseState, str]:
        from agent.imageio import load_image, thumbnail_data_uri

        loaded = load_image(img)
        meta = metadata if isinstance(metadata, PatientMetadata) or metadata is None else PatientMetadata.model_validate(metadata)
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
        return Diagnosis.from_state(final, self._versions, thumbnail=thumb)

    def diagnose(
        self,
        img,
        question: str | None = None,
        metadata: dict | PatientMetadata | None = None,
        *,
        thread_id: str | None = None,
        review: str | dict | None = None,
    ) -> Diagnosis:
        """Diagnose one image (path, bytes, PIL image or array). Raises ``ImageInputError`` for unreadable input.

        With a ``thread_id`` or a review policy (``review="always"``, ``{"when": "on_abstain", "where": "morphology"}``,
        or the config's ``review`` section) the case is persisted in the checkpointer under that id (a new
        uuid when none is given) and may come back with ``status == "awaiting_review"`` and its
        ``review_request``; continue it with :meth:`resume`."""
        state, thumb = self._initial_state(img, question, metadata)
        configured = self.config.review is not None and self.config.review.when != "never"
        if thread_id is None and review is None and not configured:
            final = self.graph.invoke(state)
            return self._finish(CaseState.model_validate(final) if isinstance(final, dict) else final, thumb)
        from agent.persistence import check_case_id
        from agent.review import policy

        thread_id = check_case_id(thread_id) if thread_id is not None else uuid.uuid4().hex
        pol = policy(self.runtime, {"configurable": {"review": review}})
        with self._lock(thread_id):
            if self.persistent_graph.get_state(self._thread(thread_id)).values:
                raise ValueError(f"case {thread_id!r} already exists")
            cfg = self._thread(thread_id, pol.model_dump())
            self.persistent_graph.invoke(state, cfg)
        return self.case(thread_id, thumbnail=thumb)

    # --- persisted cases (review) ---------------------------------------------------------------

    @staticmethod
    def _thread(thread_id: str, review: dict | None = None) -> dict:
        cfg: dict[str, Any] = {"configurable": {"thread_id": thread_id}}
        if review is not None:
            # The review request records it, so that a resume in any later process applies the same policy.
            cfg["configurable"]["review"] = review
        return cfg

    def _lock(self, thread_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(thread_id, threading.Lock())

    def case(self, thread_id: str, thumbnail: str | None = None) -> Diagnosis:
        """The current Diagnosis of a persisted case (``status`` says whether it awaits review). KeyError if unknown."""
        from agent.persistence import check_case_id
        from agent.review import ReviewRequest

        snap = self.persistent_graph.get_state(self._thread(check_case_id(thread_id)))
        if not snap.values:
            raise KeyError(f"no case {thread_id!r}")
        state = CaseState.model_validate(snap.values)
        request = ReviewRequest.model_validate(snap.interrupts[0].value) if snap.interrupts else None
        if self._versions is None:
            self._versions = versions(self.config)
        d = Diagnosis.from_state(state, self._versions, thumbnail=thumbnail, case_id=thread_id, request=request)
        if request is None and snap.next:
            # Neither paused nor finished: the process running it stopped (its last checkpoint is kept).
            d.status, d.verdict = "incomplete", "abstain"
            d.reasons = [f"the run stopped before {', '.join(snap.next)} (process stopped); run the case again"]
        return d

    def resume(self, thread_id: str, decision) -> Diagnosis:
        """Continue a paused case with a reviewer's decision (a ``ReviewDecision`` or a dict of its fields).

        Raises KeyError (unknown case), ValueError (not awaiting review, or an unknown diagnosis code) or a
        pydantic ValidationError (findings outside the 7-point vocabulary)."""
        from langgraph.types import Command

        from agent.labels import HAM_CLASSES
        from agent.persistence import check_case_id
        from agent.review import NotAwaitingReview, ReviewDecision

        check_case_id(thread_id)
        decision = decision if isinstance(decision, ReviewDecision) else ReviewDecision.model_validate(decision)
        with self._lock(thread_id):
            snap = self.persistent_graph.get_state(self._thread(thread_id))
            if not snap.values:
                raise KeyError(f"no case {thread_id!r}")
            if not snap.interrupts:
                raise NotAwaitingReview(f"case {thread_id!r} is not awaiting review")
            request = snap.interrupts[0].value
            if decision.findings and not request.get("findings"):
                raise ValueError(f"case {thread_id!r} has no 7-point findings to correct (modality {request.get('modality')}); confirm or override the diagnosis")
            if decision.diagnosis:
                known = set(HAM_CLASSES) | {d["label"] for d in request.get("differential", [])}
                if decision.diagnosis not in known and self.runtime.knowledge.entry_for_label(decision.diagnosis) is None:
                    raise ValueError(f"unknown diagnosis {decision.diagnosis!r}: use a HAM10000 code ({', '.join(HAM_CLASSES)}), a differential label or a knowledge-base label")
            review = request.get("policy") or None
            self.persistent_graph.invoke(Command(resume=decision.model_dump(mode="json")), self._thread(thread_id, review))
        return self.case(thread_id)

    def case_ids(self) -> list[str]:
        """Every persisted case, oldest first."""
        from agent.persistence import thread_ids

        return thread_ids(self.checkpointer)

    def pending(self) -> list:
        """Review requests of every case awaiting review, oldest first."""
        from agent.review import ReviewRequest

        out = []
        for tid in self.case_ids():
            snap = self.persistent_graph.get_state(self._thread(tid))
            if snap.interrupts:
                out.append(ReviewRequest.model_validate(snap.interrupts[0].value))
        return out

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
