"""Train the modality head: clinical / dermoscopy / histopathology / not_skin.

Inputs are the lesion encoder's pooled features plus colour/texture statistics. Validation holds
whole sources out (a dermoscopy dataset, a third of DermNet's classes, a third of the histology
slides, a third of the synthetic kinds per fold), and also reports tight crops of clinical photos,
which look like dermoscopy close-ups to a HAM10000-trained encoder.

    dermgraph train modality --config configs/train/modality.yaml
    python -m training.modality --config configs/train/modality_smoke.yaml --set feature_dir=/tmp/features
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from agent.config import AgentConfig
from models.vocabulary import MODALITIES
from training.cli import module_main
from training.config import Strict, TrainConfig

CLASSES = list(MODALITIES)
LICENCE = "CC-BY-NC-SA-4.0 (derived from non-commercial training data)"


class EncoderFinetune(Strict):
    """Fine-tune the lesion encoder's last stages for the modality task, on images rather than cached features.

    The encoder is trained end to end with a linear head (warm-started from the frozen-feature head),
    then a logistic head is refitted on its features exactly as without fine-tuning. BatchNorm keeps
    its running statistics (small CPU batches would corrupt them). Held-out-source folds fine-tune one
    encoder per fold, so the before/after compares frozen and tuned features on the same images."""

    unfreeze_from: str = Field("block14", description="First Xception stage to train (models.xception.Xception.STAGES): block14, block13, middle7 .. middle0, entry (all).")
    steps: int = Field(60, ge=1, description="Optimiser steps per fine-tune (one per fold, plus the final one).")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate of the encoder stages.")
    head_lr: float = Field(1e-3, gt=0, description="Learning rate of the linear head used while fine-tuning.")
    weight_decay: float = Field(0.01, ge=0)
    max_per_tag: int | None = Field(150, ge=1, description="Images per source/view (seeded sample) used for fine-tuning and its before/after; None = all.")
    augment: bool = Field(True, description="Random flips and 90-degree rotations (orientation carries no modality information).")
    embed_batch_size: int = Field(32, ge=1)
    encoder_id: str = Field("modality-encoder", description="Id stored in the encoder delta and registered next to the head.")

    @field_validator("unfreeze_from")
    @classmethod
    def _known_stage(cls, v: str) -> str:
        from models.xception import Xception

        if v not in Xception.STAGES:
            raise ValueError(f"unknown Xception stage {v!r}; valid: {list(Xception.STAGES)}")
        return v


class Config(TrainConfig):
    """Modality head: class-balanced logistic regression + PCA-centroid OOD detector."""

    c: float = Field(0.01, gt=0, description="Inverse L2 regularisation of the logistic head.")
    max_iter: int = Field(2000, ge=10, description="L-BFGS iterations.")
    n_synthetic: int = Field(60, ge=1, description="Synthetic non-skin images per kind (8 kinds); features cached as synthetic_<n>.npz in feature_dir.")
    synthetic_seed: int = Field(0, ge=0, description="Seed of the synthetic image generator.")
    ood_quantile: float = Field(0.995, gt=0, le=1, description="OOD threshold = this quantile of held-out in-distribution distances.")
    pca_dim: int = Field(32, ge=1, description="Dimensions of the OOD detector's PCA space (capped by the data size).")
    dermoscopy_sources: list[str] = Field(["ham10000", "derm7pt", "isic2018_val"], min_length=1, description="Dermoscopy feature sources; fold k holds out source k (mod n_folds) whole.")
    clinical_views: list[str] = Field(["masked", "crop50"], min_length=1, description="DermNet views used as clinical photos (training.views: full, masked, crop50).")
    dermoscopy_views: list[str] = Field(["full"], min_length=1, description="Views of each dermoscopy image trained on (training.views: full, centre70, centre50, colour). "
                                        "The extra views are held out with their source and reported per view; the headline held-out accuracy counts the full "
                                        "images only, so it stays comparable across settings.")
    histology: bool = Field(True, description="Include the histology tiles (not skin: they teach the histopathology class only).")
    histology_views: list[str] = Field(["full"], min_length=1, description="Views of each histology tile trained on (training.views: full, colour); "
                                       "held out with their slide; the headline accuracy counts the full tiles only.")
    n_folds: int = Field(3, ge=2, description="Held-out-source folds.")
    data: Path | None = Field(
        None,
        description="Extra labelled images: CSV/JSONL with columns image (path) and label (one of the four classes); features and "
        "statistics are extracted on the fly (cached in feature_dir). Held out by content of the path hash, like the other groups.",
    )
    image_root: Path | None = Field(None, description="Folder the image paths in `data` are relative to (default: the file's folder).")
    compare_with: str | None = Field(default_factory=lambda: AgentConfig().modality.head, description="Registry id of the shipped head (the agent's modality.head) for the before/after table.")
    artifact_id: str = Field("modality-head", description="Id stored in the artifact's metadata (shown in the agent's trace).")
    inputs: Literal["lesion-encoder", "imagenet-stages"] = Field(
        "lesion-encoder",
        description="What the head reads: the lesion encoder's features + colour/texture statistics (the modality head), or the frozen "
        "ImageNet EfficientNet-Lite0's pooled features and stage statistics (the modality probe, models.probe; never fitted to any "
        "skin data set, so an unseen source looks less foreign to it). ImageNet features are computed from the images and cached "
        "in feature_dir.",
    )
    finetune: EncoderFinetune | None = Field(None, description="Also fine-tune the encoder (None: a head on the shared encoder's cached features).")
    encoder_artifact: Path | None = Field(None, description="With finetune: where to copy the encoder delta the agent loads (modality.encoder).")

    @model_validator(mode="after")
    def _finetune_reads_the_encoder(self) -> "Config":
        if self.finetune is not None and self.inputs != "lesion-encoder":
            raise ValueError(f"finetune fine-tunes the lesion encoder; it needs inputs: lesion-encoder (got {self.inputs})")
        return self


def _stats_for(source: str, view: str, ids: np.ndarray, feature_dir: Path, root: Path | None = None) -> np.ndarray:
    """Colour/texture statistics of each image (cached next to the features)."""
    from PIL import Image

    from models.image_stats import image_stats
    from models.paths import data_dir
    from training.views import make_view

    path = Path(feature_dir) / f"stats_{source}__{view}.npz"
    if path.exists():
        z = np.load(path)
        if list(z["ids"].astype(str)) == list(ids):
            return z["stats"]
    root = root if root is not None else data_dir() / source
    stats = np.stack([image_stats(make_view(Image.open(root / i).convert("RGB"), view)) for i in ids])
    np.savez(path, ids=ids, stats=stats)
    return stats


def _synthetic(n_per_kind: int, feature_dir: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from models.image_stats import image_stats
    from models.sklesion import SklesionClassifier
    from training.synthetic import generate

    path = Path(feature_dir) / (f"synthetic_{n_per_kind}.npz" if seed == 0 else f"synthetic_{n_per_kind}_s{seed}.npz")
    if path.exists():
        z = np.load(path)
        return z["x"], z["groups"]
    items = generate(n_per_kind, seed)
    clf = SklesionClassifier()
    feats = np.concatenate([clf.predict([im for _, im in items[i : i + 32]]).features for i in range(0, len(items), 32)])
    stats = np.stack([image_stats(im) for _, im in items])
    x = np.concatenate([feats, stats], axis=1).astype(np.float32)
    groups = np.array([k for k, _ in items])
    np.savez(path, x=x, groups=groups)
    return x, groups


def build_dataset(cfg: Config):
    """X, y, group (held out together), tag (source/view) and image ref (see ``load_image``) for every
    training image, in a fixed order."""
    from training.data import load_features, read_table, source_table, user_features

    xs, ys, groups, tags, refs = [], [], [], [], []

    def add(source, view, label, group_of):
        f = load_features(source, view, cfg.feature_dir)
        stats = _stats_for(source, view, f["ids"], cfg.feature_dir)
        xs.append(np.concatenate([f["features"], stats], axis=1))
        ys.extend([label] * len(f["ids"]))
        groups.extend(group_of(i) for i in f["ids"])
        tags.extend([f"{source}:{view}"] * len(f["ids"]))
        refs.extend(f"data:{source}:{view}:{i}" for i in f["ids"])

    k = cfg.n_folds
    for src in cfg.dermoscopy_sources:
        for view in cfg.dermoscopy_views:
            add(src, view, "dermoscopy", lambda i, s=src: f"dermoscopy:{s}")
    dermnet_label = {r["image"]: r["label"] for r in source_table("dermnet")}
    dn_classes = sorted(set(dermnet_label.values()))
    for view in cfg.clinical_views:
        add("dermnet", view, "clinical", lambda i: f"clinical:{dn_classes.index(dermnet_label[i]) % k}")
    if cfg.histology:
        histo_src = {r["image"]: r["source"] for r in source_table("histology")}
        histo_slides = sorted(set(histo_src.values()))
        for view in cfg.histology_views:
            add("histology", view, "histopathology", lambda i: f"histology:{histo_slides.index(histo_src[i]) % k}")
    sx, sg = _synthetic(cfg.n_synthetic, cfg.feature_dir, cfg.synthetic_seed)
    xs.append(sx)
    ys.extend(["not_skin"] * len(sx))
    groups.extend(f"synthetic:{g}" for g in sg)
    tags.extend(["synthetic"] * len(sx))
    refs.extend(f"synthetic:{cfg.n_synthetic}:{cfg.synthetic_seed}:{j}" for j in range(len(sx)))
    if cfg.data is not None:
        rows = read_table(cfg.data)
        bad = sorted({r.get("label", "") for r in rows} - set(CLASSES))
        if bad:
            raise ValueError(f"{cfg.data}: labels must be one of {CLASSES}; got {bad}")
        root = cfg.image_root or cfg.data.parent
        paths = [root / r["image"] for r in rows]
        f = user_features(paths, cfg.feature_dir)
        stats = _stats_for("user_" + hashlib.sha256("\n".join(f["ids"]).encode()).hexdigest()[:16], "full", f["ids"], cfg.feature_dir, root=Path("/"))
        xs.append(np.concatenate([f["features"], stats], axis=1))
        ys.extend(r["label"] for r in rows)
        groups.extend(f"user:{int(hashlib.sha1(str(p).encode()).hexdigest()[:8], 16) % k}" for p in paths)
        tags.extend(["user"] * len(rows))
        refs.extend(f"user:{i}" for i in f["ids"])
    return np.concatenate(xs).astype(np.float32), np.array(ys), np.array(groups), np.array(tags), np.array(refs)


def imagenet_features(refs: np.ndarray, feature_dir: Path, device: str = "cpu") -> np.ndarray:
    """(N, 2688) ImageNet pooled features and stage statistics (:class:`models.probe.ImageNetEncoder`) of the images
    ``refs`` point at (:func:`load_image`), cached by ref in ``feature_dir/imagenet_stages__modality.npz`` (a killed run
    resumes)."""
    from training.data import imagenet_feature_cache

    return imagenet_feature_cache([str(r) for r in refs], load_image, Path(feature_dir) / "imagenet_stages__modality.npz", stages=True, device=device)


HEAD_NOTES = "Clinical / dermoscopy / histopathology / not-skin head on sklesion features + colour/texture statistics, with an OOD reject."
PROBE_NOTES = ("Clinical / dermoscopy / histopathology / not-skin probe on the frozen ImageNet EfficientNet-Lite0's pooled features and stage "
               "statistics (models.probe.FeatureProbe); the agent combines it with the modality head (modality.imagenet_probe).")  # fmt: skip
OUTPUTS = {"lesion-encoder": ("modality_head.safetensors", HEAD_NOTES), "imagenet-stages": ("modality_probe.safetensors", PROBE_NOTES)}
"""Per ``Config.inputs``: the weights file the trainer writes and the registry notes of the artifact."""


def head_inputs(cfg: Config, x: np.ndarray, refs: np.ndarray) -> tuple[np.ndarray, str, dict]:
    """The rows the head is fitted on, its ``inputs`` description and extra metadata, for ``cfg.inputs``."""
    if cfg.inputs == "lesion-encoder":
        return x, "sklesion features (2048) + image_stats (38)", {}
    from models.probe import IMAGENET_STAGE_FEATURES, imagenet_blocks, imagenet_inputs
    from training.config import resolve_device

    xi = imagenet_inputs(imagenet_features(refs, cfg.feature_dir, resolve_device(cfg.device)), stages=True)
    return xi, f"EfficientNet-Lite0 ImageNet pooled features + stage statistics ({sum(imagenet_blocks(True))}, each block L2-normalised)", {
        "features": IMAGENET_STAGE_FEATURES}  # fmt: skip


def load_image(ref: str):
    """The RGB image a ``build_dataset`` ref points at (the same view the cached features were computed on)."""
    from PIL import Image

    kind, _, rest = ref.partition(":")
    if kind == "data":
        from models.paths import data_dir
        from training.views import make_view

        source, view, image_id = rest.split(":", 2)
        return make_view(Image.open(data_dir() / source / image_id).convert("RGB"), view)
    if kind == "synthetic":
        n, seed, j = (int(v) for v in rest.split(":"))
        return _synthetic_images(n, seed)[j]
    if kind == "user":
        return Image.open(rest).convert("RGB")
    raise ValueError(f"unknown image ref {ref!r}")


_SYNTH_CACHE: dict[tuple[int, int], list] = {}


def _synthetic_images(n: int, seed: int) -> list:
    from training.synthetic import generate

    if (n, seed) not in _SYNTH_CACHE:
        _SYNTH_CACHE[(n, seed)] = [im for _, im in generate(n, seed)]
    return _SYNTH_CACHE[(n, seed)]


def source_folds(groups: np.ndarray, cfg: Config) -> list[np.ndarray]:
    """Fold k holds out dermoscopy sources k (mod n_folds) and the k-th share of every other modality's groups."""
    k = cfg.n_folds
    derm = [f"dermoscopy:{s}" for s in cfg.dermoscopy_sources]
    synth = sorted({g for g in groups if g.startswith("synthetic:")})
    out = []
    for j in range(k):
        held = {d for i, d in enumerate(derm) if i % k == j} | {f"clinical:{j}", f"histology:{j}", f"user:{j}"} | {s for i, s in enumerate(synth) if i % k == j}
        out.append(np.array([g in held for g in groups]))
    return out


def fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int = 2000):
    """Standardiser and class-balanced logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=c, class_weight="balanced", max_iter=max_iter)
    clf.fit(scaler.transform(x), y)
    return scaler, clf


def _loss(clf, xs: np.ndarray, y: np.ndarray) -> float:
    from sklearn.metrics import log_loss

    return float(log_loss(y, clf.predict_proba(xs), labels=clf.classes_))


def _pca(x_std: np.ndarray, dim: int, seed: int):
    from sklearn.decomposition import PCA

    return PCA(max(1, min(dim, x_std.shape[0] - 1, x_std.shape[1])), random_state=seed).fit(x_std)


def accuracy_by_tag(y, pred, tags) -> dict[str, float]:
    return {t: round(float(np.mean(y[tags == t] == pred[tags == t])), 4) for t in sorted(set(tags))}


def _crossval(features_of_fold, y: np.ndarray, groups: np.ndarray, cfg: Config, log, stage: str = "heads") -> tuple[np.ndarray, np.ndarray]:
    """Held-out-source predictions and OOD distances. ``features_of_fold(k, held)`` gives every row's
    features under fold k's encoder (the same array unless the encoder is fine-tuned per fold)."""
    pred = np.empty(len(y), dtype=object)
    dist_held = np.full(len(y), np.nan)
    for k, held in enumerate(source_folds(groups, cfg)):
        if not held.any() or held.all():
            continue
        x = features_of_fold(k, held)
        scaler, clf = fit(x[~held], y[~held], cfg.c, cfg.max_iter)
        xs = scaler.transform(x[held])
        pred[held] = clf.predict(xs)
        x_tr = scaler.transform(x[~held])
        pca = _pca(x_tr, cfg.pca_dim, cfg.seed)
        z_tr = pca.transform(x_tr)
        # A class absent from this fold's training part (tiny data) has no centroid.
        cents = np.stack([z_tr[y[~held] == c].mean(0) for c in CLASSES if (y[~held] == c).any()])
        z = pca.transform(xs)
        dist_held[held] = np.sqrt(((z[:, None] - cents[None]) ** 2).sum(-1)).min(1)
        log.log(stage=stage, fold=k, n_train=int((~held).sum()), n_heldout=int(held.sum()), train_loss=round(_loss(clf, x_tr, y[~held]), 5),
                heldout_accuracy=round(float(np.mean(pred[held] == y[held])), 4))  # fmt: skip
    return pred, dist_held


