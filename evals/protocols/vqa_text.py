"""Text metrics for an answer-generating LLM on question-answer pairs (e.g. MM-Skin's QA text).

Each question is sent to the LLM as a chat (optional system prompt + the question); the greedy
answer is compared with the reference by :func:`evals.text_metrics.text_metrics` (BLEU-4, METEOR,
ROUGE-L, BERTScore-style F1, token recall). Answers are cached per question (sha256 of its text)
and configuration. The benchmark is text-only: MM-Skin's images are not available, so questions
about "the image" are answered without it and the scores measure textbook-style answering only.

Options (``options:`` in the benchmark YAML, or ``--opt``):

- ``llm``: ``{backend, model, options}`` from the ``llm`` registry in ``models.backends``
  (default ``{backend: transformers, model: smollm2-135m-instruct}``; also ``openai-compatible``, ``vllm``).
- ``system_prompt``: the system message (null: none). ``max_new_tokens`` (64).
- ``limit`` (null: every pair) and ``seed`` (0): a seeded random sample of ``limit`` pairs, kept in
  file order; the seed also drives the bootstrap.
- ``batch_size`` (8 conversations per ``chat`` call).
- ``token_encoder``: registry id or folder of the encoder for the BERTScore-style F1 (default
  ``all-minilm-l6-v2``; null: leave it out). ``device`` for it (``cpu``).
- ``n_bootstrap`` (1000 resamples for the 95% CIs; 0 = none).
- ``allow_partial`` (false): with ``--rescore`` (no LLM is loaded), score only the cached answers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from evals.base import Predictions, ProtocolContext, ProtocolResult
from evals.fill import cached_map
from evals.protocols.common import BackendSpec, config_hash, sha256_text
from evals.text_metrics import DEFAULT_TOKEN_ENCODER

DEFAULT_SYSTEM_PROMPT = "You are a dermatology assistant. Answer the question in one or two short sentences."

HEADLINE = ("bleu4", "meteor", "rouge_l", "bertscore_f1", "token_recall")


class Options(BaseModel):
    """VQA text-metric protocol options (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    llm: BackendSpec = Field(default_factory=lambda: BackendSpec(backend="transformers", model="smollm2-135m-instruct"))
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    max_new_tokens: int = Field(64, ge=1)
    limit: int | None = Field(None, ge=1, description="Score a seeded random sample of this many pairs.")
    seed: int = 0
    batch_size: int = Field(8, ge=1)
    token_encoder: str | None = DEFAULT_TOKEN_ENCODER
    device: str = "cpu"
    n_bootstrap: int = Field(1000, ge=0)
    allow_partial: bool = Field(False, description="With --rescore: score only the pairs with a cached answer.")


def _sample(n: int, limit: int | None, seed: int) -> list[int]:
    import numpy as np

    if limit is None or limit >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, size=limit, replace=False).tolist())


def run(ctx: ProtocolContext) -> ProtocolResult:
    """Generate (or read cached) answers, score them against the references, report."""
    return score_predictions(ctx, predict(ctx))


def load(ctx: ProtocolContext) -> tuple[Options, list[Any], int]:
    """(options, the sampled question-answer cases, how many usable pairs there were)."""
    opts = Options.model_validate(ctx.options)
    usable = [c for c in ctx.cases if c.question and c.answer]
    if not usable:
        raise ValueError(f"{ctx.bench.name}: no case has both a question and an answer")
    return opts, [usable[i] for i in _sample(len(usable), opts.limit, opts.seed)], len(usable)


def predict(ctx: ProtocolContext) -> Predictions:
    """The LLM's answer to each sampled question (cached; a repeated question is asked once)."""
    from evals.cache import case_key

    opts, cases, n_usable = load(ctx)
    cfg = config_hash({"llm": opts.llm.model_dump(), "system_prompt": opts.system_prompt, "max_new_tokens": opts.max_new_tokens})
    keys = [case_key(sha256_text(c.question), cfg, kind="vqa_text") for c in cases]
    case_of = {}
    for k, c in zip(keys, cases):
        case_of.setdefault(k, c)  # identical questions (MM-Skin repeats "What does the image show?") are asked once
    backend: dict[str, Any] = {}

    def prepare(missing: int, todo: int) -> None:
        backend["llm"] = llm = opts.llm.create("llm")
        ctx.log(f"vqa_text: {len(cases)} of {n_usable} pairs, {len(cases) - missing} cached, {todo} distinct questions to ask {llm.model_id}")

    def ask(chunk: list[str]) -> list[dict[str, Any]]:
        llm = backend["llm"]
        sys = [{"role": "system", "content": opts.system_prompt}] if opts.system_prompt else []
        out = llm.chat([[*sys, {"role": "user", "content": case_of[k].question}] for k in chunk], max_new_tokens=opts.max_new_tokens, temperature=0.0)
        return [{"kind": "vqa_text", "case_id": case_of[k].id, "status": "ok", "answer": text.strip(), "model_id": llm.model_id, "question": case_of[k].question}
                for k, text in zip(chunk, out)]  # fmt: skip

    filled = cached_map(ctx, keys, ask, what="vqa_text", batch_size=opts.batch_size, allow_partial=opts.allow_partial, prepare=prepare)
    model_id = backend["llm"].model_id if "llm" in backend else f"{opts.llm.backend}:{opts.llm.model or ''}".rstrip(":")
    return Predictions([filled.records.get(k) for k in keys], {"missing": filled.missing, "computed": filled.computed, "seconds": filled.seconds, "model_id": model_id})


