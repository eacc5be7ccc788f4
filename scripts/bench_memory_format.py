"""The image networks EfficientNet-Lite0 runs in the agent (the second expert with the default options, and the clinical
probe's ImageNet encoder), in NCHW and channels-last memory, alternating in one process on the same images: seconds
per image at the default forward batch, the largest output difference and whether any top label changes.

    python scripts/bench_memory_format.py --source dermnet --n 48 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import time


def infer(model, imgs):
    """(features, {head: probabilities}) of an expert or an encoder (features only)."""
    return model.predict_heads(imgs) if hasattr(model, "predict_heads") else (model.embed(imgs), {})


def main(argv: list[str] | None = None) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from agent.config import AgentConfig
    from models.efficientnet import EfficientNetExpert
    from models.paths import data_dir
    from models.probe import ImageNetEncoder

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="dermnet", help="a folder of the shared data (dermnet: clinical photos, isic2018_val: dermoscopy)")
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    files = sorted((data_dir() / a.source / "images").rglob("*.jpg"))[: a.n]
    if not files:
        raise SystemExit(f"no images under {data_dir() / a.source / 'images'}")
    imgs = [Image.open(f).convert("RGB") for f in files]
    ref = AgentConfig().encoder.second_expert
    nets = {
        "second expert": lambda cl: EfficientNetExpert(model=ref.model, **{**ref.options, "memory_channels_last": cl}),
        "ImageNet encoder (probe)": lambda cl: ImageNetEncoder(memory_channels_last=cl),
    }
    out: dict = {"source": a.source, "images": len(imgs), "threads": a.threads, "results": {}}
    for name, make in nets.items():
        pair = {cl: make(cl) for cl in (False, True)}
        for m in pair.values():  # load and warm up
            infer(m, imgs[:2])
        times: dict[bool, list[float]] = {False: [], True: []}
        got = {}
        for _ in range(a.repeats):
            for cl in (False, True):
                t = time.perf_counter()
                got[cl] = infer(pair[cl], imgs)
                times[cl].append(time.perf_counter() - t)
        (f0, p0), (f1, p1) = got[False], got[True]
        diff = max([float(np.abs(f0 - f1).max())] + [float(np.abs(p0[k] - p1[k]).max()) for k in p0])
        same = all(bool((p0[k].argmax(1) == p1[k].argmax(1)).all()) for k in p0)
        r = {"forward_batch": pair[True].batch_size, "nchw_s_per_image": round(min(times[False]) / len(imgs), 4),
             "channels_last_s_per_image": round(min(times[True]) / len(imgs), 4), "max_abs_diff": float(f"{diff:.2e}"), "top_labels_equal": same}  # fmt: skip
        r["speedup"] = round(r["nchw_s_per_image"] / r["channels_last_s_per_image"], 2)
        out["results"][name] = r
        print(f"{name:26s} batch {r['forward_batch']}: NCHW {r['nchw_s_per_image'] * 1000:.1f} ms/image, channels-last "
              f"{r['channels_last_s_per_image'] * 1000:.1f} ms/image ({r['speedup']}x); max |diff| {diff:.1e}; top labels equal: {same}")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
