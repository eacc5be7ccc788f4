"""Extract sklesion probabilities and pooled Xception features for the shared data sets.

Writes ``.cache/features/<source>__<view>.npz`` in the repository root (git-ignored) with arrays
``ids`` (image paths relative to the data folder), ``probs`` (N, 7) float32, ``features`` (N, 2048)
float16 and ``labels`` (the 7 class codes). Views: ``full`` for every source; DermNet also gets
``masked`` (its lower-left watermark painted over with the image's median colour) and ``crop50``
(the centre half of each side of the masked photo); dermoscopy sources also give ``centre70`` / ``centre50``
(plain centre crops) and ``colour`` (a colour variant; histology too) when ``--views`` names them. HAM10000
images get their metadata (age, sex, localization); the other sources have none.

Resumable: finished outputs are skipped, and a running source is checkpointed every few hundred
images (``*.partial.npz``) and continued from there. ::

    python scripts/extract_features.py                     # everything
    python scripts/extract_features.py --bench 32          # throughput on 32 images, writes nothing
    python scripts/extract_features.py --sources dermnet --views masked
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from training.views import VIEWS  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / ".cache" / "features"

@dataclass(frozen=True)
class Source:
    csv_name: str
    image_col: str
    image_prefix: str = ""  # folder the CSV's paths are relative to, inside the source folder
    views: tuple[str, ...] = ("full",)
    with_metadata: bool = False
    optional_views: tuple[str, ...] = ()  # extracted only when --views names them


# Dermoscopy images can also be had as tight centre crops or colour variants (training.modality's dermoscopy_views /
# histology_views): --views centre70 colour.
DERMOSCOPY_EXTRA_VIEWS = ("centre70", "centre50", "colour")
# smallest / most used for evaluation first, so partial runs are already useful
SOURCES: dict[str, Source] = {
    "isic2018_val": Source("labels.csv", "image", optional_views=DERMOSCOPY_EXTRA_VIEWS),
    "derm7pt": Source("meta.csv", "derm", image_prefix="images/", optional_views=DERMOSCOPY_EXTRA_VIEWS),
    "histology": Source("labels.csv", "image", optional_views=("colour",)),
    "dermnet": Source("labels.csv", "image", views=("full", "masked", "crop50")),
    "ham10000": Source("metadata.csv", "image", with_metadata=True, optional_views=DERMOSCOPY_EXTRA_VIEWS),
}


def list_images(root: Path, name: str, ham_nevi: int | None = None) -> tuple[list[str], list[dict | None]]:
    """(ids relative to the data folder, metadata dicts or None) for one source, in CSV order."""
    src = SOURCES[name]
    with open(root / name / src.csv_name, newline="") as f:
        rows = list(csv.DictReader(f))
    if name == "ham10000" and ham_nevi is not None:
        from training.data import ham10000_subset

        rows = ham10000_subset(rows, ham_nevi)
    ids = [f"{name}/{src.image_prefix}{r[src.image_col]}" for r in rows]
    metas = [
        {"age": r.get("age") or None, "sex": r.get("sex"), "localization": r.get("localization")}
        if src.with_metadata
        else None
        for r in rows
    ]
    return ids, metas


def _save(path: Path, ids: list[str], probs: np.ndarray, feats: np.ndarray, labels) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")  # np.savez appends .npz unless present
    np.savez(tmp, ids=np.array(ids, dtype=str), probs=probs.astype(np.float32),
             features=feats.astype(np.float16), labels=np.array(labels, dtype=str))  # fmt: skip
    os.replace(tmp, path)


def run_one(clf, root: Path, name: str, view: str, out_dir: Path, chunk: int, limit: int | None = None, ham_nevi: int | None = 1200) -> None:
    """Compute one ``<source>__<view>.npz``, resuming from its checkpoint when there is one."""
    out = out_dir / f"{name}__{view}.npz"
    if out.exists() and limit is None:
        print(f"{out.name}: done, skipping", flush=True)
        return
    ids, metas = list_images(root, name, ham_nevi)
    if limit is not None:
        ids, metas = ids[:limit], metas[:limit]
    partial = out_dir / f"{name}__{view}.partial.npz"
    probs = np.zeros((len(ids), len(clf.labels)), np.float32)
    feats = np.zeros((len(ids), clf.feature_dim), np.float32)
    start = 0
    if partial.exists() and limit is None:
        with np.load(partial) as z:
            done = [str(s) for s in z["ids"]]
            if done == ids[: len(done)]:
                start = len(done)
                probs[:start], feats[:start] = z["probs"], z["features"]
                print(f"{out.name}: resuming at {start}/{len(ids)}", flush=True)
    transform = VIEWS[view]
    t0, n_run = time.perf_counter(), 0
    for lo in range(start, len(ids), chunk):
        hi = min(lo + chunk, len(ids))
        images = [transform(Image.open(root / i).convert("RGB")) for i in ids[lo:hi]]
        res = clf.predict(images, metas[lo:hi] if SOURCES[name].with_metadata else None)
        probs[lo:hi], feats[lo:hi] = res.probs, res.features
        n_run += hi - lo
        rate = n_run / (time.perf_counter() - t0)
        print(f"{out.name}: {hi}/{len(ids)}  {rate:.2f} images/s", flush=True)
        if limit is None and hi < len(ids):
            _save(partial, ids[:hi], probs[:hi], feats[:hi], clf.labels)
    if limit is not None:
        return
    _save(out, ids, probs, feats, clf.labels)
    partial.unlink(missing_ok=True)
    print(f"{out.name}: wrote {len(ids)} rows", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="sklesion probabilities + pooled features for the shared data.")
    ap.add_argument("--sources", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    ap.add_argument("--views", nargs="+", default=None, choices=list(VIEWS), help="default: each source's views")
    ap.add_argument("--weights", type=Path, default=None, help="model.keras (default: resolve the registry id)")
    ap.add_argument("--data", type=Path, default=None, help="shared data folder (default: models.paths.data_dir())")
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=256, help="images per checkpoint")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ham-nevi", type=int, default=1200, help="HAM10000: all non-nevus train images plus this many nevi (-1: every image)")
    ap.add_argument("--bench", type=int, default=None, metavar="N", help="time N images; write nothing")
    args = ap.parse_args(argv)

    import torch

    sys.path.insert(0, str(REPO))
    from models.paths import data_dir
    from models.sklesion import SklesionClassifier

    torch.set_num_threads(args.threads)
    root = args.data or data_dir()
    clf = SklesionClassifier(args.weights, device=args.device, batch_size=args.batch_size)
    _ = clf.model  # load before timing

    if args.bench:
        name = args.sources[0]
        clf.predict([Image.new("RGB", (224, 224))] * args.batch_size)  # oneDNN builds its kernels on the first call
        run_one(clf, root, name, "full", args.out_dir, chunk=args.bench, limit=args.bench)
        return
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in args.sources:
        src = SOURCES[name]
        for view in src.views + src.optional_views:
            if view in (src.views if args.views is None else args.views):
                t = time.perf_counter()
                run_one(clf, root, name, view, args.out_dir, chunk=args.chunk, ham_nevi=None if args.ham_nevi < 0 else args.ham_nevi)
                print(f"{name}__{view}: {time.perf_counter() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
