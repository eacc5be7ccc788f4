"""Typed settings of ``dermgraph serve``, all checked before the port is bound: the options, the API tokens,
the agent configuration and the data folder (private to the user: folder 0700, files 0600).

Imports neither FastAPI nor uvicorn, so the review CLI and the checks run without the ``serve`` extra.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import stat
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from agent.review import ReviewPolicy
from models.errors import errors_line, message

ENV_TOKENS = "DERMGRAPH_API_TOKENS"
MIN_TOKEN_CHARS = 16
LOOPBACK = ("127.0.0.1", "localhost", "::1")
_TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,31}$")


class SettingsError(ValueError):
    """A setting the server cannot start with; ``str(e)`` is one line naming the option."""


def one_line(exc: BaseException, names: dict[str, str] | None = None) -> str:
    """An exception as one line; a pydantic error names its first field (mapped through ``names``)."""
    if isinstance(exc, ValidationError):
        return errors_line(exc.errors(include_url=False), names)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return message(exc) or type(exc).__name__


# --- tokens ------------------------------------------------------------------------------------


class ApiToken(BaseModel):
    """A bearer token and the name the audit trail records for it."""

    model_config = ConfigDict(frozen=True)

    name: str
    secret: SecretStr  # never shown by repr, logs or model_dump


def fingerprint(secret: str) -> str:
    """The name of an unnamed token: enough to tell tokens apart in the audit trail, useless to guess one."""
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()[:8]


def parse_token(entry: str) -> ApiToken:
    """``name:token`` or a bare token (named by its fingerprint). Bearer tokens (RFC 6750) never contain ':'."""
    entry = entry.strip()
    name, sep, secret = entry.partition(":")
    if not sep:
        name, secret = fingerprint(entry), entry
    elif not _TOKEN_NAME.match(name):
        raise SettingsError(f"token name {name[:40]!r}: use 1-32 letters, digits, '_', '.', '@' or '-'")
    if not secret or any(c.isspace() for c in secret):
        raise SettingsError(f"token {name!r}: empty or contains whitespace")
    return ApiToken(name=name, secret=SecretStr(secret))


def load_tokens(tokens_file: Path | None = None, min_chars: int = MIN_TOKEN_CHARS) -> list[ApiToken]:
    """Tokens from ``tokens_file`` (one ``token`` or ``name:token`` a line, ``#`` comments) or ``$DERMGRAPH_API_TOKENS``
    (comma-separated); tokens shorter than ``min_chars`` are refused."""
    if tokens_file is not None:
        try:
            entries = [t for t in Path(tokens_file).expanduser().read_text().splitlines() if t.strip() and not t.lstrip().startswith("#")]
        except OSError as exc:
            raise SettingsError(f"cannot read --tokens-file: {one_line(exc)}") from None
        where = f"--tokens-file {tokens_file}"
    else:
        entries = [t for t in os.environ.get(ENV_TOKENS, "").split(",") if t.strip()]
        where = ENV_TOKENS
    tokens = [parse_token(e) for e in entries]
    for t in tokens:
        if len(t.secret.get_secret_value()) < min_chars:
            raise SettingsError(f"{where}: token {t.name!r} is shorter than {min_chars} characters; use e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return tokens


# --- settings ----------------------------------------------------------------------------------


class Settings(BaseModel):
    """What the HTTP app needs (``create_app``)."""

    model_config = ConfigDict(extra="forbid")

    data_dir: Path = Field(Path("~/.local/share/dermgraph"), description="Stored images (by pixel hash) and, by default, the case database.")
    tokens: list[ApiToken] = Field(default_factory=list, description="Accepted bearer tokens ('name:token' or bare strings accepted).")
    auth: bool = Field(True, description="False only for loopback development (--no-auth).")
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(50_000_000, ge=1, le=400_000_000, description="Header-checked pixel limit; also the agent's limits.max_image_pixels when served.")
    rate_limit: int = Field(120, ge=1, description="Requests per minute per token name.")
    auth_failures: int = Field(10, ge=1, description="Failed authentications per minute per client address before every request from it gets 429.")
    max_concurrent: int = Field(1, ge=1, description="Cases run at once per worker (the models use the CPU cores).")
    review: ReviewPolicy | None = Field(ReviewPolicy(when="always"), description="Review policy of API cases; None: the agent config's.")

    @field_validator("tokens", mode="before")
    @classmethod
    def _parse_tokens(cls, v: Any) -> Any:
        return [parse_token(t) if isinstance(t, str) else t for t in v] if isinstance(v, (list, tuple)) else v

    @field_validator("review", mode="before")
    @classmethod
    def _when_only(cls, v: Any) -> Any:
        return {"when": v} if isinstance(v, str) else v


class ServeOptions(BaseModel):
    """The options of ``dermgraph serve``, as typed; validation errors name the option (``--rate-limit``)."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    tokens_file: Path | None = None
    no_auth: bool = False
    data_dir: Path = Path("~/.local/share/dermgraph")
    review: Literal["never", "always", "on_abstain", "on_revise"] = "always"
    where: Literal["morphology", "verify"] = "verify"
    max_upload_mb: float = Field(20.0, ge=0.001, le=1024)
    max_pixels: int = Field(50_000_000, ge=1, le=400_000_000)
    rate_limit: int = Field(120, ge=1)
    auth_failures: int = Field(10, ge=1)
    workers: int = Field(1, ge=1, le=64)

    @model_validator(mode="after")
    def _loopback_without_auth(self) -> "ServeOptions":
        if self.no_auth and not _is_loopback(self.host):
            raise ValueError(f"--no-auth only binds to loopback ({', '.join(LOOPBACK)}), not {self.host!r}")
        return self

    @classmethod
    def parse(cls, **values: Any) -> "ServeOptions":
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            names = {f: "--" + f.replace("_", "-") for f in cls.model_fields}
            raise SettingsError(one_line(exc, names)) from None

    def settings(self, tokens: list[ApiToken]) -> Settings:
        if not self.no_auth and not tokens:
            raise SettingsError(f"no API tokens: set {ENV_TOKENS} (comma-separated) or --tokens-file, or use --no-auth on loopback")
        return Settings(
            data_dir=self.data_dir, tokens=tokens, auth=not self.no_auth, max_upload_bytes=int(self.max_upload_mb * 1024 * 1024),
            max_pixels=self.max_pixels, rate_limit=self.rate_limit, auth_failures=self.auth_failures,
            review={"when": self.review, "where": self.where},
        )  # fmt: skip


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def agent_config(settings: Settings, config: str | Path | None, overrides: list[str] | None):
    """The agent config of served cases: ``--config`` and ``--set``, the pixel limit of ``--max-pixels`` and, unless the
    config names a case store, cases kept next to their images. Raises SettingsError (one line)."""
    from agent.config import ReviewConfig, apply_overrides, load_config

    try:
        cfg = load_config(config, overrides or [])
        extra = [f"limits.max_image_pixels={settings.max_pixels}"]
        if cfg.review is None or cfg.review.checkpointer == ReviewConfig().checkpointer:
            extra.append(f"review.checkpointer={settings.data_dir.expanduser() / 'cases.sqlite'}")
        return apply_overrides(cfg, extra)
    except (ValidationError, ValueError, OSError) as exc:
        raise SettingsError(f"invalid agent configuration: {one_line(exc)}") from None


# --- the data folder ---------------------------------------------------------------------------


def secure_data_dir(data_dir: Path) -> list[str]:
    """Create ``data_dir`` and its ``images/`` private to this user (0700), tighten existing ones and their files
    (0600); refuse a folder owned by another account. Returns what was tightened (paths only)."""
    root = Path(data_dir).expanduser()
    notes = []
    for d in (root, root / "images"):
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = d.stat()
        except OSError as exc:
            raise SettingsError(f"--data-dir: {one_line(exc)}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise SettingsError(f"--data-dir: {d} is not a folder")
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            raise SettingsError(f"--data-dir: {d} belongs to another account (uid {st.st_uid}); patient data must be in a folder you own")
        if st.st_mode & 0o077:
            os.chmod(d, 0o700)
            notes.append(f"{d}: {stat.S_IMODE(st.st_mode):04o} -> 0700")
        loose = 0
        for f in d.iterdir():
            try:
                fst = f.lstat()
                if stat.S_ISREG(fst.st_mode) and fst.st_mode & 0o077:
                    os.chmod(f, 0o600)
                    loose += 1
            except OSError as exc:
                raise SettingsError(f"--data-dir: cannot make {f} private: {one_line(exc)}") from None
        if loose:
            notes.append(f"{d}: {loose} file(s) -> 0600")
    return notes


def private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 if it does not exist (SQLite then gives its -wal/-shm files the same mode)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
