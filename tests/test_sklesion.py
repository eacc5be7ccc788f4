"""sklesion PyTorch port: metadata encoding, TF-style preprocessing, Keras->torch weight layout, Keras parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from models import sklesion
from models.protocols import ImageClassifier, ImageEmbedder
from models.sklesion import (
    AGE_MAX,
    AGE_MEAN,
    LABELS,
    SklesionClassifier,
    SklesionImageEmbedder,
    convert_keras_vars,
    map_location,
    map_sex,
    metadata_vector,
    preprocess,
)
from models.xception import MaxPool2dSame, SeparableConv2d, SklesionNet, Xception

REFERENCE = Path(__file__).parent / "fixtures" / "sklesion_keras_reference.json"
RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------- metadata


def _vec(sex: str, loc: str, age: float | None) -> np.ndarray:
    v = np.zeros(10, np.float32)
    v[sklesion.SEXES.index(sex)] = 1
    v[3 + sklesion.LOCATIONS.index(loc)] = 1
    v[8] = (AGE_MEAN if age is None else age) / AGE_MAX
    v[9] = age is None
    return v


def test_metadata_vector_none_is_all_unknown():
    np.testing.assert_allclose(metadata_vector(None), _vec("unknown", "unknown", None))
    np.testing.assert_allclose(metadata_vector({}), _vec("unknown", "unknown", None))


def test_metadata_vector_ham_row():
    v = metadata_vector({"age": "45", "sex": "male", "localization": "lower extremity"})
    np.testing.assert_allclose(v, _vec("male", "leg-or-genital", 45.0))
    assert v.dtype == np.float32 and v.shape == (10,)


@pytest.mark.parametrize("age", [None, "", "n/a", float("nan"), -3])
def test_metadata_vector_missing_age(age):
    v = metadata_vector({"age": age, "sex": "F", "site": "face"})
    np.testing.assert_allclose(v, _vec("female", "head-or-neck", None))


def test_metadata_vector_age_zero_is_not_missing():
    assert metadata_vector({"age": 0})[9] == 0 and metadata_vector({"age": 0})[8] == 0


@pytest.mark.parametrize(
    "site, loc",
    [
        ("upper extremity", "arm"), ("hand", "arm"), ("Arm", "arm"),
        ("face", "head-or-neck"), ("scalp", "head-or-neck"), ("neck", "head-or-neck"), ("ear", "head-or-neck"),
        ("head/neck", "head-or-neck"),
        ("lower extremity", "leg-or-genital"), ("foot", "leg-or-genital"), ("genital", "leg-or-genital"),
        ("back", "trunk"), ("chest", "trunk"), ("abdomen", "trunk"), ("trunk", "trunk"), ("posterior_torso", "trunk"),
        ("acral", "unknown"), ("unknown", "unknown"), ("", "unknown"), (None, "unknown"), ("elsewhere", "unknown"),
    ],
)  # fmt: skip
def test_map_location(site, loc):
    assert map_location(site) == loc


@pytest.mark.parametrize("key", ["site", "localization", "location"])
def test_metadata_site_keys(key):
    assert metadata_vector({key: "back"})[3 + sklesion.LOCATIONS.index("trunk")] == 1


def test_map_sex():
    assert [map_sex(s) for s in ("female", " Male ", "f", "M", "unknown", None, "x")] == [
        "female", "male", "female", "male", "unknown", "unknown", "unknown",
    ]  # fmt: skip


# ----------------------------------------------------------------------------- preprocessing


def _tf_resize_reference(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Straight-loop TF ResizeBilinear(half_pixel_centers=True) on HxWxC."""
    h, w, _ = img.shape
    out = np.zeros((out_h, out_w, img.shape[2]), np.float64)
    for y in range(out_h):
        sy = (y + 0.5) * h / out_h - 0.5
        y0, y1, ly = max(int(np.floor(sy)), 0), min(int(np.ceil(sy)), h - 1), sy - np.floor(sy)
        for x in range(out_w):
            sx = (x + 0.5) * w / out_w - 0.5
            x0, x1, lx = max(int(np.floor(sx)), 0), min(int(np.ceil(sx)), w - 1), sx - np.floor(sx)
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * lx
            bot = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * lx
            out[y, x] = top + (bot - top) * ly
    return out


