"""CPU runtimes for the reasoner LLM side by side: speed, agreement with fp32 and the candidate ranking's accuracy.

Runtimes (``--runtimes``, comma-separated):

* ``fp32``          transformers, float32 (the shipped ``TransformersLLM``; the baseline)
* ``int8-dynamic``  the same model with ``torch.ao`` int8 dynamic quantisation of its Linear layers
* ``ort-fp32``      ONNX Runtime: the same weights exported with ``torch.onnx.export`` (one graph with explicit
                    KV-cache inputs/outputs; the LM head runs in numpy on the rows that are needed)
* ``ort-int8``      that graph through ``onnxruntime.quantization.quantize_dynamic`` (int8 MatMul weights)
* ``llama.cpp``     ``llama-cpp-python`` reading the registry's GGUF directly (skipped when not installed)

Every runtime scores the candidates exactly as ``TransformersLLM.score_continuations`` defines it (the
same rendered prompt, the same token ids from the same tokenizer, the longest shared token prefix run once,
the sum of the continuation tokens' log-probs) and writes the 40-token greedy summary after
``Diagnosis: <its top candidate>\\nRationale:`` reusing the scored prefix's KV cache, as the agent does.
Prompts are rendered by the agent (``Agent.run(..., until="retrieve")``) for a seeded sample of
isic2018_val and Derm7pt val images, stratified by label (half each), so the candidate ranking can be
scored against the true HAM10000 label: top-1 accuracy, balanced accuracy, and an exact McNemar test
of each runtime's per-case correctness against fp32.

    OMP_NUM_THREADS=1 python scripts/bench_llm_runtimes.py [-n 24] [--runtimes fp32,ort-fp32] [--json]
    OMP_NUM_THREADS=1 python scripts/bench_llm_runtimes.py -n 120 --no-summary --prompts runs/llm_prompts_120.json

``--prompts FILE`` caches the rendered prompts (written when absent, read when present), so runs for
different runtimes (e.g. in separate processes) score the very same prompts; ``--scores-out`` writes the
per-prompt scores, ``--scores-in`` merges earlier ones (each runtime's first source wins) before the tables.
Data: ``$DERMGRAPH_DATA``, else ``../shared/data`` (``models.paths.data_dir``).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

ALL_RUNTIMES = ("fp32", "int8-dynamic", "ort-fp32", "ort-int8", "llama.cpp")
SUMMARY_TOKENS = 40


# --------------------------------------------------------------------------- cases and prompts


def _stratified(items: list[tuple[str, str, str]], k: int, rng: random.Random) -> list[tuple[str, str, str]]:
    """``k`` items sampled without replacement, each label in proportion to its share (at least one each)."""
    groups: dict[str, list] = defaultdict(list)
    for it in items:
        groups[it[2]].append(it)
    for lab in sorted(groups):
        rng.shuffle(groups[lab])
    k = min(k, len(items))
    quota = {lab: k * len(g) / len(items) for lab, g in groups.items()}
    alloc = {lab: min(len(groups[lab]), max(1, int(q))) for lab, q in quota.items()}
    while sum(alloc.values()) > k:
        lab = max(alloc, key=lambda x: (alloc[x], x))
        alloc[lab] -= 1
    while sum(alloc.values()) < k:
        lab = max((x for x in alloc if alloc[x] < len(groups[x])), key=lambda x: (quota[x] - alloc[x], x))
        alloc[lab] += 1
    picked = [it for lab in sorted(groups) for it in groups[lab][: alloc[lab]]]
    rng.shuffle(picked)
    return picked


def pick_cases(n: int, seed: int) -> list[tuple[str, str, str]]:
    """(source, image path, HAM10000 label): ceil(n/2) isic2018_val + floor(n/2) Derm7pt val cases."""
    from models.paths import data_dir
    from models.vocabulary import derm7pt_to_ham

    root = data_dir()
    with open(root / "isic2018_val" / "labels.csv", newline="") as f:
        isic = [("isic2018_val", str(root / "isic2018_val" / r["image"]), r["dx"]) for r in csv.DictReader(f)]
    with open(root / "derm7pt" / "meta.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "val"]
    d7 = [("derm7pt_val", str(root / "derm7pt" / "images" / r["derm"]), derm7pt_to_ham(r["diagnosis"])) for r in rows]
    d7 = [c for c in d7 if c[2]]  # 'miscellaneous' has no HAM10000 class
    rng = random.Random(seed)
    return _stratified(isic, (n + 1) // 2, rng) + _stratified(d7, n // 2, rng)


def render_prompts(n: int, seed: int) -> list[dict[str, Any]]:
    """The agent's reasoner prompt for each picked case (cases the modality gate rejects are skipped)."""
    from agent.agent import Agent
    from agent.nodes.reason import reasoner_inputs

    agent = Agent()
    out = []
    for source, path, label in pick_cases(n, seed):
        state = agent.run(path, until="retrieve")
        if state.modality.rejected or state.modality.label not in ("dermoscopy", "clinical"):
            print(f"skipped {path}: modality {state.modality.label}", file=sys.stderr)
            continue
        shown = reasoner_inputs(state, agent.runtime)  # exactly the chat the reason node sends
        out.append({"source": source, "image": Path(path).name, "label": label, "conversation": shown["prompt"],
                    "candidates": shown["candidate_labels"], "names": shown["candidates"]})
    return out