def headline_rows(tags: np.ndarray, cfg: Config) -> np.ndarray:
    """Rows the headline accuracy counts: all but the extra views of dermoscopy images and histology tiles
    (``dermoscopy_views`` / ``histology_views`` other than full)."""
    extra = {f"{s}:{v}" for s in cfg.dermoscopy_sources for v in cfg.dermoscopy_views if v != "full"}
    extra |= {f"histology:{v}" for v in cfg.histology_views if v != "full"}
    return np.array([t not in extra for t in tags], bool)


def _heldout_metrics(y: np.ndarray, pred: np.ndarray, tags: np.ndarray, cfg: Config) -> dict:
    from sklearn.metrics import confusion_matrix

    scored = np.array([p is not None for p in pred])
    core = scored & headline_rows(tags, cfg)
    pred_s = pred[scored].astype(str)
    return {
        "heldout_accuracy": round(float(np.mean(y[core] == pred[core].astype(str))), 4),
        "heldout_accuracy_all_views": round(float(np.mean(y[scored] == pred_s)), 4),
        "heldout_accuracy_by_source": accuracy_by_tag(y[scored], pred_s, tags[scored]),
        "confusion_matrix": {"labels": CLASSES, "matrix": confusion_matrix(y[scored], pred_s, labels=CLASSES).tolist()},
        "n": {c: int((y == c).sum()) for c in CLASSES},
        "protocol": f"{cfg.n_folds} folds, each holding out whole dermoscopy dataset(s), 1/{cfg.n_folds} of DermNet classes, of histology slides and of synthetic kinds",
    }


