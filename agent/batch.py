"""Resumable batch runs: one JSON record per input case, appended and fsynced, so a killed run loses nothing.

* Every input case gets exactly one record: a row that cannot be read (bad JSON, not an object, no
  image, an age of ``abc``, a string over the limits) and every image file of a folder that is not usable
  (not an image after all, FIFO, directory link, symlink loop) become error records naming the row or file.
  A folder's cases are its files with an image suffix (:data:`IMAGE_SUFFIXES`, any case); other files are
  skipped and counted (``Cases.not_images``).
* The columns of a CSV/JSONL are checked up front: an unknown column (a typo such as ``gender``) or no
  ``image`` column fails the whole input, listing the valid columns or the columns found, as the Python API
  refuses unknown metadata keys. ``ignore_columns`` skips named columns on purpose.
* ``--out`` must not be the input (:func:`check_output`): a resume rewrites and appends to it.
* ``--out`` is locked (``<out>.lock``, ``fcntl.flock``) for the whole run: a second writer is refused.
* On ``resume`` the output is scanned; lines that are not records with an id (a torn tail of a killed run,
  a damaged middle line, a record without an id) are moved to ``<out>.quarantine.jsonl`` and reported,
  never silently dropped; cases whose id has a record are skipped. With ``retry_errors`` the error
  records whose failure is not a property of the input (``error.retryable``) are replaced by a re-run.
* ``case_timeout`` turns a case that runs longer into an error record (SIGALRM: it interrupts Python code
  between native calls; main thread on POSIX only). It covers the case's own work: reading its image and
  running the graph on it. Not counted: ``diagnose.warmup()`` (model loading, before the first case) and
  ``diagnose.prepare(case, timeout)`` (a micro-batch's shared prefetch, which gets its own budget; see
  :func:`agent.batched.batched_case_diagnose`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".avif", ".ppm", ".pgm", ".pbm", ".pnm", ".mpo"}
"""Suffixes (lower case) of the files a folder input takes as cases: those of ``agent.imageio.SUPPORTED_FORMATS``."""
META_COLUMNS = {"age": "age", "sex": "sex", "site": "site", "localization": "site", "location": "site", "fitzpatrick": "fitzpatrick", "history": "history"}
CSV_FIELD_LIMIT = 16 << 20
"""Largest CSV field read (bytes); the agent's own limits then turn a long value into an error record."""
QUARANTINE_SUFFIX = ".quarantine.jsonl"
LOCK_SUFFIX = ".lock"


class BatchLockedError(RuntimeError):
    """Another process is writing the same ``--out``."""


class CaseTimeout(BaseException):
    """A case ran longer than the batch's per-case timeout.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` inside a node can swallow it."""


@dataclass
class Case:
    """One input case. ``error`` is set when the row/file itself cannot be used (it becomes an error record)."""

    id: str
    image: Path | None
    label: str | None = None
    question: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class Cases(list):
    """What :func:`read_cases` returns: a list of :class:`Case`, plus ``not_images``, the files of a folder input
    skipped because their suffix is not an image suffix (relative paths, sorted; empty for a CSV/JSONL)."""

    not_images: list[str]

    def __init__(self, cases: Iterable[Case] = (), not_images: Iterable[str] = ()):
        super().__init__(cases)
        self.not_images = list(not_images)


def valid_columns(label_column: str = "label", *, jsonl: bool = False) -> list[str]:
    """The columns a CSV (or, with ``jsonl``, a JSONL line) may have; a JSONL line may also carry a ``metadata`` object."""
    cols = ["image", "id", "image_id", label_column, "dx", "question", *META_COLUMNS]
    return list(dict.fromkeys(cols + (["metadata"] if jsonl else [])))


def _metadata_keys() -> list[str]:
    from agent.state import PatientMetadata  # the Python API's metadata keys, so that both accept the same

    return list(PatientMetadata.model_fields)