# --------------------------------------------------------------------------- shared scoring arithmetic


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


class _CachedLM:
    """Scoring and greedy summaries over a ``step(ids, past, pos) -> (per-position log-prob fn, past)`` runtime.

    Subclasses implement ``_step`` (run new tokens after a KV cache), ``_repeat`` / ``_crop`` (KV cache ops)
    and ``_logits`` (hidden rows -> logits)."""

    def __init__(self, tokenizer: Any, eos_ids: set[int], max_batch_size: int = 8) -> None:
        self.tok = tokenizer
        self.eos = eos_ids
        self.pad = tokenizer.pad_token_id
        self.max_batch_size = max_batch_size
        self._prefix: tuple[list[int], Any] | None = None

    def score_continuations(self, conversation, assistant_prefix: str, continuations) -> np.ndarray:
        from models.backends.hf_llm import common_prefix, continuation_start, render_prompt

        prompt = render_prompt(self.tok, conversation, assistant_prefix)
        seqs = [continuation_start(self.tok, prompt, prompt + c) for c in continuations]
        common = common_prefix(seqs)
        first = seqs[0][0]
        hidden, past = self._step([first[:common]], None, common_len=0, mask=None)
        self._prefix = (first[:common], past)
        last = _log_softmax(self._logits(hidden[0, -1:]))[0]
        scores = np.zeros(len(seqs), dtype=np.float64)
        for c0 in range(0, len(seqs), self.max_batch_size):
            chunk = seqs[c0 : c0 + self.max_batch_size]
            width = max(len(ids) - common for ids, _ in chunk)
            if width == 0:
                continue
            rows = [ids[common:] + [self.pad] * (width - (len(ids) - common)) for ids, _ in chunk]
            mask = np.zeros((len(chunk), common + width), dtype=np.int64)
            mask[:, :common] = 1
            for r, (ids, _) in enumerate(chunk):
                mask[r, common : len(ids)] = 1
            h, _ = self._step(rows, self._repeat(past, len(chunk)), common_len=common, mask=mask)
            for r, (ids, start) in enumerate(chunk):
                js = list(range(max(start, common), len(ids)))
                # Row j - common predicts token j; row 0 is the prefix's last position.
                need = [j - common - 1 for j in js if j > common]
                lp = _log_softmax(self._logits(h[r, need])) if need else None
                total, k = 0.0, 0
                for j in js:
                    if j == common:
                        total += float(last[ids[j]])
                    else:
                        total += float(lp[k, ids[j]])
                        k += 1
                scores[c0 + r] = total
        return scores

    def chat(self, conversations, *, max_new_tokens: int = 256, temperature: float = 0.0, seed=None,
             assistant_prefix: str = "", stop=None) -> list[str]:
        from models.backends.hf_llm import render_prompt, trim_at_stop

        if temperature > 0:
            raise NotImplementedError("the benchmark runtimes decode greedily only")
        stops = [s for s in stop or () if s]
        out = []
        for conv in conversations:
            ids = self.tok(render_prompt(self.tok, conv, assistant_prefix), add_special_tokens=False)["input_ids"]
            n, past = 0, None
            if self._prefix is not None:
                cached, cache = self._prefix
                limit = min(len(ids) - 1, len(cached))
                while n < limit and ids[n] == cached[n]:
                    n += 1
                if n >= 32:
                    past = self._crop(cache, n)
                else:
                    n = 0
            hidden, past = self._step([ids[n:]], past, common_len=n, mask=None)
            new: list[int] = []
            head = self.tok.decode(ids, skip_special_tokens=True)
            text = ""
            for _ in range(max_new_tokens):
                t = int(np.argmax(self._logits(hidden[0, -1:])[0]))
                if t in self.eos:
                    break
                new.append(t)
                full = self.tok.decode(ids + new, skip_special_tokens=True)
                text = full[len(head) :] if full.startswith(head) else self.tok.decode(new, skip_special_tokens=True)
                if any(s in text for s in stops) or len(new) == max_new_tokens:
                    break
                hidden, past = self._step([[t]], past, common_len=len(ids) + len(new) - 1, mask=None)
            out.append(trim_at_stop(text, stops))
        return out


