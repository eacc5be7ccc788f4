"""Small contracts every backend implements. Nodes depend on these, never on a concrete backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

Message = dict[str, str]
"""A chat message: ``{"role": "system"|"user"|"assistant", "content": str}``."""


@dataclass(frozen=True)
class ClassifierOutput:
    """Batched output of an image classifier.

    probs: (N, C) class probabilities, rows sum to 1.
    features: (N, D) pooled image features (what heads and the case index are trained on).
    labels: the C class codes, in column order.
    """

    probs: np.ndarray
    features: np.ndarray
    labels: tuple[str, ...]


@runtime_checkable
class ImageClassifier(Protocol):
    model_id: str
    labels: tuple[str, ...]
    feature_dim: int

    def predict(self, images: Sequence[Any], metadata: Sequence[dict | None] | None = None) -> ClassifierOutput:
        """Classify RGB PIL images (any size); metadata dicts may carry age, sex, site."""
        ...


@runtime_checkable
class TextEmbedder(Protocol):
    model_id: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(N, dim) float32, L2-normalised."""
        ...


@runtime_checkable
class ImageEmbedder(Protocol):
    model_id: str
    dim: int

    def embed_images(self, images: Sequence[Any]) -> np.ndarray:
        """(N, dim) float32, L2-normalised."""
        ...


@runtime_checkable
class LLM(Protocol):
    model_id: str

    def chat(
        self,
        conversations: Sequence[Sequence[Message]],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        seed: int | None = None,
        assistant_prefix: str = "",
        stop: Sequence[str] | None = None,
    ) -> list[str]:
        """Batched chat completion. ``assistant_prefix`` is forced as the start of the reply
        (the returned text excludes it); generation stops at any of ``stop`` (excluded)."""
        ...

    def score_continuations(
        self, conversation: Sequence[Message], assistant_prefix: str, continuations: Sequence[str]
    ) -> np.ndarray:
        """Sum of token log-probabilities of each continuation after the chat prompt plus
        ``assistant_prefix``. Backends that cannot score raise ``NotImplementedError``."""
        ...


ScoreRequest = tuple[Sequence[Message], str, Sequence[str]]
"""One :meth:`LLM.score_continuations` call's arguments: (conversation, assistant_prefix, continuations)."""


def score_many(llm: LLM, requests: Sequence[ScoreRequest]) -> list[np.ndarray]:
    """``llm.score_continuations`` for each request, in one batched call where the backend has
    ``score_continuations_batch`` (several prompts per forward pass), else one call per request."""
    batch = getattr(llm, "score_continuations_batch", None)
    if callable(batch):
        return list(batch(requests))
    return [llm.score_continuations(conv, prefix, conts) for conv, prefix, conts in requests]


ChatRequest = tuple[Sequence[Message], dict[str, Any]]
"""One conversation and the keyword arguments of its :meth:`LLM.chat` call (``assistant_prefix``, ``max_new_tokens``, ...)."""


def chat_many(llm: LLM, requests: Sequence[ChatRequest]) -> list[str]:
    """One reply per request, in one batched call where the backend has ``chat_batch`` (requests with their own
    ``assistant_prefix`` share a batch), else one ``chat`` call per group of requests with equal arguments."""
    batch = getattr(llm, "chat_batch", None)
    if callable(batch):
        return list(batch(requests))
    out: list[str] = [""] * len(requests)
    groups: dict[str, list[int]] = {}
    for i, (_, kw) in enumerate(requests):
        groups.setdefault(repr(sorted(kw.items())), []).append(i)
    for idx in groups.values():
        for i, text in zip(idx, llm.chat([requests[i][0] for i in idx], **requests[idx[0]][1]), strict=True):
            out[i] = text
    return out


@runtime_checkable
class VLM(Protocol):
    model_id: str

    def generate(
        self,
        images: Sequence[Any],
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
    ) -> list[str]:
        """One answer per (image, prompt) pair."""
        ...
