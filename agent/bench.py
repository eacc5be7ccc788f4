"""``dermgraph bench``: throughput of the agent against the floor of its models run alone.

For each mode (``sequential``: ``Agent.diagnose`` per case; ``batched``: :class:`agent.batched.BatchedAgent`
micro-batches) it reports wall time, cases/s and per-node time (from the trace; the batched mode's
pre-encoding stage separately), then the isolated floor: each model alone on the same inputs, in the
same process, at the mode's batch size (encoder forward, FAISS case search, KB text embedding, and the
LLM's candidate scoring / summary where the configuration uses it), the agent's overhead over the sum
of floors, peak RSS and the configuration fingerprint. Models are warmed up first; figures exclude loading.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "lesion.jpg"


def bench_cases(source: str | Path | None, n: int) -> list:
    """``n`` cases from a folder/CSV/JSONL (cycled if shorter), or the bundled example repeated."""
    from agent.batch import Case, read_cases

    if source is None:
        return [Case(id=f"lesion-{i:04d}", image=EXAMPLE) for i in range(n)]
    cases = [c for c in read_cases(source) if getattr(c, "error", None) is None]
    if not cases:
        raise ValueError(f"no usable cases in {source}")
    return [cases[i % len(cases)] for i in range(n)] if len(cases) < n else cases[:n]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in ("started_at", "duration_s")}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _max_diff(a, b) -> float:
    """Largest absolute difference between numbers of two equal-shaped JSON values (inf if the structure differs)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return max((_max_diff(a[k], b[k]) for k in a if k in b), default=0.0) if a.keys() == b.keys() else float("inf")
    if isinstance(a, list) and isinstance(b, list):
        return max((_max_diff(x, y) for x, y in zip(a, b)), default=0.0) if len(a) == len(b) else float("inf")
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b))
    return 0.0 if a == b else float("inf")


def _run_mode(agent, cases, mode: str, batch_size: int) -> tuple[dict[str, Any], list[dict]]:
    from agent.batched import BatchedAgent

    runner = agent if mode == "sequential" else BatchedAgent(agent, [(c.image, c.question, c.metadata or None) for c in cases], batch_size)
    nodes: dict[str, float] = defaultdict(float)
    records = []
    t0 = time.perf_counter()
    for c in cases:
        d = runner.diagnose(c.image, question=c.question, metadata=c.metadata or None)
        rec = json.loads(d.model_dump_json())
        records.append(rec)
        for t in rec.get("trace", []):
            nodes[t["node"]] += float(t["duration_s"])
    wall = time.perf_counter() - t0
    if mode == "batched":
        nodes["prefetch (batched encoder, FAISS, text embedding, LLM)"] = runner.prefetch_seconds
        for k, v in runner.stage_seconds.items():
            nodes[f"  prefetch: {k}"] = v
        runner.close()
    verdicts = defaultdict(int)
    for r in records:
        verdicts[r["verdict"]] += 1
    out = {
        "mode": mode,
        "batch_size": 1 if mode == "sequential" else batch_size,
        "wall_s": round(wall, 3),
        "cases_per_s": round(len(cases) / wall, 3),
        "nodes_s": {k: round(v, 3) for k, v in nodes.items()},
        "verdicts": dict(verdicts),
        "peak_rss_mb": round(_peak_rss_mb(), 1),  # of the process so far (ru_maxrss never decreases)
    }
    if mode == "batched":
        out["prefetch_errors"] = runner.prefetch_errors
    return out, records


