"""The agent's modality decision on held-out images, whole and as close-ups: the modality head alone, the second
visual expert's modality head alone, their arithmetic mean at each weight (``w=``: the expert's weight, the previous
default's combination), the modality probe alone and the agent's decision under its configuration (``agent``).

Sets: isic2018_val, Derm7pt ``val``, the DermNet held-out sixth (whole, and centre crops keeping 50 % / 30 % of
each side, standing in for phone close-ups of one lesion), the dermoscopy sets as tight centre crops (70 % / 50 %: a
user's crop of a dermoscopy image must still route as dermoscopy), held-out histology, synthetic not-skin images (the
expert trainer's tables, ``training.encoder.build_tables``).

    python scripts/modality_closeups.py [--weights 0 0.25 0.5 0.75 1] [--out runs/modality_closeups.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SETS = (("val_isic2018", None), ("val_isic2018", "centre70"), ("val_isic2018", "centre50"), ("val_derm7pt", None), ("val_derm7pt", "centre70"),
        ("val_derm7pt", "centre50"), ("val_dermnet", None), ("val_dermnet", "crop50"), ("val_dermnet", "crop30"), ("val_histology", None),
        ("val_not_skin", None))  # fmt: skip


def main() -> None:
    from agent.config import AgentConfig
    from agent.nodes.modality import combine_opinions, modality_inputs
    from agent.runtime import Runtime
    from models.image_stats import image_stats
    from training.encoder import Config, _synthetic_records, build_tables
    from training.eval_encoder import MODALITIES, _views

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--save-probs", type=Path, default=None, help="also write each set's labels and the head's, expert's and probe's probabilities (.npz)")
    a = ap.parse_args()
    cfg = AgentConfig()
    rt = Runtime(cfg)
    head = rt.modality_heads
    probe = rt.modality_probe
    order = [head.heads["modality"].classes.index(m) for m in MODALITIES]
    sets, _ = build_tables(Config())
    sets["val_not_skin"] = _synthetic_records(10, 1000)
    res: dict[str, dict[str, float]] = {}
    saved: dict[str, np.ndarray] = {}
    for name, view in SETS:
        images = _views(sets[name], view)
        y = np.array([r["labels"]["modality"] for r in sets[name]])
        feats = np.concatenate([rt.classifier.predict(images[i : i + 16]).features for i in range(0, len(images), 16)])
        x = np.concatenate([modality_inputs(f, image_stats(im)) for f, im in zip(feats, images)])
        p_head = head.predict_proba(x)["modality"][:, order]
        p_expert = rt.second_expert.predict_heads(images)[1]["modality"]
        p_probe = probe.predict(images)[:, [probe.classes.index(m) for m in MODALITIES]] if probe is not None else None
        m = cfg.modality
        p_agent = combine_opinions(p_head, [(p_probe, m.imagenet_weight), (p_expert, m.second_expert_weight)], m.combine)
        key = name + (f"_{view}" if view else "")
        saved.update({f"{key}/y": y, f"{key}/head": p_head, f"{key}/expert": p_expert, **({f"{key}/probe": p_probe} if p_probe is not None else {})})
        acc = lambda p: round(float((p.argmax(1) == y).mean()), 4)  # noqa: E731
        res[key] = {"n": len(y), **{f"w={w:g}": acc((1 - w) * p_head + w * p_expert) for w in a.weights},
                    **({"probe": acc(p_probe)} if p_probe is not None else {}), "agent": acc(p_agent)}  # fmt: skip
        print(key, res[key], flush=True)
    whole = [name for name, view in SETS if view is None]  # res keys of whole images are the bare set names
    n = sum(res[k]["n"] for k in whole)
    for col in [f"w={w:g}" for w in a.weights] + [c for c in ("probe", "agent") if c in res[whole[0]]]:
        res.setdefault("whole_images", {"n": n})[col] = round(sum(res[k][col] * res[k]["n"] for k in whole) / n, 4)
    print("whole_images", res["whole_images"])
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1))
    if a.save_probs:
        a.save_probs.parent.mkdir(parents=True, exist_ok=True)
        np.savez(a.save_probs, **saved)


if __name__ == "__main__":
    main()
