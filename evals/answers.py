"""Candidate-list answers: MM-Skin's zero-shot prompt and the matching of free-text answers to labels
(used by the ``zero_shot`` protocol, :mod:`evals.protocols.zero_shot`).

The VLM is asked MM-Skin's question with the candidate names listed; its free-text answer is mapped
back to a label by :func:`match_candidate`. Answers naming no candidate, or several different ones,
are *invalid* (counted as wrong, and reported as the invalid-answer rate).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

MMSKIN_PROMPT = "This is a skin lesion image. From the following categories: {candidates}, which one is the diagnosis?"
"""MM-Skin's zero-shot classification prompt; ``{candidates}`` is the comma-separated candidate names."""


def format_prompt(candidate_names: Sequence[str], template: str = MMSKIN_PROMPT) -> str:
    """The prompt with the candidate names joined by ", "."""
    return template.format(candidates=", ".join(candidate_names))


def _norm(text: str) -> str:
    # Hyphens/underscores/slashes and runs of whitespace must not decide a match ("basal-cell" == "basal cell").
    return re.sub(r"\s+", " ", re.sub(r"[-_/]", " ", text.lower())).strip()


def surface_forms(label: str, name: str | None = None, aliases: Sequence[str] = ()) -> list[str]:
    """Every normalised string that names ``label``: the code, the display name, each part of a
    composite display name ("actinic keratosis / intraepithelial carcinoma" → both halves), the aliases."""
    forms = [label, *(aliases or ())]
    if name:
        forms.append(name)
        forms += [part for part in name.split(" / ") if part.strip()]
    return sorted({f for f in (_norm(x) for x in forms) if f})


def match_candidate(
    answer: str,
    candidates: Mapping[str, str] | Sequence[str],
    aliases: Mapping[str, Sequence[str]] | None = None,
) -> str | None:
    """The label an answer names, or None (invalid).

    ``candidates``: label → display name (or a list of labels shown as themselves); ``aliases``:
    label → other names. Matching is case-insensitive and whole-word (hyphens, slashes and
    underscores read as spaces). Where matches overlap, the longest wins ("melanocytic nevus" over
    "nevus"); if non-overlapping matches name different labels ("melanoma or nevus") the answer is
    ambiguous and None is returned. Negation is not parsed: "not melanoma" names melanoma.

    >>> match_candidate("Diagnosis: Melanoma.", {"mel": "melanoma", "nv": "melanocytic nevus"})
    'mel'
    >>> match_candidate("melanoma or nevus", {"mel": "melanoma", "nv": "nevus"}) is None
    True
    """
    names = dict(candidates) if isinstance(candidates, Mapping) else {c: c for c in candidates}
    aliases = aliases or {}
    text = _norm(answer or "")
    if not text:
        return None
    # (start, end, label) of every whole-word occurrence of every surface form.
    hits: list[tuple[int, int, str]] = []
    for label, name in names.items():
        for form in surface_forms(label, name, aliases.get(label, ())):
            for m in re.finditer(rf"(?<!\w){re.escape(form)}(?!\w)", text):
                hits.append((m.start(), m.end(), label))
    if not hits:
        return None
    # Longest first; a hit overlapping a longer kept one is part of that name, not a mention of its own.
    hits.sort(key=lambda h: (-(h[1] - h[0]), h[0]))
    kept: list[tuple[int, int, str]] = []
    for s, e, label in hits:
        if not any(s < ke and ks < e for ks, ke, _ in kept):
            kept.append((s, e, label))
    labels = {label for _, _, label in kept}
    return labels.pop() if len(labels) == 1 else None
