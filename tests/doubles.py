"""Test doubles for the agent's backends (real code paths, scripted outputs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from models.heads import Head, HeadSet, OODDetector
from models.image_stats import STATS_DIM
from models.protocols import ClassifierOutput
from models.vocabulary import HAM_CLASSES, MODALITIES, SEVEN_POINT

FEAT = 2048


class FakeClassifier:
    """Probabilities fixed by the test; features derived from the pixels so that they differ per image."""

    model_id = "fake-classifier"
    labels = HAM_CLASSES
    feature_dim = FEAT

    def __init__(self, probs: dict[str, float] | None = None):
        self.probs = probs or {"mel": 0.6, "nv": 0.3, "bkl": 0.1}
        self.calls = 0

    def predict(self, images, metadata=None):
        self.calls += 1
        p = np.array([[self.probs.get(c, 0.0) for c in HAM_CLASSES] for _ in images], dtype=np.float32)
        p = (p + 1e-6) / (p + 1e-6).sum(1, keepdims=True)
        feats = np.stack([np.resize(np.asarray(im.resize((16, 16)), dtype=np.float32).ravel() / 255.0, FEAT) for im in images])
        return ClassifierOutput(p, feats, HAM_CLASSES)


def constant_heads(name_to_value: dict[str, tuple[tuple[str, ...], str]], dim: int, ood_threshold: float | None = None) -> HeadSet:
    """A real HeadSet whose heads always predict the given value (zero weights, biased logits)."""
    heads = {}
    for name, (classes, value) in name_to_value.items():
        bias = np.full(len(classes), -2.0, dtype=np.float32)
        bias[classes.index(value)] = 2.0
        heads[name] = Head(name, list(classes), np.zeros((dim, len(classes)), np.float32), bias)
    ood = None
    if ood_threshold is not None:
        ood = OODDetector(np.zeros((dim, 2), np.float32), np.zeros((1, 2), np.float32), ood_threshold)
    return HeadSet(np.zeros(dim, np.float32), np.ones(dim, np.float32), heads, ood=ood, meta={"id": "test-heads", "min_confidence": 0.5})


def modality_heads(label: str = "dermoscopy", ood_threshold: float | None = 10.0) -> HeadSet:
    return constant_heads({"modality": (MODALITIES, label)}, FEAT + STATS_DIM, ood_threshold)


def concept_heads(values: dict[str, str] | None = None) -> HeadSet:
    values = values or {}
    return constant_heads({c: (vals, values.get(c, "absent")) for c, vals in SEVEN_POINT.items()}, FEAT)


class FakeKB:
    def __init__(self):
        self.queries: list[str] = []
        self.model_id = "fake-kb"

    def search(self, text, k=4, modality=None):
        self.queries.append(text)
        return [
            {"id": "kb:melanoma#dermoscopy", "entry_id": "kb:melanoma", "title": "Melanoma", "text": "Atypical network, blue-whitish veil.", "score": 0.8, "ham_class": "mel", "source": "dermgraph-kb"},
            {"id": "kb:nevus#dermoscopy", "entry_id": "kb:nevus", "title": "Melanocytic nevus", "text": "Typical network, regular globules.", "score": 0.6, "ham_class": "nv", "source": "dermgraph-kb"},
        ][:k]


class FakeKnowledge:
    """Expected 7-point findings per label (as the knowledge base provides them)."""

    expected = {
        "mel": {"pigment_network": ["atypical"], "blue_whitish_veil": ["present"]},
        "nv": {"pigment_network": ["typical", "absent"], "blue_whitish_veil": ["absent"]},
    }

    def entry_for_label(self, label):
        exp = self.expected.get(label)
        return SimpleNamespace(id=f"kb:{label}", ham_class=label, expected_7pt=exp) if exp else None


@dataclass
class FakeHit:
    id: str
    score: float
    record: dict[str, Any]


class FakeCases:
    def __init__(self, hits: list[tuple[str, str, float]] | None = None):
        self.hits = hits or [("ham10000:a", "mel", 0.9), ("ham10000:b", "mel", 0.85), ("ham10000:c", "nv", 0.8), ("dermnet:d", "Acne vulgaris", 0.7)]

    def search(self, features, k=8, *, exclude_ids=None, sources=None):
        out = [FakeHit(i, s, {"id": i, "label": lab, "caption": f"case {i}", "source": i.split(":")[0]}) for i, lab, s in self.hits]
        out = [h for h in out if (sources is None or h.record["source"] in sources) and h.id not in set(exclude_ids or ())][:k]
        return [out for _ in range(len(features))]


@dataclass
class ScoringLLM:
    """Scores candidates by a fixed preference; chat returns scripted replies in order (last one repeats)."""

    prefer: dict[str, float] = field(default_factory=lambda: {"melanoma": -1.0})
    replies: list[str] = field(default_factory=lambda: ["The atypical network and veil [E1] favour melanoma over nevus [E2]."])
    model_id: str = "scripted-llm"
    chats: list[Any] = field(default_factory=list)
    scored: int = 0

    def score_continuations(self, conversation, assistant_prefix, continuations):
        self.scored += 1
        return np.array([self.prefer.get(c, -5.0) for c in continuations])

    def chat(self, conversations, **kw):
        self.chats.append((conversations, kw))
        i = min(len(self.chats) - 1, len(self.replies) - 1)
        return [self.replies[i] for _ in conversations]


class NoScoreLLM(ScoringLLM):
    """A backend that can only chat (like many OpenAI-compatible servers)."""

    def score_continuations(self, *a, **k):
        raise NotImplementedError


FUSION = {
    "dermoscopy": {"w_classifier": 1.0, "w_knn": 0.5, "w_llm": 0.5, "bias": {}},
    "clinical": {"w_knn": 1.0, "w_llm": 0.3},
}


def backends(**over):
    """A full set of doubles for ``Agent(backends=...)``."""
    base = {
        "classifier": FakeClassifier(),
        "modality_heads": modality_heads(),
        "concept_heads": concept_heads({"pigment_network": "atypical", "blue_whitish_veil": "present"}),
        "kb": FakeKB(),
        "knowledge": FakeKnowledge(),
        "cases": FakeCases(),
        "llm": ScoringLLM(),
        "fusion": FUSION,
    }
    base.update(over)
    return base
