"""Fine-tuning the lesion encoder for the modality task (``finetune:`` in the modality config).

The shared encoder was trained on HAM10000 dermoscopy only; the modality task asks it to separate
clinical photos, dermoscopy, histology and non-skin images. Fine-tuning its last Xception stages on
images of every modality can sharpen that. Each held-out-source fold fine-tunes its own encoder, so
frozen and tuned features are compared on the same held-out images; the final encoder is stored as
a delta over the base weights (``models.finetuned_encoder``) and the refitted head records its hash.
This module holds the encoder mechanics; :func:`training.modality.train_with_encoder` runs them.

    dermgraph train modality --config configs/train/modality_finetune.yaml
"""

from __future__ import annotations

import time

import numpy as np

from models.vocabulary import MODALITIES

CLASSES = list(MODALITIES)

BASE_ID = "sklesion-xception"
N_FEATURES = 2048


def sample_per_tag(tags: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    """Sorted row indices with at most ``cap`` rows of each tag (seeded; all rows when ``cap`` is None)."""
    if cap is None:
        return np.arange(len(tags))
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(tags == t))[:cap] for t in sorted(set(tags))]
    return np.sort(np.concatenate(keep))


def load_tensors(refs: np.ndarray, load_image):
    """(N, 3, 254, 254) float32 inputs of the encoder (0..255, resized like the agent does) of the images
    ``load_image(ref)`` returns."""
    import torch

    from models.sklesion import preprocess

    return torch.cat([preprocess([load_image(r)]) for r in refs]) if len(refs) else preprocess([])


def _augment(x, gen):
    """Per-image random 90-degree rotation and horizontal flip (orientation says nothing about modality)."""
    import torch

    out = []
    for img in x:
        k = int(torch.randint(4, (1,), generator=gen))
        img = torch.rot90(img, k, dims=(1, 2))
        if int(torch.randint(2, (1,), generator=gen)):
            img = torch.flip(img, dims=(2,))
        out.append(img)
    return torch.stack(out)


def finetune_encoder(images, stats: np.ndarray, y: np.ndarray, x_frozen: np.ndarray, warm_start, cfg, log, stage: str, load_base=None, should_stop=None):
    """Fine-tune the stages from ``cfg.finetune.unfreeze_from`` on with class-balanced cross-entropy
    through a linear head on [pooled features, statistics], warm-started from ``warm_start`` (the
    (scaler, logistic head) fitted on the frozen features ``x_frozen``). Returns the tuned
    ``SklesionNet`` (eval mode, on CPU).

    ``load_base(device)`` builds the base network (default: the registry's Keras weights);
    ``should_stop(stage, step)`` ends the loop early (a time budget)."""
    import torch
    import torch.nn.functional as F

    from models.resolve import resolve
    from models.sklesion import build_model
    from training.config import resolve_device

    ft = cfg.finetune
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    net = load_base(device) if load_base is not None else build_model(resolve(BASE_ID, progress=False), device)
    bb = net.backbone
    start = ft.unfreeze_from
    net.requires_grad_(False)
    params = [p for name in bb.STAGES[bb.STAGES.index(start) :] for m in bb.stage_modules(name) for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    # BatchNorm keeps its running statistics: eval mode throughout, only weights move.
    net.eval()

    scaler, clf = warm_start
    head = torch.nn.Linear(x_frozen.shape[1], len(CLASSES)).to(device)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-10.0)  # a class absent from this training part stays improbable
        for j, c in enumerate(clf.classes_):
            head.weight[CLASSES.index(c)] = torch.as_tensor(clf.coef_[j], dtype=torch.float32)
            head.bias[CLASSES.index(c)] = float(clf.intercept_[j])
    mean = torch.as_tensor(scaler.mean_, dtype=torch.float32, device=device)
    scale = torch.as_tensor(scaler.scale_, dtype=torch.float32, device=device)
    stats_t = torch.as_tensor(stats, dtype=torch.float32)
    yi = torch.as_tensor([CLASSES.index(v) for v in y])
    counts = torch.bincount(yi, minlength=len(CLASSES)).float()
    weight = torch.where(counts > 0, len(yi) / (len(CLASSES) * counts.clamp_min(1)), torch.zeros_like(counts)).to(device)
    opt = torch.optim.AdamW([{"params": params, "lr": ft.lr}, {"params": head.parameters(), "lr": ft.head_lr}], weight_decay=ft.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    use_bf16 = device == "cuda"
    t0 = time.time()
    for step in range(ft.steps):
        if should_stop is not None and should_stop(stage, step):
            log.log(stage=stage, event="stopped_early", steps_done=step)
            break
        idx = torch.randint(len(yi), (min(ft.batch_size, len(yi)),), generator=gen)
        xb = images[idx]
        if ft.augment:
            xb = _augment(xb, gen)
        xb = xb.to(device).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            h = bb.forward_stages(net.norm(xb), "entry", start)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            f = bb.forward_stages(h, start).mean(dim=(2, 3))
        z = (torch.cat([f.float(), stats_t[idx].to(device)], dim=1) - mean) / scale
        loss = F.cross_entropy(head(z), yi[idx].to(device), weight=weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.log(stage=stage, step=step + 1, loss=round(float(loss.detach()), 5), elapsed_s=round(time.time() - t0, 1))
    return net.eval()


def embed(net, images, batch_size: int = 32) -> np.ndarray:
    """(N, 2048) pooled features of ``images`` under ``net``."""
    import torch

    device = next(net.parameters()).device
    out = []
    with torch.inference_mode():
        for lo in range(0, len(images), batch_size):
            x = images[lo : lo + batch_size].to(device).contiguous(memory_format=torch.channels_last)
            out.append(net.backbone(net.norm(x)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, N_FEATURES), np.float32)
