"""Diagnosis reasoner: every expert's distribution over the candidates, a calibrated stacker, a conformal
prediction set, and the reasoning as checkable steps.

Experts: the lesion classifier (dermoscopy), similar cases (kNN votes), the findings model
(P(diagnosis | 7-point findings), learned from Derm7pt) and the LLM. Scoring backends (transformers,
vLLM) give the LLM's distribution by scoring each candidate as the continuation of ``Diagnosis: ``;
backends that cannot score are asked for JSON with retries. The stacker (``models.stacker``, fitted by
``dermgraph train fusion`` on images the classifier has not seen) fuses them; a missing expert
contributes nothing and the steps say so. The rationale is rendered from the steps; the LLM's own
summary is shown only when it passes the claim check (``agent.claims``).
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

from pydantic import BaseModel, Field

from agent.config import AgentConfig
from agent.fusion import fuse, softmax_scores
from agent.nodes.base import NodeOutput
from agent.nodes.encode import second_expert_head
from agent.prompts import DIAGNOSIS_PREFIX, EVIDENCE_TAG, RATIONALE_FIELD, conversation, evidence_tags, render_user, usable_rationale
from agent.runtime import Backends
from agent.state import CaseState, DifferentialItem, ReasonerResult
from agent.steps import (
    case_evidence_ids,
    consulted_passage,
    expert_steps,
    fusion_step,
    knowledge_step,
    observation_steps,
    observed_findings,
    render_rationale,
)
from models.vocabulary import HAM_CLASSES, HAM_NAMES


class LLMAnswer(BaseModel):
    """JSON answer requested from backends that cannot score continuations."""

    diagnosis: str
    differential: dict[str, float] = Field(default_factory=dict, description="candidate name → probability")
    rationale: str = ""


CANDIDATE_HEADS = {"effnet": "effnet_dermnet", "probe": "probe_dermnet"}
"""The clinical stacker's experts that propose candidates, and the ``ImageEncoding.expert_probs`` head each reads."""


def candidates_for(state: CaseState, config: AgentConfig, extra_from_experts: Mapping[str, int] | None = None) -> tuple[list[str], dict[str, str]]:
    """Candidate labels and their display names: the classifier's classes where the modality's route
    has the classifier, else the labels of the retrieved cases (at most ``reasoner.max_candidates``), plus
    each proposing head's most probable labels not already among them: ``extra_from_experts`` maps an
    ``expert_probs`` head ('effnet_dermnet', 'probe_dermnet') to how many, as the fusion artifact's clinical
    stacker was fitted (:func:`expert_candidates`)."""
    max_candidates = config.reasoner.max_candidates
    if config.route(state.modality.label).classifier:
        return list(HAM_CLASSES), dict(HAM_NAMES)
    knn = state.retrieval.knn_probs if state.retrieval else {}
    labels = [c for c, _ in sorted(knn.items(), key=lambda kv: -kv[1])][:max_candidates]
    if not labels and state.retrieval:
        labels = list(dict.fromkeys(ev.label for ev in state.retrieval.evidence if ev.label))[:max_candidates]
    for key, n in (extra_from_experts or {}).items():
        head = state.encoding.expert_probs.get(key) if state.encoding and n else None
        if head:
            labels += [c for c in sorted(head, key=lambda c: -head[c]) if c not in labels][:n]
    return labels, {c: HAM_NAMES.get(c, c) for c in labels}


def expert_candidates(model, modality: str) -> dict[str, int]:
    """How many candidates the fusion artifact's stacker for ``modality`` takes from each proposing head
    (:data:`CANDIDATE_HEADS` of the experts it reads, in that order)."""
    mf = model.modalities.get(modality)
    n = int(mf.meta.get("extra_candidates", 0)) if mf is not None else 0
    return {head: n for e, head in CANDIDATE_HEADS.items() if n and e in mf.experts}


def classifier_display(state: CaseState, rt, candidates: list[str]) -> dict[str, float] | None:
    """The classifier's probabilities as the prompt shows them: raised to the power
    ``reasoner.classifier_display_weight`` and renormalised (modalities routed to the classifier only; None
    otherwise). Training renders cases with this same function."""
    clf = state.encoding.classifier_probs if rt.config.route(state.modality.label).classifier and state.encoding else None
    if not clf:
        return None
    return fuse(candidates, {"w_classifier": rt.config.reasoner.classifier_display_weight}, classifier=clf)


def second_expert_display(state: CaseState, rt, candidates: list[str]) -> dict[str, float] | None:
    """The second visual expert's distribution as the prompt shows it: renormalised over the candidates (None
    without the expert). Training renders cases with this same function."""
    head = second_expert_head(state, rt.config)
    if not head:
        return None
    probs = {c: float(head.get(c, 0.0)) for c in candidates}
    total = sum(probs.values())
    return {c: v / total for c, v in probs.items()} if total > 0 else None


