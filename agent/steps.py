"""Reasoning steps: what was observed, what the knowledge base expects, what each expert says, how they were
fused, and the verdict; each step cites evidence ids that exist in the case. The rationale a user reads is
rendered from these steps (so it can only state what the steps hold)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from agent.claims import SUPPORT_MIN  # an expected value with at least this mass counts as seen, as the claim check reads it
from agent.state import CaseState, Evidence, ReasoningStep
from models.vocabulary import SEVEN_POINT_PHRASES

if TYPE_CHECKING:
    from retrieval.kb import KBEntry

EXPERT_NAMES = {"classifier": "the lesion classifier", "knn": "similar cases", "morphology": "the findings model", "llm": "the language model",
                "effnet": "the second visual expert", "probe": "the clinical feature probe"}


def finding_id(criterion: str) -> str:
    return f"finding:{criterion}"


def expert_id(name: str) -> str:
    return f"expert:{name}"


def phrase(criterion: str, value: str) -> str:
    return SEVEN_POINT_PHRASES.get(criterion, {}).get(value, f"{criterion.replace('_', ' ')}: {value}")


def _fmt(probs: Mapping[str, float], names: Mapping[str, str], k: int = 3) -> str:
    top = sorted(probs.items(), key=lambda kv: -kv[1])[:k]
    return ", ".join(f"{names.get(c, c)} {p:.2f}" for c, p in top)


def observation_steps(state: CaseState) -> list[ReasoningStep]:
    mod = state.modality
    steps = [ReasoningStep(kind="observation", text=f"Image modality: {mod.label} (p={mod.confidence:.2f}).",
                           data={"modality": mod.label, "confidence": mod.confidence})]  # fmt: skip
    if state.morphology and state.morphology.findings:
        parts, ev, data = [], [], {}
        for f in state.morphology.findings:
            parts.append(f"{phrase(f.criterion, f.value)} (p={f.confidence:.2f})")
            ev.append(finding_id(f.criterion))
            data[f.criterion] = {"value": f.value, "confidence": round(f.confidence, 4)}
        steps.append(ReasoningStep(kind="observation", text="Observed findings: " + "; ".join(parts) + ".", evidence=ev, data=data))
    return steps


def consulted_passage(entry: "KBEntry", modality: str) -> Evidence | None:
    """The knowledge-base passage a knowledge step cites: the 7-point checklist for dermoscopy, else the clinical morphology."""
    from retrieval.kb import KB_SOURCE, entry_passages

    want = "checklist" if modality == "dermoscopy" else "clinical"
    for p in entry_passages(entry):
        if p["passage"] == want:
            return Evidence(id=f"{entry.id}#{want}", kind="knowledge", title=f"{entry.name} ({want})", text=p["text"],
                            label=entry.ham_class or entry.name, source=KB_SOURCE, score=0.0)  # fmt: skip
    return None


def knowledge_step(label: str, name: str, entry: "KBEntry", passage: Evidence, observed: Mapping[str, Mapping[str, float]]) -> ReasoningStep:
    """What the knowledge base expects for ``label`` against what was observed (supports / contradicts)."""
    supports, contradicts = [], []
    for criterion, expected in entry.expected_7pt.items():
        probs = observed.get(criterion)
        if not probs:
            continue
        seen = max(probs, key=probs.get)
        mass = sum(probs.get(v, 0.0) for v in expected)
        if seen in expected:
            supports.append((criterion, seen, probs[seen]))
        elif mass < SUPPORT_MIN:
            contradicts.append((criterion, seen, probs[seen]))
    cite = f"[{passage.id}]"
    sentences = []
    if supports:
        sentences.append(f"For {name}, the knowledge base expects what is seen: " + ", ".join(phrase(c, v) for c, v, _ in supports) + f" {cite}.")
    if contradicts:
        sentences.append(f"Arguing against {name}: " + ", ".join(phrase(c, v) for c, v, _ in contradicts) + f" {cite}.")
    if not sentences:
        sentences.append(f"The knowledge base's findings for {name} {cite} neither support nor contradict what is seen.")
    ev = [passage.id] + [finding_id(c) for c, _, _ in supports + contradicts]
    return ReasoningStep(kind="knowledge", text=" ".join(sentences), evidence=ev,
                         data={"label": label, "kb_entry": entry.id, "supports": [[c, v, round(p, 4)] for c, v, p in supports],
                               "contradicts": [[c, v, round(p, 4)] for c, v, p in contradicts]})  # fmt: skip


def expert_steps(experts: Mapping[str, Mapping[str, float] | None], names: Mapping[str, str], state: CaseState, candidates: Sequence[str]) -> list[ReasoningStep]:
    steps = []
    cand = set(candidates)
    for e, probs in experts.items():
        if not probs:
            continue
        probs = {c: p for c, p in probs.items() if c in cand}
        if not probs:
            continue
        ev = [expert_id(e)]
        extra = ""
        if e == "knn" and state.retrieval:
            top = max(probs, key=probs.get)
            cases = [x.id for x in state.retrieval.evidence if x.kind == "case" and x.label == top][:3]
            ev += cases
            if cases:
                extra = " " + " ".join(f"[{c}]" for c in cases)
        if e == "morphology" and state.morphology:
            ev += [finding_id(f.criterion) for f in state.morphology.findings]
        label = EXPERT_NAMES.get(e, e)
        text = f"{label[0].upper() + label[1:]}: {_fmt(probs, names)}{extra}."
        steps.append(ReasoningStep(kind="expert", text=text, evidence=ev, data={"expert": e, "probs": {c: round(p, 4) for c, p in probs.items()}}))
    return steps


def fusion_step(probs: Mapping[str, float], contributions: Mapping[str, Mapping[str, float]], pred_set: Sequence[str], alpha: float | None,
                names: Mapping[str, str], missing: Sequence[str] = (), top: str | None = None) -> ReasoningStep:  # fmt: skip
    top = top or max(probs, key=probs.get)
    drivers = sorted(((e, c.get(top, 0.0)) for e, c in contributions.items()), key=lambda kv: -abs(kv[1]))
    driver_txt = ", ".join(f"{EXPERT_NAMES.get(e, e)} {v:+.2f}" for e, v in drivers if abs(v) >= 0.01)
    text = f"Fused: {_fmt(probs, names)}."
    if top != max(probs, key=probs.get):
        text += (f" Decision: {names.get(top, top)} (the class-weighted decision model, which keeps rare and costly diagnoses "
                 f"from being drowned by the most common one).")
    if driver_txt:
        text += f" Contributions to {names.get(top, top)}: {driver_txt}."
    if pred_set and alpha is not None:
        text += f" {round((1 - alpha) * 100)}% prediction set: {', '.join(names.get(c, c) for c in pred_set)}."
    elif pred_set:
        text += " No calibrated prediction set: the candidates did not hold the true diagnosis often enough in calibration."
    if missing:
        text += f" Not available: {', '.join(EXPERT_NAMES.get(m, m) for m in missing)}."
    return ReasoningStep(kind="fusion", text=text, evidence=[expert_id(e) for e in contributions],
                         data={"probs": {c: round(p, 4) for c, p in probs.items()}, "contributions": {e: dict(v) for e, v in contributions.items()},
                               "prediction_set": list(pred_set), "alpha": alpha, "missing": list(missing)})  # fmt: skip


def render_rationale(steps: Sequence[ReasoningStep]) -> str:
    """The rationale the user reads: the steps' texts, findings first, verdict last."""
    return " ".join(s.text for s in steps)


def observed_findings(state: CaseState) -> dict[str, dict[str, float]]:
    """criterion → {value: probability} of the describer's findings (empty without findings)."""
    return {f.criterion: f.probs for f in state.morphology.findings} if state.morphology else {}


def case_evidence_ids(state: CaseState, consulted: Sequence[Evidence], experts: Sequence[str]) -> set[str]:
    """Every id a step may cite in this case: retrieved and consulted evidence, findings, experts."""
    ids = {e.id for e in (state.retrieval.evidence if state.retrieval else [])} | {e.id for e in consulted}
    ids |= {expert_id(e) for e in experts}
    if state.morphology:
        ids |= {finding_id(f.criterion) for f in state.morphology.findings}
    return ids
