"""Pure scoring functions of the consistency verifier (also used as RL rewards in training/).

MAVIC-style visual consistency: the diagnosis must follow from the observations, so the findings the
knowledge base expects for a diagnosis are compared with the findings the describer observed.
CCT-style confidence consistency: perturbed re-scorings of the same case must agree.
"""

from __future__ import annotations

from collections import Counter
from typing import Mapping, Sequence


def morphology_agreement(observed: Mapping[str, Mapping[str, float]], expected: Mapping[str, Sequence[str]]) -> float | None:
    """Mean, over criteria the knowledge base has an expectation for, of the probability mass the
    describer puts on the expected values. 1 = findings exactly as expected, 0 = contradicting.

    ``observed``: criterion → {value: probability}; ``expected``: criterion → acceptable values.
    Returns None when no criterion can be compared.

    >>> morphology_agreement({"blue_whitish_veil": {"present": 0.8, "absent": 0.2}}, {"blue_whitish_veil": ["present"]})
    0.8
    """
    scores = []
    for criterion, values in expected.items():
        probs = observed.get(criterion)
        if not probs or not values:
            continue
        scores.append(sum(probs.get(v, 0.0) for v in values))
    if not scores:
        return None
    return round(float(sum(scores) / len(scores)), 4)


def contradictions(observed: Mapping[str, Mapping[str, float]], expected: Mapping[str, Sequence[str]], threshold: float = 0.3) -> list[str]:
    """Criteria whose expected values get less than ``threshold`` probability, phrased for feedback."""
    out = []
    for criterion, values in expected.items():
        probs = observed.get(criterion)
        if not probs:
            continue
        mass = sum(probs.get(v, 0.0) for v in values)
        if mass < threshold:
            seen = max(probs, key=probs.get)
            out.append(f"{criterion.replace('_', ' ')}: expected {' or '.join(values)}, observed {seen} (p={probs[seen]:.2f})")
    return out


def self_consistency(top: str, samples: Sequence[str]) -> float:
    """Share of sampled top labels equal to ``top`` (1.0 when there are no samples)."""
    if not samples:
        return 1.0
    return round(sum(s == top for s in samples) / len(samples), 4)


def majority(samples: Sequence[str]) -> str | None:
    """Most common sampled label (ties broken by first occurrence)."""
    if not samples:
        return None
    counts = Counter(samples)
    best = max(counts.values())
    return next(s for s in samples if counts[s] == best)
