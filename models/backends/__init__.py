"""Backend registry: ``create(kind, name, **kwargs)`` builds a backend by name.

Backends are referenced as ``"module:Class"`` strings so that importing this registry stays
cheap and optional dependencies are only imported when a backend is actually created.
"""

from __future__ import annotations

import importlib
from typing import Any

BACKENDS: dict[str, dict[str, str]] = {
    "classifier": {
        "sklesion": "models.sklesion:SklesionClassifier",
        "efficientnet": "models.efficientnet:EfficientNetExpert",
        "replay": "models.backends.replay:ReplayClassifier",  # recorded outputs (training data, evaluations)
    },
    "llm": {
        "transformers": "models.backends.hf_llm:TransformersLLM",
        "openai-compatible": "models.backends.openai_compat:OpenAICompatibleLLM",
        "vllm": "models.backends.vllm_llm:VLLMLLM",
    },
    "vlm": {
        "transformers": "models.backends.hf_vlm:TransformersVLM",
        "openai-compatible": "models.backends.openai_compat:OpenAICompatibleVLM",
        "feature-vlm": "models.backends.feature_vlm:FeatureVLMDescriber",
    },
    "text_embedder": {
        "sentence-transformers": "models.backends.sentence:SentenceEmbedder",
    },
    "image_embedder": {
        "open_clip": "models.backends.openclip:OpenCLIPEmbedder",
        "sklesion": "models.sklesion:SklesionImageEmbedder",
    },
}

# Which pip extra provides the optional dependency a backend needs.
EXTRAS: dict[str, str] = {"vllm": "vllm", "trl": "train", "faiss": "gpu"}


def register(kind: str, name: str, target: str) -> None:
    """Register a backend ``target`` ("module:Class") under ``kind``/``name``."""
    BACKENDS.setdefault(kind, {})[name] = target


def names(kind: str) -> list[str]:
    """Valid backend names for ``kind``."""
    if kind not in BACKENDS:
        raise KeyError(f"unknown backend kind {kind!r}; valid kinds: {sorted(BACKENDS)}")
    return sorted(BACKENDS[kind])


def resolve_class(kind: str, name: str) -> type:
    """Import and return the backend class registered as ``kind``/``name``."""
    valid = names(kind)
    if name not in BACKENDS[kind]:
        raise KeyError(f"unknown {kind} backend {name!r}; valid names: {valid}")
    module_name, _, attr = BACKENDS[kind][name].partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr)


def create(kind: str, name: str, **kwargs: Any) -> Any:
    """Build the backend ``kind``/``name`` with ``kwargs`` (weights resolve lazily, on first use)."""
    return resolve_class(kind, name)(**kwargs)


def require(module: str, extra: str, feature: str) -> Any:
    """Import an optional dependency or raise an ImportError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised via tests with a missing module
        raise ImportError(
            f"{feature} needs the optional dependency {module!r}: pip install 'dermgraph[{extra}]'"
        ) from exc
