"""Text metrics for generated answers against reference answers.

- BLEU-4: sacrebleu (13a tokenisation, case-sensitive, exponential smoothing), corpus-level, on a
  0-100 scale; the per-item sentence BLEU (effective order) is reported too.
- METEOR: ``nltk.translate.meteor_score`` on lower-cased ``wordpunct`` tokens. Its synonym stage
  needs NLTK's WordNet corpus, which is used when installed in NLTK's data path; otherwise METEOR
  runs with exact + Porter-stem matching only (``meteor_synonyms`` in the result says which).
- ROUGE-L: ``rouge_score`` F-measure with Porter stemming.
- BERTScore-style F1: greedy cosine matching of contextual token embeddings (BERTScore's
  precision/recall/F1, no idf weighting, no baseline rescaling) from a local encoder, by default
  all-MiniLM-L6-v2's last layer. Identical texts score 1; unrelated texts do *not* score 0 (raw
  cosines of contextual embeddings are positive), so compare systems, not absolute values.
- Token recall: the share of the reference's distinct content words (lower-cased, without
  scikit-learn's English stop words) that appear in the prediction.

All 0-1 except BLEU (0-100). Corpus values are means of the per-item scores, except BLEU-4, which
sums n-gram statistics over the corpus as sacrebleu does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

DEFAULT_TOKEN_ENCODER = "all-minilm-l6-v2"


class TokenEmbedder(Protocol):
    model_id: str

    def embed_tokens(self, texts: Sequence[str]) -> list[np.ndarray]:
        """One (n_tokens, dim) array of L2-normalised contextual token embeddings per text."""
        ...


class HFTokenEmbedder:
    """Contextual token embeddings (last hidden layer, special tokens dropped, L2-normalised) from a
    transformers encoder given as a registry id (e.g. ``all-minilm-l6-v2``), source URI or local folder."""

    def __init__(self, model: str = DEFAULT_TOKEN_ENCODER, device: str = "cpu", batch_size: int = 32, max_length: int = 256) -> None:
        self.model_id = model
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length
        self._model: Any = None
        self._tokenizer: Any = None

    def _load(self) -> None:
        if self._model is not None:
            return
        from pathlib import Path

        from transformers import AutoModel, AutoTokenizer

        from models.backends.hf_llm import dtype_kwargs

        path = Path(self.model_id).expanduser()
        if not path.exists():
            from models.resolve import resolve

            path = resolve(self.model_id)
        self._tokenizer = AutoTokenizer.from_pretrained(str(path))
        self._model = AutoModel.from_pretrained(str(path), **dtype_kwargs("float32")).to(self.device).eval()

    def embed_tokens(self, texts: Sequence[str]) -> list[np.ndarray]:
        self._load()
        import torch

        tok, model = self._tokenizer, self._model
        out: list[np.ndarray] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                chunk = list(texts[start : start + self.batch_size])
                enc = tok(chunk, padding=True, truncation=True, max_length=self.max_length,
                          return_tensors="pt", return_special_tokens_mask=True)  # fmt: skip
                special = enc.pop("special_tokens_mask").bool()
                enc = {k: v.to(self.device) for k, v in enc.items()}
                hidden = torch.nn.functional.normalize(model(**enc).last_hidden_state.float(), dim=-1).cpu()
                keep = enc["attention_mask"].cpu().bool() & ~special
                out.extend(hidden[r][keep[r]].numpy() for r in range(len(chunk)))
        return out


def bertscore(pred_emb: np.ndarray, ref_emb: np.ndarray) -> tuple[float, float, float]:
    """(precision, recall, F1) by greedy cosine matching of unit-norm token embeddings; 0 if either is empty."""
    if len(pred_emb) == 0 or len(ref_emb) == 0:
        return 0.0, 0.0, 0.0
    sim = pred_emb @ ref_emb.T
    p, r = float(sim.max(axis=1).mean()), float(sim.max(axis=0).mean())
    return p, r, (2 * p * r / (p + r) if p + r > 0 else 0.0)


class _NoSynonyms:
    """Stands in for NLTK's WordNet reader (its ``wordnet=`` argument) where the corpus is not
    installed: no synsets, so METEOR matches exact words and Porter stems only."""

    def synsets(self, word: str, *args: Any, **kwargs: Any) -> list:
        return []


def meteor_wordnet() -> tuple[Any, str]:
    """(reader for ``meteor_score(wordnet=...)``, description): NLTK's WordNet if installed, else none."""
    import nltk

    for name in ("corpora/wordnet", "corpora/wordnet.zip"):
        try:
            nltk.data.find(name)
        except LookupError:
            continue
        from nltk.corpus import wordnet

        return wordnet, "wordnet"
    return _NoSynonyms(), "none (NLTK WordNet corpus not installed: exact + Porter-stem matching only)"


