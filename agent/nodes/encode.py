"""Encode: run the lesion classifier / image encoder once (and the second visual expert, when configured);
later nodes reuse what they saw."""

from __future__ import annotations

from typing import Any, Sequence

from agent.nodes.base import NodeOutput
from agent.runtime import Backends
from agent.state import CaseState, ImageEncoding


def dermnet_label_probs(classes: Sequence[str], probs: Sequence[float], knowledge: Any) -> dict[str, float]:
    """A DermNet head's probabilities under the labels the case index uses: the HAM10000 code where the
    knowledge base maps the DermNet class to one (summed when several do), else the DermNet name."""
    out: dict[str, float] = {}
    for c, p in zip(classes, probs):
        key = knowledge.ham_class_for(c) or c
        out[key] = out.get(key, 0.0) + float(p)
    return out


def second_expert_outputs(expert: Any, image: Any, knowledge: Any) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], Any]:
    """``ImageEncoding.expert_probs``, ``expert_criteria`` and ``expert_features`` of one image: the expert's HAM10000
    head as 'effnet', its DermNet head (if it has one) as 'effnet_dermnet', its 7-point criteria heads, and its pooled
    features. The expert gives ``predict_heads`` and ``info['heads']`` (:class:`models.efficientnet.EfficientNetExpert`)."""
    feats, probs = expert.predict_heads([image])
    if not probs:  # no opinion on this image (a replayed expert whose outputs there would be in-sample)
        return {}, {}, None
    one = {h: v[0] for h, v in probs.items()}
    heads = expert.info["heads"]
    return expert_probs_from_heads(heads, one, knowledge), expert_criteria_from_heads(heads, one), None if feats is None else feats[0]


def expert_criteria_from_heads(heads: dict[str, Sequence[str]], probs: dict[str, Sequence[float]]) -> dict[str, dict[str, float]]:
    """``ImageEncoding.expert_criteria``: criterion -> value -> probability from the expert's ``crit_<criterion>`` heads."""
    return {h.removeprefix("crit_"): {c: round(float(p), 6) for c, p in zip(heads[h], probs[h])} for h in heads if h.startswith("crit_") and h in probs}


def expert_probs_from_heads(heads: dict[str, Sequence[str]], probs: dict[str, Sequence[float]], knowledge: Any) -> dict[str, dict[str, float]]:
    """``ImageEncoding.expert_probs`` from one image's head outputs (head -> probabilities in ``heads[head]``
    order): 'effnet' (HAM10000 head), 'effnet_dermnet' (DermNet head under the case index's labels) and
    'effnet_modality' (its modality head)."""
    out = {"effnet": {c: round(float(p), 6) for c, p in zip(heads["ham"], probs["ham"])}}
    if "dermnet" in probs and "dermnet" in heads:
        out["effnet_dermnet"] = {c: round(p, 6) for c, p in dermnet_label_probs(heads["dermnet"], probs["dermnet"], knowledge).items()}
    if "modality" in probs and "modality" in heads:
        out["effnet_modality"] = {c: round(float(p), 6) for c, p in zip(heads["modality"], probs["modality"])}
    return out


def wants_probe(expert_probs: dict[str, dict[str, float]]) -> bool:
    """Whether the clinical probe runs on an image: where the second expert's modality head ranks 'clinical' first,
    or on every image without that head (the probe only speaks to clinical photos, so dermoscopy skips its pass)."""
    head = expert_probs.get("effnet_modality")
    return not head or max(head, key=head.get) == "clinical"


def probe_wanted(rt: Backends, image: Any) -> bool:
    """Whether the encode node runs the clinical probe on ``image`` under this runtime (its second expert asked again:
    the batched path calls this after caching the expert's outputs)."""
    if rt.clinical_probe is None:
        return False
    return wants_probe(second_expert_outputs(rt.second_expert, image, rt.knowledge)[0] if rt.second_expert is not None else {})


def probe_outputs(probe: Any, image: Any, lesion_features: Any, knowledge: Any) -> dict[str, float]:
    """The clinical probe's DermNet distribution for one image under the case index's labels ('probe_dermnet')."""
    probs = probe.predict([image], [lesion_features])[0]
    return {c: round(p, 6) for c, p in dermnet_label_probs(probe.classes, probs, knowledge).items()}


def second_expert_head(state: CaseState, config: Any) -> dict[str, float] | None:
    """The second expert's distribution that speaks to this case's modality: its HAM10000 head where the route has
    the lesion classifier (dermoscopy), else its DermNet head (clinical photos); None without the expert."""
    if state.encoding is None or state.modality is None:
        return None
    return state.encoding.expert_probs.get("effnet" if config.route(state.modality.label).classifier else "effnet_dermnet")


def encode(state: CaseState, rt: Backends) -> NodeOutput:
    from models.image_stats import image_stats

    meta = state.metadata.as_dict() if state.metadata else None
    out = rt.classifier.predict([state.image], [meta])
    probs = {label: float(p) for label, p in zip(out.labels, out.probs[0])}
    second = rt.second_expert
    views = rt.config.encoder.tta_views
    tta = []
    if views:
        from models.tta import tta_view

        res = rt.classifier.predict([tta_view(state.image, v) for v in views], [meta] * len(views))
        tta = [{label: round(float(p), 6) for label, p in zip(res.labels, row)} for row in res.probs]
    expert_probs, expert_criteria, expert_features = second_expert_outputs(second, state.image, rt.knowledge) if second is not None else ({}, {}, None)
    probe = rt.clinical_probe
    probe = probe if probe is not None and wants_probe(expert_probs) else None
    if probe is not None:
        expert_probs["probe_dermnet"] = probe_outputs(probe, state.image, out.features[0], rt.knowledge)
    enc = ImageEncoding(
        model_id=rt.classifier.model_id,
        classifier_probs=probs,
        features=out.features[0],
        stats=image_stats(state.image),
        expert_probs=expert_probs,
        expert_criteria=expert_criteria,
        expert_features=expert_features,
        tta_probs=tta,
    )
    return NodeOutput(
        {"encoding": enc},
        inputs={"image_size": list(state.image_size), "metadata": meta or {}},
        model_id="+".join([rt.classifier.model_id, *(m.model_id for m in (second, probe) if m is not None)]),
    )
