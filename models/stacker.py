"""The calibrated fusion artifact: morphology expert, per-modality stacker, conformal scores and risk control.

One JSON file (written by ``dermgraph train fusion``) holds everything the reasoner and verifier need to
turn the experts' outputs into a decision:

* ``morphology_expert``: multinomial logistic model of P(diagnosis | 7-point finding probabilities),
  fitted on Derm7pt train+extra with cross-fitted findings.
* per modality, a stacker over the experts' log-probabilities: ``multinomial`` (a fixed class list,
  dermoscopy) or ``conditional_logit`` (a per-case candidate list, clinical photos);
* per modality, the calibration scores of the true label (split-conformal sets for any α) and the
  acceptance model with its calibration (κ, correct) pairs (SGR threshold for any target risk).

Inference is NumPy only; fitting lives in ``training/fusion.py``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from models.conformal import conformal_quantile, prediction_set, sgr_threshold

FORMAT = "dermgraph-fusion/2"
ACCEPTANCE_FEATURES = ("log_top", "margin", "set_size", "expert_agreement", "morphology_top", "second_expert_agrees", "tta_agreement")
"""Every signal :func:`acceptance_features` computes; an artifact's acceptance model names the ones it uses."""
LEGACY_ACCEPTANCE_FEATURES = ACCEPTANCE_FEATURES[:5]
"""What artifacts written before the second visual expert used (their acceptance section may not name them)."""


def log_probs(p: Mapping[str, float] | None, classes: Sequence[str], eps: float) -> np.ndarray | None:
    """log(max(p_c, eps)) renormalised over ``classes`` (None when the expert is missing)."""
    if not p:
        return None
    v = np.array([max(float(p.get(c, 0.0)), eps) for c in classes])
    return np.log(v / v.sum())


def top_candidate(p: Mapping[str, float] | None, candidates: Sequence[str] | None = None) -> str | None:
    """The most probable of ``candidates`` (default: every key) that ``p`` gives a probability; None when none."""
    keys = [c for c in ((p or {}) if candidates is None else candidates) if p and c in p]
    return max(keys, key=lambda c: p[c]) if keys else None


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()


@dataclass
class MorphologyExpert:
    """P(diagnosis | findings): findings enter as the probability vectors of each criterion's values."""

    inputs: list[tuple[str, str]]  # (criterion, value) per input column
    classes: list[str]
    coef: np.ndarray  # (n_classes, n_inputs)
    intercept: np.ndarray
    all_classes: list[str]
    floor: float = 0.01  # mass for diagnoses the training data lacks (e.g. akiec in Derm7pt)

    def design(self, findings: Mapping[str, Mapping[str, float]]) -> np.ndarray | None:
        if not findings or not any(c in findings for c, _ in self.inputs):
            return None
        return np.array([float((findings.get(c) or {}).get(v, 0.0)) for c, v in self.inputs])

    def predict(self, findings: Mapping[str, Mapping[str, float]]) -> dict[str, float] | None:
        x = self.design(findings)
        if x is None:
            return None
        p = softmax(self.coef @ x + self.intercept)
        out = {c: self.floor for c in self.all_classes}
        out.update({c: float(v) for c, v in zip(self.classes, p)})
        total = sum(out.values())
        return {c: v / total for c, v in out.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MorphologyExpert":
        return cls([tuple(x) for x in d["inputs"]], list(d["classes"]), np.asarray(d["coef"], float), np.asarray(d["intercept"], float),
                   list(d["all_classes"]), float(d.get("floor", 0.01)))  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": [list(x) for x in self.inputs], "classes": self.classes, "coef": self.coef.round(6).tolist(),
                "intercept": self.intercept.round(6).tolist(), "all_classes": self.all_classes, "floor": self.floor}  # fmt: skip


@dataclass
class Fused:
    """The stacker's output for one case."""

    probs: dict[str, float]  # sorted, sums to 1
    contributions: dict[str, dict[str, float]]  # expert → candidate → additive logit contribution (centred)
    experts_used: list[str]
    missing: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # decision order: the label first (see ModalityFusion.decision_coef)


