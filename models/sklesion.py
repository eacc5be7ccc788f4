"""The ``sklesion==0.2.2`` skin-lesion classifier (Keras 3 Xception + metadata head), ported to PyTorch.

Weights are read straight from the published ``model.keras`` zip (``config.json`` + ``model.weights.h5``)
with h5py: no TensorFlow or Keras at run time. Parity with Keras is checked by
``scripts/keras_parity.py`` and ``tests/test_sklesion.py``.

Preprocessing follows the original package: decoded uint8 RGB, ``tf.image.resize`` to 254x254
(bilinear, half-pixel centres, no antialias), float 0..255 into the model (which normalises itself).
Metadata is sex one-hot(3) + location one-hot(5) + [age / 90] + [age missing], missing age filled
with the training mean.
"""

from __future__ import annotations

import io
import json
import math
import re
import threading
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.image_stats import to_uint8_rgb
from models.protocols import ClassifierOutput

MODEL_ID = "sklesion-xception"
LABELS: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
IMAGE_SIZE = (254, 254)
FEATURE_DIM = 2048
META_DIM = 10

# From sklesion's model_props.pkl.
AGE_MEAN = 51.90180032733224
AGE_MAX = 90.0
SEXES = ("female", "male", "unknown")
LOCATIONS = ("arm", "head-or-neck", "leg-or-genital", "trunk", "unknown")

_SEX_ALIASES = {"female": "female", "f": "female", "woman": "female", "male": "male", "m": "male", "man": "male"}
# HAM10000 / ISIC site names onto sklesion's five coarse locations; anything unlisted (acral,
# palms/soles, oral/genital, ...) is "unknown", as it was for the original training data.
# fmt: off
_LOCATION_ALIASES = {
    "arm": ("arm", "upper extremity", "upper limb", "upper arm", "forearm", "hand", "finger", "wrist", "elbow"),
    "head-or-neck": (
        "head-or-neck", "head or neck", "head/neck", "head", "neck", "face", "scalp", "ear",
        "nose", "lip", "cheek", "forehead", "eyelid",
    ),
    "leg-or-genital": (
        "leg-or-genital", "leg or genital", "leg", "lower extremity", "lower limb", "foot", "genital",
        "genitals", "genitalia", "thigh", "knee", "shin", "ankle", "toe", "groin",
    ),
    "trunk": (
        "trunk", "torso", "back", "upper back", "lower back", "chest", "abdomen",
        "anterior torso", "posterior torso", "lateral torso",
    ),
}
# Recognised sites that sklesion's training data had no coarse location for: read as "unknown" by design.
_UNMAPPED_SITES = ("unknown", "acral", "palms/soles", "palm", "sole", "oral/genital", "oral", "mucosa", "nail")
# fmt: on
_LOCATION_MAP = {alias: loc for loc, aliases in _LOCATION_ALIASES.items() for alias in aliases}
SITE_VOCABULARY: tuple[str, ...] = tuple(sorted({*_LOCATION_MAP, *_UNMAPPED_SITES}))
"""Every site :func:`map_location` recognises (case, '_', '-' and spacing aside); any other text is read as unknown."""
_SITE_KEYS = ("site", "localization", "location", "anatom_site_general", "anatom_site")


def _norm_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return re.sub(r"\s+", " ", str(value).replace("_", " ")).strip().lower()


def _norm_site(value: Any) -> str:
    # Hyphens as spaces too ("upper-back"); the hyphenated location names are aliases with spaces as well.
    text = _norm_text(value)
    return text if text in _LOCATION_MAP else text.replace("-", " ")


def map_sex(value: Any) -> str:
    """Map a free-form sex value to one of ``SEXES``."""
    return _SEX_ALIASES.get(_norm_text(value), "unknown")


