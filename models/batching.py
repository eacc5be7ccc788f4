"""How many images one forward pass of an image network takes when the caller does not say.

On a CPU a large batch costs more per image than a few small ones (the activations leave the caches): measured
on 2 cores with DermNet photos, per image, the Xception 91 / 81 / 91 / 103 ms at 1 / 4 / 8 / 16 images a pass, the
fine-tuned EfficientNet-Lite0 with its three test-time views 64 / 43 / 62 / 101 ms. On a GPU larger batches pay.
"""

from __future__ import annotations

CPU_FORWARD_BATCH = 4


def forward_batch_size(device: str, requested: int | None, gpu_default: int) -> int:
    """``requested`` if given, else :data:`CPU_FORWARD_BATCH` on a CPU and ``gpu_default`` on an accelerator."""
    if requested is not None:
        if int(requested) < 1:
            raise ValueError(f"batch_size must be >= 1, got {requested}")
        return int(requested)
    return gpu_default if not str(device).startswith("cpu") else CPU_FORWARD_BATCH