def _floors(agent, cases, batch_size: int) -> dict[str, float]:
    """Each model alone on the cases' inputs at ``batch_size`` (seconds for all cases)."""
    from agent.batched import CachingLLM, front_state, llm_first_round, uses_llm
    from agent.nodes.retrieve import _query_text, case_index_for

    rt = agent.runtime
    unwrap = lambda b: getattr(b, "inner", b)  # noqa: E731  (the batched mode's caching wrappers)
    clf = unwrap(rt.classifier)
    states = [agent._initial_state(c.image, c.question, c.metadata or None)[0] for c in cases]
    images = [s.image for s in states]
    metas = [s.metadata.as_dict() if s.metadata else None for s in states]
    floors: dict[str, float] = {}
    t0 = time.perf_counter()
    feats = []
    for i in range(0, len(images), batch_size):
        feats.append(clf.predict(images[i : i + batch_size], metas[i : i + batch_size]).features)
    floors["encoder forward"] = time.perf_counter() - t0
    second = unwrap(rt.second_expert) if rt.second_expert is not None else None
    if second is not None:
        t0 = time.perf_counter()
        for i in range(0, len(images), batch_size):
            second.predict_heads(images[i : i + batch_size])
        floors["second expert forward"] = time.perf_counter() - t0
    mprobe = unwrap(rt.modality_probe) if rt.modality_probe is not None else None
    if mprobe is not None:  # every image: its ImageNet pass is the one the clinical probe then reuses
        t0 = time.perf_counter()
        for i in range(0, len(images), batch_size):
            mprobe.predict(images[i : i + batch_size])
        floors["ImageNet probes forward"] = time.perf_counter() - t0
    probe = unwrap(rt.clinical_probe) if rt.clinical_probe is not None else None
    # the clinical probe's own pass only where it does not share the modality probe's (already timed) encoder
    if probe is not None and (mprobe is None or getattr(probe, "imagenet", None) is not getattr(mprobe, "imagenet", False)):
        from agent.nodes.encode import probe_wanted

        lesion = np.concatenate(feats)
        picked = [i for i, im in enumerate(images) if probe_wanted(rt, im)]  # untimed: the expert's cached or cheap re-run decides
        t0 = time.perf_counter()
        for i in range(0, len(picked), batch_size):
            idx = picked[i : i + batch_size]
            probe.predict([images[j] for j in idx], lesion[idx])
        floors["clinical probe forward"] = time.perf_counter() - t0
    # Inputs of the later models, computed (untimed) with the agent's own front nodes.
    texts, groups, fronts, indexes = [], defaultdict(list), [], {}
    cfg = rt.config.retrieval
    for s in states:
        s = front_state(s, rt)
        if s.modality.rejected:
            continue
        fronts.append(s)
        texts.append(_query_text(s))
        route = rt.config.route(s.modality.label)
        if route.case_sources and cfg.k_cases:  # the index and features the retrieve node searches for this case
            index, features, index_id = case_index_for(s, rt, route)
            indexes[index_id] = unwrap(index)
            groups[(index_id, tuple(route.case_sources))].append(np.asarray(features, np.float32))
    t0 = time.perf_counter()
    for (index_id, sources), rows in groups.items():
        for i in range(0, len(rows), batch_size):
            indexes[index_id].search(np.stack(rows[i : i + batch_size]), k=cfg.k_cases, sources=sources)
    floors["FAISS case search"] = time.perf_counter() - t0
    emb = getattr(rt.kb, "embedder", None) if cfg.k_knowledge else None
    if emb is not None:
        emb = unwrap(emb)
        t0 = time.perf_counter()
        for i in range(0, len(texts), batch_size):
            emb.embed(texts[i : i + batch_size])
        floors["KB text embedding"] = time.perf_counter() - t0
    if uses_llm(rt):
        # The first round's LLM calls, recorded through the reason node and run alone in chunks of batch_size.
        installed = rt.llm
        rt.__dict__["llm"] = probe = CachingLLM(unwrap(installed))
        try:
            seconds = llm_first_round(fronts, rt, probe, chunk=batch_size)
        finally:
            rt.__dict__["llm"] = installed
        names = {"score": "LLM candidate scoring", "chat": "LLM summary"}
        floors.update({names[k]: v for k, v in seconds.items() if v > 0})
    return {k: round(v, 4) for k, v in floors.items()}


def _llm_used(agent) -> list[str]:
    cfg = agent.config.reasoner
    used = []
    fusion = agent.runtime.fusion
    if any("llm" in mf.experts for mf in fusion.modalities.values()):
        used.append("candidate scoring")
    if cfg.llm_summary:
        used.append("summary")
    return used


MODES = ("sequential", "batched")


def check_modes(modes: Sequence[str]) -> list[str]:
    """``modes`` as a list; ValueError naming the unknown ones (or none given) and the valid ones."""
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"unknown mode(s) {', '.join(map(repr, bad)) or '(none given)'}; valid: {', '.join(MODES)}")
    return list(modes)


