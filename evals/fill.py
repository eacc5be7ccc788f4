"""The one cache-fill loop of every evaluation protocol: each case's record from the prediction cache, the
missing ones computed in chunks and cached as they come."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from evals.progress import Progress


class MissingPredictions(RuntimeError):
    """``--rescore`` found cases without a cached prediction."""


@dataclass
class CachedMap:
    """What :func:`cached_map` found and did."""

    records: dict[str, dict[str, Any]]
    """Key -> record (cached or computed now); keys dropped under ``allow_partial`` are absent."""
    missing: int
    """Cases whose record was computed this run."""
    computed: int
    """Distinct keys computed this run."""
    seconds: float
    """Time spent computing."""
    errors: int = 0
    """Computed records whose status is not ok."""

    def kept(self, keys: Sequence[str]) -> list[int]:
        """Indices of ``keys`` that have a record."""
        return [i for i, k in enumerate(keys) if k in self.records]


def cached_map(
    ctx: Any,
    keys: Sequence[str],
    compute: Callable[[list[str]], Sequence[dict[str, Any]]],
    *,
    what: str,
    batch_size: int | Callable[[], int],
    allow_partial: bool,
    prepare: Callable[[int, int], None] | None = None,
    get: Callable[[str], dict[str, Any] | None] | None = None,
    redo: Callable[[dict[str, Any]], bool] | None = None,
    hint: str = "",
    unit: str = "items",
) -> CachedMap:
    """The cached record of each of ``keys`` (one per case), computing what the cache lacks: the one
    cache-fill loop of every protocol (the agent's predictions included).

    Distinct missing keys are computed once, ``batch_size`` at a time (or what ``batch_size()`` returns after
    ``prepare``): ``compute(chunk)`` returns one
    record per key of ``chunk``, which is cached as it comes, with progress lines (a record whose
    ``status`` is not ok counts as an error). ``prepare(n_missing, n_todo)`` (cases without a record,
    distinct keys to compute) runs once before the first batch: build the backend there, so a fully
    cached run loads no model. ``get`` looks a key up (default ``ctx.cache.get``); a found record for
    which ``redo(record)`` is true is computed again (not under ``--rescore``). Under ``--rescore``
    missing records raise ``MissingPredictions`` (``hint`` appended) unless ``allow_partial``
    (:func:`check_missing`); they are then absent from the result."""
    get = get or ctx.cache.get
    rescore = getattr(ctx, "rescore", False)
    found: dict[str, dict[str, Any]] = {}
    for key in keys:
        rec = get(key)
        if rec is not None and (rescore or redo is None or not redo(rec)):
            found[key] = rec
    missing = sum(k not in found for k in keys)
    if check_missing(ctx, missing, len(keys), allow_partial, hint):
        return CachedMap(found, 0, 0, 0.0)
    todo = list(dict.fromkeys(k for k in keys if k not in found))
    if todo and prepare is not None:
        prepare(missing, len(todo))
    size = batch_size() if callable(batch_size) else batch_size  # a callable: known once prepare has run
    progress = Progress(ctx.log, what, len(todo), unit=unit)
    for start in range(0, len(todo), size):
        chunk = todo[start : start + size]
        for key, rec in zip(chunk, compute(chunk), strict=True):
            ctx.cache.put(key, rec)
            found[key] = rec
            progress.update(status=rec.get("status", "ok"))
    return CachedMap(found, missing, len(todo), progress.elapsed_s, progress.errors)


def check_missing(ctx: Any, missing: int, total: int, allow_partial: bool, hint: str = "") -> bool:
    """Under ``--rescore`` (score from the cache only) cases without a cached output raise
    ``evals.predictions.MissingPredictions`` unless ``allow_partial``; returns True when they are to be dropped."""
    if not getattr(ctx, "rescore", False) or not missing:
        return False
    if allow_partial:
        ctx.log(f"PARTIAL: {missing} of {total} cases have no cached output and are not scored (allow_partial)")
        return True
    raise MissingPredictions(
        f"{missing} of {total} cases have no cached prediction in {getattr(ctx.cache, 'root', ctx.out_dir)}{hint}; "
        "run without --rescore, or --opt allow_partial=true to score only the cached ones"
    )
