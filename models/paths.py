"""Where things live: the user cache for resolved weights and the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent
ARTIFACTS = PACKAGE_ROOT / "artifacts"
"""Small trained artifacts shipped with the package (heads, calibration, compact indexes)."""


def cache_dir() -> Path:
    """Cache for resolved weights: ``$DERMGRAPH_CACHE``, else ``$XDG_CACHE_HOME/dermgraph``, else ``~/.cache/dermgraph``."""
    env = os.environ.get("DERMGRAPH_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dermgraph"


def data_dir() -> Path:
    """The shared data folder: ``$DERMGRAPH_DATA``, else ``../shared/data`` seen from the working directory
    or from the repository checkout (the layout the project's CI uses)."""
    env = os.environ.get("DERMGRAPH_DATA")
    if env:
        return Path(env).expanduser()
    for base in (Path.cwd(), PACKAGE_ROOT.parent):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return Path.cwd().parent / "shared" / "data"