_WORD = re.compile(r"\w+")


def content_words(text: str) -> set[str]:
    """Distinct lower-cased word tokens that are not English stop words (all words if none is left)."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    words = set(_WORD.findall(text.lower()))
    content = words - ENGLISH_STOP_WORDS
    return content or words


def token_recall(prediction: str, reference: str) -> float:
    """Share of the reference's content words present in the prediction (NaN for an empty reference)."""
    ref = content_words(reference)
    if not ref:
        return float("nan")
    return len(ref & set(_WORD.findall(prediction.lower()))) / len(ref)


def corpus_bleu_from_items(items: Sequence[dict[str, Any]]) -> float:
    """Corpus BLEU-4 from per-item n-gram statistics (sacrebleu's corpus_bleu sums the same ones)."""
    from sacrebleu.metrics import BLEU

    if not len(items):
        return float("nan")
    correct = np.sum([it["bleu_counts"] for it in items], axis=0)
    total = np.sum([it["bleu_totals"] for it in items], axis=0)
    sys_len = sum(it["bleu_sys_len"] for it in items)
    ref_len = sum(it["bleu_ref_len"] for it in items)
    return float(BLEU.compute_bleu(correct.tolist(), total.tolist(), int(sys_len), int(ref_len), smooth_method="exp").score)


def text_metrics(
    predictions: Sequence[str],
    references: Sequence[str],
    embedder: TokenEmbedder | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-item scores and corpus values with bootstrap 95% CIs.

    ``embedder``: token embeddings for the BERTScore-style F1 (e.g. ``HFTokenEmbedder()``); None
    leaves it out. Returns ``{"n", "corpus": {metric: {"value", "ci95"}}, "items": [...],
    "meteor_synonyms", "bertscore_model"}``.

    >>> text_metrics(["a red papule"], ["a red papule"], bootstrap=0)["corpus"]["rouge_l"]["value"]
    1.0
    """
    from nltk.tokenize import wordpunct_tokenize
    from nltk.translate.meteor_score import single_meteor_score
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

    from evals.metrics import with_ci

    predictions = ["" if p is None else str(p) for p in predictions]
    references = [str(r) for r in references]
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    sent_bleu = BLEU(effective_order=True)
    rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    wordnet, synonyms = meteor_wordnet()
    items: list[dict[str, Any]] = []
    for pred, ref in zip(predictions, references):
        b = sent_bleu.sentence_score(pred, [ref])
        hyp_toks, ref_toks = wordpunct_tokenize(pred.lower()), wordpunct_tokenize(ref.lower())
        meteor = single_meteor_score(ref_toks, hyp_toks, wordnet=wordnet) if hyp_toks and ref_toks else 0.0
        items.append({
            "sentence_bleu4": float(b.score),
            "bleu_counts": list(b.counts), "bleu_totals": list(b.totals),
            "bleu_sys_len": int(b.sys_len), "bleu_ref_len": int(b.ref_len),
            "meteor": float(meteor),
            "rouge_l": float(rouge.score(ref, pred)["rougeL"].fmeasure),
            "token_recall": token_recall(pred, ref),
        })  # fmt: skip
    if embedder is not None:
        pe, re_ = embedder.embed_tokens(predictions), embedder.embed_tokens(references)
        for it, a, b in zip(items, pe, re_):
            it["bertscore_precision"], it["bertscore_recall"], it["bertscore_f1"] = bertscore(a, b)

    boot = {"n": bootstrap, "seed": seed}
    corpus: dict[str, Any] = {"bleu4": with_ci(lambda i: corpus_bleu_from_items([items[k] for k in i]), np.arange(len(items)), digits=2, **boot)}
    names = ["sentence_bleu4", "meteor", "rouge_l", "token_recall"]
    if embedder is not None:
        names += ["bertscore_f1", "bertscore_precision", "bertscore_recall"]
    for name in names:
        vals = np.array([it[name] for it in items], float)
        vals = vals[~np.isnan(vals)]
        corpus[name] = with_ci(np.mean, vals, digits=2 if name == "sentence_bleu4" else 4, **boot) if len(vals) else {"value": None}
    return {
        "n": len(items),
        "corpus": corpus,
        "items": items,
        "meteor_synonyms": synonyms,
        "bertscore_model": getattr(embedder, "model_id", None),
    }
