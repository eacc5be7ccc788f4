"""sha256 of model artifacts, cached per file so that verifying every load stays cheap on a warm start.

A file's hash is kept in ``<cache>/hashes.json`` keyed by its real path and ``(size, mtime_ns, ctime_ns,
inode)``: any write, copy, rename or ``touch -r`` changes one of them (``ctime`` cannot be set back by a
user), so a changed file is always re-hashed. ``full=True`` (``dermgraph models verify``) ignores the
cache. A directory's sha256 is the sha256 of its manifest: the sorted lines ``"<sha256>  <relative path>"``
of every file below it (completion markers and lock files excluded).

The hashes of the artifacts resolved in this process are remembered (:func:`record_used`) so that each
result can name the exact weights it came from (``Diagnosis.versions["sha256"]``).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

DB_NAME = "hashes.json"
_IGNORED = (".complete",)

_lock = threading.Lock()
_memo: dict[str, list] = {}
_db_loaded_from: Path | None = None
_used: dict[str, str] = {}


def sha256_stream(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _db_path() -> Path:
    from models import paths

    return paths.cache_dir() / DB_NAME


def _load_db() -> None:
    global _db_loaded_from
    path = _db_path()
    if _db_loaded_from == path:
        return
    _memo.clear()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            _memo.update({k: v for k, v in data.items() if isinstance(v, list) and len(v) == 2})
    except (OSError, ValueError):
        pass  # no or unreadable cache: everything is re-hashed (and the file rewritten)
    _db_loaded_from = path


def _save_db() -> None:
    path = _db_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{DB_NAME}.{os.getpid()}.{threading.get_ident()}")
        try:
            merged = json.loads(path.read_text(encoding="utf-8"))  # keep what other processes added
            if not isinstance(merged, dict):
                merged = {}
        except (OSError, ValueError):
            merged = {}
        merged.update(_memo)
        tmp.write_text(json.dumps(merged, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs speed


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def file_sha256(path: str | Path, *, full: bool = False) -> str:
    """sha256 of a file; re-hashed only when its size, mtime, ctime or inode changed (always when ``full``)."""
    real = os.path.realpath(path)
    with _lock:
        _load_db()
        st = os.stat(real)
        hit = _memo.get(real)
        if not full and hit is not None and hit[0] == _stamp(st):
            return hit[1]
    digest = sha256_stream(Path(real))
    st_after = os.stat(real)
    with _lock:
        if _stamp(st_after) == _stamp(st):  # unchanged while we read it: cacheable
            _memo[real] = [_stamp(st), digest]
            _save_db()
    return digest


def manifest(directory: str | Path, *, full: bool = False) -> dict[str, str]:
    """``{relative posix path: sha256}`` of every file below ``directory``."""
    root = Path(directory)
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in _IGNORED and not p.name.endswith(".lock"):
            out[p.relative_to(root).as_posix()] = file_sha256(p, full=full)
    return out


def manifest_sha256(files: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{sha}  {rel}\n" for rel, sha in sorted(files.items())).encode()).hexdigest()


def artifact_sha256(path: str | Path, *, full: bool = False) -> str:
    """sha256 of a file, or of a directory's manifest."""
    p = Path(path)
    return manifest_sha256(manifest(p, full=full)) if p.is_dir() else file_sha256(p, full=full)


def changed_files(root: str | Path, recorded: dict[str, str], *, under: str | Path | None = None, full: bool = False) -> list[str]:
    """Files of ``recorded`` (a manifest of ``root``) below ``under`` that are missing or no longer match."""
    root = Path(root)
    prefix = Path(under).resolve().relative_to(root.resolve()).as_posix() if under is not None else ""
    bad = []
    for rel, sha in recorded.items():
        if prefix not in ("", ".") and not (rel == prefix or rel.startswith(prefix + "/")):
            continue
        p = root / rel
        try:
            if file_sha256(p, full=full) != sha:
                bad.append(rel)
        except OSError:
            bad.append(rel)
    return bad


def record_used(ref: str, sha256: str | None) -> None:
    """Remember that ``ref`` resolved to an artifact with this sha256 (see :func:`used_sha256`)."""
    if sha256:
        _used[ref] = sha256


def used_sha256(ref: str | None) -> str | None:
    """sha256 of the artifact ``ref`` resolved to in this process (a local path is hashed on demand)."""
    if not ref:
        return None
    if ref in _used:
        return _used[ref]
    p = Path(ref).expanduser()
    if p.exists():
        try:
            return artifact_sha256(p)
        except OSError:
            return None
    return None


def reset_memory() -> None:
    """Forget the in-process caches (tests that switch cache folders)."""
    global _db_loaded_from
    with _lock:
        _memo.clear()
        _db_loaded_from = None
    _used.clear()
