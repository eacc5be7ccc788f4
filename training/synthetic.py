"""Synthetic non-skin images for the modality head's reject class.

The shared data has no natural non-skin photographs, so the 'not_skin' class is taught with
procedurally generated images (documents, charts, flat colours, noise, geometric scenes) and backed
by a feature-distance OOD test. Kinds are used as groups so validation holds whole kinds out.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

KINDS = ("solid", "gradient", "noise", "stripes", "document", "shapes", "chart", "landscape")


def _rng_colour(rng) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def make(kind: str, seed: int, size: int = 256) -> Image.Image:
    """One deterministic synthetic image of ``kind``."""
    rng = np.random.default_rng(seed)
    if kind == "solid":
        return Image.new("RGB", (size, size), _rng_colour(rng))
    if kind == "gradient":
        a, b = np.array(_rng_colour(rng), float), np.array(_rng_colour(rng), float)
        t = np.linspace(0, 1, size)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, size)[:, None, None]
        arr = a * (1 - t) + b * t
        return Image.fromarray(np.broadcast_to(arr, (size, size, 3)).astype(np.uint8))
    if kind == "noise":
        arr = rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)
        return Image.fromarray(arr).resize((size, size), Image.NEAREST if rng.random() < 0.5 else Image.BILINEAR)
    img = Image.new("RGB", (size, size), _rng_colour(rng) if kind != "document" else (250, 250, 245))
    d = ImageDraw.Draw(img)
    if kind == "stripes":
        w = int(rng.integers(4, 40))
        c1, c2 = _rng_colour(rng), _rng_colour(rng)
        for x in range(0, size * 2, 2 * w):
            d.polygon([(x, 0), (x + w, 0), (x + w - size, size), (x - size, size)], fill=c1)
        img.paste(Image.new("RGB", (size, size), c2), mask=Image.fromarray((rng.random((size, size)) < 0.05).astype(np.uint8) * 255))
    elif kind == "document":
        y = int(rng.integers(8, 30))
        while y < size - 10:
            x = int(rng.integers(6, 20))
            d.text((x, y), " ".join("".join(chr(int(c)) for c in rng.integers(97, 123, int(rng.integers(2, 9)))) for _ in range(6)), fill=(20, 20, 20))
            y += int(rng.integers(12, 20))
    elif kind == "shapes":
        for _ in range(int(rng.integers(3, 12))):
            x0, y0 = rng.integers(0, size, 2)
            x1, y1 = x0 + rng.integers(10, 120), y0 + rng.integers(10, 120)
            (d.ellipse if rng.random() < 0.5 else d.rectangle)([int(x0), int(y0), int(x1), int(y1)], fill=_rng_colour(rng))
    elif kind == "chart":
        d.rectangle([20, 20, size - 20, size - 20], outline=(0, 0, 0))
        for _ in range(int(rng.integers(1, 4))):
            pts = [(int(x), int(size - 30 - v)) for x, v in zip(np.linspace(25, size - 25, 12), rng.integers(0, size - 60, 12))]
            d.line(pts, fill=_rng_colour(rng), width=2)
    elif kind == "landscape":
        h = int(rng.integers(size // 3, 2 * size // 3))
        d.rectangle([0, 0, size, h], fill=(int(rng.integers(90, 160)), int(rng.integers(150, 210)), int(rng.integers(200, 255))))
        d.rectangle([0, h, size, size], fill=(int(rng.integers(40, 120)), int(rng.integers(90, 160)), int(rng.integers(30, 90))))
        arr = np.asarray(img).astype(np.int16) + rng.integers(-25, 25, (size, size, 3))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 3))))
    return img


def generate(n_per_kind: int = 60, seed: int = 0) -> list[tuple[str, Image.Image]]:
    """``n_per_kind`` images of every kind, as (kind, image) pairs."""
    return [(k, make(k, seed * 100003 + i * len(KINDS) + j)) for j, k in enumerate(KINDS) for i in range(n_per_kind)]
