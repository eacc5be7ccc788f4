"""The agent's per-case predictions for a benchmark, through the prediction cache.

Predictions are produced per case (the full agent, or only the first nodes for the modality and
morphology protocols) in this process or in ``workers`` processes with one torch thread each, every
worker appending to its own cache shard. Progress and throughput are printed as cases finish.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from evals.base import EvalCase, ProtocolContext
from evals.cache import AGENT, ImageHashes, PredictionCache, case_key
from evals.progress import Progress

MODALITY = "modality"
"""Kind of a record with only the encoder and modality nodes run."""
DESCRIBE = "describe"
"""Kind of a record with the encoder, modality and morphology nodes run."""

UNTIL = {MODALITY: "modality", DESCRIBE: "morphology"}
"""The last node a partial record runs (``Agent.run(..., until=...)``)."""


class MissingPredictions(RuntimeError):
    """``--rescore`` found cases without a cached prediction."""


def fingerprint_for(config, kind: str) -> str:
    """The configuration fingerprint a record of ``kind`` depends on: the whole config for the full
    agent, only the sections its nodes read for partial runs (so changing the LLM keeps them valid)."""
    from agent.graph import config_sections

    if kind == AGENT:
        return config.fingerprint()
    data = config.model_dump(mode="json")
    # A section left at None (routing: the default table) is left out, as the whole-config fingerprint does.
    part = {s: data[s] for s in dict.fromkeys(config_sections(stop_after=UNTIL[kind])) if data[s] is not None}
    return kind + ":" + hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- producing records


def default_agent_factory(config):
    from agent.agent import Agent

    return Agent(config)


def _error_record(exc: Exception) -> dict[str, Any]:
    from agent.imageio import ImageInputError

    if isinstance(exc, ImageInputError):
        return {"status": "error", "error": {"type": "ImageInputError", "message": str(exc), "reason": exc.reason}}
    return {"status": "error", "error": {"type": type(exc).__name__, "message": str(exc)[:2000]}}


def predict(agent, case: EvalCase, kind: str) -> dict[str, Any]:
    """One cache record for ``case``: the Diagnosis JSON (kind ``agent``, as ``dermgraph batch`` writes
    it) or the outputs and trace of the first nodes (``modality``/``describe``). Errors become records."""
    record: dict[str, Any] = {"kind": kind, "case_id": case.id}
    try:
        if kind == AGENT:
            d = agent.diagnose(case.image, question=case.question, metadata=case.metadata or None)
            record.update(status="ok", diagnosis=json.loads(d.model_dump_json()))
        else:
            record.update(status="ok", **_partial(agent, case, UNTIL[kind]))
    except Exception as exc:  # one bad case must not stop the run; its record says what failed
        record.update(_error_record(exc))
    return record


def _partial(agent, case: EvalCase, until: str) -> dict[str, Any]:
    """The graph run up to node ``until``: the image hash, each node's output field and the trace."""
    from agent.graph import nodes_between

    state = agent.run(case.image, case.question, case.metadata or None, until=until)
    out: dict[str, Any] = {"image_sha256": state.image_sha256}
    for name in nodes_between(stop_after=until)[1:]:
        value = getattr(state, name, None)
        out[name] = value.model_dump(mode="json") if value is not None else None
    out["trace"] = [t.model_dump(mode="json") for t in state.trace]
    return out


_WORKER: dict[str, Any] = {}


