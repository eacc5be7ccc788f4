"""Diagnosis reasoner: the LLM ranks the candidates from the evidence and writes a cited rationale.

Scoring backends (transformers, vLLM) give the LLM's distribution over candidates by scoring each
candidate as the continuation of ``Diagnosis: ``: decoding is constrained to the candidate list, so the
output is always well formed. Backends that cannot score are asked for JSON with retries. The LLM's
distribution is fused with the classifier and retrieved cases by calibrated weights (``agent.fusion``);
when the LLM output is unusable the node falls back to the fusion of the other experts and says so.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from agent.config import AgentConfig
from agent.consistency import morphology_agreement
from agent.fusion import fuse, softmax_scores
from agent.nodes.base import NodeOutput
from agent.prompts import DIAGNOSIS_PREFIX, RATIONALE_FIELD, TAG, conversation, evidence_tags, render_user, usable_rationale
from agent.runtime import Backends
from agent.state import CaseState, DifferentialItem, ReasonerResult
from models.vocabulary import HAM_CLASSES, HAM_NAMES

class LLMAnswer(BaseModel):
    """JSON answer requested from backends that cannot score continuations."""

    diagnosis: str
    differential: dict[str, float] = Field(default_factory=dict, description="candidate name → probability")
    rationale: str = ""


def candidates_for(state: CaseState, config: AgentConfig) -> tuple[list[str], dict[str, str]]:
    """Candidate labels and their display names: the classifier's classes where the modality's route
    has the classifier, else the labels of the retrieved cases (at most ``reasoner.max_candidates``)."""
    if config.route(state.modality.label).classifier:
        return list(HAM_CLASSES), dict(HAM_NAMES)
    max_candidates = config.reasoner.max_candidates
    knn = state.retrieval.knn_probs if state.retrieval else {}
    labels = [c for c, _ in sorted(knn.items(), key=lambda kv: -kv[1])][:max_candidates]
    if not labels and state.retrieval:
        labels = list(dict.fromkeys(ev.label for ev in state.retrieval.evidence if ev.label))[:max_candidates]
    return labels, {c: HAM_NAMES.get(c, c) for c in labels}


def classifier_display(state: CaseState, rt, candidates: list[str]) -> dict[str, float] | None:
    """The classifier's probabilities as the prompt shows them: temperature-scaled by the fusion's
    ``w_classifier`` (modalities routed to the classifier only; None otherwise). Training renders cases
    with this same function."""
    clf = state.encoding.classifier_probs if rt.config.route(state.modality.label).classifier and state.encoding else None
    if not clf:
        return None
    params = rt.fusion.get(state.modality.label, {})
    return fuse(candidates, {"w_classifier": params.get("w_classifier", 1.0)}, classifier=clf)


def expected_agreements(state: CaseState, rt, candidates: list[str]) -> dict[str, float]:
    """Morphology agreement of each candidate with the observed findings (candidates with KB expectations only)."""
    if not state.morphology or not state.morphology.findings:
        return {}
    observed = {f.criterion: f.probs for f in state.morphology.findings}
    out = {}
    for c in candidates:
        entry = rt.knowledge.entry_for_label(c)
        if entry is not None and entry.expected_7pt:
            score = morphology_agreement(observed, entry.expected_7pt)
            if score is not None:
                out[c] = score
    return out


def _llm_probs(rt, state, cands, names, clf_display, feedback, seed) -> dict[str, float]:
    conv = conversation(render_user(state, cands, names, clf_display, feedback, shuffle_seed=seed))
    scores = rt.llm.score_continuations(conv, DIAGNOSIS_PREFIX, [names[c] for c in cands])
    return softmax_scores(dict(zip(cands, map(float, scores))))


def _json_answer(rt, state, cands, names, clf_display, feedback, retries) -> tuple[dict[str, float] | None, str, list[str]]:
    from models.structured import generate_structured

    conv = conversation(
        render_user(state, cands, names, clf_display, feedback)
        + '\nAnswer as JSON: {"diagnosis": "...", "differential": {"<candidate>": <probability>, ...}, "rationale": "..."}'
    )
    result = generate_structured(rt.llm, conv, LLMAnswer, retries=retries, max_new_tokens=256)
    notes = [f"attempt {i + 1}: {a.get('error')}" for i, a in enumerate(result.attempts) if a.get("error")]
    if result.value is None:
        return None, "", notes
    by_name = {names[c].lower(): c for c in cands} | {c.lower(): c for c in cands}
    probs = {by_name[k.lower()]: max(float(v), 0.0) for k, v in result.value.differential.items() if k.lower() in by_name}
    top = by_name.get(result.value.diagnosis.lower())
    if top and top not in probs:
        probs[top] = max(probs.values(), default=0.0) + 0.1
    total = sum(probs.values())
    if not probs or total <= 0:
        return None, "", notes + ["answer named no valid candidate"]
    return {c: probs.get(c, 0.0) / total for c in cands}, result.value.rationale, notes


def _rationale(rt, state, cands, names, clf_display, feedback, top_name, cfg) -> tuple[str | None, int]:
    conv = conversation(render_user(state, cands, names, clf_display, feedback))
    prefix = f"{DIAGNOSIS_PREFIX}{top_name}{RATIONALE_FIELD}"
    for attempt in range(cfg.retries + 1):
        temperature = 0.0 if attempt == 0 else 0.7
        text = rt.llm.chat([conv], max_new_tokens=cfg.rationale_tokens, temperature=temperature, seed=rt.config.seed + attempt,
                           assistant_prefix=prefix, stop=["\n"])[0]
        if usable_rationale(text):
            return text.strip(), attempt + 1
    return None, cfg.retries + 1


def _cite(text: str, tags: dict[str, str]) -> tuple[str, list[str]]:
    cited = [tags[t] for t in TAG.findall(text) if t in tags]
    return TAG.sub(lambda m: f"[{tags[m.group(1)]}]" if m.group(1) in tags else "", text), list(dict.fromkeys(cited))


def _supporting(state: CaseState, rt, label: str, k: int = 3) -> list[str]:
    """Evidence about ``label`` (cases with that label, KB passages on its entry), best first."""
    if not state.retrieval:
        return []
    entry = rt.knowledge.entry_for_label(label)
    keys = {label} | ({entry.id, entry.ham_class} - {None} if entry is not None else set())
    evs = [ev for ev in state.retrieval.evidence if ev.label in keys]
    return [ev.id for ev in sorted(evs, key=lambda e: -e.score)[:k]]


def reason(state: CaseState, rt: Backends) -> NodeOutput:
    cfg = rt.config.reasoner
    round_ = state.round + 1
    feedback = state.verification.feedback if state.verification and state.verification.decision == "revise" else None
    cands, names = candidates_for(state, rt.config)
    params = rt.fusion.get(state.modality.label, {})
    clf = state.encoding.classifier_probs if rt.config.route(state.modality.label).classifier else None
    clf_display = classifier_display(state, rt, cands)
    knn = state.retrieval.knn_probs or None if state.retrieval else None
    agreements = expected_agreements(state, rt, cands) if feedback else None
    morph_w = float(params.get("w_morphology_on_revise", 1.0)) if feedback else 0.0
    notes: list[str] = []
    tags = evidence_tags(state.retrieval.evidence) if state.retrieval else {}

    llm_probs, llm_text, source, samples = None, "", "llm", []
    try:
        llm_probs = _llm_probs(rt, state, cands, names, clf_display, feedback, seed=None)
        for i in range(1, cfg.num_samples):
            p_i = _llm_probs(rt, state, cands, names, clf_display, feedback, seed=rt.config.seed + i)
            fused_i = fuse(cands, params, classifier=clf, knn=knn, llm=p_i, agreement=agreements, morph_weight=morph_w)
            samples.append(next(iter(fused_i)))
    except NotImplementedError:
        notes.append("backend cannot score continuations: asked for JSON")
        llm_probs, llm_text, json_notes = _json_answer(rt, state, cands, names, clf_display, feedback, cfg.retries)
        notes += json_notes
    if llm_probs is None:
        source = "fallback"
        notes.append("LLM output unusable after retries: evidence-fusion ranking used")

    fused = fuse(cands, params, classifier=clf, knn=knn, llm=llm_probs, agreement=agreements, morph_weight=morph_w)
    top = next(iter(fused))
    samples = [top] + samples
    if source == "fallback" or cfg.num_samples == 1:
        # Without LLM re-scorings, confidence consistency is the agreement of each available single
        # expert (classifier, retrieved cases, the LLM's own ranking) with the fused answer.
        experts = {"classifier": clf, "knn": knn, "llm": llm_probs}
        samples += [max(p, key=p.get) for p in experts.values() if p]

    rationale, cited = "", []
    if source == "llm":
        if llm_text and usable_rationale(llm_text):
            rationale = llm_text
        else:
            text, attempts = _rationale(rt, state, cands, names, clf_display, feedback, names[top], cfg)
            if text is None:
                notes.append(f"rationale unusable after {attempts} attempts: evidence summary used instead")
            else:
                rationale = text
        rationale, cited = _cite(rationale, tags)
    support = _supporting(state, rt, top)
    if not rationale:
        clf_txt = f"classifier {clf_display[top]:.2f}" if clf_display and top in clf_display else "no classifier"
        knn_txt = f"similar cases {knn.get(top, 0):.2f}" if knn else "no similar cases"
        rationale = f"Evidence fusion ranks {names[top]} first ({clf_txt}; {knn_txt})."
    missing = [i for i in support if i not in cited]
    if missing:
        rationale += " Supporting evidence: " + ", ".join(f"[{i}]" for i in missing) + "."
        cited += missing

    differential = [DifferentialItem(label=c, name=names[c], probability=p) for c, p in fused.items()]
    result = ReasonerResult(
        differential=differential,
        rationale=rationale.strip(),
        cited=cited,
        source=source,
        llm_probs={c: round(v, 5) for c, v in llm_probs.items()} if llm_probs else None,
        samples=samples,
        round=round_,
        notes=notes,
    )
    return NodeOutput(
        {"reasoning": result, "round": round_},
        inputs={
            "candidates": cands,
            "evidence_ids": list(tags.values()),
            "feedback": feedback,
            "classifier_top": max(clf, key=clf.get) if clf else None,
        },
        model_id=getattr(rt.llm, "model_id", None),
        notes=notes,
    )