class ORTLM(_CachedLM):
    """ONNX Runtime over the exported step graph (inputs: ids, mask, positions, past k/v; outputs: hidden, presents)."""

    def __init__(self, onnx_path: Path, lm_head: np.ndarray, n_layers: int, kv_heads: int, head_dim: int,
                 tokenizer: Any, eos_ids: set[int], threads: int) -> None:
        import onnxruntime as ort

        super().__init__(tokenizer, eos_ids)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        self.W = np.ascontiguousarray(lm_head, dtype=np.float32)
        self.L, self.kvh, self.hd = n_layers, kv_heads, head_dim

    def _logits(self, rows: np.ndarray) -> np.ndarray:
        return rows @ self.W.T

    def _step(self, rows, past, common_len: int, mask):
        ids = np.asarray(rows, dtype=np.int64)
        b, w = ids.shape
        if past is None:
            past = [np.zeros((b, self.kvh, 0, self.hd), np.float32)] * (2 * self.L)
        if mask is None:
            mask = np.ones((b, common_len + w), dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": mask,
                "position_ids": np.tile(np.arange(common_len, common_len + w, dtype=np.int64), (b, 1))}
        for i in range(self.L):
            feed[f"past.{i}.k"], feed[f"past.{i}.v"] = past[2 * i], past[2 * i + 1]
        out = self.sess.run(None, feed)
        return out[0], out[1:]

    def _repeat(self, past, n: int):
        return [np.repeat(p, n, axis=0) for p in past]

    def _crop(self, past, n: int):
        return [np.ascontiguousarray(p[:, :, :n]) for p in past]


class LlamaCppLM(_CachedLM):
    """llama.cpp (``llama-cpp-python``) on the GGUF file. One sequence, so the candidate suffixes run one after
    the other on the prefix's KV cache, token by token (only the last position's logits are kept)."""

    def __init__(self, gguf: Path, tokenizer: Any, eos_ids: set[int], threads: int, n_ctx: int = 4096) -> None:
        from llama_cpp import Llama

        super().__init__(tokenizer, eos_ids)
        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                         n_batch=512, logits_all=False, verbose=False)

    def _logits(self, rows: np.ndarray) -> np.ndarray:
        return rows

    def _eval_from(self, n: int, tokens: list[int]) -> np.ndarray:
        """Keep the first ``n`` cached positions, run ``tokens``; the logits after the last one."""
        self.llm.n_tokens = n  # eval() drops the KV cache from n_tokens on before it runs the batch
        self.llm.eval(tokens)
        return np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float32)

    def _step(self, rows, past, common_len: int, mask):
        if mask is None:  # one sequence (the prefix, or generation): only its last position is used
            n = 0 if past is None else past
            return self._eval_from(n, list(rows[0]))[None, None], n + len(rows[0])
        out = np.zeros((len(rows), len(rows[0]), self.llm.n_vocab()), dtype=np.float32)
        for r, row in enumerate(rows):
            for k in range(int(mask[r, common_len:].sum())):
                out[r, k] = self._eval_from(common_len + k, [row[k]])
        return out, None

    def _repeat(self, past, n: int):
        return past

    def _crop(self, past, n: int):
        return n


# --------------------------------------------------------------------------- building runtimes


