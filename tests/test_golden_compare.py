"""The golden comparison (scripts/make_golden.py): exact for labels, texts and structure, float noise tolerated."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("make_golden", Path(__file__).resolve().parent.parent / "scripts" / "make_golden.py")
golden = importlib.util.module_from_spec(spec)
spec.loader.exec_module(golden)


def test_float_noise_passes_and_every_behavioural_change_is_located():
    want = {"label": "bcc", "verdict": "accept", "probs": {"bcc": 0.6231, "bkl": 0.2}, "steps": [{"score": 1.2981393933296204}], "n": 3}
    noisy = {"label": "bcc", "verdict": "accept", "probs": {"bcc": 0.6232, "bkl": 0.2000001}, "steps": [{"score": 1.2981393337249756}], "n": 3}
    assert golden.first_difference(want, noisy) is None
    assert golden.first_difference(want, {**want, "label": "bkl"}) == "/label"
    assert golden.first_difference(want, {**want, "probs": {"bcc": 0.6251, "bkl": 0.2}}) == "/probs/bcc"
    assert golden.first_difference(want, {**want, "steps": []}) == "/steps (length 1 vs 0)"
    assert golden.first_difference(want, {**want, "n": 4}) == "/n"
    assert golden.first_difference(want, {**want, "n": True}) == "/n"  # a bool is not a number here
    assert golden.first_difference(want, {k: v for k, v in want.items() if k != "verdict"}) == "/{verdict}"
