"""The ``dermgraph`` JSON record in a safetensors file's metadata: what the project's own weight files carry
(format, base model, training meta), read without loading tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_meta(path: str | Path, expected_format: str | None = None, what: str = "dermgraph file") -> dict[str, Any]:
    """The file's ``dermgraph`` record ({} when it has none); with ``expected_format``, a file whose record names
    another format raises ValueError saying it is not a ``what``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("dermgraph")
    info = json.loads(raw) if raw else {}
    if expected_format is not None and info.get("format") != expected_format:
        raise ValueError(f"{path} is not {what} (metadata format {info.get('format')!r}, expected {expected_format!r})")
    return info
