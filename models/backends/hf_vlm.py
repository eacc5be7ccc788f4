"""Image-text-to-text models (LLaVA, Idefics3/SmolVLM, Qwen2-VL, ...) run locally with ``transformers``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from models.backends.hf_llm import dtype_kwargs, hub_snapshot, is_registry_ref, model_id_for, seeded


def locate_vlm(model: str) -> str:
    """A local directory for ``model``: an existing path, a registry id/URI, or a hub id via the resolver."""
    path = Path(model).expanduser()
    if path.exists():
        return str(path)
    if is_registry_ref(model):
        from models.resolve import resolve

        return str(resolve(model))
    # The resolver's hf: error explains how to fetch it elsewhere and pass a local path.
    return str(hub_snapshot(model))


def _to_rgb(image: Any) -> Any:
    import numpy as np
    from PIL import Image

    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            return im.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(image).convert("RGB")
    return image.convert("RGB")


class TransformersVLM:
    """A VLM run with ``AutoProcessor`` + ``AutoModelForImageTextToText`` (implements :class:`models.protocols.VLM`)."""

    def __init__(self, model: str, device: str = "cpu", dtype: str = "float32", max_batch_size: int = 4) -> None:
        self.model_ref = model
        self.device = device
        self.dtype = dtype
        self.max_batch_size = max(1, max_batch_size)
        self.model_id = model_id_for(model)
        self._model: Any = None
        self._processor: Any = None

    def _load(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModelForImageTextToText, AutoProcessor

        where = locate_vlm(self.model_ref)
        processor = AutoProcessor.from_pretrained(where)
        tok = getattr(processor, "tokenizer", None)
        if tok is not None:
            # Decoder-only generation needs the prompts flush against the new tokens.
            tok.padding_side = "left"
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
        model = AutoModelForImageTextToText.from_pretrained(where, **dtype_kwargs(self.dtype))
        self._processor = processor
        self._model = model.to(self.device).eval()

    @property
    def processor(self) -> Any:
        """The processor (loads the model on first access)."""
        self._load()
        return self._processor

    @property
    def model(self) -> Any:
        """The underlying model (loaded on first access)."""
        self._load()
        return self._model

    def _prompt(self, prompt: str) -> str:
        proc = self._processor
        if getattr(proc, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            return proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # No template: the processor still needs its image placeholder to know where the image goes.
        token = getattr(proc, "image_token", None) or "<image>"
        return f"{token}\n{prompt}"

    def generate(
        self,
        images: Sequence[Any],
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> list[str]:
        """One answer per (image, prompt) pair; greedy when ``temperature == 0``."""
        import torch

        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        self._load()
        proc, model = self._processor, self._model
        tok = getattr(proc, "tokenizer", proc)
        gen_kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id}
        if temperature > 0:
            gen_kwargs.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        else:
            gen_kwargs.update(do_sample=False)
        out: list[str] = []
        with torch.inference_mode(), seeded(seed if temperature > 0 else None, self.device):
            for c0 in range(0, len(prompts), self.max_batch_size):
                texts = [self._prompt(p) for p in prompts[c0 : c0 + self.max_batch_size]]
                # One image per sample, as a nested list: the layout every processor accepts.
                imgs = [[_to_rgb(im)] for im in images[c0 : c0 + self.max_batch_size]]
                enc = proc(text=texts, images=imgs, padding=True, return_tensors="pt")
                enc = enc.to(model.device)
                if "pixel_values" in enc and enc["pixel_values"].is_floating_point():
                    enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
                generated = model.generate(**enc, **gen_kwargs)
                new = generated[:, enc["input_ids"].shape[1] :]
                out.extend(t.strip() for t in tok.batch_decode(new, skip_special_tokens=True))
        return out