def export_onnx(model: Any, out_dir: Path) -> None:
    """Export ``model`` (a transformers causal LM) as one step graph with explicit KV-cache tensors."""
    import torch
    from transformers import DynamicCache

    from models.backends.hf_llm import cache_arg, cache_of

    cfg = model.config
    n_layers = cfg.num_hidden_layers

    class Step(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, position_ids, past):
            cache = DynamicCache(config=self.m.config)
            for i in range(n_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.m.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               **{cache_arg(self.m.model): cache}, use_cache=True)
            layers = cache_of(out).layers
            return (out.last_hidden_state, *[t for i in range(n_layers) for t in (layers[i].keys, layers[i].values)])

    kvh = cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    b, s, p = 2, 3, 5
    args = (torch.randint(0, 1000, (b, s)), torch.ones(b, p + s, dtype=torch.long),
            torch.arange(p, p + s).unsqueeze(0).expand(b, -1), [torch.randn(b, kvh, p, hd) for _ in range(2 * n_layers)])
    batch, seq, past_len = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    dyn = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: torch.export.Dim.AUTO},
           "position_ids": {0: batch, 1: seq}, "past": [{0: batch, 2: past_len} for _ in range(2 * n_layers)]}
    names_in = ["input_ids", "attention_mask", "position_ids"] + [f"past.{i // 2}.{'kv'[i % 2]}" for i in range(2 * n_layers)]
    names_out = ["hidden"] + [f"present.{i // 2}.{'kv'[i % 2]}" for i in range(2 * n_layers)]
    with torch.no_grad():
        prog = torch.onnx.export(Step(model).eval(), args, dynamic_shapes=dyn, input_names=names_in,
                                 output_names=names_out, dynamo=True, external_data=False, optimize=True)
    prog.save(str(out_dir / "step.onnx"), external_data=False)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(out_dir / "step.onnx"), str(out_dir / "step_int8.onnx"), op_types_to_quantize=["MatMul"],
                     weight_type=QuantType.QInt8)


def gguf_path(model_ref: str) -> Path | None:
    """The GGUF file a registry id resolves to (what ``TransformersLLM`` dequantises), else None."""
    from models.backends.hf_llm import is_registry_ref

    p = Path(model_ref).expanduser()
    if not p.exists() and is_registry_ref(model_ref):
        from models.resolve import resolve

        p = resolve(model_ref)
    if p.is_file() and p.suffix.lower() == ".gguf":
        return p
    ggufs = sorted(p.glob("*.gguf")) if p.is_dir() else []
    return ggufs[0] if len(ggufs) == 1 else None


class TorchLM:
    """A ``TransformersLLM`` (fp32) or a shallow copy of it running another torch module."""

    def __init__(self, llm: Any, module: Any = None) -> None:
        self.llm = llm if module is None else copy.copy(llm)
        if module is not None:
            self.llm._model, self.llm._prefix, self.llm._notes = module, None, []

    def score_continuations(self, *a):
        return self.llm.score_continuations(*a)

    def chat(self, *a, **k):
        return self.llm.chat(*a, **k)


def build_runtimes(names: list[str], onnx_dir: str | None) -> tuple[dict[str, Any], dict[str, str]]:
    import torch

    from agent.config import AgentConfig
    from models.backends.hf_llm import TransformersLLM, locate_causal_lm
    from models.resolve import ensure_derived

    ref = AgentConfig().reasoner.llm.model or "smollm2-135m-instruct"
    fp32 = TransformersLLM(model=ref)
    fp32._load()
    tok, model = fp32._tokenizer, fp32._model
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    threads = torch.get_num_threads()
    versions = {"torch": torch.__version__, "transformers": __import__("transformers").__version__, "model": ref}
    rts: dict[str, Any] = {}
    for name in names:
        if name == "fp32":
            rts[name] = TorchLM(fp32)
        elif name == "int8-dynamic":
            rts[name] = TorchLM(fp32, torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8))
        elif name in ("ort-fp32", "ort-int8"):
            import onnxruntime

            versions["onnxruntime"] = onnxruntime.__version__
            where = Path(locate_causal_lm(ref))
            d = Path(onnx_dir) if onnx_dir else ensure_derived(f"onnx-llm/{where.name}", lambda out: export_onnx(model, out))
            if onnx_dir and not (d / "step.onnx").is_file():
                d.mkdir(parents=True, exist_ok=True)
                export_onnx(model, d)
            cfgm = model.config
            rts[name] = ORTLM(d / ("step.onnx" if name == "ort-fp32" else "step_int8.onnx"),
                              model.get_output_embeddings().weight.detach().float().numpy(), cfgm.num_hidden_layers,
                              cfgm.num_key_value_heads, cfgm.head_dim, tok, eos_ids, threads)
        elif name == "llama.cpp":
            try:
                import llama_cpp
            except ImportError:
                print("llama.cpp: llama-cpp-python is not installed; skipped", file=sys.stderr)
                continue
            versions["llama-cpp-python"] = llama_cpp.__version__
            g = gguf_path(ref)
            if g is None:
                print(f"llama.cpp: {ref} does not resolve to a GGUF file; skipped", file=sys.stderr)
                continue
            rts[name] = LlamaCppLM(g, tok, eos_ids, threads)
        else:
            raise SystemExit(f"unknown runtime {name!r}; valid: {', '.join(ALL_RUNTIMES)}")
    return rts, versions


