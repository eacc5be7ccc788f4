"""LLM backends: transformers (tiny random model + real SmolLM2), OpenAI-compatible (fake server), vLLM (wiring)."""

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from models.backends import create
from models.backends.hf_llm import (
    TransformersLLM,
    continuation_start,
    gguf_to_hf_dir,
    locate_causal_lm,
    render_prompt,
    trim_at_stop,
)
from agent.testing import FakeOpenAIServer, build_tiny_llama, fake_logprob, fake_tokenize
from models.backends.openai_compat import OpenAICompatibleLLM, OpenAIServerError, _Client
from models.protocols import LLM, chat_many, score_many

CONVS = [
    [{"role": "user", "content": "What is a melanoma?"}],
    [{"role": "user", "content": "Name a colour."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Describe the lesion: a pigmented macule"},
    ],
]
CONTINUATIONS = [
    " melanoma",
    " nevus",
    " basal cell carcinoma",
    "melanoma",
    " seborrheic keratosis",
    "",
    " dermatofibroma",
]


def manual_scores(llm: TransformersLLM, conversation, prefix: str, continuations) -> np.ndarray:
    """Reference: one plain forward pass per continuation, summing log-probs over its token span."""
    tok, model = llm.tokenizer, llm.model
    prompt = render_prompt(tok, conversation, prefix)
    out = []
    for c in continuations:
        ids, start = continuation_start(tok, prompt, prompt + c)
        with torch.inference_mode():
            logits = model(torch.tensor([ids], device=model.device)).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        out.append(sum(float(logprobs[j - 1, ids[j]]) for j in range(max(start, 1), len(ids))))
    return np.array(out)


# --------------------------------------------------------------------------- transformers, tiny random model


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    path = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    return TransformersLLM(str(path), max_batch_size=2)


def test_tiny_is_an_llm_and_lazy(tmp_path):
    path = build_tiny_llama(tmp_path / "m")
    llm = create("llm", "transformers", model=str(path))
    assert isinstance(llm, LLM) and llm.model_id == "m"
    assert llm._model is None  # nothing loads until first use
    assert TransformersLLM().model_id == "smollm2-135m-instruct"


def test_tiny_batched_equals_unbatched(tiny_llm):
    batched = tiny_llm.chat(CONVS, max_new_tokens=8)
    single = [tiny_llm.chat([c], max_new_tokens=8)[0] for c in CONVS]
    assert batched == single
    assert all(isinstance(t, str) and t for t in batched)


def test_tiny_score_matches_manual(tiny_llm):
    conv = CONVS[0]
    got = tiny_llm.score_continuations(conv, "The answer is", CONTINUATIONS)
    np.testing.assert_allclose(got, manual_scores(tiny_llm, conv, "The answer is", CONTINUATIONS), atol=1e-3)
    assert got[CONTINUATIONS.index("")] == 0.0 and (got[:5] < 0).all()
    # The full-forward path (used when a cache cannot be shared) agrees with the shared-prefix one.
    prompt = render_prompt(tiny_llm.tokenizer, conv, "The answer is")
    with torch.inference_mode():
        full = tiny_llm._score_full([continuation_start(tiny_llm.tokenizer, prompt, prompt + c) for c in CONTINUATIONS])
    np.testing.assert_allclose(got, full, atol=1e-3)
    assert tiny_llm.score_continuations(conv, "", []).shape == (0,)


def _score_requests():
    prefixes = ["The answer is", "Diagnosis:", "The answer is"]
    return [(conv, prefix, CONTINUATIONS[i : i + 4 + i]) for i, (conv, prefix) in enumerate(zip(CONVS, prefixes))] + [(CONVS[0], "x", [])]


def _check_score_batch(llm, atol):
    requests = _score_requests()
    got = llm.score_continuations_batch(requests)
    assert [g.shape for g in got] == [(len(r[2]),) for r in requests]
    for g, (conv, prefix, conts) in zip(got, requests):
        np.testing.assert_allclose(g, llm.score_continuations(conv, prefix, conts), atol=atol)
    assert [list(g) for g in score_many(llm, requests)] == [list(g) for g in got]  # the protocol helper uses it


def _check_chat_batch(llm):
    requests = [(CONVS[0], {"assistant_prefix": "Answer:", "max_new_tokens": 8}), (CONVS[1], {"assistant_prefix": "Colour:", "max_new_tokens": 8}),
                (CONVS[2], {"assistant_prefix": "", "max_new_tokens": 5})]  # fmt: skip
    got = llm.chat_batch(requests)
    assert got == [llm.chat([conv], **kw)[0] for conv, kw in requests]
    assert chat_many(llm, requests) == got


def test_tiny_score_and_chat_across_prompts_equal_one_by_one(tiny_llm):
    # max_batch_size=2: three prompts take two prefix passes and their candidates several suffix batches.
    _check_score_batch(tiny_llm, atol=1e-4)
    _check_chat_batch(tiny_llm)


def test_protocol_helpers_fall_back_to_one_call_per_request():
    from agent.testing import TestLLM

    llm = TestLLM(replies=lambda conv: conv[-1]["content"][:4], scores={" nevus": -1.0})
    requests = [(CONVS[0], "p", [" nevus", " x"]), (CONVS[1], "q", [" nevus"])]
    assert [list(s) for s in score_many(llm, requests)] == [[-1.0, -5.0], [-1.0]] and llm.scored == 2
    replies = chat_many(llm, [(CONVS[0], {"assistant_prefix": "a"}), (CONVS[1], {"assistant_prefix": "b"}), (CONVS[2], {"assistant_prefix": "a"})])
    assert replies == ["What", "Name", "Desc"]
    assert [c["kwargs"]["assistant_prefix"] for c in llm.chats] == ["a", "a", "b"]  # one chat call per group of equal arguments


def test_continuation_start_counts_boundary_merges(tiny_llm):
    tok = tiny_llm.tokenizer
    ids, start = continuation_start(tok, "The answer is mel", "The answer is melanoma")
    pieces = tok.convert_ids_to_tokens(ids)
    # "mel" + "anoma" merge into one token that starts inside the prompt: it is the continuation's token.
    assert pieces[start:] == ["Ġmelanoma"]
    ids, start = continuation_start(tok, "The answer is", "The answer is")
    assert start == len(ids)


def test_tiny_stop_and_prefix(tiny_llm):
    conv = CONVS[0]
    full = tiny_llm.chat([conv], max_new_tokens=12)[0]
    stop = full[4:6]
    assert tiny_llm.chat([conv], max_new_tokens=12, stop=[stop])[0] == full[: full.find(stop)]
    # With a prefix, the reply continues the prefix (and excludes it).
    tok, model = tiny_llm.tokenizer, tiny_llm.model
    prompt = render_prompt(tok, conv, "Diagnosis:")
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        ref = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = tok.decode(ref[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert tiny_llm.chat([conv], max_new_tokens=6, assistant_prefix="Diagnosis:")[0] == expected


def test_tiny_seeded_sampling(tiny_llm):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = tiny_llm.chat(CONVS[:2], max_new_tokens=8, temperature=1.0, seed=5)
    b = tiny_llm.chat(CONVS[:2], max_new_tokens=8, temperature=1.0, seed=5)
    assert a == b
    assert torch.equal(torch.rand(1), expected_next)  # the caller's RNG stream is untouched


def test_trim_at_stop():
    assert trim_at_stop("a. b\nc", [".", "\n"]) == "a"
    assert trim_at_stop("abc", None) == "abc"
    assert trim_at_stop("abc", ["", "z"]) == "abc"


def test_hub_id_offline_gives_guidance(no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(Exception, match=r"(?s)some-org/not-cached-llm.*local-dir.*path:"):
        locate_causal_lm("some-org/not-cached-llm")
    # A bare name is more likely a mistyped registry id: the error lists the valid ones.
    with pytest.raises(Exception, match="smollm2-135m-instruct"):
        TransformersLLM("smollm2-135m").chat([CONVS[0]])


def test_locate_rejects_non_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="gguf"):
        locate_causal_lm(str(f))


# --------------------------------------------------------------------------- transformers, real SmolLM2


@pytest.fixture(scope="module")
def smol():
    return TransformersLLM("smollm2-135m-instruct")


@pytest.mark.weights
def test_smollm2_gguf_converted_once(smol):
    from models.resolve import resolve

    hf_dir = locate_causal_lm("smollm2-135m-instruct")
    names = {p.name for p in Path(hf_dir).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(n.endswith(".gguf") for n in names)
    mtime = (Path(hf_dir) / "model.safetensors").stat().st_mtime_ns
    gguf = resolve("smollm2-135m-instruct")
    assert str(gguf_to_hf_dir(gguf)) == hf_dir
    # The same file passed as a path, or as its folder + gguf_file, reuses the conversion.
    assert locate_causal_lm(str(gguf)) == hf_dir == locate_causal_lm(str(gguf.parent), gguf_file=gguf.name)
    assert TransformersLLM(str(gguf)).model_id == "SmolLM2-135M-Instruct.Q4_1"
    assert (Path(hf_dir) / "model.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.weights
def test_smollm2_answers_sensibly(smol):
    (text,) = smol.chat([CONVS[0]], max_new_tokens=24)
    assert text.strip()
    assert any(w in text.lower() for w in ("skin", "cancer", "melanocyte", "tumor", "tumour"))


@pytest.mark.weights
def test_smollm2_batched_equals_unbatched(smol):
    batched = smol.chat(CONVS, max_new_tokens=8)
    assert batched == [smol.chat([c], max_new_tokens=8)[0] for c in CONVS]


@pytest.mark.weights
def test_smollm2_score_matches_manual(smol):
    conv = [{"role": "user", "content": "Which skin lesion is the most dangerous?"}]
    got = smol.score_continuations(conv, "The most dangerous is", CONTINUATIONS)
    np.testing.assert_allclose(got, manual_scores(smol, conv, "The most dangerous is", CONTINUATIONS), atol=1e-3)
    assert got[0] > got[4]  # " melanoma" is likelier than " seborrheic keratosis"


@pytest.mark.weights
def test_smollm2_score_and_chat_across_prompts_equal_one_by_one(smol):
    _check_score_batch(smol, atol=1e-3)  # float rounding of differently shaped batches
    _check_chat_batch(smol)


@pytest.mark.weights
def test_smollm2_prefix_and_stop(smol):
    conv = CONVS[0]
    full = smol.chat([conv], max_new_tokens=12)[0]
    words = full.split(" ")
    prefix = " ".join(words[:3])
    cont = smol.chat([conv], max_new_tokens=9, assistant_prefix=prefix)[0]
    assert (prefix + cont).startswith(full[: len(prefix) + 5])  # greedy continues its own reply
    assert not cont.startswith(prefix)
    stopped = smol.chat([conv], max_new_tokens=12, stop=[" of"])[0]
    assert " of" not in stopped and full.startswith(stopped)


# --------------------------------------------------------------------------- OpenAI-compatible (fake server)


@pytest.fixture
def server(no_network, monkeypatch):
    monkeypatch.setattr(_Client, "backoff_s", 0.01)
    with FakeOpenAIServer() as srv:
        yield srv


def test_openai_chat(server):
    llm = create("llm", "openai-compatible", base_url=server.base_url, model="m", api_key="k")
    assert isinstance(llm, LLM) and llm.model_id == "m"
    out = llm.chat(CONVS, max_new_tokens=50, temperature=0.5, seed=3)
    assert out == ["echo: " + c[-1]["content"] for c in CONVS]
    path, body = server.requests[0]
    assert path == "/v1/chat/completions"
    assert body["model"] == "m" and body["max_tokens"] == 50 and body["temperature"] == 0.5 and body["seed"] == 3
    assert "stop" not in body and "continue_final_message" not in body
    assert body["_headers"]["authorization"] == "Bearer k"


def test_openai_api_key_from_env(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    OpenAICompatibleLLM(server.base_url, "m").chat([CONVS[0]])
    assert server.requests[-1][1]["_headers"]["authorization"] == "Bearer from-env"
    monkeypatch.delenv("OPENAI_API_KEY")
    OpenAICompatibleLLM(server.base_url, "m").chat([CONVS[0]])
    assert "authorization" not in server.requests[-1][1]["_headers"]


def test_openai_prefix_and_stop(server):
    server.reply = lambda body: " melanoma. Because of the veil."
    llm = OpenAICompatibleLLM(server.base_url + "/", "m")
    out = llm.chat([CONVS[0]], assistant_prefix="Diagnosis:", stop=["."], max_new_tokens=20)
    assert out == [" melanoma"]
    body = server.requests[-1][1]
    assert body["messages"][-1] == {"role": "assistant", "content": "Diagnosis:"}
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["stop"] == ["."]
    # A server that ignores `stop` is trimmed client-side.
    server.reply = lambda body: "a\nb"
    assert llm.chat([CONVS[0]], stop=["\n"])[0] == "a"


def test_openai_scoring(server):
    llm = OpenAICompatibleLLM(server.base_url, "m")
    conts = [" melanoma", " nevus", "", " basal cell carcinoma"]
    got = llm.score_continuations(CONVS[0], "The answer is", conts)
    expected = [sum(fake_logprob(t) for t in fake_tokenize(c)) for c in conts]
    np.testing.assert_allclose(got, expected)
    paths = server.paths()
    assert paths == ["/tokenize", "/detokenize", "/v1/completions"]
    tok_body, comp_body = server.requests[0][1], server.requests[2][1]
    assert tok_body["continue_final_message"] is True and tok_body["messages"][-1]["content"] == "The answer is"
    assert comp_body["echo"] is True and comp_body["logprobs"] == 1 and comp_body["max_tokens"] == 1
    assert comp_body["prompt"][0].endswith("<|assistant|>The answer is melanoma")
    # A continuation merging with the end of the prefix scores the merged token.
    merged = llm.score_continuations(CONVS[0], "The answer is mel", ["anoma"])
    np.testing.assert_allclose(merged, [fake_logprob(" melanoma")])
    # Without a prefix the generation prompt is rendered.
    llm.score_continuations(CONVS[0], "", [" x"])
    assert server.requests[-3][1]["add_generation_prompt"] is True


def test_openai_scoring_unsupported(no_network):
    with FakeOpenAIServer(scoring=False) as srv:
        llm = OpenAICompatibleLLM(srv.base_url, "m")
        with pytest.raises(NotImplementedError, match="tokenize"):
            llm.score_continuations(CONVS[0], "", [" a"])
        assert llm.chat([CONVS[0]]) == ["echo: What is a melanoma?"]  # chat still works


def test_openai_4xx_not_retried(server):
    server.fail(400, times=3, body="bad request: max_tokens too large")
    llm = OpenAICompatibleLLM(server.base_url, "m")
    with pytest.raises(OpenAIServerError, match="HTTP 400.*max_tokens too large") as err:
        llm.chat([CONVS[0]])
    assert err.value.status_code == 400
    assert len(server.requests) == 1


def test_openai_5xx_retried(server):
    server.fail(503, times=2)
    llm = OpenAICompatibleLLM(server.base_url, "m")
    assert llm.chat([CONVS[0]]) == ["echo: What is a melanoma?"]
    assert len(server.requests) == 3
    server.fail(500, times=3, body="engine crashed")
    with pytest.raises(OpenAIServerError, match="HTTP 500.*engine crashed"):
        llm.chat([CONVS[0]])
    assert len(server.requests) == 6  # 1 try + 2 retries, then give up


def test_openai_connection_error(no_network, monkeypatch):
    monkeypatch.setattr(_Client, "backoff_s", 0.01)
    with FakeOpenAIServer() as srv:
        url = srv.base_url
    llm = OpenAICompatibleLLM(url, "m", timeout=2)  # the server is gone: nothing listens there
    with pytest.raises(OpenAIServerError, match="cannot reach"):
        llm.chat([CONVS[0]])


# --------------------------------------------------------------------------- vLLM


def test_vllm_missing_names_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'dermgraph\[vllm\]'"):
        create("llm", "vllm", model="smollm2-135m-instruct")


class _Logprob:
    def __init__(self, logprob):
        self.logprob = logprob


def _fake_vllm():
    """A stand-in ``vllm`` module recording what the backend asks of the engine."""
    from transformers import AutoTokenizer

    mod = types.ModuleType("vllm")
    mod.calls = []

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class LLM:
        def __init__(self, model, **kw):
            mod.calls.append(("init", model, kw))
            self.tok = AutoTokenizer.from_pretrained(model)

        def get_tokenizer(self):
            return self.tok

        def generate(self, prompts, params, use_tqdm=True):
            mod.calls.append(("generate", prompts, params.kw))
            outs = []
            for p in prompts:
                ids = p["prompt_token_ids"]
                plp = [None] + [{t: _Logprob(-0.5), t + 1: _Logprob(-9.0)} for t in ids[1:]]
                outs.append(
                    types.SimpleNamespace(outputs=[types.SimpleNamespace(text="mel. more")], prompt_logprobs=plp)
                )
            return outs

    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    return mod


def test_vllm_wiring(monkeypatch, tmp_path):
    path = build_tiny_llama(tmp_path / "tiny")
    fake = _fake_vllm()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    llm = create("llm", "vllm", model=str(path), gpu_memory_utilization=0.5)
    assert isinstance(llm, LLM) and llm.model_id == "tiny"
    assert llm.chat(CONVS[:2], stop=["."], temperature=0.7, seed=1, assistant_prefix="Dx:") == ["mel", "mel"]
    init, gen = fake.calls[0], fake.calls[1]
    assert init == ("init", str(path), {"gpu_memory_utilization": 0.5})
    tok = llm.tokenizer
    expected_ids = tok(render_prompt(tok, CONVS[0], "Dx:"), add_special_tokens=False)["input_ids"]
    assert gen[1][0]["prompt_token_ids"] == expected_ids
    assert gen[2]["stop"] == ["."] and gen[2]["seed"] == 1 and gen[2]["temperature"] == 0.7

    scores = llm.score_continuations(CONVS[0], "The answer is", [" melanoma", "", " basal cell carcinoma"])
    prompt = render_prompt(tok, CONVS[0], "The answer is")
    n = [
        len(ids) - start
        for ids, start in (
            continuation_start(tok, prompt, prompt + c) for c in [" melanoma", "", " basal cell carcinoma"]
        )
    ]
    np.testing.assert_allclose(scores, [-0.5 * k for k in n])
    assert fake.calls[-1][2]["prompt_logprobs"] == 1 and fake.calls[-1][2]["max_tokens"] == 1

    # Across prompts: one engine call for every candidate of every prompt; chats differing only in prefix together.
    n_calls = len(fake.calls)
    got = score_many(llm, [(CONVS[0], "The answer is", [" melanoma", "", " basal cell carcinoma"]), (CONVS[1], "x", []), (CONVS[2], "Dx:", [" nevus"])])
    assert len(fake.calls) == n_calls + 1 and [len(g) for g in got] == [3, 0, 1]
    np.testing.assert_allclose(got[0], scores)
    replies = chat_many(llm, [(CONVS[0], {"assistant_prefix": "a", "max_new_tokens": 4}), (CONVS[1], {"assistant_prefix": "b", "max_new_tokens": 4}),
                              (CONVS[2], {"assistant_prefix": "a", "max_new_tokens": 9})])  # fmt: skip
    assert replies == ["mel. more"] * 3 and len(fake.calls) == n_calls + 3  # two groups of arguments: two engine calls
    assert [p["prompt_token_ids"] for p in fake.calls[-2][1]] == [tok(render_prompt(tok, c, a), add_special_tokens=False)["input_ids"] for c, a in ((CONVS[0], "a"), (CONVS[1], "b"))]


@pytest.mark.weights
def test_rationale_after_scoring_reuses_prefix_cache_with_identical_output():
    from models.backends.hf_llm import TransformersLLM

    conv = [{"role": "system", "content": "You are a dermatology assistant."},
            {"role": "user", "content": "Findings: atypical network and a blue-whitish veil. Candidates: melanoma; nevus. " * 3}]
    fresh = TransformersLLM()
    expected = fresh.chat([conv], max_new_tokens=12, assistant_prefix="Diagnosis: melanoma\nRationale:")
    llm = TransformersLLM()
    llm.score_continuations(conv, "Diagnosis: ", ["melanoma", "melanocytic nevus"])
    assert llm._prefix is not None
    got = llm.chat([conv], max_new_tokens=12, assistant_prefix="Diagnosis: melanoma\nRationale:")
    assert got == expected
