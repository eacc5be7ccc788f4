"""Modality training with the lesion encoder fine-tuned (``finetune:`` in the modality config).

The shared encoder was trained on HAM10000 dermoscopy only; the modality task asks it to separate
clinical photos, dermoscopy, histology and non-skin images. Fine-tuning its last Xception stages on
images of every modality can sharpen that. Each held-out-source fold fine-tunes its own encoder, so
frozen and tuned features are compared on the same held-out images; the final encoder is stored as
a delta over the base weights (``models.finetuned_encoder``) and the refitted head records its hash.

    dermgraph train modality --config configs/train/modality_finetune.yaml
"""

from __future__ import annotations

import json
import time

import numpy as np

from training.modality import CLASSES, HEAD_NOTES, LICENCE, Config, _accuracy_by_tag, _crossval, _fit_headset, _heldout_metrics, fit, load_image

BASE_ID = "sklesion-xception"
N_FEATURES = 2048


def sample_per_tag(tags: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    """Sorted row indices with at most ``cap`` rows of each tag (seeded; all rows when ``cap`` is None)."""
    if cap is None:
        return np.arange(len(tags))
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(tags == t))[:cap] for t in sorted(set(tags))]
    return np.sort(np.concatenate(keep))


def load_tensors(refs: np.ndarray):
    """(N, 3, 254, 254) float32 inputs of the encoder (0..255, resized like the agent does)."""
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


def finetune_encoder(images, stats: np.ndarray, y: np.ndarray, x_frozen: np.ndarray, cfg: Config, log, stage: str, load_base=None, should_stop=None):
    """Fine-tune the stages from ``cfg.finetune.unfreeze_from`` on with class-balanced cross-entropy
    through a linear head on [pooled features, statistics], warm-started from the frozen-feature
    logistic head. Returns the tuned ``SklesionNet`` (eval mode, on CPU).

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

    scaler, clf = fit(x_frozen, y, cfg.c, cfg.max_iter)
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


def train_with_encoder(cfg: Config, x, y, groups, tags, refs, log, images=None, load_base=None, should_stop=None) -> dict:
    """Fine-tune per fold and once on everything; save the encoder delta and the refitted head.

    ``images``: the inputs of the rows of ``x`` when preloaded (else read through ``refs``);
    ``load_base`` / ``should_stop``: see :func:`finetune_encoder`."""
    from models.finetuned_encoder import save_delta
    from models.registry import get_spec
    from models.resolve import sha256_file
    from training.outputs import publish, registry_entry, table, write_registry_fragment

    ft = cfg.finetune
    sel = sample_per_tag(tags, ft.max_per_tag, cfg.seed)
    x, y, groups, tags, refs = x[sel], y[sel], groups[sel], tags[sel], refs[sel]
    stats = x[:, N_FEATURES:]
    t0 = time.time()
    images = load_tensors(refs) if images is None else images[sel]
    log.log(event="images_loaded", n=len(refs), seconds=round(time.time() - t0, 1))

    frozen_pred, _ = _crossval(lambda k, held: x, y, groups, cfg, log, stage="frozen")
    frozen = _heldout_metrics(y, frozen_pred, tags, cfg)

    def tuned_features(k, held):
        net = finetune_encoder(images[~held], stats[~held], y[~held], x[~held], cfg, log, stage=f"finetune_fold{k}", load_base=load_base, should_stop=should_stop)
        return np.concatenate([embed(net, images, ft.embed_batch_size), stats], axis=1)

    t_cv = time.time()
    pred, dist_held = _crossval(tuned_features, y, groups, cfg, log, stage="tuned")
    metrics = _heldout_metrics(y, pred, tags, cfg)
    metrics["frozen_heldout_accuracy"] = frozen["heldout_accuracy"]
    metrics["frozen_heldout_accuracy_by_source"] = frozen["heldout_accuracy_by_source"]
    metrics["finetune"] = {**ft.model_dump(), "n_images": int(len(y)), "crossval_seconds": round(time.time() - t_cv, 1)}

    t_final = time.time()
    net = finetune_encoder(images, stats, y, x, cfg, log, stage="finetune_final", load_base=load_base, should_stop=should_stop)
    xt = np.concatenate([embed(net, images, ft.embed_batch_size), stats], axis=1)
    metrics["finetune"]["final_seconds"] = round(time.time() - t_final, 1)
    delta = save_delta(net.backbone, ft.unfreeze_from, cfg.out_dir / "modality_encoder.safetensors", base_id=BASE_ID,
                       base_sha256=get_spec(BASE_ID).sha256, meta={"id": ft.encoder_id, "task": "modality"})  # fmt: skip
    hs = _fit_headset(xt, y, dist_held, cfg, metrics, inputs=f"{ft.encoder_id} features (2048) + image_stats (38)",
                      meta={"encoder": ft.encoder_id, "encoder_sha256": sha256_file(delta)})  # fmt: skip
    weights = cfg.out_dir / "modality_head.safetensors"
    hs.save(weights)
    (cfg.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.log(event="final", train_loss=metrics["train_loss"], heldout_accuracy=metrics["heldout_accuracy"], frozen_heldout_accuracy=frozen["heldout_accuracy"])

    by_f, by_t = frozen["heldout_accuracy_by_source"], metrics["heldout_accuracy_by_source"]
    rows = [["all", frozen["heldout_accuracy"], metrics["heldout_accuracy"]]] + [[t, by_f.get(t), by_t.get(t)] for t in sorted(set(tags))]
    tbl = (f"Modality, frozen encoder vs encoder fine-tuned from {ft.unfreeze_from} ({ft.steps} steps per fold), held-out-source folds "
           f"on the same {len(y)} sampled images:\n" + table(["source", "frozen encoder", "fine-tuned encoder"], rows))  # fmt: skip
    print(tbl, flush=True)
    before = {"frozen_heldout": frozen["heldout_accuracy"], "new_heldout": metrics["heldout_accuracy"], "rows": rows, "table": tbl,
              "new_is_better": metrics["heldout_accuracy"] > frozen["heldout_accuracy"]}  # fmt: skip

    published = publish(weights, cfg.artifact, metrics)
    enc_published = publish(delta, cfg.encoder_artifact)
    reg = None
    if cfg.register_as:
        enc_entry = registry_entry(cfg.out_dir, ft.encoder_id, delta, role="image_embedder", licence=LICENCE, fmt="xception-delta",
                                   notes=f"sklesion Xception with stages from {ft.unfreeze_from} fine-tuned for the modality task (a delta over {BASE_ID}).")  # fmt: skip
        reg = write_registry_fragment(cfg.out_dir, cfg.register_as, weights, role="head", licence=LICENCE, notes=HEAD_NOTES + f" Needs modality.encoder={ft.encoder_id}.",
                                      extra=[enc_entry])  # fmt: skip
    return {"metrics": metrics, "before_after": before, "weights": str(weights), "encoder": str(delta),
            "artifact": str(published) if published else None, "encoder_artifact": str(enc_published) if enc_published else None,
            "registry": str(reg) if reg else None}  # fmt: skip
