"""Benchmark definitions (YAML) and their cases.

A benchmark is data: ``evals/benchmarks/<name>.yaml`` (shipped) or any YAML file given by path. Paths in
it may use ``${DATA}`` (the shared data folder, ``models.paths.data_dir()``); other relative paths are
relative to the YAML file. :func:`load_cases` reads the dataset (CSV or JSONL) into :class:`EvalCase`
objects, applying the filters, the label map, the aliases, the metadata and the group columns, and
fails with a message naming the benchmark, the file and the column when something does not fit.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import ValidationError

from evals.base import Benchmark, EvalCase
from evals.filters import FilterError, filter_function

BENCHMARK_DIR = Path(__file__).resolve().parent / "benchmarks"


class BenchmarkError(ValueError):
    """A benchmark definition or its dataset does not fit together; the message says where."""


def list_benchmarks() -> list[str]:
    """Names of the shipped benchmarks."""
    return sorted(p.stem for p in BENCHMARK_DIR.glob("*.yaml"))


def benchmark_path(name_or_path: str | Path) -> Path:
    """The YAML file of a shipped benchmark name, or the given path."""
    p = Path(name_or_path).expanduser()
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise FileNotFoundError(f"benchmark file not found: {p}")
        return p
    shipped = BENCHMARK_DIR / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise BenchmarkError(f"unknown benchmark {str(name_or_path)!r}; shipped: {', '.join(list_benchmarks())} (or give a path to a YAML file)")
    return shipped


def load_benchmark(name_or_path: str | Path) -> Benchmark:
    """Load and validate a benchmark (unknown keys are errors)."""
    path = benchmark_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise BenchmarkError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise BenchmarkError(f"{path}: top level must be a mapping")
    try:
        bench = Benchmark.model_validate(data)
    except ValidationError as exc:
        errs = exc.errors()
        first = errs[0]
        loc = ".".join(str(p) for p in first.get("loc", ())) or "top level"
        msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        more = f" (and {len(errs) - 1} more problems)" if len(errs) > 1 else ""
        raise BenchmarkError(f"invalid benchmark {path}: {loc}: {msg}{more}") from exc
    bench.source_file = path.resolve()
    return bench


def expand_path(value: str, bench: Benchmark) -> Path:
    """``${DATA}`` → the shared data folder; relative paths → relative to the benchmark file."""
    from models.paths import data_dir

    p = Path(value.replace("${DATA}", str(data_dir()))).expanduser()
    if not p.is_absolute() and bench.source_file is not None:
        p = bench.source_file.parent / p
    return p


def read_rows(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows and column names of a CSV or JSONL file."""
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: Excel writes a byte-order mark
            reader = csv.DictReader(f)
            try:
                rows = list(reader)
            except (csv.Error, UnicodeDecodeError) as exc:
                raise BenchmarkError(f"{path}: line {reader.line_num}: {exc}") from None
            return rows, list(reader.fieldnames or [])
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise BenchmarkError(f"{path}: line {n} is not valid JSON ({exc})") from None
            if not isinstance(row, dict):
                raise BenchmarkError(f"{path}: line {n} is not a JSON object")
            rows.append(row)
        cols: list[str] = []
        for r in rows:
            cols += [k for k in r if k not in cols]
        return rows, cols
    raise BenchmarkError(f"dataset must be .csv or .jsonl: {path}")


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "unknown", "nan", "none"))


def canonical_label(bench: Benchmark) -> Callable[[str | None], str | None]:
    """A function mapping a raw label or an answer through the aliases to the benchmark's label."""
    lookup: dict[str, str] = {}
    for label, names in bench.aliases.items():
        for n in [label, *names]:
            lookup[n.strip().lower()] = label
    for label in bench.labels:
        lookup.setdefault(label.strip().lower(), label)

    def fn(value: str | None) -> str | None:
        if value is None:
            return None
        return lookup.get(str(value).strip().lower(), value)

    return fn


