"""What every trainer writes besides its weights: a metrics log, the published artifact, a registry
fragment, the shipped artifact it is compared with, and the before/after table.

One way to publish: :func:`publish` copies a file or a directory artifact (with its metrics) to where
the config says, :func:`write_registry_fragment` writes ``<out_dir>/registry.yaml`` with a ``path:``
source relative to that file and the sha256 of a file artifact.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from models.resolve import sha256_file


class MetricsLog:
    """Appends one JSON object per line to ``<out_dir>/metrics.jsonl`` (loss and metrics as they come)."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self._t0 = time.time()

    def log(self, **record: Any) -> None:
        record = {"t": round(time.time() - self._t0, 2), **record}
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")


def publish(written: Path, artifact: Path | None, metrics: dict | None = None, files: Sequence[str] | None = None) -> Path | None:
    """Copy what a trainer wrote in out_dir to ``artifact``: a file (its metrics next to it as
    ``<stem>.metrics.json``), or a directory's ``files`` (default: all its files) into the directory ``artifact``."""
    if artifact is None:
        return None
    artifact, written = Path(artifact), Path(written)
    if written.is_dir():
        artifact.mkdir(parents=True, exist_ok=True)
        for name in files if files is not None else sorted(p.name for p in written.iterdir()):
            if (written / name).is_file():
                shutil.copyfile(written / name, artifact / name)
        if metrics is not None:
            (artifact / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return artifact
    artifact.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(written, artifact)
    if metrics is not None:
        artifact.with_name(artifact.name.split(".")[0] + ".metrics.json").write_text(json.dumps(metrics, indent=2))
    return artifact


def registry_entry(out_dir: Path, model_id: str, weights: Path, *, role: str, licence: str, notes: str, fmt: str = "safetensors") -> dict:
    """One entry in the layout of ``models/registry.yaml``: its ``path:`` source relative to ``out_dir`` (where
    the fragment is written; the registry resolves it from there) and the sha256 of a file artifact (None
    for a directory: the registry verifies files)."""
    rel = Path(os.path.relpath(Path(weights).resolve(), Path(out_dir).resolve()))
    sha = sha256_file(weights) if Path(weights).is_file() else None
    return {"id": model_id, "role": role, "source": f"path:{rel.as_posix()}", "sha256": sha, "licence": licence, "format": fmt, "notes": notes}


def write_registry_fragment(out_dir: Path, model_id: str | None, weights: Path, *, role: str, licence: str, notes: str, fmt: str = "safetensors",
                            extra: Sequence[dict] = ()) -> Path | None:  # fmt: skip
    """``<out_dir>/registry.yaml`` in the layout of ``models/registry.yaml`` with a ``path:`` source
    relative to that file, so ``DERMGRAPH_MODELS=<out_dir>/registry.yaml`` makes ``model_id`` usable by config.
    ``extra`` entries (from :func:`registry_entry`) are written after it."""
    if not model_id:
        return None
    import yaml

    out = Path(out_dir) / "registry.yaml"
    entry = registry_entry(out_dir, model_id, weights, role=role, licence=licence, notes=notes, fmt=fmt)
    out.write_text(yaml.safe_dump({"models": [entry, *extra]}, sort_keys=False))
    return out


def shipped_path(model_id: str | None) -> Path | None:
    """Local path of the artifact registered as ``model_id`` (the one the agent's config uses), or None."""
    if not model_id:
        return None
    from models.registry import get_spec
    from models.resolve import resolve

    try:
        get_spec(model_id)
    except KeyError:
        return None
    return resolve(model_id, progress=False)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; floats with 4 decimals, None as '-'."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
