"""Text metrics on known strings, and the VQA text protocol with an LLM double and the cache."""

import json

import numpy as np
import pytest
import sacrebleu

from agent.testing import EchoLLM
from evals.base import EvalCase
from evals.protocols import vqa_text
from evals.testing import DictStore, make_ctx
from evals.text_metrics import bertscore, corpus_bleu_from_items, meteor_wordnet, text_metrics, token_recall
from models.backends import BACKENDS


class WordEmbedder:
    """Token embeddings without a model: one fixed random unit vector per lower-cased word."""

    model_id = "word-vectors"

    def __init__(self, dim: int = 64):
        self.dim = dim
        self.table: dict[str, np.ndarray] = {}
        self.rng = np.random.default_rng(0)

    def _vec(self, w):
        if w not in self.table:
            v = self.rng.normal(size=self.dim)
            self.table[w] = v / np.linalg.norm(v)
        return self.table[w]

    def embed_tokens(self, texts):
        return [np.array([self._vec(w) for w in t.lower().split()]).reshape(-1, self.dim) for t in texts]


def test_identical_strings_score_perfectly():
    refs = ["The image shows a digital mucous cyst.", "No, the lesion is flat against the skin surface."]
    r = text_metrics(refs, refs, embedder=WordEmbedder(), bootstrap=0)
    c = r["corpus"]
    assert c["bleu4"]["value"] == pytest.approx(100.0)
    assert c["rouge_l"]["value"] == pytest.approx(1.0)
    assert c["token_recall"]["value"] == pytest.approx(1.0)
    assert c["bertscore_f1"]["value"] == pytest.approx(1.0, abs=1e-6)
    # METEOR's fragmentation penalty keeps an exact copy just under 1 (one chunk, 0.5 * (1/n)^3).
    assert c["meteor"]["value"] > 0.99
    assert r["n"] == 2 and len(r["items"]) == 2


def test_disjoint_strings_score_zero():
    r = text_metrics(["banana bread recipe"], ["basal cell carcinoma"], embedder=WordEmbedder(), bootstrap=0)
    it = r["items"][0]
    assert it["sentence_bleu4"] == pytest.approx(0.0, abs=1e-6)
    assert it["rouge_l"] == 0 and it["meteor"] == 0 and it["token_recall"] == 0
    assert abs(it["bertscore_f1"]) < 0.5  # random word vectors are nearly orthogonal
    # Empty predictions score 0 everywhere instead of failing.
    empty = text_metrics([""], ["a red papule"], embedder=WordEmbedder(), bootstrap=0)["items"][0]
    assert empty["meteor"] == 0 and empty["rouge_l"] == 0 and empty["bertscore_f1"] == 0 and empty["token_recall"] == 0


def test_known_values():
    # ROUGE-L: LCS "red plaque" (2) of 2 and 4 words → P 1, R 0.5, F 2/3.
    r = text_metrics(["red plaque"], ["a red scaly plaque"], bootstrap=0)
    assert r["items"][0]["rouge_l"] == pytest.approx(2 / 3)
    # Token recall over the reference's content words {red, scaly, plaque}.
    assert token_recall("red plaque", "a red scaly plaque") == pytest.approx(2 / 3)
    assert token_recall("Plaques, red.", "a red scaly plaque") == pytest.approx(1 / 3)  # exact words, no stemming
    # METEOR without WordNet still matches Porter stems ("lesions" ~ "lesion").
    stems = text_metrics(["pigmented lesions"], ["pigmented lesion"], bootstrap=0)["items"][0]["meteor"]
    assert stems > 0.9
    _, how = meteor_wordnet()
    assert how == "wordnet" or how.startswith("none")


def test_corpus_bleu_matches_sacrebleu():
    preds = ["The lesion is a nevus.", "Basal cell carcinoma on the nose", "It is flat.", ""]
    refs = ["The lesion is a melanocytic nevus.", "A basal cell carcinoma of the nose.", "No, it is flat.", "Dermatofibroma."]
    r = text_metrics(preds, refs, bootstrap=200)
    expected = sacrebleu.corpus_bleu(preds, [refs]).score
    assert r["corpus"]["bleu4"]["value"] == pytest.approx(expected, abs=0.01)
    assert corpus_bleu_from_items(r["items"]) == pytest.approx(expected)
    lo, hi = r["corpus"]["bleu4"]["ci95"]
    assert 0 <= lo <= hi <= 100
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        text_metrics(["a", "b"], ["a"])