@dataclass
class SetGroups:
    """Groups of calibration cases with their own conformal threshold (Mondrian split-conformal): a linear model
    over the lesion encoder's features assigns an image to the group (e.g. the acquisition source) its calibration
    cases look most like, and the set uses the quantile of that group's scores, so that coverage holds per group
    and not only on the pooled mix. ``calibration_group`` holds each calibration score's group as the model assigned
    it out of fold (its errors are calibrated too)."""

    names: list[str]
    mean: np.ndarray  # (F,) standardisation of the features
    scale: np.ndarray  # (F,)
    coef: np.ndarray  # (1, F) for two groups (the second when positive), (K, F) otherwise
    intercept: np.ndarray
    calibration_group: np.ndarray  # (n,) ints
    accuracy: float | None = None  # out-of-fold accuracy of the assignment on the calibration cases

    def assign(self, features: Sequence[float] | np.ndarray) -> int:
        """The group of an image from its encoder features."""
        x = (np.asarray(features, float) - self.mean) / self.scale
        z = self.coef @ x + self.intercept
        return int(z[0] > 0) if len(z) == 1 else int(np.argmax(z))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SetGroups":
        return cls(list(d["names"]), np.asarray(d["mean"], float), np.asarray(d["scale"], float), np.asarray(d["coef"], float),
                   np.asarray(d["intercept"], float), np.asarray(d["calibration_group"], int), d.get("accuracy"))  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {"names": self.names, "mean": self.mean.round(6).tolist(), "scale": self.scale.round(6).tolist(), "coef": self.coef.round(6).tolist(),
                "intercept": self.intercept.round(6).tolist(), "calibration_group": self.calibration_group.astype(int).tolist(), "accuracy": self.accuracy}  # fmt: skip


