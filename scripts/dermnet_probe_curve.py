"""How DermNet accuracy grows with training photos per class: a logistic-regression probe on frozen features (the
Xception's, EfficientNet-Lite0's ImageNet features, the shipped expert's pooled features) fitted on n training photos
of each class (the 5/6 outside the held-out sixth, repeated random draws) and scored on the held-out sixth.

Needs the feature caches (``python scripts/extract_features.py --sources dermnet``; ``python -m training.eval_encoder
features --weights models/artifacts/efficientnet_lite0_derm.safetensors --feature-dir .cache/features_effnet``).

    python scripts/dermnet_probe_curve.py [--shots 5 10 15 20 25] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def draw(y: np.ndarray, pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``n`` random members of ``pool`` per class of ``y`` (all of a class that has fewer)."""
    return np.concatenate([rng.permutation(pool[y[pool] == c])[:n] for c in np.unique(y[pool])])


def curve(x: np.ndarray, y: np.ndarray, held: np.ndarray, shots: list[int], repeats: int, seed: int = 0) -> list[dict]:
    """Held-out top-1 / top-5 (mean over ``repeats`` draws) of a probe fitted on ``n`` photos per class, per n."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import normalize

    from training.encoder import topk

    x, rng, pool, out = normalize(x), np.random.default_rng(seed), np.flatnonzero(~held), []
    for n in shots:
        t1, t5 = [], []
        for _ in range(repeats):
            pick = draw(y, pool, n, rng)
            clf = LogisticRegression(C=10.0, max_iter=3000).fit(x[pick], y[pick])
            p = np.zeros((int(held.sum()), int(y.max()) + 1))
            p[:, clf.classes_] = clf.predict_proba(x[held])  # columns by class index (a class never drawn scores 0)
            t1.append(topk(y[held], p, 1))
            t5.append(topk(y[held], p, 5))
        out.append({"per_class": n, "top1": round(float(np.mean(t1)), 3), "top5": round(float(np.mean(t5)), 3), "top1_sd": round(float(np.std(t1)), 3)})
    return out


def _features(rows: list[dict], view: str, feature_dir: Path) -> np.ndarray:
    """Cached features (``<feature_dir>/dermnet__<view>.npz``) of every DermNet photo, in ``rows`` order."""
    from training.data import aligned, load_features

    keep, feats = aligned(rows, load_features("dermnet", view, feature_dir))
    if len(keep) != len(rows):
        raise ValueError(f"{feature_dir}/dermnet__{view}.npz lacks {len(rows) - len(keep)} of the DermNet photos: rerun the command in this script's docstring")
    return feats["features"]


def _imagenet_features(rows: list[dict]) -> np.ndarray:
    import torch
    from PIL import Image

    from models.efficientnet import create_backbone, to_tensor
    from models.paths import data_dir
    from training.views import mask_dermnet_watermark

    net, out = create_backbone(pretrained=True).eval(), []
    with torch.inference_mode():
        for lo in range(0, len(rows), 32):
            imgs = [mask_dermnet_watermark(Image.open(data_dir() / "dermnet" / r["image"]).convert("RGB")) for r in rows[lo : lo + 32]]
            out.append(net.forward_head(net.forward_features(to_tensor(imgs, 224)), pre_logits=True).numpy())
    return np.concatenate(out)


def main() -> None:
    from training.data import is_dermnet_heldout, source_table

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shots", type=int, nargs="+", default=[5, 10, 15, 20, 25])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--feature-dir", type=Path, default=Path(".cache/features"))
    ap.add_argument("--expert-feature-dir", type=Path, default=Path(".cache/features_effnet"))
    a = ap.parse_args()
    rows = source_table("dermnet")
    classes = sorted({r["label"] for r in rows})
    y = np.array([classes.index(r["label"]) for r in rows])
    held = np.array([is_dermnet_heldout(r["sha1"]) for r in rows])
    encoders = {"Xception (sklesion, frozen; watermark masked)": lambda: _features(rows, "masked", a.feature_dir),
                "EfficientNet-Lite0 ImageNet (frozen; masked)": lambda: _imagenet_features(rows),
                "second expert's pooled features (fine-tuned on these training photos)": lambda: _features(rows, "effnet", a.expert_feature_dir)}  # fmt: skip
    print(f"held-out sixth: {int(held.sum())} photos, {len(classes)} classes; {a.repeats} draws per point\n")
    print("| features | " + " | ".join(f"{n} per class" for n in a.shots) + " |\n|---|" + "---|" * len(a.shots))
    for name, load in encoders.items():
        res = curve(load(), y, held, a.shots, a.repeats)
        print(f"| {name} | " + " | ".join(f"{r['top1']:.3f} / {r['top5']:.3f}" for r in res) + " |", flush=True)


if __name__ == "__main__":
    main()
