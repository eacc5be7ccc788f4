"""Replay backends: recorded model outputs served through the normal backend seam.

Training-data builders and evaluations that already hold a network's outputs for their images (feature caches,
cross-fitted heads, perturbed probabilities) run the agent's real graph with these in place of the network:
``Agent(backends={"classifier": ReplayClassifier(...), "second_expert": ReplayExpert(...)})``. An image is
identified by the SHA-256 of its decoded pixels (:func:`models.pixels.pixel_sha256`, the agent's own
``CaseState.image_sha256``), so a replayed case goes through exactly the nodes a live one does.

A table is filled with :meth:`add` (or loaded from an ``.npz`` written by :meth:`save`, so a configuration can
name it: ``encoder: {classifier: {backend: replay, model: outputs.npz}}``). Asking for an image the table does
not hold is an error, never a made-up output; :class:`ReplayExpert` may instead be told that an image has no
recorded opinion (``add(sha, None)``: e.g. the expert trained on it and only in-sample outputs exist).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from models.pixels import pixel_sha256
from models.protocols import ClassifierOutput


def _key(image: Any) -> str:
    return image if isinstance(image, str) else pixel_sha256(image)


class ReplayClassifier:
    """An :class:`models.protocols.ImageClassifier` that returns recorded probabilities and features."""

    def __init__(self, model: str | Path | None = None, *, labels: Sequence[str] | None = None, model_id: str = "replay", device: str | None = None):
        self.model_id = model_id
        self.labels: tuple[str, ...] = tuple(labels or ())
        self._rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if model is not None:
            self.load(model)

    @property
    def feature_dim(self) -> int:
        return next(iter(self._rows.values()))[1].shape[0] if self._rows else 0

    def add(self, image: Any, probs: Sequence[float], features: Sequence[float]) -> str:
        """Record the outputs for ``image`` (a PIL image or its pixel SHA-256); returns the key."""
        key = _key(image)
        p = np.asarray(probs, np.float64)  # float32 inputs convert exactly: the replayed values are the recorded ones
        if self.labels and p.shape != (len(self.labels),):
            raise ValueError(f"probabilities of shape {p.shape} for {len(self.labels)} labels")
        self._rows[key] = (p, np.asarray(features, np.float32))
        return key

    def predict(self, images: Sequence[Any], metadata: Sequence[dict | None] | None = None) -> ClassifierOutput:
        rows = [self._get(im) for im in images]
        return ClassifierOutput(probs=np.stack([p for p, _ in rows]), features=np.stack([f for _, f in rows]), labels=self.labels)

    def _get(self, image: Any) -> tuple[np.ndarray, np.ndarray]:
        key = _key(image)
        if key not in self._rows:
            raise KeyError(f"image {key[:12]}… is not in the replay table of {self.model_id!r} ({len(self._rows)} images)")
        return self._rows[key]

    def save(self, path: str | Path) -> Path:
        keys = sorted(self._rows)
        np.savez_compressed(path, sha256=np.array(keys), probs=np.stack([self._rows[k][0] for k in keys]),
                            features=np.stack([self._rows[k][1] for k in keys]), labels=np.array(self.labels), model_id=np.array(self.model_id))  # fmt: skip
        return Path(path)

    def load(self, path: str | Path) -> None:
        with np.load(path) as z:
            self.labels, self.model_id = tuple(str(x) for x in z["labels"]), str(z["model_id"])
            for k, p, f in zip(z["sha256"], z["probs"], z["features"]):
                self._rows[str(k)] = (p, f)


class ReplayExpert:
    """Recorded outputs of a multi-head expert (the second visual expert's interface: ``predict_heads`` and
    ``info['heads']``, see :class:`models.efficientnet.EfficientNetExpert`)."""

    def __init__(self, heads: dict[str, Sequence[str]], *, model_id: str = "replay-expert"):
        self.model_id = model_id
        self.info: dict[str, Any] = {"heads": {h: list(v) for h, v in heads.items()}}
        self._rows: dict[str, tuple[np.ndarray | None, dict[str, np.ndarray]] | None] = {}

    def add(self, image: Any, heads: dict[str, Sequence[float]] | None, features: Sequence[float] | None = None) -> str:
        """Record ``image``'s head outputs (head -> probabilities in ``info['heads'][head]`` order) and pooled
        features (None: not recorded); ``heads=None`` records that the expert has no opinion on it."""
        key = _key(image)
        if heads is None:
            self._rows[key] = None
            return key
        unknown = set(heads) - set(self.info["heads"])
        if unknown:
            raise ValueError(f"unknown head(s) {sorted(unknown)}; valid: {sorted(self.info['heads'])}")
        self._rows[key] = (None if features is None else np.asarray(features, np.float32), {h: np.asarray(v) for h, v in heads.items()})
        return key

    def predict_heads(self, images: Sequence[Any]) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        """(features or None, head -> (N, C) probabilities); both empty when the expert has no opinion on the
        images (one image at a time then, as the encode node asks)."""
        rows = []
        for im in images:
            key = _key(im)
            if key not in self._rows:
                raise KeyError(f"image {key[:12]}… is not in the replay table of {self.model_id!r} ({len(self._rows)} images)")
            rows.append(self._rows[key])
        if any(r is None for r in rows):
            if len(rows) > 1:
                raise ValueError("a batch mixing images with and without a recorded opinion")
            return None, {}
        feats = None if any(f is None for f, _ in rows) else np.stack([f for f, _ in rows])
        return feats, {h: np.stack([hs[h] for _, hs in rows]) for h in rows[0][1]}

