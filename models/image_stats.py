"""Image arrays as the networks read them, and cheap colour and texture statistics of an image (MM-Skin-style
hand-crafted features).

They complement lesion-classifier features for modality recognition: dermoscopy has dark circular
vignettes and even lighting, H&E histology is pink/purple with dense nuclei texture, clinical photos
show backgrounds, hair, clothing and uneven light.
"""

from __future__ import annotations

import numpy as np

STATS_SIZE = 128
_HUE_BINS = 12


def to_uint8_rgb(image) -> np.ndarray:
    """HxWx3 uint8 from a PIL image (any mode) or an array; anything else raises ValueError."""
    if hasattr(image, "convert"):
        image = image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got array of shape {arr.shape}")
    return np.array(arr, dtype=np.uint8, order="C")  # a writable copy: torch.from_numpy needs one


def image_stats(image) -> np.ndarray:
    """Return a fixed-length float32 vector of colour/texture statistics for an RGB PIL image."""
    img = image.convert("RGB").resize((STATS_SIZE, STATS_SIZE))
    rgb = np.asarray(img, dtype=np.float32) / 255.0
    hsv = np.asarray(img.convert("HSV"), dtype=np.float32) / 255.0
    gray = rgb.mean(axis=2)

    feats: list[float] = []
    for c in range(3):
        ch = rgb[..., c]
        feats += [ch.mean(), ch.std(), np.percentile(ch, 5), np.percentile(ch, 95)]
    sat, val = hsv[..., 1], hsv[..., 2]
    feats += [sat.mean(), sat.std(), val.mean(), val.std()]
    hue_hist = np.histogram(hsv[..., 0], bins=_HUE_BINS, range=(0, 1), weights=sat)[0]
    feats += list(hue_hist / max(hue_hist.sum(), 1e-6))

    # Corners vs centre: dermoscopy images often have dark vignetted corners.
    k = STATS_SIZE // 8
    corners = np.concatenate([gray[:k, :k].ravel(), gray[:k, -k:].ravel(), gray[-k:, :k].ravel(), gray[-k:, -k:].ravel()])
    centre = gray[3 * k : 5 * k, 3 * k : 5 * k]
    feats += [corners.mean(), (corners < 0.1).mean(), centre.mean(), centre.mean() - corners.mean()]

    # Texture: gradient energy at two scales, and the share of strong edges.
    gx, gy = np.diff(gray, axis=1), np.diff(gray, axis=0)
    mag = np.sqrt(gx[:-1, :] ** 2 + gy[:, :-1] ** 2)
    small = gray.reshape(STATS_SIZE // 4, 4, STATS_SIZE // 4, 4).mean(axis=(1, 3))
    sgx, sgy = np.diff(small, axis=1), np.diff(small, axis=0)
    feats += [mag.mean(), mag.std(), (mag > 0.1).mean(), np.abs(sgx).mean() + np.abs(sgy).mean()]
    # Pink/purple share (eosin/haematoxylin-like pixels).
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    feats += [((r > g + 0.08) & (b > g + 0.04)).mean(), ((b > r) & (b > g)).mean()]
    return np.asarray(feats, dtype=np.float32)


STATS_DIM = 3 * 4 + 4 + _HUE_BINS + 4 + 4 + 2
