"""The graph as the LangGraph server runs it (``langgraph.json`` → graph id ``dermgraph``).

``make_graph`` compiles the agent graph *without* a checkpointer (the server brings its own) behind a
narrow input schema: ``image`` (base64 or a ``data:`` URL; a local path only when
``DERMGRAPH_ALLOW_IMAGE_PATHS=1``), optional ``question`` and ``metadata``. A first node, ``load``, checks
them against the config's ``limits`` and the image with the agent's input boundary (agent.imageio) and
fills the case's input fields. Review pauses use the same ``review`` node and
``interrupt()`` as the Python API: set ``review.when`` in the config (``$DERMGRAPH_CONFIG``) or per run
with ``config={"configurable": {"review": {"when": "always"}}}``.

Environment: ``DERMGRAPH_CONFIG`` (agent config YAML), ``DERMGRAPH_BACKENDS`` (tests: ``module:callable``
returning backend doubles), ``DERMGRAPH_ALLOW_IMAGE_PATHS`` (``1``: accept file paths the server can read;
off by default, since any client could read the server's images and probe which files exist). Models
load once per server process, on the first case.
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
from agent.limits import InputLimits, check_metadata, check_question
from agent.state import CaseState, PatientMetadata

ENV_ALLOW_PATHS = "DERMGRAPH_ALLOW_IMAGE_PATHS"
_DATA_URL = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,", re.I)
_B64 = re.compile(r"^[A-Za-z0-9+/=\s_-]+$")


class ServerInput(BaseModel):
    """What a client sends to start a case."""

    image: str = Field(description=f"Base64-encoded image bytes or a data:image/...;base64, URL (a local path only with {ENV_ALLOW_PATHS}=1).")
    question: str | None = Field(None, description="Up to the config's limits.max_question_chars (4000 by default).")
    metadata: PatientMetadata | None = Field(None, description="Optional patient context (age, sex, site, fitzpatrick, history).")


def paths_allowed() -> bool:
    return os.environ.get(ENV_ALLOW_PATHS, "").strip().lower() in ("1", "true", "yes", "on")


def decode_image_input(value: str, allow_paths: bool | None = None) -> bytes | Path:
    """A data URL or base64 → bytes; with paths allowed (``$DERMGRAPH_ALLOW_IMAGE_PATHS``), an existing or
    path-like string → a path. Errors never echo base64 content."""
    if not isinstance(value, str) or not value.strip():
        raise ImageInputError("<input>", "image must be a non-empty string (base64 or data URL)")
    allow = paths_allowed() if allow_paths is None else allow_paths
    v = value.strip()
    if _DATA_URL.match(v):
        v = v.split(",", 1)[1]
    elif not _B64.match(v) or len("".join(v.split())) % 4 or (allow and (len(v) < 16 or Path(v).expanduser().exists())):
        if allow:
            return Path(v)
        # Decided from the string alone, never the file system: no answer tells whether a file exists.
        raise ImageInputError("<input>", f"image must be base64 or a data:image/...;base64, URL (file paths are off; {ENV_ALLOW_PATHS}=1 on the server allows them)")
    try:
        return base64.b64decode(v, validate=False)
    except (binascii.Error, ValueError):
        raise ImageInputError("<base64>", "invalid base64 image data") from None


def load_input(state: CaseState) -> dict[str, Any]:
    """The server's input boundary: the question and metadata within the config's limits, the image decoded
    and validated; fills the case's input fields."""
    limits = runtime().config.limits or InputLimits()
    check_question(state.question, limits)
    check_metadata(state.metadata, limits)
    loaded = load_image(decode_image_input(state.image) if isinstance(state.image, str) else state.image, max_pixels=limits.max_image_pixels)
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
