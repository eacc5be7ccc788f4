"""The fine-tuned EfficientNet-Lite0 expert alone on held-out images, and its CPU cost per image.

Runs :class:`models.efficientnet.EfficientNetExpert` on the original image files (the deployment path,
not the trainer's cache) and reports, with percentile-bootstrap 95% CIs:

- ``isic2018_val`` and Derm7pt ``val``: accuracy, balanced accuracy, melanoma sensitivity (HAM head);
- DermNet held-out sixth (watermark masked): top-1 / top-5 over the 56 classes (DermNet head);
- modality on every held-out source, including close-up crops of the held-out DermNet photos
  (centre 50% and 30% of each side) which should be called clinical, not dermoscopy;
- Derm7pt ``val`` 7-point criteria macro-F1 (criterion heads).

    python -m training.eval_encoder eval --weights runs/train/encoder_cpu/best.safetensors --out runs/eval/encoder_cpu
    python -m training.eval_encoder bench --weights runs/train/encoder_cpu/best.safetensors
    python -m training.eval_encoder features --weights ... --sources isic2018_val derm7pt dermnet   # for the fusion
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from models.vocabulary import HAM_CLASSES, SEVEN_POINT

MODALITIES = ["clinical", "dermoscopy", "histopathology", "not_skin"]


@dataclasses.dataclass(frozen=True)
class ViewOptions:
    """How the expert is run at test time: :class:`models.efficientnet.EfficientNetExpert`'s view keywords, as the
    agent's ``encoder.second_expert.options`` set them (``views`` averaged for ``view_heads``, only for images
    passing ``views_if``, encoded at ``view_size``; ``members`` averaged in for images passing ``members_if``)."""

    views: Sequence[str] = ()
    view_heads: Sequence[str] | None = None
    views_if: str | None = None
    view_size: int | None = None
    members: Sequence[str] = ()
    members_if: str | None = None

    def expert(self, weights: Path, **kw):
        from models.efficientnet import EfficientNetExpert

        return EfficientNetExpert(weights, **kw, **dataclasses.asdict(self))

    def record(self) -> dict:
        """The options as stored with a result (lists, not tuples, for JSON)."""
        d = dataclasses.asdict(self)
        return {**d, "views": list(self.views), "view_heads": None if self.view_heads is None else list(self.view_heads), "members": list(self.members)}


def _views(records: list[dict], view: str | None = None):
    from PIL import Image

    from training import synthetic
    from training.views import center_crop, make_view

    out = []
    for n, r in enumerate(records):
        if r["source"] == "synthetic":
            out.append(synthetic.make(r["image"].split(":")[0], int(r["image"].split(":")[1]) * 100003 + n))
            continue
        img = Image.open(r["path"]).convert("RGB")
        v = view or r["view"]
        out.append(center_crop(make_view(img, "masked"), 0.3) if v == "crop30" else make_view(img, v))
    return out


def _ci(metric, *arrays, n: int = 1000) -> list[float] | None:
    """Percentile-bootstrap 95% CI; None where no resample defines the metric (e.g. no melanoma)."""
    from evals.metrics import bootstrap_ci

    try:
        return [round(v, 4) for v in bootstrap_ci(metric, *arrays, n=n)]
    except IndexError:
        return None


def evaluate(weights: Path, batch_size: int = 32, n_bootstrap: int = 1000, log=print, options: ViewOptions = ViewOptions()) -> dict:
    """Every figure of the expert alone on held-out data (see the module docstring), run as ``options`` say."""
    from evals.metrics import balanced_accuracy, macro_f1
    from training.encoder import Config, _synthetic_records, build_tables

    expert = options.expert(weights, batch_size=batch_size)
    info = expert.info
    sets, dn_classes = build_tables(Config())
    sets["val_not_skin"] = _synthetic_records(10, 1000)
    if info["heads"]["dermnet"] != dn_classes:
        raise ValueError("the expert's DermNet classes differ from ../shared/data/dermnet")
    res: dict = {"weights": str(weights), "image_size": info["image_size"], **options.record(), "n_bootstrap": n_bootstrap}
    mod_y, mod_p = [], []

    def run(name, recs, view=None):
        t = time.time()
        feats, probs = expert.predict_heads(_views(recs, view))
        log(f"{name}: {len(recs)} images in {time.time() - t:.0f} s")
        y_mod = np.array([MODALITIES[r["labels"]["modality"]] for r in recs])
        p_mod = np.array(MODALITIES)[probs["modality"].argmax(1)]
        res[f"{name}/modality_acc"] = round(float((y_mod == p_mod).mean()), 4)
        res[f"{name}/modality_called"] = {m: int((p_mod == m).sum()) for m in MODALITIES if (p_mod == m).any()}
        mod_y.append(y_mod)
        mod_p.append(p_mod)
        return probs

    for name in ("val_isic2018", "val_derm7pt"):
        recs = sets[name]
        probs = run(name, recs)
        keep = np.array([r["labels"]["ham"] >= 0 for r in recs])
        y = np.array([HAM_CLASSES[r["labels"]["ham"]] for r, k in zip(recs, keep) if k])
        p = np.array(HAM_CLASSES)[probs["ham"][keep].argmax(1)]
        mel = lambda a, b: float((b[a == "mel"] == "mel").mean()) if (a == "mel").any() else float("nan")  # noqa: E731
        acc = lambda a, b: float((a == b).mean())  # noqa: E731
        for key, fn in (("accuracy", acc), ("balanced_accuracy", balanced_accuracy), ("mel_sensitivity", mel)):
            res[f"{name}/{key}"] = round(fn(y, p), 4)
            res[f"{name}/{key}_ci95"] = _ci(fn, y, p, n=n_bootstrap)
        res[f"{name}/n"] = int(keep.sum())
        if name == "val_derm7pt":
            f1s = {}
            for j, c in enumerate(SEVEN_POINT):
                yc = np.array([r["labels"]["crit"][j] for r in recs])
                ok = yc >= 0
                vocab = list(SEVEN_POINT[c])
                f1s[c] = round(macro_f1(np.array(vocab)[yc[ok]], np.array(vocab)[probs[f"crit_{c}"][ok].argmax(1)]), 4)
            f1s["mean"] = round(float(np.mean(list(f1s.values()))), 4)
            res["val_derm7pt/criteria_macro_f1"] = f1s

    recs = sets["val_dermnet"]
    probs = run("val_dermnet", recs)
    y = np.array([r["labels"]["dermnet"] for r in recs])
    order = np.argsort(-probs["dermnet"], axis=1)
    hit1, hit5 = order[:, 0] == y, (order[:, :5] == y[:, None]).any(1)
    mean = lambda a: float(np.mean(a))  # noqa: E731
    res["val_dermnet/n"] = len(recs)
    res["val_dermnet/top1"], res["val_dermnet/top1_ci95"] = round(mean(hit1), 4), _ci(mean, hit1, n=n_bootstrap)
    res["val_dermnet/top5"], res["val_dermnet/top5_ci95"] = round(mean(hit5), 4), _ci(mean, hit5, n=n_bootstrap)
    closeup = []
    for view in ("crop50", "crop30"):
        run(f"val_dermnet_{view}", recs, view)
        closeup.append(mod_y[-1] == mod_p[-1])
    res["closeups/modality_acc"] = round(float(np.concatenate(closeup).mean()), 4)
    for name in ("val_histology", "val_not_skin"):
        run(name, sets[name])
    # whole images only (close-up crops are reported apart)
    whole = [i for i, k in enumerate(("val_isic2018", "val_derm7pt", "val_dermnet", "crop50", "crop30", "val_histology", "val_not_skin")) if "crop" not in k]
    res["modality_acc_whole_images"] = round(float(np.concatenate([mod_y[i] == mod_p[i] for i in whole]).mean()), 4)
    return res


def bench(weights: Path, n: int = 48, threads: int = 1, options: ViewOptions = ViewOptions(), source: str = "isic2018_val") -> dict:
    """Seconds per image of preprocessing + the network on CPU (batch 1 and batch 16) on the first ``n`` images of
    ``source`` (a folder of the shared data: isic2018_val dermoscopy, dermnet clinical photos), printed."""
    import torch
    from PIL import Image

    from models.paths import data_dir

    torch.set_num_threads(threads)
    files = sorted((data_dir() / source / "images").rglob("*.jpg"))[:n]
    imgs = [Image.open(f).convert("RGB") for f in files] or [Image.new("RGB", (224, 224), (180, 120, 100))] * n
    expert = options.expert(weights)
    expert.predict_heads(imgs[:2])  # load + warm up
    out = {"source": source, "threads": threads, "images": len(imgs), "image_size": expert.info["image_size"], **options.record()}
    for bs in (1, 16):
        expert.batch_size = bs
        t = time.perf_counter()
        expert.predict_heads(imgs)
        out[f"s_per_image_batch{bs}"] = round((time.perf_counter() - t) / len(imgs), 4)
    print(json.dumps(out))
    return out


def write_features(weights: Path, feature_dir: Path, sources: list[str], batch_size: int = 32, log=print, options: ViewOptions = ViewOptions(),
                   dermnet_view: str = "masked") -> list[Path]:  # fmt: skip
    """The expert's outputs on every image of ``sources`` as ``<feature_dir>/<source>__effnet.npz`` in the
    layout of ``training.data.load_features`` (ids, probs = HAM head, features) plus ``probs_<head>`` per head.
    Outputs on images the expert trained on (HAM10000 train, Derm7pt train/extra, DermNet outside the
    held-out sixth) are in-sample: only the held-out ones are deployment-like. ``options``: the test-time views,
    as the agent's ``encoder.second_expert`` options run them. ``dermnet_view``: DermNet photos with their watermark
    masked (as the expert trained; the case index is built from these) or 'full', the original files as the agent
    sees them (what the fusion's records of the held-out photos should hold)."""
    from PIL import Image

    from models.paths import data_dir
    from training.data import source_table
    from training.views import make_view

    expert = options.expert(weights, batch_size=batch_size)
    written = []
    for source in sources:
        rows = source_table(source)
        view = dermnet_view if source == "dermnet" else "full"
        ids, feats, probs = [], [], {}
        t = time.time()
        for lo in range(0, len(rows), 64):
            chunk = rows[lo : lo + 64]
            f, p = expert.predict_heads([make_view(Image.open(data_dir() / source / r["image"]).convert("RGB"), view) for r in chunk])
            ids += [r["image"] for r in chunk]
            feats.append(f.astype(np.float16))
            for k, v in p.items():
                probs.setdefault(k, []).append(v)
        path = Path(feature_dir) / f"{source}__effnet.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, ids=np.array(ids), probs=np.concatenate(probs["ham"]), features=np.concatenate(feats),
                 **{f"probs_{k}": np.concatenate(v) for k, v in probs.items()})  # fmt: skip
        log(f"{source}: {len(ids)} images in {time.time() - t:.0f} s -> {path}")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m training.eval_encoder")
    p.add_argument("what", choices=["eval", "bench", "features"])
    p.add_argument("--sources", nargs="+", default=["isic2018_val", "derm7pt", "dermnet"], help="features: sources to encode")
    p.add_argument("--feature-dir", type=Path, default=Path(".cache/features"))
    p.add_argument("--weights", type=Path, required=True)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--n-bootstrap", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--views", nargs="*", default=[], help="test-time views whose mean the view heads give (models.tta.TTA_VIEWS), as the agent runs the expert")
    p.add_argument("--view-heads", nargs="*", default=None, help="heads averaged over --views (default: all)")
    p.add_argument("--views-if", default=None, help="head=label: only images whose own output ranks that label first get the views (e.g. modality=clinical)")
    p.add_argument("--view-size", type=int, default=None, help="resolution (px) at which the images that get the views are encoded for the view heads and pooled features (the expert's view_size option; default: the trained size)")
    p.add_argument("--members", nargs="*", default=[], help="ensemble members averaged with --weights (registry ids or expert files; the expert's members option)")
    p.add_argument("--members-if", default=None, help="head=label: only images whose own output ranks that label first get the members (e.g. modality=dermoscopy)")
    p.add_argument("--dermnet-view", choices=["masked", "full"], default="masked", help="features: DermNet photos watermark-masked (the case index's) "
                   "or as the agent sees them (the fusion records')")
    p.add_argument("--bench-source", default="isic2018_val", help="bench: the shared data folder whose images are timed (e.g. dermnet)")
    a = p.parse_args(argv)
    opts = ViewOptions(views=tuple(a.views), view_heads=None if a.view_heads is None else tuple(a.view_heads), views_if=a.views_if, view_size=a.view_size,
                       members=tuple(a.members), members_if=a.members_if)
    if a.what == "features":
        import torch

        torch.set_num_threads(a.threads)
        write_features(a.weights, a.feature_dir, a.sources, options=opts, dermnet_view=a.dermnet_view)
        return
    if a.what == "bench":
        res = bench(a.weights, threads=a.threads, source=a.bench_source, options=opts)
    else:
        import torch

        torch.set_num_threads(a.threads)
        t = time.time()
        res = evaluate(a.weights, n_bootstrap=a.n_bootstrap, options=opts)
        res["wall_s"] = round(time.time() - t, 1)
        print(json.dumps(res, indent=1))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / f"{a.what}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":  # pragma: no cover
    main()