def _fit_headset(x: np.ndarray, y: np.ndarray, dist_held: np.ndarray, cfg: Config, metrics: dict, inputs: str, meta: dict | None = None):
    """The final head on every row plus the OOD detector, thresholded on held-out distances; adds
    ``ood_threshold`` and ``train_loss`` to ``metrics``."""
    from models.heads import Head, HeadSet, OODDetector

    scaler, clf = fit(x, y, cfg.c, cfg.max_iter)
    xs_all = scaler.transform(x)
    pca = _pca(xs_all, cfg.pca_dim, cfg.seed)
    z = pca.transform(xs_all)
    cents = np.stack([z[y == c].mean(0) for c in CLASSES])
    # Threshold from held-out (not training) distances, so in-distribution images are rarely rejected.
    in_dist = (y != "not_skin") & ~np.isnan(dist_held)
    threshold = float(np.quantile(dist_held[in_dist], cfg.ood_quantile)) if in_dist.any() else float("inf")
    order = [list(clf.classes_).index(c) for c in CLASSES]
    head = Head("modality", CLASSES, clf.coef_[order].T.astype(np.float32), clf.intercept_[order].astype(np.float32))
    comps = (pca.components_.T).astype(np.float32)
    # PCA centring is folded into the centroids: score() projects standardised x without subtracting the mean.
    cents_uncentred = cents + (pca.mean_ @ pca.components_.T)[None]
    metrics["ood_threshold"] = threshold
    metrics["train_loss"] = round(_loss(clf, xs_all, y), 5)
    trained_on = f"{'+'.join(cfg.dermoscopy_sources)} {'+'.join(cfg.dermoscopy_views)} (dermoscopy), dermnet {'+'.join(cfg.clinical_views)} (clinical), " + (
        "histology tiles, " if cfg.histology else "") + "synthetic not-skin" + (", user data" if cfg.data else "")  # fmt: skip
    return HeadSet(
        scaler.mean_.astype(np.float32), scaler.scale_.astype(np.float32), {"modality": head}, inputs=inputs,
        ood=OODDetector(comps, cents_uncentred.astype(np.float32), threshold),
        meta={"id": cfg.artifact_id, "C": cfg.c, "metrics": {k: v for k, v in metrics.items() if k != "train_loss"}, "trained_on": trained_on, **(meta or {})},
    )  # fmt: skip


