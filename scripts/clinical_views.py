"""The second expert's DermNet head on the held-out DermNet photos (the original files, as the agent sees them) for
every combination of experts, input size and test-time views, with its cost, selected on the even-hash half (the
clinical fusion's fit half) and reported on the odd half (its evaluation half).

Each expert's head is computed once per (size, view) pass; a combination is the mean of its passes' probabilities.
Cost counts 224-px passes of one network, areas scaled ((size/224)^2); the shipped expert's own 224-px pass over the
photo (it decides modality, so it is always paid) counts once.

    python scripts/clinical_views.py models/artifacts/efficientnet_lite0_derm.safetensors \\
        models/artifacts/efficientnet_lite0_derm_continued.safetensors [--max-cost 5.7] [--out runs/clinical_views.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VIEW_SETS = {"photo": ("orig",), "photo+mirror": ("orig", "hflip"), "photo+mirror+quarter": ("orig", "hflip", "rot90"),
             "photo+3 views": ("orig", "hflip", "vflip", "rot90")}  # fmt: skip


def cost(nets: Sequence[str], size: int, views: Sequence[str], primary: str, base: int = 224) -> float:
    """Passes of one network at ``base`` px: the primary's own base-size pass is paid anyway and counts once."""
    per = (size / base) ** 2 * len(views) * len(nets)
    return round(per + (0.0 if primary in nets and size == base and "orig" in views else 1.0), 2)


def combinations(passes: dict[tuple[str, int, str], np.ndarray], y: np.ndarray, fit: np.ndarray, primary: str, max_nets: int = 2) -> list[dict]:
    """Every combination of up to ``max_nets`` experts, one size, one view set: top-1/top-5 on the fit and
    evaluation halves, sorted by the fit half (top-1 + top-5)."""
    from training.encoder import topk

    nets = sorted({n for n, _, _ in passes})
    sizes = sorted({s for _, s, _ in passes})
    rows = []
    for k in range(1, max_nets + 1):
        for combo in itertools.combinations(nets, k):
            for size in sizes:
                for name, views in VIEW_SETS.items():
                    p = np.mean([passes[(n, size, v)] for n in combo for v in views], 0)
                    row = {"experts": list(combo), "size": size, "views": name, "cost": cost(combo, size, views, primary)}
                    for half, mask in (("fit", fit), ("eval", ~fit)):
                        row[f"{half}_top1"], row[f"{half}_top5"] = topk(y[mask], p[mask], 1), topk(y[mask], p[mask], 5)
                    rows.append(row)
    return sorted(rows, key=lambda r: -(r["fit_top1"] + r["fit_top5"]))


def head_passes(experts: Sequence[Path], images: list, sizes: Sequence[int]) -> dict[tuple[str, int, str], np.ndarray]:
    """{(expert stem, size, view): DermNet-head probabilities (N, C)}."""
    import torch

    from models.efficientnet import load_expert, to_tensor
    from models.tta import tensor_view

    out = {}
    for path in experts:
        net, _ = load_expert(path, "cpu")
        with torch.inference_mode():
            for size in sizes:
                x = to_tensor(images, size)
                for view in VIEW_SETS["photo+3 views"]:
                    ps = [net(xb if view == "orig" else tensor_view(xb, view))[1]["dermnet"].float().softmax(-1).numpy() for xb in x.split(32)]
                    out[(path.stem, size, view)] = np.concatenate(ps)
    return out


def main() -> None:
    from PIL import Image

    from models.efficientnet import expert_info
    from models.paths import data_dir
    from training.data import is_dermnet_fit_half, is_dermnet_heldout, source_table

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experts", type=Path, nargs="+", help="expert files (.safetensors, same DermNet classes); the first is the agent's primary network")
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 256, 288])
    ap.add_argument("--max-cost", type=float, default=None, help="print only combinations costing at most this many 224-px passes")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    classes = list(expert_info(a.experts[0])["heads"]["dermnet"])
    rows = [r for r in source_table("dermnet") if is_dermnet_heldout(r["sha1"])]
    images = [Image.open(data_dir() / "dermnet" / r["image"]).convert("RGB") for r in rows]
    y = np.array([classes.index(r["label"]) for r in rows])
    fit = np.array([is_dermnet_fit_half(r["sha1"]) for r in rows])
    res = combinations(head_passes(a.experts, images, a.sizes), y, fit, a.experts[0].stem)
    shown = [r for r in res if a.max_cost is None or r["cost"] <= a.max_cost]
    print(f"fit half {int(fit.sum())} photos (selection), evaluation half {int((~fit).sum())}")
    print("| experts | size | views | cost | fit top-1 / top-5 | evaluation top-1 / top-5 |\n|---|---|---|---|---|---|")
    for r in shown:
        print(f"| {' + '.join(r['experts'])} | {r['size']} | {r['views']} | {r['cost']} | {r['fit_top1']:.3f} / {r['fit_top5']:.3f} | {r['eval_top1']:.3f} / {r['eval_top5']:.3f} |")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
