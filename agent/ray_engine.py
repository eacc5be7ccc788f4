"""``dermgraph batch --engine ray``: the batch run scaled out on a Ray cluster with Ray Data.

The cases still to do become a Ray dataset (``from_items``); ``map_batches`` sends micro-batches to an
actor pool, each actor holding one loaded agent (its models load once per actor) and diagnosing its
batch with :class:`agent.batched.BatchedAgent`. The driver feeds the results to the local engine's
:func:`agent.batch.run_batch`, so records, error records, locking, fsync and resume (finished ids are
skipped) are exactly the local engine's. Extra: ``pip install 'dermgraph[ray]'``.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, Callable, Sequence


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the extra
        raise ImportError("--engine ray needs the 'ray' extra: pip install 'dermgraph[ray]'") from exc
    return ray


def _done_ids(out: Path, retry_errors: bool = False) -> set[str]:
    """Ids with a complete record in ``out`` (read only: run_batch itself locks, repairs and quarantines the
    file, and decides again; a case it wants that Ray did not run becomes an error record, never a loss)."""
    from agent.batch import _is_retryable

    done: set[str] = set()
    if not out.exists():
        return done
    with out.open("rb") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "id" in rec and line.endswith(b"\n") and not (retry_errors and _is_retryable(rec)):
                done.add(str(rec["id"]))
    return done


class AgentActor:
    """One loaded agent per Ray actor; ``__call__`` diagnoses a micro-batch (rows: id, image, question, metadata)."""

    def __init__(self, config_json: str, batch_size: int | None = None, agent_factory: Callable | None = None):
        import os

        from agent.config import AgentConfig

        config = AgentConfig.model_validate_json(config_json)
        if agent_factory is None:
            from agent.agent import Agent

            self.agent = Agent(config)
        else:
            self.agent = agent_factory(config)
        from agent.batched import calls_llm, default_batch_size

        self.batch_size = batch_size or default_batch_size(config.device, calls_llm(self.agent, config))
        self.pid = os.getpid()

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from agent.batched import BatchedAgent

        rows = [dict(zip(batch, vals)) for vals in zip(*batch.values())]
        reqs = [(r["image"], r["question"] or None, json.loads(r["metadata"]) or None) for r in rows]
        ba = BatchedAgent(self.agent, reqs, self.batch_size) if self.batch_size > 1 else self.agent
        payloads = []
        for (img, q, m) in reqs:
            try:
                d = ba.diagnose(img, question=q, metadata=m)
                payloads.append(pickle.dumps(("ok", json.loads(d.model_dump_json()))))
            except Exception as exc:  # re-raised on the driver, where run_batch turns it into the error record
                try:
                    payloads.append(pickle.dumps(("error", exc)))
                except Exception:  # an exception that does not pickle: keep its type name and message
                    payloads.append(pickle.dumps(("error", RuntimeError(f"{type(exc).__name__}: {exc}"))))
        if ba is not self.agent:
            ba.close()
        return {"id": [r["id"] for r in rows], "payload": payloads, "actor": [self.pid] * len(rows)}


def run_ray_batch(
    cases: Sequence[Any],
    out: str | Path,
    config,
    *,
    resume: bool = False,
    retry_errors: bool = False,
    address: str | None = None,
    actors: int = 2,
    gpus_per_actor: float = 0.0,
    cpus_per_actor: float = 1.0,
    batch_size: int | None = None,
    agent_factory: Callable | None = None,
    progress: bool = True,
    init_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``cases`` on Ray actors, writing the local engine's JSONL records to ``out``; returns run statistics.

    ``address``: an existing cluster (``ray start --head`` / KubeRay; "auto" for the local one); None starts
    a local runtime unless Ray is already initialised. ``agent_factory(config) -> Agent`` (picklable) replaces
    the default agent (tests use it for doubles)."""
    from agent.batch import run_batch

    ray = _import_ray()
    out = Path(out)
    if out.exists() and out.stat().st_size and not resume:
        raise FileExistsError(f"{out} exists: pass --resume to continue it, or choose another --out")
    if not ray.is_initialized():
        ray.init(address=address, **(init_kwargs or {}))
    done = _done_ids(out, retry_errors) if resume or retry_errors else set()
    todo = [c for c in cases if c.id not in done and getattr(c, "image", None) is not None and not getattr(c, "error", None)]
    results: dict[str, tuple[str, Any]] = {}
    actor_pids: set[int] = set()
    stream = iter(())
    if todo:
        items = [{"id": c.id, "image": str(c.image), "question": c.question or "", "metadata": json.dumps(c.metadata or {})} for c in todo]
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), actors * 4)))
        ds = ds.map_batches(
            AgentActor,
            fn_constructor_kwargs={"config_json": config.model_dump_json(), "batch_size": batch_size, "agent_factory": agent_factory},
            batch_size=batch_size or 16,  # cases per actor call; the actor prefetches micro-batches of batch_size (default by device)
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=gpus_per_actor or None,
            num_cpus=cpus_per_actor,
        )
        stream = iter(ds.iter_rows())

    def diagnose(case) -> dict[str, Any]:
        while case.id not in results:
            row = next(stream, None)
            if row is None:
                raise RuntimeError(f"the Ray dataset returned no result for case {case.id!r}")
            actor_pids.add(int(row["actor"]))
            results[str(row["id"])] = pickle.loads(row["payload"])
        status, value = results.pop(case.id)
        if status == "error":
            raise value
        return value

    # No per-case timeout on the driver: it only waits for results the actors produce.
    stats = run_batch(list(cases), out, diagnose, resume=resume, retry_errors=retry_errors, progress=progress)
    stats.update(engine="ray", actors=actors, actors_seen=len(actor_pids), batch_size=batch_size or 16)
    return stats
