"""``dermgraph eval``: run a benchmark (shipped name or YAML path) and write metrics, report and plots."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Optional

import typer


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def eval_command(
    benchmark: Optional[str] = typer.Argument(None, help="Shipped benchmark name (see --list) or a benchmark YAML file."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default runs/eval/<benchmark>)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Agent config YAML."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Override an agent config value, e.g. --set reasoner.num_samples=3 (repeatable)."),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N cases (after the benchmark's filters; N >= 1); a linear probe takes N across its training and test splits."),
    workers: int = typer.Option(1, help="Processes running models (1 torch thread each, N >= 1); they return their records to the main process, which writes the cache (predictions/main.jsonl)."),
    rescore: bool = typer.Option(False, "--rescore", help="Recompute metrics, report and plots from cached predictions only; load no model."),
    import_batch: Optional[list[Path]] = typer.Option(None, "--import-batch", help="dermgraph batch results JSONL to reuse (records with this config; repeatable)."),
    import_config: Optional[list[str]] = typer.Option(None, "--import-config", help="Also import batch records made with this config fingerprint, as if made with the current config (only when the difference cannot change predictions; noted in the report)."),
    opts: Optional[list[str]] = typer.Option(None, "--opt", help="Protocol option key=value (YAML value), e.g. --opt n_bootstrap=200 (repeatable)."),
    list_: bool = typer.Option(False, "--list", help="List the shipped benchmarks and exit."),
):
    """Evaluate the agent (or its parts) on a benchmark. Predictions are cached per case in OUT/predictions:
    a rerun only computes missing cases, --rescore computes none."""
    from pydantic import ValidationError

    from evals.benchmark import BenchmarkError, list_benchmarks, load_benchmark

    if list_:
        for name in list_benchmarks():
            b = load_benchmark(name)
            flag = "  [seen by the default classifier]" if b.seen_by_default_classifier else ""
            typer.echo(f"{name:24s} {b.task:13s} {textwrap.shorten(b.description, 90, placeholder=' ...')}{flag}")
        return
    if not benchmark:
        _fail("give a BENCHMARK (name or YAML file), or --list")
    from evals.predictions import MissingPredictions
    from evals.runner import parse_options, run_benchmark

    try:
        bench_name = load_benchmark(benchmark).name
        run_benchmark(
            benchmark, out or Path("runs/eval") / bench_name, config=config, overrides=overrides, limit=limit, workers=workers,
            rescore=rescore, import_batch=import_batch or [], import_configs=import_config or [], options=parse_options(opts), log=lambda m: typer.echo(m, err=True),
        )  # fmt: skip
    except (BenchmarkError, ValidationError, ValueError, FileNotFoundError, MissingPredictions) as exc:
        _fail(str(exc))


if __name__ == "__main__":  # pragma: no cover
    app = typer.Typer(add_completion=False)
    app.command()(eval_command)
    sys.exit(app())