@pytest.mark.parametrize("shape", [(9, 9), (13, 7), (5, 11)])
def test_preprocess_matches_tf_bilinear(shape):
    img = RNG.integers(0, 256, (*shape, 3), dtype=np.uint8)
    got = preprocess([Image.fromarray(img)], size=(11, 10))
    assert got.shape == (1, 3, 11, 10) and got.dtype == torch.float32
    ref = _tf_resize_reference(img.astype(np.float64), 11, 10)
    np.testing.assert_allclose(got[0].permute(1, 2, 0).numpy(), ref, atol=1e-3)


def test_preprocess_default_size_modes_and_identity():
    imgs = [
        Image.fromarray(RNG.integers(0, 256, (224, 224, 3), dtype=np.uint8)),
        Image.fromarray(RNG.integers(0, 256, (300, 200), dtype=np.uint8), mode="L"),
        Image.fromarray(RNG.integers(0, 256, (254, 254, 4), dtype=np.uint8), mode="RGBA"),
    ]
    x = preprocess(imgs)
    assert x.shape == (3, 3, 254, 254)
    assert float(x.min()) >= 0 and float(x.max()) <= 255
    # a 254x254 image passes through unchanged (as tf.image.resize does)
    np.testing.assert_array_equal(x[2].permute(1, 2, 0).numpy(), np.asarray(imgs[2].convert("RGB"), np.float32))
    assert preprocess([]).shape == (0, 3, 254, 254)


# ----------------------------------------------------------------------------- Keras -> torch layout


def _np_conv_nhwc(x: np.ndarray, k: np.ndarray, pad: int) -> np.ndarray:
    """Keras semantics: y[h, w, o] = sum_{i, j, c} x[h+i, w+j, c] * k[i, j, c, o] (stride 1)."""
    x = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    kh, kw = k.shape[:2]
    oh, ow = x.shape[0] - kh + 1, x.shape[1] - kw + 1
    y = np.zeros((oh, ow, k.shape[3]))
    for i in range(kh):
        for j in range(kw):
            y += x[i : i + oh, j : j + ow] @ k[i, j]
    return y


def test_conv2d_kernel_layout():
    x, k = RNG.normal(size=(6, 7, 3)), RNG.normal(size=(3, 3, 3, 5))
    w = convert_keras_vars("Conv2D", [k])["weight"]
    got = F.conv2d(torch.tensor(x, dtype=torch.float32).permute(2, 0, 1)[None], w)[0].permute(1, 2, 0)
    np.testing.assert_allclose(got.numpy(), _np_conv_nhwc(x, k, 0), atol=1e-4)


def test_separable_conv_layout():
    c, o = 4, 6
    x, dw, pw = RNG.normal(size=(5, 5, c)), RNG.normal(size=(3, 3, c, 1)), RNG.normal(size=(1, 1, c, o))
    # depthwise: each channel convolved with its own 3x3 kernel, "same" padding; then 1x1 pointwise
    depth = np.stack([_np_conv_nhwc(x[..., ch : ch + 1], dw[:, :, ch : ch + 1, :], 1)[..., 0] for ch in range(c)], -1)
    ref = depth @ pw[0, 0]
    layer = SeparableConv2d(c, o)
    sd = convert_keras_vars("SeparableConv2D", [dw, pw])
    layer.load_state_dict(sd)
    got = layer(torch.tensor(x, dtype=torch.float32).permute(2, 0, 1)[None])[0].permute(1, 2, 0)
    np.testing.assert_allclose(got.detach().numpy(), ref, atol=1e-4)


def test_dense_and_batchnorm_layout():
    x, k, b = RNG.normal(size=(2, 5)), RNG.normal(size=(5, 3)), RNG.normal(size=3)
    lin = torch.nn.Linear(5, 3)
    lin.load_state_dict(convert_keras_vars("Dense", [k, b]))
    np.testing.assert_allclose(lin(torch.tensor(x, dtype=torch.float32)).detach().numpy(), x @ k + b, atol=1e-5)

    gamma, beta, mean, var = RNG.normal(size=3), RNG.normal(size=3), RNG.normal(size=3), RNG.uniform(0.5, 2, 3)
    bn = torch.nn.BatchNorm1d(3, eps=1e-3).eval()
    bn.load_state_dict(convert_keras_vars("BatchNormalization", [gamma, beta, mean, var]), strict=False)
    y = bn(torch.tensor(x[:, :3], dtype=torch.float32)).detach().numpy()
    np.testing.assert_allclose(y, (x[:, :3] - mean) / np.sqrt(var + 1e-3) * gamma + beta, atol=1e-5)


