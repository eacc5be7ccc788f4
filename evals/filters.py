"""Row filters of a benchmark: declarative rules and one registry of shipped functions, never imported code.

A benchmark is data: ``dataset.where`` holds rules (``{column, in | not_in | regex | hash_split}``) and
``dataset.filter_fn`` maps a column to the *name* of a function in :data:`FILTER_FUNCTIONS`. Nothing a
YAML file says can make dermgraph import a module or call an arbitrary function.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_REGEX_CHARS = 500


class FilterError(ValueError):
    """A filter rule or function name that cannot be used; the message says why."""


def _hex_prefix_mod(value: Any, every: int, keep: set[int]) -> bool:
    try:
        return int(str(value)[:8], 16) % every in keep
    except ValueError:
        return False


DERMNET_HOLDOUT_EVERY = 6
"""Same as ``training.data.DERMNET_HOLDOUT_EVERY`` (a test checks it; evals must not import training)."""


def is_dermnet_heldout(sha1: Any) -> bool:
    """DermNet photos kept out of the shipped case index (the split of ``training.data.is_dermnet_heldout``)."""
    return _hex_prefix_mod(sha1, DERMNET_HOLDOUT_EVERY, {0})


FILTER_FUNCTIONS: dict[str, Callable[[Any], bool]] = {
    "dermnet_heldout": is_dermnet_heldout,
    # The spelling benchmark files used before filters became names; a dictionary key, not an import.
    "training.data:is_dermnet_heldout": is_dermnet_heldout,
}
"""The only functions a benchmark may name in ``dataset.filter_fn`` (column → name)."""


def filter_function(name: str) -> Callable[[Any], bool]:
    """The registered filter function ``name``; anything else is a :class:`FilterError` listing the valid names."""
    fn = FILTER_FUNCTIONS.get(name) if isinstance(name, str) else None
    if fn is None:
        raise FilterError(
            f"filter_fn {name!r} is not a registered filter; benchmarks are data and cannot import code. "
            f"Registered: {', '.join(sorted(FILTER_FUNCTIONS))}; or use declarative dataset.where rules "
            "({column, in | not_in | regex | hash_split})"
        )
    return fn


class HashSplit(BaseModel):
    """Keep rows whose hash bucket (``hash mod every``) is in ``keep``.

    ``of: hex`` reads the first 8 hex digits of the value itself (a column that already holds a hash);
    ``of: sha256`` hashes the value's text."""

    model_config = ConfigDict(extra="forbid")
    every: int = Field(ge=1, le=1_000_000)
    keep: list[int] = Field(min_length=1)
    of: Literal["hex", "sha256"] = "sha256"

    def __call__(self, value: Any) -> bool:
        if self.of == "hex":
            return _hex_prefix_mod(value, self.every, set(self.keep))
        bucket = int(hashlib.sha256(str(value).encode("utf-8", "replace")).hexdigest()[:8], 16) % self.every
        return bucket in set(self.keep)


class FilterRule(BaseModel):
    """Keep rows whose ``column`` satisfies exactly one test (in / not_in / regex / hash_split)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    column: str
    in_: list[str] | None = Field(None, alias="in")
    not_in: list[str] | None = None
    regex: str | None = Field(None, description=f"Python regular expression matched (fullmatch) against the value; at most {MAX_REGEX_CHARS} characters.")
    hash_split: HashSplit | None = None

    @field_validator("in_", "not_in", mode="before")
    @classmethod
    def _strings(cls, v: Any) -> Any:
        return [str(x) for x in v] if isinstance(v, list) else v

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if len(v) > MAX_REGEX_CHARS:
            raise ValueError(f"regex longer than {MAX_REGEX_CHARS} characters")
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"invalid regex {v!r}: {exc}") from None
        return v

    @model_validator(mode="after")
    def _exactly_one(self) -> "FilterRule":
        given = [k for k in ("in_", "not_in", "regex", "hash_split") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"rule on column {self.column!r} must have exactly one of in, not_in, regex, hash_split (got {len(given)})")
        return self

    def __call__(self, row: dict[str, Any]) -> bool:
        value = row.get(self.column)
        text = "" if value is None else str(value)
        if self.in_ is not None:
            return text in self.in_
        if self.not_in is not None:
            return text not in self.not_in
        if self.regex is not None:
            return re.fullmatch(self.regex, text) is not None
        assert self.hash_split is not None
        return self.hash_split(text)
