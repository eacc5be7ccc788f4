"""Train the modality head: clinical / dermoscopy / histopathology / not_skin.

Inputs are the lesion encoder's pooled features plus colour/texture statistics. Validation holds
whole sources out (a dermoscopy dataset, a third of DermNet's classes, a third of the histology
slides, a third of the synthetic kinds per fold), and also reports tight crops of clinical photos,
which look like dermoscopy close-ups to a HAM10000-trained encoder.

    python -m training.modality --out models/artifacts/modality_head.safetensors
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer

from training.data import FEATURE_DIR, load_features, source_table

CLASSES = ["clinical", "dermoscopy", "histopathology", "not_skin"]
app = typer.Typer(add_completion=False)


def _stats_for(source: str, view: str, ids: np.ndarray) -> np.ndarray:
    """Colour/texture statistics of each image (cached next to the features)."""
    from PIL import Image

    from models.image_stats import image_stats
    from models.paths import data_dir
    from training.views import make_view

    path = FEATURE_DIR / f"stats_{source}__{view}.npz"
    if path.exists():
        z = np.load(path)
        if list(z["ids"].astype(str)) == list(ids):
            return z["stats"]
    root = data_dir() / source
    stats = np.stack([image_stats(make_view(Image.open(root / i).convert("RGB"), view)) for i in ids])
    np.savez(path, ids=ids, stats=stats)
    return stats


def _synthetic(n_per_kind: int) -> tuple[np.ndarray, np.ndarray]:
    from models.image_stats import image_stats
    from models.sklesion import SklesionClassifier
    from training.synthetic import generate

    path = FEATURE_DIR / f"synthetic_{n_per_kind}.npz"
    if path.exists():
        z = np.load(path)
        return z["x"], z["groups"]
    items = generate(n_per_kind)
    clf = SklesionClassifier()
    feats = np.concatenate([clf.predict([im for _, im in items[i : i + 32]]).features for i in range(0, len(items), 32)])
    stats = np.stack([image_stats(im) for _, im in items])
    x = np.concatenate([feats, stats], axis=1).astype(np.float32)
    groups = np.array([k for k, _ in items])
    np.savez(path, x=x, groups=groups)
    return x, groups


def build_dataset(n_synthetic: int = 60):
    """X, y, group (held out together), tag (source/view) for every training image."""
    xs, ys, groups, tags = [], [], [], []

    def add(source, view, label, group_of):
        f = load_features(source, view)
        stats = _stats_for(source, view, f["ids"])
        xs.append(np.concatenate([f["features"], stats], axis=1))
        ys.extend([label] * len(f["ids"]))
        groups.extend(group_of(i) for i in f["ids"])
        tags.extend([f"{source}:{view}"] * len(f["ids"]))

    dermnet_label = {r["image"]: r["label"] for r in source_table("dermnet")}
    dn_classes = sorted(set(dermnet_label.values()))
    histo_src = {r["image"]: r["source"] for r in source_table("histology")}
    histo_slides = sorted(set(histo_src.values()))
    for src in ("ham10000", "derm7pt", "isic2018_val"):
        add(src, "full", "dermoscopy", lambda i, s=src: f"dermoscopy:{s}")
    for view in ("masked", "crop50"):
        add("dermnet", view, "clinical", lambda i: f"clinical:{dn_classes.index(dermnet_label[i]) % 3}")
    add("histology", "full", "histopathology", lambda i: f"histology:{histo_slides.index(histo_src[i]) % 3}")
    sx, sg = _synthetic(n_synthetic)
    xs.append(sx)
    ys.extend(["not_skin"] * len(sx))
    groups.extend(f"synthetic:{g}" for g in sg)
    tags.extend(["synthetic"] * len(sx))
    return np.concatenate(xs).astype(np.float32), np.array(ys), np.array(groups), np.array(tags)


def _folds(groups: np.ndarray) -> list[np.ndarray]:
    """3 folds; each holds out one dermoscopy source and a third of every other modality's groups."""
    derm = ["dermoscopy:ham10000", "dermoscopy:derm7pt", "dermoscopy:isic2018_val"]
    synth = sorted({g for g in groups if g.startswith("synthetic:")})
    out = []
    for k in range(3):
        held = {derm[k], f"clinical:{k}", f"histology:{k}"} | {s for j, s in enumerate(synth) if j % 3 == k}
        out.append(np.array([g in held for g in groups]))
    return out


