"""Training-step throughput of the EfficientNet-Lite0 expert under each speed option, side by side.

One process, synthetic batches (the network's cost does not depend on the pixels), the trainer's own
pieces (``models.efficientnet.multitask_net``, ``training.encoder.frozen_modules`` / ``set_train_mode`` and
its loss), so the figures say what ``channels_last`` / ``compile_mode`` / ``amp`` in the encoder config buy
before a GPU run spends time on them. Variants run interleaved, ``--repeats`` rounds; the best round is
reported, compile time separately.

    python scripts/encoder_throughput.py --device cuda --batch-size 256 --image-size 224 --steps 30
    python scripts/encoder_throughput.py --device cpu --batch-size 8 --image-size 96 --steps 3 --variants eager,channels_last   # rehearsal
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VARIANTS = {
    "eager": {},
    "channels_last": {"channels_last": True},
    "compile": {"compile_mode": "default"},
    "compile_cl": {"compile_mode": "default", "channels_last": True},
    "compile_ro_cl": {"compile_mode": "reduce-overhead", "channels_last": True},
    "compile_ma_cl": {"compile_mode": "max-autotune-no-cudagraphs", "channels_last": True},
}


def build(variant: dict, device: str, amp: bool, train_from: str):
    import torch

    from models.vocabulary import HAM_CLASSES, MODALITIES, SEVEN_POINT
    from training.encoder import Config, encoder_forward, frozen_modules

    from models.efficientnet import multitask_net

    heads = {"ham": list(HAM_CLASSES), "dermnet": [f"c{i}" for i in range(56)], "modality": list(MODALITIES),
             **{f"crit_{c}": list(v) for c, v in SEVEN_POINT.items()}}  # fmt: skip
    cfg = Config(amp=amp, train_from=train_from, **variant)
    net = multitask_net(heads, pretrained=False).to(device)
    frozen = frozen_modules(net.backbone, cfg.train_from)
    for m in frozen:
        m.requires_grad_(False)
    fwd = encoder_forward(net, cfg, device)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    return cfg, net, frozen, fwd, opt, heads


def main() -> None:
    import torch

    from training.encoder import _loss, set_train_mode, to_input

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=30, help="Timed steps per round (after warm-up steps).")
    ap.add_argument("--warmup", type=int, default=3, help="Untimed steps first (compilation happens here).")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on for CUDA)")
    ap.add_argument("--train-from", default="0")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"Comma list of {list(VARIANTS)}")
    ap.add_argument("--json", type=Path, help="Also write the figures here.")
    a = ap.parse_args()
    amp = a.device.startswith("cuda") if a.amp is None else a.amp
    names = [v for v in a.variants.split(",") if v]
    bad = set(names) - set(VARIANTS)
    if bad:
        raise SystemExit(f"unknown variants {sorted(bad)}; valid: {', '.join(VARIANTS)}")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(a.batch_size, 3, a.image_size, a.image_size, generator=g)
    built = {n: build(VARIANTS[n], a.device, amp, a.train_from) for n in names}
    labels = {k: torch.randint(0, len(v), (a.batch_size,), generator=g) for k, v in next(iter(built.values()))[5].items() if not k.startswith("crit_")}
    labels["crit"] = torch.stack([torch.randint(0, len(v), (a.batch_size,), generator=g) for k, v in next(iter(built.values()))[5].items() if k.startswith("crit_")], 1)
    labels = {k: v.to(a.device) for k, v in labels.items()}
    class_w: dict = {}

    def step(name: str) -> None:
        cfg, net, frozen, fwd, opt, _ = built[name]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and a.device.startswith("cuda")):
            _, logits = fwd(to_input(x, cfg, a.device))
        loss, _ = _loss({k: v.float() for k, v in logits.items()}, labels, class_w, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync() -> None:
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    out: dict[str, dict] = {n: {"img_per_s": 0.0} for n in names}
    for n in names:
        set_train_mode(built[n][1], built[n][2])
        t0 = time.perf_counter()
        for _ in range(a.warmup):
            step(n)
        sync()
        out[n]["warmup_s"] = round(time.perf_counter() - t0, 2)
    for _ in range(a.repeats):
        for n in names:
            sync()
            t0 = time.perf_counter()
            for _ in range(a.steps):
                step(n)
            sync()
            out[n]["img_per_s"] = max(out[n]["img_per_s"], round(a.steps * a.batch_size / (time.perf_counter() - t0), 1))
    if a.device.startswith("cuda"):
        for n in names:
            out[n]["gpu"] = torch.cuda.get_device_name()
    base = out[names[0]]["img_per_s"]
    print(f"device {a.device}, batch {a.batch_size}, {a.image_size} px, bf16 autocast {amp}, train_from {a.train_from}, best of {a.repeats} x {a.steps} steps")
    for n in names:
        o = out[n]
        print(f"  {n:16s} {o['img_per_s']:10.1f} img/s  ({o['img_per_s'] / base:5.2f}x {names[0]})  warm-up/compile {o['warmup_s']:.1f} s")
    if a.json:
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "results": out}, indent=1))


if __name__ == "__main__":
    main()