def train(cfg: Config) -> dict:
    """Cross-validate with whole sources held out, fit on everything, compare with the shipped head, save."""
    from training.outputs import MetricsLog, publish, write_registry_fragment

    log = MetricsLog(cfg.out_dir)
    x, y, groups, tags, refs = build_dataset(cfg)
    missing = [c for c in CLASSES if not (y == c).any()]
    if missing:
        raise ValueError(f"no training images for {missing}: check dermoscopy_sources / clinical_views / histology / data")
    if cfg.finetune is not None:
        return train_with_encoder(cfg, x, y, groups, tags, refs, log)
    xh, inputs, meta = head_inputs(cfg, x, refs)
    pred, dist_held = _crossval(lambda k, held: xh, y, groups, cfg, log)
    metrics = _heldout_metrics(y, pred, tags, cfg)
    hs = _fit_headset(xh, y, dist_held, cfg, metrics, inputs=inputs, meta=meta)
    filename, notes = OUTPUTS[cfg.inputs]
    weights = cfg.out_dir / filename
    hs.save(weights)
    (cfg.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.log(event="final", train_loss=metrics["train_loss"], heldout_accuracy=metrics["heldout_accuracy"], ood_threshold=metrics["ood_threshold"])

    before = _before_after(cfg, x, y, tags, hs, metrics, new_x=xh)
    print(before["table"], flush=True)
    published = publish(weights, cfg.artifact, metrics, overwrite=cfg.overwrite_artifact)
    reg = write_registry_fragment(cfg.out_dir, cfg.register_as, weights, role="head", licence=LICENCE, notes=notes)
    return {"metrics": metrics, "before_after": before, "weights": str(weights), "artifact": str(published) if published else None, "registry": str(reg) if reg else None}


def train_with_encoder(cfg: Config, x, y, groups, tags, refs, log, images=None, load_base=None, should_stop=None) -> dict:
    """Fine-tune per fold and once on everything; save the encoder delta and the refitted head.

    ``images``: the inputs of the rows of ``x`` when preloaded (else read through ``refs``);
    ``load_base`` / ``should_stop``: see :func:`training.modality_encoder.finetune_encoder`."""
    from models.finetuned_encoder import save_delta
    from models.registry import get_spec
    from models.resolve import sha256_file
    from training.modality_encoder import BASE_ID, N_FEATURES, embed, finetune_encoder, load_tensors, sample_per_tag
    from training.outputs import publish, registry_entry, table, write_registry_fragment

    ft = cfg.finetune
    sel = sample_per_tag(tags, ft.max_per_tag, cfg.seed)
    x, y, groups, tags, refs = x[sel], y[sel], groups[sel], tags[sel], refs[sel]
    stats = x[:, N_FEATURES:]
    t0 = time.time()
    images = load_tensors(refs, load_image) if images is None else images[sel]
    log.log(event="images_loaded", n=len(refs), seconds=round(time.time() - t0, 1))

    frozen_pred, _ = _crossval(lambda k, held: x, y, groups, cfg, log, stage="frozen")
    frozen = _heldout_metrics(y, frozen_pred, tags, cfg)

    def tuned_features(k, held):
        warm = fit(x[~held], y[~held], cfg.c, cfg.max_iter)
        net = finetune_encoder(images[~held], stats[~held], y[~held], x[~held], warm, cfg, log, stage=f"finetune_fold{k}", load_base=load_base, should_stop=should_stop)
        return np.concatenate([embed(net, images, ft.embed_batch_size), stats], axis=1)

    t_cv = time.time()
    pred, dist_held = _crossval(tuned_features, y, groups, cfg, log, stage="tuned")
    metrics = _heldout_metrics(y, pred, tags, cfg)
    metrics["frozen_heldout_accuracy"] = frozen["heldout_accuracy"]
    metrics["frozen_heldout_accuracy_by_source"] = frozen["heldout_accuracy_by_source"]
    metrics["finetune"] = {**ft.model_dump(), "n_images": int(len(y)), "crossval_seconds": round(time.time() - t_cv, 1)}

    t_final = time.time()
    net = finetune_encoder(images, stats, y, x, fit(x, y, cfg.c, cfg.max_iter), cfg, log, stage="finetune_final", load_base=load_base, should_stop=should_stop)
    xt = np.concatenate([embed(net, images, ft.embed_batch_size), stats], axis=1)
    metrics["finetune"]["final_seconds"] = round(time.time() - t_final, 1)
    delta = save_delta(net.backbone, ft.unfreeze_from, cfg.out_dir / "modality_encoder.safetensors", base_id=BASE_ID,
                       base_sha256=get_spec(BASE_ID).sha256, meta={"id": ft.encoder_id, "task": "modality"})  # fmt: skip
    hs = _fit_headset(xt, y, dist_held, cfg, metrics, inputs=f"{ft.encoder_id} features (2048) + image_stats (38)",
                      meta={"encoder": ft.encoder_id, "encoder_sha256": sha256_file(delta)})  # fmt: skip
    weights = cfg.out_dir / "modality_head.safetensors"
    hs.save(weights)
    (cfg.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.log(event="final", train_loss=metrics["train_loss"], heldout_accuracy=metrics["heldout_accuracy"], frozen_heldout_accuracy=frozen["heldout_accuracy"])

    by_f, by_t = frozen["heldout_accuracy_by_source"], metrics["heldout_accuracy_by_source"]
    rows = [["all", frozen["heldout_accuracy"], metrics["heldout_accuracy"]]] + [[t, by_f.get(t), by_t.get(t)] for t in sorted(set(tags))]
    tbl = (f"Modality, frozen encoder vs encoder fine-tuned from {ft.unfreeze_from} ({ft.steps} steps per fold), held-out-source folds "
           f"on the same {len(y)} sampled images:\n" + table(["source", "frozen encoder", "fine-tuned encoder"], rows))  # fmt: skip
    print(tbl, flush=True)
    before = {"frozen_heldout": frozen["heldout_accuracy"], "new_heldout": metrics["heldout_accuracy"], "rows": rows, "table": tbl,
              "new_is_better": metrics["heldout_accuracy"] > frozen["heldout_accuracy"]}  # fmt: skip

    published = publish(weights, cfg.artifact, metrics, overwrite=cfg.overwrite_artifact)
    enc_published = publish(delta, cfg.encoder_artifact, overwrite=cfg.overwrite_artifact)
    reg = None
    if cfg.register_as:
        enc_entry = registry_entry(cfg.out_dir, ft.encoder_id, delta, role="image_embedder", licence=LICENCE, fmt="xception-delta",
                                   notes=f"sklesion Xception with stages from {ft.unfreeze_from} fine-tuned for the modality task (a delta over {BASE_ID}).")  # fmt: skip
        reg = write_registry_fragment(cfg.out_dir, cfg.register_as, weights, role="head", licence=LICENCE, notes=HEAD_NOTES + f" Needs modality.encoder={ft.encoder_id}.",
                                      extra=[enc_entry])  # fmt: skip
    return {"metrics": metrics, "before_after": before, "weights": str(weights), "encoder": str(delta),
            "artifact": str(published) if published else None, "encoder_artifact": str(enc_published) if enc_published else None,
            "registry": str(reg) if reg else None}  # fmt: skip


def _before_after(cfg: Config, x, y, tags, new, metrics, new_x=None) -> dict:
    """Held-out-source accuracy of the shipped head (as recorded in its metadata by the same protocol)
    vs this run's; plus both final heads applied to this run's images (in-sample for both, since each
    was fitted on every source: a check that the new head is not worse on the data, not a held-out figure).
    ``new_x``: the new head's inputs when they are not the shipped head's (``x``)."""
    from models.heads import HeadSet
    from training.outputs import shipped_path, table

    old_path = shipped_path(cfg.compare_with)
    old = HeadSet.load(old_path) if old_path is not None else None
    rec = (old.meta.get("metrics") or {}) if old is not None else {}

    def direct(hs, x=x):
        p = hs.predict_proba(x)["modality"]
        pred = np.array(hs.heads["modality"].classes)[p.argmax(1)]
        return round(float(np.mean(pred == y)), 4), accuracy_by_tag(y, pred, tags)

    old_all, old_by = direct(old) if old is not None else (None, {})
    new_all, new_by = direct(new, x if new_x is None else new_x)
    rec_by = rec.get("heldout_accuracy_by_source", {})
    rows = [["all", rec.get("heldout_accuracy"), metrics["heldout_accuracy"], old_all, new_all]]
    rows += [[t, rec_by.get(t), metrics["heldout_accuracy_by_source"].get(t), old_by.get(t), new_by.get(t)] for t in sorted(set(tags))]
    tbl = table(["source", "shipped held-out (recorded)", "new held-out", "shipped on these images", "new on these images"], rows)
    tbl = f"Modality head, shipped {cfg.compare_with!r} vs new (held-out-source folds; 'on these images' is in-sample for both):\n{tbl}"
    new_is_better = rec.get("heldout_accuracy") is None or metrics["heldout_accuracy"] > rec["heldout_accuracy"]
    return {"shipped_heldout": rec.get("heldout_accuracy"), "new_heldout": metrics["heldout_accuracy"], "shipped_direct": old_all, "new_direct": new_all,
            "rows": rows, "table": tbl, "new_is_better": new_is_better}  # fmt: skip


if __name__ == "__main__":
    module_main("modality")
