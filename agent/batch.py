"""Resumable batch runs: one JSON record per case, appended and fsynced, so a killed run loses nothing.

On ``resume`` the output is scanned, a torn last line (the process died mid-write) is cut off, and
cases whose id already has a record are skipped: no case is lost or written twice.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
META_COLUMNS = {"age": "age", "sex": "sex", "site": "site", "localization": "site", "location": "site", "fitzpatrick": "fitzpatrick", "history": "history"}


@dataclass
class Case:
    """One row of a batch input."""

    id: str
    image: Path
    label: str | None = None
    question: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def _metadata(row: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for col, key in META_COLUMNS.items():
        val = row.get(col)
        if val is None or (isinstance(val, str) and val.strip() in ("", "unknown", "nan")):
            continue
        meta[key] = float(val) if key == "age" else str(val).strip()
    return meta


def read_cases(input_path: str | Path, image_root: str | Path | None = None, label_column: str = "label") -> list[Case]:
    """Cases from a folder (images, recursively), a CSV or a JSONL (columns: image, optional id, label, question, metadata)."""
    src = Path(input_path)
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        return [Case(id=str(p.relative_to(src)), image=p) for p in files]
    if not src.exists():
        raise FileNotFoundError(f"batch input not found: {src}")
    root = Path(image_root) if image_root else src.parent
    if src.suffix.lower() == ".csv":
        with src.open(newline="") as f:
            rows: Iterable[dict[str, Any]] = list(csv.DictReader(f))
    elif src.suffix.lower() in (".jsonl", ".ndjson"):
        rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    else:
        raise ValueError(f"batch input must be a folder, .csv or .jsonl: {src}")
    cases, seen = [], set()
    for i, row in enumerate(rows):
        if not row.get("image"):
            raise ValueError(f"{src}: row {i + 1} has no 'image' column")
        cid = str(row.get("id") or row.get("image_id") or row["image"])
        if cid in seen:
            raise ValueError(f"{src}: duplicate case id {cid!r} (row {i + 1})")
        seen.add(cid)
        label = row.get(label_column) if label_column in row else row.get("dx")
        cases.append(Case(id=cid, image=root / row["image"], label=label or None, question=row.get("question") or None, metadata=_metadata(row)))
    return cases


def _completed_ids(out: Path) -> set[str]:
    """Ids with a complete record in ``out``; truncates a torn trailing line left by a killed run."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with out.open("r+b") as f:
            f.truncate(end)
    ids = set()
    for line in data[:end].splitlines():
        if line.strip():
            ids.add(json.loads(line)["id"])
    return ids


def run_batch(
    cases: list[Case],
    out: str | Path,
    diagnose: Callable[[Case], dict[str, Any]],
    *,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``diagnose`` over ``cases`` appending one record per case to ``out``; returns run statistics."""
    from tqdm import tqdm

    from agent.imageio import ImageInputError

    out = Path(out)
    if out.exists() and out.stat().st_size and not resume:
        raise FileExistsError(f"{out} exists: pass --resume to continue it, or choose another --out")
    done = _completed_ids(out) if resume else set()
    todo = [c for c in cases if c.id not in done]
    out.parent.mkdir(parents=True, exist_ok=True)
    stats = {"total": len(cases), "skipped": len(cases) - len(todo), "ok": 0, "error": 0}
    t0 = time.perf_counter()
    with out.open("a") as f, tqdm(total=len(todo), disable=not progress, unit="case", file=sys.stderr) as bar:
        for case in todo:
            record: dict[str, Any] = {"id": case.id, "image": str(case.image), "truth": case.label}
            try:
                record.update(status="ok", diagnosis=diagnose(case))
                stats["ok"] += 1
            except ImageInputError as exc:
                record.update(status="error", error={"type": "ImageInputError", "message": str(exc), "reason": exc.reason})
                stats["error"] += 1
            except Exception as exc:  # one bad case must not stop the batch; the record says what failed
                record.update(status="error", error={"type": type(exc).__name__, "message": str(exc)[:2000]})
                stats["error"] += 1
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(1)
    elapsed = time.perf_counter() - t0
    stats["seconds"] = round(elapsed, 2)
    stats["cases_per_second"] = round(len(todo) / elapsed, 3) if elapsed > 0 and todo else None
    return stats


def iter_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Records of a results JSONL."""
    with Path(path).open() as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
