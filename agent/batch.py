"""Resumable batch runs: one JSON record per input case, appended and fsynced, so a killed run loses nothing.

* Every input case gets exactly one record: a row that cannot be read (bad JSON, not an object, no
  image, an age of ``abc``, a string over the limits) and every file of a folder that is not a usable
  image (unsupported type, FIFO, directory link, symlink loop) become error records naming the row or file.
* ``--out`` is locked (``<out>.lock``, ``fcntl.flock``) for the whole run: a second writer is refused.
* On ``resume`` the output is scanned; lines that are not records with an id (a torn tail of a killed run,
  a damaged middle line, a record without an id) are moved to ``<out>.quarantine.jsonl`` and reported,
  never silently dropped; cases whose id has a record are skipped. With ``retry_errors`` the error
  records whose failure is not a property of the input (``error.retryable``) are replaced by a re-run.
* ``case_timeout`` turns a case that runs longer into an error record (SIGALRM: it interrupts Python code
  between native calls; main thread on POSIX only).
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

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".avif", ".ppm", ".mpo"}
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


def _metadata(row: dict[str, Any]) -> dict[str, Any]:
    """Agent metadata from a row's columns. Raises ValueError naming the column for an age that is not a number."""
    meta: dict[str, Any] = {}
    for col, key in META_COLUMNS.items():
        val = row.get(col)
        if val is None or (isinstance(val, str) and val.strip() in ("", "unknown", "nan")):
            continue
        if key == "age":
            if isinstance(val, bool) or not isinstance(val, (int, float, str)):
                raise ValueError(f"column {col!r}: age must be a number, got {type(val).__name__}")
            try:
                meta[key] = float(val)
            except ValueError:
                raise ValueError(f"column {col!r}: age must be a number, got {str(val)[:40]!r}") from None
        else:
            if isinstance(val, (dict, list)):
                raise ValueError(f"column {col!r}: must be text, got {type(val).__name__}")
            meta[key] = str(val).strip()
    return meta


def _folder_cases(src: Path, exclude: set[Path]) -> list[Case]:
    """One case per entry of a folder tree (not following links); entries that cannot be images carry an error."""
    cases = []
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
            cases.append(Case(id=cid, image=p, error=_not_a_file(p)))
    return sorted(cases, key=lambda c: c.id)


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


def _read_rows(src: Path) -> list[tuple[int, dict[str, Any] | None, str | None]]:
    """(row number, row, error) per data row/line of a CSV or JSONL; a row that cannot be parsed has an error."""
    out: list[tuple[int, dict[str, Any] | None, str | None]] = []
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
        except UnicodeDecodeError as exc:
            raise ValueError(f"{src}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        finally:
            csv.field_size_limit(old)
        return out
    data = src.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
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
        out.append((n, row, None))
    return out


def read_cases(
    input_path: str | Path, image_root: str | Path | None = None, label_column: str = "label", *, exclude: Iterable[str | Path] = ()
) -> list[Case]:
    """Cases from a folder (every file, recursively), a CSV or a JSONL (columns: image, optional id, label, question, metadata).

    Raises FileNotFoundError / ValueError only for the input as a whole (missing, unsupported type, not
    UTF-8); a bad row or file becomes a Case with ``error`` set, named by its id or ``<file>:<row>``."""
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
    cases: list[Case] = []
    seen: set[str] = set()
    for n, row, error in _read_rows(src):
        where = f"{src.name}:{unit} {n}"
        if row is None:
            cases.append(Case(id=where, image=None, error=f"{src.name}: {error}"))
            continue
        raw_id = row.get("id") or row.get("image_id")
        image = row.get("image")
        cid = str(raw_id) if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) else None
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
            case.metadata = _metadata(row)
        except ValueError as exc:
            case.error = f"{where}: {exc}"
    return cases


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
def _deadline(seconds: float | None) -> Iterator[None]:
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
    """Run ``diagnose`` over ``cases`` appending one record per case to ``out``; returns run statistics. A
    ``diagnose.plan(todo)``, where given, is told the cases still to do before the first call.

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
        t0 = time.perf_counter()
        with out.open("a") as f, tqdm(total=len(todo), disable=not progress, unit="case", file=sys.stderr) as bar:
            for case in todo:
                record: dict[str, Any] = {"id": case.id, "image": str(case.image) if case.image else None, "truth": case.label}
                if case.error:
                    record.update(status="error", error={"type": "InputError", "message": case.error, "retryable": False})
                else:
                    try:
                        with _deadline(case_timeout):
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
