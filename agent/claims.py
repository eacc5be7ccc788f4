"""Claim check: what a generated text says must be supported by the case, or it is not shown.

A text (the LLM's summary of the reasoning) is split into sentences, and each sentence's claims are
checked against the case:

* **diagnosis**: every diagnosis it names is one of the case's candidates;
* **finding**: every 7-point finding it names was observed with the stated presence/value;
* **pairing**: a finding named together with a diagnosis agrees with what the knowledge base expects
  for that diagnosis (or, in a sentence that argues *against* the diagnosis, disagrees with it);
* **category**: "X is a (type of) Y" / "X is benign|malignant" agrees with the knowledge base's
  categories and malignancy flag (so "basal cell carcinoma is a type of benign keratosis" fails);
* **citation**: every cited id exists in the case.

Pure functions of the text and the case; used by the reasoner before a text is shown and by tests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Iterable, Mapping

from models.vocabulary import parse_findings

if TYPE_CHECKING:
    from retrieval.kb import KBEntry, KnowledgeBase

_SENTENCE = re.compile(r"(?<=[.!?;])\s+")
_CITATION = re.compile(r"\[([^\[\]]+)\]")
_NEGATIVE = re.compile(r"\b(against|not|unlikely|rules? out|ruled out|argues? against|inconsistent|does not|doesn't|less likely|excludes?)\b")
_CATEGORY_CLAIM = re.compile(r"\b(?:is|are)\s+(?:(?:a|an|the)\s+)?(?:(?:type|form|kind|variant|subtype|sort)\s+of\s+)(?:(?:a|an)\s+)?(?P<y>[a-z][a-z /'-]+)")
_MALIGNANCY_CLAIM = re.compile(r"\b(?:is|are)\s+(?:(?:a|an|usually|always|typically|often)\s+)*(?P<m>benign|malignant|premalignant|pre-malignant|cancerous|a cancer|a skin cancer)\b")
SUPPORT_MIN = 0.3
"""A finding value is 'observed' when it is the describer's most probable value or has at least this probability."""


@dataclass
class Claim:
    kind: str  # diagnosis | finding | pairing | category | citation
    sentence: str
    subject: str
    ok: bool
    reason: str = ""


@dataclass
class ClaimCheck:
    claims: list[Claim] = field(default_factory=list)

    @property
    def failures(self) -> list[Claim]:
        return [c for c in self.claims if not c.ok]

    @property
    def passed(self) -> bool:
        return not self.failures

    def reasons(self) -> list[str]:
        return [f"{c.kind}: {c.reason}" for c in self.failures]


@lru_cache(maxsize=4)
def _lexicon(kb: "KnowledgeBase") -> list[tuple[re.Pattern, "KBEntry"]]:
    """(pattern, entry) for every name and alias, longest first so that 'melanoma in situ' wins over 'melanoma'."""
    terms: list[tuple[str, KBEntry]] = []
    for e in kb:
        for t in {e.name, *e.aliases}:
            t = t.strip()
            if len(t) >= 2:
                terms.append((t.lower(), e))
    terms.sort(key=lambda te: -len(te[0]))
    return [(re.compile(r"(?<![a-z0-9])" + re.escape(t) + r"(?![a-z0-9])"), e) for t, e in terms]


def diagnoses_in(text: str, kb: "KnowledgeBase") -> list[tuple[str, "KBEntry", tuple[int, int]]]:
    """Diagnoses named in ``text``: (surface form, entry, span), non-overlapping, in order."""
    t = text.lower()
    taken: list[tuple[int, int]] = []
    out = []
    for pat, entry in _lexicon(kb):
        for m in pat.finditer(t):
            s, e = m.span()
            if any(s < b and a < e for a, b in taken):
                continue
            taken.append((s, e))
            out.append((m.group(0), entry, (s, e)))
    return sorted(out, key=lambda x: x[2][0])


def _entry_matches(entry: "KBEntry", label: str, kb: "KnowledgeBase") -> bool:
    other = kb.entry_for_label(label)
    return (other is not None and other.id == entry.id) or entry.ham_class == label or entry.name.lower() == label.lower()


def _categories(entry: "KBEntry") -> set[str]:
    cats = {c.lower() for c in getattr(entry, "categories", []) or []}
    if entry.malignant is True:
        cats |= {"malignant", "cancer", "skin cancer", "cancerous", "malignancy"}
    elif entry.malignant is False:
        cats |= {"benign"}
    return cats


