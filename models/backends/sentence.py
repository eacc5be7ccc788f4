"""Sentence embeddings with plain transformers (no sentence-transformers dependency).

Reproduces a sentence-transformers pipeline of Transformer -> Pooling -> Normalize, reading the
pooling mode from the model directory's ``modules.json`` / ``1_Pooling/config.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _pooling_mode(model_dir: Path) -> str:
    """'mean' (default), 'cls' or 'max', from the sentence-transformers Pooling module config."""
    pooling_dir = model_dir / "1_Pooling"
    modules = model_dir / "modules.json"
    if modules.is_file():
        for module in json.loads(modules.read_text(encoding="utf-8")):
            if module.get("type", "").endswith("Pooling"):
                pooling_dir = model_dir / module.get("path", "1_Pooling")
    cfg_file = pooling_dir / "config.json"
    if not cfg_file.is_file():
        return "mean"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_max_tokens"):
        return "max"
    # mean and mean_sqrt_len differ only in scale, which the L2 normalisation removes.
    if cfg.get("pooling_mode_mean_tokens", True) or cfg.get("pooling_mode_mean_sqrt_len_tokens"):
        return "mean"
    raise NotImplementedError(f"unsupported pooling config in {cfg_file}: {cfg}")


class SentenceEmbedder:
    """TextEmbedder over a transformers encoder: pooled token states, L2-normalised.

    ``model`` is a registry id (e.g. ``"all-minilm-l6-v2"``), a source URI or a local model
    directory. Weights are resolved and loaded on first use.
    """

    def __init__(
        self,
        model: str = "all-minilm-l6-v2",
        device: str = "cpu",
        batch_size: int = 64,
        max_length: int = 256,
    ) -> None:
        self.model_id = model
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length
        self._dir: Path | None = None
        self._dim: int | None = None
        self._tokenizer: Any = None
        self._model: Any = None
        self._pooling = "mean"

    def _model_dir(self) -> Path:
        if self._dir is None:
            from models.resolve import resolve

            self._dir = resolve(self.model_id)
        return self._dir

    @property
    def dim(self) -> int:
        """Embedding size, read from the model's config.json (resolves the files, loads no weights)."""
        if self._dim is None:
            cfg = json.loads((self._model_dir() / "config.json").read_text(encoding="utf-8"))
            self._dim = int(cfg["hidden_size"])
        return self._dim

    def _load(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import AutoModel, AutoTokenizer

        model_dir = self._model_dir()
        self._pooling = _pooling_mode(model_dir)
        self._tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32)
        self._model = model.to(self.device).eval()
        self._dim = int(model.config.hidden_size)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(N, dim) float32, L2-normalised; identical texts give identical rows regardless of batching."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of strings; wrap a single text in a list")
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        self._load()
        import torch

        # Batch texts of similar length together to waste less compute on padding.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                enc = self._tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self._model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                if self._pooling == "cls":
                    pooled = hidden[:, 0]
                elif self._pooling == "max":
                    pooled = hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values
                else:
                    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
                out[idx] = pooled.cpu().numpy()
        return out
