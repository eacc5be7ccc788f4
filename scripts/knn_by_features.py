"""Which features should the clinical case index use? k-NN over the DermNet case-index photos, queried with
the held-out sixth, with the Xception's pooled features (what the index holds today) or the second visual
expert's (EfficientNet-Lite0, fine-tuned on those photos): top-1 / top-5 over the DermNet labels.

    python scripts/knn_by_features.py [--effnet .cache/features_effnet/dermnet__effnet.npz] [--k 10]

Needs ``.cache/features/dermnet__full.npz`` (scripts/extract_features.py) and the expert's outputs
(``python -m training.eval_encoder features``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def knn_scores(q: np.ndarray, index: np.ndarray, y_index: np.ndarray, n_classes: int, k: int, temperature: float) -> np.ndarray:
    """(n_query, n_classes) similarity-weighted votes of the k most cosine-similar index rows."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    index = index / np.linalg.norm(index, axis=1, keepdims=True)
    sims = q @ index.T
    out = np.zeros((len(q), n_classes))
    for r, row in enumerate(sims):
        top = np.argsort(-row)[:k]
        np.add.at(out[r], y_index[top], np.exp(row[top] / temperature))
    return out


def main() -> None:
    from training.data import is_dermnet_heldout, load_features, source_table

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--effnet", type=Path, default=Path(".cache/features_effnet/dermnet__effnet.npz"))
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--temperature", type=float, default=0.1)
    a = ap.parse_args()
    table = source_table("dermnet")
    label = {r["image"]: r["label"] for r in table}
    held = {r["image"] for r in table if is_dermnet_heldout(r["sha1"])}
    classes = sorted(set(label.values()))
    x = load_features("dermnet", "full")
    z = np.load(a.effnet)
    out = {}
    for name, ids, feats in (("xception", x["ids"], x["features"]), ("effnet", z["ids"], z["features"])):
        ids = [str(i) for i in ids]
        feats = np.asarray(feats, np.float32)
        tr = [i for i, s in enumerate(ids) if s in label and s not in held]
        te = [i for i, s in enumerate(ids) if s in held]
        y_tr = np.array([classes.index(label[ids[i]]) for i in tr])
        y_te = np.array([classes.index(label[ids[i]]) for i in te])
        s = knn_scores(feats[te], feats[tr], y_tr, len(classes), a.k, a.temperature)
        order = np.argsort(-s, axis=1)
        out[name] = {"index": len(tr), "queries": len(te), "top1": round(float((order[:, 0] == y_te).mean()), 3),
                     "top5": round(float((order[:, :5] == y_te[:, None]).any(1).mean()), 3)}  # fmt: skip
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
