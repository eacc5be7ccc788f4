"""Numeric precision of an image network's forward pass: float32 (the default) or bfloat16 autocast.

bfloat16 roughly halves the forward time of the Xception and of EfficientNet-Lite0 on a CPU with AVX512-BF16 (and
on GPUs) but moves probabilities by up to ~0.05, so decisions can differ from the float32 ones the fusion was fitted
on (README, "Performance notes": measured on the validation sets). Outputs are returned as float32 either way.
"""

from __future__ import annotations

from typing import Any

PRECISIONS = ("float32", "bfloat16")


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else ValueError listing them."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return precision


def autocast(device: str, precision: str) -> Any:
    """A context manager running the forward pass at ``precision`` on ``device`` (a no-op for float32)."""
    import torch

    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bfloat16")
