"""Micro-batched execution: a pre-encoding stage feeding caching backends, with LangGraph still running each case.

For each micro-batch of upcoming cases the :class:`BatchedAgent` loads the images once, runs the lesion
encoder over all of them in one forward pass, runs the cheap front nodes (modality, morphology: the
real node functions) to learn each case's modality and retrieval query, embeds every knowledge-base
query in one call and searches the case index with one query matrix per modality. Where the configuration
uses the LLM, the first round's candidate scorings and rationales of the micro-batch run as batched LLM
calls too (:func:`llm_first_round`). The results go into caching wrappers installed on the agent's
runtime; the graph then runs each case as usual and its backends answer from the cache. Records are
therefore those of the sequential path by construction (the cache returns what the wrapped backend returns
for the same input, up to the float rounding of a differently shaped batch; a miss falls through to it).

Why not ``graph.batch()``: it runs invocations in a thread pool. Under the GIL on a 2-core machine the
threads do not run the Python node code in parallel, and batching backends fed by concurrent threads
need a timed queue whose batch composition (and thus floating-point results) depends on timing. The
pre-encoding stage batches deterministically and keeps one record per case, written as it finishes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections import defaultdict, deque
from typing import Any, Sequence

import numpy as np

from models.protocols import ClassifierOutput


def front_state(state, rt):
    """``state`` after the cheap front nodes (encode, modality, morphology) run on ``rt``, stopping after a
    rejected modality; no trace entry. What retrieval will query with, known before the graph runs."""
    from agent.graph import NODES
    from agent.nodes.base import traced

    for name in ("encode", "modality", "morphology"):
        upd = traced(name, NODES[name], rt)(state)
        upd.pop("trace")
        state = state.model_copy(update=upd)
        if name == "modality" and state.modality.rejected:
            break
    return state


def _image_key(image, meta) -> str:
    h = hashlib.blake2b(image.tobytes(), digest_size=16)
    h.update(f"{image.mode}{image.size}".encode())
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _row_key(row) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(row, dtype=np.float32).tobytes(), digest_size=16).digest()


class _Delegate:
    def __init__(self, inner):
        self.inner = inner
        self.cache: dict[Any, Any] = {}
        self.hits = self.misses = 0

    def __getattr__(self, name):  # model_id, labels, feature_dim, ...
        return getattr(self.inner, name)


class CachingClassifier(_Delegate):
    """Classifier whose ``predict`` answers prefetched (image, metadata) rows from one batched forward pass."""

    def prefetch(self, images: Sequence[Any], metadata: Sequence[dict | None]) -> None:
        out = self.inner.predict(list(images), list(metadata))
        self.cache = {_image_key(im, m): (out.probs[i], out.features[i]) for i, (im, m) in enumerate(zip(images, metadata))}
        self._labels = out.labels

    def predict(self, images, metadata=None) -> ClassifierOutput:
        metas = list(metadata) if metadata is not None else [None] * len(images)
        rows = [self.cache.get(_image_key(im, m)) for im, m in zip(images, metas)]
        if not images or any(r is None for r in rows):
            self.misses += 1
            return self.inner.predict(images, metadata)
        self.hits += 1
        return ClassifierOutput(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]), self._labels)


class CachingSecondExpert(_Delegate):
    """Second visual expert whose ``predict_heads`` answers prefetched images from one batched forward pass."""

    def prefetch(self, images: Sequence[Any]) -> None:
        feats, heads = self.inner.predict_heads(list(images))
        self.cache = {_image_key(im, None): (feats[i], {k: v[i] for k, v in heads.items()}) for i, im in enumerate(images)}

    def predict_heads(self, images):
        rows = [self.cache.get(_image_key(im, None)) for im in images]
        if not images or any(r is None for r in rows):
            self.misses += 1
            return self.inner.predict_heads(images)
        self.hits += 1
        return np.stack([r[0] for r in rows]), {k: np.stack([r[1][k] for r in rows]) for k in rows[0][1]}


class CachingProbe(_Delegate):
    """Feature probe (the clinical probe, the modality probe) whose ``predict`` answers prefetched images (with their
    lesion features, for the probes that read them) from one batched ImageNet pass."""

    def prefetch(self, images: Sequence[Any], lesion_features: Sequence[np.ndarray] | None = None) -> None:
        if not len(images):
            return
        feats = None if lesion_features is None else np.stack(lesion_features)
        probs = self.inner.predict(list(images), feats)
        self.cache = {self._key(im, None if feats is None else feats[i]): probs[i] for i, im in enumerate(images)}

    @staticmethod
    def _key(image, lesion_row) -> tuple:
        return _image_key(image, None), None if lesion_row is None else _row_key(lesion_row)

    def predict(self, images, lesion_features=None):
        rows = [self.cache.get(self._key(im, None if lesion_features is None else lesion_features[i])) for i, im in enumerate(images)]
        if not len(images) or any(r is None for r in rows):
            self.misses += 1
            return self.inner.predict(images, lesion_features)
        self.hits += 1
        return np.stack(rows)


class CachingEmbedder(_Delegate):
    """Text embedder whose ``embed`` answers prefetched texts from one batched call."""

    def prefetch(self, texts: Sequence[str]) -> None:
        uniq = list(dict.fromkeys(texts))
        vecs = self.inner.embed(uniq) if uniq else []
        self.cache = {t: vecs[i] for i, t in enumerate(uniq)}

    def embed(self, texts):
        if isinstance(texts, str):
            return self.inner.embed(texts)  # the inner embedder's own error
        texts = list(texts)
        if texts and all(t in self.cache for t in texts):
            self.hits += 1
            return np.stack([self.cache[t] for t in texts])
        self.misses += 1
        return self.inner.embed(texts)


CASE_INDEXES = ("cases", "expert_cases")  # the runtime's case indexes (cached properties), searched by route


class CachingCases(_Delegate):
    """Case retriever whose ``search`` answers prefetched query rows from one matrix search per source set."""

    def prefetch(self, groups: dict[tuple[tuple[str, ...] | None, int], list[np.ndarray]]) -> None:
        self.cache = {}
        for (sources, k), rows in groups.items():
            if not rows:
                continue
            hits = self.inner.search(np.stack(rows), k=k, sources=sources)
            for row, h in zip(rows, hits):
                self.cache[(_row_key(row), k, sources)] = h

    def search(self, features, k=8, *, exclude_ids=None, sources=None):
        q = np.asarray(features, dtype=np.float32)
        q = q[None] if q.ndim == 1 else q
        key_sources = tuple(sources) if sources is not None else None
        keys = [(_row_key(r), k, key_sources) for r in q]
        if exclude_ids is None and all(key in self.cache for key in keys):
            self.hits += 1
            return [self.cache[key] for key in keys]
        self.misses += 1
        return self.inner.search(features, k=k, exclude_ids=exclude_ids, sources=sources)


def _llm_key(kind: str, conversation, *args) -> str:
    return json.dumps([kind, [dict(m) for m in conversation], *args], sort_keys=True, default=str)


class CachingLLM(_Delegate):
    """LLM whose first-round requests are answered from batched calls across the micro-batch's cases.

    :meth:`recording` collects what the reason node asks (candidate scorings; greedy rationales) without running
    the model; :meth:`fill` then runs them as batches (``models.protocols.score_many`` / ``chat_many``). Sampled
    retries and revise rounds miss the cache and run per case. A batch whose prompts the backend had to
    shorten (a trace note) is not cached, so those cases run per case and keep their note."""

    def __init__(self, inner):
        super().__init__(inner)
        self._recording: dict[str, dict[str, Any]] | None = None

    @contextlib.contextmanager
    def recording(self):
        """Within the block calls return placeholders (zeros, empty replies) and are recorded; yields the record."""
        self._recording = rec = {"score": {}, "chat": {}}
        try:
            yield rec
        finally:
            self._recording = None

    def score_continuations(self, conversation, assistant_prefix, continuations):
        key = _llm_key("score", conversation, assistant_prefix, list(continuations))
        if key in self.cache:
            self.hits += self._recording is None
            return self.cache[key].copy()
        if self._recording is not None:
            self._recording["score"][key] = (conversation, assistant_prefix, list(continuations))
            return np.zeros(len(continuations), dtype=np.float64)
        self.misses += 1
        return self.inner.score_continuations(conversation, assistant_prefix, continuations)

    def chat(self, conversations, **kw):
        keys = [_llm_key("chat", conv, sorted(kw.items())) for conv in conversations]
        if keys and all(k in self.cache for k in keys):
            self.hits += self._recording is None
            return [self.cache[k] for k in keys]
        if self._recording is not None:
            if not kw.get("temperature"):  # sampled retries are seeded per case: they stay per case
                for k, conv in zip(keys, conversations):
                    self._recording["chat"][k] = (conv, dict(kw))
            return [""] * len(conversations)
        self.misses += 1
        return self.inner.chat(conversations, **kw)

    def fill(self, kind: str, requests: dict[str, Any], chunk: int | None = None) -> float:
        """Run the recorded ``kind`` ("score" or "chat") requests as batched calls of ``chunk`` requests (None: one
        call) and cache the answers; returns the seconds spent in the LLM."""
        import time

        from models.protocols import chat_many, score_many

        todo = {k: r for k, r in requests.items() if k not in self.cache}
        keys = list(todo)
        step = chunk or max(1, len(keys))
        drain = getattr(self.inner, "drain_notes", None)
        seconds = 0.0
        for c0 in range(0, len(keys), step):
            part = keys[c0 : c0 + step]
            if callable(drain):
                drain()
            t0 = time.perf_counter()
            reqs = [todo[k] for k in part]
            answers = score_many(self.inner, reqs) if kind == "score" else chat_many(self.inner, reqs)
            seconds += time.perf_counter() - t0
            if callable(drain) and drain():
                continue  # a prompt was shortened: the per-case path records that note in the case's trace
            self.cache.update(zip(part, answers))
        return seconds


def llm_first_round(fronts, rt, llm: CachingLLM, chunk: int | None = None) -> dict[str, float]:
    """Fill ``llm`` (installed as ``rt.llm``) with the first round's LLM answers for ``fronts`` (states after the
    front nodes): retrieval runs on them, then the reason node itself runs twice while the LLM records, once to
    learn the candidate scorings (then run in batches), once more, with those scores, to learn the rationale
    requests. Returns the LLM's seconds per kind."""
    from agent.graph import NODES
    from agent.nodes.base import traced

    ready = []
    for s in fronts:
        try:
            upd = traced("retrieve", NODES["retrieve"], rt)(s)
        except Exception:  # the case's own run reports it
            continue
        upd.pop("trace")
        ready.append(s.model_copy(update=upd))
    seconds = {}
    for kind in ("score", "chat"):
        with llm.recording() as rec:
            for s in ready:
                try:
                    NODES["reason"](s, rt)
                except Exception:
                    pass
        seconds[kind] = llm.fill(kind, rec[kind], chunk)
    return seconds


