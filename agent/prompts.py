"""The reasoner's prompt and answer format: what the LLM is shown, and how its answer is written and read.

The node (:mod:`agent.nodes.reason`), training (SFT targets, GRPO rewards) and evaluation all write and
parse ``Diagnosis: <name>\nRationale: <text citing [E#] tags>`` with these functions.
"""

from __future__ import annotations

import json
import random
import re
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # annotations only: scoring answers (training.rewards, the GPU job) needs no graph state or LangGraph
    from agent.state import CaseState, Evidence

SYSTEM = (
    "You are a careful dermatology assistant. Reason only from the evidence provided: the image findings, "
    "the lesion classifier's probabilities, similar cases and knowledge-base entries. Choose the diagnosis "
    "from the candidate list. Cite evidence by its tag, e.g. [E2]. If the evidence conflicts, say so."
)
DIAGNOSIS_PREFIX = "Diagnosis: "
RATIONALE_FIELD = "\nRationale:"
EVIDENCE_TAG = re.compile(r"\[(E\d+)\]")
"""An evidence citation in the model's answer, e.g. [E2]."""


def evidence_tags(evidence: Sequence[Evidence]) -> dict[str, str]:
    """Short tags the model cites ([E1], [E2], ...) → real evidence ids."""
    return {f"E{i + 1}": ev.id for i, ev in enumerate(evidence)}


def _patient(state: CaseState) -> str:
    if not state.metadata:
        return "not given"
    m = state.metadata
    bits = []
    if m.age is not None:
        bits.append(f"{m.age:g} years")
    if m.sex:
        bits.append(m.sex)
    if m.site:
        bits.append(f"site: {m.site}")
    if m.fitzpatrick:
        bits.append(f"Fitzpatrick {m.fitzpatrick}")
    if m.history:
        bits.append(f"history: {m.history}")
    return ", ".join(bits) or "not given"


def render_user(
    state: CaseState,
    candidates: Sequence[str],
    names: dict[str, str],
    classifier: dict[str, float] | None,
    feedback: str | None = None,
    shuffle_seed: int | None = None,
    second_expert: dict[str, float] | None = None,
) -> str:
    """Render the case for the LLM. ``shuffle_seed`` permutes candidate and evidence order (CCT-style perturbation);
    ``second_expert``: the second visual expert's distribution over the candidates (its line is omitted without it)."""
    evidence = list(state.retrieval.evidence) if state.retrieval else []
    tags = {ev.id: f"E{i + 1}" for i, ev in enumerate(evidence)}
    cands = list(candidates)
    if shuffle_seed is not None:
        rng = random.Random(shuffle_seed)
        rng.shuffle(cands)
        rng.shuffle(evidence)
    lines = [
        f"Image modality: {state.modality.label} (p={state.modality.confidence:.2f})",
        f"Patient: {_patient(state)}",
    ]
    if state.question:
        lines.append(f"Question: {state.question}")
    if state.morphology:
        score = f" (7-point score {state.morphology.seven_point_score})" if state.morphology.seven_point_score is not None else ""
        lines.append(f"Findings{score}: {state.morphology.description}")
    if classifier:
        top = sorted(classifier.items(), key=lambda kv: -kv[1])[:4]
        lines.append("Lesion classifier (calibrated): " + ", ".join(f"{names.get(c, c)} {p:.2f}" for c, p in top))
    if second_expert:
        top = sorted(second_expert.items(), key=lambda kv: -kv[1])[:4]
        lines.append("Second visual expert: " + ", ".join(f"{names.get(c, c)} {p:.2f}" for c, p in top))
    cases = [ev for ev in evidence if ev.kind == "case"]
    if cases:
        lines.append("Similar cases: " + "; ".join(f"[{tags[ev.id]}] {names.get(ev.label or '', ev.label)} (sim {ev.score:.2f})" for ev in cases))
    for ev in evidence:
        if ev.kind == "knowledge":
            lines.append(f"[{tags[ev.id]}] {ev.title}: {ev.text[:160]}")
    lines.append("Candidates: " + "; ".join(names.get(c, c) for c in cands))
    if feedback:
        lines.append(f"Verifier feedback (reconsider): {feedback}")
    lines.append("Give the most likely diagnosis from the candidates, then a short rationale citing evidence tags.")
    return "\n".join(lines)


