"""Structured (JSON) output from small models: lenient extraction, schema validation, feedback retries."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from models.protocols import LLM, Message


class MalformedOutput(ValueError):
    """Model text that holds no recoverable JSON object; the message says why."""


# --------------------------------------------------------------------------- lenient JSON

_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)
_BARE_RE = re.compile(r"[A-Za-z_$][A-Za-z0-9_$-]*")
_NUMBER_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_LITERALS = {
    "true": True, "false": False, "null": None,
    "True": True, "False": False, "None": None,
    "NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf"),
}  # fmt: skip
_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_CLOSERS = {"{": "}", "[": "]"}


class _Truncated(Exception):
    """End of text inside a value; ``closable`` when only closing brackets are missing."""

    def __init__(self, reason: str, closable: bool) -> None:
        super().__init__(reason)
        self.closable = closable


class _Lenient:
    """Recursive-descent parser for the JSON-ish text small models write.

    Accepts single-quoted strings, bare keys, trailing commas, Python literals, ``//``/``#`` and
    ``/* */`` comments and raw newlines in strings. At end of text, containers whose last value is
    complete are closed; a cut inside a string, number or key is not recoverable.
    """

    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0

    def error(self, what: str) -> MalformedOutput:
        snippet = self.s[max(0, self.i - 20) : self.i + 20].replace("\n", "\\n")
        return MalformedOutput(f"{what} at char {self.i} (near {snippet!r})")

    def skip(self) -> None:
        s, n = self.s, len(self.s)
        while self.i < n:
            c = s[self.i]
            if c.isspace():
                self.i += 1
            elif s.startswith("//", self.i) or c == "#":
                j = s.find("\n", self.i)
                self.i = n if j < 0 else j + 1
            elif s.startswith("/*", self.i):
                j = s.find("*/", self.i + 2)
                self.i = n if j < 0 else j + 2
            else:
                return

    def value(self) -> Any:
        self.skip()
        if self.i >= len(self.s):
            raise _Truncated("text ends where a value was expected", closable=False)
        c = self.s[self.i]
        if c == "{":
            return self.container("{")
        if c == "[":
            return self.container("[")
        if c in "\"'":
            return self.string()
        m = _NUMBER_RE.match(self.s, self.i)
        if m:
            self.i = m.end()
            text = m.group(0)
            return float(text) if any(ch in text for ch in ".eE") else int(text)
        for word, lit in _LITERALS.items():
            if self.s.startswith(word, self.i) and not self._word_continues(self.i + len(word)):
                self.i += len(word)
                return lit
        raise self.error(f"unexpected {c!r}")

    def _word_continues(self, j: int) -> bool:
        return j < len(self.s) and (self.s[j].isalnum() or self.s[j] == "_")

    def string(self) -> str:
        quote = self.s[self.i]
        self.i += 1
        out: list[str] = []
        s, n = self.s, len(self.s)
        while self.i < n:
            c = s[self.i]
            if c == quote:
                self.i += 1
                return "".join(out)
            if c == "\\":
                if self.i + 1 >= n:
                    break
                e = s[self.i + 1]
                if e == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", s[self.i + 2 : self.i + 6]):
                    out.append(chr(int(s[self.i + 2 : self.i + 6], 16)))
                    self.i += 6
                    continue
                out.append(_ESCAPES.get(e, "\\" + e))
                self.i += 2
                continue
            out.append(c)
            self.i += 1
        raise _Truncated("text ends inside a string", closable=False)

    def key(self) -> str:
        c = self.s[self.i]
        if c in "\"'":
            return self.string()
        m = _BARE_RE.match(self.s, self.i)
        if not m:
            raise self.error("expected a key")
        self.i = m.end()
        return m.group(0)

    def container(self, opener: str) -> dict | list:
        closer = _CLOSERS[opener]
        is_obj = opener == "{"
        result: Any = {} if is_obj else []
        self.i += 1
        while True:
            self.skip()
            if self.i >= len(self.s):
                raise _Truncated(f"missing {closer!r}", closable=True)
            if self.s[self.i] == closer:
                self.i += 1
                return result
            if is_obj:
                k = self.key()
                self.skip()
                if self.i >= len(self.s):
                    raise _Truncated(f"text ends after key {k!r}", closable=False)
                if self.s[self.i] not in ":=":
                    raise self.error(f"expected ':' after key {k!r}")
                self.i += 1
                result[k] = self.value()
            else:
                result.append(self.value())
            self.skip()
            if self.i >= len(self.s):
                raise _Truncated(f"missing {closer!r}", closable=True)
            c = self.s[self.i]
            if c == ",":
                self.i += 1
            elif c != closer:
                raise self.error(f"expected ',' or {closer!r}")


def _balanced_end(text: str, start: int) -> int | None:
    """Index after the bracket that closes ``text[start]``, or None when the text ends first."""
    stack: list[str] = []
    quote: str | None = None
    i = start
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if c == quote:
                quote = None
        elif c in "\"'":
            # An apostrophe inside prose-like bare text ("don't") must not open a string.
            if c == "'" and i > 0 and text[i - 1].isalnum():
                pass
            else:
                quote = c
        elif c in "{[":
            stack.append(_CLOSERS[c])
        elif c in "}]":
            if not stack or stack[-1] != c:
                return i + 1
            stack.pop()
            if not stack:
                return i + 1
        i += 1
    return None


def _parse_candidate(text: str) -> dict:
    """Parse one candidate starting at ``{``; recover a missing closing tail where possible."""
    try:
        value = json.loads(text.strip())
    except ValueError:
        pass
    else:
        if isinstance(value, dict):
            return value
    parser = _Lenient(text)
    try:
        value = parser.value()
    except _Truncated as exc:
        if not exc.closable:
            raise MalformedOutput(f"truncated JSON: {exc}") from None
        value = _close_and_parse(text)
    if not isinstance(value, dict):
        raise MalformedOutput(f"expected a JSON object, got {type(value).__name__}")
    return value


def _close_and_parse(text: str) -> Any:
    """Append the closing brackets a truncated text is missing and parse it leniently."""
    stack: list[str] = []
    quote: str | None = None
    i = 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if c == quote:
                quote = None
        elif c in "\"'" and not (c == "'" and i > 0 and text[i - 1].isalnum()):
            quote = c
        elif c in "{[":
            stack.append(_CLOSERS[c])
        elif c in "}]" and stack:
            stack.pop()
        i += 1
    body = re.sub(r"[\s,]+$", "", text)
    return _Lenient(body + "".join(reversed(stack))).value()


def _candidates(text: str) -> list[str]:
    """Texts to try, best first: fenced blocks, then every ``{`` in the whole text."""
    regions: list[str] = []
    for m in _FENCE_RE.finditer(text):
        if "{" in m.group(2):
            regions.append(m.group(2))
    regions.append(text)
    out: list[str] = []
    for region in regions:
        for m in re.finditer(r"\{", region):
            end = _balanced_end(region, m.start())
            cand = region[m.start() : end] if end is not None else region[m.start() :]
            if cand not in out:
                out.append(cand)
    return out


def extract_json(text: str) -> dict:
    """The first JSON object in model text, parsed leniently.

    Tolerates code fences, prose around the object, trailing commas, single quotes, bare keys,
    Python literals, comments and a truncated tail when only closing brackets are missing.
    Raises :class:`MalformedOutput` with the reason otherwise.
    """
    if not isinstance(text, str):
        raise MalformedOutput(f"expected text, got {type(text).__name__}")
    cands = _candidates(text)
    if not cands:
        if "[" in text:
            raise MalformedOutput("expected a JSON object ({...}), found no '{' (a bare array is not accepted)")
        raise MalformedOutput("no JSON object found (no '{' in the text)")
    first_error: MalformedOutput | None = None
    for cand in cands:
        try:
            return _parse_candidate(cand)
        except MalformedOutput as exc:
            first_error = first_error or exc
    assert first_error is not None
    raise first_error


# --------------------------------------------------------------------------- schema-guided generation


@dataclass
class StructuredResult:
    """The validated value (None when every attempt failed) and each attempt's raw text and error."""

    value: BaseModel | None
    attempts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.value is not None

    @property
    def last_error(self) -> str | None:
        return self.attempts[-1]["error"] if self.attempts else None


def describe_validation_error(exc: ValidationError) -> str:
    """A short, model-readable summary of a pydantic validation error."""
    parts = []
    for err in exc.errors()[:8]:
        loc = ".".join(str(x) for x in err.get("loc", ())) or "(root)"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    more = len(exc.errors()) - 8
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def schema_hint(schema: type[BaseModel]) -> str:
    """A compact description of the expected JSON object: field names, types and required flags."""
    js = schema.model_json_schema()
    required = set(js.get("required", ()))
    fields = []
    for name, prop in js.get("properties", {}).items():
        typ = prop.get("type")
        if "enum" in prop:
            typ = "one of " + ", ".join(json.dumps(v) for v in prop["enum"])
        elif "anyOf" in prop:
            typ = " or ".join(str(p.get("type", p.get("$ref", "?")).split("/")[-1]) for p in prop["anyOf"])
        elif "$ref" in prop:
            ref = js.get("$defs", {}).get(prop["$ref"].split("/")[-1], {})
            typ = "one of " + ", ".join(json.dumps(v) for v in ref["enum"]) if "enum" in ref else "object"
        elif typ == "array" and isinstance(prop.get("items"), dict):
            typ = f"array of {prop['items'].get('type', 'object')}"
        fields.append(f'"{name}": {typ or "any"}{"" if name in required else " (optional)"}')
    return "{" + ", ".join(fields) + "}"


def generate_structured(
    llm: LLM,
    conversation: Sequence[Message],
    schema: type[BaseModel],
    *,
    retries: int = 2,
    **gen_kwargs: Any,
) -> StructuredResult:
    """Ask ``llm`` for a JSON object matching ``schema``; on failure, feed the error back and retry.

    ``gen_kwargs`` go to ``llm.chat`` (an ``assistant_prefix`` such as ``"{"`` is kept as part of the
    raw text). Never raises on malformed model text: returns ``value=None`` with every attempt.
    """
    conv = [dict(m) for m in conversation]
    prefix = gen_kwargs.get("assistant_prefix", "") or ""
    seed = gen_kwargs.get("seed")
    attempts: list[dict[str, Any]] = []
    for attempt in range(retries + 1):
        kwargs = dict(gen_kwargs)
        if seed is not None:
            # Identical seeds would resample the same failure when sampling.
            kwargs["seed"] = seed + attempt
        reply = llm.chat([conv], **kwargs)[0]
        raw = prefix + reply
        try:
            obj = extract_json(raw)
            value = schema.model_validate(obj)
        except MalformedOutput as exc:
            error = f"not valid JSON: {exc}"
        except ValidationError as exc:
            error = f"JSON does not match the schema: {describe_validation_error(exc)}"
        else:
            attempts.append({"raw": raw, "error": None})
            return StructuredResult(value=value, attempts=attempts)
        attempts.append({"raw": raw, "error": error})
        conv = [
            *conv,
            {"role": "assistant", "content": raw},
            {
                "role": "user",
                "content": (
                    f"That reply was rejected: {error}. Answer again with only one JSON object of the form "
                    f"{schema_hint(schema)}, with no other text."
                ),
            },
        ]
    return StructuredResult(value=None, attempts=attempts)