def install_caches(rt) -> dict[str, _Delegate]:
    """Wrap the runtime's batchable backends (idempotent); returns them by name. Builds (lazily loads) them."""
    wrapped: dict[str, _Delegate] = {}
    for name, cls in (("classifier", CachingClassifier), ("second_expert", CachingSecondExpert), ("clinical_probe", CachingProbe), ("modality_probe", CachingProbe)):
        cur = getattr(rt, name)
        if cur is None:  # no second expert (or probe) configured
            continue
        if not isinstance(cur, cls):
            cur = cls(cur)
            rt.__dict__[name] = cur  # replaces the functools.cached_property value
        wrapped[name] = cur
    if uses_llm(rt):
        cur = rt.llm
        if not isinstance(cur, CachingLLM):
            cur = CachingLLM(cur)
            rt.__dict__["llm"] = cur
        wrapped["llm"] = cur
    if rt.config.retrieval.k_knowledge:
        kb = rt.kb
        emb = getattr(kb, "embedder", None)
        if emb is not None:
            if not isinstance(emb, CachingEmbedder):
                emb = CachingEmbedder(emb)
                kb.embedder = emb
            wrapped["text_embedder"] = emb
    return wrapped


def caching_index(rt, index) -> CachingCases:
    """The runtime's case index ``index`` (``rt.cases`` or ``rt.expert_cases``, as :func:`agent.nodes.retrieve.case_index_for`
    chose it for a case) wrapped in :class:`CachingCases`, installed where the runtime keeps it. Indexes are wrapped only
    when a case needs them, so a micro-batch of clinical photos never loads the dermoscopy index."""
    if isinstance(index, CachingCases):
        return index
    for name in CASE_INDEXES:
        if rt.__dict__.get(name) is index:
            rt.__dict__[name] = CachingCases(index)
            return rt.__dict__[name]
    raise ValueError(f"the case index {index!r} is not one of the runtime's ({', '.join(CASE_INDEXES)})")