@dataclass
class ModalityFusion:
    """Stacker + conformal calibration + acceptance model of one modality."""

    modality: str
    kind: str  # multinomial | conditional_logit
    experts: list[str]
    eps: float
    classes: list[str] = field(default_factory=list)  # multinomial only
    coef: np.ndarray | None = None  # multinomial: (C, E*C); conditional_logit: (E,)
    intercept: np.ndarray | None = None
    centre: dict[str, np.ndarray] = field(default_factory=dict)  # per-expert mean design (imputes a missing expert)
    conformal_score: str = "lac"
    calibration_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    calibration_source: str = ""
    acceptance_coef: np.ndarray | None = None
    acceptance_intercept: float = 0.0
    acceptance_features: tuple[str, ...] = LEGACY_ACCEPTANCE_FEATURES  # the signals acceptance_coef weighs, in order
    acceptance_kappa: np.ndarray = field(default_factory=lambda: np.zeros(0))
    acceptance_correct: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    # The decision model (multinomial only): a class-weighted stacker over the same inputs whose argmax is the
    # label, so that rare, costly diagnoses are not drowned by the majority class, while ``probs`` (what is shown,
    # the conformal sets and the acceptance model) stay those of the calibrated, unweighted stacker.
    decision_coef: np.ndarray | None = None
    decision_intercept: np.ndarray | None = None
    set_groups: SetGroups | None = None  # group-conditional conformal thresholds (None: one pooled threshold)
    meta: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ fusion
    def fuse(self, candidates: Sequence[str], outputs: Mapping[str, Mapping[str, float] | None]) -> Fused:
        """Fused probabilities over ``candidates`` from the experts' distributions (a missing expert is
        imputed by its training mean, i.e. contributes nothing)."""
        if self.kind == "multinomial":
            return self._fuse_multinomial(candidates, outputs)
        return self._fuse_conditional(candidates, outputs)

    def _fuse_multinomial(self, candidates, outputs) -> Fused:
        C = len(self.classes)
        z = np.array(self.intercept, float).copy()
        contrib: dict[str, dict[str, float]] = {}
        used, missing, xs = [], [], []
        for j, e in enumerate(self.experts):
            x = log_probs(outputs.get(e), self.classes, self.eps)
            if x is None:
                missing.append(e)
                x = self.centre[e]
            else:
                used.append(e)
            xs.append(x)
            w = self.coef[:, j * C:(j + 1) * C]
            z += w @ x
            delta = w @ (x - self.centre[e])
            contrib[e] = {c: round(float(d), 4) for c, d in zip(self.classes, delta)}
        p = softmax(z)
        cands = set(candidates)
        probs = {c: float(v) for c, v in zip(self.classes, p) if c in cands}
        total = sum(probs.values()) or 1.0
        probs = dict(sorted(((c, v / total) for c, v in probs.items()), key=lambda kv: -kv[1]))
        order = list(probs)
        if self.decision_coef is not None:
            zd = self.decision_intercept + self.decision_coef @ np.concatenate(xs)
            label = max((c for c in self.classes if c in cands), key=lambda c: zd[self.classes.index(c)])
            order = [label] + [c for c in order if c != label]
        return Fused(probs, contrib, used, missing, order)

    def _fuse_conditional(self, candidates, outputs) -> Fused:
        cands = list(candidates)
        z = np.zeros(len(cands))
        contrib: dict[str, dict[str, float]] = {}
        used, missing = [], []
        for j, e in enumerate(self.experts):
            x = log_probs(outputs.get(e), cands, self.eps)
            if x is None:
                missing.append(e)
                continue
            used.append(e)
            z += self.coef[j] * x
            contrib[e] = {c: round(float(self.coef[j] * (v - x.mean())), 4) for c, v in zip(cands, x)}
        p = softmax(z) if len(cands) else z
        probs = dict(sorted(((c, float(v)) for c, v in zip(cands, p)), key=lambda kv: -kv[1]))
        return Fused(probs, contrib, used, missing, list(probs))

    # ------------------------------------------------------------------ sets and acceptance
    def set_group(self, features: Sequence[float] | np.ndarray | None) -> int | None:
        """The calibration group of an image with these encoder features (None: pooled calibration)."""
        if self.set_groups is None or features is None or len(features) != len(self.set_groups.mean):
            return None
        return self.set_groups.assign(features)

    def qhat(self, alpha: float, group: int | None = None) -> float:
        """The conformal threshold at ``alpha``: over the scores of calibration group ``group``, else all of them."""
        scores = self.calibration_scores
        if group is not None and self.set_groups is not None:
            scores = scores[self.set_groups.calibration_group == group]
        return conformal_quantile(scores, alpha)

    def prediction_set(self, probs: Mapping[str, float], alpha: float, group: int | None = None) -> list[str]:
        return prediction_set(probs, self.qhat(alpha, group), self.conformal_score)  # type: ignore[arg-type]

    def acceptance_score(self, signals: Mapping[str, float]) -> float:
        """Estimated probability that the top label is right, from the signals this model's acceptance uses."""
        x = np.array([float(signals[k]) for k in self.acceptance_features])
        return float(1.0 / (1.0 + math.exp(-(float(self.acceptance_coef @ x) + self.acceptance_intercept))))

    def threshold(self, target_accuracy: float, delta: float) -> tuple[float, dict]:
        return _sgr_cached(self.acceptance_kappa.tobytes(), self.acceptance_correct.tobytes(), round(1 - target_accuracy, 6), delta)

    # ------------------------------------------------------------------ io
    @classmethod
    def from_dict(cls, modality: str, d: Mapping[str, Any]) -> "ModalityFusion":
        acc = d.get("acceptance") or {}
        return cls(
            modality=modality,
            kind=d["kind"],
            experts=list(d["experts"]),
            eps=float(d.get("eps", 1e-3)),
            classes=list(d.get("classes", [])),
            coef=np.asarray(d["coef"], float),
            intercept=np.asarray(d.get("intercept", []), float),
            centre={k: np.asarray(v, float) for k, v in (d.get("centre") or {}).items()},
            conformal_score=d.get("conformal", {}).get("score", "lac"),
            calibration_scores=np.asarray([math.inf if s is None else s for s in d.get("conformal", {}).get("scores", [])], float),
            calibration_source=d.get("conformal", {}).get("source", ""),
            acceptance_coef=np.asarray(acc.get("coef", [0.0] * len(acc.get("features", LEGACY_ACCEPTANCE_FEATURES))), float),
            acceptance_features=tuple(acc.get("features", LEGACY_ACCEPTANCE_FEATURES)),
            acceptance_intercept=float(acc.get("intercept", 0.0)),
            acceptance_kappa=np.asarray(acc.get("kappa", []), float),
            acceptance_correct=np.asarray(acc.get("correct", []), bool),
            decision_coef=np.asarray(d["decision"]["coef"], float) if d.get("decision") else None,
            decision_intercept=np.asarray(d["decision"]["intercept"], float) if d.get("decision") else None,
            set_groups=SetGroups.from_dict(d["conformal"]["groups"]) if (d.get("conformal") or {}).get("groups") else None,
            meta=dict(d.get("meta", {})),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "experts": self.experts,
            "eps": self.eps,
            "classes": self.classes,
            "coef": np.asarray(self.coef).round(6).tolist(),
            "intercept": np.asarray(self.intercept if self.intercept is not None else []).round(6).tolist(),
            "centre": {k: v.round(6).tolist() for k, v in self.centre.items()},
            "conformal": {"score": self.conformal_score, "source": self.calibration_source,
                          "scores": [None if math.isinf(s) else round(float(s), 6) for s in self.calibration_scores],
                          "groups": None if self.set_groups is None else self.set_groups.to_dict()},  # fmt: skip
            "acceptance": {"features": list(self.acceptance_features), "coef": np.asarray(self.acceptance_coef).round(6).tolist(),
                           "intercept": round(self.acceptance_intercept, 6), "kappa": self.acceptance_kappa.round(6).tolist(),
                           "correct": self.acceptance_correct.astype(int).tolist()},  # fmt: skip
            "decision": None if self.decision_coef is None else {"coef": np.asarray(self.decision_coef).round(6).tolist(),
                                                                 "intercept": np.asarray(self.decision_intercept).round(6).tolist()},  # fmt: skip
            "meta": self.meta,
        }


