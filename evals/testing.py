"""Helpers for testing evaluation protocols without files or models: an in-memory prediction store and
a :class:`~evals.base.ProtocolContext` over given cases (backend doubles: :mod:`agent.testing`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evals.base import Benchmark, DatasetSpec, EvalCase, ProtocolContext


class DictStore:
    """``PredictionStore`` in a dict; ``gets``/``puts`` count accesses."""

    def __init__(self) -> None:
        self.data: dict[str, dict] = {}
        self.gets = self.puts = 0

    def get(self, key: str) -> dict | None:
        self.gets += 1
        return self.data.get(key)

    def put(self, key: str, record: dict) -> None:
        self.puts += 1
        self.data[key] = dict(record)


def make_ctx(task: str, cases: list[EvalCase], out_dir: Path, options: dict, store: DictStore | None = None,
             labels: list[str] | None = None, **bench: Any) -> ProtocolContext:  # fmt: skip
    """A ProtocolContext over in-memory cases, with a quiet log collected in ``ctx.log.lines``."""
    lines: list[str] = []

    def log(msg: str) -> None:
        lines.append(msg)

    log.lines = lines  # type: ignore[attr-defined]
    b = Benchmark(name=f"test_{task}", task=task, dataset=DatasetSpec(path="cases.csv"), labels=labels or [], **bench)
    return ProtocolContext(bench=b, cases=cases, out_dir=out_dir, cache=store or DictStore(), options=options, log=log)
