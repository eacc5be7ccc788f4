"""OpenCLIP image/text embeddings (any open_clip architecture, local or registry weights)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Checkpoint names open_clip itself prefers inside a weights folder, best first.
_PREFERRED = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
    "model.pt",
    "model.pth",
)
_CKPT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_REGISTERED_CONFIGS: set[str] = set()


def _pick_checkpoint(path: Path) -> Path:
    """A checkpoint file: ``path`` itself, or the one checkpoint inside a directory."""
    if path.is_file():
        return path
    for name in _PREFERRED:
        if (path / name).is_file():
            return path / name
    found = sorted(p for p in path.iterdir() if p.suffix in _CKPT_SUFFIXES and p.is_file())
    if len(found) != 1:
        raise FileNotFoundError(
            f"expected one open_clip checkpoint ({', '.join(_CKPT_SUFFIXES)}) in {path}, "
            f"found {[p.name for p in found]}"
        )
    return found[0]


def _to_pil(image: Any) -> Any:
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            return im.convert("RGB")
    raise TypeError(f"expected a PIL image, an HxWx3 uint8 array or an image path, got {type(image).__name__}")


class OpenCLIPEmbedder:
    """ImageEmbedder (plus ``embed_texts``) over an open_clip model; outputs are L2-normalised.

    ``pretrained`` is a local checkpoint file or folder, a registry id / source URI (resolved with
    :func:`models.resolve.resolve`), an open_clip pretrained tag (downloaded from the hub by
    open_clip, so it needs network access), or None for random weights. ``model_config`` is an
    architecture JSON (or a folder of them) registered with ``open_clip.add_model_config``; a
    file's stem is the architecture name, so it must equal ``model_name``.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        device: str = "cpu",
        model_config: str | Path | None = None,
        batch_size: int = 32,
    ) -> None:
        self.model_name = model_name
        self.pretrained = pretrained
        self.device = device
        self.model_config = Path(model_config).expanduser() if model_config is not None else None
        self.batch_size = batch_size
        self.model_id = f"{model_name}:{pretrained}" if pretrained else model_name
        self._dim: int | None = None
        self._model: Any = None
        self._preprocess: Any = None
        self._tokenizer: Any = None
        if self.model_config is not None and self.model_config.is_file():
            cfg = self._read_config_file(self.model_config)
            if self.model_config.stem != model_name:
                raise ValueError(
                    f"model_config {self.model_config} defines architecture {self.model_config.stem!r}, "
                    f"but model_name is {model_name!r}; open_clip names architectures after the file stem"
                )
            self._dim = int(cfg["embed_dim"])

    @staticmethod
    def _read_config_file(path: Path) -> dict:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(cfg)
        if missing:
            raise ValueError(f"{path} is not an open_clip model config: missing {sorted(missing)}")
        return cfg

    def _register_config(self) -> None:
        if self.model_config is None:
            return
        if not self.model_config.exists():
            raise FileNotFoundError(f"open_clip model_config not found: {self.model_config}")
        key = str(self.model_config.resolve())
        if key not in _REGISTERED_CONFIGS:
            import open_clip

            open_clip.add_model_config(self.model_config)
            _REGISTERED_CONFIGS.add(key)

    @property
    def dim(self) -> int:
        """Joint embedding size (from the architecture config; loads no weights)."""
        if self._dim is None:
            self._register_config()
            import open_clip

            cfg = open_clip.get_model_config(self.model_name)
            if cfg is None:
                raise ValueError(f"unknown open_clip architecture {self.model_name!r}; see open_clip.list_models()")
            self._dim = int(cfg["embed_dim"])
        return self._dim

    def _checkpoint(self) -> str | None:
        """A local checkpoint path, or None (random init or an open_clip tag, see ``_load``)."""
        ref = self.pretrained
        if ref is None:
            return None
        path = Path(ref).expanduser()
        if path.exists():
            return str(_pick_checkpoint(path))
        from models.registry import SCHEMES, load_registry

        if ref.partition(":")[0] in SCHEMES or ref in load_registry():
            from models.resolve import resolve

            return str(_pick_checkpoint(resolve(ref)))
        return None

    @property
    def model(self) -> Any:
        """The underlying open_clip model (loaded on first access)."""
        self._load()
        return self._model

    def _load(self) -> None:
        if self._model is not None:
            return
        self._register_config()
        import open_clip

        checkpoint = self._checkpoint()
        tag = self.pretrained if self.pretrained is not None and checkpoint is None else None
        if tag is not None and tag not in open_clip.list_pretrained_tags_by_model(self.model_name):
            raise ValueError(
                f"pretrained={tag!r} is not a file, a registry id, a source URI or an open_clip tag for "
                f"{self.model_name!r} (tags: {open_clip.list_pretrained_tags_by_model(self.model_name)})"
            )
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                self.model_name, pretrained=checkpoint or tag, device=self.device
            )
        except RuntimeError as exc:
            if tag is None:
                raise
            from models.resolve import ResolveError

            raise ResolveError(
                f"open_clip could not fetch {self.model_name} weights {tag!r} ({exc}). On a machine with "
                f"Hugging Face access download them (open_clip.create_model('{self.model_name}', "
                f"pretrained='{tag}') caches them under ~/.cache/huggingface), copy the checkpoint here and "
                f"pass pretrained='/path/to/checkpoint' or register it as a 'path:' entry in $DERMGRAPH_MODELS."
            ) from exc
        self._model = model.eval()
        self._preprocess = preprocess
        self._tokenizer = open_clip.get_tokenizer(self.model_name)

    def embed_images(self, images: Sequence[Any]) -> np.ndarray:
        """(N, dim) float32, L2-normalised image embeddings of RGB PIL images (any size)."""
        self._load()
        import torch

        images = list(images)
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = [self._preprocess(_to_pil(im)) for im in images[start : start + self.batch_size]]
                x = torch.stack(batch).to(self.device)
                feats = self._model.encode_image(x, normalize=True)
                out[start : start + len(batch)] = feats.float().cpu().numpy()
        return out

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(N, dim) float32, L2-normalised text embeddings in the same space as the images."""
        if isinstance(texts, str):
            raise TypeError("embed_texts() takes a sequence of strings; wrap a single text in a list")
        self._load()
        import torch

        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                tokens = self._tokenizer(texts[start : start + self.batch_size]).to(self.device)
                feats = self._model.encode_text(tokens, normalize=True)
                out[start : start + tokens.shape[0]] = feats.float().cpu().numpy()
        return out