def load_cases(bench: Benchmark, limit: int | None = None, check_images: bool = True) -> tuple[list[EvalCase], dict[str, Any]]:
    """The benchmark's cases (first ``limit`` after filtering) and a summary of what was read/dropped."""
    from agent.batch import _metadata  # the batch runner's metadata normalisation, so cache keys match its records

    spec = bench.dataset
    path = expand_path(spec.path, bench)
    rows, columns = read_rows(path)
    where = f"benchmark {bench.name!r} ({path})"
    needed = {
        "image_column": [spec.image_column] if spec.image_column else [],
        "id_column": [spec.id_column] if spec.id_column else [],
        "label_column": [spec.label_column] if spec.label_column else [],
        "question_column": [spec.question_column] if spec.question_column else [],
        "answer_column": [spec.answer_column] if spec.answer_column else [],
        "metadata": list(spec.metadata.values()),
        "group_columns": list(spec.group_columns.values()),
        "extra_columns": list(spec.extra_columns),
        "filter": list(spec.filter),
        "filter_fn": list(spec.filter_fn),
        "where": [r.column for r in spec.where],
    }
    for field_name, cols in needed.items():
        for col in cols:
            if col not in columns:
                raise BenchmarkError(f"{where}: dataset.{field_name} names column {col!r}, which the file does not have (columns: {', '.join(columns)})")
    bad_meta = set(spec.metadata) - {"age", "sex", "site", "fitzpatrick", "history"}
    if bad_meta:
        raise BenchmarkError(f"{where}: dataset.metadata keys must be agent metadata fields (age, sex, site, fitzpatrick, history), got {sorted(bad_meta)}")
    if bench.task in ("diagnosis", "modality", "zero_shot") and not spec.label_column:
        raise BenchmarkError(f"{where}: task {bench.task!r} needs dataset.label_column")
    try:
        filter_fns = {col: filter_function(name) for col, name in spec.filter_fn.items()}
    except FilterError as exc:
        raise BenchmarkError(f"{where}: {exc}") from None
    root = expand_path(spec.image_root, bench) if spec.image_root else path.parent
    to_label = canonical_label(bench)
    stats = {"rows": len(rows), "filtered_out": 0, "unmapped_dropped": 0}
    unmapped: dict[str, int] = {}
    cases: list[EvalCase] = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if any(str(row.get(col)) not in [str(v) for v in allowed] for col, allowed in spec.filter.items()):
            stats["filtered_out"] += 1
            continue
        if any(not fn(row.get(col)) for col, fn in filter_fns.items()) or not all(rule(row) for rule in spec.where):
            stats["filtered_out"] += 1
            continue
        label = None
        if spec.label_column:
            raw = row.get(spec.label_column)
            raw = None if _missing(raw) else str(raw).strip()
            if spec.label_map and raw is not None:
                if raw in spec.label_map:
                    raw = spec.label_map[raw]
                elif spec.drop_unmapped:
                    stats["unmapped_dropped"] += 1
                    unmapped[raw] = unmapped.get(raw, 0) + 1
                    continue
            label = to_label(raw)
            if label is not None and bench.labels and label not in bench.labels:
                raise BenchmarkError(f"{where}: row {i + 1} has label {label!r}, which is not in the benchmark's labels nor an alias (labels: {', '.join(bench.labels)})")
        image = None
        if spec.image_column:
            rel = row.get(spec.image_column)
            if _missing(rel):
                raise BenchmarkError(f"{where}: row {i + 1} has no value in image column {spec.image_column!r}")
            image = root / str(rel)
        cid = str(row[spec.id_column]) if spec.id_column else (str(row[spec.image_column]) if spec.image_column else str(i))
        if cid in seen:
            raise BenchmarkError(f"{where}: duplicate case id {cid!r} (row {i + 1}); set dataset.id_column")
        seen.add(cid)
        try:
            meta = _metadata({k: row.get(col) for k, col in spec.metadata.items()})
        except ValueError as exc:
            raise BenchmarkError(f"{where}: row {i + 1}: {exc}") from None
        groups = {name: "unknown" if _missing(row.get(col)) else str(row.get(col)).strip() for name, col in spec.group_columns.items()}
        cases.append(EvalCase(
            id=cid, image=image, label=label, metadata=meta, groups=groups,
            question=str(row[spec.question_column]) if spec.question_column and not _missing(row.get(spec.question_column)) else None,
            answer=str(row[spec.answer_column]) if spec.answer_column and not _missing(row.get(spec.answer_column)) else None,
            extra={c: str(row.get(c, "")) for c in spec.extra_columns},
        ))  # fmt: skip
        if limit is not None and len(cases) >= limit:
            break
    if unmapped:
        stats["unmapped_labels"] = unmapped
    if check_images and spec.image_column:
        missing = [c.image for c in cases if not c.image.is_file()]
        if missing:
            raise FileNotFoundError(f"{where}: {len(missing)} of {len(cases)} images not found, e.g. {missing[0]} (check dataset.image_root)")
    stats["cases"] = len(cases)
    return cases, stats