def test_bertscore_greedy_matching():
    e = np.eye(3)
    # Prediction tokens {0, 1}, reference {0, 2}: each side matches one of two tokens exactly.
    p, r, f = bertscore(e[[0, 1]], e[[0, 2]])
    assert (p, r, f) == (0.5, 0.5, 0.5)
    p, r, f = bertscore(e[[0]], e[[0, 1]])  # precise but incomplete
    assert p == 1.0 and r == 0.5 and f == pytest.approx(2 / 3)
    assert bertscore(np.zeros((0, 3)), e) == (0.0, 0.0, 0.0)


@pytest.mark.weights
def test_minilm_token_embeddings():
    from evals.text_metrics import HFTokenEmbedder

    emb = HFTokenEmbedder("all-minilm-l6-v2")
    same = text_metrics(["A red scaly plaque."], ["A red scaly plaque."], embedder=emb, bootstrap=0)["items"][0]
    near = text_metrics(["A red scaly plaque."], ["Psoriasis shows red scaly plaques."], embedder=emb, bootstrap=0)["items"][0]
    far = text_metrics(["Banana bread recipe."], ["Psoriasis shows red scaly plaques."], embedder=emb, bootstrap=0)["items"][0]
    assert same["bertscore_f1"] == pytest.approx(1.0, abs=1e-5)
    assert same["bertscore_f1"] > near["bertscore_f1"] > far["bertscore_f1"]
    # Special tokens are dropped: one row per word piece of the text.
    (tokens,) = emb.embed_tokens(["red plaque"])
    assert tokens.shape == (2, 384)
    assert np.allclose(np.linalg.norm(tokens, axis=1), 1.0, atol=1e-5)


# --------------------------------------------------------------------------- protocol


QA = [
    ("What does the image show?", "The image shows a digital mucous cyst."),
    ("Is the lesion raised above the skin surface?", "No, the lesion is flat against the skin surface."),
    ("What does the image show?", "The image shows psoriasis."),
    ("What colour is the lesion?", "The lesion is red."),
    ("Where is the lesion?", "On the back."),
]


@pytest.fixture
def echo_llm(monkeypatch):
    monkeypatch.setitem(BACKENDS["llm"], "echo-double", "agent.testing:EchoLLM")
    EchoLLM.log.clear()
    return {"backend": "echo-double", "options": {"replies": {"What colour is the lesion?": "The lesion is red."}}}


def _qa_cases():
    return [EvalCase(id=str(i), image=None, question=q, answer=a) for i, (q, a) in enumerate(QA)]


def test_protocol_generates_once_and_scores(tmp_path, echo_llm):
    store = DictStore()
    opts = {"llm": echo_llm, "token_encoder": None, "n_bootstrap": 100, "batch_size": 2, "system_prompt": "Be brief."}
    res = vqa_text.run(make_ctx("vqa_text", _qa_cases(), tmp_path / "out", opts, store))
    # The repeated question is asked once; 4 distinct questions in batches of 2.
    asked = [conv for call in EchoLLM.log for conv in call]
    assert len(asked) == 4 and [len(call) for call in EchoLLM.log] == [2, 2]
    assert asked[0][0] == {"role": "system", "content": "Be brief."} and asked[0][1]["role"] == "user"
    m = res.metrics
    assert m["n"] == 5 and "bertscore_f1" not in m
    for name in ("bleu4", "meteor", "rouge_l", "token_recall"):
        assert m[name]["value"] is not None and m[name]["ci95"] is not None
    rows = [json.loads(x) for x in (tmp_path / "out" / "vqa_text_predictions.jsonl").read_text().splitlines()]
    exact = next(r for r in rows if r["question"] == "What colour is the lesion?")
    assert exact["rouge_l"] == 1.0 and exact["answer"] == "The lesion is red."
    assert rows[0]["answer"] == rows[2]["answer"] == "Answer: What does the image show?"
    assert any("Text-only" in n for n in res.notes)

    # Re-scoring: no LLM call at all, same numbers; a different system prompt is another configuration.
    EchoLLM.log.clear()
    again = vqa_text.run(make_ctx("vqa_text", _qa_cases(), tmp_path / "out2", opts, store))
    assert EchoLLM.log == [] and again.metrics["rouge_l"] == m["rouge_l"]
    vqa_text.run(make_ctx("vqa_text", _qa_cases(), tmp_path / "out3", {**opts, "system_prompt": None}, store))
    assert len(EchoLLM.log[0][0]) == 1  # no system message


