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


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _agent(config: Optional[Path], store: Optional[str], backends: Optional[str] = None):
    """The agent on an existing case store: a mistyped --store must not create an empty one."""
    from pydantic import ValidationError

    from agent.agent import Agent
    from agent.config import ReviewConfig
    from serve.backends import load_backends
    from serve.settings import one_line

    overrides = [f"review.checkpointer={store}"] if store else []
    try:
        agent = Agent(config, overrides=overrides, backends=load_backends(backends))
    except (ValidationError, ValueError, OSError, ImportError) as exc:
        _fail(f"invalid configuration: {one_line(exc)}")
    target = (agent.config.review or ReviewConfig()).checkpointer
    if not target.startswith(("postgres://", "postgresql://")) and not Path(target).expanduser().is_file():
        where = "--store" if store else "the config's review.checkpointer"
        _fail(f"no case store at {Path(target).expanduser()} (from {where})")
    return agent


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
        from serve.settings import one_line

        _fail(one_line(exc))  # a KeyError's own message, not its quoted repr
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
    who = (reviewer if reviewer is not None else getpass.getuser()).strip()
    if not who:
        _fail("--reviewer must not be blank")
    try:
        decision = ReviewDecision(reviewer=who, findings=edits, diagnosis=diagnosis, note=note)
    except ValidationError as exc:
        _fail("; ".join(e["msg"] for e in exc.errors()))
    agent = _agent(config, store)
    try:
        d = agent.resume(case_id, decision)
    except (KeyError, ValueError) as exc:
        from serve.settings import one_line

        _fail(one_line(exc))  # a KeyError's own message, not its quoted repr
    typer.echo(d.model_dump_json() if as_json else d.summary())


def serve_command(
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    tokens_file: Optional[Path] = typer.Option(None, "--tokens-file", help="Bearer tokens, one 'token' or 'name:token' a line (default: $DERMGRAPH_API_TOKENS, comma-separated)."),
    no_auth: bool = typer.Option(False, "--no-auth", help="No authentication; only allowed on a loopback host."),
    data_dir: Path = typer.Option(Path("~/.local/share/dermgraph"), "--data-dir", help="Stored images and the case database (made private: 0700, files 0600)."),
    review: str = typer.Option("always", "--review", help="When API cases pause: never, always, on_abstain, on_revise."),
    where: str = typer.Option("verify", "--where", help="Where they pause: morphology or verify."),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb"),
    max_pixels: int = typer.Option(50_000_000, "--max-pixels", help="Largest image (width x height); the agent's limits.max_image_pixels for served cases."),
    rate_limit: int = typer.Option(120, "--rate-limit", help="Requests per minute per token."),
    auth_failures: int = typer.Option(10, "--auth-failures", help="Failed authentications per minute per client address before it gets 429."),
    workers: int = typer.Option(1, "--workers", help="Worker processes (each loads the models once)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Agent config YAML."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Override an agent config value (repeatable)."),
    backends: Optional[str] = typer.Option(None, "--backends", help="Tests/benchmarks only: module:callable returning backend doubles."),
):
    """Serve the HTTP API and the review page (FastAPI + uvicorn; extra 'serve'). Every setting is checked before the port is bound."""
    try:
        import uvicorn

        from serve.app import ENV_SETTINGS, log_config
    except ImportError:
        _fail("dermgraph serve needs the 'serve' extra: pip install 'dermgraph[serve]'")
    from agent.agent import Agent
    from serve.backends import load_backends
    from serve.settings import ServeOptions, SettingsError, agent_config, load_tokens, one_line, secure_data_dir

    try:
        opts = ServeOptions.parse(
            host=host, port=port, tokens_file=tokens_file, no_auth=no_auth, data_dir=data_dir, review=review, where=where,
            max_upload_mb=max_upload_mb, max_pixels=max_pixels, rate_limit=rate_limit, auth_failures=auth_failures, workers=workers,
        )  # fmt: skip
        settings = opts.settings([] if no_auth else load_tokens(tokens_file))
        agent_cfg = agent_config(settings, config, overrides)
    except SettingsError as exc:
        _fail(str(exc))
    try:  # builds nothing heavy (models load on the first case) but checks the backends spec and its roles
        Agent(agent_cfg, backends=load_backends(backends))
    except Exception as exc:  # noqa: BLE001 - whatever a --backends factory raises, one line and no port bound
        _fail(f"--backends {backends}: {one_line(exc)}" if backends else one_line(exc))
    os.umask(0o077)  # the workers inherit it: every file they create (SQLite's included) is the user's alone
    try:
        notes = secure_data_dir(settings.data_dir)
    except SettingsError as exc:
        _fail(str(exc))
    for note in notes:
        typer.echo(f"data folder made private: {note}", err=True)
    # The workers re-read the tokens (file or $DERMGRAPH_API_TOKENS): secrets never go into the environment they inherit.
    os.environ[ENV_SETTINGS] = json.dumps({
        "settings": settings.model_dump(mode="json", exclude={"tokens"}, exclude_unset=True),
        "tokens_file": str(tokens_file.expanduser().resolve()) if tokens_file else None,
        "config": str(config) if config else None, "overrides": overrides or [], "backends": backends,
    })  # fmt: skip
    typer.echo(f"dermgraph serving on http://{host}:{port}/ (docs at /docs){'' if settings.auth else ' without authentication'}", err=True)
    uvicorn.run("serve.app:app_from_env", factory=True, host=host, port=port, workers=workers, log_config=log_config(), log_level="info")
