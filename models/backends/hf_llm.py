"""Local causal LLMs through ``transformers``: registry ids, HF directories, GGUF files or hub ids.

GGUF files are dequantised once into a safetensors HF directory in the cache
(:func:`models.resolve.ensure_derived`); every later load reads safetensors only.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.protocols import Message

_FINGERPRINT_BYTES = 4 << 20


# --------------------------------------------------------------------------- locating weights


def hub_snapshot(repo_id: str) -> Path:
    """Local snapshot of a hub repo via the resolver (``hf:`` source), whose error says how to get it offline."""
    from models.registry import load_registry
    from models.resolve import ResolveError, resolve

    try:
        return resolve(f"hf:{repo_id}")
    except ResolveError as exc:
        if "/" in repo_id:
            raise
        # "org/name" is the usual hub id; a bare name is more likely a mistyped registry id.
        raise ResolveError(
            f"{exc}\n{repo_id!r} is not a registered model id either; valid ids: {sorted(load_registry())}"
        ) from exc


def hub_file(repo_id: str, filename: str) -> Path:
    """One file of a hub repo (GGUF repos hold many large quantisations; never fetch them all)."""
    from huggingface_hub import hf_hub_download

    from models.resolve import ResolveError, hub_reachable

    with contextlib.suppress(Exception):  # not in the local HF cache: fetch below
        return Path(hf_hub_download(repo_id, filename, local_files_only=True))
    why = "the Hugging Face Hub is unreachable and it is not in the local HF cache"
    if hub_reachable(repo_id):
        try:
            return Path(hf_hub_download(repo_id, filename, etag_timeout=10))
        except Exception as exc:  # noqa: BLE001
            why = f"{type(exc).__name__}: {exc}"
    raise ResolveError(
        f"cannot fetch {filename} from hf:{repo_id}: {why}. Download it on a machine with Hugging Face access "
        f"(`hf download {repo_id} {filename} --local-dir <dir>`), copy it here and pass the local .gguf path."
    )


def is_registry_ref(ref: str) -> bool:
    """Whether ``ref`` is a registered model id or a source URI (``pypi:``, ``hf:``, ...)."""
    from models.registry import SCHEMES, load_registry

    scheme, sep, rest = ref.partition(":")
    if sep and scheme in SCHEMES and rest:
        return True
    return ref in load_registry()


def _fingerprint(path: Path) -> str:
    # Head + tail + size identify a GGUF cheaply; hashing multi-GB files on every load would not.
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(_FINGERPRINT_BYTES))
        if size > 2 * _FINGERPRINT_BYTES:
            f.seek(size - _FINGERPRINT_BYTES)
            h.update(f.read())
    return h.hexdigest()[:16]


def gguf_to_hf_dir(gguf: Path) -> Path:
    """Dequantise ``gguf`` once into a cached safetensors HF directory (model + tokenizer) and return it."""
    from models.resolve import ensure_derived

    gguf = Path(gguf).resolve()
    key = f"gguf-hf/{gguf.stem}-{_fingerprint(gguf)}"

    def build(out: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs: dict[str, Any] = {}
        try:
            from transformers.utils.quantization_config import GgufConfig
        except ImportError:  # transformers < 5 always dequantises GGUF
            pass
        else:
            # transformers 5 keeps GGUF blocks packed (unsaveable) when a kernel is installed.
            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **kwargs)
        if getattr(model, "hf_quantizer", None) is not None:
            raise RuntimeError(f"transformers kept {gguf.name} quantised; cannot save it as safetensors")
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return ensure_derived(key, build, source=gguf)  # the marker records the GGUF's sha256 and every output file's


def locate_causal_lm(model: str, gguf_file: str | None = None) -> str:
    """A local HF directory for ``model``: a registry id/URI, an HF dir, a .gguf file or a hub id."""
    path = Path(model).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ValueError(f"{path} is a file but not a .gguf; pass an HF model directory or a GGUF file")
            return str(gguf_to_hf_dir(path))
        if gguf_file:
            return str(gguf_to_hf_dir(path / gguf_file))
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return str(gguf_to_hf_dir(ggufs[0]))
            raise ValueError(f"{path} has no config.json; pass gguf_file= to pick one of {[g.name for g in ggufs]}")
        return str(path)
    if is_registry_ref(model):
        from models.resolve import resolve

        return locate_causal_lm(str(resolve(model)), gguf_file)
    if gguf_file:
        return str(gguf_to_hf_dir(hub_file(model, gguf_file)))
    return locate_causal_lm(str(hub_snapshot(model)))


def model_id_for(model: str, gguf_file: str | None = None) -> str:
    """A short, stable name for ``model``: the registry id or hub id as given, else the file/dir name."""
    path = Path(model).expanduser()
    if path.exists() or path.is_absolute() or model.startswith((".", "~")):
        if gguf_file:
            return Path(gguf_file).stem
        return path.stem if path.suffix.lower() == ".gguf" else path.name
    return model


def dtype_kwargs(dtype: str) -> dict[str, Any]:
    """``from_pretrained`` kwargs for a dtype name, for both old (torch_dtype) and new (dtype) transformers."""
    import torch
    import transformers

    value = dtype if dtype == "auto" else getattr(torch, dtype)
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": value} if (major, minor) >= (4, 56) else {"torch_dtype": value}


def locate_adapter(adapter: str) -> Path:
    """A local PEFT adapter directory for ``adapter``: a directory path or a registry id/URI."""
    path = Path(adapter).expanduser()
    if not path.exists() and is_registry_ref(adapter):
        from models.resolve import resolve

        path = resolve(adapter)
    if not (path / "adapter_config.json").is_file():
        raise ValueError(f"{adapter!r} is not a PEFT adapter directory (no adapter_config.json at {path})")
    return path


def merge_adapter(model: Any, adapter: str) -> Any:
    """``model`` with the PEFT (LoRA) ``adapter`` merged into its weights: inference runs at base-model speed."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(locate_adapter(adapter))).merge_and_unload()


