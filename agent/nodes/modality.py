"""Modality classifier: clinical / dermoscopy / histopathology, or reject (not skin / unusable)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from agent.nodes.base import NodeOutput
from agent.runtime import Backends
from agent.state import CaseState, ModalityResult


def _rounded(classes: Sequence[str], p: np.ndarray) -> dict[str, float]:
    return {c: round(float(v), 4) for c, v in zip(classes, p)}


def modality_inputs(features: np.ndarray, stats: np.ndarray) -> np.ndarray:
    """The modality head's input vector: pooled features and colour/texture statistics."""
    return np.concatenate([np.asarray(features, np.float32).ravel(), np.asarray(stats, np.float32).ravel()])[None]


def combine_opinions(head: np.ndarray, others: Sequence[tuple[np.ndarray | None, float]], rule: str = "geometric") -> np.ndarray:
    """The modality decision's probabilities from the head's and the other opinions' ((probabilities or None, weight)
    pairs, same class order; rows or one vector): each present opinion keeps its weight, the head has the rest; the
    weighted geometric mean (renormalised, probabilities floored at 1e-6) or the weighted arithmetic mean."""
    present = [(np.asarray(p, float), w) for p, w in others if p is not None and w > 0]
    parts = [(np.asarray(head, float), 1.0 - sum(w for _, w in present)), *present]
    if rule == "arithmetic":
        return sum(w * p for p, w in parts)
    z = sum(w * np.log(np.maximum(p, 1e-6)) for p, w in parts)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def classify_modality(state: CaseState, rt: Backends) -> NodeOutput:
    cfg = rt.config.modality
    heads = rt.modality_heads
    encoder = rt.modality_encoder
    # A head trained on a fine-tuned encoder reads that encoder's features, not the shared ones.
    features = state.encoding.features if encoder is None else encoder.embed_images([state.image])[0]
    x = modality_inputs(features, state.encoding.stats)
    head = heads.heads["modality"]
    p_head = heads.predict_proba(x)["modality"][0]
    uses = ("shared encoder" if encoder is None else f"fine-tuned encoder {encoder.model_id}") + " features + colour/texture stats"
    opinions: dict[str, dict[str, float]] = {"head": _rounded(head.classes, p_head)}
    probe = rt.modality_probe if cfg.imagenet_weight > 0 else None  # a test double given for the role is used whatever imagenet_probe names
    p_probe = p_expert = None
    if probe is not None:
        # Frozen ImageNet features were never fitted to a skin data set: a source neither network saw looks less foreign to them.
        row = probe.predict([state.image])[0]
        p_probe = np.array([float(row[probe.classes.index(c)]) for c in head.classes])
        opinions["imagenet_probe"] = _rounded(head.classes, p_probe)
    expert = state.encoding.expert_probs.get("effnet_modality")
    if expert and cfg.second_expert_weight > 0:
        p_expert = np.array([expert.get(c, 0.0) for c in head.classes])
        opinions["second_expert"] = _rounded(head.classes, p_expert)
    others = [(p_probe, cfg.imagenet_weight), (p_expert, cfg.second_expert_weight)]
    p = combine_opinions(p_head, others, cfg.combine)
    if len(opinions) > 1:
        names = {"imagenet_probe": f"the modality probe {getattr(probe, 'model_id', '')}".rstrip(), "second_expert": "the second visual expert's modality head"}
        shares = {"imagenet_probe": cfg.imagenet_weight, "second_expert": cfg.second_expert_weight}
        parts = [f"the head ({1 - sum(shares[k] for k in opinions if k != 'head'):.2f})"] + [f"{names[k]} ({shares[k]:.2f})" for k in opinions if k != "head"]
        uses += f"; decided by the {cfg.combine} mean of " + ", ".join(parts)
    probs = _rounded(head.classes, p)
    label = head.classes[int(p.argmax())]
    conf = float(p.max())
    ood = heads.ood_score(x)
    ood_score = None if ood is None else float(ood[0])
    notes: list[str] = []
    rejected, reason = False, None
    if label == "not_skin":
        rejected, reason = True, f"the modality classifier judges this not to be a skin image (p={conf:.2f})"
    elif cfg.ood_reject and ood_score is not None and ood_score > heads.ood.threshold:
        rejected = True
        reason = (
            f"image features are far from every image type the agent knows "
            f"(OOD score {ood_score:.1f} > threshold {heads.ood.threshold:.1f})"
        )
    if conf < cfg.min_confidence and not rejected:
        notes.append(f"modality uncertain (p={conf:.2f} < {cfg.min_confidence})")
    result = ModalityResult(
        label="not_skin" if rejected else label,
        confidence=conf,
        probs=probs,
        ood_score=ood_score,
        rejected=rejected,
        reason=reason,
    )
    return NodeOutput(
        {"modality": result},
        inputs={"uses": uses, "opinions": opinions},
        model_id="+".join([str(heads.meta.get("id", rt.config.modality.head)), *([probe.model_id] if probe is not None else [])]),
        notes=notes,
    )
