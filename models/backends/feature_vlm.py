"""The project's feature VLM describer as a ``vlm`` backend (``morphology.vlm.backend: feature-vlm``).

Unlike image-text VLMs it does not look at pixels: it reads the lesion classifier's pooled features and
probabilities, which the morphology node passes because the backend declares ``needs_features``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np


class FeatureVLMDescriber:
    """Implements :class:`models.protocols.VLM` plus ``features=``/``probs=`` (see :mod:`models.backends.feature_vlm_net`).

    ``prompt``: 'trained' answers the description prompt the model was trained with (the agent's
    free-text prompt is out of its training distribution); 'given' uses the caller's prompt.
    """

    needs_features = True
    modalities = ("dermoscopy",)
    """Trained on dermoscopy only: the morphology node skips other modalities instead of inventing findings."""

    def __init__(self, model: str = "feature-vlm-describer", device: str = "cpu", dtype: str = "float32",
                 max_batch_size: int = 16, prompt: Literal["trained", "given"] = "trained") -> None:  # fmt: skip
        self.model_ref = model
        self.device = device
        self.dtype = dtype
        self.max_batch_size = max(1, max_batch_size)
        self.prompt = prompt
        self.model_id = Path(model).name if Path(model).expanduser().exists() else model
        self._vlm: Any = None

    def _load(self) -> Any:
        if self._vlm is None:
            from models.backends.feature_vlm_net import FeatureVLM

            path = Path(self.model_ref).expanduser()
            if not path.exists():
                from models.resolve import resolve

                path = resolve(self.model_ref)
            self._vlm = FeatureVLM.load(path, device=self.device, dtype=self.dtype)
        return self._vlm

    def prompt_used(self, prompt: str) -> str:
        """The prompt the model actually answers for a caller's ``prompt`` (for the trace)."""
        if self.prompt == "given":
            return prompt
        return self._load().cfg.describe_prompt

    def generate(
        self,
        images: Sequence[Any],
        prompts: Sequence[str],
        *,
        features: np.ndarray | None = None,
        probs: np.ndarray | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
    ) -> list[str]:
        """One description per row of ``features`` (the images themselves are not used)."""
        if features is None:
            raise ValueError("the feature VLM describer needs the encoder's features (features=...)")
        if temperature > 0:
            raise ValueError("the feature VLM describer decodes greedily (temperature=0)")
        feats = np.asarray(features, dtype=np.float32).reshape(len(prompts), -1)
        vlm = self._load()
        use = None if self.prompt == "trained" else list(prompts)
        return vlm.generate(feats, use, probs=probs, max_new_tokens=max_new_tokens, batch_size=self.max_batch_size)
