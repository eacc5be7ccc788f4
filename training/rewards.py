"""Reward functions of the reasoner's GRPO training: small, pure and documented.

Every function has TRL's reward signature ``f(prompts, completions, **kwargs) -> list[float]``; the
dataset columns built by :mod:`training.reasoner_data` arrive as keyword lists, one item per completion:

* ``label_name``: the true diagnosis (a candidate display name);
* ``candidates``: the candidate display names of the case;
* ``tags``: the evidence tags shown in the prompt (``["E1", "E2", ...]``);
* ``observed``: JSON ``{criterion: {value: probability}}``, the describer's 7-point findings;
* ``expected``: JSON ``{candidate name: {criterion: [values]}}``, the knowledge base's ``expected_7pt``;
* ``classifier_top``: the classifier's top candidate name as displayed in the prompt;
* ``completion_prefix`` (optional): text the prompt already ends with (``"Diagnosis: "`` when the model
  continues the agent's assistant prefix); it is put back in front of the completion before parsing.

A completion is the text the model writes after the chat prompt (``Diagnosis: X\\nRationale: ...``), or
TRL's conversational form ``[{"role": "assistant", "content": ...}]``; :mod:`agent.prompts` parses it,
as it wrote the format. Thresholds are the agent configuration's (:func:`min_agreement`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from agent.consistency import morphology_agreement
from agent.prompts import format_checks, parse_answer, stated_consistency, stated_diagnosis

_HEDGE = re.compile(r"\b(conflict\w*|disagree\w*|although|however|despite|but|prefers?|favou?rs?)\b", re.IGNORECASE)


@functools.lru_cache(maxsize=None)
def min_agreement(agent_config: str | None = None) -> float:
    """The verifier's ``min_morphology_agreement`` in ``agent_config`` (a YAML path; None: the shipped
    defaults): below it the findings contradict the stated diagnosis."""
    from agent.config import load_config

    return load_config(agent_config).verifier.min_morphology_agreement


def completion_text(completion: Any, prefix: str | None = None) -> str:
    """The answer text of a completion (plain string or TRL's list of messages), after ``prefix``."""
    if isinstance(completion, str):
        text = completion
    elif isinstance(completion, Sequence) and completion and isinstance(completion[-1], Mapping):
        text = str(completion[-1].get("content", ""))
    else:
        text = ""
    return (prefix or "") + text


def _texts(completions: list, kwargs: dict[str, Any]) -> list[str]:
    prefixes = kwargs.get("completion_prefix") or [None] * len(completions)
    return [completion_text(c, p) for c, p in zip(completions, prefixes)]


def format_reward(prompts: list, completions: list, candidates: list, tags: list, **kwargs) -> list[float]:
    """Share of :func:`format_checks` passed (0, 0.25, ..., 1).

    >>> format_reward([None], ["Diagnosis: melanoma\\nRationale: An atypical pigment network [E1] fits it."],
    ...               candidates=[["melanoma", "melanocytic nevus"]], tags=[["E1", "E2"]])
    [1.0]
    """
    out = []
    for text, cands, tg in zip(_texts(completions, kwargs), candidates, tags):
        checks = format_checks(text, cands, tg)
        out.append(sum(checks.values()) / len(checks))
    return out


def correctness_reward(prompts: list, completions: list, label_name: list, candidates: list | None = None, **kwargs) -> list[float]:
    """1.0 when the stated diagnosis (:func:`stated_diagnosis`) is the true one, else 0.0.

    >>> correctness_reward([None, None], ["Diagnosis: Melanoma\\nRationale: x", "Diagnosis: melanocytic nevus"], label_name=["melanoma"] * 2)
    [1.0, 0.0]
    """
    out = []
    cands = candidates or [None] * len(completions)
    for text, truth, cs in zip(_texts(completions, kwargs), label_name, cands):
        stated = stated_diagnosis(text, cs if cs else [truth])
        out.append(float(stated is not None and stated.lower() == truth.lower()))
    return out


ConsistencyScorer = Callable[[Mapping[str, Mapping[str, float]], Mapping[str, Sequence[str]], str], "float | None"]
"""``(observed findings, expected findings of the stated diagnosis, stated name) -> agreement in [0, 1]``."""


def rule_consistency(observed: Mapping[str, Mapping[str, float]], expected: Mapping[str, Sequence[str]], diagnosis: str) -> float | None:
    """The verifier's rule score (:func:`agent.consistency.morphology_agreement`)."""
    return morphology_agreement(observed, expected)


def verifier_scorer(ref: str) -> ConsistencyScorer:
    """The trained consistency verifier (``models.verifier.ConsistencyModel``, registry id or path) as a
    scorer: its calibrated P(consistent | findings, stated diagnosis) replaces the rule score."""
    from models.resolve import resolve_artifact
    from models.verifier import ConsistencyModel
    from models.vocabulary import HAM_NAMES

    model = ConsistencyModel.load(resolve_artifact(ref))
    code = {name.lower(): c for c, name in HAM_NAMES.items()}

    def score(observed: Mapping[str, Mapping[str, float]], expected: Mapping[str, Sequence[str]], diagnosis: str) -> float | None:
        return model.score(observed, code.get(diagnosis.lower(), diagnosis))

    return score


def make_consistency_reward(scorer: ConsistencyScorer = rule_consistency) -> Callable[..., list[float]]:
    """A ``consistency_reward`` that scores agreement with ``scorer`` (e.g. a trained verifier's)."""

    def consistency_reward(prompts: list, completions: list, candidates: list, observed: list, expected: list, **kwargs) -> list[float]:
        """MAVIC-style visual consistency: the findings the knowledge base expects for the **stated**
        diagnosis agree with the findings the describer observed (0..1, as the verifier scores it);
        0.0 when no candidate is stated."""
        out = []
        for text, cands, obs, exp in zip(_texts(completions, kwargs), candidates, observed, expected):
            score = stated_consistency(text, cands, obs, exp, scorer)
            out.append(0.0 if score is None else float(score))
        return out

    return consistency_reward


consistency_reward = make_consistency_reward()
"""MAVIC-style consistency with the verifier's rule score.

>>> consistency_reward([None], ["Diagnosis: melanoma\\nRationale: veil [E1]"], candidates=[["melanoma"]],
...                    observed=['{"blue_whitish_veil": {"present": 0.8, "absent": 0.2}}'],
...                    expected=['{"melanoma": {"blue_whitish_veil": ["present"]}}'])
[0.8]
"""


def calibration_reward(
    prompts: list, completions: list, candidates: list, observed: list, expected: list, classifier_top: list, **kwargs
) -> list[float]:
    """Expressed certainty matches the evidence: 1.0 when the rationale says the evidence conflicts
    (conflict, although, but, however, the classifier favours ...) exactly when it does, i.e. the stated
    diagnosis is not the classifier's top candidate or the findings contradict it (agreement below
    the verifier's :func:`min_agreement`); 0.0 otherwise, and for answers naming no candidate.

    >>> calibration_reward([None], ["Diagnosis: melanoma\\nRationale: Veil [E1], although the classifier prefers nevus."],
    ...                    candidates=[["melanoma", "melanocytic nevus"]], observed=['{}'], expected=['{}'],
    ...                    classifier_top=["melanocytic nevus"])
    [1.0]
    """
    out, threshold = [], min_agreement()
    for text, cands, obs, exp, clf_top in zip(_texts(completions, kwargs), candidates, observed, expected, classifier_top):
        rationale = parse_answer(text)[1]
        stated = stated_diagnosis(text, cands)
        if stated is None:
            out.append(0.0)
            continue
        agreement = stated_consistency(text, cands, obs, exp)
        conflict = (bool(clf_top) and stated != clf_top) or (agreement is not None and agreement < threshold)
        out.append(float(bool(_HEDGE.search(rationale or "")) == conflict))
    return out


REWARDS: dict[str, Callable[..., list[float]]] = {
    "correctness": correctness_reward,
    "format": format_reward,
    "consistency": consistency_reward,
    "calibration": calibration_reward,
}
"""Reward functions by the names the GRPO config weights them with."""