@pytest.mark.parametrize("size", [8, 9, 16, 31])
def test_maxpool_same_matches_tf(size):
    x = torch.randn(1, 2, size, size)
    out = -(-size // 2)
    total = max((out - 1) * 2 + 3 - size, 0)
    before = total // 2
    padded = np.full((2, size + total, size + total), -np.inf, np.float32)
    padded[:, before : before + size, before : before + size] = x[0].numpy()
    ref = np.array(
        [
            [[padded[c, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].max() for j in range(out)] for i in range(out)]
            for c in range(2)
        ]
    )
    np.testing.assert_allclose(MaxPool2dSame(3, 2)(x)[0].numpy(), ref)


def test_keras_snake_case_names():
    names = ["SeparableConv2D", "BatchNormalization", "Conv2D", "InputLayer", "Dense", "Functional"]
    assert [sklesion._snake(n) for n in names] == [
        "separable_conv2d", "batch_normalization", "conv2d", "input_layer", "dense", "functional",
    ]  # fmt: skip


def test_random_net_shapes():
    net = SklesionNet().eval()
    with torch.inference_mode():
        probs, feats = net(torch.rand(2, 3, 96, 96) * 255, torch.zeros(2, 10))
    assert probs.shape == (2, 7) and feats.shape == (2, Xception.feature_dim)
    torch.testing.assert_close(probs.sum(1), torch.ones(2))


# ----------------------------------------------------------------------------- protocol / laziness


def test_protocols_and_lazy_construction(tmp_path):
    clf = SklesionClassifier(weights=tmp_path / "absent.keras")  # nothing is read until predict
    emb = SklesionImageEmbedder(classifier=clf)
    assert isinstance(clf, ImageClassifier) and isinstance(emb, ImageEmbedder)
    assert clf.labels == LABELS and clf.feature_dim == emb.dim == 2048
    out = clf.predict([])
    assert out.probs.shape == (0, 7) and out.features.shape == (0, 2048) and out.labels == LABELS
    with pytest.raises(ValueError):
        clf.predict([Image.new("RGB", (8, 8))], metadata=[None, None])


def test_backend_registry_builds_without_loading():
    from models.backends import create

    clf = create("classifier", "sklesion", weights="unused.keras", batch_size=4)
    assert isinstance(clf, SklesionClassifier) and clf._model is None and clf.batch_size == 4


def test_unknown_precision_is_refused_before_any_weights_load():
    with pytest.raises(ValueError, match="unknown precision 'fp16'; valid: float32, bfloat16"):
        SklesionClassifier(weights="unused.keras", precision="fp16")


@pytest.mark.weights
def test_bfloat16_precision_gives_float32_outputs_near_the_default():
    """The real Xception on the bundled example: bfloat16 autocast moves probabilities by a few hundredths at most."""
    img = Image.open(Path(__file__).resolve().parents[1] / "examples" / "lesion.jpg").convert("RGB")
    ref = SklesionClassifier().predict([img, img.rotate(90)])
    fast = SklesionClassifier(precision="bfloat16").predict([img, img.rotate(90)])
    assert fast.probs.dtype == fast.features.dtype == np.float32 and not np.array_equal(fast.probs, ref.probs)
    np.testing.assert_allclose(fast.probs, ref.probs, atol=0.1)


# ----------------------------------------------------------------------------- parity with Keras


@pytest.mark.weights
@pytest.mark.data
def test_parity_with_keras_reference(shared_data):
    ref = json.loads(REFERENCE.read_text())
    items = ref["items"]
    assert len(items) == 20 and tuple(ref["labels"]) == LABELS
    for it in items:
        np.testing.assert_allclose(metadata_vector(it["metadata"]), it["meta_vector"], atol=1e-7)

    clf = SklesionClassifier(batch_size=8)
    images = [Image.open(shared_data / it["image"]).convert("RGB") for it in items]
    out = clf.predict(images, [it["metadata"] for it in items])

    diff = np.abs(out.probs - np.array([it["probs"] for it in items], np.float32))
    assert diff.max() < 1e-4, f"max abs prob diff {diff.max():.2e}"
    np.testing.assert_allclose(out.features[:, :16], [it["features_head"] for it in items], atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(out.features, axis=1), [it["features_l2"] for it in items], rtol=1e-4)

    emb = SklesionImageEmbedder(classifier=clf).embed_images(images[:2])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(
        emb, out.features[:2] / np.linalg.norm(out.features[:2], axis=1, keepdims=True), atol=1e-5
    )
