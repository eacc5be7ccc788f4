"""What every trainer writes besides its weights: a metrics log, the published artifact, a registry
fragment, the shipped artifact it is compared with, and the before/after table.

One way to publish: :func:`publish` copies a file or a directory artifact (with its metrics and a generated
model card) to where the config says, :func:`write_registry_fragment` writes ``<out_dir>/registry.yaml`` with a ``path:``
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
    """Appends one JSON object per line to ``<out_dir>/metrics.jsonl`` (loss and metrics as they come).

    ``keep_rows``: resume an existing log, keeping its first ``keep_rows`` rows (what a checkpoint had seen,
    :attr:`rows` at that time) and dropping the rows written after it, which the resumed run logs again.
    None starts an empty log.
    """

    def __init__(self, out_dir: Path, keep_rows: int | None = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = self.path.read_text().splitlines(keepends=True)[:keep_rows] if keep_rows is not None and self.path.exists() else []
        # a row cut short by a kill has no newline: it is dropped, not completed by the next row
        kept = [line for line in kept if line.endswith("\n")]
        self.path.write_text("".join(kept))
        self.rows = len(kept)
        self._t0 = time.time()

    def log(self, **record: Any) -> None:
        """Append ``record`` with ``t`` (seconds since this log started) unless the record brings its own."""
        record = {"t": round(time.time() - self._t0, 2), **record}
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        self.rows += 1


def model_card(artifact: Path, metrics: dict | None = None, *, title: str | None = None, body: str | None = None) -> str:
    """A model card for a published artifact: its file(s) with sha256, how it was made (the command that
    rebuilds it, platform and library versions, git commit) and its metrics. ``body``: what the trainer knows
    (data, licence, recipe), placed after the title."""
    import platform
    import subprocess
    import sys

    artifact = Path(artifact)
    files = sorted(p for p in artifact.iterdir() if p.is_file()) if artifact.is_dir() else [artifact]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    versions = []
    for mod in ("torch", "transformers", "peft", "trl", "sklearn"):
        if mod in sys.modules:
            versions.append(f"{mod} {getattr(sys.modules[mod], '__version__', '?')}")
    lines = [f"# {title or artifact.name}", ""]
    if body:
        lines += [body.strip(), ""]
    lines += ["## Files", "", "| file | bytes | sha256 |", "|---|---|---|"]
    lines += [f"| {f.name} | {f.stat().st_size} | `{sha256_file(f)}` |" for f in files if f.suffix != ".md"]
    lines += ["", "## How it was made", "",
              f"- Command: `{command_line(sys.argv)}`",
              f"- Platform: {platform.platform()}, Python {platform.python_version()}{', ' + ', '.join(versions) if versions else ''}",
              f"- Git commit: {commit}; written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"]  # fmt: skip
    flat = {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    if flat:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in sorted(flat.items()))]
    return "\n".join(lines) + "\n"


def command_line(argv: Sequence[str]) -> str:
    """The command that ran, as a user types it: ``dermgraph ...`` whether it ran as the ``dermgraph`` script or
    ``python -m dermgraph.cli`` (argv[0] is then the module's file), ``python -m training.<node> ...`` for a trainer module."""
    if not argv:
        return "?"
    prog = Path(argv[0])
    if prog.name == "dermgraph" or prog.parts[-2:] == ("dermgraph", "cli.py"):
        head = "dermgraph"
    elif prog.parent.name == "training" and prog.suffix == ".py":
        head = f"python -m training.{prog.stem}"
    else:
        head = "python " + prog.name
    return " ".join([head, *argv[1:]])


def registered_id(path: Path) -> str | None:
    """Id of the registry entry (models/registry.yaml and $DERMGRAPH_MODELS files) whose local source
    (``pkg:`` or ``path:``) is ``path``, or None."""
    from models.registry import load_registry, split_source
    from models.resolve import _pkg_path

    target = Path(path).resolve()
    for spec in load_registry().values():
        scheme, rest = split_source(spec.source)
        if scheme == "pkg":
            local = _pkg_path(rest)
        elif scheme == "path":
            local = Path(rest).expanduser()
        else:
            continue  # pypi: / hf: artifacts live in the cache, never where a trainer publishes
        if local.resolve() == target:
            return spec.id
    return None


def publish(written: Path, artifact: Path | None, metrics: dict | None = None, files: Sequence[str] | None = None,
            *, card: str | None = None, title: str | None = None, overwrite: bool = False) -> Path | None:  # fmt: skip
    """Copy what a trainer wrote in out_dir to ``artifact``: a file (its metrics next to it as
    ``<stem>.metrics.json``), or a directory's ``files`` (default: all its files) into the directory ``artifact``;
    then write its model card (``<stem>.md`` next to a file, ``MODEL_CARD.md`` in a directory) generated by
    :func:`model_card` with ``card`` as the trainer's own text (data, licence, recipe).

    An ``artifact`` that exists and is registered (:func:`registered_id`) is a shipped one whose sha256 the
    registry checks on every load: it is replaced only with ``overwrite`` (the config's ``overwrite_artifact``),
    which prints the sha256 the registry must get. Otherwise the artifact, metrics and card are written under
    ``written``'s folder (out_dir) as ``artifact``'s name, and that path is returned."""
    if artifact is None:
        return None
    artifact, written = Path(artifact), Path(written)
    model_id = registered_id(artifact) if artifact.exists() else None
    if model_id is not None and not overwrite:
        kept = artifact
        artifact = written.parent / artifact.name
        print(f"publish: kept the shipped {kept} (registry id {model_id}); the new artifact is {artifact}. "
              f"To replace the shipped one, rerun with --set overwrite_artifact=true and put its new sha256 in models/registry.yaml.", flush=True)
    if written.is_dir():
        artifact.mkdir(parents=True, exist_ok=True)
        for name in files if files is not None else sorted(p.name for p in written.iterdir()):
            if (written / name).is_file() and (written / name).resolve() != (artifact / name).resolve():
                shutil.copyfile(written / name, artifact / name)
        if metrics is not None:
            (artifact / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (artifact / "MODEL_CARD.md").write_text(model_card(artifact, metrics, title=title, body=card))
    else:
        artifact.parent.mkdir(parents=True, exist_ok=True)
        if written.resolve() != artifact.resolve():
            shutil.copyfile(written, artifact)
        if metrics is not None:
            artifact.with_name(artifact.name.split(".")[0] + ".metrics.json").write_text(json.dumps(metrics, indent=2))
        artifact.with_name(artifact.name.split(".")[0] + ".md").write_text(model_card(artifact, metrics, title=title, body=card))
    if model_id is not None and overwrite:
        announce_overwrite(model_id, artifact)
    return artifact


def announce_overwrite(model_id: str, artifact: Path) -> None:
    """Print the registry id and the sha256 ``models/registry.yaml`` must now carry for ``artifact``."""
    from models.integrity import artifact_sha256

    print(f"publish: replaced the shipped {artifact} (overwrite_artifact=true); set sha256 of registry id {model_id} "
          f"in models/registry.yaml to {artifact_sha256(artifact)}", flush=True)


def shipped_target(artifact: Path | None, out_dir: Path, overwrite: bool) -> tuple[Path | None, str | None]:
    """For a trainer that writes its artifact itself: (where to write it, registry id to announce or None).
    A registered, existing ``artifact`` is kept unless ``overwrite``; the write then goes to ``out_dir``."""
    if artifact is None:
        return None, None
    model_id = registered_id(artifact) if Path(artifact).exists() else None
    if model_id is None:
        return Path(artifact), None
    if overwrite:
        return Path(artifact), model_id
    target = Path(out_dir) / Path(artifact).name
    print(f"publish: kept the shipped {artifact} (registry id {model_id}); the new artifact is {target}. "
          f"To replace the shipped one, rerun with --set overwrite_artifact=true and put its new sha256 in models/registry.yaml.", flush=True)
    return target, None


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
