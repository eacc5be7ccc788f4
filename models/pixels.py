"""The identity of an image's pixels, shared by the agent's image loader and the replay backends."""

from __future__ import annotations

import hashlib
from typing import Any


def pixel_sha256(im: Any) -> str:
    """Hex SHA-256 of an RGB PIL image's size and raw pixels (container- and metadata-independent)."""
    if im.mode != "RGB":
        im = im.convert("RGB")
    h = hashlib.sha256(f"RGB {im.width}x{im.height}\n".encode("ascii"))
    h.update(im.tobytes())
    return h.hexdigest()
