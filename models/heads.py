"""Small trained heads on image features, stored as one safetensors file with a JSON config.

A ``HeadSet`` holds a shared standardiser and one or more softmax heads (e.g. the modality head, or
the seven Derm7pt criteria). Optionally it carries an out-of-distribution detector: a PCA projection
and class centroids with a distance threshold calibrated on held-out data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Head:
    """One softmax head: ``softmax((x_std @ W + b) / temperature)``."""

    name: str
    classes: list[str]
    weight: np.ndarray  # (D, C)
    bias: np.ndarray  # (C,)
    temperature: float = 1.0

    def predict_proba(self, x_std: np.ndarray) -> np.ndarray:
        logits = (x_std @ self.weight + self.bias) / self.temperature
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)


@dataclass
class OODDetector:
    """Distance to the nearest class centroid in a PCA space; ``threshold`` from held-out in-distribution data."""

    components: np.ndarray  # (D, k)
    centroids: np.ndarray  # (n, k)
    threshold: float

    def score(self, x_std: np.ndarray) -> np.ndarray:
        z = x_std @ self.components
        d = ((z[:, None, :] - self.centroids[None, :, :]) ** 2).sum(-1)
        return np.sqrt(d.min(axis=1))


FEATURE_KINDS = ("lesion-encoder", "second-expert")
"""Whose pooled features a head set reads: the lesion encoder's (``ImageEncoding.features``) or the second visual
expert's (``ImageEncoding.expert_features``); stored as ``meta['features']``."""


@dataclass
class HeadSet:
    """Standardiser + heads (+ optional OOD detector) with provenance metadata."""

    mean: np.ndarray
    scale: np.ndarray
    heads: dict[str, Head]
    inputs: str = "features"
    ood: OODDetector | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def feature_kind(self) -> str:
        """One of :data:`FEATURE_KINDS` (artifacts without ``meta['features']`` read the lesion encoder's)."""
        kind = self.meta.get("features", "lesion-encoder")
        if kind not in FEATURE_KINDS:
            raise ValueError(f"head set {self.meta.get('id', '')!r} reads {kind!r} features; valid: {', '.join(FEATURE_KINDS)}")
        return kind

    def standardise(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"head expects {self.mean.shape[0]} input dims, got {x.shape[1]}")
        return (x - self.mean) / self.scale

    def predict_proba(self, x: np.ndarray) -> dict[str, np.ndarray]:
        xs = self.standardise(x)
        return {name: h.predict_proba(xs) for name, h in self.heads.items()}

    def ood_score(self, x: np.ndarray) -> np.ndarray | None:
        return None if self.ood is None else self.ood.score(self.standardise(x))

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        tensors = {"mean": self.mean.astype(np.float32), "scale": self.scale.astype(np.float32)}
        cfg: dict[str, Any] = {"inputs": self.inputs, "meta": self.meta, "heads": {}}
        for name, h in self.heads.items():
            tensors[f"{name}.weight"] = h.weight.astype(np.float32)
            tensors[f"{name}.bias"] = h.bias.astype(np.float32)
            cfg["heads"][name] = {"classes": h.classes, "temperature": h.temperature}
        if self.ood is not None:
            tensors["ood.components"] = self.ood.components.astype(np.float32)
            tensors["ood.centroids"] = self.ood.centroids.astype(np.float32)
            cfg["ood_threshold"] = self.ood.threshold
        # safetensors writes raw buffers: transposed (Fortran-ordered) arrays must be made C-contiguous.
        tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        save_file(tensors, str(path), metadata={"config": json.dumps(cfg)})

    @classmethod
    def load(cls, path: str | Path) -> "HeadSet":
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            cfg = json.loads(f.metadata()["config"])
            t = {k: f.get_tensor(k) for k in f.keys()}
        heads = {
            name: Head(name, spec["classes"], t[f"{name}.weight"], t[f"{name}.bias"], spec.get("temperature", 1.0))
            for name, spec in cfg["heads"].items()
        }
        ood = None
        if "ood.components" in t:
            ood = OODDetector(t["ood.components"], t["ood.centroids"], float(cfg["ood_threshold"]))
        return cls(t["mean"], t["scale"], heads, cfg.get("inputs", "features"), ood, cfg.get("meta", {}))
