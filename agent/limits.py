"""Bounds on the text a user hands the agent (question and metadata), checked before any model runs.

Over-limit or malformed input raises :class:`InputError` naming the field: one error for a single case,
one error record per case in a batch. Limits are configurable (``--set limits.max_question_chars=...``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class InputLimits(BaseModel):
    """Largest accepted inputs. The defaults keep every prompt well inside the shipped LLM's context."""

    model_config = ConfigDict(extra="forbid")

    max_question_chars: int = Field(4000, ge=1, le=1_000_000, description="Longest accepted question, in characters.")
    max_metadata_chars: int = Field(200, ge=1, le=100_000, description="Longest accepted metadata string (site, sex, ...), in characters.")
    max_history_chars: int = Field(2000, ge=1, le=2000, description="Longest accepted metadata.history, in characters.")
    max_image_pixels: int = Field(50_000_000, ge=1, le=400_000_000, description="Largest accepted image (width x height), checked from the header before decoding.")


class InputError(ValueError):
    """A question or metadata value the agent does not accept; ``str(e)`` names the field and the reason."""

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"invalid {field}: {reason}")

    def __reduce__(self):
        return (type(self), (self.field, self.reason))


def check_question(question: Any, limits: InputLimits) -> str | None:
    if question is None:
        return None
    if not isinstance(question, str):
        raise InputError("question", f"must be text, got {type(question).__name__}")
    if len(question) > limits.max_question_chars:
        raise InputError("question", f"{len(question)} characters, limit {limits.max_question_chars} (limits.max_question_chars)")
    return question


def check_metadata(metadata: Any, limits: InputLimits):
    """``metadata`` (dict, PatientMetadata or None) → a validated ``PatientMetadata`` or None."""
    from agent.state import PatientMetadata

    if metadata is None:
        return None
    if isinstance(metadata, PatientMetadata):
        metadata = metadata.model_dump(exclude_none=True)
    if not isinstance(metadata, dict):
        raise InputError("metadata", f"must be a mapping, got {type(metadata).__name__}")
    for key, value in metadata.items():
        if isinstance(value, str):
            limit = limits.max_history_chars if key == "history" else limits.max_metadata_chars
            if len(value) > limit:
                setting = "max_history_chars" if key == "history" else "max_metadata_chars"
                raise InputError(f"metadata.{key}", f"{len(value)} characters, limit {limit} (limits.{setting})")
    try:
        return PatientMetadata.model_validate(metadata)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ())) or "?"
        got = err.get("input")
        shown = repr(got) if len(repr(got)) <= 60 else repr(got)[:57] + "..."
        raise InputError(f"metadata.{loc}", f"{err.get('msg', 'invalid value')} (got {shown})") from None
