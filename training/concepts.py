"""Train the seven Derm7pt concept heads (multi-class per criterion, class-balanced) on encoder features.

Trained on Derm7pt ``train`` + ``extra``, regularisation selected per criterion on ``val`` by macro-F1;
the summary compares the shipped heads with the new ones on the same ``val`` images.

    dermgraph train concepts --config configs/train/concepts.yaml
    python -m training.concepts --config configs/train/concepts_smoke.yaml --set feature_dir=/tmp/features
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from agent.config import AgentConfig
from evals.metrics import criteria_metrics
from models.heads import FEATURE_KINDS
from models.vocabulary import SEVEN_POINT
from training.cli import module_main
from training.config import TrainConfig

C_GRID = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)
INPUTS = {"lesion-encoder": "sklesion features (2048)", "second-expert": "second visual expert features (1280)"}
LICENCE = "CC-BY-NC-ND-4.0 (derived from Derm7pt)"


class Config(TrainConfig):
    """Concept heads: one logistic head per 7-point criterion on the encoder's pooled features."""

    data: Path | None = Field(
        None,
        description="Your own CSV/JSONL instead of Derm7pt: columns image (path), split (train/val; default train) and the seven "
        "criterion columns. Features are extracted on the fly with the sklesion encoder and cached in feature_dir.",
    )
    image_root: Path | None = Field(None, description="Folder the image paths in `data` are relative to (default: the file's folder).")
    train_splits: list[str] = Field(["train", "extra"], description="Splits the heads are fitted on.")
    val_split: str = Field("val", description="Split that selects C per criterion and that the before/after table is computed on.")
    c_grid: list[float] = Field(list(C_GRID), min_length=1, description="Inverse L2 strengths tried per criterion.")
    class_weight: Literal["balanced"] | None = Field("balanced", description="'balanced' reweights rare criterion values.")
    max_iter: int = Field(3000, ge=10, description="L-BFGS iterations of each logistic fit.")
    min_confidence: float = Field(0.5, ge=0, le=1, description="Stored in the artifact: findings below this are verbalised as uncertain.")
    compare_with: str | None = Field(default_factory=lambda: AgentConfig().morphology.heads, description="Registry id of the shipped heads (the agent's morphology.heads) for the before/after table.")
    artifact_id: str = Field("derm7pt-concept-heads", description="Id stored in the artifact's metadata (shown in the agent's trace).")
    features: Literal[FEATURE_KINDS] = Field(
        "lesion-encoder",
        description="Whose pooled features the heads read: the lesion encoder's (feature_dir) or the second visual expert's "
        "(expert_feature_dir, `python -m training.eval_encoder features`; Derm7pt only). Stored in the artifact; the agent feeds it the same.",
    )
    expert_feature_dir: Path = Field(Path(".cache/features_effnet"), description="Cached second-expert features (<source>__effnet.npz).")


