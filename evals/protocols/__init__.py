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
from typing import Any

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


def options_model(task: str):
    """The options model of ``task``'s protocol (the agent-backed ones in :mod:`evals.options`, the others their ``Options``)."""
    from evals.options import AGENT_OPTIONS

    if task in AGENT_OPTIONS:
        return AGENT_OPTIONS[task]
    get_protocol(task)  # an unknown task: the list of valid ones
    return getattr(importlib.import_module(PROTOCOLS[task].partition(":")[0]), "Options")


def check_options(task: str, options: dict[str, Any]) -> None:
    """One-line ValueError for an unknown or out-of-range option of ``task`` (:func:`evals.options.validate_options`)."""
    from evals.options import validate_options

    validate_options(task, options, options_model(task))
