"""Modality classifier: clinical / dermoscopy / histopathology, or reject (not skin / unusable)."""

from __future__ import annotations

import numpy as np

from agent.nodes.base import NodeOutput
from agent.runtime import Backends
from agent.state import CaseState, ModalityResult


def modality_inputs(features: np.ndarray, stats: np.ndarray) -> np.ndarray:
    """The modality head's input vector: pooled features and colour/texture statistics."""
    return np.concatenate([np.asarray(features, np.float32).ravel(), np.asarray(stats, np.float32).ravel()])[None]


def classify_modality(state: CaseState, rt: Backends) -> NodeOutput:
    cfg = rt.config.modality
    heads = rt.modality_heads
    encoder = rt.modality_encoder
    # A head trained on a fine-tuned encoder reads that encoder's features, not the shared ones.
    features = state.encoding.features if encoder is None else encoder.embed_images([state.image])[0]
    x = modality_inputs(features, state.encoding.stats)
    head = heads.heads["modality"]
    p = heads.predict_proba(x)["modality"][0]
    uses = ("shared encoder" if encoder is None else f"fine-tuned encoder {encoder.model_id}") + " features + colour/texture stats"
    expert = state.encoding.expert_probs.get("effnet_modality")
    if expert and cfg.second_expert_weight > 0:
        # Two views of the question: the head misses tight close-ups (centre-30% crops), the expert some whole images.
        w = cfg.second_expert_weight
        p = (1 - w) * p + w * np.array([expert.get(c, 0.0) for c in head.classes])
        uses += f", mean with the second visual expert's modality head (weight {w:g})"
    probs = {c: round(float(v), 4) for c, v in zip(head.classes, p)}
    label = head.classes[int(p.argmax())]
    conf = float(p.max())
    ood = heads.ood_score(x)
    ood_score = None if ood is None else float(ood[0])
    notes: list[str] = []
    rejected, reason = False, None
    if label == "not_skin":
        rejected, reason = True, f"the modality head judges this not to be a skin image (p={conf:.2f})"
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
        inputs={"uses": uses},
        model_id=heads.meta.get("id", rt.config.modality.head),
        notes=notes,
    )
