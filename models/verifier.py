"""Trained consistency verifier: P(consistent | observed 7-point findings, stated diagnosis[, expert agreement]).

A logistic model over small, readable features of a (findings, diagnosis) pair:

* per criterion, the probability mass the describer puts on the values the knowledge base expects for
  the diagnosis (0 where it expects nothing), and their mean (the rule score ``morphology_agreement``);
* the diagnosis one-hot and its interaction with every finding probability (26 values), i.e. a learned
  expected morphology per diagnosis; diagnoses without training positives get the shared part only;
* optionally the lesion classifier's probability of the stated diagnosis (``expert``).

The logit is Platt-calibrated on held-out pairs weighted so that consistent and inconsistent pairs
count equally: 0.5 means "the findings say nothing either way". Stored as one safetensors file with
a JSON config (expected findings per label included, so a scored pair never depends on a changed KB).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from models.vocabulary import SEVEN_POINT

FINDING_VALUES: tuple[tuple[str, str], ...] = tuple((c, v) for c, vals in SEVEN_POINT.items() for v in vals)
CRITERIA: tuple[str, ...] = tuple(SEVEN_POINT)


def finding_vector(observed: Mapping[str, Mapping[str, float]]) -> np.ndarray:
    """Probabilities of the 26 criterion values in a fixed order (0 where not observed)."""
    return np.array([float((observed.get(c) or {}).get(v, 0.0)) for c, v in FINDING_VALUES], dtype=np.float32)


def expected_mass(observed: Mapping[str, Mapping[str, float]], expected: Mapping[str, Sequence[str]]) -> np.ndarray:
    """Per criterion, the observed mass on the expected values (0 where nothing is expected)."""
    out = np.zeros(len(CRITERIA), np.float32)
    for i, c in enumerate(CRITERIA):
        probs, values = observed.get(c), expected.get(c)
        if probs and values:
            out[i] = sum(float(probs.get(v, 0.0)) for v in values)
    return out


@dataclass
class ConsistencyModel:
    """Logistic consistency scorer with Platt calibration (see the module docstring)."""

    labels: list[str]  # every label it can score (those with expected findings)
    diagnoses: list[str]  # labels with diagnosis-specific weights (had training positives)
    expected: dict[str, dict[str, list[str]]]
    weight: np.ndarray  # (D,)
    bias: float
    platt: tuple[float, float] = (1.0, 0.0)  # P = sigmoid(a * logit + b)
    threshold: float = 0.5
    use_expert: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def model_id(self) -> str:
        return str(self.meta.get("id", "consistency-model"))

    @property
    def dim(self) -> int:
        return len(CRITERIA) + 1 + len(self.diagnoses) * (1 + len(FINDING_VALUES)) + int(self.use_expert)

    def features(self, observed: Mapping[str, Mapping[str, float]], label: str, expert: float | None = None) -> np.ndarray:
        """Feature vector of one pair; ``label`` must be in :attr:`labels`."""
        mass = expected_mass(observed, self.expected[label])
        n_expected = max(1, sum(1 for c in CRITERIA if self.expected[label].get(c) and observed.get(c)))
        parts = [mass, np.array([mass.sum() / n_expected], np.float32)]
        spec = np.zeros((len(self.diagnoses), 1 + len(FINDING_VALUES)), np.float32)
        if label in self.diagnoses:
            spec[self.diagnoses.index(label)] = np.concatenate([[1.0], finding_vector(observed)])
        parts.append(spec.ravel())
        if self.use_expert:
            parts.append(np.array([0.5 if expert is None else float(expert)], np.float32))
        return np.concatenate(parts)

    def logit(self, x: np.ndarray) -> np.ndarray:
        return np.atleast_2d(x) @ self.weight + self.bias

    def calibrate(self, logit: np.ndarray) -> np.ndarray:
        a, b = self.platt
        z = np.clip(a * np.asarray(logit, float) + b, -500, 500)  # exp overflow for extreme logits
        return 1.0 / (1.0 + np.exp(-z))

    def score(self, observed: Mapping[str, Mapping[str, float]], label: str, expert: float | None = None) -> float | None:
        """Calibrated P(consistent) of the findings with ``label``; None when the label is not scorable
        (no expected findings) or nothing was observed."""
        if label not in self.expected or not observed:
            return None
        return round(float(self.calibrate(self.logit(self.features(observed, label, expert)))[0]), 4)

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        cfg = {"labels": self.labels, "diagnoses": self.diagnoses, "expected": self.expected, "bias": self.bias, "platt": list(self.platt),
               "threshold": self.threshold, "use_expert": self.use_expert, "finding_values": [list(fv) for fv in FINDING_VALUES], "meta": self.meta}  # fmt: skip
        save_file({"weight": np.ascontiguousarray(self.weight, dtype=np.float32)}, str(path), metadata={"config": json.dumps(cfg)})

    @classmethod
    def load(cls, path: str | Path) -> "ConsistencyModel":
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            cfg = json.loads(f.metadata()["config"])
            weight = f.get_tensor("weight")
        if [tuple(v) for v in cfg["finding_values"]] != list(FINDING_VALUES):
            raise ValueError(f"{path}: trained on a different 7-point vocabulary than models.vocabulary.SEVEN_POINT")
        m = cls(cfg["labels"], cfg["diagnoses"], cfg["expected"], weight, float(cfg["bias"]), tuple(cfg["platt"]), float(cfg["threshold"]), bool(cfg["use_expert"]), cfg.get("meta", {}))
        if weight.shape != (m.dim,):
            raise ValueError(f"{path}: weight has shape {weight.shape}, expected ({m.dim},)")
        return m
