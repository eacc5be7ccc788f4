"""Train the clinical feature probe (:mod:`models.probe`): a logistic regression over the 56 DermNet classes on the
lesion encoder's and EfficientNet-Lite0's ImageNet features (with ``imagenet_stages``, also the mean and standard
deviation of its last four stages' activations), neither network fitted to DermNet.

Fitted on the DermNet case-index photos (the 5/6 outside the held-out sixth), each photo twice: with its watermark
masked and as it is (deployed photos have no watermark; the held-out DermNet photos the agent is evaluated on do).
The inverse regularisation C is chosen by stratified k-fold cross-validation on those photos alone (log-loss of the
unmasked photos, as the stacker reads probabilities); the held-out sixth is only scored, beside the second expert's
DermNet head on the same photos.

    dermgraph train probe --config configs/train/probe.yaml
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from training.cli import module_main
from training.config import TrainConfig

LICENCE = "DermNet NZ images (non-commercial; derived weights inherit the terms)"


class Config(TrainConfig):
    """The clinical feature probe: one logistic head on frozen lesion-encoder + ImageNet features."""

    imagenet_dir: Path = Field(Path(".cache/features_imagenet"), description="Where the ImageNet features of the DermNet photos are cached "
                               "(computed on the first run, ~2 min per view on 2 cores).")
    imagenet_stages: bool = Field(True, description="Also the spatial mean and standard deviation of the ImageNet network's last four stages "
                                  "(models.probe.STAGES; same pass): mid-level texture statistics. False: its pooled head features only.")
    expert_feature_dir: Path | None = Field(Path(".cache/features_effnet"), description="Cached second-expert outputs (dermnet__effnet.npz) "
                                            "for the reference row (its DermNet head on the same held-out photos); None or missing: skipped.")
    train_views: list[Literal["full", "masked", "crop50"]] = Field(["masked", "full"], min_length=1, description="Views of each training "
                                                                   "photo fitted on (training.views: crop50 is the centre half, watermark masked); "
                                                                   "cross-validation scores the unmasked photos ('full') either way.")
    c_grid: list[float] = Field([1.0, 3.0, 10.0, 30.0, 100.0], min_length=1, description="Inverse L2 strengths tried.")
    folds: int = Field(5, ge=2, description="Cross-validation folds over the training photos (stratified by class).")
    max_iter: int = Field(5000, ge=10)
    limit_per_class: int | None = Field(None, ge=2, description="Use at most this many training photos per class (smoke runs).")
    artifact: Path = Field(Path("models/artifacts/dermnet_probe.safetensors"), description="Where the probe is written.")
    artifact_id: str = Field("dermnet-probe", description="Id stored in the artifact (shown in the agent's trace).")


def imagenet_features(rows: list[dict], view: str, cache_dir: Path, stages: bool = False) -> np.ndarray:
    """ImageNet EfficientNet-Lite0 features of the DermNet photos in ``rows`` order (``view``: one of
    :data:`training.views.VIEWS`; ``stages``: :class:`models.probe.ImageNetEncoder`'s), cached as
    ``<cache_dir>/dermnet__imagenet[_stages]_<view>.npz``; photos missing from the cache are computed and added."""
    from PIL import Image

    from models.paths import data_dir
    from training.data import imagenet_feature_cache
    from training.views import VIEWS

    def load(image: str):
        return VIEWS[view](Image.open(data_dir() / "dermnet" / image).convert("RGB"))

    return imagenet_feature_cache([r["image"] for r in rows], load, cache_dir / f"dermnet__imagenet{'_stages' if stages else ''}_{view}.npz",
                                  stages=stages, dtype=np.float16, chunk=32, desc=f"ImageNet features ({view})")  # fmt: skip


def lesion_features(rows: list[dict], view: str, feature_dir: Path) -> np.ndarray:
    """Cached lesion-encoder features of the DermNet photos in ``rows`` order."""
    from training.data import aligned, load_features

    keep, feats = aligned(rows, load_features("dermnet", view, feature_dir))
    if len(keep) != len(rows):
        raise ValueError(f"{feature_dir}/dermnet__{view}.npz lacks {len(rows) - len(keep)} DermNet photos: "
                         "python scripts/extract_features.py --sources dermnet --views full masked")
    return feats["features"]


def fit(x: np.ndarray, y: np.ndarray, c: float, classes: list[str], max_iter: int):
    """The multinomial logistic regression of ``y`` (indices into ``classes``) as a :class:`models.heads.Head`;
    classes absent from ``y`` get a very low bias (never predicted)."""
    from sklearn.linear_model import LogisticRegression

    from models.heads import Head

    clf = LogisticRegression(C=c, max_iter=max_iter).fit(x, y)
    w, b = np.zeros((x.shape[1], len(classes)), np.float32), np.full(len(classes), -30.0, np.float32)
    w[:, clf.classes_], b[clf.classes_] = clf.coef_.T, clf.intercept_
    return Head("dermnet", list(classes), w, b)


def fit_views(x: dict[str, np.ndarray], y: np.ndarray, idx: np.ndarray, c: float, cfg: Config, classes: list[str]):
    """:func:`fit` on the photos ``idx``, each once per training view (``cfg.train_views``)."""
    return fit(np.concatenate([x[v][idx] for v in cfg.train_views]), np.concatenate([y[idx]] * len(cfg.train_views)), c, classes, cfg.max_iter)


def scores(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import log_loss

    from training.encoder import topk

    return {"top1": round(topk(y, p, 1), 4), "top5": round(topk(y, p, 5), 4),
            "log_loss": round(float(log_loss(y, p / p.sum(axis=1, keepdims=True), labels=np.arange(p.shape[1]))), 4)}


def cross_validate(x: dict[str, np.ndarray], y: np.ndarray, cfg: Config, classes: list[str]) -> list[dict]:
    """Per C: out-of-fold scores on the unmasked training photos (each fold fitted on the other folds' photos in every
    training view)."""
    from sklearn.model_selection import StratifiedKFold

    folds = list(StratifiedKFold(cfg.folds, shuffle=True, random_state=cfg.seed).split(x["full"], y))
    table = []
    for c in cfg.c_grid:
        p = np.zeros((len(y), len(classes)))
        for tr, te in folds:
            p[te] = fit_views(x, y, tr, c, cfg, classes).predict_proba(x["full"][te])
        table.append({"C": c, **scores(y, p)})
        print(f"C={c:g}: out-of-fold {table[-1]}", flush=True)
    return table


def train(cfg: Config) -> dict:
    from models.heads import HeadSet
    from models.probe import PROBE_FEATURES, PROBE_STAGE_FEATURES, probe_inputs
    from training.data import is_dermnet_heldout, source_table

    rows = source_table("dermnet")
    classes = sorted({r["label"] for r in rows})
    y_all = np.array([classes.index(r["label"]) for r in rows])
    held = np.array([is_dermnet_heldout(r["sha1"]) for r in rows])
    train_idx = np.flatnonzero(~held)
    if cfg.limit_per_class:
        train_idx = np.concatenate([train_idx[y_all[train_idx] == k][: cfg.limit_per_class] for k in range(len(classes))])
    use = np.sort(np.concatenate([train_idx, np.flatnonzero(held)]))
    rows, y_all, held = [rows[i] for i in use], y_all[use], held[use]
    views = sorted({*cfg.train_views, "full"})
    stages = cfg.imagenet_stages
    x = {v: probe_inputs(lesion_features(rows, v, cfg.feature_dir), imagenet_features(rows, v, cfg.imagenet_dir, stages), stages) for v in views}
    tr = ~held
    cv = cross_validate({v: x[v][tr] for v in views}, y_all[tr], cfg, classes)
    best = min(cv, key=lambda r: r["log_loss"])
    head = fit_views(x, y_all, np.flatnonzero(tr), best["C"], cfg, classes)
    heldout = {"probe": scores(y_all[held], head.predict_proba(x["full"][held]))}
    ref = cfg.expert_feature_dir / "dermnet__effnet.npz" if cfg.expert_feature_dir else None
    if ref is not None and ref.exists():
        z = np.load(ref, allow_pickle=False)
        index = {i: n for n, i in enumerate(z["ids"].astype(str))}
        if all(r["image"] in index for r in rows):
            heldout["second_expert_dermnet_head"] = scores(y_all[held], z["probs_dermnet"][[index[r["image"]] for r in rows]][held].astype(np.float64))
    kind = PROBE_STAGE_FEATURES if stages else PROBE_FEATURES
    meta = {"id": cfg.artifact_id, "features": kind, "C": best["C"], "licence": LICENCE,
            "trained_on": f"DermNet case-index photos ({int(tr.sum())}; views {', '.join(cfg.train_views)}), C by {cfg.folds}-fold CV log-loss",
            "heldout": heldout}  # fmt: skip
    d = x["full"].shape[1]
    hs = HeadSet(np.zeros(d, np.float32), np.ones(d, np.float32), {"dermnet": head}, inputs=kind, meta=meta)
    from training.outputs import announce_overwrite, shipped_target

    target, replaced_id = shipped_target(cfg.artifact, cfg.out_dir, cfg.overwrite_artifact)
    target.parent.mkdir(parents=True, exist_ok=True)
    hs.save(target)
    metrics = {"cv": cv, "selected_C": best["C"], "heldout": heldout, "n_train": int(tr.sum()), "n_heldout": int(held.sum()), "classes": len(classes)}
    (cfg.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    target.with_suffix(".metrics.json").write_text(json.dumps(metrics, indent=2))
    if replaced_id:
        announce_overwrite(replaced_id, target)
    print(f"held-out sixth ({int(held.sum())} photos): {heldout}")
    return {"artifact": str(target), **metrics}


if __name__ == "__main__":  # pragma: no cover
    module_main("probe")
