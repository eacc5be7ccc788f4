"""Zero-shot candidate-list classification: answer matching, the protocol with a VLM double and the
cache, and the protocol end to end on a tiny random LLaVA."""

import json

import numpy as np
import pytest
from PIL import Image

from agent.testing import ColourVLM
from evals.answers import MMSKIN_PROMPT, format_prompt, match_candidate
from evals.base import EvalCase
from evals.protocols import zero_shot
from evals.testing import DictStore, make_ctx
from models.backends import BACKENDS

HAM = {"mel": "melanoma", "nv": "melanocytic nevus", "bkl": "benign keratosis",
       "akiec": "actinic keratosis / intraepithelial carcinoma", "bcc": "basal cell carcinoma"}  # fmt: skip


# --------------------------------------------------------------------------- matching


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Melanoma", "mel"),
        ("The diagnosis is MELANOMA.", "mel"),
        ("melanocytic nevus", "nv"),  # the longer name is not also a mention of something else
        ("Basal-cell carcinoma", "bcc"),  # hyphen reads as a space
        ("actinic keratosis", "akiec"),  # one half of a composite display name
        ("intraepithelial carcinoma", "akiec"),
        ("a benign keratosis", "bkl"),
        ("mel", "mel"),  # the label code itself
        ("melanomas everywhere", None),  # whole words only
        ("nonmelanoma skin cancer", None),
        ("melanoma or melanocytic nevus", None),  # two different labels: ambiguous
        ("melanoma, likely melanoma", "mel"),  # repeated, same label
        ("", None),
        ("I cannot tell.", None),
    ],
)
def test_match_candidate(answer, expected):
    assert match_candidate(answer, HAM) == expected


def test_match_candidate_aliases_and_longest_match():
    cands = {"nv": "nevus", "bnv": "blue nevus", "mel": "melanoma"}
    # "blue nevus" overlaps "nevus": the longest name wins instead of the answer being ambiguous.
    assert match_candidate("It is a blue nevus.", cands) == "bnv"
    assert match_candidate("It is a nevus.", cands) == "nv"
    aliases = {"mel": ["malignant melanoma", "MM"], "nv": ["mole"]}
    assert match_candidate("Probably a mole", cands, aliases) == "nv"
    assert match_candidate("looks like MM", cands, aliases) == "mel"
    assert match_candidate("malignant melanoma", cands, aliases) == "mel"
    assert match_candidate("a mole, or melanoma", cands, aliases) is None
    # A plain list of labels: the labels are the names.
    assert match_candidate("Dermatofibroma", ["dermatofibroma", "melanoma"]) == "dermatofibroma"


def test_prompt_is_mmskin():
    prompt = format_prompt(["melanoma", "melanocytic nevus"])
    assert prompt == (
        "This is a skin lesion image. From the following categories: melanoma, melanocytic nevus, which one is the diagnosis?"
    )
    assert "{candidates}" in MMSKIN_PROMPT


# --------------------------------------------------------------------------- protocol with a double


def _colour_cases(tmp_path):
    colours = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
    spec = [("red", "mel"), ("red", "mel"), ("red", "nv"), ("blue", "nv"), ("blue", "nv"), ("green", "mel"), ("green", "nv")]
    cases = []
    for i, (colour, label) in enumerate(spec):
        # Same colour, different bytes: each image is its own cache entry.
        arr = np.full((16, 16, 3), colours[colour], np.uint8)
        arr[0, 0] = (i, i, i)
        path = tmp_path / f"img{i}.png"
        Image.fromarray(arr).save(path)
        cases.append(EvalCase(id=f"c{i}", image=path, label=label))
    return cases


@pytest.fixture
def colour_vlm(monkeypatch):
    monkeypatch.setitem(BACKENDS["vlm"], "colour-double", "agent.testing:ColourVLM")
    ColourVLM.calls.clear()
    answers = {"red": "This is a melanoma.", "blue": "Melanocytic nevus", "green": "melanoma or melanocytic nevus"}
    return {"backend": "colour-double", "options": {"answers": answers}}