@lru_cache(maxsize=64)
def _sgr_cached(kappa: bytes, correct: bytes, target_risk: float, delta: float) -> tuple[float, dict]:
    return sgr_threshold(np.frombuffer(kappa, float), np.frombuffer(correct, bool), target_risk, delta)


def acceptance_features(probs: Mapping[str, float], pred_set: Sequence[str], expert_tops: Mapping[str, str | None],
                        morphology: Mapping[str, float] | None, label: str | None = None, second_expert_top: str | None = None,
                        tta_agreement: float | None = None) -> dict[str, float]:  # fmt: skip
    """The acceptance model's signals for the decided ``label`` (default: the most probable) under a fused
    distribution (names as in :data:`ACCEPTANCE_FEATURES`). ``second_expert_top``: the second visual expert's
    most probable candidate, fused or not (its agreement is 1 or 0; 0.5 when there is none). ``tta_agreement``:
    the share of test-time views on which the lesion classifier keeps the label (:func:`models.tta.tta_agreement`; 0.5 without)."""
    top = label if label is not None else max(probs, key=probs.get)
    p_top = probs.get(top, 0.0)
    other = max((p for c, p in probs.items() if c != top), default=0.0)
    tops = [t for t in expert_tops.values() if t is not None]
    return {
        "log_top": math.log(max(p_top, 1e-6)),
        "margin": p_top - other,
        "set_size": float(len(pred_set)),
        "expert_agreement": (sum(t == top for t in tops) / len(tops)) if tops else 0.0,
        "morphology_top": float(morphology.get(top, 0.0)) if morphology else 0.0,
        "second_expert_agrees": 0.5 if second_expert_top is None else float(second_expert_top == top),
        "tta_agreement": 0.5 if tta_agreement is None else float(tta_agreement),
    }


@dataclass
class FusionModel:
    """The whole artifact: the morphology expert and one :class:`ModalityFusion` per calibrated modality."""

    morphology_expert: MorphologyExpert | None
    modalities: dict[str, ModalityFusion]
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> "FusionModel":
        d = json.loads(Path(path).read_text())
        if d.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} fusion artifact (format {d.get('format')!r}); retrain with `dermgraph train fusion`")
        me = d.get("morphology_expert")
        return cls(MorphologyExpert.from_dict(me) if me else None, {m: ModalityFusion.from_dict(m, v) for m, v in d["modalities"].items()},
                   {k: v for k, v in d.items() if k not in ("modalities", "morphology_expert")})  # fmt: skip

    def save(self, path: str | Path) -> Path:
        d = {"format": FORMAT, **self.meta, "morphology_expert": self.morphology_expert.to_dict() if self.morphology_expert else None,
             "modalities": {m: f.to_dict() for m, f in self.modalities.items()}}  # fmt: skip
        Path(path).write_text(json.dumps(d, indent=1))
        return Path(path)