def map_location(value: Any) -> str:
    """Map a free-form body site (HAM10000/ISIC vocabulary and plain words, :data:`SITE_VOCABULARY`) to one of
    ``LOCATIONS``; anything else is "unknown" (:func:`site_known` tells the two apart)."""
    return _LOCATION_MAP.get(_norm_site(value), "unknown")


def site_known(value: Any) -> bool:
    """Whether ``value`` is a site of :data:`SITE_VOCABULARY` (then :func:`map_location` uses it as given)."""
    site = _norm_site(value)
    return site in _LOCATION_MAP or site in _UNMAPPED_SITES


def suggest_site(value: Any) -> str | None:
    """The vocabulary's site closest to a misspelt ``value`` ('bakc' → 'back'), or None."""
    import difflib

    close = difflib.get_close_matches(_norm_site(value), SITE_VOCABULARY, n=1, cutoff=0.6)
    return close[0] if close else None


def _parse_age(value: Any) -> float | None:
    try:
        age = float(value)
    except (TypeError, ValueError):
        return None
    return age if math.isfinite(age) and age >= 0 else None


def metadata_vector(meta: dict | None) -> np.ndarray:
    """The model's 10-dim metadata input for a dict with optional ``age``, ``sex`` and
    ``site``/``localization``/``location``; ``None`` or missing keys mean unknown."""
    meta = meta or {}
    site = next((meta[k] for k in _SITE_KEYS if _norm_text(meta.get(k))), None)
    age = _parse_age(meta.get("age"))
    vec = np.zeros(META_DIM, dtype=np.float32)
    vec[SEXES.index(map_sex(meta.get("sex", meta.get("gender"))))] = 1.0
    vec[3 + LOCATIONS.index(map_location(site))] = 1.0
    vec[8] = (AGE_MEAN if age is None else age) / AGE_MAX
    vec[9] = float(age is None)
    return vec


def preprocess(images: Sequence[Any], size: tuple[int, int] = IMAGE_SIZE):
    """(N, 3, H, W) float32 tensor in 0..255, resized like TF2 ``tf.image.resize`` (bilinear,
    half-pixel centres, no antialias), which ``F.interpolate(align_corners=False)`` reproduces."""
    import torch
    import torch.nn.functional as F

    out = []
    for image in images:
        x = torch.from_numpy(to_uint8_rgb(image)).permute(2, 0, 1).unsqueeze(0).float()
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
        out.append(x)
    if not out:
        return torch.zeros((0, 3, *size), dtype=torch.float32)
    return torch.cat(out, dim=0)


# --------------------------------------------------------------------------- Keras weight loading


def _snake(name: str) -> str:
    """keras.src.utils.naming.to_snake_case: the h5 group name stem Keras derives from a class name."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _inbound(layer: dict) -> list[str]:
    """Names of the layers feeding ``layer`` (in argument order)."""
    names: list[str] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, dict):
            if obj.get("class_name") == "__keras_tensor__":
                names.append(obj["config"]["keras_history"][0])
            else:
                for v in obj.values():
                    walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    for node in layer.get("inbound_nodes", []):
        walk(node.get("args", []))
    return names


class _Graph:
    """One Keras functional model's layers: config, h5 group and producer/consumer links."""

    def __init__(self, layers: list[dict], h5_prefix: str):
        self.layers: dict[str, dict] = {}
        self.h5: dict[str, str] = {}
        self.inputs: dict[str, list[str]] = {}
        self.consumers: dict[str, list[str]] = {}
        counts: dict[str, int] = {}
        # Keras 3 stores weights by class-derived names numbered in model.layers (= config) order,
        # not by layer name, so recompute that numbering to find each layer's group.
        for layer in layers:
            name = layer["config"]["name"]
            stem = _snake(layer["class_name"])
            k = counts.get(stem, 0)
            counts[stem] = k + 1
            self.layers[name] = layer
            self.h5[name] = f"{h5_prefix}/{stem}" + (f"_{k}" if k else "")
            self.inputs[name] = _inbound(layer)
            for src in self.inputs[name]:
                self.consumers.setdefault(src, []).append(name)

    def of_class(self, cls: str) -> list[str]:
        return [n for n, layer in self.layers.items() if layer["class_name"] == cls]

    def chain(self, start: str, stop_at: str = "Concatenate") -> list[str]:
        """Weighted layers (Dense/BatchNormalization) along the single-consumer path after ``start``."""
        out, node = [], start
        while len(self.consumers.get(node, [])) == 1:
            node = self.consumers[node][0]
            cls = self.layers[node]["class_name"]
            if cls == stop_at:
                break
            if cls in ("Dense", "BatchNormalization"):
                out.append(node)
        return out