def test_protocol_samples_with_a_seed(tmp_path, echo_llm):
    opts = {"llm": echo_llm, "token_encoder": None, "n_bootstrap": 0, "limit": 3, "seed": 7}
    a = vqa_text.run(make_ctx("vqa_text", _qa_cases(), tmp_path / "a", opts))
    b = vqa_text.run(make_ctx("vqa_text", _qa_cases(), tmp_path / "b", opts))
    ids = lambda d: [json.loads(x)["id"] for x in (d / "vqa_text_predictions.jsonl").read_text().splitlines()]  # noqa: E731
    assert a.metrics["n"] == 3 and ids(tmp_path / "a") == ids(tmp_path / "b")
    assert ids(tmp_path / "a") == sorted(ids(tmp_path / "a"), key=int)  # kept in file order
    assert a.metrics["sample"] == {"limit": 3, "seed": 7, "of": 5}


def test_protocol_rescore_and_option_errors(tmp_path, echo_llm):
    from evals.predictions import MissingPredictions

    opts = {"llm": echo_llm, "token_encoder": None, "n_bootstrap": 0}
    ctx = make_ctx("vqa_text", _qa_cases(), tmp_path, opts)
    ctx.rescore = True
    with pytest.raises(MissingPredictions):
        vqa_text.run(ctx)
    # Answers cached for the first two questions cover cases 0, 1 and 2 (case 2 repeats question 0).
    store = DictStore()
    vqa_text.run(make_ctx("vqa_text", _qa_cases()[:2], tmp_path / "a", opts, store))
    EchoLLM.log.clear()
    ctx = make_ctx("vqa_text", _qa_cases(), tmp_path / "b", {**opts, "allow_partial": True}, store)
    ctx.rescore = True
    res = vqa_text.run(ctx)
    assert EchoLLM.log == [] and res.metrics["n"] == 3
    with pytest.raises(ValueError, match="max_tokens"):
        vqa_text.run(make_ctx("vqa_text", _qa_cases(), tmp_path, {**opts, "max_tokens": 5}))
    with pytest.raises(ValueError, match="question and an answer"):
        vqa_text.run(make_ctx("vqa_text", [EvalCase(id="x", image=None, question="q")], tmp_path, opts))


def test_shipped_benchmark_options_validate():
    from evals.benchmark import load_benchmark

    bench = load_benchmark("mmskin_vqa")
    opts = vqa_text.Options.model_validate(bench.options)
    assert bench.task == "vqa_text" and opts.llm.model == "smollm2-135m-instruct" and opts.token_encoder == "all-minilm-l6-v2"


def test_scores_come_from_the_records_alone(tmp_path, echo_llm):
    """predict / score_predictions: answers edited to the references score (nearly: the repeated question shares one
    record, so one of its two references wins) ROUGE-L 1, with no LLM call."""
    opts = {"llm": echo_llm, "token_encoder": None, "n_bootstrap": 0, "batch_size": 2}
    ctx = make_ctx("vqa_text", _qa_cases(), tmp_path / "out", opts, DictStore())
    preds = vqa_text.predict(ctx)
    assert len(preds.records) == len(QA) and preds.stats["computed"] == 4
    EchoLLM.log.clear()
    for rec, case in zip(preds.records, _qa_cases()):
        rec["answer"] = case.answer
    res = vqa_text.score_predictions(ctx, preds)
    assert EchoLLM.log == [] and res.metrics["rouge_l"]["value"] > 0.9 > vqa_text.run(ctx).metrics["rouge_l"]["value"]