# --------------------------------------------------------------------------- prompts and spans


def render_prompt(tokenizer: Any, conversation: Sequence[Message], assistant_prefix: str = "") -> str:
    """The chat-templated prompt (with the generation prompt) followed by ``assistant_prefix``."""
    messages = [dict(m) for m in conversation]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        # Base models without a template: a plain transcript still gives usable completions.
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return text + assistant_prefix


def continuation_start(tokenizer: Any, prompt: str, full: str) -> tuple[list[int], int]:
    """Token ids of ``full`` (= prompt + continuation) and the index of the first continuation token.

    A token that straddles the boundary (a BPE merge across it) counts as a continuation token.
    """
    try:
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        enc = None
    if enc is not None and "offset_mapping" in enc:
        ids = list(enc["input_ids"])
        ends = [end for _, end in enc["offset_mapping"]]
        start = next((i for i, end in enumerate(ends) if end > len(prompt)), len(ids))
        return ids, start
    # Slow tokenizers have no offsets: the continuation starts where the token ids diverge.
    ids = list(tokenizer(full, add_special_tokens=False)["input_ids"])
    head = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    start = 0
    while start < min(len(ids), len(head)) and ids[start] == head[start]:
        start += 1
    return ids, start


def chat_in_groups(chat: Any, requests: Sequence[tuple[Sequence[Message], dict[str, Any]]]) -> list[str]:
    """``chat_batch`` for a backend whose ``chat(pairs, **kwargs)`` takes (conversation, assistant prefix) pairs:
    requests that differ only in ``assistant_prefix`` go to one call; one reply per request, in order."""
    groups: dict[str, list[int]] = {}
    for i, (_, kw) in enumerate(requests):
        groups.setdefault(repr(sorted((k, v) for k, v in kw.items() if k != "assistant_prefix")), []).append(i)
    out: list[str] = [""] * len(requests)
    for idx in groups.values():
        kw = {k: v for k, v in requests[idx[0]][1].items() if k != "assistant_prefix"}
        pairs = [(requests[i][0], requests[i][1].get("assistant_prefix", "")) for i in idx]
        for i, text in zip(idx, chat(pairs, **kw), strict=True):
            out[i] = text
    return out