def score_predictions(ctx: ProtocolContext, predictions: Predictions) -> ProtocolResult:
    """Text metrics of the answers against the references (no LLM; the token encoder of BERTScore-style F1 runs)."""
    from evals.classification import fmt
    from evals.report import md_table
    from evals.text_metrics import HFTokenEmbedder, text_metrics

    opts, cases, n_usable = load(ctx)
    keep = [i for i, r in enumerate(predictions.records) if r is not None]
    cases = [cases[i] for i in keep]
    answers = [predictions.records[i]["answer"] for i in keep]
    stats = predictions.stats
    n_cached = len(cases) - stats.get("missing", 0)
    model_id = stats.get("model_id", f"{opts.llm.backend}:{opts.llm.model or ''}".rstrip(":"))
    filled_computed, filled_seconds = stats.get("computed", 0), stats.get("seconds", 0.0)

    embedder = HFTokenEmbedder(opts.token_encoder, device=opts.device) if opts.token_encoder else None
    ctx.log("vqa_text: scoring")
    scored = text_metrics(answers, [c.answer for c in cases], embedder=embedder, bootstrap=opts.n_bootstrap, seed=opts.seed)
    corpus = scored["corpus"]
    metrics: dict[str, Any] = {
        "n": len(cases),
        "llm": opts.llm.model_dump(),
        **corpus,
        "meteor_synonyms": scored["meteor_synonyms"],
        "bertscore_model": scored["bertscore_model"],
        "sample": {"limit": opts.limit, "seed": opts.seed, "of": n_usable},
        "mean_answer_words": round(sum(len((a or "").split()) for a in answers) / len(answers), 2),
        "mean_reference_words": round(sum(len(c.answer.split()) for c in cases) / len(cases), 2),
    }

    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    with open(ctx.out_dir / "vqa_text_predictions.jsonl", "w", encoding="utf-8") as f:
        for c, a, it in zip(cases, answers, scored["items"]):
            f.write(json.dumps({"id": c.id, "question": c.question, "reference": c.answer, "answer": a,
                                **{k: v for k, v in it.items() if not k.startswith("bleu_")}}) + "\n")  # fmt: skip
    rows = [[k + (" (0-100)" if k == "bleu4" else ""), fmt(corpus[k], 2 if k == "bleu4" else 3)] for k in HEADLINE if k in corpus]
    rows.append(["sentence BLEU-4, mean (0-100)", fmt(corpus["sentence_bleu4"], 2)])
    examples = [[c.question, c.answer, a] for c, a in list(zip(cases, answers))[:5]]
    tables = {
        "Text metrics": md_table(["metric", "value [95% CI]"], rows),
        "Examples": md_table(["question", "reference", "answer"], examples),
    }
    plots = {"Per-item scores": _plot_items(scored["items"], ctx.out_dir / "plots" / "vqa_text_scores.png")}
    notes = [
        f"Text-only: the benchmark's images are not available; {model_id} ({opts.llm.backend}) answered each question "
        f"without the image (greedy, max {opts.max_new_tokens} new tokens, system prompt {opts.system_prompt!r}).",
        f"{len(cases)} pairs" + (f" sampled from {n_usable} with seed {opts.seed}" if len(cases) < n_usable else "")
        + f"; {n_cached} answers from the cache, {filled_computed} distinct questions generated this run (a repeated question is asked once).",
        "BLEU-4: sacrebleu corpus BLEU (13a, case-sensitive). ROUGE-L: rouge_score F with stemming. "
        f"METEOR: nltk, synonym matching: {scored['meteor_synonyms']}.",
    ]
    if embedder is not None:
        notes.append(f"BERTScore-style F1: greedy cosine matching of {embedder.model_id} last-layer token embeddings, "
                     "no idf, no baseline rescaling (not comparable with published BERTScore numbers).")  # fmt: skip
    if filled_computed:
        notes.append(f"Generation throughput: {filled_computed / max(filled_seconds, 1e-9):.2f} questions/s.")
    return ProtocolResult(metrics=metrics, tables=tables, plots=plots, n_cases=len(cases), notes=notes)


def _plot_items(items: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("rouge_l", "meteor", "bertscore_f1", "token_recall") if items and n in items[0]]
    fig, axes = plt.subplots(1, len(names), figsize=(3 * len(names), 2.6), squeeze=False)
    for ax, n in zip(axes[0], names):
        ax.hist([it[n] for it in items if it[n] == it[n]], bins=20, range=(0, 1))
        ax.set_title(n)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
