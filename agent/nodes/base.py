"""The node contract: a node reads the state, calls its backend and returns its own field."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from pydantic import BaseModel

from agent.runtime import Backends
from agent.state import CaseState, TraceEntry


@dataclass
class NodeOutput:
    """What a node returns: the state update (its own field only) plus what the trace should say."""

    update: dict[str, Any]
    inputs: dict[str, Any] = field(default_factory=dict)
    model_id: str | None = None
    notes: list[str] = field(default_factory=list)


def _summarise(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value


def traced(name: str, fn: Callable[[CaseState, Backends], NodeOutput], backends: Backends) -> Callable[[CaseState], dict[str, Any]]:
    """Bind a node to its backends and make its update carry one trace entry (inputs summary, outputs, model id, timing)."""

    def run(state: CaseState) -> dict[str, Any]:
        started = datetime.now(timezone.utc)
        t0 = time.perf_counter()
        out = fn(state, backends)
        entry = TraceEntry(
            step=len(state.trace) + 1,
            node=name,
            model_id=out.model_id,
            started_at=started,
            duration_s=round(time.perf_counter() - t0, 4),
            inputs=out.inputs,
            outputs={k: _summarise(v) for k, v in out.update.items()},
            notes=out.notes,
        )
        return {**out.update, "trace": [entry]}

    run.__name__ = name
    return run
