"""Test doubles for the evaluation protocols: a dict-backed prediction store and backends that
answer from the input (registered into ``models.backends.BACKENDS`` by the tests that use them).

Each backend class records every call in its ``calls`` class attribute (clear it in the test), so
a test can tell whether the cache spared a model call.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evals.protocols.base import Benchmark, DatasetSpec, EvalCase, ProtocolContext


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


def _dominant(image: Any) -> str:
    r, g, b = np.asarray(image.convert("RGB"), float).reshape(-1, 3).mean(axis=0)
    return ("red", "green", "blue")[int(np.argmax([r, g, b]))]


class ColourVLM:
    """A VLM whose answer is ``answers[dominant colour of the image]`` (red/green/blue)."""

    calls: list[dict[str, Any]] = []

    def __init__(self, model: str = "colour-vlm", answers: dict[str, str] | None = None) -> None:
        self.model_id = model
        self.answers = answers or {}

    def generate(self, images: Sequence[Any], prompts: Sequence[str], *, max_new_tokens: int = 128, temperature: float = 0.0) -> list[str]:
        ColourVLM.calls.append({"n": len(images), "prompts": list(prompts), "max_new_tokens": max_new_tokens})
        return [self.answers.get(_dominant(im), "I am not sure.") for im in images]


class ColourEmbedder:
    """An ImageEmbedder: the image's mean RGB (scaled to 0..1) plus ``dim - 3`` zeros, L2-normalised."""

    calls: list[int] = []
    model_id = "colour-embedder"

    def __init__(self, dim: int = 8) -> None:
        self.dim = dim

    def embed_images(self, images: Sequence[Any]) -> np.ndarray:
        ColourEmbedder.calls.append(len(images))
        out = np.zeros((len(images), self.dim), np.float32)
        for i, im in enumerate(images):
            out[i, :3] = np.asarray(im.convert("RGB"), float).reshape(-1, 3).mean(axis=0) / 255.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


class EchoLLM:
    """An LLM answering ``replies[question]`` (else "Answer: <question>"); records the conversations."""

    calls: list[list[list[dict[str, str]]]] = []

    def __init__(self, model: str = "echo-llm", replies: dict[str, str] | None = None) -> None:
        self.model_id = model
        self.replies = replies or {}

    def chat(self, conversations, *, max_new_tokens=256, temperature=0.0, seed=None, assistant_prefix="", stop=None) -> list[str]:
        EchoLLM.calls.append([list(c) for c in conversations])
        out = []
        for conv in conversations:
            q = conv[-1]["content"]
            out.append(self.replies.get(q, f"Answer: {q}"))
        return out

    def score_continuations(self, conversation, assistant_prefix, continuations):
        raise NotImplementedError


def make_ctx(task: str, cases: list[EvalCase], out_dir: Path, options: dict, store: DictStore | None = None,
             labels: list[str] | None = None, **bench: Any) -> ProtocolContext:  # fmt: skip
    """A ProtocolContext over in-memory cases, with a quiet log collected in ``ctx.log.lines``."""
    lines: list[str] = []

    def log(msg: str) -> None:
        lines.append(msg)

    log.lines = lines  # type: ignore[attr-defined]
    b = Benchmark(name=f"test_{task}", task=task, dataset=DatasetSpec(path="cases.csv"), labels=labels or [], **bench)
    return ProtocolContext(bench=b, cases=cases, out_dir=out_dir, cache=store or DictStore(), options=options, log=log)


class FeatureReadingVLM(ColourVLM):
    """A ``needs_features`` VLM (like ``models.backends.feature_vlm``): answers from ``features=``, which it requires."""

    needs_features = True

    def generate(self, images, prompts, *, features=None, probs=None, max_new_tokens=128, temperature=0.0):
        if features is None or probs is None or len(features) != len(images):
            raise AssertionError("features/probs not passed")
        ColourVLM.calls.append({"n": len(images), "features": np.asarray(features).shape, "probs": np.asarray(probs).shape})
        return ["melanoma"] * len(images)