def uses_llm(rt) -> bool:
    """Whether the reason node calls the LLM under this configuration (a stacker fusing it, or the LLM's summary)."""
    return rt.config.reasoner.llm_summary or fusion_calls_llm(rt.fusion)


def fusion_calls_llm(fusion) -> bool:
    """Whether a fusion artifact (:class:`models.stacker.FusionModel`) fuses the LLM's candidate scores."""
    return any("llm" in mf.experts for mf in fusion.modalities.values())


def uninstall_caches(rt) -> None:
    """Put the wrapped backends back (the runtime then runs exactly as before :func:`install_caches`)."""
    for name in ("classifier", "second_expert", "clinical_probe", "modality_probe", *CASE_INDEXES, "llm"):
        cur = rt.__dict__.get(name)
        if isinstance(cur, _Delegate):
            rt.__dict__[name] = cur.inner
    kb = rt.__dict__.get("kb")
    if kb is not None and isinstance(getattr(kb, "embedder", None), _Delegate):
        kb.embedder = kb.embedder.inner


def _request_key(img, question, metadata) -> str:
    ref = os.fspath(img) if isinstance(img, (str, os.PathLike)) else f"obj:{id(img)}"
    return json.dumps([ref, question, metadata], sort_keys=True, default=str)


class BatchedAgent:
    """``Agent.diagnose`` over a known sequence of requests, prefetching micro-batches of ``batch_size``.

    ``requests``: (image, question, metadata) in the order ``diagnose`` will (mostly) be called. A call
    for a request that was not announced, or whose prefetch failed (an unreadable image), runs exactly
    like ``Agent.diagnose`` and raises the same errors. Other attributes delegate to the agent."""

    def __init__(self, agent, requests: Sequence[tuple[Any, str | None, dict | None]], batch_size: int = 16):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.agent = agent
        self.requests = list(requests)
        self.batch_size = batch_size
        self._pending: dict[str, deque[int]] = defaultdict(deque)
        for i, (img, q, m) in enumerate(self.requests):
            self._pending[_request_key(img, q, m)].append(i)
        self._attempted: set[int] = set()
        self._prepared: dict[int, tuple[Any, str]] = {}
        self._handoff: tuple[Any, str] | None = None
        self.backends: dict[str, _Delegate] = {}
        self.prefetch_seconds = 0.0
        self.stage_seconds: dict[str, float] = defaultdict(float)
        self.prefetch_errors: list[str] = []

    def __getattr__(self, name):
        return getattr(self.agent, name)

    def close(self) -> None:
        """Remove the caching wrappers from the agent's runtime."""
        uninstall_caches(self.agent.runtime)
        self.agent.__dict__.pop("_initial_state", None)
        self.backends, self._prepared = {}, {}

    def prefetch(self, indices: Sequence[int]) -> None:
        """Load, encode and search for the requests at ``indices`` in batches; failures leave them unprepared."""
        import time

        from agent.nodes.encode import probe_wanted
        from agent.nodes.retrieve import _query_text, case_index_for

        t0 = time.perf_counter()
        self._attempted.update(indices)
        rt = self.agent.runtime
        try:
            if not self.backends:
                self.backends = install_caches(rt)
            mark = [time.perf_counter()]

            def lap(stage: str) -> None:
                now = time.perf_counter()
                self.stage_seconds[stage] += now - mark[0]
                mark[0] = now

            states: dict[int, Any] = {}
            for i in indices:
                img, q, m = self.requests[i]
                try:
                    states[i] = type(self.agent)._initial_state(self.agent, img, q, m)
                except Exception:  # the case's own diagnose call reports it, as in the sequential path
                    continue
            if not states:
                return
            images = [s.image for s, _ in states.values()]
            metas = [s.metadata.as_dict() if s.metadata else None for s, _ in states.values()]
            lap("load images")
            self.backends["classifier"].prefetch(images, metas)
            if "second_expert" in self.backends:
                self.backends["second_expert"].prefetch(images)
            if "modality_probe" in self.backends:  # every image: the modality node reads it before the route is known
                self.backends["modality_probe"].prefetch(images)
            if "clinical_probe" in self.backends:  # the images the encode node will run it on, with their cached lesion features
                # (a shared ImageNet encoder reuses the modality probe's pass for these images)
                picked = [(im, self.backends["classifier"].predict([im], [m]).features[0]) for im, m in zip(images, metas) if probe_wanted(rt, im)]
                self.backends["clinical_probe"].prefetch([im for im, _ in picked], [f for _, f in picked])
            lap("encoder forward")
            # The front nodes are cheap heads over the (now cached) features: run them to learn each case's
            # modality and retrieval query. The graph runs them again; only the cached models are shared.
            cfg = rt.config.retrieval
            texts: list[str] = []
            groups: dict[str, dict[tuple, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))  # index id -> (sources, k) -> rows
            indexes: dict[str, CachingCases] = {}
            fronts = []
            for state, _ in states.values():
                s = front_state(state, rt)
                if s.modality.rejected:
                    continue
                fronts.append(s)
                if cfg.k_knowledge:
                    texts.append(_query_text(s))
                route = rt.config.route(s.modality.label)
                if cfg.k_cases and route.case_sources:  # the index and query features the retrieve node will use for this case
                    index, features, index_id = case_index_for(s, rt, route)
                    indexes[index_id] = caching_index(rt, index)
                    groups[index_id][(tuple(route.case_sources), cfg.k_cases)].append(np.asarray(features, np.float32))
            lap("front nodes (heads)")
            if "text_embedder" in self.backends:
                self.backends["text_embedder"].prefetch(texts)
            lap("KB text embedding")
            for index_id, cached in indexes.items():
                cached.prefetch(groups[index_id])
            lap("FAISS case search")
            if "llm" in self.backends:
                self._prefetch_llm(fronts, rt)
                lap("LLM (scoring, summaries)")
            self._prepared.update(states)
        except Exception as exc:  # batching is an optimisation: fall back to the per-case path
            self.prefetch_errors.append(f"{type(exc).__name__}: {exc}"[:500])
        finally:
            self.prefetch_seconds += time.perf_counter() - t0

    def _prefetch_llm(self, fronts, rt) -> None:
        llm = self.backends["llm"]
        llm.cache = {}  # this micro-batch's answers only, as the other wrappers' prefetch
        try:
            llm_first_round(fronts, rt, llm)
        except Exception as exc:  # e.g. a backend that cannot score: the per-case path handles it
            self.prefetch_errors.append(f"LLM: {type(exc).__name__}: {exc}"[:500])

    def _initial_state_hook(self, img, question, metadata):
        handoff, self._handoff = self._handoff, None
        return handoff if handoff is not None else type(self.agent)._initial_state(self.agent, img, question, metadata)

    def _window(self, i: int) -> list[int]:
        return [j for j in range(i, len(self.requests)) if j not in self._attempted][: self.batch_size]

    def prefetch_for(self, img, question: str | None = None, metadata: dict | None = None, timeout: float | None = None) -> None:
        """The prefetch the next ``diagnose`` of this request would start, run now, bounded by ``timeout`` seconds per
        case of its micro-batch (None: unbounded). One that runs past it is abandoned (a ``prefetch_errors`` entry):
        its cases run the per-case path."""
        from agent.batch import CaseTimeout, deadline

        queue = self._pending.get(_request_key(img, question, metadata))
        if not queue or queue[0] in self._attempted:
            return
        window = self._window(queue[0])
        try:
            with deadline(timeout * len(window) if timeout else None):
                self.prefetch(window)
        except CaseTimeout:
            self.prefetch_errors.append(f"prefetch of {len(window)} case(s) ran past {timeout:g} s per case; they run one at a time")

    def diagnose(self, img, question: str | None = None, metadata: dict | None = None, **kw):
        """``Agent.diagnose`` itself (same arguments, errors and result); a prefetched case skips re-loading its image."""
        key = _request_key(img, question, metadata)
        queue = self._pending.get(key)
        if not queue:
            return self.agent.diagnose(img, question=question, metadata=metadata, **kw)
        i = queue.popleft()
        if i not in self._attempted:
            self.prefetch(self._window(i))
        self._handoff = self._prepared.pop(i, None)
        if self._handoff is not None and self.agent.__dict__.get("_initial_state") is None:
            self.agent._initial_state = self._initial_state_hook  # the prepared state enters Agent.diagnose here
        try:
            return self.agent.diagnose(img, question=question, metadata=metadata, **kw)
        finally:
            self._handoff = None


