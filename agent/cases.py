"""Persisted cases for :class:`agent.Agent`: a checkpointer holds every case run with a thread id, so a
case paused for review (agent.review) survives the process and can be resumed, listed and read."""

from __future__ import annotations

import threading
import uuid
from typing import Any

from agent.diagnosis import Diagnosis
from agent.state import CaseState


class PersistedCases:
    """Mixed into Agent (which provides ``config``, ``runtime``, ``_versions``): case store, resume, pending."""

    _saver = None
    _persistent_graph = None
    _locks_guard = threading.Lock()

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

    def _diagnose_persisted(self, state: CaseState, thumb: str, thread_id: str | None, review) -> Diagnosis:
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

    @staticmethod
    def _thread(thread_id: str, review: dict | None = None) -> dict:
        cfg: dict[str, Any] = {"configurable": {"thread_id": thread_id}}
        if review is not None:
            # The review request records it, so that a resume in any later process applies the same policy.
            cfg["configurable"]["review"] = review
        return cfg

    def _lock(self, thread_id: str) -> threading.Lock:
        """One lock per case: a case runs in one thread at a time (per process)."""
        with self._locks_guard:
            locks = self.__dict__.setdefault("_case_locks", {})
            return locks.setdefault(thread_id, threading.Lock())

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
            from agent.diagnosis import versions

            self._versions = versions(self.config)
        d = Diagnosis.from_state(state, self._versions, thumbnail=thumbnail, case_id=thread_id, request=request)
        if request is None and snap.next:
            if self._lock(thread_id).locked():
                d.status, d.verdict, d.reasons = "running", "pending", [f"running: {', '.join(snap.next)} next"]
            else:
                # Neither paused, finished nor running here: the process that ran it stopped (its last checkpoint is kept).
                d.status, d.verdict = "incomplete", "abstain"
                d.reasons = [f"the run stopped before {', '.join(snap.next)} (process stopped); run the case again"]
        return d

    def resume(self, thread_id: str, decision) -> Diagnosis:
        """Continue a paused case with a reviewer's decision (a ``ReviewDecision`` or a dict of its fields).

        Raises KeyError (unknown case), ValueError (not awaiting review, or an unknown diagnosis code) or a
        pydantic ValidationError (findings outside the 7-point vocabulary)."""
        from langgraph.types import Command

        from models.vocabulary import HAM_CLASSES
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