def _metadata(row: dict[str, Any], columns: dict[str, str] = META_COLUMNS, where: str = "column") -> dict[str, Any]:
    """Agent metadata from a row's ``columns`` (column -> metadata key). Raises ValueError naming the column for an
    age that is not a number or a value that is not text."""
    meta: dict[str, Any] = {}
    for col, key in columns.items():
        val = row.get(col)
        if val is None or (isinstance(val, str) and val.strip() in ("", "unknown", "nan")):
            continue
        if key == "age":
            if isinstance(val, bool) or not isinstance(val, (int, float, str)):
                raise ValueError(f"{where} {col!r}: age must be a number, got {type(val).__name__}")
            try:
                meta[key] = float(val)
            except ValueError:
                raise ValueError(f"{where} {col!r}: age must be a number, got {str(val)[:40]!r}") from None
        else:
            if isinstance(val, (dict, list)):
                raise ValueError(f"{where} {col!r}: must be text, got {type(val).__name__}")
            meta[key] = str(val).strip()
    return meta


def _row_metadata(row: dict[str, Any]) -> dict[str, Any]:
    """Metadata from the columns and, in a JSONL line, a nested ``metadata`` object (a key given both ways is an error)."""
    meta = _metadata(row)
    nested = row.get("metadata")
    if nested is None:
        return meta
    if not isinstance(nested, dict):
        raise ValueError(f"column 'metadata' must be an object, got {type(nested).__name__}")
    inner = _metadata(nested, {k: k for k in _metadata_keys()}, where="metadata key")
    both = sorted(set(meta) & set(inner))
    if both:
        raise ValueError(f"{', '.join(map(repr, both))} given both as a column and in 'metadata'")
    return {**meta, **inner}


def _check_columns(src: Path, columns: list[str], has_rows: bool, nested: list[str], label_column: str, ignore: set[str]) -> None:
    """Refuse the whole input for an unknown column (or ``metadata`` key) or a missing ``image`` column."""
    jsonl = src.suffix.lower() != ".csv"
    valid = valid_columns(label_column, jsonl=jsonl)
    unknown = [c for c in columns if c not in valid and c not in ignore]
    if unknown:
        raise ValueError(f"{src.name}: unknown column(s) {', '.join(map(repr, unknown))}; valid columns: {', '.join(valid)} "
                         f"(skip a column on purpose with --ignore-column NAME)")  # fmt: skip
    keys = _metadata_keys()
    bad_keys = [k for k in nested if k not in keys]
    if bad_keys:
        raise ValueError(f"{src.name}: unknown key(s) {', '.join(map(repr, bad_keys))} in 'metadata'; valid keys: {', '.join(keys)}")
    if has_rows and "image" not in columns:
        found = ", ".join(map(repr, columns)) or "none"
        raise ValueError(f"{src.name}: no 'image' column (columns found: {found})")


def _folder_cases(src: Path, exclude: set[Path]) -> Cases:
    """One case per image file (by suffix) of a folder tree, not following links; image entries that cannot be read
    carry an error; other files are counted in ``not_images``."""
    cases = []
    skipped: list[str] = []
    exclude_real = {os.path.realpath(x) for x in exclude}

    def unreadable(exc: OSError) -> None:  # a sub-folder that cannot be listed gets a record too
        if exc.filename and Path(exc.filename) != src:
            rel = str(Path(exc.filename).relative_to(src))
            cases.append(Case(id=rel, image=Path(exc.filename), error=f"cannot list folder ({exc.strerror or exc})"))
        else:
            raise exc

    for dirpath, dirnames, filenames in os.walk(src, followlinks=False, onerror=unreadable):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(filenames) + [d for d in dirnames if (base / d).is_symlink()]:
            p = base / name
            if p.absolute() in exclude or os.path.realpath(p) in exclude_real:
                continue
            cid = str(p.relative_to(src))
            if p.suffix.lower() not in IMAGE_SUFFIXES:  # .DS_Store, notes.txt, ...: not cases
                skipped.append(cid)
                continue
            cases.append(Case(id=cid, image=p, error=_not_a_file(p)))
    return Cases(sorted(cases, key=lambda c: c.id), sorted(skipped))