_BLOCK_RE = re.compile(r"^block(\d+)_((?:conv|sepconv)\d)(_bn)?$")


def _backbone_path(name: str) -> str | None:
    m = _BLOCK_RE.match(name)
    if not m:
        return None
    block, unit, bn = int(m.group(1)), m.group(2), m.group(3) or ""
    if block in (1, 14):
        return f"backbone.block{block}_{unit}{bn}"
    if 5 <= block <= 12:
        return f"backbone.middle.{block - 5}.{unit}{bn}"
    return f"backbone.block{block}.{unit}{bn}"


def _layer_map(config: dict) -> dict[str, tuple[str, dict, str]]:
    """Map torch module path -> (Keras class, Keras layer config, h5 group) for every weighted layer."""
    top = _Graph(config["config"]["layers"], "layers")
    (func_name,) = top.of_class("Functional")
    backbone = _Graph(top.layers[func_name]["config"]["layers"], f"{top.h5[func_name]}/layers")
    mapping: dict[str, tuple[str, dict, str]] = {}

    def put(path: str, graph: _Graph, name: str) -> None:
        layer = graph.layers[name]
        mapping[path] = (layer["class_name"], layer["config"], graph.h5[name])

    (norm_name,) = top.of_class("Normalization")
    put("norm", top, norm_name)

    for name, layer in backbone.layers.items():
        if layer["class_name"] not in ("Conv2D", "SeparableConv2D", "BatchNormalization"):
            continue
        path = _backbone_path(name)
        if path is None:
            # the auto-named shortcut Conv2D/BN; place it by the Add it feeds, whose other input is blockN_pool
            conv = name if layer["class_name"] == "Conv2D" else backbone.inputs[name][0]
            (bn,) = backbone.consumers[conv]
            (add,) = backbone.consumers[bn]
            (pool,) = [n for n in backbone.inputs[add] if n != bn]
            block = re.match(r"^block(\d+)_pool$", pool).group(1)
            path = f"backbone.block{block}.shortcut" + ("" if layer["class_name"] == "Conv2D" else "_bn")
        put(path, backbone, name)

    inputs = [top.layers[n] for n in top.of_class("InputLayer")]
    (meta_input,) = [l["config"]["name"] for l in inputs if len(l["config"]["batch_shape"]) == 2]
    img_chain, meta_chain = top.chain(func_name), top.chain(meta_input)
    (concat,) = top.of_class("Concatenate")
    if top.inputs[concat] != [img_chain[-1], meta_chain[-1]]:
        raise ValueError(f"unexpected head layout: concat of {top.inputs[concat]}")
    fuse_chain = top.chain(concat, stop_at="")
    if len(img_chain) != 2 or len(meta_chain) != 4 or len(fuse_chain) != 3:
        raise ValueError("unexpected head layout in config.json")
    heads = {
        "head.img_dense": img_chain[0], "head.img_bn": img_chain[1],
        "head.meta_dense1": meta_chain[0], "head.meta_bn1": meta_chain[1],
        "head.meta_dense2": meta_chain[2], "head.meta_bn2": meta_chain[3],
        "head.fuse_dense": fuse_chain[0], "head.fuse_bn": fuse_chain[1], "head.out": fuse_chain[2],
    }  # fmt: skip
    for path, name in heads.items():
        put(path, top, name)
    for path, (cls, cfg, _) in mapping.items():
        if cls == "Dense" and cfg["activation"] != ("softmax" if path == "head.out" else "relu"):
            raise ValueError(f"unexpected activation {cfg['activation']!r} on {cfg['name']}")
    return mapping


