"""The model registry: which weights exist, where they come from and how to verify them.

Entries live in ``models/registry.yaml`` (bundled) plus user YAML files listed in
``$DERMGRAPH_MODELS`` (``os.pathsep``-separated) or passed to :func:`load_registry`.
Loading the registry never touches the network or the weights; see :mod:`models.resolve`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

BUNDLED_REGISTRY = Path(__file__).resolve().parent / "registry.yaml"
ENV_VAR = "DERMGRAPH_MODELS"
SCHEMES = ("pypi", "pkg", "path", "hf")

Role = Literal["classifier", "llm", "vlm", "text_embedder", "image_embedder", "head", "index", "calibration", "adapter"]
"""What a registered artifact is; ``adapter`` = a PEFT adapter applied on top of a base model (``format: peft-lora``)."""

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_PYPI_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9][A-Za-z0-9.+!_-]*)$")


def split_source(source: str) -> tuple[str, str]:
    """Split ``"scheme:rest"`` into ``(scheme, rest)``; raise ValueError for unknown schemes."""
    scheme, sep, rest = source.partition(":")
    if not sep or scheme not in SCHEMES or not rest:
        raise ValueError(f"source {source!r} must look like one of {[s + ':...' for s in SCHEMES]}")
    return scheme, rest


def parse_pypi(rest: str) -> tuple[str, str]:
    """``"NAME==VERSION"`` -> ``(NAME, VERSION)``; a pinned version is required for reproducibility."""
    m = _PYPI_RE.match(rest.strip())
    if not m:
        raise ValueError(f"pypi source must be 'pypi:NAME==VERSION' (pinned), got 'pypi:{rest}'")
    return m.group(1), m.group(2)


class ModelSpec(BaseModel):
    """One registry entry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    role: Role
    source: str
    sha256: str | None = None
    """Hex sha256 of the artifact: the wheel for ``pypi:``, the file (or a directory's manifest, see
    ``models.integrity.artifact_sha256``) for ``pkg:``/``path:``. Checked on every load."""
    file: str | None = None
    """Path inside the resolved source (the extracted wheel, a directory), posix-style."""
    licence: str | None = None
    notes: str = ""
    format: str | None = None
    """keras | gguf | safetensors | hf-dir | faiss-dir | npz | json | ..."""

    @field_validator("id")
    @classmethod
    def _check_id(cls, v: str) -> str:
        if not _ID_RE.match(v):
            raise ValueError(f"id {v!r} must match {_ID_RE.pattern}")
        return v

    @field_validator("source")
    @classmethod
    def _check_source(cls, v: str) -> str:
        scheme, rest = split_source(v)
        if scheme == "pypi":
            parse_pypi(rest)
        return v

    @field_validator("sha256")
    @classmethod
    def _check_sha(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = v.strip().lower()
        if not _SHA_RE.match(v):
            raise ValueError("sha256 must be 64 hex characters")
        return v

    @field_validator("file")
    @classmethod
    def _check_file(cls, v: str | None) -> str | None:
        if v is None:
            return None
        p = PurePosixPath(v)
        if p.is_absolute() or ".." in p.parts or not p.parts:
            raise ValueError(f"file {v!r} must be a relative path inside the package")
        return v

    @model_validator(mode="after")
    def _check_hf_sha(self) -> ModelSpec:
        # A hub snapshot is a directory of many files: there is no single artifact to hash.
        if self.sha256 and self.source.startswith("hf:"):
            raise ValueError("hf: sources cannot carry a sha256 (pin a revision with @rev instead)")
        return self


def _read_file(path: Path, *, user: bool) -> list[ModelSpec]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"model registry file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML: {exc}") from exc
    if data is None:
        return []
    if not isinstance(data, dict) or set(data) != {"models"} or not isinstance(data["models"], list):
        raise ValueError(f"{path}: a model registry file must be a mapping with one key, 'models: [...]'")
    specs: list[ModelSpec] = []
    seen: set[str] = set()
    for i, entry in enumerate(data["models"]):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: models[{i}] must be a mapping")
        if user and isinstance(entry.get("source"), str) and entry["source"].startswith("path:"):
            # Relative paths in a user file mean "next to this file", not "next to the cwd".
            p = Path(entry["source"][5:]).expanduser()
            if not p.is_absolute():
                entry = {**entry, "source": f"path:{(path.parent / p).resolve()}"}
        try:
            spec = ModelSpec.model_validate(entry)
        except ValidationError as exc:
            raise ValueError(f"{path}: invalid entry models[{i}] (id={entry.get('id')!r}):\n{exc}") from exc
        if spec.id in seen:
            raise ValueError(f"{path}: duplicate model id {spec.id!r}")
        seen.add(spec.id)
        specs.append(spec)
    return specs


def user_registry_files() -> list[Path]:
    """User registry files named in ``$DERMGRAPH_MODELS``."""
    raw = os.environ.get(ENV_VAR, "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]


def load_registry(extra: list[Path] | None = None) -> dict[str, ModelSpec]:
    """Bundled entries, then ``$DERMGRAPH_MODELS`` files, then ``extra`` files; later ids win."""
    registry = {s.id: s for s in _read_file(BUNDLED_REGISTRY, user=False)}
    for path in [*user_registry_files(), *(Path(p) for p in extra or [])]:
        for spec in _read_file(path, user=True):
            registry[spec.id] = spec
    return registry


def get_spec(id: str) -> ModelSpec:
    """The spec registered as ``id``; KeyError listing the valid ids otherwise."""
    registry = load_registry()
    try:
        return registry[id]
    except KeyError:
        raise KeyError(f"unknown model id {id!r}; valid ids: {sorted(registry)}") from None


def list_specs() -> list[ModelSpec]:
    """All registered specs, sorted by id."""
    return sorted(load_registry().values(), key=lambda s: s.id)