def fit(x: np.ndarray, y: np.ndarray, c: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=c, class_weight="balanced", max_iter=2000)
    clf.fit(scaler.transform(x), y)
    return scaler, clf


@app.command()
def main(
    out: Path = typer.Option(Path("models/artifacts/modality_head.safetensors")),
    c: float = typer.Option(0.01, help="Inverse L2 regularisation of the logistic head."),
    n_synthetic: int = typer.Option(60, help="Synthetic non-skin images per kind."),
    ood_quantile: float = typer.Option(0.995),
    report: Path = typer.Option(Path("models/artifacts/modality_head.metrics.json")),
):
    """Cross-validate with whole sources held out, then fit on everything and save the head."""
    from sklearn.decomposition import PCA
    from sklearn.metrics import accuracy_score, confusion_matrix

    from models.heads import Head, HeadSet, OODDetector

    x, y, groups, tags = build_dataset(n_synthetic)
    pred = np.empty(len(y), dtype=object)
    dist_held = np.zeros(len(y))
    for held in _folds(groups):
        scaler, clf = fit(x[~held], y[~held], c)
        xs = scaler.transform(x[held])
        pred[held] = clf.predict(xs)
        pca = PCA(32, random_state=0).fit(scaler.transform(x[~held]))
        z_tr = pca.transform(scaler.transform(x[~held]))
        cents = np.stack([z_tr[y[~held] == k].mean(0) for k in CLASSES])
        z = pca.transform(xs)
        dist_held[held] = np.sqrt(((z[:, None] - cents[None]) ** 2).sum(-1)).min(1)
    per_tag = {t: round(float(accuracy_score(y[tags == t], pred[tags == t])), 4) for t in sorted(set(tags))}
    metrics = {
        "heldout_accuracy": round(float(accuracy_score(y, pred)), 4),
        "heldout_accuracy_by_source": per_tag,
        "confusion_matrix": {"labels": CLASSES, "matrix": confusion_matrix(y, pred, labels=CLASSES).tolist()},
        "n": {k: int((y == k).sum()) for k in CLASSES},
        "protocol": "3 folds, each holding out one whole dermoscopy dataset, 1/3 of DermNet classes, 1/3 of histology slides, 1/3 of synthetic kinds",
    }

    scaler, clf = fit(x, y, c)
    pca = PCA(32, random_state=0).fit(scaler.transform(x))
    z = pca.transform(scaler.transform(x))
    cents = np.stack([z[y == k].mean(0) for k in CLASSES])
    # Threshold from held-out (not training) distances, so in-distribution images are rarely rejected.
    threshold = float(np.quantile(dist_held[y != "not_skin"], ood_quantile))
    order = [list(clf.classes_).index(k) for k in CLASSES]
    head = Head("modality", CLASSES, clf.coef_[order].T.astype(np.float32), clf.intercept_[order].astype(np.float32))
    comps = (pca.components_.T).astype(np.float32)
    # PCA centring is folded into the centroids: score() projects standardised x without subtracting the mean.
    cents_uncentred = cents + (pca.mean_ @ pca.components_.T)[None]
    hs = HeadSet(
        scaler.mean_.astype(np.float32), scaler.scale_.astype(np.float32), {"modality": head}, inputs="sklesion features (2048) + image_stats (38)",
        ood=OODDetector(comps, cents_uncentred.astype(np.float32), threshold),
        meta={"id": "modality-head", "C": c, "metrics": metrics, "trained_on": "ham10000+derm7pt+isic2018_val (dermoscopy), dermnet masked+crop50 (clinical), histology tiles, synthetic not-skin"},
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    hs.save(out)
    metrics["ood_threshold"] = threshold
    report.write_text(json.dumps(metrics, indent=2))
    typer.echo(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    app()