def _open_keras(keras_path: str | Path) -> tuple[dict, Any]:
    """(config dict, open h5py.File) from a ``.keras`` zip or a folder holding its two members."""
    import h5py

    path = Path(keras_path)
    if path.is_dir():
        config = json.loads((path / "config.json").read_text())
        return config, h5py.File(path / "model.weights.h5", "r")
    with zipfile.ZipFile(path) as zf:
        config = json.loads(zf.read("config.json"))
        blob = zf.read("model.weights.h5")
    return config, h5py.File(io.BytesIO(blob), "r")


def convert_keras_vars(cls: str, arrays: Sequence[np.ndarray]) -> dict[str, Any]:
    """Torch tensors, keyed by parameter suffix, for one Keras layer's stored variables (in h5 order)."""
    import torch

    t = [torch.from_numpy(np.array(a, dtype=np.float32)) for a in arrays]
    if cls == "Conv2D":  # HWIO -> OIHW
        return {"weight": t[0].permute(3, 2, 0, 1).contiguous()}
    if cls == "SeparableConv2D":  # depthwise (kh, kw, in, 1) -> (in, 1, kh, kw); pointwise HWIO -> OIHW
        return {
            "depthwise.weight": t[0].permute(2, 3, 0, 1).contiguous(),
            "pointwise.weight": t[1].permute(3, 2, 0, 1).contiguous(),
        }
    if cls == "BatchNormalization":  # Keras order: gamma, beta, moving mean, moving variance
        return dict(zip(("weight", "bias", "running_mean", "running_var"), t))
    if cls == "Dense":  # kernel is (in, out)
        return {"weight": t[0].T.contiguous(), "bias": t[1]}
    if cls == "Normalization":  # mean, variance, count
        return {"mean": t[0].reshape(-1), "variance": t[1].reshape(-1)}
    raise ValueError(f"no converter for Keras layer class {cls!r}")


def keras_state_dict(keras_path: str | Path) -> tuple[dict[str, Any], dict[str, float]]:
    """Torch state dict for :class:`models.xception.SklesionNet` plus each BatchNorm's epsilon, from Keras files."""
    config, h5 = _open_keras(keras_path)
    sd: dict[str, Any] = {}
    eps: dict[str, float] = {}
    with h5:
        for path, (cls, cfg, group) in _layer_map(config).items():
            arrays = [h5[f"{group}/vars/{i}"][()] for i in range(len(h5[f"{group}/vars"]))]
            sd.update({f"{path}.{k}": v for k, v in convert_keras_vars(cls, arrays).items()})
            if cls == "BatchNormalization":
                eps[path] = float(cfg["epsilon"])
    return sd, eps