def run_bench(
    source: str | Path | None = None,
    *,
    n: int = 64,
    batch_size: int = 16,
    modes: Sequence[str] = ("sequential", "batched"),
    latency_repeats: int = 5,
    repeats: int = 1,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    agent=None,
) -> dict[str, Any]:
    """Run the benchmark; returns the report dict (see module docstring). With ``repeats`` > 1 the modes
    run alternately that many times and the fastest run of each (and the smallest floors) is reported."""
    import os
    import platform

    from agent.agent import Agent

    if modes:  # an empty list runs no mode, as before
        check_modes(modes)
    cases = bench_cases(source, n)
    agent = agent or Agent(config, overrides=overrides)
    t0 = time.perf_counter()
    agent.diagnose(cases[0].image, question=cases[0].question, metadata=cases[0].metadata or None)  # loads every model
    report: dict[str, Any] = {
        "config_fingerprint": agent.config.fingerprint(),
        "device": agent.config.device,
        "host": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "machine": platform.machine(),
                 "torch_threads": _torch_threads()},  # fmt: skip
        "cases": len(cases),
        "input": str(source) if source else f"{EXAMPLE.name} x{n}",
        "warmup_s": round(time.perf_counter() - t0, 2),
        "llm_used": _llm_used(agent) or "not used by this configuration (no floor)",
        "modes": [],
    }
    if latency_repeats:  # before any batched mode: no caches involved
        c = cases[0]
        times = []
        for _ in range(latency_repeats):
            t0 = time.perf_counter()
            agent.diagnose(c.image, question=c.question, metadata=c.metadata or None)
            times.append(time.perf_counter() - t0)
        report["warm_latency_s"] = {"median": round(statistics.median(times), 3), "min": round(min(times), 3), "max": round(max(times), 3), "repeats": latency_repeats}
    records: dict[str, list] = {}
    best: dict[str, dict[str, Any]] = {}
    for _ in range(max(1, repeats)):  # modes alternate so that load on a shared machine hits them alike
        for mode in modes:
            res, recs = _run_mode(agent, cases, mode, batch_size)
            floors = _floors(agent, cases, res["batch_size"])
            if mode not in best or res["wall_s"] < best[mode]["wall_s"]:
                prev = best.get(mode, {}).get("floors_s", floors)
                best[mode], records[mode] = res, recs
                res["floors_s"] = prev
            best[mode]["floors_s"] = {k: min(v, best[mode]["floors_s"].get(k, v)) for k, v in floors.items()}
    report["repeats"] = max(1, repeats)
    for mode in modes:
        res = best[mode]
        floor = sum(res["floors_s"].values())
        res["floor_sum_s"] = round(floor, 3)
        res["overhead_ratio"] = round(res["wall_s"] / floor - 1, 3) if floor > 0 else None
        report["modes"].append(res)
    if "sequential" in records and "batched" in records:
        a, b = [_strip(r) for r in records["sequential"]], [_strip(r) for r in records["batched"]]
        decision = lambda r: (r.get("label"), r.get("verdict"), [x["label"] for x in r.get("differential", [])], r.get("prediction_set"))  # noqa: E731
        report["batched_equals_sequential"] = {"identical_records": sum(x == y for x, y in zip(a, b)), "of": len(a),
                                               "identical_decisions": sum(decision(x) == decision(y) for x, y in zip(a, b)),
                                               "max_abs_numeric_diff": max((_max_diff(x, y) for x, y in zip(a, b)), default=0.0)}  # fmt: skip
    report["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return report


def _torch_threads() -> int | None:
    try:
        import torch

        return torch.get_num_threads()
    except ImportError:  # pragma: no cover
        return None


def format_report(r: dict[str, Any]) -> str:
    """Human-readable report."""
    lines = [
        f"dermgraph bench: {r['cases']} cases ({r['input']}), config {r['config_fingerprint']}, device {r['device']}",
        f"host: {r['host']}  (shared machines: compare modes of the same run only)",
        f"LLM: {r['llm_used']}; best of {r.get('repeats', 1)} alternating run(s) per mode",
    ]
    for m in r["modes"]:
        lines.append(f"\n[{m['mode']}] batch {m['batch_size']}: {m['wall_s']:.2f} s, {m['cases_per_s']:.3f} cases/s, peak RSS {m['peak_rss_mb']:.0f} MB")
        for k, v in m["nodes_s"].items():
            lines.append(f"  node {k:55s} {v:8.3f} s")
        for k, v in m["floors_s"].items():
            lines.append(f"  floor {k:54s} {v:8.3f} s")
        ratio = "n/a" if m["overhead_ratio"] is None else f"{m['overhead_ratio']:.1%}"
        lines.append(f"  floor sum {m['floor_sum_s']:.3f} s; agent overhead over floor (wall / floor sum - 1): {ratio}")
    if "batched_equals_sequential" in r:
        e = r["batched_equals_sequential"]
        lines.append(f"\nbatched vs sequential: {e['identical_records']}/{e['of']} records identical (timings excluded), "
                     f"{e.get('identical_decisions', '?')}/{e['of']} decisions (label, verdict, ranking, prediction set), max |numeric diff| {e['max_abs_numeric_diff']:.2e}")
    if "warm_latency_s" in r:
        w = r["warm_latency_s"]
        lines.append(f"warm single-case latency (Agent.diagnose): median {w['median']:.3f} s (min {w['min']:.3f}, max {w['max']:.3f}, {w['repeats']} runs)")
    lines.append(f"peak RSS {r['peak_rss_mb']:.0f} MB")
    return "\n".join(lines)
