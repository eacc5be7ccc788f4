"""``dermgraph review`` (paused cases from the command line) and ``dermgraph serve`` (the HTTP API)."""

from __future__ import annotations

import getpass
import json
import os
from pathlib import Path
from typing import Optional

import typer

review_app = typer.Typer(no_args_is_help=True, help="List, inspect and resume cases paused for review.")

ConfigOpt = typer.Option(None, "--config", "-c", help="Agent config YAML (its review.checkpointer names the case store).")
StoreOpt = typer.Option(None, "--store", help="Case store: SQLite path or postgresql:// URL (default: the config's review.checkpointer).")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _agent(config: Optional[Path], store: Optional[str], backends: Optional[str] = None):
    from pydantic import ValidationError

    from agent.agent import Agent
    from serve.backends import load_backends

    overrides = [f"review.checkpointer={store}"] if store else []
    try:
        return Agent(config, overrides=overrides, backends=load_backends(backends))
    except (ValidationError, ValueError, FileNotFoundError) as exc:
        _fail(f"invalid configuration: {exc}")


@review_app.command("list")
def review_list(config: Optional[Path] = ConfigOpt, store: Optional[str] = StoreOpt, as_json: bool = typer.Option(False, "--json")):
    """Cases awaiting review, oldest first."""
    pending = _agent(config, store).pending()
    for r in pending:
        if as_json:
            typer.echo(r.model_dump_json())
            continue
        top = r.differential[0].name if r.differential else "-"
        typer.echo(f"{r.case_id}  after {r.stage:10s} {r.modality or '-':14s} {top:40s} {r.verdict or 'pending'}")
    if not pending and not as_json:
        typer.echo("no case awaits review", err=True)


@review_app.command("show")
def review_show(case_id: str = typer.Argument(...), config: Optional[Path] = ConfigOpt, store: Optional[str] = StoreOpt, as_json: bool = typer.Option(False, "--json")):
    """One case: its diagnosis so far and, while paused, the findings a reviewer may correct."""
    try:
        d = _agent(config, store).case(case_id)
    except (KeyError, ValueError) as exc:
        _fail(str(exc).strip("'\""))
    if as_json:
        typer.echo(d.model_dump_json())
        return
    typer.echo(d.summary())
    if d.review_request:
        typer.echo("findings (criterion: value [model confidence] / options):")
        for f in d.review_request.findings:
            conf = f"{f.confidence:.2f}" if f.confidence is not None else "reviewer"
            typer.echo(f"  {f.criterion}: {f.value} [{conf}] / {', '.join(f.options)}")
    for rec in d.review.records if d.review else []:
        changes = ", ".join(f"{c.criterion} {c.model}->{c.reviewer}" for c in rec.changes) or "no changes"
        typer.echo(f"review: {rec.at:%Y-%m-%d %H:%M} {rec.reviewer} {rec.action} ({changes})" + (f" override {rec.override}" if rec.override else ""))


@review_app.command("resume")
def review_resume(
    case_id: str = typer.Argument(...),
    findings: Optional[list[str]] = typer.Option(None, "--set", help="Corrected finding, e.g. --set blue_whitish_veil=absent (repeatable)."),
    diagnosis: Optional[str] = typer.Option(None, "--diagnosis", help="Confirm (the model's code) or override the diagnosis."),
    note: Optional[str] = typer.Option(None, "--note"),
    reviewer: Optional[str] = typer.Option(None, "--reviewer", help="Reviewer id (default: the login name)."),
    config: Optional[Path] = ConfigOpt,
    store: Optional[str] = StoreOpt,
    as_json: bool = typer.Option(False, "--json"),
):
    """Continue a paused case with a reviewer's decision; corrected findings re-run retrieval, reasoner and verifier."""
    from pydantic import ValidationError

    from agent.review import ReviewDecision

    edits = {}
    for item in findings or []:
        if "=" not in item:
            _fail(f"--set {item!r} must look like criterion=value")
        k, v = item.split("=", 1)
        edits[k.strip()] = v.strip()
    try:
        decision = ReviewDecision(reviewer=reviewer or getpass.getuser(), findings=edits, diagnosis=diagnosis, note=note)
    except ValidationError as exc:
        _fail("; ".join(e["msg"] for e in exc.errors()))
    try:
        d = _agent(config, store).resume(case_id, decision)
    except (KeyError, ValueError) as exc:
        _fail(str(exc).strip("'\""))
    typer.echo(d.model_dump_json() if as_json else d.summary())


def serve_command(
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    tokens_file: Optional[Path] = typer.Option(None, "--tokens-file", help="Bearer tokens, one per line (default: $DERMGRAPH_API_TOKENS, comma-separated)."),
    no_auth: bool = typer.Option(False, "--no-auth", help="No authentication; only allowed on a loopback host."),
    data_dir: Path = typer.Option(Path("~/.local/share/dermgraph"), "--data-dir", help="Stored images and the case database."),
    review: str = typer.Option("always", "--review", help="When API cases pause: never, always, on_abstain, on_revise."),
    where: str = typer.Option("verify", "--where", help="Where they pause: morphology or verify."),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb"),
    max_pixels: int = typer.Option(50_000_000, "--max-pixels"),
    rate_limit: int = typer.Option(120, "--rate-limit", help="Requests per minute per token."),
    workers: int = typer.Option(1, "--workers", help="Worker processes (each loads the models once)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Agent config YAML."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Override an agent config value (repeatable)."),
    backends: Optional[str] = typer.Option(None, "--backends", help="Tests/benchmarks only: module:callable returning backend doubles."),
):
    """Serve the HTTP API and the review page (FastAPI + uvicorn; extra 'serve')."""
    try:
        import uvicorn
    except ImportError:
        _fail("dermgraph serve needs the 'serve' extra: pip install 'dermgraph[serve]'")
    from serve.app import ENV_SETTINGS, Settings

    tokens: list[str] = []
    if tokens_file is not None:
        try:
            tokens = [t.strip() for t in tokens_file.read_text().splitlines() if t.strip() and not t.lstrip().startswith("#")]
        except OSError as exc:
            _fail(f"cannot read tokens file: {exc}")
    else:
        tokens = [t.strip() for t in os.environ.get("DERMGRAPH_API_TOKENS", "").split(",") if t.strip()]
    if no_auth and host not in LOOPBACK:
        _fail(f"--no-auth only binds to loopback ({', '.join(LOOPBACK)}), not {host!r}")
    if not no_auth and not tokens:
        _fail("no API tokens: set DERMGRAPH_API_TOKENS (comma-separated) or --tokens-file, or use --no-auth on loopback")
    settings = Settings(
        data_dir=data_dir, tokens=tokens, auth=not no_auth, max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_pixels=max_pixels,
        rate_limit=rate_limit, review={"when": review, "where": where},
    )  # fmt: skip
    os.environ[ENV_SETTINGS] = json.dumps(
        {"settings": settings.model_dump(mode="json"), "config": str(config) if config else None, "overrides": overrides or [], "backends": backends}
    )
    typer.echo(f"dermgraph serving on http://{host}:{port}/ (docs at /docs){'' if tokens else ' without authentication'}", err=True)
    uvicorn.run("serve.app:app_from_env", factory=True, host=host, port=port, workers=workers, log_level="info")
