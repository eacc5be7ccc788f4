"""Deterministic data tables from ../shared/data and cached encoder features.

Features are computed once by ``scripts/extract_features.py`` into ``.cache/features/<source>__<view>.npz``
(ids = image paths relative to the source folder, probs, features); training reads them from there.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from models.paths import data_dir

FEATURE_DIR = Path(".cache/features")


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def source_table(source: str, root: Path | None = None) -> list[dict[str, str]]:
    """Rows of a shared-data source with a normalised ``image`` column (relative to the source folder)."""
    root = root or data_dir()
    files = {"ham10000": "metadata.csv", "isic2018_val": "labels.csv", "derm7pt": "meta.csv", "dermnet": "labels.csv", "histology": "labels.csv"}
    rows = read_csv(root / source / files[source])
    if source == "derm7pt":
        for r in rows:
            r["image"] = f"images/{r['derm']}"
    return rows


def load_features(source: str, view: str = "full", feature_dir: Path = FEATURE_DIR) -> dict[str, np.ndarray]:
    """Cached features of a source as ``{"ids", "probs", "features"}`` (features as float32)."""
    path = feature_dir / f"{source}__{view}.npz"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: run `python scripts/extract_features.py` first")
    z = np.load(path, allow_pickle=False)
    # Ids may be stored relative to the data folder ("<source>/images/x.jpg"); use source-relative ids.
    ids = np.array([i.removeprefix(f"{source}/") for i in z["ids"].astype(str)])
    return {"ids": ids, "probs": z["probs"].astype(np.float32), "features": z["features"].astype(np.float32)}


def aligned(rows: list[dict[str, str]], feats: dict[str, np.ndarray], key: str = "image") -> tuple[list[dict[str, str]], dict[str, np.ndarray]]:
    """Rows and feature arrays restricted to the ids both have, in row order."""
    index = {i: n for n, i in enumerate(feats["ids"])}
    keep = [r for r in rows if r[key] in index]
    idx = np.array([index[r[key]] for r in keep], dtype=int)
    return keep, {k: v[idx] for k, v in feats.items()}


DERMNET_HOLDOUT_EVERY = 6


def round_robin(groups: dict[str, list], limit: int) -> list:
    """Up to ``limit`` items taken in turn from each group (groups in sorted key order, each in its own order):
    a deterministic, class-balanced pick."""
    out, i = [], 0
    while len(out) < limit and any(i < len(v) for v in groups.values()):
        for k in sorted(groups):
            if i < len(groups[k]) and len(out) < limit:
                out.append(groups[k][i])
        i += 1
    return out


def is_dermnet_heldout(sha1: str, every: int = DERMNET_HOLDOUT_EVERY) -> bool:
    """DermNet photos kept out of the shipped case index for evaluation (1 in ``every`` by content hash)."""
    return every > 0 and int(sha1[:8], 16) % every == 0


def is_dermnet_fit_half(sha1: str) -> bool:
    """A held-out DermNet photo the clinical fusion may fit on (last hex digit of its content hash even); the odd
    half is the fusion's evaluation half, which nothing should be fitted or selected on."""
    return int(sha1[-1], 16) % 2 == 0


def ham10000_subset(rows: list[dict[str, str]], n_nevus: int = 1200) -> list[dict[str, str]]:
    """The HAM10000 images whose features are extracted by default: every non-nevus ``train`` image and
    ``n_nevus`` nevus ``train`` images chosen by hash (nv is 72% of the set; this bounds CPU time)."""
    import hashlib

    train = [r for r in rows if r["split"] == "train"]
    nevi = sorted((r for r in train if r["dx"] == "nv"), key=lambda r: hashlib.sha1((r["lesion_id"] + r["image_id"]).encode()).hexdigest())
    keep = {r["image_id"] for r in train if r["dx"] != "nv"} | {r["image_id"] for r in nevi[:n_nevus]}
    return [r for r in rows if r["image_id"] in keep]


def read_table(path: Path) -> list[dict[str, str]]:
    """Rows of a user CSV or JSONL (one object per line), values as strings."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return read_csv(path)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        import json

        return [{k: "" if v is None else str(v) for k, v in json.loads(line).items()} for line in path.read_text().splitlines() if line.strip()]
    raise ValueError(f"{path}: expected a .csv or .jsonl file")


def user_features(images: list[Path], feature_dir: Path = FEATURE_DIR, view: str = "full", device: str = "cpu") -> dict[str, np.ndarray]:
    """sklesion probabilities and pooled features of arbitrary image files, extracted once and cached in
    ``feature_dir/user_<hash>__<view>.npz`` (keyed by the resolved paths and the view)."""
    import hashlib

    from PIL import Image

    from training.views import make_view

    ids = [str(Path(p).resolve()) for p in images]
    key = hashlib.sha256(("\n".join(ids) + view).encode()).hexdigest()[:16]
    path = Path(feature_dir) / f"user_{key}__{view}.npz"
    if path.exists():
        z = np.load(path, allow_pickle=False)
        return {"ids": z["ids"].astype(str), "probs": z["probs"].astype(np.float32), "features": z["features"].astype(np.float32)}
    missing = [i for i in ids if not Path(i).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images not found, e.g. {missing[0]}")
    from models.sklesion import SklesionClassifier

    clf = SklesionClassifier(device=device)
    probs, feats = [], []
    for lo in range(0, len(ids), 32):
        res = clf.predict([make_view(Image.open(i).convert("RGB"), view) for i in ids[lo : lo + 32]])
        probs.append(res.probs)
        feats.append(res.features)
    out = {"ids": np.array(ids, dtype=str), "probs": np.concatenate(probs).astype(np.float32), "features": np.concatenate(feats).astype(np.float32)}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, ids=out["ids"], probs=out["probs"], features=out["features"].astype(np.float16))
    return out


def imagenet_feature_cache(keys: list[str], load, path: Path, stages: bool = False, device: str = "cpu", dtype=np.float32,
                           chunk: int = 256, save_every: int = 2048, desc: str = "ImageNet features") -> np.ndarray:  # fmt: skip
    """ImageNet EfficientNet-Lite0 features (:class:`models.probe.ImageNetEncoder`; ``stages``: with its stage statistics)
    of the images ``load(key)`` returns, in ``keys`` order, cached by key in ``path`` (``ids``, ``features`` as ``dtype``):
    keys already there are read, the others computed in chunks of ``chunk`` and the file rewritten every ``save_every``
    new images and at the end, so a killed run resumes."""
    from tqdm.auto import tqdm

    from models.probe import ImageNetEncoder

    path = Path(path)
    have: dict[str, np.ndarray] = {}
    if path.exists():
        z = np.load(path, allow_pickle=False)
        have = dict(zip(z["ids"].astype(str).tolist(), z["features"]))
    todo = list(dict.fromkeys(k for k in keys if k not in have))
    if todo:
        path.parent.mkdir(parents=True, exist_ok=True)
        enc = ImageNetEncoder(device, stages=stages)

        def save() -> None:
            ids = sorted(have)
            np.savez(path, ids=np.array(ids), features=np.stack([have[i] for i in ids]).astype(dtype))

        since = 0
        for lo in tqdm(range(0, len(todo), chunk), desc=desc, unit="chunk"):
            part = todo[lo : lo + chunk]
            have.update(zip(part, enc.embed([load(k) for k in part]).astype(dtype)))
            since += len(part)
            if since >= save_every:
                save()
                since = 0
        save()
    return np.stack([have[k] for k in keys]).astype(np.float32)