def trim_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """Cut ``text`` at the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop or ():
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut]


# --------------------------------------------------------------------------- backend


class TransformersLLM:
    """A causal LLM run locally with ``transformers`` (implements :class:`models.protocols.LLM`)."""

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        device: str = "cpu",
        dtype: str = "float32",
        max_batch_size: int = 8,
        gguf_file: str | None = None,
        adapter: str | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.model_ref = model
        self.gguf_file = gguf_file
        self.adapter = adapter
        self.device = device
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.model_id = model_id_for(model, gguf_file)
        if adapter:
            # The adapter is part of the model's identity: traces and caches must tell them apart.
            self.model_id += "+" + model_id_for(adapter)
        self._model: Any = None
        self._tokenizer: Any = None
        # KV cache of the last scored prompt prefix: an agent scores candidates, then writes a
        # rationale after the same prompt, so the second prefill can be skipped.
        self._prefix: tuple[list[int], Any] | None = None
        self._notes: list[str] = []

    def drain_notes(self) -> list[str]:
        """Notes about the calls since the last drain (e.g. a prompt cut to the context); the caller traces them."""
        notes, self._notes = self._notes, []
        return notes

    def _fit(self, conversation: Sequence[Message], assistant_prefix: str, reserve: int) -> list[Message]:
        """``conversation`` with its longest message cut in the middle until the rendered prompt plus ``reserve``
        tokens fits the model's context (a note records it); unchanged when it already fits."""
        limit = getattr(self._model.config, "max_position_embeddings", None)
        conv = [dict(m) for m in conversation]
        if not limit:
            return conv
        budget = max(64, int(limit) - reserve)
        tok = self._tokenizer
        n0 = n = len(tok(render_prompt(tok, conv, assistant_prefix), add_special_tokens=False)["input_ids"])
        for _ in range(4):
            if n <= budget:
                break
            i = max(range(len(conv)), key=lambda j: len(conv[j].get("content") or ""))
            ids = tok(conv[i]["content"], add_special_tokens=False)["input_ids"]
            keep = max(16, len(ids) - (n - budget) - 32)
            head, tail = keep * 2 // 3, keep - keep * 2 // 3
            conv[i]["content"] = tok.decode(ids[:head]) + " [... truncated ...] " + tok.decode(ids[len(ids) - tail :])
            n = len(tok(render_prompt(tok, conv, assistant_prefix), add_special_tokens=False)["input_ids"])
        if n != n0:
            self._notes.append(f"prompt truncated to the LLM's context: {n0} -> {n} tokens (context {limit}, {reserve} reserved)")
        return conv

    # -- loading

    def _load(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModelForCausalLM, AutoTokenizer

        where = locate_causal_lm(self.model_ref, self.gguf_file)
        tokenizer = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where, **dtype_kwargs(self.dtype))
        if self.adapter:
            model = merge_adapter(model, self.adapter)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self._tokenizer = tokenizer
        self._model = model.to(self.device).eval()

    @property
    def tokenizer(self) -> Any:
        """The tokenizer (loads the model on first access)."""
        self._load()
        return self._tokenizer

    @property
    def model(self) -> Any:
        """The underlying ``PreTrainedModel`` (loaded on first access)."""
        self._load()
        return self._model

    # -- generation

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
        """Batched chat completion; returns the text after ``assistant_prefix``, cut at ``stop``."""
        return self._chat([(conv, assistant_prefix) for conv in conversations], max_new_tokens, temperature, seed, stop)

    def chat_batch(self, requests: Sequence[tuple[Sequence[Message], dict[str, Any]]]) -> list[str]:
        """:meth:`chat` for requests with their own arguments (``models.protocols.chat_many``): those that differ
        only in ``assistant_prefix`` are generated as one batch."""
        return chat_in_groups(self._chat, requests)

    def _chat(self, pairs: Sequence[tuple[Sequence[Message], str]], max_new_tokens: int = 256, temperature: float = 0.0,
              seed: int | None = None, stop: Sequence[str] | None = None) -> list[str]:  # fmt: skip
        import torch

        self._load()
        tok, model = self._tokenizer, self._model
        prompts = [render_prompt(tok, self._fit(conv, prefix, max_new_tokens), prefix) for conv, prefix in pairs]
        gen_kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id}
        if temperature > 0:
            gen_kwargs.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        else:
            gen_kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        stops = [s for s in stop or () if s]
        if stops:
            gen_kwargs.update(stop_strings=stops, tokenizer=tok)

        if len(prompts) == 1 and self._prefix is not None:
            reused = self._generate_from_prefix(prompts[0], gen_kwargs, stops, seed if temperature > 0 else None)
            if reused is not None:
                return [reused]
        out: list[str] = [""] * len(prompts)
        # Similar lengths together waste less compute on padding.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        with torch.inference_mode(), seeded(seed if temperature > 0 else None, self.device):
            for chunk_start in range(0, len(order), self.max_batch_size):
                idx = order[chunk_start : chunk_start + self.max_batch_size]
                enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
                enc = {k: v.to(model.device) for k, v in enc.items()}
                generated = model.generate(**enc, **gen_kwargs)
                width = enc["input_ids"].shape[1]
                for row, i in enumerate(idx):
                    prompt_ids = enc["input_ids"][row][enc["attention_mask"][row].bool()].tolist()
                    new_ids = generated[row, width:].tolist()
                    out[i] = trim_at_stop(self._decode_new(prompt_ids, new_ids), stops)
        return out

    def _generate_from_prefix(self, prompt: str, gen_kwargs: dict[str, Any], stops: list[str], seed: int | None) -> str | None:
        """Generate for one prompt starting from the cached KV of its longest shared token prefix.

        Returns None when too little of the prompt is shared to be worth it. Greedy outputs are the
        same as without the cache (tested)."""
        import copy

        import torch

        ids = self._tokenizer(prompt, add_special_tokens=False)["input_ids"]
        cached_ids, cache = self._prefix
        n = 0
        limit = min(len(ids) - 1, len(cached_ids))  # keep >= 1 new token for generate to process
        while n < limit and ids[n] == cached_ids[n]:
            n += 1
        if n < 32:
            return None
        past = copy.deepcopy(cache)
        if n < len(cached_ids):
            past.crop(n - len(cached_ids))  # negative: drop that many trailing positions
        dev = self._model.device
        input_ids = torch.tensor([ids], device=dev)
        with torch.inference_mode(), seeded(seed, self.device):
            generated = self._model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **{cache_arg(self._model): past}, **gen_kwargs
            )
        return trim_at_stop(self._decode_new(ids, generated[0, len(ids) :].tolist()), stops)

    def _decode_new(self, prompt_ids: list[int], new_ids: list[int]) -> str:
        # Decoding prompt+new and removing the prompt keeps SentencePiece's leading spaces intact.
        tok = self._tokenizer
        head = tok.decode(prompt_ids, skip_special_tokens=True)
        full = tok.decode(prompt_ids + new_ids, skip_special_tokens=True)
        return full[len(head) :] if full.startswith(head) else tok.decode(new_ids, skip_special_tokens=True)

    # -- scoring

    def score_continuations(
        self, conversation: Sequence[Message], assistant_prefix: str, continuations: Sequence[str]
    ) -> np.ndarray:
        """Sum of log-probs of each continuation's tokens after the chat prompt + ``assistant_prefix``.

        The longest token prefix shared by all candidates is run once and its KV cache reused.
        """
        import torch

        self._load()
        seqs = self._sequences(conversation, assistant_prefix, continuations)
        if not seqs:
            return np.zeros(0, dtype=np.float64)
        with torch.inference_mode():
            if _supports_shared_prefix(self._model):
                return self._score_prompts([seqs], keep_prefix=True)[0]
            return self._score_full(seqs)

    def score_continuations_batch(self, requests: Sequence[tuple[Sequence[Message], str, Sequence[str]]]) -> list[np.ndarray]:
        """:meth:`score_continuations` for several prompts at once (``models.protocols.score_many``): up to
        ``max_batch_size`` prompts' shared prefixes in one left-padded forward pass, then all their candidates'
        suffixes in batches on rows of that KV cache. Equal to one call per request up to float rounding."""
        import torch

        self._load()
        items = [self._sequences(*req) for req in requests]
        out = [np.zeros(len(seqs), dtype=np.float64) for seqs in items]
        todo = [i for i, seqs in enumerate(items) if seqs]
        with torch.inference_mode():
            if not _supports_shared_prefix(self._model):
                for i in todo:
                    out[i] = self._score_full(items[i])
                return out
            for c0 in range(0, len(todo), self.max_batch_size):
                chunk = todo[c0 : c0 + self.max_batch_size]
                for i, scores in zip(chunk, self._score_prompts([items[i] for i in chunk]), strict=True):
                    out[i] = scores
        return out

    def _sequences(self, conversation: Sequence[Message], assistant_prefix: str, continuations: Sequence[str]) -> list[tuple[list[int], int]]:
        """(token ids of prompt + continuation, index of its first continuation token) per continuation."""
        reserve = 8 + max((len(self._tokenizer(c, add_special_tokens=False)["input_ids"]) for c in continuations), default=0)
        prompt = render_prompt(self._tokenizer, self._fit(conversation, assistant_prefix, reserve), assistant_prefix)
        return [continuation_start(self._tokenizer, prompt, prompt + c) for c in continuations]

    def _score_full(self, seqs: list[tuple[list[int], int]]) -> np.ndarray:
        """Score each (ids, start) by a full forward pass, in batches (right padding)."""
        import torch

        model, pad = self._model, self._tokenizer.pad_token_id
        scores = np.zeros(len(seqs), dtype=np.float64)
        for c0 in range(0, len(seqs), self.max_batch_size):
            chunk = seqs[c0 : c0 + self.max_batch_size]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, (ids, _) in enumerate(chunk):
                input_ids[r, : len(ids)] = torch.tensor(ids)
                mask[r, : len(ids)] = 1
            logits = model(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device)).logits
            for r, (ids, start) in enumerate(chunk):
                # Only the rows predicting continuation tokens: a full-vocab softmax per position is large.
                first = max(start, 1)
                rows = torch.log_softmax(logits[r, first - 1 : len(ids) - 1].float(), dim=-1)
                scores[c0 + r] = _span_logprob(rows, ids, start, first=first)
        return scores

    def _score_prompts(self, group: list[list[tuple[list[int], int]]], keep_prefix: bool = False) -> list[np.ndarray]:
        """Scores for several prompts' sequences: the prompts' common prefixes in one left-padded pass, then the
        suffixes (every candidate of every prompt, ``max_batch_size`` rows at a time) on copies of rows of its cache.
        ``keep_prefix`` (one prompt): keep the prefix's KV cache for a rationale generated after the same prompt."""
        import copy

        import torch

        model, pad = self._model, self._tokenizer.pad_token_id
        commons = [common_prefix(seqs) for seqs in group]
        out = [np.zeros(len(seqs), dtype=np.float64) for seqs in group]
        keep = [b for b, n in enumerate(commons) if n >= 1]
        for b in set(range(len(group))) - set(keep):
            out[b] = self._score_full(group[b])
        if not keep:
            return out
        dev = model.device
        width = max(commons[b] for b in keep)
        input_ids = torch.full((len(keep), width), pad, dtype=torch.long)
        mask = torch.zeros((len(keep), width), dtype=torch.long)
        for r, b in enumerate(keep):
            n = commons[b]
            input_ids[r, width - n :] = torch.tensor(group[b][0][0][:n], dtype=torch.long)
            mask[r, width - n :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        res = model(input_ids=input_ids.to(dev), attention_mask=mask.to(dev), position_ids=positions.to(dev), use_cache=True,
                    **last_logits_only(model))  # fmt: skip
        cache = cache_of(res)
        if not hasattr(cache, "batch_select_indices"):  # a cache layout whose rows cannot be selected: full passes
            for b in keep:
                out[b] = self._score_full(group[b])
            return out
        if keep_prefix and len(group) == 1 and hasattr(cache, "crop"):
            self._prefix = (group[0][0][0][:width], copy.deepcopy(cache))  # one prompt: no padding, positions exact
        last_logprobs = torch.log_softmax(res.logits[:, -1].float(), dim=-1)  # left padding: every row ends at its prompt's end
        rows = [(r, b, ids, start) for r, b in enumerate(keep) for ids, start in group[b]]
        done = {b: [] for b in keep}
        for c0 in range(0, len(rows), self.max_batch_size):
            part = rows[c0 : c0 + self.max_batch_size]
            suffix_width = max(len(ids) - commons[b] for _, b, ids, _ in part)
            scores = [0.0] * len(part)
            if suffix_width > 0:
                sel = torch.tensor([r for r, *_ in part], dtype=torch.long)
                part_cache = copy.deepcopy(cache)
                part_cache.batch_select_indices(sel.to(dev))
                suffix = torch.full((len(part), suffix_width), pad, dtype=torch.long)
                full_mask = torch.zeros((len(part), width + suffix_width), dtype=torch.long)
                full_mask[:, :width] = mask[sel]
                pos = torch.zeros((len(part), suffix_width), dtype=torch.long)
                for j, (_, b, ids, _) in enumerate(part):
                    tail = ids[commons[b] :]
                    suffix[j, : len(tail)] = torch.tensor(tail, dtype=torch.long)
                    full_mask[j, width : width + len(tail)] = 1
                    pos[j] = torch.arange(commons[b], commons[b] + suffix_width)
                logits = model(input_ids=suffix.to(dev), attention_mask=full_mask.to(dev), position_ids=pos.to(dev),
                               **{cache_arg(model): part_cache}, use_cache=True).logits  # fmt: skip
                logprobs = torch.log_softmax(logits.float(), dim=-1)
                for j, (r, b, ids, start) in enumerate(part):
                    # Row k of `full` predicts token commons[b] + k; row 0 comes from the prefix pass.
                    full = torch.cat([last_logprobs[r : r + 1], logprobs[j, :-1]], dim=0)
                    scores[j] = _span_logprob(full, ids, start, first=commons[b])
            for (_, b, _, _), sc in zip(part, scores, strict=True):
                done[b].append(sc)
        for b in keep:
            out[b] = np.array(done[b], dtype=np.float64)
        return out


def common_prefix(seqs: list[tuple[list[int], int]]) -> int:
    """Length of the token prefix all ``seqs`` share, at most the first continuation token's index."""
    first = seqs[0][0]
    common = min(min(start for _, start in seqs), *(len(ids) for ids, _ in seqs))
    for ids, _ in seqs[1:]:
        while common and ids[:common] != first[:common]:
            common -= 1
    return common


def _span_logprob(logprobs: Any, ids: list[int], start: int, first: int) -> float:
    """Sum of log p(ids[j]) for j in [start, len(ids)), where ``logprobs[k]`` predicts token ``first + k``."""
    total = 0.0
    for j in range(max(start, first), len(ids)):
        total += float(logprobs[j - first, ids[j]])
    return total


def cache_arg(model: Any) -> str:
    """The keyword a model's forward (and generate) takes its KV cache by: ``cache`` in recent transformers 5
    releases, which deprecate ``past_key_values`` (removed in 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def last_logits_only(model: Any) -> dict[str, int]:
    """Forward kwargs computing logits for the last position only (a prompt prefix's other positions predict
    nothing we score: their vocabulary projection would cost ~10 % of the pass and prompt x vocabulary floats)."""
    params = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: 1}
    return {}


def cache_of(output: Any) -> Any:
    """The KV cache of a forward pass's output, whichever name this transformers release gives it."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _supports_shared_prefix(model: Any) -> bool:
    # Sliding-window / hybrid caches have their own layouts; score those with full passes.
    cfg = getattr(model, "config", None)
    return (
        getattr(cfg, "sliding_window", None) is None and "position_ids" in inspect.signature(model.forward).parameters
    )


@contextlib.contextmanager
def seeded(seed: int | None, device: str):
    """Seed torch inside the block without disturbing the caller's global RNG state."""
    if seed is None:
        yield
        return
    import torch

    devices = [torch.device(device).index or 0] if str(device).startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
