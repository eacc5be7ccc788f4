"""Cross-fitted outputs of the EfficientNet-Lite0 expert's recipe for its own training images.

``folds`` models are trained by :func:`training.encoder.train` from the ImageNet weights, each without one
fold of HAM10000 ``train``, Derm7pt ``train``/``extra`` and the DermNet training photos (a lesion's images
share a fold), and each predicts the fold it left out (:func:`training.encoder.crossfit`). The bundle
(``<out_dir>/crossfit.npz``) is what the registry entry ``efficientnet-lite0-derm-crossfit`` holds, and what
``training.fusion_data --expert-crossfit`` and ``training.reasoner_data`` (``expert_crossfit``) read.

    dermgraph train encoder-crossfit --config configs/train/encoder_gpu.yaml --set folds=3 --set device=cuda
    dermgraph train encoder-crossfit --config configs/train/encoder_smoke.yaml --set folds=2     # a tiny CPU run
    ... --set 'member={epochs: 2, image_size: 224, train_from: stem, ema_decay: 0.998}'   # each fold also continued, as the ensemble member

The GPU job runs the same function on its packed images (``python -m training.gpu_job --stages effnet --set
effnet_folds=3``; ``docs/gpu_run.md``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from training import encoder
from training.cli import module_main


class Config(encoder.Config):
    """The encoder's recipe (``training.encoder.Config``; ``init`` is ignored: every fold starts from ImageNet),
    plus the number of folds. ``max_minutes`` bounds each fold."""

    folds: int = Field(3, ge=2, description="Cross-fitting folds: one model per fold, trained on the others.")
    member: dict[str, Any] | None = Field(None, description="Continue each fold model by these encoder fields over this recipe (init: the fold model), "
                                          "as the agent's ensemble member was continued from the shipped expert, e.g. the fields of "
                                          "configs/train/encoder_cpu_continue.yaml; its outputs go beside the fold model's (training.encoder.crossfit).")


def train(cfg: Config) -> dict:
    sets, classes = encoder.build_tables(cfg)
    images = encoder.decoded_images(cfg, sets)
    t0 = time.time()
    runs = encoder.crossfit(cfg, sets, classes, images, cfg.folds, member=cfg.member)
    meta = {"fold_models": {k: encoder.fold_summary(r) for k, r in runs.items()}, "config": cfg.model_dump(mode="json")}
    bundle = encoder.bundle_crossfit(Path(cfg.out_dir) / "crossfit", Path(cfg.out_dir) / "crossfit.npz", meta)
    (Path(cfg.out_dir) / "crossfit.json").write_text(json.dumps(meta, indent=1, default=str))
    return {"bundle": str(bundle), "size_mb": round(bundle.stat().st_size / 1e6, 2), "folds": cfg.folds, "train_wall_s": round(time.time() - t0, 1),
            "held_out": {k: r.get("held_out") for k, r in runs.items()}, "best": {k: (r.get("best") or {}).get("score") for k, r in runs.items()}}  # fmt: skip


if __name__ == "__main__":  # pragma: no cover
    module_main("encoder-crossfit")
