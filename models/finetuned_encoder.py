"""The lesion encoder with its last Xception stages fine-tuned (e.g. for the modality head).

A tuned encoder is stored as a *delta*: a safetensors file holding only the tensors of the stages
that were trained (``backbone.<stage>.*``), applied on top of the base sklesion weights. Tuning the
exit flow from ``block14`` is ~19 MB in float32 instead of an ~84 MB network copy, and the file
records which base it belongs to, so it is never applied to other weights by mistake.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

DELTA_FORMAT = "xception-delta"


def trainable_prefixes(backbone, start: str) -> list[str]:
    """State-dict prefixes (relative to the backbone) of every stage from ``start`` to the end."""
    if start not in backbone.STAGES:
        raise ValueError(f"unknown stage {start!r}; valid: {list(backbone.STAGES)}")
    ids = {id(m) for n in backbone.STAGES[backbone.STAGES.index(start) :] for m in backbone.stage_modules(n)}
    return sorted(name for name, m in backbone.named_modules() if id(m) in ids)


def delta_state_dict(backbone, start: str) -> dict[str, Any]:
    """The backbone tensors (parameters and BN buffers) of the stages from ``start`` on, keyed ``backbone.*``."""
    prefixes = tuple(p + "." for p in trainable_prefixes(backbone, start))
    return {f"backbone.{k}": v.detach().float().cpu().contiguous() for k, v in backbone.state_dict().items() if k.startswith(prefixes)}


def save_delta(backbone, start: str, path: Path, *, base_id: str, base_sha256: str | None, meta: dict | None = None) -> Path:
    """Write the tuned stages of ``backbone`` to ``path`` with the base they apply to."""
    from safetensors.torch import save_file

    info = {"format": DELTA_FORMAT, "base": base_id, "base_sha256": base_sha256 or "", "unfreeze_from": start, **(meta or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(delta_state_dict(backbone, start), str(path), metadata={"dermgraph": json.dumps(info)})
    return path


def delta_info(path: Path) -> dict:
    """The metadata of a delta file (no tensors read); a file that is not one raises ValueError."""
    from models.safetensors_meta import read_meta

    return read_meta(path, DELTA_FORMAT, "a dermgraph encoder delta")


def read_delta(path: Path) -> tuple[dict[str, Any], dict]:
    """(tensors, metadata) of a delta file; a file that is not one raises ValueError."""
    from safetensors.torch import load_file

    info = delta_info(path)
    return load_file(str(path)), info


def apply_delta(model, tensors: dict[str, Any]) -> None:
    """Load the delta's tensors into a ``SklesionNet``; every key must exist with the same shape."""
    own = model.state_dict()
    bad = [k for k, v in tensors.items() if k not in own or tuple(own[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError(f"encoder delta does not fit the base network ({len(bad)} tensors), e.g. {bad[0]!r}")
    model.load_state_dict(tensors, strict=False)


class FinetunedEncoder:
    """Pooled 2048-d features from the sklesion network with a fine-tuned delta applied.

    ``weights`` is the delta file; the base weights are resolved from the registry id stored in it
    (or ``base``, a local ``.keras`` path). The network loads on first use.
    """

    dim = 2048

    def __init__(self, weights: str | Path, base: str | Path | None = None, device: str = "cpu", batch_size: int = 16):
        self.weights = Path(weights)
        self.base = base
        self.device = device
        self.batch_size = int(batch_size)
        self._model = None
        self.info = delta_info(self.weights)
        self.model_id = str(self.info.get("id") or self.weights.stem)

    @property
    def model(self):
        """The tuned network (built on first access: base weights, then the delta)."""
        if self._model is None:
            import torch

            from models.sklesion import build_model

            base = self.base
            if base is None:
                from models.registry import get_spec
                from models.resolve import resolve

                base_id = self.info.get("base") or "sklesion-xception"
                recorded, current = self.info.get("base_sha256"), get_spec(base_id).sha256
                if recorded and current and recorded != current:
                    raise ValueError(f"{self.weights} was tuned from {base_id} with sha256 {recorded}, but the registry now points at {current}")
                base = resolve(base_id)
            model = build_model(base, "cpu")
            tensors, _ = read_delta(self.weights)
            apply_delta(model, tensors)
            self._model = model.eval().to(device=self.device, memory_format=torch.channels_last)
        return self._model

    def embed_images(self, images: Sequence[Any]) -> np.ndarray:
        """(N, 2048) float32 pooled features (not normalised: the same kind the lesion classifier gives)."""
        import torch

        from models.sklesion import preprocess

        out = np.zeros((len(images), self.dim), dtype=np.float32)
        if not len(images):
            return out
        model = self.model
        with torch.inference_mode():
            for lo in range(0, len(images), self.batch_size):
                x = preprocess(images[lo : lo + self.batch_size]).to(self.device).contiguous(memory_format=torch.channels_last)
                out[lo : lo + len(x)] = model.backbone(model.norm(x)).float().cpu().numpy()
        return out