def default_batch_size(device: str, calls_llm: bool = False) -> int:
    """Micro-batch size used when none is given: 16, except 1 (the plain per-case path) on a CPU under a configuration
    that calls the LLM. ``dermgraph bench`` on 2 CPU cores (README, Performance): with the image networks taking forward
    batches of 4 the micro-batched path outruns the per-case one (48 mixed photos: 4.04 -> 5.38 cases/s, decisions
    identical), while batched LLM calls were slower than per-case ones there (0.172 -> 0.148 cases/s)."""
    if str(device).startswith("cuda"):
        return 16
    return 1 if calls_llm else 16


def calls_llm(agent, config) -> bool:
    """Whether ``agent`` (or, before one is loaded, e.g. in eval workers: None) calls the LLM under ``config``: its
    runtime's :func:`uses_llm`, else :func:`config_calls_llm`."""
    runtime = getattr(agent, "runtime", None)
    return uses_llm(runtime) if runtime is not None else config_calls_llm(config)


def config_calls_llm(config) -> bool:
    """:func:`uses_llm` for a configuration without a runtime (e.g. before worker processes load one): reads the fusion
    artifact the configuration names."""
    if config.reasoner.llm_summary:
        return True
    from models.resolve import resolve_artifact
    from models.stacker import FusionModel

    return fusion_calls_llm(FusionModel.load(resolve_artifact(config.reasoner.fusion)))