def llm_conversation(state: CaseState, rt, cands: list[str], names: dict[str, str], clf_display: dict[str, float] | None,
                     feedback: str | None = None, seed: int | None = None, suffix: str = "") -> list[dict[str, str]]:
    """The chat the reasoner LLM gets for this state (training data and evaluations render exactly this)."""
    user = render_user(state, cands, names, clf_display, feedback, shuffle_seed=seed, second_expert=second_expert_display(state, rt, cands))
    return conversation(user + suffix)


def reasoner_inputs(state: CaseState, rt) -> dict[str, Any]:
    """What the reasoner LLM is shown for a state after retrieval, and what checking its answer needs: the
    chat (``prompt``), the candidates (display names and labels), the evidence tags and ids, the observed
    findings (``{criterion: {value: p}}``) and the knowledge base's expected findings per candidate name. Training
    data (``training.reasoner_data``) and the reasoner evaluation (``evals.protocols.reasoner``) render this."""
    cands, names = candidates_for(state, rt.config)
    clf_display = classifier_display(state, rt, cands)
    tags = evidence_tags(state.retrieval.evidence) if state.retrieval else {}
    order = sorted(tags, key=lambda t: int(t[1:]))
    return {
        "prompt": llm_conversation(state, rt, cands, names, clf_display),
        "candidates": [names[c] for c in cands],
        "candidate_labels": list(cands),
        "names": names,
        "classifier_display": clf_display,
        "tags": order,
        "evidence_ids": [tags[t] for t in order],
        "classifier_top": names[max(clf_display, key=clf_display.get)] if clf_display else "",
        "observed": {f.criterion: f.probs for f in state.morphology.findings} if state.morphology else {},
        "expected": {names[c]: dict(e.expected_7pt) for c in cands if (e := rt.knowledge.entry_for_label(c)) is not None},
    }


def _llm_probs(rt, state, cands, names, clf_display, feedback, seed) -> dict[str, float]:
    conv = llm_conversation(state, rt, cands, names, clf_display, feedback, seed)
    scores = rt.llm.score_continuations(conv, DIAGNOSIS_PREFIX, [names[c] for c in cands])
    return softmax_scores(dict(zip(cands, map(float, scores))))


def _json_answer(rt, state, cands, names, clf_display, feedback, retries) -> tuple[dict[str, float] | None, str, list[str]]:
    from models.structured import generate_structured

    conv = llm_conversation(state, rt, cands, names, clf_display, feedback,
                            suffix='\nAnswer as JSON: {"diagnosis": "...", "differential": {"<candidate>": <probability>, ...}, "rationale": "..."}')
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
    conv = llm_conversation(state, rt, cands, names, clf_display, feedback)
    prefix = f"{DIAGNOSIS_PREFIX}{top_name}{RATIONALE_FIELD}"
    for attempt in range(cfg.retries + 1):
        temperature = 0.0 if attempt == 0 else 0.7
        text = rt.llm.chat([conv], max_new_tokens=cfg.rationale_tokens, temperature=temperature, seed=rt.config.seed + attempt,
                           assistant_prefix=prefix, stop=["\n"])[0]
        if usable_rationale(text):
            return text.strip(), attempt + 1
    return None, cfg.retries + 1


def _cite(text: str, tags: dict[str, str]) -> tuple[str, list[str]]:
    cited = [tags[t] for t in EVIDENCE_TAG.findall(text) if t in tags]
    return EVIDENCE_TAG.sub(lambda m: f"[{tags[m.group(1)]}]" if m.group(1) in tags else "", text), list(dict.fromkeys(cited))


def _supporting(state: CaseState, rt, label: str, k: int = 3) -> list[str]:
    """Evidence about ``label`` (cases with that label, KB passages on its entry), best first."""
    if not state.retrieval:
        return []
    entry = rt.knowledge.entry_for_label(label)
    keys = {label} | ({entry.id, entry.ham_class} - {None} if entry is not None else set())
    evs = [ev for ev in state.retrieval.evidence if ev.label in keys]
    return [ev.id for ev in sorted(evs, key=lambda e: -e.score)[:k]]