def test_protocol_scores_answers_and_uses_cache(tmp_path, colour_vlm):
    cases = _colour_cases(tmp_path)
    store = DictStore()
    opts = {"vlm": colour_vlm, "batch_size": 3, "n_bootstrap": 200}
    ctx = make_ctx("zero_shot", cases, tmp_path / "out", opts, store, labels=["mel", "nv"])
    res = zero_shot.run(ctx)

    # red→mel, blue→nv, green→ambiguous (invalid): correct on c0, c1, c3, c4 of 7.
    m = res.metrics
    assert m["accuracy"]["value"] == pytest.approx(4 / 7, abs=1e-4)
    assert m["invalid_rate"]["value"] == pytest.approx(2 / 7, abs=1e-4)
    # recall mel 2/3, nv 2/4; precision mel 2/3 (c2 is nv), nv 2/2.
    assert m["balanced_accuracy"]["value"] == pytest.approx((2 / 3 + 2 / 4) / 2, abs=1e-4)
    assert m["macro_precision"]["value"] == pytest.approx((2 / 3 + 1) / 2, abs=1e-4)
    lo, hi = m["accuracy"]["ci95"]
    assert 0 <= lo <= m["accuracy"]["value"] <= hi <= 1
    assert res.n_cases == 7
    # The prompt lists the readable names of the benchmark's labels, in order.
    assert ColourVLM.calls[0]["prompts"][0] == format_prompt(["melanoma", "melanocytic nevus"])
    assert [c["n"] for c in ColourVLM.calls] == [3, 3, 1]
    lines = [json.loads(x) for x in (tmp_path / "out" / "zero_shot_predictions.jsonl").read_text().splitlines()]
    assert [x["matched"] for x in lines] == ["mel", "mel", "mel", "nv", "nv", None, None]
    assert res.plots["Confusion matrix"].stat().st_size > 0
    assert res.metrics["confusion"]["labels"] == ["mel", "nv", "(invalid)"]
    assert res.metrics["confusion"]["matrix"][:2] == [[2, 0, 1], [1, 2, 1]]

    # Re-scoring with the same configuration never calls the VLM again, and gives the same numbers.
    ColourVLM.calls.clear()
    again = zero_shot.run(make_ctx("zero_shot", cases, tmp_path / "out2", opts, store, labels=["mel", "nv"]))
    assert ColourVLM.calls == []
    assert again.metrics["accuracy"] == m["accuracy"]
    # A different generation setting is a different configuration: asked again.
    zero_shot.run(make_ctx("zero_shot", cases, tmp_path / "out3", {**opts, "max_new_tokens": 5}, store, labels=["mel", "nv"]))
    assert sum(c["n"] for c in ColourVLM.calls) == 7


def test_protocol_options_are_validated(tmp_path, colour_vlm):
    cases = _colour_cases(tmp_path)
    with pytest.raises(ValueError, match="max_new_tok"):
        zero_shot.run(make_ctx("zero_shot", cases, tmp_path, {"vlm": colour_vlm, "max_new_tok": 3}, labels=["mel", "nv"]))
    with pytest.raises(ValueError, match="vlm"):
        zero_shot.run(make_ctx("zero_shot", cases, tmp_path, {}, labels=["mel", "nv"]))
    with pytest.raises(ValueError, match="not among the candidates"):
        zero_shot.run(make_ctx("zero_shot", cases, tmp_path, {"vlm": colour_vlm, "candidates": ["mel"]}, labels=["mel", "nv"]))