def _not_a_file(p: Path) -> str | None:
    """Why ``p`` cannot be opened as an image file without blocking, or None when it is a regular file."""
    try:
        st = p.stat()
    except OSError as exc:
        if p.is_symlink():
            return f"broken or looping symbolic link ({exc.strerror or exc})"
        return f"cannot stat ({exc.strerror or exc})"
    if stat.S_ISDIR(st.st_mode):
        return "a link to a directory (not followed)"
    if stat.S_ISFIFO(st.st_mode):
        return "a FIFO (named pipe), not a regular file"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (device or socket)"
    return None


Row = tuple[int, dict[str, Any] | None, str | None]  # (row number, row, why it cannot be read)


def _read_rows(src: Path) -> tuple[list[Row], list[str] | None]:
    """((row number, row, error) per data row/line, the columns) of a CSV or JSONL; a row that cannot be parsed has
    an error. Columns: the CSV header (None for an empty file), or every key of a JSONL's objects in first-seen order."""
    out: list[Row] = []
    if src.suffix.lower() == ".csv":
        old = csv.field_size_limit()
        csv.field_size_limit(CSV_FIELD_LIMIT)
        try:
            with src.open(newline="", encoding="utf-8-sig", errors="strict") as f:  # -sig: Excel writes a BOM
                reader = csv.DictReader(f)
                n = 1
                while True:
                    try:
                        row = next(reader)
                    except StopIteration:
                        break
                    except csv.Error as exc:
                        n += 1
                        out.append((n, None, f"line {reader.line_num}: {exc}"))
                        continue
                    n += 1
                    if None in row:
                        out.append((n, None, f"row has {len(row[None]) + len(reader.fieldnames or [])} fields, header has {len(reader.fieldnames or [])}"))
                        continue
                    out.append((n, row, None))
                header = reader.fieldnames
        except UnicodeDecodeError as exc:
            raise ValueError(f"{src}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        finally:
            csv.field_size_limit(old)
        return out, list(header) if header is not None else None
    data = src.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    columns: dict[str, None] = {}
    for n, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except ValueError as exc:
            out.append((n, None, f"line {n} is not valid JSON ({str(exc)[:120]})"))
            continue
        if not isinstance(row, dict):
            out.append((n, None, f"line {n} is a JSON {type(row).__name__}, not an object"))
            continue
        columns.update(dict.fromkeys(row))
        out.append((n, row, None))
    return out, list(columns)


def _case_id(row: dict[str, Any]) -> str | None:
    """The row's id (``id``, else ``image_id``), kept when falsy but present (``0``); None when neither is given.
    Raises ValueError for an id that is not text or an integer."""
    for col in ("id", "image_id"):
        val = row.get(col)
        if val is None or val == "":
            continue
        if isinstance(val, bool) or not isinstance(val, (str, int)):
            raise ValueError(f"column {col!r} must be text or an integer, got {type(val).__name__}")
        return str(val)
    return None


def read_cases(
    input_path: str | Path,
    image_root: str | Path | None = None,
    label_column: str = "label",
    *,
    exclude: Iterable[str | Path] = (),
    ignore_columns: Iterable[str] = (),
) -> Cases:
    """Cases from a folder (its image files, recursively), a CSV or a JSONL (columns: :func:`valid_columns`: image,
    optional id, label, question, metadata columns; a JSONL line may nest them in a ``metadata`` object).

    Raises FileNotFoundError / ValueError only for the input as a whole (missing, unsupported type, not UTF-8, an
    unknown column not in ``ignore_columns``, no ``image`` column); a bad row or file becomes a Case with ``error``
    set, named by its id or ``<file>:<row>``."""
    src = Path(input_path)
    skip = {Path(p).absolute() for p in exclude}
    if src.is_dir():
        return _folder_cases(src, skip)
    if not src.exists():
        raise FileNotFoundError(f"batch input not found: {src}")
    if src.suffix.lower() not in (".csv", ".jsonl", ".ndjson"):
        raise ValueError(f"batch input must be a folder, .csv or .jsonl: {src}")
    if not src.is_file():
        raise ValueError(f"batch input is not a regular file: {src}")
    root = Path(image_root) if image_root else src.parent
    unit = "row" if src.suffix.lower() == ".csv" else "line"
    rows, columns = _read_rows(src)
    if columns is None:  # an empty CSV: no header, no cases
        return Cases()
    nested = list(dict.fromkeys(k for _, row, _ in rows if row and isinstance(row.get("metadata"), dict) for k in row["metadata"]))
    has_rows = unit == "row" or any(row is not None for _, row, _ in rows)  # a JSONL's columns are those of its objects
    _check_columns(src, columns, has_rows, nested, label_column, set(ignore_columns))
    cases = Cases()
    seen: set[str] = set()
    for n, row, error in rows:
        where = f"{src.name}:{unit} {n}"
        if row is None:
            cases.append(Case(id=where, image=None, error=f"{src.name}: {error}"))
            continue
        image = row.get("image")
        try:
            cid = _case_id(row)
        except ValueError as exc:
            cases.append(Case(id=where, image=None, error=f"{where}: {exc}"))
            continue
        if cid is None and isinstance(image, str) and image:
            cid = image
        if cid is None or cid in seen:
            problem = f"duplicate case id {cid!r}" if cid is not None else "no usable 'id' or 'image'"
            cases.append(Case(id=where, image=None, error=f"{where}: {problem}"))
            continue
        seen.add(cid)
        case = Case(id=cid, image=None)
        cases.append(case)
        try:
            if not isinstance(image, str) or not image.strip():
                raise ValueError(f"column 'image' must be a non-empty path, got {image!r}"[:160])
            if "\x00" in image:
                raise ValueError("column 'image' contains a NUL byte")
            case.image = root / image
            label = row.get(label_column) if label_column in row else row.get("dx")
            case.label = str(label) if label not in (None, "") else None
            question = row.get("question")
            if question not in (None, "") and not isinstance(question, str):
                raise ValueError(f"column 'question' must be text, got {type(question).__name__}")
            case.question = question or None
            case.metadata = _row_metadata(row)
        except ValueError as exc:
            case.error = f"{where}: {exc}"
    return cases


def check_output(input_path: str | Path, out: str | Path) -> None:
    """Refuse an ``out`` that is the input (or its lock or quarantine file is), or, for a folder input, an image file
    inside it: a run appends to ``out`` and a resume rewrites it. Raises ValueError saying which."""
    src, out = Path(input_path), Path(out)
    if src.is_dir():
        inside = os.path.realpath(out).startswith(os.path.realpath(src).rstrip(os.sep) + os.sep)
        if inside and out.suffix.lower() in IMAGE_SUFFIXES:
            raise ValueError(f"--out {out} is an image file inside the input folder {src}; results would overwrite it: choose another --out")
        return
    for path in (out, out.with_name(out.name + LOCK_SUFFIX), out.with_name(out.name + QUARANTINE_SUFFIX)):
        same = os.path.realpath(path) == os.path.realpath(src)
        if not same and path.exists() and src.exists():
            same = os.path.samefile(path, src)  # a hard link
        if same:
            what = "--out" if path == out else f"--out's {path.name[len(out.name):]} file"
            raise ValueError(f"{what} {path} is the input file {src}; results would overwrite the cases: choose another --out")


# --------------------------------------------------------------------------------------------
# the output file


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold an exclusive, non-blocking lock on ``out`` for a whole run; a second holder gets BatchLockedError."""
    import fcntl

    lock_path = out.with_name(out.name + LOCK_SUFFIX)
    fh = open(lock_path, "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip()
            raise BatchLockedError(
                f"{out} is being written by another dermgraph batch ({holder or 'pid unknown'}); wait for it to finish or choose another --out"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}\n")
        fh.flush()
        yield
    finally:
        fh.close()


def _is_retryable(record: dict[str, Any]) -> bool:
    err = record.get("error")
    return record.get("status") == "error" and isinstance(err, dict) and bool(err.get("retryable"))


def scan_output(out: Path, *, retry_errors: bool = False) -> dict[str, Any]:
    """Read ``out`` for a resume: keep valid records, quarantine the rest, drop retryable errors when asked.

    Rewrites ``out`` (atomically) only when something changes; returns ``done`` ids and counts."""
    info: dict[str, Any] = {"done": set(), "quarantined": 0, "retrying": 0}
    if not out.exists():
        return info
    if not out.is_file():
        raise IsADirectoryError(f"--out {out} is not a regular file")
    data = out.read_bytes()
    keep: list[bytes] = []
    bad: list[dict[str, Any]] = []
    lines = data.split(b"\n")
    torn = lines[-1] if lines[-1] else None  # text after the last newline: the write a kill interrupted
    for n, raw in enumerate(lines[:-1], 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            rec = None
        rid = rec.get("id") if isinstance(rec, dict) else None
        if not isinstance(rid, str) or not rid:
            bad.append({"line": n, "why": "not a JSON record" if rec is None or not isinstance(rec, dict) else "record without an id", "text": raw.decode("utf-8", "replace")})
            continue
        if rid in info["done"]:
            bad.append({"line": n, "why": f"second record for id {rid!r}", "text": raw.decode("utf-8", "replace")})
            continue
        if retry_errors and _is_retryable(rec):
            info["retrying"] += 1
            continue
        info["done"].add(rid)
        keep.append(raw)
    if torn is not None:
        bad.append({"line": len(lines), "why": "incomplete last line (interrupted write)", "text": torn.decode("utf-8", "replace")})
    info["quarantined"] = len(bad)
    if bad:
        side = out.with_name(out.name + QUARANTINE_SUFFIX)
        with side.open("a") as f:
            for b in bad:
                f.write(json.dumps({"file": str(out), "at": time.strftime("%Y-%m-%dT%H:%M:%S"), **b}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        info["quarantine_file"] = str(side)
    if bad or info["retrying"]:
        tmp = out.with_name(f".{out.name}.rewrite-{os.getpid()}")
        with tmp.open("wb") as f:
            f.write(b"".join(line + b"\n" for line in keep))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    return info


# --------------------------------------------------------------------------------------------
# running


@contextlib.contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Raise :class:`CaseTimeout` in the block after ``seconds`` (None or 0: no limit; only in the main thread)."""
    usable = seconds and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def _alarm(signum, frame):
        raise CaseTimeout(f"case took longer than {seconds:g} s (--case-timeout)")

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, float(seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_ENV_REASONS = ("permission denied", "cannot open file", "file not found", "no such file")


def error_of(exc: BaseException) -> dict[str, Any]:
    """The ``error`` field of a record; ``retryable`` is False when the failure is a property of the input."""
    from agent.imageio import ImageInputError
    from agent.limits import InputError

    if isinstance(exc, ImageInputError):
        retry = any(r in exc.reason.lower() for r in _ENV_REASONS)
        return {"type": "ImageInputError", "message": str(exc), "reason": exc.reason, "retryable": retry}
    if isinstance(exc, InputError):
        return {"type": "InputError", "message": str(exc), "field": exc.field, "retryable": False}
    return {"type": type(exc).__name__, "message": (str(exc) or type(exc).__name__)[:2000], "retryable": True}


def run_batch(
    cases: list[Case],
    out: str | Path,
    diagnose: Callable[[Case], dict[str, Any]],
    *,
    resume: bool = False,
    retry_errors: bool = False,
    case_timeout: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``diagnose`` over ``cases`` appending one record per case to ``out``; returns run statistics.

    Optional hooks of ``diagnose``: ``plan(todo)`` is told the cases still to do before the first call;
    ``warmup()`` runs once before the first case when there is a ``case_timeout`` (model loading, kept out of
    every case's deadline; ``stats["warmup_seconds"]``);
    ``prepare(case, case_timeout)`` runs before each case, outside its deadline (shared work such as a
    micro-batch's prefetch, which bounds itself). ``case_timeout`` bounds ``diagnose(case)`` only.

    Raises FileExistsError (``out`` has records and ``resume`` is off), IsADirectoryError (``out`` is a
    folder), BatchLockedError (another run holds ``out``)."""
    from tqdm import tqdm

    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a directory; give a .jsonl file path")
    if retry_errors and not resume:
        resume = True
    out.parent.mkdir(parents=True, exist_ok=True)
    with locked(out):
        if out.exists() and out.stat().st_size and not resume:
            raise FileExistsError(f"{out} exists: pass --resume to continue it, or choose another --out")
        scan = scan_output(out, retry_errors=retry_errors) if resume else {"done": set(), "quarantined": 0, "retrying": 0}
        done = scan["done"]
        todo = [c for c in cases if c.id not in done]
        stats: dict[str, Any] = {"total": len(cases), "skipped": len(cases) - len(todo), "ok": 0, "error": 0,
                                 "quarantined": scan["quarantined"], "retried": scan["retrying"]}  # fmt: skip
        if scan.get("quarantine_file"):
            stats["quarantine_file"] = scan["quarantine_file"]
        plan = getattr(diagnose, "plan", None)
        if callable(plan):  # a micro-batching diagnose (agent.batched) prefetches only what is still to do
            plan(todo)
        warmup, prepare = getattr(diagnose, "warmup", None), getattr(diagnose, "prepare", None)
        if callable(warmup) and case_timeout and any(not c.error for c in todo):  # model loading: not any one case's time
            t_warm = time.perf_counter()
            warmup()
            stats["warmup_seconds"] = round(time.perf_counter() - t_warm, 2)
        t0 = time.perf_counter()
        with out.open("a") as f, tqdm(total=len(todo), disable=not progress, unit="case", file=sys.stderr) as bar:
            for case in todo:
                record: dict[str, Any] = {"id": case.id, "image": str(case.image) if case.image else None, "truth": case.label}
                if case.error:
                    record.update(status="error", error={"type": "InputError", "message": case.error, "retryable": False})
                else:
                    try:
                        if callable(prepare):  # work shared with other cases (a micro-batch's prefetch), outside this case's deadline
                            prepare(case, case_timeout)
                        with deadline(case_timeout):
                            record.update(status="ok", diagnosis=diagnose(case))
                    except (Exception, CaseTimeout) as exc:  # one bad case must not stop the batch; the record says what failed
                        record.pop("diagnosis", None)
                        record.update(status="error", error=error_of(exc))
                stats[record["status"]] += 1
                f.write(json.dumps(record, default=str) + "\n")
                f.flush()
                os.fsync(f.fileno())
                bar.update(1)
    elapsed = time.perf_counter() - t0
    stats["seconds"] = round(elapsed, 2)
    stats["cases_per_second"] = round(len(todo) / elapsed, 3) if elapsed > 0 and todo else None
    return stats


def summary_line(stats: dict[str, Any]) -> str:
    """One human-readable line of counts."""
    line = (f"batch: {stats['total']} cases: {stats['ok']} ok, {stats['error']} errors, {stats['skipped']} already done"
            f"{', ' + str(stats['retried']) + ' retried' if stats.get('retried') else ''}")  # fmt: skip
    if stats.get("quarantined"):
        line += f"; {stats['quarantined']} damaged line(s) of --out moved to {stats.get('quarantine_file')}"
    if stats.get("not_images"):
        line += f"; {stats['not_images']} file(s) of the input folder skipped (not an image suffix)"
    return line + f" ({stats['seconds']} s)"


def iter_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Records of a results JSONL. Lines that are not JSON objects are skipped with a warning that counts
    them (``dermgraph batch --resume`` moves them to the quarantine file)."""
    import warnings

    bad = 0
    with Path(path).open() as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            if isinstance(rec, dict):
                yield rec
            else:
                bad += 1
    if bad:
        warnings.warn(f"{path}: skipped {bad} line(s) that are not JSON records (run dermgraph batch --resume to quarantine them)", stacklevel=2)