def _experts(state: CaseState, rt, model, cands: list[str]) -> dict[str, dict[str, float] | None]:
    """Every non-LLM expert's distribution over ``cands`` that the modality's stacker reads."""
    mod = state.modality.label
    mf = model.modalities[mod]
    out: dict[str, dict[str, float] | None] = {}
    if "classifier" in mf.experts:
        out["classifier"] = dict(state.encoding.classifier_probs) if state.encoding and rt.config.route(mod).classifier else None
    if "knn" in mf.experts:
        out["knn"] = dict(state.retrieval.knn_probs) if state.retrieval and state.retrieval.knn_probs else None
    if "effnet" in mf.experts:
        out["effnet"] = second_expert_head(state, rt.config)
    if "probe" in mf.experts:
        out["probe"] = state.encoding.expert_probs.get("probe_dermnet") if state.encoding and not rt.config.route(mod).classifier else None
    if "morphology" in mf.experts:
        observed = observed_findings(state)
        out["morphology"] = model.morphology_expert.predict(observed) if model.morphology_expert is not None and observed else None
    return out


def _knowledge(state: CaseState, rt, labels: list[str], names: dict[str, str]):
    """Knowledge steps (and the passages they cite) for ``labels``."""
    observed = observed_findings(state)
    retrieved = {e.id for e in state.retrieval.evidence} if state.retrieval else set()
    steps, consulted = [], []
    for c in labels:
        entry = rt.knowledge.entry_for_label(c)
        if entry is None:
            continue
        passage = consulted_passage(entry, state.modality.label)
        if passage is None:
            continue
        if state.modality.label == "dermoscopy" and entry.expected_7pt and observed:
            steps.append(knowledge_step(c, names[c], entry, passage, observed))
        else:
            from agent.state import ReasoningStep

            # No structured findings to compare (clinical photographs): cite the description, do not quote it, since
            # its free text names other diagnoses and features the case has not shown.
            steps.append(ReasoningStep(kind="knowledge", text=f"The knowledge base's {passage.id.split('#')[-1]} description of {names[c]} is cited for the reader [{passage.id}].",
                                       evidence=[passage.id], data={"label": c, "kb_entry": entry.id, "excerpt": _first_sentences(passage.text)}))  # fmt: skip
        if passage.id not in retrieved and passage.id not in {p.id for p in consulted}:
            consulted.append(passage)  # cited like retrieved evidence; a passage retrieval already found is not repeated
    return steps, consulted


def _first_sentences(text: str, limit: int = 220) -> str:
    """Whole sentences of ``text`` up to ``limit`` characters (at least the first)."""
    out = ""
    for sentence in re.split(r"(?<=[.;])\s+", text.strip()):
        if out and len(out) + len(sentence) > limit:
            break
        out = f"{out} {sentence}".strip()
    return out if out.endswith((".", ";")) else out + "."


def _summary(rt, state, cands, names, clf_display, feedback, top, cfg, evidence_ids, tags) -> tuple[str | None, object, int]:
    """The LLM's one-line summary, claim-checked: (text to show or None, the check result, attempts)."""
    from agent.claims import check_text
    from agent.state import ClaimCheckResult

    text, attempts = _rationale(rt, state, cands, names, clf_display, feedback, names[top], cfg)
    if text is None:
        return None, None, attempts
    text, _ = _cite(text, tags)
    observed = observed_findings(state)
    check = check_text(text, candidates=cands, observed=observed, kb=rt.knowledge, evidence_ids=evidence_ids)
    result = ClaimCheckResult(text=text, passed=check.passed, failures=check.reasons())
    return (text if check.passed else None), result, attempts


