"""Test doubles for dermgraph's backends: deterministic stand-ins that exercise the real code paths.

In the spirit of pydantic-ai's ``TestModel``: give them to the agent by role and test your own code
without weights, network or GPU::

    from agent import Agent
    from agent.testing import TestLLM, backends

    agent = Agent(backends=backends(llm=TestLLM(scores={"melanocytic nevus": 0.0})))
    d = agent.diagnose(image)                          # every node runs; only the models are doubles

What is here:

* agent roles (:func:`backends` gives a full set): :class:`FakeClassifier`, :func:`modality_heads`,
  :func:`concept_heads` (real ``HeadSet`` objects with constant outputs), :class:`FakeKB`,
  :class:`FakeKnowledge`, :class:`FakeCases`;
* :class:`TestLLM`, the one LLM double (scripted or computed replies, candidate scores or none), and
  :class:`EchoLLM`, its variant that a benchmark builds by registry name;
* VLM and embedder doubles answering from the image: :class:`ColourVLM`, :class:`FeatureReadingVLM`,
  :class:`ColourEmbedder`;
* :class:`FakeOpenAIServer`, an OpenAI-compatible (vLLM-flavoured) HTTP server on 127.0.0.1;
* :func:`build_tiny_llama` / :func:`build_tiny_llava`: randomly initialised tiny Hugging Face models
  saved offline, for the transformers backends' own tests.

None of these is ever a default: the agent builds real backends unless a double is passed.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

import numpy as np

from models.heads import Head, HeadSet, OODDetector
from models.image_stats import STATS_DIM
from models.protocols import ClassifierOutput
from models.vocabulary import HAM_CLASSES, MODALITIES, SEVEN_POINT

Message = dict[str, str]
FEAT = 2048
"""Feature width of :class:`FakeClassifier` (the shipped encoder's)."""


# --------------------------------------------------------------------------- agent roles

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


class FakeSecondExpert:
    """A second visual expert (:class:`models.efficientnet.EfficientNetExpert`'s ``predict_heads`` and
    ``info``) whose HAM10000 and DermNet heads give fixed probabilities."""

    model_id = "fake-second-expert"

    def __init__(self, ham: dict[str, float] | None = None, dermnet: dict[str, float] | None = None, criteria: dict[str, str] | None = None,
                 modality: dict[str, float] | None = None):
        """``criteria``: criterion -> value its ``crit_<criterion>`` head favours (p = 0.8; no criteria heads when None);
        ``modality``: its modality head's probabilities (no modality head when None)."""
        self.ham = ham or {"nv": 0.7, "mel": 0.2, "bkl": 0.1}
        self.dermnet = dermnet or {"Psoriasis": 0.6, "Eczema": 0.3, "Melanoma": 0.1}
        self.criteria = criteria
        self.modality = modality
        self.info = {"heads": {"ham": list(HAM_CLASSES), "dermnet": list(self.dermnet)}}
        if modality is not None:
            self.info["heads"]["modality"] = list(MODALITIES)
        if criteria is not None:
            self.info["heads"].update({f"crit_{c}": list(vals) for c, vals in SEVEN_POINT.items()})
        self.calls = 0

    def predict_heads(self, images):
        self.calls += 1
        ham = np.array([[self.ham.get(c, 0.0) for c in HAM_CLASSES] for _ in images], dtype=np.float32)
        dn = np.array([list(self.dermnet.values()) for _ in images], dtype=np.float32)
        heads = {"ham": ham, "dermnet": dn}
        if self.modality is not None:
            heads["modality"] = np.array([[self.modality.get(m, 0.0) for m in MODALITIES] for _ in images], dtype=np.float32)
        for c, vals in SEVEN_POINT.items() if self.criteria is not None else ():
            favoured = self.criteria.get(c, "absent")
            row = [0.8 if v == favoured else 0.2 / (len(vals) - 1) for v in vals]
            heads[f"crit_{c}"] = np.array([row for _ in images], dtype=np.float32)
        return np.zeros((len(images), 8), np.float32), heads


class FakeClinicalProbe:
    """A clinical feature probe (:class:`models.probe.FeatureProbe`'s ``classes`` and ``predict``) with fixed DermNet probabilities."""

    model_id = "fake-clinical-probe"

    def __init__(self, dermnet: dict[str, float] | None = None):
        self.dermnet = dermnet or {"Eczema": 0.5, "Psoriasis": 0.3, "Tinea corporis": 0.2}
        self.calls = 0

    @property
    def classes(self) -> list[str]:
        return list(self.dermnet)

    def predict(self, images, lesion_features):
        self.calls += 1
        return np.array([list(self.dermnet.values()) for _ in images], dtype=np.float32)


class FakeModalityProbe:
    """A modality probe (:class:`models.probe.FeatureProbe` on ImageNet features) with fixed modality probabilities."""

    model_id = "fake-modality-probe"

    def __init__(self, probs: dict[str, float] | None = None):
        self.probs = probs or {"clinical": 0.1, "dermoscopy": 0.8, "histopathology": 0.05, "not_skin": 0.05}
        self.calls = 0

    @property
    def classes(self) -> list[str]:
        return list(self.probs)

    def predict(self, images, lesion_features=None):
        self.calls += 1
        return np.array([list(self.probs.values()) for _ in images], dtype=np.float32)


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
    """A two-entry knowledge base (real :class:`retrieval.kb.KBEntry` objects) with known expected findings."""

    expected = {
        "mel": {"pigment_network": ["atypical"], "blue_whitish_veil": ["present"]},
        "nv": {"pigment_network": ["typical", "absent"], "blue_whitish_veil": ["absent"]},
    }

    def __init__(self):
        from retrieval.kb import KBEntry, Morphology

        self.entries = {
            "mel": KBEntry(id="kb:melanoma", name="Melanoma", aliases=["mel", "melanoma"], ham_class="mel", malignant=True, categories=["melanocytic"],
                           morphology=Morphology(clinical="An asymmetric, multicoloured macule."), expected_7pt=self.expected["mel"]),
            "nv": KBEntry(id="kb:nevus", name="Melanocytic nevus", aliases=["nv", "melanocytic nevus"], ham_class="nv", malignant=False,
                          categories=["melanocytic", "benign"], morphology=Morphology(clinical="A symmetric brown macule."), expected_7pt=self.expected["nv"]),
        }  # fmt: skip

    def __iter__(self):
        return iter(self.entries.values())

    def entry_for_label(self, label):
        return self.entries.get(label)

    def ham_class_for(self, label):
        """HAM10000 code of an entry named by ``label`` (code, name or alias), as :meth:`retrieval.kb.KnowledgeBase.ham_class_for`."""
        low = label.lower()
        hit = next((e for e in self.entries.values() if low in {e.name.lower(), *(a.lower() for a in e.aliases)}), None)
        return hit.ham_class if hit is not None else None


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


def _calibration(seed: int = 0, n: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic calibration: conformal scores, and (κ, correct) pairs with P(correct | κ) = min(1, κ + 0.3)."""
    rng = np.random.default_rng(seed)
    kappa = np.linspace(0.01, 0.99, n)
    return rng.uniform(0, 0.8, n), kappa, rng.uniform(size=n) < np.clip(kappa + 0.3, 0, 1)


def fusion_model(w_classifier: float = 1.0, w_knn: float = 0.5, w_morphology: float = 0.5, w_llm: float = 0.5, clinical=(1.0, 0.3)):
    """A fusion artifact (:class:`models.stacker.FusionModel`) with product-of-experts weights and synthetic
    calibration: acceptance needs a confident top label that the experts agree on."""
    from models.stacker import LEGACY_ACCEPTANCE_FEATURES as ACCEPTANCE_FEATURES
    from models.stacker import FusionModel, ModalityFusion, MorphologyExpert

    C = len(HAM_CLASSES)
    experts = ["classifier", "knn", "morphology", "llm"]
    coef = np.concatenate([w * np.eye(C) for w in (w_classifier, w_knn, w_morphology, w_llm)], axis=1)
    centre = {e: np.full(C, np.log(1.0 / C)) for e in experts}
    scores, kappa, correct = _calibration()
    acc = dict(acceptance_coef=np.array([6.0 if k == "log_top" else 3.0 if k == "expert_agreement" else 0.0 for k in ACCEPTANCE_FEATURES]),
               acceptance_intercept=-3.0, acceptance_kappa=kappa, acceptance_correct=correct)  # fmt: skip
    derm = ModalityFusion("dermoscopy", "multinomial", experts, 1e-3, list(HAM_CLASSES), coef, np.zeros(C), centre,
                          calibration_scores=scores, calibration_source="synthetic (test double)", **acc)  # fmt: skip
    clin = ModalityFusion("clinical", "conditional_logit", ["knn", "llm"], 1e-3, coef=np.array(clinical), intercept=np.zeros(0),
                          calibration_scores=scores, calibration_source="synthetic (test double)", **acc)  # fmt: skip
    inputs = [(c, v) for c, vals in SEVEN_POINT.items() for v in vals]
    # Findings model: an atypical network and a veil point to melanoma, a typical network to a nevus.
    mcoef = np.zeros((2, len(inputs)))
    mcoef[0, inputs.index(("pigment_network", "atypical"))] = mcoef[0, inputs.index(("blue_whitish_veil", "present"))] = 2.0
    mcoef[1, inputs.index(("pigment_network", "typical"))] = mcoef[1, inputs.index(("blue_whitish_veil", "absent"))] = 2.0
    morph = MorphologyExpert(inputs, ["mel", "nv"], mcoef, np.zeros(2), list(HAM_CLASSES))
    return FusionModel(morph, {"dermoscopy": derm, "clinical": clin}, {"id": "fusion-double"})


def backends(**over):
    """A full set of doubles for ``Agent(backends=...)``."""
    base = {
        "classifier": FakeClassifier(),
        "second_expert": None,  # no second visual expert unless a test gives one (FakeSecondExpert)
        "clinical_probe": None,  # no clinical feature probe unless a test gives one (FakeClinicalProbe)
        "modality_probe": None,  # no modality probe unless a test gives one (FakeModalityProbe): the head alone decides
        "modality_heads": modality_heads(),
        "concept_heads": concept_heads({"pigment_network": "atypical", "blue_whitish_veil": "present"}),
        "kb": FakeKB(),
        "knowledge": FakeKnowledge(),
        "cases": FakeCases(),
        "expert_cases": None,  # the second expert's case index: clinical photos fall back to ``cases`` without it
        "llm": TestLLM(),
        "fusion": fusion_model(),
    }
    base.update(over)
    return base

# --------------------------------------------------------------------------- LLMs


def _trim_at_stop(text: str, stop: Sequence[str] | None) -> str:
    cut = len(text)
    for s in stop or ():
        if s and 0 <= (i := text.find(s)) < cut:
            cut = i
    return text[:cut]


DEFAULT_REPLY = "The atypical network and veil [E1] favour melanoma over nevus [E2]."
DEFAULT_SCORES = {"melanoma": -1.0}


class TestLLM:
    """An :class:`models.protocols.LLM` that answers from a script.

    ``replies``: a list consumed in order (one item per conversation, across calls; the last one repeats
    unless ``repeat_last=False``, which makes running out an error) or a callable
    ``replies(conversation) -> str``. A reply is the text *after* any ``assistant_prefix``; ``stop``
    strings are applied as a real backend would. ``scores`` (for ``score_continuations``): a mapping
    continuation -> score (others score -5), a callable ``scores(conversation, assistant_prefix,
    continuations)``, or None for a chat-only backend (NotImplementedError, like many OpenAI-compatible
    servers). The defaults prefer "melanoma" and cite [E1]/[E2]. Every call is recorded in ``calls``.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        replies: Sequence[str] | Callable[[list[Message]], str] | None = None,
        *,
        scores: Mapping[str, float] | Callable[[list[Message], str, list[str]], Sequence[float]] | None = DEFAULT_SCORES,
        repeat_last: bool = True,
        model_id: str = "test-llm",
    ) -> None:
        self.model_id = model_id
        self._replies = replies if callable(replies) else list([DEFAULT_REPLY] if replies is None else replies)
        self._scores = scores
        self.repeat_last = repeat_last
        self.calls: list[dict[str, Any]] = []

    @property
    def remaining(self) -> int | None:
        """Replies left in a list script (None for a callable script)."""
        return None if callable(self._replies) else len(self._replies)

    @property
    def chats(self) -> list[dict[str, Any]]:
        """The recorded chat calls (one per conversation)."""
        return [c for c in self.calls if c["method"] == "chat"]

    @property
    def scored(self) -> int:
        """How many times candidates were scored."""
        return sum(c["method"] == "score_continuations" for c in self.calls)

    def _next_reply(self, conv: list[Message]) -> str:
        if callable(self._replies):
            return self._replies(conv)
        if not self._replies:
            raise AssertionError(f"TestLLM ran out of replies (call {len(self.calls)})")
        if self.repeat_last and len(self._replies) == 1:
            return self._replies[0]
        return self._replies.pop(0)

    def chat(
        self,
        conversations: Sequence[Sequence[Message]],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        seed: int | None = None,
        assistant_prefix: str = "",
        stop: Sequence[str] | None = None,
    ) -> list[str]:
        out = []
        for conv in conversations:
            conv = [dict(m) for m in conv]
            kwargs = {
                "max_new_tokens": max_new_tokens,
                "temperature": temperature,
                "seed": seed,
                "assistant_prefix": assistant_prefix,
                "stop": list(stop) if stop else None,
            }
            self.calls.append({"method": "chat", "conversation": conv, "kwargs": kwargs})
            out.append(_trim_at_stop(self._next_reply(conv), stop))
        return out

    def score_continuations(self, conversation: Sequence[Message], assistant_prefix: str, continuations: Sequence[str]) -> np.ndarray:
        conv = [dict(m) for m in conversation]
        self.calls.append(
            {"method": "score_continuations", "conversation": conv, "kwargs": {"assistant_prefix": assistant_prefix, "continuations": list(continuations)}}
        )
        if self._scores is None:
            raise NotImplementedError("this TestLLM was built with scores=None (a chat-only backend)")
        if callable(self._scores):
            return np.asarray(self._scores(conv, assistant_prefix, list(continuations)), dtype=np.float64)
        return np.array([self._scores.get(c, -5.0) for c in continuations], dtype=np.float64)


class EchoLLM(TestLLM):
    """A chat-only :class:`TestLLM` built by registry name (``models.backends.BACKENDS``): answers
    ``replies[question]``, else ``"Answer: <question>"``. Conversations are also recorded in the class
    attribute ``log`` (clear it in the test), since the benchmark, not the test, creates the instance."""

    log: list[list[list[Message]]] = []

    def __init__(self, model: str = "echo-llm", replies: dict[str, str] | None = None) -> None:
        answers = dict(replies or {})
        super().__init__(lambda conv: answers.get(conv[-1]["content"], f"Answer: {conv[-1]['content']}"), scores=None, model_id=model)

    def chat(self, conversations, **kwargs) -> list[str]:
        EchoLLM.log.append([list(c) for c in conversations])
        return super().chat(conversations, **kwargs)


# --------------------------------------------------------------------------- VLMs and image embedders

def _dominant(image: Any) -> str:
    r, g, b = np.asarray(image.convert("RGB"), float).reshape(-1, 3).mean(axis=0)
    return ("red", "green", "blue")[int(np.argmax([r, g, b]))]


class ColourVLM:
    """A VLM whose answer is ``answers[dominant colour of the image]`` (red/green/blue)."""

    calls: list[dict[str, Any]] = []

    def __init__(self, model: str = "colour-vlm", answers: dict[str, str] | None = None) -> None:
        self.model_id = model
        self.answers = answers or {}

    def generate(self, images: Sequence[Any], prompts: Sequence[str], *, max_new_tokens: int = 128, temperature: float = 0.0) -> list[str]:
        ColourVLM.calls.append({"n": len(images), "prompts": list(prompts), "max_new_tokens": max_new_tokens})
        return [self.answers.get(_dominant(im), "I am not sure.") for im in images]


class ColourEmbedder:
    """An ImageEmbedder: the image's mean RGB (scaled to 0..1) plus ``dim - 3`` zeros, L2-normalised."""

    calls: list[int] = []
    model_id = "colour-embedder"

    def __init__(self, dim: int = 8) -> None:
        self.dim = dim

    def embed_images(self, images: Sequence[Any]) -> np.ndarray:
        ColourEmbedder.calls.append(len(images))
        out = np.zeros((len(images), self.dim), np.float32)
        for i, im in enumerate(images):
            out[i, :3] = np.asarray(im.convert("RGB"), float).reshape(-1, 3).mean(axis=0) / 255.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


class FeatureReadingVLM(ColourVLM):
    """A ``needs_features`` VLM (like ``models.backends.feature_vlm``): answers from ``features=``, which it requires."""

    needs_features = True

    def generate(self, images, prompts, *, features=None, probs=None, max_new_tokens=128, temperature=0.0):
        if features is None or probs is None or len(features) != len(images):
            raise AssertionError("features/probs not passed")
        ColourVLM.calls.append({"n": len(images), "features": np.asarray(features).shape, "probs": np.asarray(probs).shape})
        return ["melanoma"] * len(images)


# --------------------------------------------------------------------------- fake server

_TOKEN_RE = re.compile(r"\s*(?:\w+|[^\w\s])|\s+")


def fake_tokenize(text: str) -> list[str]:
    """The fake server's tokenizer: words and punctuation with their leading whitespace (joins back to text)."""
    return _TOKEN_RE.findall(text)


def fake_logprob(token: str) -> float:
    """The fake server's log-probability of a token: a deterministic function of the token text."""
    return -0.25 * len(token) - 0.125


def fake_render(
    messages: Sequence[dict], add_generation_prompt: bool = True, continue_final_message: bool = False
) -> str:
    """The fake server's chat template."""

    def content(m: dict) -> str:
        c = m.get("content") or ""
        if isinstance(c, list):
            return "".join(p.get("text", "<image>") if p.get("type") == "text" else "<image>" for p in c)
        return c

    parts = [f"<|{m['role']}|>{content(m)}\n" for m in messages]
    if continue_final_message and messages:
        parts[-1] = parts[-1][:-1]
    elif add_generation_prompt:
        parts.append("<|assistant|>")
    return "".join(parts)


def default_reply(body: dict) -> str:
    """Echo the last user message, so tests can see what the server received."""
    users = [m for m in body.get("messages", []) if m.get("role") == "user"]
    last = users[-1]["content"] if users else ""
    if isinstance(last, list):
        n_images = sum(1 for p in last if p.get("type") == "image_url")
        text = " ".join(p.get("text", "") for p in last if p.get("type") == "text")
        return f"{n_images} image(s): {text}"
    return f"echo: {last}"


class FakeOpenAIServer:
    """An OpenAI-compatible server on 127.0.0.1 with vLLM's extras, for tests.

    Serves ``/v1/chat/completions``, ``/v1/completions`` (``echo`` + ``logprobs`` with
    :func:`fake_tokenize`/:func:`fake_logprob`), ``/tokenize`` and ``/detokenize``.
    ``reply(body) -> str`` makes chat answers (default: echo); ``max_tokens`` and ``stop`` are
    applied like vLLM. ``scoring=False`` behaves like a plain OpenAI server (404 on /tokenize,
    400 on echo). :meth:`fail` injects error statuses. Requests are recorded in ``requests``.
    """

    def __init__(self, reply: Callable[[dict], str] | None = None, *, scoring: bool = True) -> None:
        self.reply = reply or default_reply
        self.scoring = scoring
        self.requests: list[tuple[str, dict]] = []
        self._failures: list[tuple[str | None, int, str]] = []
        self._vocab: list[str] = []
        self._ids: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> FakeOpenAIServer:
        handler = _make_handler(self)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``."""
        assert self._server is not None, "server not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    # -- scripting

    def fail(self, status: int, times: int = 1, path: str | None = None, body: str = "injected failure") -> None:
        """Answer the next ``times`` requests (to ``path``, if given) with HTTP ``status``."""
        with self._lock:
            self._failures.extend([(path, status, body)] * times)

    def paths(self) -> list[str]:
        """Paths of the recorded requests, in order."""
        return [p for p, _ in self.requests]

    # -- request handling (called from the handler threads)

    def _take_failure(self, path: str) -> tuple[int, str] | None:
        with self._lock:
            for i, (want, status, body) in enumerate(self._failures):
                if want is None or want == path:
                    del self._failures[i]
                    return status, body
        return None

    def _token_ids(self, tokens: list[str]) -> list[int]:
        with self._lock:
            for t in tokens:
                if t not in self._ids:
                    self._ids[t] = len(self._vocab)
                    self._vocab.append(t)
            return [self._ids[t] for t in tokens]

    def handle(self, path: str, body: dict) -> tuple[int, dict]:
        self.requests.append((path, body))
        failure = self._take_failure(path)
        if failure:
            return failure[0], {"error": {"message": failure[1], "code": failure[0]}}
        if path == "/v1/chat/completions":
            return 200, self._chat(body)
        if path == "/v1/completions":
            return self._completions(body)
        if path in ("/tokenize", "/detokenize") and not self.scoring:
            return 404, {"detail": "Not Found"}
        if path == "/tokenize":
            text = body.get("prompt")
            if text is None:
                text = fake_render(
                    body["messages"], body.get("add_generation_prompt", True), body.get("continue_final_message", False)
                )
            ids = self._token_ids(fake_tokenize(text))
            return 200, {"tokens": ids, "count": len(ids), "max_model_len": 4096}
        if path == "/detokenize":
            return 200, {"prompt": "".join(self._vocab[i] for i in body["tokens"])}
        return 404, {"detail": "Not Found"}

    def _chat(self, body: dict) -> dict:
        text = self.reply(body)
        tokens = fake_tokenize(text)
        max_tokens = body.get("max_tokens")
        if max_tokens is not None:
            tokens = tokens[:max_tokens]
        text = _trim_at_stop("".join(tokens), body.get("stop"))
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        }

    def _completions(self, body: dict) -> tuple[int, dict]:
        if body.get("echo") and not self.scoring:
            return 400, {"error": {"message": "echo is not supported", "code": 400}}
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        choices = []
        for i, prompt in enumerate(prompts):
            generated = "!" if body.get("max_tokens", 16) > 0 else ""
            tokens = (fake_tokenize(prompt) if body.get("echo") else []) + ([generated] if generated else [])
            offsets, pos = [], 0
            for t in tokens:
                offsets.append(pos)
                pos += len(t)
            logprobs = [fake_logprob(t) for t in tokens]
            if body.get("echo") and tokens:
                logprobs[0] = None  # like vLLM: nothing predicts the first prompt token
            choice = {"index": i, "text": (prompt if body.get("echo") else "") + generated, "finish_reason": "length"}
            if body.get("logprobs") is not None:
                choice["logprobs"] = {
                    "tokens": tokens,
                    "token_logprobs": logprobs,
                    "text_offset": offsets,
                    "top_logprobs": [None if lp is None else {t: lp} for t, lp in zip(tokens, logprobs, strict=True)],
                }
            choices.append(choice)
        return 200, {"id": "cmpl-fake", "object": "text_completion", "model": body.get("model"), "choices": choices}


def _make_handler(server: FakeOpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def do_POST(self) -> None:  # http.server dispatches on this name
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                status, answer = 400, {"error": {"message": "body is not JSON"}}
            else:
                body["_headers"] = {k.lower(): v for k, v in self.headers.items()}
                status, answer = server.handle(self.path, body)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


# --------------------------------------------------------------------------- tiny offline models

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "What is a melanoma? A melanoma is a skin cancer of melanocytes.",
    "Describe the lesion: an asymmetric pigmented macule with irregular borders and blue-white veil.",
    "The answer is nevus, basal cell carcinoma, seborrheic keratosis, dermatofibroma or vascular lesion.",
    'Reply with JSON: {"diagnosis": "mel", "confidence": 0.8}. Be brief. Name a colour: red, blue.',
]


def tiny_tokenizer(vocab_size: int = 400) -> Any:
    """A small byte-level BPE tokenizer with ChatML special tokens and ``<image>``, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<image>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>", unk_token=None
    )
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.chat_template = CHATML_TEMPLATE
    return tok


def build_tiny_llama(path: Any, seed: int = 0) -> Any:
    """Save a randomly initialised 2-layer Llama + :func:`tiny_tokenizer` to ``path``; returns the path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    # Random init gives near-uniform logits; sharper ones make greedy decoding and scores informative.
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_tiny_llava(path: Any, seed: int = 0) -> Any:
    """Save a randomly initialised tiny LLaVA (CLIP vision tower + Llama) with its processor to ``path``."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = tiny_tokenizer()
    image_size, patch = 32, 8
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
        patch_size=patch, projection_dim=32,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    )  # fmt: skip
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_center_crop=True, do_resize=True, do_normalize=True, do_convert_rgb=True,
    )  # fmt: skip
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
        chat_template=CHATML_TEMPLATE, image_token="<image>", num_additional_image_tokens=1,
    )  # fmt: skip
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
