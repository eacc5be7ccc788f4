"""Retrieval: knowledge-base passages by text, similar cases by image features; all evidence is citable."""

from __future__ import annotations

from agent.nodes.base import NodeOutput
from agent.runtime import Backends
from agent.state import CaseState, Evidence, RetrievalResult
from models.vocabulary import HAM_CLASSES

def _query_text(state: CaseState) -> str:
    parts = [f"{state.modality.label} image."]
    if state.morphology:
        parts.append(state.morphology.description)
    if state.question:
        parts.append(state.question)
    return " ".join(parts)


def case_index_for(state: CaseState, rt: Backends, route) -> tuple[object, object, str]:
    """(case index, query features, index id) for this case: the second visual expert's where the route says
    ``case_features: second_expert`` and the expert and its index exist, else the lesion classifier's."""
    cfg = rt.config.retrieval
    if route.case_features == "second_expert" and state.encoding.expert_features is not None and cfg.expert_case_index is not None:
        index = rt.expert_cases
        if index is not None:
            return index, state.encoding.expert_features, cfg.expert_case_index
    return rt.cases, state.encoding.features, cfg.case_index


def source_mismatch(index, route, modality: str) -> str | None:
    """A warning when the case index holds no record of any of the route's ``case_sources`` (every search would
    come back empty, silently dropping the kNN expert); None when they overlap or the index cannot say."""
    sources = getattr(index, "sources", None)
    if sources is None:
        return None
    sources = list(sources)
    if set(sources) & set(route.case_sources):
        return None
    return (f"case index has no case of the {modality} route's case_sources {list(route.case_sources)} (its sources: {sources or 'none'}): "
            f"similar cases and the kNN expert are unavailable; use --set routing.{modality}.case_sources=[{','.join(sources) or '...'}] "
            f"or rebuild the index with a source in {list(route.case_sources)}")


def retrieve(state: CaseState, rt: Backends) -> NodeOutput:
    cfg = rt.config.retrieval
    modality = state.modality.label
    query = _query_text(state)
    evidence: list[Evidence] = []
    notes: list[str] = []
    knn_probs: dict[str, float] = {}
    warnings: list[str] = []

    if cfg.k_knowledge:
        kb_modality = modality if modality in ("clinical", "dermoscopy", "histopathology") else None
        for hit in rt.kb.search(query, k=cfg.k_knowledge, modality=kb_modality):
            evidence.append(
                Evidence(
                    id=hit["id"], kind="knowledge", title=hit["title"], text=hit["text"],
                    label=hit.get("ham_class") or hit.get("entry_id"), source=hit.get("source", "dermgraph-kb"), score=float(hit["score"]),
                )
            )

    route = rt.config.route(modality)
    case_index_id = cfg.case_index
    if cfg.k_cases and route.case_sources and state.encoding is not None:
        from retrieval.cases import knn_label_distribution

        index, query_features, case_index_id = case_index_for(state, rt, route)
        if warning := source_mismatch(index, route, modality):
            notes.append(warning)
            warnings.append(warning)  # the Diagnosis shows it with the input warnings
        same = index.search(query_features[None], k=cfg.k_cases, exclude_ids=state.exclude_cases or None, sources=route.case_sources)[0]
        for h in same:
            evidence.append(
                Evidence(
                    id=f"case:{h.id}", kind="case", title=f"Similar case ({h.record.get('source')})", text=h.record.get("caption", ""),
                    label=h.record.get("label"), source=h.record.get("source", "case-index"), score=float(h.score),
                )
            )
        labels = list(HAM_CLASSES) if route.classifier else sorted({h.record.get("label") for h in same if h.record.get("label")})
        if same and labels:
            knn_probs = {k: round(float(v), 5) for k, v in knn_label_distribution(same, labels, cfg.knn_temperature).items()}

    result = RetrievalResult(evidence=evidence, knn_probs=knn_probs, query=query, warnings=warnings)
    return NodeOutput(
        {"retrieval": result},
        inputs={"query": query[:300], "modality": modality},
        model_id=f"kb:{getattr(rt.kb, 'model_id', cfg.text_embedder)} + cases:{case_index_id}",
        notes=notes,
    )
