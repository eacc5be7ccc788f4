"""Whole-batch image augmentation on the training device (the GPU recipe of ``training.encoder``).

The per-image torchvision path (``training.encoder.augment``) runs in DataLoader workers on the CPU; on a GPU
those workers, not the network, set the pace (~900 images/s on 12 cores for EfficientNet-Lite0 on an H200).
Here the decoded images live on the device as uint8 tensors and one batch is augmented with a handful of
batched kernels: one ``grid_sample`` per source size does the random resized crop, the flips and the 90°
rotations together; brightness, contrast and saturation are per-image factors; the blur is one grouped
convolution with a per-image Gaussian kernel. The same distribution of views as ``augment`` (crop scales,
which views may rotate, jitter strengths, blur probability), drawn from a numpy generator seeded per step,
so a batch is the same on any device up to floating-point rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BRIGHTNESS = 0.25
CONTRAST = 0.25
SATURATION = 0.2
BLUR_P = 0.25
BLUR_SIGMA = (0.1, 1.5)
BLUR_KERNEL = 5
RATIO = (3 / 4, 4 / 3)
LESION_SCALE = (0.4, 1.0)
CLINICAL_SCALE = (0.35, 1.0)


@dataclass(frozen=True)
class ViewParams:
    """Per-image parameters of one batch (numpy, length B)."""

    theta: np.ndarray  # (B, 2, 3) output -> input affine of grid_sample (normalised coordinates)
    brightness: np.ndarray
    contrast: np.ndarray
    saturation: np.ndarray
    sigma: np.ndarray  # 0: no blur


def draw_params(kinds: list[str], closeups: list[bool], rng: np.random.Generator, closeup_scale: tuple[float, float]) -> ViewParams:
    """Random views for a batch: ``kinds`` ('clinical', 'dermoscopy', ...) and whether each is a close-up."""
    b = len(kinds)
    theta = np.zeros((b, 2, 3), dtype=np.float32)
    for i, (kind, closeup) in enumerate(zip(kinds, closeups)):
        lo, hi = closeup_scale if closeup else (CLINICAL_SCALE if kind == "clinical" else LESION_SCALE)
        area = rng.uniform(lo, hi)
        ratio = math.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
        w, h = min(1.0, math.sqrt(area * ratio)), min(1.0, math.sqrt(area / ratio))  # fractions of the side
        cx, cy = rng.uniform(-(1 - w), 1 - w), rng.uniform(-(1 - h), 1 - h)
        m = np.diag([w, h]).astype(np.float64)
        fx = -1.0 if rng.random() < 0.5 else 1.0
        fy, k = 1.0, 0
        if kind != "clinical" or closeup:  # lesion views have no up; whole clinical photos mostly do
            fy = -1.0 if rng.random() < 0.5 else 1.0
            k = int(rng.integers(0, 4))
        c, s = [1, 0, -1, 0][k], [0, 1, 0, -1][k]
        rot = np.array([[c, -s], [s, c]], dtype=np.float64)
        theta[i, :, :2] = m @ rot @ np.diag([fx, fy])
        theta[i, :, 2] = (cx, cy)
    blur = rng.random(b) < BLUR_P
    return ViewParams(
        theta=theta,
        brightness=rng.uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS, b).astype(np.float32),
        contrast=rng.uniform(1 - CONTRAST, 1 + CONTRAST, b).astype(np.float32),
        saturation=rng.uniform(1 - SATURATION, 1 + SATURATION, b).astype(np.float32),
        sigma=np.where(blur, rng.uniform(*BLUR_SIGMA, b), 0.0).astype(np.float32),
    )


def _gray(x):
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blur(x, sigma):
    """Per-image Gaussian blur (sigma 0 leaves an image unchanged) as one grouped convolution."""
    import torch
    import torch.nn.functional as F

    if not bool((sigma > 0).any()):
        return x
    b, ch, hh, ww = x.shape
    r = BLUR_KERNEL // 2
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    g = torch.exp(-(t[None] ** 2) / (2 * sigma.clamp_min(1e-6)[:, None] ** 2))
    g = torch.where(sigma[:, None] > 0, g, (t[None] == 0).to(x.dtype))
    g = g / g.sum(1, keepdim=True)
    k = (g[:, :, None] * g[:, None, :]).repeat_interleave(ch, 0)[:, None]  # (B*C, 1, K, K)
    y = F.conv2d(F.pad(x.reshape(1, b * ch, hh, ww), (r, r, r, r), mode="reflect"), k, groups=b * ch)
    return y.reshape(b, ch, hh, ww)


def apply(sources: list, index: list[tuple[int, int]], params: ViewParams, size: int):
    """The augmented batch, float in 0..1, (B, 3, size, size), on the sources' device.

    ``sources``: uint8 tensors (N, 3, H, W), one per image size; ``index[i] = (source, row)`` of image i."""
    import torch
    import torch.nn.functional as F

    dev = sources[0].device
    b = len(index)
    out = torch.empty((b, 3, size, size), device=dev, dtype=torch.float32)
    theta = torch.from_numpy(params.theta).to(dev)
    by_src: dict[int, list[int]] = {}
    for i, (s, _) in enumerate(index):
        by_src.setdefault(s, []).append(i)
    for s, pos in by_src.items():
        rows = torch.tensor([index[i][1] for i in pos], device=dev)
        pos_t = torch.tensor(pos, device=dev)
        img = sources[s].index_select(0, rows).float() / 255.0
        # Crops smaller than the output are upsampled; larger ones are first downsampled with antialiasing,
        # which grid_sample's bilinear filter lacks.
        side = img.shape[-1]
        grid = F.affine_grid(theta[pos_t], [len(pos), 3, size, size], align_corners=False)
        if side > 1.5 * size:
            img = F.interpolate(img, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[pos_t] = F.grid_sample(img, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    bright = torch.from_numpy(params.brightness).to(dev)[:, None, None, None]
    contr = torch.from_numpy(params.contrast).to(dev)[:, None, None, None]
    sat = torch.from_numpy(params.saturation).to(dev)[:, None, None, None]
    x = (out * bright).clamp(0, 1)
    mean = _gray(x).mean(dim=(2, 3), keepdim=True)
    x = ((x - mean) * contr + mean).clamp(0, 1)
    g = _gray(x)
    x = ((x - g) * sat + g).clamp(0, 1)
    return _blur(x, torch.from_numpy(params.sigma).to(dev)).clamp(0, 1)


class DeviceImages:
    """The training pools' decoded images as uint8 (N, 3, H, W) tensors on one device, one tensor per pool."""

    def __init__(self, images: dict[str, np.ndarray], device: str):
        import torch

        self.names = [n for n, a in images.items() if len(a)]
        self.pos = {n: i for i, n in enumerate(self.names)}
        self.tensors = [torch.from_numpy(np.require(images[n], requirements=["C", "W"])).permute(0, 3, 1, 2).contiguous().to(device) for n in self.names]

    def batch(self, items: list[tuple[str, int, bool]], kinds: list[str], seed: int, size: int, closeup_scale: tuple[float, float]):
        """Augmented (B, 3, size, size) floats in 0..1 for ``items`` = (pool, row, close-up)."""
        rng = np.random.default_rng(seed)
        params = draw_params(kinds, [c for _, _, c in items], rng, closeup_scale)
        return apply(self.tensors, [(self.pos[n], i) for n, i, _ in items], params, size)
