"""Encode: run the lesion classifier / image encoder once; later nodes reuse its features."""

from __future__ import annotations

from agent.nodes.base import NodeOutput
from agent.runtime import Backends
from agent.state import CaseState, ImageEncoding


def encode(state: CaseState, rt: Backends) -> NodeOutput:
    from models.image_stats import image_stats

    meta = state.metadata.as_dict() if state.metadata else None
    out = rt.classifier.predict([state.image], [meta])
    probs = {label: float(p) for label, p in zip(out.labels, out.probs[0])}
    enc = ImageEncoding(
        model_id=rt.classifier.model_id,
        classifier_probs=probs,
        features=out.features[0],
        stats=image_stats(state.image),
    )
    return NodeOutput(
        {"encoding": enc},
        inputs={"image_size": list(state.image_size), "metadata": meta or {}},
        model_id=rt.classifier.model_id,
    )
