"""Evaluation protocols, registered by task name and imported lazily (``module:function``).

Each protocol is ``run(ctx: ProtocolContext) -> ProtocolResult`` (see :mod:`evals.base`), made of two steps:
``predict(ctx) -> Predictions`` (one cached record per case, computing the missing ones through the cache:
:func:`evals.predictions.ensure_predictions` for the agent-backed protocols, :func:`evals.fill.cached_map`
for the model-backed ones) and ``score_predictions(ctx, predictions) -> ProtocolResult`` (records only, no model
runs), so a score can be recomputed or tested from records alone. The cases are loaded by :mod:`evals.benchmark`
before; a protocol whose steps derive more from the context (its options, sampled cases, candidates) has a
``load(ctx)`` both steps call.
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
    "reasoner": "evals.protocols.reasoner:run",
}


def get_protocol(task: str) -> ProtocolFn:
    """The protocol function of ``task``; unknown tasks fail with the list of valid ones."""
    if task not in PROTOCOLS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(PROTOCOLS)}")
    module, _, name = PROTOCOLS[task].partition(":")
    return getattr(importlib.import_module(module), name)