# --------------------------------------------------------------------------- running and reporting


def run_all(rts: dict[str, Any], prompts: list[dict], summary: bool) -> dict[str, dict[str, Any]]:
    """Score (and summarise) every prompt with every runtime, interleaved prompt by prompt (the runtime order
    rotating), so load changes on a shared machine hit all runtimes alike."""
    from agent.prompts import DIAGNOSIS_PREFIX, RATIONALE_FIELD

    res = {name: {"score_s": [], "summary_s": [], "scores": [], "summaries": []} for name in rts}
    names = list(rts)
    for i, p in enumerate(prompts):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            rt, r = rts[name], res[name]
            t0 = time.perf_counter()
            s = rt.score_continuations(p["conversation"], DIAGNOSIS_PREFIX, p["names"])
            r["score_s"].append(time.perf_counter() - t0)
            r["scores"].append([float(x) for x in s])
            if summary:
                top = p["names"][int(np.argmax(s))]
                t0 = time.perf_counter()
                text = rt.chat([p["conversation"]], max_new_tokens=SUMMARY_TOKENS, temperature=0.0,
                               assistant_prefix=f"{DIAGNOSIS_PREFIX}{top}{RATIONALE_FIELD}", stop=["\n"])[0]
                r["summary_s"].append(time.perf_counter() - t0)
                r["summaries"].append(text)
    return res


def mcnemar_p(a: list[bool], b: list[bool]) -> tuple[int, int, float]:
    """Exact McNemar test of paired correctness: (only a right, only b right, two-sided p)."""
    n01 = sum(x and not y for x, y in zip(a, b))
    n10 = sum(y and not x for x, y in zip(a, b))
    if n01 + n10 == 0:
        return n01, n10, 1.0
    try:
        from statsmodels.stats.contingency_tables import mcnemar

        both = sum(x and y for x, y in zip(a, b))
        neither = len(a) - both - n01 - n10
        return n01, n10, float(mcnemar([[both, n01], [n10, neither]], exact=True).pvalue)
    except ImportError:
        from scipy.stats import binomtest

        return n01, n10, float(binomtest(min(n01, n10), n01 + n10, 0.5).pvalue)


def balanced_accuracy(labels: list[str], preds: list[str]) -> float:
    recalls = []
    for lab in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == lab]
        recalls.append(sum(preds[i] == lab for i in idx) / len(idx))
    return float(np.mean(recalls))


def report(prompts: list[dict], res: dict[str, dict], versions: dict[str, str]) -> dict[str, Any]:
    labels = [p["label"] for p in prompts]
    base = res.get("fp32")
    rows = {}
    for name, r in res.items():
        tops = [p["candidates"][int(np.argmax(s))] for p, s in zip(prompts, r["scores"])]
        correct = [t == y for t, y in zip(tops, labels)]
        row: dict[str, Any] = {
            "n": len(prompts),
            "score_s_median": statistics.median(r["score_s"]) if r["score_s"] else None,
            "score_s_mean": statistics.fmean(r["score_s"]) if r["score_s"] else None,
            "summary_s_median": statistics.median(r["summary_s"]) if r["summary_s"] else None,
            "summary_s_mean": statistics.fmean(r["summary_s"]) if r["summary_s"] else None,
            "accuracy": float(np.mean(correct)),
            "balanced_accuracy": balanced_accuracy(labels, tops),
            "by_source": {src: float(np.mean([c for c, p in zip(correct, prompts) if p["source"] == src]))
                          for src in sorted({p["source"] for p in prompts})},
        }
        if base is not None:
            btops = [p["candidates"][int(np.argmax(s))] for p, s in zip(prompts, base["scores"])]
            bcorrect = [t == y for t, y in zip(btops, labels)]
            row["top1_agree"] = sum(a == b for a, b in zip(tops, btops))
            row["max_abs_score_diff"] = max(float(np.max(np.abs(np.array(a) - np.array(b))))
                                            for a, b in zip(r["scores"], base["scores"]))
            row["mcnemar_only_fp32_right"], row["mcnemar_only_this_right"], row["mcnemar_p"] = mcnemar_p(bcorrect, correct)
            if r["summaries"] and base["summaries"]:
                row["summary_same_as_fp32"] = sum(a == b for a, b in zip(r["summaries"], base["summaries"]))
        rows[name] = row
    return {"versions": versions, "prompts": len(prompts),
            "sources": {s: sum(p["source"] == s for p in prompts) for s in sorted({p["source"] for p in prompts})},
            "runtimes": rows}