WARMUP_IMAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "lesion.jpg")
"""The image :func:`warm_up` diagnoses (the bundled example; a plain synthetic image where it is not installed)."""


def warm_up(agent) -> None:
    """Load the models a case needs by running the graph on :data:`WARMUP_IMAGE` once (``Agent.run``: nothing is
    persisted; result and errors discarded, the cases report their own), so that no case's ``--case-timeout`` pays
    for loading."""
    image: Any = WARMUP_IMAGE
    if not os.path.isfile(image):
        from PIL import Image

        image = Image.new("RGB", (224, 224), (186, 120, 100))
    with contextlib.suppress(Exception):
        agent.run(image)


def batched_case_diagnose(agent, cases: Sequence[Any], batch_size: int | None = None):
    """A ``diagnose(case) -> record dict`` for :func:`agent.batch.run_batch` that prefetches micro-batches
    (``batch_size`` 1: the plain ``Agent.diagnose`` per case; None: :func:`default_batch_size`). Its ``plan(todo)``
    (called by ``run_batch`` with the cases still to do, e.g. on ``--resume``) announces only those, so micro-batches
    never encode cases that already have records.

    Its hooks define what ``--case-timeout`` (T) covers: ``warmup()`` (:func:`warm_up`; ``run_batch`` calls it when
    there is a T) loads the models before the first case, untimed; ``prepare(case, T)`` runs the micro-batch prefetch
    a case starts (k cases: encoder forward, front nodes, text embedding, case search, batched LLM calls) under a
    budget of k x T, outside the case's own deadline; past it the prefetch is abandoned and its cases run one at a
    time. T then bounds each case's own ``Agent.diagnose`` (reading its image, its graph run), answered from the
    prefetched caches where the prefetch succeeded."""
    batch_size = default_batch_size(agent.config.device, calls_llm(agent, agent.config)) if batch_size is None else batch_size
    if batch_size <= 1:

        def plain(case) -> dict[str, Any]:
            return json.loads(agent.diagnose(case.image, question=case.question, metadata=case.metadata or None).model_dump_json())

        plain.warmup = lambda: warm_up(agent)  # type: ignore[attr-defined]
        return plain

    def plan(todo: Sequence[Any]) -> None:
        if getattr(run, "batched_agent", None) is not None:
            run.batched_agent.close()
        usable = [c for c in todo if getattr(c, "image", None) is not None and not getattr(c, "error", None)]
        run.batched_agent = BatchedAgent(agent, [(c.image, c.question, c.metadata or None) for c in usable], batch_size)

    def run(case) -> dict[str, Any]:
        d = run.batched_agent.diagnose(case.image, question=case.question, metadata=case.metadata or None)
        return json.loads(d.model_dump_json())

    def prepare(case, timeout: float | None = None) -> None:
        run.batched_agent.prefetch_for(case.image, case.question, case.metadata or None, timeout)

    run.plan = plan  # type: ignore[attr-defined]
    run.prepare = prepare  # type: ignore[attr-defined]
    run.warmup = lambda: warm_up(agent)  # type: ignore[attr-defined]
    plan(cases)
    return run