def test_protocol_uses_benchmark_aliases_and_custom_candidates(tmp_path, colour_vlm):
    cases = _colour_cases(tmp_path)
    colour_vlm["options"]["answers"] = {"red": "a mole", "blue": "a mole", "green": "cancer"}
    opts = {"vlm": colour_vlm, "candidates": {"mel": "skin cancer", "nv": "benign mole"}, "n_bootstrap": 0}
    ctx = make_ctx("zero_shot", cases, tmp_path, opts, labels=["mel", "nv"], aliases={"nv": ["mole"], "mel": ["cancer"]})
    res = zero_shot.run(ctx)
    assert ColourVLM.calls[0]["prompts"][0].endswith("categories: skin cancer, benign mole, which one is the diagnosis?")
    # red/blue → nv, green → mel: correct on c2, c3, c4, c5.
    assert res.metrics["accuracy"]["value"] == pytest.approx(4 / 7, abs=1e-4)
    assert res.metrics["invalid_rate"]["value"] == 0
    assert res.metrics["invalid_rate"]["ci95"] is None  # n_bootstrap=0: no interval


# --------------------------------------------------------------------------- tiny random LLaVA


def test_protocol_runs_a_real_transformers_vlm(tmp_path):
    from agent.testing import build_tiny_llava

    path = build_tiny_llava(tmp_path / "tiny-llava")
    cases = _colour_cases(tmp_path)[:4]
    store = DictStore()
    opts = {"vlm": {"backend": "transformers", "model": str(path), "options": {"max_batch_size": 2}},
            "max_new_tokens": 4, "n_bootstrap": 50}  # fmt: skip
    res = zero_shot.run(make_ctx("zero_shot", cases, tmp_path / "out", opts, store, labels=["mel", "nv"]))
    # Random weights answer gibberish: whatever it says is matched or counted invalid, never crashes.
    m = res.metrics
    assert m["n"] == 4 and 0 <= m["invalid_rate"]["value"] <= 1
    assert m["accuracy"]["value"] <= 1 - m["invalid_rate"]["value"] + 1e-9
    assert len(store.data) == 4 and all(isinstance(r["answer"], str) for r in store.data.values())
    # Cached answers are reused byte for byte.
    again = zero_shot.run(make_ctx("zero_shot", cases, tmp_path / "out2", opts, store, labels=["mel", "nv"]))
    assert again.metrics["accuracy"] == m["accuracy"] and len(store.data) == 4


def test_feature_reading_vlm_gets_classifier_outputs(tmp_path, monkeypatch):
    """A VLM that declares ``needs_features`` is given the lesion classifier's features and probabilities."""
    from models.protocols import ClassifierOutput

    class StubClassifier:
        def __init__(self, *a, **k):
            pass

        def predict(self, images, metadata=None):
            n = len(images)
            return ClassifierOutput(probs=np.full((n, 7), 1 / 7), features=np.zeros((n, 16)), labels=tuple("abcdefg"))

    monkeypatch.setattr("models.sklesion.SklesionClassifier", StubClassifier)
    monkeypatch.setitem(BACKENDS["vlm"], "feature-double", "agent.testing:FeatureReadingVLM")
    ColourVLM.calls.clear()
    cases = _colour_cases(tmp_path)[:3]
    res = zero_shot.run(make_ctx("zero_shot", cases, tmp_path / "out", {"vlm": {"backend": "feature-double"}, "n_bootstrap": 0}, labels=["mel", "nv"]))
    assert ColourVLM.calls == [{"n": 3, "features": (3, 16), "probs": (3, 7)}]
    assert res.metrics["accuracy"]["value"] == pytest.approx(2 / 3, abs=1e-4)


def test_shipped_benchmark_options_validate_and_vlm_is_required(tmp_path):
    from evals.benchmark import load_benchmark

    bench = load_benchmark("isic2018_val_zeroshot")
    opts = zero_shot.Options.model_validate({**bench.options, "vlm": {"backend": "transformers", "model": "x"}})
    assert list(opts.candidates) == bench.labels
    ctx = make_ctx("zero_shot", _colour_cases(tmp_path), tmp_path, dict(bench.options), labels=bench.labels)
    with pytest.raises(ValueError, match="needs a VLM"):
        zero_shot.run(ctx)
