"""Test-time views of an image for the confidence-consistency signal (CCT): the lesion classifier on flips and a
rotation of the image. A diagnosis the classifier keeps under these views is more likely right."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from models.stacker import top_candidate

TTA_VIEWS = ("hflip", "vflip", "rot90")
"""The views, in order: mirror left-right, flip top-bottom, rotate 90 degrees (dermoscopy has no up)."""


def tta_view(image: Any, name: str) -> Any:
    """One named view of a PIL image."""
    from PIL import Image, ImageOps

    if name == "hflip":
        return ImageOps.mirror(image)
    if name == "vflip":
        return ImageOps.flip(image)
    if name == "rot90":
        return image.transpose(Image.Transpose.ROTATE_90)
    raise ValueError(f"unknown test-time view {name!r}; valid: {', '.join(TTA_VIEWS)}")


def tensor_view(x: Any, name: str) -> Any:
    """The same view of a batch of square image tensors (N, C, H, W), made after resizing (flips and a quarter turn
    commute with resizing a square output)."""
    import torch

    if name == "hflip":
        return torch.flip(x, dims=(3,))
    if name == "vflip":
        return torch.flip(x, dims=(2,))
    if name == "rot90":
        return torch.rot90(x, 1, dims=(2, 3))  # counter-clockwise, as PIL's ROTATE_90
    raise ValueError(f"unknown test-time view {name!r}; valid: {', '.join(TTA_VIEWS)}")


def tta_agreement(view_probs: Sequence[Mapping[str, float]] | None, label: str, candidates: Sequence[str] | None = None) -> float:
    """Share of the views whose most probable class (among ``candidates``, default all) is ``label``; 0.5 without views."""
    if not view_probs:
        return 0.5
    return sum(top_candidate(p, candidates) == label for p in view_probs) / len(view_probs)