def _init_worker(config_json: str, factory: Callable | None, shard_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover - torch is a core dependency
        pass
    from agent.config import AgentConfig

    config = AgentConfig.model_validate_json(config_json)
    _WORKER["agent"] = (factory or default_agent_factory)(config)
    _WORKER["cache"] = PredictionCache(shard_dir, shard=f"worker-{os.getpid()}")


def _work(kind: str, key: str, case: EvalCase) -> tuple[str, str]:
    rec = predict(_WORKER["agent"], case, kind)
    _WORKER["cache"].put(key, rec)
    return key, rec["status"]


def compute(ctx: ProtocolContext, kind: str, todo: list[tuple[str, EvalCase]]) -> dict[str, Any]:
    """Produce and cache records of ``kind`` for ``todo`` ((key, case) pairs); returns timing stats."""
    if not todo:
        return {"computed": 0}
    if ctx.agent_config is None:
        raise ValueError("this protocol needs an agent configuration")
    workers = max(1, min(int(ctx.workers or 1), len(todo)))
    progress = Progress(ctx.log, "[eval]", len(todo), every_s=15.0)
    ctx.log(f"[eval] running {kind} on {len(todo)} cases ({workers} process{'es' if workers > 1 else ''})")
    if workers == 1:
        agent = (ctx.agent_factory or default_agent_factory)(ctx.agent_config)
        from agent.agent import Agent
        from agent.batched import default_batch_size

        batch_size = int(ctx.options.get("batch_size") or default_batch_size(ctx.agent_config.device))

        if kind == AGENT and batch_size > 1 and isinstance(agent, Agent):
            from agent.batched import BatchedAgent  # micro-batches: one encoder forward / FAISS query matrix per batch

            agent = BatchedAgent(agent, [(c.image, c.question, c.metadata or None) for _, c in todo], batch_size)
        for key, case in todo:
            rec = predict(agent, case, kind)
            ctx.cache.put(key, rec)
            progress.update(status=rec["status"])
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        shard_dir = str(ctx.cache.root) if isinstance(ctx.cache, PredictionCache) else str(ctx.out_dir / "predictions")
        init = (ctx.agent_config.model_dump_json(), ctx.agent_factory, shard_dir)
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker, initargs=init) as pool:
            futures = [pool.submit(_work, kind, key, case) for key, case in todo]
            for fut in as_completed(futures):
                progress.update(status=fut.result()[1])
        if isinstance(ctx.cache, PredictionCache):
            ctx.cache.reload()
    seconds = time.perf_counter() - progress.t0
    return {"computed": len(todo), "errors": progress.errors, "seconds": round(seconds, 2), "cases_per_second": round(len(todo) / seconds, 3) if seconds > 0 else None, "workers": workers}


def case_keys(ctx: ProtocolContext, kind: str, fingerprint: str) -> list[str]:
    """Cache keys of ``ctx.cases`` for predictions of ``kind`` (image hashes are memoised on disk)."""
    from agent.imageio import ImageInputError

    hashes = ImageHashes(ctx.out_dir / "predictions" / "image_hashes.json")
    keys = []
    for case in ctx.cases:
        try:
            sha = hashes.sha256(case.image)
        except (ImageInputError, OSError):
            # Unreadable: key the case by its path so its error record is cached like any other.
            sha = "unreadable:" + hashlib.sha256(str(case.image).encode()).hexdigest()
        keys.append(case_key(sha, fingerprint, case.question, case.metadata, kind))
    hashes.save()
    return keys


def _retry(rec: dict[str, Any] | None) -> bool:
    """Missing, or an error other than an unreadable image (which would fail the same way again)."""
    return rec is None or (rec.get("status") != "ok" and (rec.get("error") or {}).get("type") != "ImageInputError")


def ensure_predictions(ctx: ProtocolContext, kind: str, reuse_agent: bool = False) -> tuple[list[dict[str, Any] | None], dict[str, Any]]:
    """Cached records for every case (computing the missing ones unless ``ctx.rescore``), in case order.

    ``reuse_agent``: a full-agent record of the same case and configuration also serves (it contains
    the partial outputs), so imported ``dermgraph batch`` results are used by every protocol.
    With ``ctx.rescore`` missing cases raise :class:`MissingPredictions`, unless the option
    ``allow_partial`` is set: then they are None and the caller scores the others.
    """
    fp = fingerprint_for(ctx.agent_config, kind)
    keys = case_keys(ctx, kind, fp)
    alt = case_keys(ctx, AGENT, fingerprint_for(ctx.agent_config, AGENT)) if reuse_agent and kind != AGENT else [None] * len(keys)
    records: list[dict[str, Any] | None] = []
    for key, akey in zip(keys, alt):
        rec = ctx.cache.get(key)
        if _retry(rec) and akey is not None and not _retry(ctx.cache.get(akey)):
            rec = ctx.cache.get(akey)
        records.append(rec)
    todo = [(k, c) for k, c, r in zip(keys, ctx.cases, records) if _retry(r) and not (ctx.rescore and r is not None)]
    stats: dict[str, Any] = {"cached": len(keys) - len(todo), "kind": kind, "fingerprint": fp}
    if todo and ctx.rescore:
        if ctx.options.get("allow_partial"):
            stats["missing"] = len(todo)
            return records, stats
        raise MissingPredictions(
            f"{len(todo)} of {len(keys)} cases have no cached prediction in {getattr(ctx.cache, 'root', ctx.out_dir)} "
            f"(kind {kind}, config {fp}); run without --rescore to compute them, --import-batch a dermgraph batch "
            f"results file made with this configuration, --limit, or --opt allow_partial=true to score only the cached ones"
        )
    stats.update(compute(ctx, kind, todo))
    if todo:
        records = [ctx.cache.get(k) if _retry(r) else r for k, r in zip(keys, records)]
    return records, stats
