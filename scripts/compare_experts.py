"""Paired comparison of two EfficientNet-Lite0 experts on the held-out images, from their cached outputs
(``python -m training.eval_encoder features --weights W --feature-dir DIR``): isic2018_val and Derm7pt
``val`` (HAM10000 head: accuracy, balanced accuracy), the DermNet held-out sixth (DermNet head: top-1).

    python scripts/compare_experts.py .cache/features_effnet_cpu .cache/features_effnet_gpu --weights models/artifacts/efficientnet_lite0_derm.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from evals.metrics import accuracy, balanced_accuracy, mcnemar_exact, paired_difference
from models.efficientnet import expert_info
from models.vocabulary import derm7pt_to_ham
from training.data import is_dermnet_heldout, source_table


def _preds(npz: Path, ids: list[str], head: str, classes: list[str]) -> list[str]:
    z = np.load(npz)
    index = {str(i): k for k, i in enumerate(z["ids"])}
    p = z[f"probs_{head}"]
    return [classes[int(p[index[i]].argmax())] for i in ids]


def compare(a: Path, b: Path, weights: Path) -> dict:
    heads = expert_info(weights)["heads"]
    out = {}
    isic = source_table("isic2018_val")
    d7 = [r for r in source_table("derm7pt") if r["split"] == "val" and derm7pt_to_ham(r["diagnosis"])]
    dn = [r for r in source_table("dermnet") if is_dermnet_heldout(r["sha1"])]
    sets = {"isic2018_val": ("isic2018_val", isic, [r["dx"] for r in isic], "ham"),
            "derm7pt_val": ("derm7pt", d7, [derm7pt_to_ham(r["diagnosis"]) for r in d7], "ham"),
            "dermnet_heldout": ("dermnet", dn, [r["label"] for r in dn], "dermnet")}  # fmt: skip
    for name, (source, rows, y, head) in sets.items():
        ids = [r["image"] for r in rows]
        pa = _preds(Path(a) / f"{source}__effnet.npz", ids, head, heads[head])
        pb = _preds(Path(b) / f"{source}__effnet.npz", ids, head, heads[head])
        res = {"n": len(y), "accuracy": [round(accuracy(y, pa), 4), round(accuracy(y, pb), 4)], "accuracy_difference": paired_difference(accuracy, y, pa, pb),
               "mcnemar": mcnemar_exact([t == q for t, q in zip(y, pa)], [t == q for t, q in zip(y, pb)])}  # fmt: skip
        if head == "ham":
            res["balanced_accuracy"] = [round(balanced_accuracy(y, pa), 4), round(balanced_accuracy(y, pb), 4)]
            res["balanced_accuracy_difference"] = paired_difference(balanced_accuracy, y, pa, pb)
        out[name] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path, help="feature dir of the first expert (before)")
    ap.add_argument("b", type=Path, help="feature dir of the second expert (after)")
    ap.add_argument("--weights", type=Path, required=True, help="either expert's file (for the head labels)")
    a = ap.parse_args()
    print(json.dumps(compare(a.a, a.b, a.weights), indent=1))


if __name__ == "__main__":
    main()
