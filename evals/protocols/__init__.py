"""Evaluation protocols, registered by task name and imported lazily (``module:function``).

Each protocol is ``run(ctx: ProtocolContext) -> ProtocolResult`` (see :mod:`evals.base`). The cases are
loaded by :mod:`evals.benchmark` before the protocol runs; the agent-backed protocols (diagnosis, modality,
morphology) and vqa_text then split the rest into ``predict(ctx) -> Predictions`` (cached records, computing the missing
ones) and ``score_predictions(ctx, predictions) -> ProtocolResult`` (no model), so a score can be recomputed or tested from
records alone.
"""

from __future__ import annotations

import importlib

from evals.base import ProtocolFn

PROTOCOLS: dict[str, str] = {
    "diagnosis": "evals.protocols.diagnosis:run",
    "modality": "evals.protocols.modality:run",
    "morphology": "evals.protocols.morphology:run",
    "zero_shot": "evals.protocols.zero_shot:run",
    "linear_probe": "evals.protocols.linear_probe:run",
    "vqa_text": "evals.protocols.vqa_text:run",
}


def get_protocol(task: str) -> ProtocolFn:
    """The protocol function of ``task``; unknown tasks fail with the list of valid ones."""
    if task not in PROTOCOLS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(PROTOCOLS)}")
    module, _, name = PROTOCOLS[task].partition(":")
    return getattr(importlib.import_module(module), name)
