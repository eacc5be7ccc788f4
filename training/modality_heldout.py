"""Whole-source held-out accuracy of the agent's modality decision, with both visual experts.

The modality head (Xception features + colour/texture statistics) is validated by holding whole sources out
(:mod:`training.modality`: fold k holds out dermoscopy dataset k, a third of DermNet's classes, of the histology
slides and of the synthetic not-skin kinds). The agent decides modality by the mean of that head and the second
visual expert's modality head (``modality.second_expert_weight``), and the shipped expert trained on every source,
so its held-out-source accuracy needs an expert per fold: this trains one EfficientNet-Lite0 per fold with the
encoder recipe (``encoder``), that fold's sources removed from its training and selection data, and scores the
head alone, the expert alone and their mean on the same held-out images.

    dermgraph train modality-heldout --config configs/train/modality_heldout.yaml

Resumable: a fold whose model exists is not trained again (the encoder resumes a killed fold from its checkpoint).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from training.config import TrainConfig

LICENCE = "figures only (fold models are not shipped)"


class Config(TrainConfig):
    """Held-out-source evaluation of the agent's modality decision (see the module docstring)."""

    modality: Path = Field(Path("configs/train/modality.yaml"), description="The modality head's config: its sources, views, folds and C.")
    encoder: Path = Field(Path("configs/train/encoder_cpu.yaml"), description="The expert's recipe each fold model is trained with.")
    encoder_set: list[str] = Field([], description="Overrides of the encoder recipe, as key=value (e.g. max_minutes=20).")
    imagenet_probe: Path | None = Field(Path("configs/train/modality_probe.yaml"), description="The modality probe's config (its inputs, C and "
                                        "iterations; fitted per fold on the head's images), or None: no probe opinion.")
    second_expert_weight: float | None = Field(None, ge=0, le=1, description="The expert's weight in the agent's combination (None: the agent's default).")
    imagenet_weight: float | None = Field(None, ge=0, le=1, description="The probe's weight in the agent's combination (None: the agent's default).")
    combine: Literal["geometric", "arithmetic"] | None = Field(None, description="The agent's combination rule (None: the agent's default).")
    folds: list[int] | None = Field(None, description="Folds to run (None: all).")
    batch_size: int = Field(64, ge=1, description="Images per forward pass when scoring held-out images.")


def fold_tables(sets: dict[str, list[dict]], classes: list[str], held_groups: set[str], n_folds: int) -> dict[str, list[dict]]:
    """The encoder's tables without anything of ``held_groups`` (the modality protocol's group names: ``dermoscopy:<source>``,
    ``clinical:<j>`` for DermNet classes j mod n_folds, ``histology:<j>`` for slides): neither trained on nor used to select
    the epoch. Histology validation goes (its slides are the protocol's groups too)."""
    slides = sorted({r["slide"] for k in ("train_histology", "val_histology") for r in sets.get(k, [])})

    def group(r: dict) -> str | None:
        if r["source"] in ("ham10000", "derm7pt", "isic2018_val"):
            return f"dermoscopy:{r['source']}"
        if r["source"] == "dermnet":
            return f"clinical:{classes.index(r['label']) % n_folds}"
        if r["source"] == "histology":
            return f"histology:{slides.index(r['slide']) % n_folds}"
        return None

    out = {}
    for name, recs in sets.items():
        if name == "val_histology":
            continue
        if name == "train_histology":
            recs = [r for k in ("train_histology", "val_histology") for r in sets.get(k, [])]
        out[name] = [r for r in recs if group(r) not in held_groups]
    return out


def held_kinds(groups: np.ndarray, held: np.ndarray) -> list[str]:
    """The synthetic kinds a fold holds out (their group names are ``synthetic:<kind>``)."""
    return sorted({g.split(":", 1)[1] for g in groups[held] if g.startswith("synthetic:")})


