"""LLM and VLM backends for OpenAI-compatible HTTP servers (vLLM, llama.cpp, TGI, OpenAI itself).

Assistant prefixes and scoring use vLLM's extensions (``continue_final_message``, ``/tokenize``,
``/detokenize``, ``echo`` with ``logprobs``); servers without them still chat.
"""

from __future__ import annotations

import base64
import io
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from models.protocols import Message

_RETRYABLE_STATUS = frozenset({500, 502, 503, 504})
_BODY_EXCERPT = 500


class OpenAIServerError(RuntimeError):
    """The server answered with an error status, or could not be reached."""

    def __init__(self, message: str, status_code: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = body


def _trim_at_stop(text: str, stop: Sequence[str] | None) -> str:
    cut = len(text)
    for s in stop or ():
        if s and 0 <= (i := text.find(s)) < cut:
            cut = i
    return text[:cut]


class _Client:
    """A small JSON-over-HTTP client with bounded retries on connection errors and 5xx."""

    max_retries = 2
    backoff_s = 0.5

    def __init__(self, base_url: str, api_key: str | None, timeout: float) -> None:
        import httpx

        self.base_url = base_url.rstrip("/")
        # vLLM serves /tokenize and /detokenize beside /v1, not under it.
        self.root_url = self.base_url.removesuffix("/v1")
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(timeout=timeout, headers=headers)

    def post(self, path: str, body: dict, *, root: bool = False) -> dict:
        """POST ``body`` as JSON and return the decoded JSON answer; raise OpenAIServerError on failure."""
        import httpx

        url = (self.root_url if root else self.base_url) + path
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                resp = self._http.post(url, json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError) as exc:
                # Read timeouts are not retried: the server may still be generating, and a retry triples the wait.
                if last:
                    raise OpenAIServerError(
                        f"POST {url}: cannot reach the server ({type(exc).__name__}: {exc})"
                    ) from exc
            else:
                if resp.status_code < 400:
                    try:
                        return resp.json()
                    except ValueError as exc:
                        raise OpenAIServerError(
                            f"POST {url}: answer is not JSON: {resp.text[:_BODY_EXCERPT]!r}",
                            resp.status_code,
                            resp.text,
                        ) from exc
                if resp.status_code not in _RETRYABLE_STATUS or last:
                    raise OpenAIServerError(
                        f"POST {url} -> HTTP {resp.status_code}: {resp.text[:_BODY_EXCERPT]}",
                        resp.status_code,
                        resp.text,
                    )
            time.sleep(self.backoff_s * (2**attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        self._http.close()


def _map_concurrent(fn: Callable[[Any], Any], items: Sequence[Any], workers: int) -> list[Any]:
    if len(items) <= 1 or workers <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


def _message_text(data: dict) -> str:
    try:
        return data["choices"][0]["message"].get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise OpenAIServerError(f"unexpected chat completion answer: {str(data)[:_BODY_EXCERPT]}") from exc


class _ServedModel:
    """What the LLM and VLM clients share: the served model's name and one HTTP client."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 60,
        max_concurrency: int = 8,
    ) -> None:
        self.model_id = model
        self.model = model
        self.max_concurrency = max_concurrency
        self._client = _Client(base_url, api_key, timeout)

    @property
    def base_url(self) -> str:
        return self._client.base_url


class OpenAICompatibleLLM(_ServedModel):
    """Chat (and, on vLLM, scoring) through an OpenAI-compatible server (implements :class:`models.protocols.LLM`)."""

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
        """One concurrent ``/chat/completions`` request per conversation."""
        stops = [s for s in stop or () if s]

        def one(conv: Sequence[Message]) -> str:
            messages = [dict(m) for m in conv]
            body: dict[str, Any] = {
                "model": self.model,
                "messages": messages,
                "max_tokens": max_new_tokens,
                "temperature": temperature,
            }
            if seed is not None:
                body["seed"] = seed
            if stops:
                body["stop"] = stops
            if assistant_prefix:
                messages.append({"role": "assistant", "content": assistant_prefix})
                body.update(continue_final_message=True, add_generation_prompt=False)
            # Servers that ignore `stop` would return text past it.
            return _trim_at_stop(_message_text(self._client.post("/chat/completions", body)), stops)

        return _map_concurrent(one, list(conversations), self.max_concurrency)

    def render_prompt(self, conversation: Sequence[Message], assistant_prefix: str = "") -> str:
        """The server's chat-templated prompt text (+ prefix), via vLLM's /tokenize and /detokenize."""
        messages = [dict(m) for m in conversation]
        body: dict[str, Any] = {"model": self.model, "messages": messages, "add_generation_prompt": True}
        if assistant_prefix:
            messages.append({"role": "assistant", "content": assistant_prefix})
            body.update(add_generation_prompt=False, continue_final_message=True)
        try:
            ids = self._client.post("/tokenize", body, root=True)["tokens"]
            return self._client.post("/detokenize", {"model": self.model, "tokens": ids}, root=True)["prompt"]
        except OpenAIServerError as exc:
            if exc.status_code is not None and 400 <= exc.status_code < 500:
                raise NotImplementedError(
                    f"{self.base_url} cannot render chat prompts ({exc}); score_continuations needs a vLLM-compatible "
                    "server exposing /tokenize and /detokenize. Use the 'transformers' or 'vllm' backend to score."
                ) from exc
            raise
        except (KeyError, TypeError) as exc:
            raise NotImplementedError(
                f"{self.base_url}: /tokenize or /detokenize answered in an unknown format"
            ) from exc

    def score_continuations(
        self, conversation: Sequence[Message], assistant_prefix: str, continuations: Sequence[str]
    ) -> np.ndarray:
        """Sum of log-probs of each continuation, from ``/completions`` with ``echo`` and ``logprobs``.

        Raises NotImplementedError when the server cannot render prompts or echo prompt log-probs.
        """
        if not continuations:
            return np.zeros(0, dtype=np.float64)
        prompt = self.render_prompt(conversation, assistant_prefix)
        texts = [prompt + c for c in continuations]
        body = {
            "model": self.model,
            "prompt": texts,
            "max_tokens": 1,
            "temperature": 0.0,
            "echo": True,
            "logprobs": 1,
            # The rendered prompt already holds BOS; a second one would shift every score.
            "add_special_tokens": False,
        }
        try:
            data = self._client.post("/completions", body)
        except OpenAIServerError as exc:
            if exc.status_code is not None and 400 <= exc.status_code < 500:
                raise NotImplementedError(
                    f"{self.base_url} cannot echo prompt log-probs ({exc}); score_continuations needs "
                    "/completions with echo=true and logprobs (vLLM supports it)."
                ) from exc
            raise
        choices = sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != len(texts):
            raise NotImplementedError(
                f"{self.base_url}: /completions returned {len(choices)} choices for {len(texts)} prompts"
            )
        return np.array(
            [_echo_span_logprob(ch, len(prompt), len(t)) for ch, t in zip(choices, texts, strict=True)],
            dtype=np.float64,
        )

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()


def _echo_span_logprob(choice: dict, prompt_len: int, full_len: int) -> float:
    """Sum the echoed log-probs of tokens overlapping ``[prompt_len, full_len)`` (boundary merges count)."""
    lp = choice.get("logprobs") or {}
    tokens, logprobs, offsets = lp.get("tokens"), lp.get("token_logprobs"), lp.get("text_offset")
    if not tokens or logprobs is None or offsets is None:
        raise NotImplementedError(
            "the server did not return echoed prompt log-probs (tokens/token_logprobs/text_offset)"
        )
    total = 0.0
    for k, (tok, logprob, start) in enumerate(zip(tokens, logprobs, offsets, strict=False)):
        end = offsets[k + 1] if k + 1 < len(offsets) else start + len(tok)
        if start >= full_len:
            break  # the generated token(s) after the echoed prompt
        if end > prompt_len and logprob is not None:
            total += float(logprob)
    return total


# --------------------------------------------------------------------------- VLM


def image_data_url(image: Any) -> str:
    """A ``data:image/png;base64,...`` URL for a PIL image, an HxWxC uint8 array or an image file path."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            pil = im.convert("RGB")
    elif isinstance(image, np.ndarray):
        pil = Image.fromarray(image).convert("RGB")
    else:
        pil = image.convert("RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class OpenAICompatibleVLM(_ServedModel):
    """Image + text questions through an OpenAI-compatible server (implements :class:`models.protocols.VLM`)."""

    def generate(
        self,
        images: Sequence[Any],
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
    ) -> list[str]:
        """One concurrent ``/chat/completions`` request per (image, prompt) pair."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")

        def one(pair: tuple[Any, str]) -> str:
            image, prompt = pair
            content = [
                {"type": "image_url", "image_url": {"url": image_data_url(image)}},
                {"type": "text", "text": prompt},
            ]
            body = {
                "model": self.model,
                "messages": [{"role": "user", "content": content}],
                "max_tokens": max_new_tokens,
                "temperature": temperature,
            }
            return _message_text(self._client.post("/chat/completions", body))

        return _map_concurrent(one, list(zip(images, prompts, strict=True)), self.max_concurrency)

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()
