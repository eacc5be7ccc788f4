"""Plumbing the model-running protocols share: backend specs, cache keys, progress lines.

A cached prediction is keyed (``evals.cache.case_key``) by what it depends on: the input's content
(sha256 of the image file's bytes, or of the question text for text-only sets), a hash of everything
configurable that produced it (backend, model, backend options, prompt, generation settings) and the
kind of record. Changing any of those misses the cache; re-scoring with the same ones never re-runs
a model.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class BackendSpec(BaseModel):
    """A backend from the ``models.backends`` registry: ``create(kind, backend, model=model, **options)``."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    backend: str = Field(description="Registry name, e.g. 'transformers' or 'openai-compatible'.")
    model: str | None = Field(None, description="Model reference passed as ``model=`` (registry id, local path, ...).")
    options: dict[str, Any] = Field(default_factory=dict, description="Other constructor keyword arguments.")

    def create(self, kind: str) -> Any:
        """Build the backend (weights load lazily, on first use)."""
        from models.backends import create

        kwargs = dict(self.options)
        if self.model is not None:
            kwargs["model"] = self.model
        return create(kind, self.backend, **kwargs)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


def config_hash(obj: Any) -> str:
    """Short stable hash of a JSON-able configuration (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return sha256_text(blob)[:16]


def open_rgb(paths: Any) -> list[Any]:
    """The images at ``paths`` as RGB PIL images, each file closed after decoding."""
    from PIL import Image

    images = []
    for path in paths:
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    return images
