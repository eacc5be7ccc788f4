"""Image views used to train the modality head (and to extract their features).

DermNet photos carry a watermark in the lower-left corner that a model can learn instead of the
content; ``masked`` paints it over. ``crop50`` (centre half of each side) imitates tight close-ups of
single lesions, which look like dermoscopy to features learned on HAM10000. ``centre70`` / ``centre50`` are
plain centre crops (no watermark to mask) of dermoscopy images, standing in for tightly framed dermoscopy
(a user's crop), which must still route as dermoscopy (``training.modality`` ``dermoscopy_views``). ``colour``
shifts white balance, gamma, saturation and brightness, standing in for another device or stain.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
from PIL import Image

# DermNet photos are 384x288 with the logo/text at x 31..165, y 193..265 (measured over all 1,680
# images); the box adds a margin.
WATERMARK_X_FRAC = 0.47
WATERMARK_Y_FRAC = 0.64


def mask_dermnet_watermark(img: Image.Image) -> Image.Image:
    """Paint DermNet's lower-left watermark region with the image's per-channel median colour."""
    a = np.array(img.convert("RGB"))
    h, w = a.shape[:2]
    a[round(h * WATERMARK_Y_FRAC) :, : round(w * WATERMARK_X_FRAC)] = np.median(a.reshape(-1, 3), axis=0)
    return Image.fromarray(a)


def center_crop(img: Image.Image, frac: float = 0.5) -> Image.Image:
    """Centre crop keeping ``frac`` of each side."""
    w, h = img.size
    cw, ch = max(1, round(w * frac)), max(1, round(h * frac))
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch))


def colour_shift(img: Image.Image) -> Image.Image:
    """A colour variant of the image, as another device, light or stain would give: per-channel gains (white balance),
    gamma, saturation and brightness drawn from a generator seeded by the image's own pixels (the same image always
    gives the same variant, so cached features stay valid)."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    rng = np.random.default_rng(int.from_bytes(hashlib.sha1(a.tobytes()).digest()[:8], "little"))
    a = np.clip(a * rng.uniform(0.8, 1.2, 3), 0, 1) ** rng.uniform(0.8, 1.25)
    grey = a.mean(axis=2, keepdims=True)
    a = np.clip((grey + (a - grey) * rng.uniform(0.7, 1.3)) * rng.uniform(0.85, 1.15), 0, 1)
    return Image.fromarray((a * 255).round().astype(np.uint8))


VIEWS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "full": lambda im: im,
    "masked": mask_dermnet_watermark,
    "crop50": lambda im: center_crop(mask_dermnet_watermark(im), 0.5),
    "centre70": lambda im: center_crop(im, 0.7),
    "centre50": lambda im: center_crop(im, 0.5),
    "colour": colour_shift,
}


def make_view(img: Image.Image, view: str) -> Image.Image:
    """Apply a named view; unknown names list the valid ones."""
    if view not in VIEWS:
        raise KeyError(f"unknown view {view!r}; valid: {sorted(VIEWS)}")
    return VIEWS[view](img)