def expert_probs(weights: Path, refs: list[str], batch_size: int) -> np.ndarray:
    """The expert's modality probabilities (N, 4, in models.vocabulary.MODALITIES order) on the protocol's images."""
    from models.efficientnet import EfficientNetExpert
    from models.vocabulary import MODALITIES
    from training.modality import load_image

    expert = EfficientNetExpert(weights=weights, batch_size=batch_size)
    out = []
    for lo in range(0, len(refs), batch_size):
        _, p = expert.predict_heads([load_image(r) for r in refs[lo : lo + batch_size]])
        out.append(p["modality"])
    order = [list(expert.info["heads"]["modality"]).index(c) for c in MODALITIES]
    return np.concatenate(out)[:, order] if out else np.zeros((0, len(MODALITIES)), np.float32)


def _accuracy(y: np.ndarray, p: np.ndarray, tags: np.ndarray, classes: list[str], headline: np.ndarray) -> dict[str, Any]:
    """Accuracy of the most probable class, over the ``headline`` rows ('all': every image but the dermoscopy crop views)
    and per source/view tag."""
    from training.modality import accuracy_by_tag

    pred = np.array(classes)[p.argmax(1)]
    return {"all": round(float((pred == y)[headline].mean()), 4), **accuracy_by_tag(y, pred, tags)}