def _observed(observed: Mapping[str, Mapping[str, float]], criterion: str, value: str) -> bool:
    probs = observed.get(criterion) or {}
    if not probs:
        return False
    return probs.get(value, 0.0) >= SUPPORT_MIN or max(probs, key=probs.get) == value


def check_text(
    text: str,
    *,
    candidates: Iterable[str],
    observed: Mapping[str, Mapping[str, float]],
    kb: "KnowledgeBase",
    evidence_ids: Iterable[str],
) -> ClaimCheck:
    """Check every claim of ``text`` against the case (see the module docstring)."""
    cands = list(candidates)
    ids = set(evidence_ids)
    out = ClaimCheck()
    for sentence in (s.strip() for s in _SENTENCE.split(text or "") if s.strip()):
        low = sentence.lower()
        for cid in _CITATION.findall(sentence):
            for one in (x.strip() for x in cid.split(",")):
                out.claims.append(Claim("citation", sentence, one, one in ids, "" if one in ids else f"cites {one!r}, which is not evidence of this case"))
        bare = _CITATION.sub(" ", low)
        named = diagnoses_in(bare, kb)
        for surface, entry, _ in named:
            ok = any(_entry_matches(entry, c, kb) for c in cands)
            out.claims.append(Claim("diagnosis", sentence, surface, ok, "" if ok else f"names {entry.name}, which is not a candidate"))
        # A diagnosis's name is not a finding ("telangiectasia" the diagnosis vs telangiectatic vessels).
        masked = bare
        for _, _, (a, b) in named:
            masked = masked[:a] + " " * (b - a) + masked[b:]
        findings = parse_findings(masked)
        for criterion, value in findings.items():
            ok = _observed(observed, criterion, value)
            seen = observed.get(criterion) or {}
            top = max(seen, key=seen.get) if seen else "nothing"
            out.claims.append(Claim("finding", sentence, f"{criterion}={value}", ok,
                                    "" if ok else f"states {criterion.replace('_', ' ')} {value}, but the describer observed {top}"))  # fmt: skip
        negative = bool(_NEGATIVE.search(bare))
        for surface, entry, _ in named:
            for criterion, value in findings.items():
                expected = entry.expected_7pt.get(criterion)
                if not expected:
                    continue
                fits = value in expected
                ok = fits != negative
                why = (f"pairs {criterion.replace('_', ' ')} {value} with {entry.name}, but the knowledge base expects "
                       f"{' or '.join(expected)}" if not fits else f"argues against {entry.name} with {value} {criterion.replace('_', ' ')}, which it expects")  # fmt: skip
                out.claims.append(Claim("pairing", sentence, f"{entry.name}~{criterion}={value}", ok, "" if ok else why))
        out.claims += _category_claims(sentence, bare, named, kb)
    return out


def _category_claims(sentence: str, low: str, named, kb: "KnowledgeBase") -> list[Claim]:
    claims: list[Claim] = []
    if not named:
        return claims
    subject_entry = named[0][1]
    start = named[0][2][1]
    rest = low[start:]
    m = _CATEGORY_CLAIM.match(rest.lstrip(" ,")) or _CATEGORY_CLAIM.search(rest[:40])
    if m:
        y = m.group("y").strip(" .,")
        y_entries = diagnoses_in(y, kb)
        cats = _categories(subject_entry)
        if y_entries:
            y_entry = y_entries[0][1]
            ok = y_entry.id == subject_entry.id or y_entry.name.lower() in cats or any(a.lower() in cats for a in y_entry.aliases)
            why = f"{subject_entry.name} is not a kind of {y_entry.name}"
        else:
            ok = any(y.startswith(c) or c in y for c in cats)
            why = f"{subject_entry.name} is not in category {y!r} (knowledge base: {', '.join(sorted(cats)) or 'none'})"
        claims.append(Claim("category", sentence, f"{subject_entry.name} ⊂ {y}", ok, "" if ok else why))
    mm = _MALIGNANCY_CLAIM.search(rest[:40])
    if mm and not m:
        word = mm.group("m")
        claim_malignant = word not in ("benign",)
        if word in ("premalignant", "pre-malignant"):
            ok = "premalignant" in _categories(subject_entry) or subject_entry.malignant is not False
        elif subject_entry.malignant is None:
            ok = True  # the knowledge base does not say: nothing to contradict
        else:
            ok = subject_entry.malignant == claim_malignant
        claims.append(Claim("category", sentence, f"{subject_entry.name} is {word}", ok,
                            "" if ok else f"{subject_entry.name} is {'malignant' if subject_entry.malignant else 'benign'} in the knowledge base"))  # fmt: skip
    return claims
