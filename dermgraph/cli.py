"""The ``dermgraph`` command line."""

from __future__ import annotations

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


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _agent(config: Optional[Path], overrides: Optional[list[str]]):
    from pydantic import ValidationError

    from agent.agent import Agent

    try:
        return Agent(config, overrides=overrides)
    except (ValidationError, ValueError, FileNotFoundError) as exc:
        _fail(f"invalid configuration: {exc}")


@app.command()
def diagnose(
    images: list[Path] = typer.Argument(..., help="Image files."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON Diagnosis per image."),
    question: Optional[str] = typer.Option(None, "--question", "-q"),
    age: Optional[float] = typer.Option(None),
    sex: Optional[str] = typer.Option(None),
    site: Optional[str] = typer.Option(None),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
):
    """Diagnose one or more images. Exits non-zero, naming the file, if an image cannot be read."""
    from agent.imageio import ImageInputError, load_image

    # Validate every input before loading any model, so a bad path fails in milliseconds.
    for img in images:
        try:
            load_image(img)
        except ImageInputError as exc:
            _fail(str(exc))
    metadata = {k: v for k, v in {"age": age, "sex": sex, "site": site}.items() if v is not None} or None
    agent = _agent(config, overrides)
    for img in images:
        try:
            d = agent.diagnose(img, question=question, metadata=metadata)
        except ImageInputError as exc:
            _fail(str(exc))
        if as_json:
            typer.echo(d.model_dump_json())
        else:
            typer.secho(f"== {img}", bold=True)
            typer.echo(d.summary())


@app.command()
def batch(
    input: Path = typer.Argument(..., help="Folder of images, or a CSV/JSONL with an 'image' column (optional id, label, question, age, sex, site)."),
    out: Path = typer.Option(..., "--out", "-o", help="Results JSONL (one record per case)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run: skip cases already in --out."),
    image_root: Optional[Path] = typer.Option(None, help="Folder image paths are relative to (default: the input file's folder)."),
    label_column: str = typer.Option("label", help="Column holding the true label, if any."),
    limit: Optional[int] = typer.Option(None, help="Only the first N cases."),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
):
    """Run the agent over many cases, resumably, writing error records for unreadable images."""
    from agent.batch import read_cases, run_batch

    try:
        cases = read_cases(input, image_root, label_column)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    cases = cases[:limit] if limit else cases
    agent = _agent(config, overrides)

    def run(case):
        d = agent.diagnose(case.image, question=case.question, metadata=case.metadata or None)
        return json.loads(d.model_dump_json())

    try:
        stats = run_batch(cases, out, run, resume=resume)
    except FileExistsError as exc:
        _fail(str(exc))
    typer.echo(json.dumps(stats), err=True)


@app.command()
def graph():
    """Print the agent graph as a Mermaid diagram."""
    from agent.graph import mermaid

    typer.echo(mermaid())


@app.command()
def schema():
    """Print the JSON Schema of a Diagnosis (what `diagnose --json` and batch records contain)."""
    from agent.diagnosis import Diagnosis

    typer.echo(json.dumps(Diagnosis.model_json_schema(mode="serialization"), indent=2))


@app.command()
def train(
    node: str = typer.Argument(..., help="Trainer: modality, concepts, verifier, describer, reasoner-sft, reasoner-grpo."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Training config YAML (configs/train/*.yaml)."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Override a config value, e.g. --set max_steps=10 (repeatable)."),
):
    """Train (or refresh) one node's model; prints the summary (metrics, artifact paths, wall time)."""
    from pydantic import ValidationError

    from training.cli import run_training

    try:
        summary = run_training(node, config, overrides)
    except (ValidationError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    typer.echo(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2, default=str))


def _eval_command():
    from evals.cli import eval_command  # typer only at import; models load when a benchmark runs

    return eval_command


app.command("eval")(_eval_command())

from serve.cli import review_app, serve_command  # noqa: E402  (typer only at import; the serve extra when run)

app.add_typer(review_app, name="review")
app.command("serve")(serve_command)


@models_app.command("list")
def models_list():
    """List registered models (id, role, source, licence)."""
    from models.registry import list_specs

    for s in list_specs():
        typer.echo(f"{s.id:28s} {s.role:15s} {s.licence or '-':22s} {s.source}")


@models_app.command("pull")
def models_pull(ids: list[str] = typer.Argument(None, help="Model ids (default: everything the default agent uses).")):
    """Resolve (download, verify, cache) model weights now instead of on first use."""
    from models.registry import list_specs
    from models.resolve import pull

    for mid in ids or [s.id for s in list_specs()]:
        try:
            typer.echo(f"{mid}: {pull(mid)}")
        except Exception as exc:  # report every failing model, then fail
            _fail(f"{mid}: {exc}", code=1)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
