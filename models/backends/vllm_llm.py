"""LLM backend on vLLM's offline engine (GPU). Needs the optional extra: ``pip install 'dermgraph[vllm]'``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from models.backends import require
from models.backends.hf_llm import chat_in_groups, continuation_start, locate_causal_lm, model_id_for, render_prompt, trim_at_stop
from models.protocols import Message


class VLLMLLM:
    """A causal LLM served in-process by ``vllm.LLM`` (implements :class:`models.protocols.LLM`).

    ``model`` is anything :class:`~models.backends.hf_llm.TransformersLLM` accepts (GGUF files are
    converted once to safetensors); ``engine_kwargs`` go to ``vllm.LLM`` (e.g. ``dtype``,
    ``gpu_memory_utilization``, ``max_model_len``). The engine starts on first use.
    """

    def __init__(
        self, model: str = "smollm2-135m-instruct", gguf_file: str | None = None, **engine_kwargs: Any
    ) -> None:
        # Fail at construction, not mid-pipeline, when the extra is missing.
        self._vllm = require("vllm", "vllm", "the vLLM backend")
        self.model_ref = model
        self.gguf_file = gguf_file
        self.engine_kwargs = engine_kwargs
        self.model_id = model_id_for(model, gguf_file)
        self._engine: Any = None
        self._tokenizer: Any = None

    def _load(self) -> None:
        if self._engine is not None:
            return
        where = locate_causal_lm(self.model_ref, self.gguf_file)
        self._engine = self._vllm.LLM(model=where, **self.engine_kwargs)
        self._tokenizer = self._engine.get_tokenizer()

    @property
    def tokenizer(self) -> Any:
        """The engine's (HF) tokenizer; starts the engine on first access."""
        self._load()
        return self._tokenizer

    def _prompt_ids(self, text: str) -> dict[str, list[int]]:
        # Token ids, not text: vLLM would add a second BOS to a template that already has one.
        return {"prompt_token_ids": list(self._tokenizer(text, add_special_tokens=False)["input_ids"])}

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
        """Batched chat completion through the engine's continuous batching."""
        return self._chat([(conv, assistant_prefix) for conv in conversations], max_new_tokens, temperature, seed, stop)

    def chat_batch(self, requests: Sequence[tuple[Sequence[Message], dict[str, Any]]]) -> list[str]:
        """:meth:`chat` for requests with their own arguments (``models.protocols.chat_many``); requests that
        differ only in ``assistant_prefix`` go to the engine together."""
        return chat_in_groups(self._chat, requests)

    def _chat(self, pairs: Sequence[tuple[Sequence[Message], str]], max_new_tokens: int = 256, temperature: float = 0.0,
              seed: int | None = None, stop: Sequence[str] | None = None) -> list[str]:  # fmt: skip
        self._load()
        stops = [s for s in stop or () if s]
        params = self._vllm.SamplingParams(
            n=1,
            temperature=float(temperature),
            seed=seed if temperature > 0 else None,
            max_tokens=max_new_tokens,
            stop=stops or None,
        )
        prompts = [self._prompt_ids(render_prompt(self._tokenizer, conv, prefix)) for conv, prefix in pairs]
        outputs = self._engine.generate(prompts, params, use_tqdm=False)
        return [trim_at_stop(out.outputs[0].text, stops) for out in outputs]

    def score_continuations(
        self, conversation: Sequence[Message], assistant_prefix: str, continuations: Sequence[str]
    ) -> np.ndarray:
        """Sum of log-probs of each continuation's tokens, from vLLM's ``prompt_logprobs``."""
        return self.score_continuations_batch([(conversation, assistant_prefix, continuations)])[0]

    def score_continuations_batch(self, requests: Sequence[tuple[Sequence[Message], str, Sequence[str]]]) -> list[np.ndarray]:
        """:meth:`score_continuations` for several prompts in one engine call (``models.protocols.score_many``)."""
        self._load()
        per_request = []
        for conversation, assistant_prefix, continuations in requests:
            prompt = render_prompt(self._tokenizer, conversation, assistant_prefix)
            per_request.append([continuation_start(self._tokenizer, prompt, prompt + c) for c in continuations])
        flat = [seq for seqs in per_request for seq in seqs]
        scores = self._score(flat) if flat else np.zeros(0, dtype=np.float64)
        bounds = np.cumsum([0] + [len(seqs) for seqs in per_request])
        return [scores[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def _score(self, seqs: list[tuple[list[int], int]]) -> np.ndarray:
        params = self._vllm.SamplingParams(n=1, temperature=0.0, max_tokens=1, prompt_logprobs=1)
        outputs = self._engine.generate([{"prompt_token_ids": ids} for ids, _ in seqs], params, use_tqdm=False)
        scores = np.zeros(len(seqs), dtype=np.float64)
        for i, ((ids, start), out) in enumerate(zip(seqs, outputs, strict=True)):
            plp = out.prompt_logprobs or []
            for j in range(max(start, 1), len(ids)):
                entry = plp[j] if j < len(plp) else None
                if not entry or ids[j] not in entry:
                    raise RuntimeError(f"vLLM returned no prompt log-prob for token {j} of continuation {i}")
                lp = entry[ids[j]]
                scores[i] += float(getattr(lp, "logprob", lp))
        return scores
