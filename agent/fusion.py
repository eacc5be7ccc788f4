"""The previous default fusion (9 scalars), a product of experts over candidate diagnoses:

log p(c) ∝ w_clf·log p_classifier(c) + w_knn·log p_knn(c) + w_llm·log p_llm(c) + bias(c)

Kept for the prompt's classifier display (``agent.nodes.reason.classifier_display``) and as the baseline
``dermgraph train fusion`` compares with; the agent fuses with ``models.stacker``. A missing expert drops out.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

EPS = 1e-4


def fuse(
    candidates: Sequence[str],
    params: Mapping,
    *,
    classifier: Mapping[str, float] | None = None,
    knn: Mapping[str, float] | None = None,
    llm: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Fused probabilities over ``candidates`` (sum to 1), sorted by decreasing probability."""
    eps = float(params.get("eps", EPS))
    bias = params.get("bias", {})
    logits = {}
    for c in candidates:
        z = float(bias.get(c, 0.0))
        if classifier is not None:
            z += float(params.get("w_classifier", 1.0)) * math.log(max(classifier.get(c, 0.0), eps))
        if knn is not None:
            z += float(params.get("w_knn", 0.0)) * math.log(max(knn.get(c, 0.0), eps))
        if llm is not None:
            z += float(params.get("w_llm", 0.0)) * math.log(max(llm.get(c, 0.0), eps))
        logits[c] = z
    m = max(logits.values())
    exp = {c: math.exp(z - m) for c, z in logits.items()}
    total = sum(exp.values())
    return dict(sorted(((c, v / total) for c, v in exp.items()), key=lambda kv: -kv[1]))


def softmax_scores(scores: Mapping[str, float]) -> dict[str, float]:
    """Normalise log-scores (e.g. LLM continuation log-probs) into probabilities."""
    m = max(scores.values())
    exp = {k: math.exp(v - m) for k, v in scores.items()}
    total = sum(exp.values())
    return {k: v / total for k, v in exp.items()}
