"""Exceptions as one line for users: what every boundary (CLI, server, index builder) prints instead of a traceback."""

from __future__ import annotations

from typing import Any


def message(exc: BaseException) -> str:
    """An exception's message on one line: a KeyError's own message (``str()`` would quote it), others' text flattened."""
    raw = exc.args[0] if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str) else str(exc)
    return " ".join(raw.split())


def errors_line(errors: list[dict[str, Any]], names: dict[str, str] | None = None, show_input: bool = True) -> str:
    """pydantic's error list as one line: the first error's field (mapped through ``names``), message (and input),
    how many more."""
    e = errors[0]
    loc = ".".join(str(p) for p in e.get("loc", ()))
    loc = (names or {}).get(loc, loc)
    msg = " ".join(str(e.get("msg", "")).removeprefix("Value error, ").split())
    got = e.get("input")
    shown = f" (got {str(got)[:60]!r})" if show_input and got is not None and not isinstance(got, (dict, list)) else ""
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{loc + ': ' if loc else ''}{msg}{shown}{more}"
