"""The agent's per-case predictions for a benchmark, through the prediction cache.

Predictions are produced per case (the full agent, or only the first nodes for the modality and
morphology protocols) in this process or in ``workers`` processes with one torch thread each, and
cached as they come by the protocols' one cache-fill loop (:func:`evals.fill.cached_map`).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

from evals.base import EvalCase, ProtocolContext
from evals.cache import AGENT, ImageHashes, case_key
from evals.fill import MissingPredictions, cached_map  # noqa: F401  (MissingPredictions: also imported from here)

MODALITY = "modality"
"""Kind of a record with only the encoder and modality nodes run."""
DESCRIBE = "describe"
"""Kind of a record with the encoder, modality and morphology nodes run."""

UNTIL = {MODALITY: "modality", DESCRIBE: "morphology"}
"""The last node a partial record runs (``Agent.run(..., until=...)``)."""


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


def _init_worker(config_json: str, factory: Callable | None) -> None:
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover - torch is a core dependency
        pass
    from agent.config import AgentConfig

    config = AgentConfig.model_validate_json(config_json)
    _WORKER["agent"] = (factory or default_agent_factory)(config)


def _work(kind: str, cases: list[EvalCase], batch_size: int) -> list[dict[str, Any]]:
    return predict_chunk(_WORKER["agent"], cases, kind, batch_size)


def predict_chunk(agent: Any, cases: list[EvalCase], kind: str, batch_size: int) -> list[dict[str, Any]]:
    """The records of ``cases``, full-agent ones micro-batched when ``batch_size`` > 1 (one encoder forward,
    FAISS query matrix and, where used, batched LLM calls per micro-batch: ``agent.batched``)."""
    from agent.agent import Agent

    if kind != AGENT or batch_size <= 1 or not isinstance(agent, Agent):
        return [predict(agent, c, kind) for c in cases]
    from agent.batched import BatchedAgent

    batched = BatchedAgent(agent, [(c.image, c.question, c.metadata or None) for c in cases], batch_size)
    try:
        return [predict(batched, c, kind) for c in cases]
    finally:
        batched.close()


class _Producer:
    """``compute`` for :func:`evals.fill.cached_map`: the records of a chunk of cases, from the agent
    in this process (micro-batched for full records when ``batch_size`` > 1) or from ``workers`` processes
    with one torch thread each. Built on the first chunk, so a fully cached run loads no model."""

    def __init__(self, ctx: ProtocolContext, kind: str, cases: dict[str, EvalCase]):
        self.ctx, self.kind, self.cases = ctx, kind, cases
        self.agent: Any = None
        self.pool: Any = None
        self.workers = 1
        self.batch_size = 1

    def start(self, n_missing: int, n_todo: int) -> None:
        from agent.batched import calls_llm, default_batch_size

        ctx = self.ctx
        if ctx.agent_config is None:
            raise ValueError("this protocol needs an agent configuration")
        self.workers = max(1, min(int(ctx.workers or 1), n_todo))
        if self.workers == 1:
            self.agent = (ctx.agent_factory or default_agent_factory)(ctx.agent_config)
        if ctx.options.get("batch_size"):
            self.batch_size = int(ctx.options["batch_size"])
        elif self.kind != AGENT:
            self.batch_size = 1  # only full-agent records are micro-batched (predict_chunk)
        else:
            self.batch_size = default_batch_size(ctx.agent_config.device, calls_llm(self.agent, ctx.agent_config))
        ctx.log(f"[eval] running {self.kind} on {n_todo} cases ({self.workers} process{'es' if self.workers > 1 else ''}, micro-batch {self.batch_size})")
        if self.workers > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            init = (ctx.agent_config.model_dump_json(), ctx.agent_factory)
            self.pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"), initializer=_init_worker, initargs=init)

    def chunk_size(self) -> int:
        # In-process: one micro-batch (1 where cases run one at a time: each is cached as it finishes). Pool: one micro-batch per
        # worker, or two cases each when cases go one at a time.
        return self.batch_size * self.workers if self.batch_size > 1 else (1 if self.workers == 1 else 2 * self.workers)

    def __call__(self, keys: list[str]) -> list[dict[str, Any]]:
        cases = [self.cases[k] for k in keys]
        if self.pool is None:
            return predict_chunk(self.agent, cases, self.kind, self.batch_size)
        step = max(1, -(-len(cases) // self.workers))  # ceil: one part per worker
        parts = [cases[i : i + step] for i in range(0, len(cases), step)]
        return [r for recs in self.pool.map(_work, [self.kind] * len(parts), parts, [self.batch_size] * len(parts)) for r in recs]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


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


def _retry(rec: dict[str, Any]) -> bool:
    """An error other than an unreadable image (which would fail the same way again)."""
    return rec.get("status") != "ok" and (rec.get("error") or {}).get("type") != "ImageInputError"


def ensure_predictions(ctx: ProtocolContext, kind: str, reuse_agent: bool = False) -> tuple[list[dict[str, Any] | None], dict[str, Any]]:
    """Cached records for every case (computing the missing ones unless ``ctx.rescore``), in case order,
    through the protocols' one cache-fill loop (:func:`evals.fill.cached_map`).

    ``reuse_agent``: a full-agent record of the same case and configuration also serves (it contains
    the partial outputs), so imported ``dermgraph batch`` results are used by every protocol.
    With ``ctx.rescore`` missing cases raise :class:`MissingPredictions`, unless the option
    ``allow_partial`` is set: then they are None and the caller scores the others.
    """
    fp = fingerprint_for(ctx.agent_config, kind)
    keys = case_keys(ctx, kind, fp)
    alt = dict(zip(keys, case_keys(ctx, AGENT, fingerprint_for(ctx.agent_config, AGENT)))) if reuse_agent and kind != AGENT else {}

    def get(key: str) -> dict[str, Any] | None:
        rec = ctx.cache.get(key)
        if (rec is None or _retry(rec)) and key in alt:
            other = ctx.cache.get(alt[key])
            if other is not None and not _retry(other):
                return other
        return rec

    producer = _Producer(ctx, kind, dict(zip(keys, ctx.cases)))
    hint = (f" (kind {kind}, config {fp}); --import-batch a dermgraph batch results file made with this configuration, "
            "or use --limit")  # fmt: skip
    try:
        filled = cached_map(ctx, keys, producer, what="[eval]", batch_size=producer.chunk_size,
                            allow_partial=bool(ctx.options.get("allow_partial")), prepare=producer.start, get=get, redo=_retry, hint=hint, unit="cases")  # fmt: skip
    finally:
        producer.close()
    records = [filled.records.get(k) for k in keys]
    stats: dict[str, Any] = {"cached": len(keys) - filled.missing, "kind": kind, "fingerprint": fp}
    if ctx.rescore and any(r is None for r in records):
        stats["missing"] = sum(r is None for r in records)
    if filled.computed:
        s = filled.seconds
        stats.update(computed=filled.computed, errors=filled.errors, seconds=round(s, 2),
                     cases_per_second=round(filled.computed / s, 3) if s > 0 else None, workers=producer.workers,
                     micro_batch=producer.batch_size)  # fmt: skip
    else:
        stats["computed"] = 0
    return records, stats