def train(cfg: Config) -> dict:
    from agent.config import AgentConfig, ModalityConfig
    from agent.nodes.modality import combine_opinions
    from models.vocabulary import MODALITIES
    from training import encoder as enc
    from training import modality as mod
    from training.config import load_train_config
    from training.data import source_table

    t0 = time.time()
    mcfg = load_train_config(mod.Config, cfg.modality)
    ecfg0 = load_train_config(enc.Config, cfg.encoder, cfg.encoder_set)
    # The agent's modality settings with this run's overrides, checked by the agent's own validator.
    over = {k: v for k, v in (("second_expert_weight", cfg.second_expert_weight), ("imagenet_weight", cfg.imagenet_weight), ("combine", cfg.combine)) if v is not None}
    agent = ModalityConfig.model_validate({**AgentConfig().modality.model_dump(), **over, **({} if cfg.imagenet_probe else {"imagenet_probe": None})})
    w, wi = agent.second_expert_weight, agent.imagenet_weight if cfg.imagenet_probe is not None else 0.0

    classes = list(MODALITIES)
    x, y, groups, tags, refs = mod.build_dataset(mcfg)
    pcfg = load_train_config(mod.Config, cfg.imagenet_probe, [f"feature_dir={mcfg.feature_dir}"]) if cfg.imagenet_probe is not None else None
    xp = mod.head_inputs(pcfg, x, refs)[0] if pcfg is not None else None  # the probe's inputs of the head's images
    headline = mod.headline_rows(tags, mcfg)
    folds = mod.source_folds(groups, mcfg)
    sets, dn_classes = enc.build_tables(ecfg0)
    slide_of = {r["image"]: r["source"] for r in source_table("histology")}
    for k in ("train_histology", "val_histology"):
        for r in sets.get(k, []):
            r["slide"] = slide_of[r["image"]]
    dn_label = {r["image"]: r["label"] for r in source_table("dermnet")}
    for k, recs in sets.items():
        for r in recs:
            if r["source"] == "dermnet":
                r["label"] = dn_label[r["image"]]
    fold_of = np.full(len(y), -1)
    p_head = np.full((len(y), len(classes)), np.nan)
    p_expert = np.full((len(y), len(classes)), np.nan)
    p_probe = np.full((len(y), len(classes)), np.nan) if pcfg is not None else None

    def decide(rows):
        """The agent's modality probabilities on ``rows`` from the three opinions' held-out predictions."""
        return combine_opinions(p_head[rows], [(None if p_probe is None else p_probe[rows], wi), (p_expert[rows], w)], agent.combine)

    def held_out(xs, reg, max_iter, held):
        """A head fitted (training.modality's recipe, C = ``reg``) on the fold's other rows, its probabilities on the fold's rows."""
        scaler, clf = mod.fit(xs[~held], y[~held], reg, max_iter)
        return clf.predict_proba(scaler.transform(xs[held]))[:, [list(clf.classes_).index(c) for c in classes]]

    per_fold = []
    for k, held in enumerate(folds):
        if cfg.folds is not None and k not in cfg.folds:
            continue
        held_groups = set(groups[held])
        fold_of[held] = k
        # The head, as training.modality validates it.
        p_head[held] = held_out(x, mcfg.c, mcfg.max_iter, held)
        if pcfg is not None:  # the modality probe, the same way on its own inputs
            p_probe[held] = held_out(xp, pcfg.c, pcfg.max_iter, held)
        # The expert, trained without the fold's sources.
        out = cfg.out_dir / f"fold{k}"
        weights = out / "best.safetensors"
        kinds = [kd for kd in sorted({g.split(":", 1)[1] for g in groups if g.startswith("synthetic:")}) if kd not in held_kinds(groups, held)]
        ecfg = ecfg0.model_copy(update={"out_dir": out, "artifact": None, "register_as": None, "not_skin_kinds": kinds})
        tables = fold_tables(sets, dn_classes, held_groups, mcfg.n_folds)
        if not weights.exists():
            out.mkdir(parents=True, exist_ok=True)
            enc.train(ecfg, (tables, dn_classes))
        idx = np.flatnonzero(held)
        p_expert[idx] = expert_probs(weights, [str(refs[i]) for i in idx], cfg.batch_size)
        per_fold.append({"fold": k, "held_out": sorted(held_groups), "n": int((held & headline).sum()),
                         "trained": {n: len(v) for n, v in tables.items() if n.startswith("train_")},
                         "head": _accuracy(y[held], p_head[held], tags[held], classes, headline[held])["all"],
                         "expert": _accuracy(y[held], p_expert[held], tags[held], classes, headline[held])["all"],
                         "probe": _accuracy(y[held], p_probe[held], tags[held], classes, headline[held])["all"] if pcfg is not None else None,
                         "agent": _accuracy(y[held], decide(held), tags[held], classes, headline[held])["all"]})  # fmt: skip
        print(json.dumps(per_fold[-1]), flush=True)
    done = ~np.isnan(p_expert).any(1)
    yd, td, hd = y[done], tags[done], headline[done]
    metrics = {
        "protocol": f"{mcfg.n_folds} folds of training.modality (whole dermoscopy datasets, thirds of DermNet classes, histology slides and synthetic kinds held out); "
                    f"the expert per fold: {cfg.encoder} with its fold's sources removed from training and selection",  # fmt: skip
        "agent": {"second_expert_weight": w, "imagenet_weight": wi, "combine": agent.combine},
        "n": int(hd.sum()),
        "n_with_crop_views": int(done.sum()),
        "head": _accuracy(yd, p_head[done], td, classes, hd),
        "expert": _accuracy(yd, p_expert[done], td, classes, hd),
        **({"probe": _accuracy(yd, p_probe[done], td, classes, hd)} if pcfg is not None else {}),
        "agent_decision": _accuracy(yd, decide(done), td, classes, hd),
        "folds": per_fold,
        "wall_s": round(time.time() - t0, 1),
    }
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    np.savez(cfg.out_dir / "predictions.npz", refs=refs[done].astype(str), y=yd, tags=td, head=p_head[done], expert=p_expert[done], fold=fold_of[done],
             headline=hd, **({"probe": p_probe[done]} if pcfg is not None else {}))  # fmt: skip
    print(report_table(metrics))
    return {"n": metrics["n"], "head": metrics["head"]["all"], "expert": metrics["expert"]["all"], "probe": (metrics.get("probe") or {}).get("all"),
            "agent_decision": metrics["agent_decision"]["all"],
            "metrics": str(cfg.out_dir / "metrics.json")}  # fmt: skip


def report_table(metrics: dict) -> str:
    a = metrics["agent"]
    cols = [("head", "head (Xception)"), ("expert", "expert (EfficientNet)"), ("probe", "probe (ImageNet features)"),
            ("agent_decision", f"agent ({a['combine']}; expert {a['second_expert_weight']:g}, probe {a['imagenet_weight']:g})")]
    cols = [(k, name) for k, name in cols if k in metrics]
    rows = ["| held-out images | n | " + " | ".join(name for _, name in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for t in metrics["head"]:
        rows.append(f"| {t} | {'' if t != 'all' else metrics['n']} | " + " | ".join(f"{metrics[k][t]:.4f}" for k, _ in cols) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    from training.cli import module_main

    module_main("modality-heldout", argv)


if __name__ == "__main__":  # pragma: no cover
    main()