def print_markdown(rep: dict[str, Any]) -> None:
    print(f"{rep['prompts']} prompts ({', '.join(f'{k} {v}' for k, v in rep['sources'].items())}); "
          + ", ".join(f"{k} {v}" for k, v in rep["versions"].items()))
    print()
    print("| runtime | scoring s/prompt (median / mean) | summary s/prompt (median / mean) | top-1 = fp32 | max abs score diff "
          "| acc | BACC | McNemar vs fp32 (b/c, p) |")
    print("|---|---|---|---|---|---|---|---|")

    def f(x, d=3):
        return "–" if x is None else f"{x:.{d}f}"

    for name, r in rep["runtimes"].items():
        agree = f"{r['top1_agree']}/{r['n']}" if "top1_agree" in r else "–"
        diff = f(r.get("max_abs_score_diff"), 4) if name != "fp32" else "0"
        mc = (f"{r['mcnemar_only_fp32_right']}/{r['mcnemar_only_this_right']}, p={r['mcnemar_p']:.3f}"
              if "mcnemar_p" in r and name != "fp32" else "–")
        print(f"| {name} | {f(r['score_s_median'])} / {f(r['score_s_mean'])} | {f(r['summary_s_median'])} / "
              f"{f(r['summary_s_mean'])} | {agree} | {diff} | {r['accuracy']:.3f} | {r['balanced_accuracy']:.3f} | {mc} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=24, help="prompts: ceil(n/2) isic2018_val + floor(n/2) Derm7pt val")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runtimes", default=",".join(ALL_RUNTIMES))
    ap.add_argument("--no-summary", action="store_true", help="time candidate scoring only")
    ap.add_argument("--prompts", default=None, help="JSON cache of the rendered prompts (read if present, else written)")
    ap.add_argument("--onnx-dir", default=None, help="where the ONNX export lives (default: the derived-weights cache)")
    ap.add_argument("--scores-out", default=None, help="write per-prompt scores/timings of this run as JSON")
    ap.add_argument("--scores-in", action="append", default=[], help="merge runtimes from an earlier --scores-out")
    ap.add_argument("--json", action="store_true", help="print the report as JSON instead of a markdown table")
    args = ap.parse_args()

    if args.prompts and Path(args.prompts).is_file():
        prompts = json.loads(Path(args.prompts).read_text())
    else:
        prompts = render_prompts(args.n, args.seed)
        if args.prompts:
            Path(args.prompts).parent.mkdir(parents=True, exist_ok=True)
            Path(args.prompts).write_text(json.dumps(prompts))
    names = [x for x in args.runtimes.split(",") if x]
    res: dict[str, dict] = {}
    versions: dict[str, str] = {}
    if names:
        rts, versions = build_runtimes(names, args.onnx_dir)
        from agent.prompts import DIAGNOSIS_PREFIX

        for rt in rts.values():  # warm-up (first-call allocations, lazy graph optimisation)
            rt.score_continuations(prompts[0]["conversation"], DIAGNOSIS_PREFIX, prompts[0]["names"])
        t0 = time.perf_counter()
        res = run_all(rts, prompts, summary=not args.no_summary)
        print(f"{', '.join(rts)}: {time.perf_counter() - t0:.1f} s for {len(prompts)} prompts", file=sys.stderr)
    for path in args.scores_in:
        earlier = json.loads(Path(path).read_text())
        versions = {**earlier.get("versions", {}), **versions}
        for name, r in earlier["results"].items():
            res.setdefault(name, r)
    if args.scores_out:
        Path(args.scores_out).write_text(json.dumps({"versions": versions, "results": res}))
    order = [n for n in ALL_RUNTIMES if n in res]
    rep = report(prompts, {n: res[n] for n in order}, versions)
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        print_markdown(rep)


if __name__ == "__main__":
    main()
