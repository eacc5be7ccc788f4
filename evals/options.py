"""Validation of protocol options (benchmark ``options`` merged with ``--opt``), before any case runs.

Each task has a pydantic model of its options (``extra="forbid"``): the model-backed protocols their own
``Options``; the agent-backed ones (diagnosis, modality, morphology), which read a plain dict, the models
below. An unknown key or an out-of-range value is one line naming the option, the valid keys and the
likely one.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

SELECTIVE_SCORES = ("acceptance", "confidence", "confidence_x_consistency", "verdict_then_confidence")


def check_bins(name: str, value: Any) -> list[float]:
    """``value`` as bin edges: a non-empty list of strictly increasing numbers, else a one-line ValueError."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise ValueError(f"{name} must be a list of increasing numbers, e.g. [40, 60]; got {value!r} (write [{value!r}] for one edge)")
    if not isinstance(value, (list, tuple)) or not value or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
        raise ValueError(f"{name} must be a list of increasing numbers, e.g. [40, 60]; got {value!r}")
    edges = [float(v) for v in value]
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"{name} must be strictly increasing, e.g. [40, 60]; got {value!r}")
    return edges


class _AgentOptions(BaseModel):
    """Options every agent-backed protocol reads (cache fill, bootstrap, groups)."""

    model_config = ConfigDict(extra="forbid")

    n_bootstrap: int = Field(1000, ge=1, description="Bootstrap resamples for the CIs (0 would give [v, v]).")
    seed: int = 0
    batch_size: int | None = Field(None, ge=1, description="Micro-batch size of the cache fill.")
    allow_partial: bool = False
    age_bins: list[Any] | None = None
    group_bins: dict[str, Any] = Field(default_factory=dict)
    min_group_size: int = Field(10, ge=1)

    @field_validator("age_bins", mode="before")
    @classmethod
    def _age_bins(cls, v: Any) -> Any:
        return None if v is None else check_bins("age_bins", v)

    @field_validator("group_bins", mode="before")
    @classmethod
    def _group_bins(cls, v: Any) -> Any:
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise ValueError(f"group_bins must map a group name to its bin edges, e.g. {{age: [40, 60]}}; got {v!r}")
        return {k: check_bins(f"group_bins.{k}", e) for k, e in v.items()}


class DiagnosisOptions(_AgentOptions):
    """``evals.protocols.diagnosis`` options (see its module docstring)."""

    coverages: list[float] = Field(default_factory=lambda: [0.5, 0.8, 0.9, 1.0], min_length=1)
    set_alphas: list[float] = Field(default_factory=lambda: [0.05, 0.1, 0.2])
    calibration_bins: int = Field(10, ge=1)
    selective_score: Literal[SELECTIVE_SCORES] = "acceptance"  # type: ignore[valid-type]
    top_k: list[int] = Field(default_factory=lambda: [1, 3, 5], min_length=1)

    @field_validator("coverages")
    @classmethod
    def _coverages(cls, v: list[float]) -> list[float]:
        if bad := [c for c in v if not 0 < c <= 1]:
            raise ValueError(f"coverages are fractions in (0, 1], e.g. [0.5, 0.9]; got {bad}")
        return v

    @field_validator("set_alphas")
    @classmethod
    def _alphas(cls, v: list[float]) -> list[float]:
        if bad := [a for a in v if not 0 < a < 1]:
            raise ValueError(f"set_alphas are in (0, 1), e.g. [0.05, 0.1]; got {bad}")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: list[int]) -> list[int]:
        if bad := [k for k in v if k < 1]:
            raise ValueError(f"top_k values must be >= 1; got {bad}")
        return v


class ModalityOptions(_AgentOptions):
    """``evals.protocols.modality`` options."""


class MorphologyOptions(_AgentOptions):
    """``evals.protocols.morphology`` options."""

    unmentioned: Literal["absent", "skip"] = "absent"


AGENT_OPTIONS: dict[str, type[BaseModel]] = {"diagnosis": DiagnosisOptions, "modality": ModalityOptions, "morphology": MorphologyOptions}


def validate_options(task: str, options: dict[str, Any], model: type[BaseModel]) -> None:
    """Raise a one-line ValueError for an unknown key of ``task``'s options ``model`` (naming the valid ones and the
    likely one) or a bad value. :func:`evals.protocols.check_options` finds the model of a task."""
    valid = sorted(model.model_fields)
    unknown = [k for k in options if k not in model.model_fields]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown {task} option {k!r}{hint}; valid options: {', '.join(valid)}")
    try:
        model.model_validate(options)
    except ValidationError as exc:
        errs = [e for e in exc.errors() if e.get("type") != "missing"]  # a required option: the protocol says what to pass
        if not errs:
            return
        e = errs[0]
        loc = ".".join(str(p) for p in e.get("loc", ()))
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        raise ValueError(f"option {loc}={e.get('input')!r}: {msg}" if loc else f"options: {msg}") from None