def conversation(user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


# --------------------------------------------------------------------------- the answer format


def write_answer(diagnosis: str, rationale: str) -> str:
    """The answer text: ``Diagnosis: <diagnosis>\nRationale: <rationale>`` (what SFT teaches).

    >>> write_answer("melanoma", "Veil [E1].")
    'Diagnosis: melanoma\\nRationale: Veil [E1].'
    """
    return f"{DIAGNOSIS_PREFIX}{diagnosis}{RATIONALE_FIELD} {rationale}"


def parse_answer(text: str) -> tuple[str | None, str | None]:
    """``("X", "rationale")`` from ``"Diagnosis: X\nRationale: rationale"``; None for a missing part.

    >>> parse_answer("Diagnosis: melanoma\\nRationale: Atypical network [E1].")
    ('melanoma', 'Atypical network [E1].')
    """
    diagnosis = rationale = None
    lines = text.strip().splitlines()
    if lines and lines[0].strip().lower().startswith("diagnosis:"):
        diagnosis = lines[0].split(":", 1)[1].strip() or None
    for line in lines[1:]:
        if line.strip().lower().startswith("rationale:"):
            rationale = line.split(":", 1)[1].strip()
            break
    return diagnosis, rationale


def stated_diagnosis(text: str, candidates: Sequence[str]) -> str | None:
    """The candidate the answer states: the longest candidate the ``Diagnosis:`` line starts with, as a
    whole phrase ("melanoma. The veil..." states melanoma; "melanomas" states nothing).

    >>> stated_diagnosis("Diagnosis: melanoma, given the veil", ["melanoma", "melanocytic nevus"])
    'melanoma'
    """
    line, _ = parse_answer(text)
    if line is None:
        return None
    low = line.lower()
    for c in sorted(candidates, key=len, reverse=True):
        if low.startswith(c.lower()) and (len(low) == len(c) or not low[len(c)].isalnum()):
            return c
    return None


def cited_tags(text: str) -> list[str]:
    """The evidence tags a text cites, in order (``["E1", "E3"]``)."""
    return EVIDENCE_TAG.findall(text)


def usable_rationale(text: str) -> bool:
    """Whether a rationale is worth keeping: long enough, and not an echo of the prompt template."""
    t = text.strip()
    if len(t) < 20 or sum(ch.isalpha() for ch in t) < 15:
        return False
    # Untuned small models echo the prompt template instead of answering.
    echoes = ("Candidates:", "Image modality:", "Lesion classifier", "Give the most likely")
    return not any(e in t for e in echoes)


# --------------------------------------------------------------------------- checking answers (rewards, evaluations)


def _match(name: str | None, candidates: Sequence[str]) -> str | None:
    """The candidate ``name`` is exactly (case-insensitive, a final full stop allowed), else None."""
    if name is None:
        return None
    by_lower = {c.lower(): c for c in candidates}
    return by_lower.get(name.strip().rstrip(".").lower())


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def format_checks(text: str, candidates: Sequence[str], tags: Sequence[str]) -> dict[str, bool]:
    """The four format checks: a candidate after ``Diagnosis:``; a ``Rationale:`` line the agent would
    use (:func:`agent.prompts.usable_rationale`: long enough, no template echo); at least one [E#] tag;
    every cited tag shown in the prompt."""
    diagnosis, rationale = parse_answer(text)
    cited = cited_tags(rationale or "")
    return {
        "candidate": _match(diagnosis, candidates) is not None,
        "rationale": rationale is not None and usable_rationale(rationale),
        "cites": bool(cited),
        "tags_valid": bool(cited) and set(cited) <= set(tags),
    }


def is_format_valid(text: str, candidates: Sequence[str], tags: Sequence[str]) -> bool:
    """Whether the answer passes every format check (the format-valid rate of the evaluation)."""
    return all(format_checks(text, candidates, tags).values())


def stated_consistency(text: str, candidates: Sequence[str], observed: Any, expected: Any, scorer=None) -> float | None:
    """Agreement of the observed findings with those the KB expects for the stated diagnosis; None when
    the answer names no candidate or the KB has no expectation for it. ``scorer(observed, expected, stated name)``
    replaces the verifier's rule score (:func:`agent.consistency.morphology_agreement`), e.g. a trained verifier's."""
    stated = stated_diagnosis(text, candidates)
    if stated is None:
        return None
    exp = _json(expected).get(stated)
    if not exp:
        return None
    if scorer is None:
        from agent.consistency import morphology_agreement

        return morphology_agreement(_json(observed), exp)
    return scorer(_json(observed), exp, stated)
