"""The graph as the LangGraph server runs it (``langgraph.json`` → graph id ``dermgraph``).

``make_graph`` compiles the agent graph *without* a checkpointer (the server brings its own) behind a
narrow input schema: ``image`` (a local path, base64, or a ``data:`` URL), optional ``question`` and
``metadata``. A first node, ``load``, validates the image with the agent's input boundary
(agent.imageio) and fills the case's input fields. Review pauses use the same ``review`` node and
``interrupt()`` as the Python API: set ``review.when`` in the config (``$DERMGRAPH_CONFIG``) or per run
with ``config={"configurable": {"review": {"when": "always"}}}``.

Environment: ``DERMGRAPH_CONFIG`` (agent config YAML), ``DERMGRAPH_BACKENDS`` (tests: ``module:callable``
returning backend doubles). Models load once per server process, on the first case.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import threading
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from agent.imageio import ImageInputError, load_image
from agent.state import CaseState, PatientMetadata

_DATA_URL = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,", re.I)
_B64 = re.compile(r"^[A-Za-z0-9+/=\s_-]+$")


class ServerInput(BaseModel):
    """What a client sends to start a case."""

    image: str = Field(description="A local path the server can read, base64-encoded image bytes, or a data:image/...;base64, URL.")
    question: str | None = Field(None, max_length=2000)
    metadata: PatientMetadata | None = Field(None, description="Optional patient context (age, sex, site, fitzpatrick, history).")


def decode_image_input(value: str) -> bytes | Path:
    """A data URL or base64 → bytes; an existing or path-like string → a path. Errors never echo base64 content."""
    if not isinstance(value, str) or not value.strip():
        raise ImageInputError("<input>", "image must be a non-empty string (path, base64 or data URL)")
    v = value.strip()
    if _DATA_URL.match(v):
        v = v.split(",", 1)[1]
    elif len(v) < 16 or Path(v).expanduser().exists() or not _B64.match(v) or len("".join(v.split())) % 4:
        return Path(v)
    try:
        return base64.b64decode(v, validate=False)
    except (binascii.Error, ValueError):
        raise ImageInputError("<base64>", "invalid base64 image data") from None


def load_input(state: CaseState) -> dict[str, Any]:
    """The server's input boundary: decode and validate the image, fill the case's input fields."""
    loaded = load_image(decode_image_input(state.image) if isinstance(state.image, str) else state.image)
    return {
        "image": loaded.image,
        "image_sha256": loaded.sha256,
        "image_size": tuple(loaded.image.size),
        "input_warnings": list(loaded.warnings),
    }


_runtime = None
_lock = threading.Lock()


def runtime():
    """One Runtime (models) per server process, built from ``$DERMGRAPH_CONFIG`` and ``$DERMGRAPH_BACKENDS``."""
    global _runtime
    with _lock:
        if _runtime is None:
            from agent.config import load_config
            from agent.runtime import Runtime
            from serve.backends import load_backends

            _runtime = Runtime(load_config(os.environ.get("DERMGRAPH_CONFIG") or None), load_backends())
        return _runtime


def make_graph(config: dict | None = None):
    """Graph factory for ``langgraph.json``: no checkpointer compiled in."""
    from agent.graph import builder

    return builder(runtime(), input_schema=ServerInput, first=("load", load_input)).compile()