def reason(state: CaseState, rt: Backends) -> NodeOutput:
    cfg = rt.config.reasoner
    round_ = state.round + 1
    mod = state.modality.label
    feedback = state.verification.feedback if state.verification and state.verification.decision == "revise" else None
    model = rt.fusion
    cands, names = candidates_for(state, rt.config, expert_candidates(model, mod))
    if mod not in model.modalities:
        raise ValueError(f"fusion artifact {cfg.fusion!r} has no stacker for {mod!r} images (calibrated: {', '.join(model.modalities)})")
    mf = model.modalities[mod]
    clf_display = classifier_display(state, rt, cands)
    notes: list[str] = []
    tags = evidence_tags(state.retrieval.evidence) if state.retrieval else {}
    experts = _experts(state, rt, model, cands)

    # The stacker decides; "llm" only when the LLM's scores are among its experts (the default artifact does not read them).
    llm_probs, source, samples = None, "stacker", []
    llm_ran = bool(state.reasoning and state.reasoning.llm_ran)  # an earlier round's LLM run stays recorded
    if "llm" in mf.experts:
        source, llm_ran = "llm", True
        try:
            llm_probs = _llm_probs(rt, state, cands, names, clf_display, feedback, seed=None)
            for i in range(1, cfg.num_samples):
                p_i = _llm_probs(rt, state, cands, names, clf_display, feedback, seed=rt.config.seed + i)
                samples.append(mf.fuse(cands, {**experts, "llm": p_i}).order[0])
        except NotImplementedError:
            notes.append("backend cannot score continuations: asked for JSON")
            llm_probs, _, json_notes = _json_answer(rt, state, cands, names, clf_display, feedback, cfg.retries)
            notes += json_notes
        if llm_probs is None:
            source = "fallback"
            notes.append("LLM output unusable after retries: fused without it")
        experts["llm"] = llm_probs

    fused = mf.fuse(cands, experts)
    order = fused.order  # the decided label first, then by calibrated probability
    top = order[0]
    samples = [top] + samples
    if cfg.num_samples == 1 or source == "fallback":
        # Confidence consistency without LLM re-scorings: agreement of each available single expert with the fused answer.
        samples += [max(p, key=p.get) for p in experts.values() if p]
    group = mf.set_group(state.encoding.features if state.encoding else None)
    pred_set = mf.prediction_set(fused.probs, cfg.conformal_alpha, group)
    set_source = mf.calibration_source
    group_name = None
    if group is not None:
        group_name = mf.set_groups.names[group]
        n_group = int((mf.set_groups.calibration_group == group).sum())
        set_source += f"; threshold from the {n_group} calibration cases whose images look like {group_name}'s"
    set_alpha: float | None = cfg.conformal_alpha
    if math.isinf(mf.qhat(cfg.conformal_alpha, group)):
        recall = mf.meta.get("candidate_recall")
        set_source = (f"{1 - cfg.conformal_alpha:.0%} coverage is not attainable for {mod} images: the candidate list held the true diagnosis in "
                      f"{recall:.0%} of calibration cases; the set is every candidate ({mf.calibration_source})") if recall is not None else \
                     f"{1 - cfg.conformal_alpha:.0%} coverage is not attainable with this calibration; the set is every candidate ({mf.calibration_source})"  # fmt: skip
        notes.append(set_source)
        set_alpha = None
    used = {e: fused.contributions[e] for e in fused.experts_used if e in fused.contributions}

    steps = observation_steps(state)
    knowledge_labels = list(dict.fromkeys([top, *pred_set]))[: cfg.knowledge_steps]
    k_steps, consulted = _knowledge(state, rt, knowledge_labels, names)
    steps += k_steps
    steps += expert_steps({e: p for e, p in experts.items() if p}, names, state, cands)
    steps.append(fusion_step(fused.probs, used, pred_set, set_alpha, names, fused.missing, top))

    expert_probs = {e: {c: round(float(v), 5) for c, v in p.items() if c in set(cands)} for e, p in experts.items() if p}
    evidence_ids = case_evidence_ids(state, consulted, list(expert_probs))

    summary, check = None, None
    if cfg.llm_summary and source != "fallback":
        llm_ran = True
        summary, check, attempts = _summary(rt, state, cands, names, clf_display, feedback, top, cfg, evidence_ids, tags)
        if check is None:
            notes.append(f"LLM summary unusable after {attempts} attempts: not shown")
        elif not check.passed:
            notes.append("LLM summary failed the claim check (not shown): " + "; ".join(check.failures))
    rationale = render_rationale(steps)
    if summary:
        rationale += f" Summary: {summary}"
    cited = [i for i in dict.fromkeys(e for s in steps for e in s.evidence) if not i.startswith(("finding:", "expert:"))]

    drain = getattr(rt.llm, "drain_notes", None)  # e.g. "prompt truncated to the LLM's context"
    notes += list(dict.fromkeys(drain())) if callable(drain) else []

    differential = [DifferentialItem(label=c, name=names[c], probability=fused.probs[c]) for c in order]
    result = ReasonerResult(
        differential=differential,
        rationale=rationale.strip(),
        cited=cited,
        source=source,
        llm_ran=llm_ran,
        llm_probs={c: round(v, 5) for c, v in llm_probs.items()} if llm_probs else None,
        samples=samples,
        round=round_,
        notes=notes,
        expert_probs=expert_probs,
        contributions=used,
        prediction_set=pred_set,
        prediction_set_alpha=set_alpha,
        prediction_set_calibration=set_source,
        prediction_set_group=group_name,
        steps=steps,
        consulted=consulted,
        summary_check=check,
    )
    return NodeOutput(
        {"reasoning": result, "round": round_},
        inputs={
            "candidates": cands,
            "evidence_ids": list(tags.values()),
            "feedback": feedback,
            "experts": sorted(expert_probs),
        },
        model_id=getattr(rt.llm, "model_id", None) if "llm" in mf.experts else model.meta.get("id"),
        notes=notes,
    )
