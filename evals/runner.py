"""Run a benchmark: load its cases, fill the prediction cache where needed (:mod:`evals.predictions`),
score with the task's protocol, write the outputs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from evals.base import ProtocolContext
from evals.cache import PredictionCache

def parse_options(items: Sequence[str] | None) -> dict[str, Any]:
    """``["coverages=[0.5,0.9]", "n_bootstrap=200"]`` → dict (values parsed as YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"option {item!r} must look like key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def run_benchmark(
    benchmark: str | Path,
    out: str | Path,
    *,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    limit: int | None = None,
    workers: int = 1,
    rescore: bool = False,
    import_batch: Sequence[str | Path] = (),
    import_configs: Sequence[str] = (),
    options: dict[str, Any] | None = None,
    agent_factory: Callable | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate one benchmark into ``out`` (metrics.json, report.md, plots/, predictions/); returns metrics.json's content."""
    import importlib

    from agent.config import load_config
    from evals.benchmark import load_benchmark, load_cases
    from evals.protocols import PROTOCOLS, check_options, get_protocol
    from evals.report import write_outputs

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--workers must be an integer >= 1, got {workers!r}")
    t_start = time.perf_counter()
    bench = load_benchmark(benchmark)
    protocol = get_protocol(bench.task)
    check_options(bench.task, {**bench.options, **(options or {})})  # before any case loads or model runs
    # A protocol whose cases form splits (the linear probe) limits by itself: the first N rows may be one split only.
    limiter = getattr(importlib.import_module(PROTOCOLS[bench.task].partition(":")[0]), "limit_cases", None) if limit else None
    cases, data_stats = load_cases(bench, limit=None if limiter else limit)
    if limiter:
        cases = limiter(cases, limit, {**bench.options, **(options or {})})
        data_stats["cases"] = len(cases)
    log(f"[eval] {bench.name}: {len(cases)} cases ({bench.task})" + (f", limit {limit}" if limiter else f", first {limit}" if limit else ""))
    agent_config = load_config(config, overrides)
    out = Path(out)
    cache = PredictionCache(out / "predictions")
    imports = {}
    for path in import_batch:
        imports[str(path)] = s = cache.import_records(path, fingerprint=agent_config.fingerprint(), accept_configs=import_configs)
        log(f"[eval] imported {path}: {s}")
    ctx = ProtocolContext(
        bench=bench, cases=cases, out_dir=out, cache=cache, agent_config=agent_config,
        options={**bench.options, **(options or {})}, workers=workers, log=log, rescore=rescore, agent_factory=agent_factory,
    )  # fmt: skip
    t0 = time.perf_counter()
    result = protocol(ctx)
    seconds = time.perf_counter() - t0
    run_info = {
        "benchmark": bench.name, "task": bench.task, "limit": limit, "rescore": rescore, "workers": workers,
        "config_file": str(config) if config else None, "overrides": list(overrides or []), "options": ctx.options,
        "data": data_stats, "imported": imports, "import_configs_accepted": list(import_configs), "protocol_seconds": round(seconds, 2),
    }  # fmt: skip
    summary = write_outputs(ctx, result, run_info)
    total = time.perf_counter() - t_start
    log(f"[eval] {'rescored' if rescore else 'evaluated'} {bench.name} in {total:.1f} s; wrote {out / 'metrics.json'}, {out / 'report.md'}")
    return summary