def load_keras_weights(model, keras_path: str | Path):
    """Load sklesion's Keras weights (``model.keras`` or its extracted folder) into a ``SklesionNet``;
    every parameter and buffer must be covered. Returns the model."""
    sd, eps = keras_state_dict(keras_path)
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    bad_shape = [k for k in sd if k in own and tuple(own[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or bad_shape:
        raise ValueError(f"weight mismatch: missing={missing[:5]} unexpected={unexpected[:5]} shape={bad_shape[:5]}")
    model.load_state_dict(sd, strict=False)
    modules = dict(model.named_modules())
    for path, e in eps.items():
        modules[path].eps = e
    return model


def build_model(keras_path: str | Path, device: str = "cpu"):
    """A ready-to-run ``SklesionNet`` in eval mode with the Keras weights from ``keras_path``."""
    import torch

    from models.xception import SklesionNet

    model = load_keras_weights(SklesionNet(), keras_path)
    # channels_last makes the depthwise convs ~1.8x faster on CPU (oneDNN), with identical results
    return model.eval().to(device=device, memory_format=torch.channels_last)


_MODELS: dict[tuple[str, str], Any] = {}
_MODELS_LOCK = threading.Lock()


def _shared_model(keras_path: Path, device: str):
    # classifier and embedder instances on the same weights share one network
    key = (str(Path(keras_path).resolve()), device)
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = build_model(keras_path, device)
        return _MODELS[key]


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class SklesionClassifier:
    """``ImageClassifier`` over the ported sklesion model: 7 HAM10000 classes, 2048-d pooled Xception features.

    Weights load on the first ``predict``; ``weights=None`` resolves ``"sklesion-xception"``.
    """

    model_id = MODEL_ID
    labels = LABELS
    feature_dim = FEATURE_DIM

    def __init__(self, weights: str | Path | None = None, device: str = "cpu", batch_size: int | None = None, precision: str = "float32"):
        """``precision``: float32, or bfloat16 autocast (faster, outputs move by up to ~0.05: :mod:`models.precision`)."""
        from models.batching import forward_batch_size
        from models.precision import check_precision

        self.weights = Path(weights) if weights is not None else None
        self.device = device
        self.batch_size = forward_batch_size(device, batch_size, gpu_default=16)
        self.precision = check_precision(precision)
        self._model = None

    @property
    def model(self):
        """The loaded torch network (loads it on first access)."""
        if self._model is None:
            if self.weights is None:
                from models.resolve import resolve

                self.weights = Path(resolve(MODEL_ID))
            self._model = _shared_model(self.weights, self.device)
        return self._model

    def predict(self, images: Sequence[Any], metadata: Sequence[dict | None] | None = None) -> ClassifierOutput:
        """Class probabilities (N, 7) and pooled features (N, 2048), both float32, for RGB images."""
        import torch

        from models.precision import autocast

        if metadata is not None and len(metadata) != len(images):
            raise ValueError(f"got {len(images)} images but {len(metadata)} metadata entries")
        metas = list(metadata) if metadata is not None else [None] * len(images)
        probs = np.zeros((len(images), len(LABELS)), dtype=np.float32)
        feats = np.zeros((len(images), FEATURE_DIM), dtype=np.float32)
        if len(images) == 0:
            return ClassifierOutput(probs=probs, features=feats, labels=LABELS)
        model = self.model
        with torch.inference_mode(), autocast(self.device, self.precision):
            for sl in _batches(len(images), self.batch_size):
                x = preprocess(images[sl]).to(self.device).contiguous(memory_format=torch.channels_last)
                m = torch.from_numpy(np.stack([metadata_vector(d) for d in metas[sl]])).to(self.device)
                p, f = model(x, m)
                probs[sl] = p.float().cpu().numpy()
                feats[sl] = f.float().cpu().numpy()
        return ClassifierOutput(probs=probs, features=feats, labels=LABELS)


class SklesionImageEmbedder:
    """``ImageEmbedder`` giving L2-normalised sklesion pooled Xception features (dim 2048)."""

    model_id = MODEL_ID
    dim = FEATURE_DIM

    def __init__(
        self,
        weights: str | Path | None = None,
        device: str = "cpu",
        batch_size: int | None = None,
        classifier: SklesionClassifier | None = None,
    ):
        self.classifier = classifier or SklesionClassifier(weights=weights, device=device, batch_size=batch_size)

    def embed_images(self, images: Sequence[Any]) -> np.ndarray:
        """(N, 2048) float32 unit-norm features."""
        feats = self.classifier.predict(images).features
        norms = np.linalg.norm(feats, axis=1, keepdims=True)
        return (feats / np.maximum(norms, 1e-12)).astype(np.float32)
