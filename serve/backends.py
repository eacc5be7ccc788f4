"""Optional backend injection by import path, for tests and benchmarks that run the server with doubles.

``DERMGRAPH_BACKENDS=agent.testing:backends`` (or ``dermgraph serve --backends ...``) names a callable
returning the ``backends=`` mapping of :class:`agent.Agent`. Unset: the configured real models."""

from __future__ import annotations

import importlib
import os
from typing import Any

ENV = "DERMGRAPH_BACKENDS"


def load_backends(spec: str | None = None) -> dict[str, Any] | None:
    spec = spec if spec is not None else os.environ.get(ENV)
    if not spec:
        return None
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"backends {spec!r} must look like 'package.module:callable'")
    factory = getattr(importlib.import_module(module), name)
    out = factory()
    if not isinstance(out, dict):
        raise TypeError(f"{spec} returned {type(out).__name__}, not a dict of backends")
    return out
