"""Training turns for the feature VLM describer, built deterministically from Derm7pt and HAM10000.

Derm7pt ``train`` + ``extra`` cases give descriptions that state all seven criteria (the agent's phrase
per criterion value, ``models.vocabulary.SEVEN_POINT_PHRASES``, in a fixed order, with
varied openers and closers around them) and yes/no or "describe the X" questions about single
criteria. HAM10000 ``train`` images give questions about diagnosis, body site, age and sex: the
sklesion features were fitted on HAM10000, so these teach the answer format more than vision, and
the trainer uses them in stage 1 only. Derm7pt ``val`` is never used here (it is the evaluation set).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.backends.feature_vlm_net import DESCRIBE_PROMPT
from models.vocabulary import HAM_CLASSES, HAM_NAMES, SEVEN_POINT, SEVEN_POINT_PHRASES, SEVEN_POINT_SCORING
from training.data import aligned, load_features, source_table

PACK_FILE = "describer_cases.npz"
"""A feature folder holding this file (written by ``training.gpu_pack``: Derm7pt rows and a HAM10000 subset with
their cached features) is read in place of the shared tables and the feature cache, e.g. on a GPU machine."""

DESCRIBE_PROMPTS = (
    DESCRIBE_PROMPT,  # the evaluation prompt
    "Describe the dermoscopic structures of this lesion.",
    "Which 7-point checklist criteria are seen on dermoscopy?",
    "Give a structured dermoscopic description.",
)
OPENERS = ("Dermoscopy shows", "Dermoscopic findings:", "On dermoscopy there is", "Seven-point checklist findings:")
_NAMES = {
    "pigment_network": "pigment network",
    "streaks": "streaks",
    "pigmentation": "blotches of pigmentation",
    "regression_structures": "regression structures",
    "dots_and_globules": "dots and globules",
    "blue_whitish_veil": "blue-whitish veil",
    "vascular_structures": "vessels",
}


_YES_NO = {
    "pigment_network": "Is a pigment network visible?",
    "streaks": "Are streaks present?",
    "pigmentation": "Are there blotches of pigmentation?",
    "regression_structures": "Are regression structures present?",
    "dots_and_globules": "Are dots or globules present?",
    "blue_whitish_veil": "Is a blue-whitish veil present?",
    "vascular_structures": "Are vessels visible?",
}


@dataclass(frozen=True)
class Turn:
    """One training example: a question about an image (given by its feature row) and the answer."""

    source: str
    case_id: str
    row: int
    """Row in the stacked feature matrix returned alongside the turns."""
    question: str
    answer: str
    kind: str
    """describe | criterion | ham"""


def describe(criteria: dict[str, str], rng: random.Random | None = None, opener: str | None = None) -> str:
    """A description stating every criterion with its canonical phrase, in the checklist's order.

    >>> describe({c: "absent" for c in SEVEN_POINT}, opener="Dermoscopy shows").startswith("Dermoscopy shows no pigment network; no streaks")
    True
    """
    opener = opener or (rng.choice(OPENERS) if rng else OPENERS[0])
    body = "; ".join(SEVEN_POINT_PHRASES[c][criteria[c]] for c in SEVEN_POINT)
    text = f"{opener} {body}."
    if rng is not None and rng.random() < 0.3:
        score = sum(SEVEN_POINT_SCORING.get((c, v), 0) for c, v in criteria.items())
        text += f" Seven-point score {score}."
    return text


def criterion_turn(criterion: str, value: str, rng: random.Random) -> tuple[str, str]:
    """A question about one criterion and its answer ("Yes: ..."/"No: ..." or "describe the X")."""
    phrase = SEVEN_POINT_PHRASES[criterion][value]
    if rng.random() < 0.5:
        return _YES_NO[criterion], f"{'No' if value == 'absent' else 'Yes'}: {phrase}."
    return f"Describe the {_NAMES[criterion]}.", phrase[0].upper() + phrase[1:] + "."


def _ham_turn(row: dict[str, str], rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        return "What is the likely diagnosis?", f"The appearance is most consistent with {HAM_NAMES[row['dx']]}."
    if kind == 1 and row.get("localization") not in (None, "", "unknown"):
        return "Where on the body is this lesion?", f"The lesion is on the {row['localization']}."
    age, sex = row.get("age") or "", row.get("sex") or ""
    if age and sex in ("male", "female"):
        return "Describe the patient.", f"A {int(float(age))}-year-old {sex} patient."
    return "What is the likely diagnosis?", f"The appearance is most consistent with {HAM_NAMES[row['dx']]}."


def _packed(feature_dir: Path, source: str) -> tuple[list[dict[str, str]], dict[str, np.ndarray]] | None:
    path = Path(feature_dir) / PACK_FILE
    if not path.is_file():
        return None
    import json

    with np.load(path) as z:
        if f"{source}_rows" not in z:
            return [], {"features": np.zeros((0, 2048), np.float32), "probs": np.zeros((0, 7), np.float32)}
        return json.loads(str(z[f"{source}_rows"])), {"features": z[f"{source}_features"].astype(np.float32), "probs": z[f"{source}_probs"]}


def _table(feature_dir: Path, source: str, rows: list[dict[str, str]] | None = None) -> tuple[list[dict[str, str]], dict[str, np.ndarray]]:
    """Rows of ``source`` with their cached features: from the pack file when ``feature_dir`` has one."""
    return _packed(feature_dir, source) or aligned(rows if rows is not None else source_table(source), load_features(source, feature_dir=feature_dir))


def load_cases(feature_dir: Path, splits: tuple[str, ...]) -> tuple[list[dict[str, str]], np.ndarray]:
    """Derm7pt rows in ``splits`` with features, and their (N, 2048 + 7) feature+probability matrix."""
    rows, f = _table(feature_dir, "derm7pt")
    keep = [i for i, r in enumerate(rows) if r["split"] in splits]
    x = np.concatenate([f["features"], f["probs"]], axis=1)[keep]
    return [rows[i] for i in keep], x


def rarity_weights(rows: list[dict[str, str]], power: float) -> np.ndarray:
    """Per-case sampling weight: mean over criteria of freq(value)^-power (0 = uniform)."""
    if power <= 0 or not rows:
        return np.ones(len(rows))
    w = np.zeros(len(rows))
    for crit in SEVEN_POINT:
        vals = [r[crit] for r in rows]
        freq = {v: vals.count(v) / len(vals) for v in set(vals)}
        w += np.array([freq[v] ** -power for v in vals])
    return w / w.mean()


def build_turns(
    feature_dir: Path,
    *,
    n_turns: int,
    seed: int = 0,
    describe_fraction: float = 0.6,
    ham_fraction: float = 0.0,
    balance: float = 0.0,
    max_cases: int | None = None,
) -> tuple[list[Turn], np.ndarray]:
    """``n_turns`` turns (a seeded mix of descriptions, criterion questions and HAM10000 questions) and
    the feature matrix their ``row`` indexes. Derm7pt cases are drawn with :func:`rarity_weights`."""
    rng = random.Random(seed)
    cases, x = load_cases(feature_dir, ("train", "extra"))
    if max_cases is not None:
        cases, x = cases[:max_cases], x[:max_cases]
    if not cases:
        raise ValueError(f"no Derm7pt train/extra cases with features in {feature_dir}")
    blocks, turns = [x], []
    ham: list[dict[str, str]] = []
    if ham_fraction > 0:
        packed = _packed(feature_dir, "ham10000")
        hrows, hf = packed or _table(feature_dir, "ham10000", [r for r in source_table("ham10000") if r["split"] == "train"])
        keep = [i for i, r in enumerate(hrows) if r["dx"] in HAM_CLASSES]
        hrows, hf = [hrows[i] for i in keep], {k: v[keep] for k, v in hf.items()}
        ham = hrows
        blocks.append(np.concatenate([hf["features"], hf["probs"]], axis=1))
    weights = rarity_weights(cases, balance)
    np_rng = np.random.default_rng(seed)
    picks = np_rng.choice(len(cases), size=n_turns, p=weights / weights.sum())
    for i, case in enumerate(picks):
        u = rng.random()
        if ham and u < ham_fraction:
            j = rng.randrange(len(ham))
            q, a = _ham_turn(ham[j], rng)
            turns.append(Turn("ham10000", ham[j]["image"], len(cases) + j, q, a, "ham"))
            continue
        row = cases[int(case)]
        crit = {c: row[c] for c in SEVEN_POINT}
        if rng.random() < describe_fraction:
            # Mostly the evaluation prompt, so the model learns its answer format best.
            q = DESCRIBE_PROMPTS[0] if rng.random() < 0.5 else rng.choice(DESCRIBE_PROMPTS[1:])
            turns.append(Turn("derm7pt", row["image"], int(case), q, describe(crit, rng), "describe"))
        else:
            c = rng.choice(list(SEVEN_POINT))
            q, a = criterion_turn(c, crit[c], rng)
            turns.append(Turn("derm7pt", row["image"], int(case), q, a, "criterion"))
    return turns, np.concatenate(blocks, axis=0).astype(np.float32)