def fit_criterion(name: str, x: np.ndarray, y: np.ndarray, c: float, class_weight: str | None = "balanced", max_iter: int = 3000):
    """One softmax :class:`models.heads.Head` and its train log-loss; a criterion with a single value in
    ``y`` (tiny or cross-fitting folds) becomes a constant head instead of failing."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    from models.heads import Head

    classes = sorted({str(v) for v in y})
    if len(classes) == 1:
        return Head(name, classes, np.zeros((x.shape[1], 1), np.float32), np.zeros(1, np.float32)), 0.0
    clf = LogisticRegression(C=c, class_weight=class_weight, max_iter=max_iter).fit(x, y)
    weight, bias = clf.coef_.T, clf.intercept_
    if len(clf.classes_) == 2:  # sklearn's binary LR has one column: expand to a 2-way softmax
        weight = np.stack([-weight[:, 0] / 2, weight[:, 0] / 2], axis=1)
        bias = np.array([-bias[0] / 2, bias[0] / 2])
    head = Head(name, [str(k) for k in clf.classes_], weight.astype(np.float32), bias.astype(np.float32))
    return head, float(log_loss(y, head.predict_proba(x), labels=head.classes))


def predict_values(head, x_std: np.ndarray) -> list[str]:
    return [head.classes[i] for i in head.predict_proba(x_std).argmax(1)]


def fit_heads(features: np.ndarray, truth: dict[str, np.ndarray], cs: dict[str, float], class_weight: str | None = "balanced", max_iter: int = 3000):
    """A :class:`models.heads.HeadSet` of every criterion in ``truth`` with fixed C per criterion
    (standardiser fitted on ``features``). Used for cross-fitting by training.verifier."""
    from sklearn.preprocessing import StandardScaler

    from models.heads import HeadSet

    scaler = StandardScaler().fit(features)
    x = scaler.transform(features)
    heads = {crit: fit_criterion(crit, x, y, cs[crit], class_weight, max_iter)[0] for crit, y in truth.items()}
    return HeadSet(scaler.mean_.astype(np.float32), scaler.scale_.astype(np.float32), heads, inputs="sklesion features (2048)")


def derm7pt_features(kind: str, cfg: Config) -> tuple[list[dict[str, str]], np.ndarray]:
    """Derm7pt rows and the cached pooled features of ``kind`` ('lesion-encoder' or 'second-expert')."""
    from training.data import aligned, load_features, source_table

    if kind == "second-expert":
        rows, f = aligned(source_table("derm7pt"), load_features("derm7pt", "effnet", cfg.expert_feature_dir))
    else:
        rows, f = aligned(source_table("derm7pt"), load_features("derm7pt", feature_dir=cfg.feature_dir))
    return rows, f["features"]


def load_rows(cfg: Config) -> tuple[list[dict[str, str]], np.ndarray]:
    """Rows with criteria and split, and their encoder features (Derm7pt from the cache, or ``cfg.data``)."""
    from training.data import read_table, user_features

    if cfg.data is None:
        return derm7pt_features(cfg.features, cfg)
    if cfg.features != "lesion-encoder":
        raise ValueError("features: second-expert reads the cached second-expert features of Derm7pt; with `data`, use features: lesion-encoder")
    rows = read_table(cfg.data)
    root = cfg.image_root or cfg.data.parent
    missing = [c for c in ("image", *SEVEN_POINT) if c not in rows[0]]
    if missing:
        raise ValueError(f"{cfg.data}: missing columns {missing}")
    for r in rows:
        r["split"] = r.get("split") or "train"
    f = user_features([root / r["image"] for r in rows], cfg.feature_dir)
    return rows, f["features"]


def train(cfg: Config) -> dict:
    """Fit the heads, select C per criterion on val, compare with the shipped heads, save."""
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import StandardScaler

    from models.heads import HeadSet
    from training.outputs import MetricsLog, publish, shipped_path, table, write_registry_fragment

    log = MetricsLog(cfg.out_dir)
    rows, feats = load_rows(cfg)
    split = np.array([r["split"] for r in rows])
    tr, va = np.isin(split, cfg.train_splits), split == cfg.val_split
    if not tr.any() or not va.any():
        raise ValueError(f"need rows in {cfg.train_splits} and in {cfg.val_split!r}; got splits {sorted(set(split))}")
    scaler = StandardScaler().fit(feats[tr])
    x = scaler.transform(feats)
    heads, chosen, truth, pred, majority = {}, {}, {}, {}, {}
    for crit in SEVEN_POINT:
        y = np.array([r[crit] for r in rows])
        best = None
        for c in cfg.c_grid:
            head, loss = fit_criterion(crit, x[tr], y[tr], c, cfg.class_weight, cfg.max_iter)
            p = predict_values(head, x[va])
            f1 = float(f1_score(y[va], p, average="macro", zero_division=0))  # unrounded: ties are broken as before the refactor
            log.log(criterion=crit, C=c, train_loss=round(loss, 5), val_accuracy=round(float(np.mean(y[va] == np.array(p))), 4), val_macro_f1=round(f1, 4))
            if best is None or f1 > best[0]:
                best = (f1, c, head, p)
        _, chosen[crit], heads[crit], pred[crit] = best
        truth[crit] = list(y[va])
        values, counts = np.unique(y[tr], return_counts=True)
        majority[crit] = [values[counts.argmax()]] * int(va.sum())
    metrics = {
        "val": criteria_metrics(truth, pred),
        "val_majority_baseline": criteria_metrics(truth, majority),
        "C": chosen,
        "n_train": int(tr.sum()),
        "n_val": int(va.sum()),
    }
    source = "your data" if cfg.data is not None else "Derm7pt"
    hs = HeadSet(scaler.mean_.astype(np.float32), scaler.scale_.astype(np.float32), heads, inputs=INPUTS[cfg.features],
                 meta={"id": cfg.artifact_id, "min_confidence": cfg.min_confidence, "metrics": metrics, "features": cfg.features,
                       "trained_on": f"{source} {'+'.join(cfg.train_splits)} (Derm7pt: CC BY-NC-ND 4.0), selected on {cfg.val_split}"})  # fmt: skip
    weights = cfg.out_dir / "concepts.safetensors"
    hs.save(weights)
    (cfg.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.log(event="final", **{f"val_{k}": v for k, v in metrics["val"]["mean"].items()})

    # Before/after on the same val rows: the heads the agent ships vs the new ones.
    before = None
    old = shipped_path(cfg.compare_with)
    if old is not None:
        shipped = HeadSet.load(old)
        x_old = feats
        if shipped.feature_kind != cfg.features:  # the shipped heads read other features: theirs, for the same val rows
            if cfg.data is not None:
                raise ValueError(f"compare_with {cfg.compare_with!r} reads {shipped.feature_kind} features; with `data` compare with heads on the lesion encoder's")
            other_rows, other = derm7pt_features(shipped.feature_kind, cfg)
            where = {r["image"]: i for i, r in enumerate(other_rows)}
            x_old = other[[where[r["image"]] for r in rows]]
        probs = shipped.predict_proba(x_old[va])
        before = criteria_metrics(truth, {c: [shipped.heads[c].classes[i] for i in p.argmax(1)] for c, p in probs.items() if c in truth})
    after = metrics["val"]
    rows_t = [[c, *(before[c][m] if before else None for m in ("accuracy", "macro_f1")), after[c]["accuracy"], after[c]["macro_f1"]] for c in [*SEVEN_POINT, "mean"]]
    tbl = table(["criterion", "shipped acc", "shipped macro-F1", "new acc", "new macro-F1"], rows_t)
    print(f"Concept heads on {source} {cfg.val_split} (n={int(va.sum())}), shipped {cfg.compare_with!r} vs new:\n{tbl}", flush=True)
    better = before is None or after["mean"]["macro_f1"] > before["mean"]["macro_f1"]
    published = publish(weights, cfg.artifact, metrics, overwrite=cfg.overwrite_artifact)
    reg = write_registry_fragment(cfg.out_dir, cfg.register_as, weights, role="head", licence=LICENCE,
                                  notes=f"Seven 7-point concept heads on {INPUTS[cfg.features]} ({source} {'+'.join(cfg.train_splits)}, selected on {cfg.val_split}).")  # fmt: skip
    return {
        "metrics": metrics,
        "before_after": {"shipped": before, "new": after, "table": tbl, "new_is_better": better},
        "weights": str(weights),
        "artifact": str(published) if published else None,
        "registry": str(reg) if reg else None,
    }


if __name__ == "__main__":
    module_main("concepts")
