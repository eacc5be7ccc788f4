from typing import Literal

import pytest
from pydantic import BaseModel, Field

from agent.testing import TestLLM
from models.structured import MalformedOutput, StructuredResult, extract_json, generate_structured, schema_hint


class Dx(BaseModel):
    diagnosis: Literal["mel", "nv", "bcc"]
    confidence: float = Field(ge=0, le=1)
    features: list[str] = []


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"a": 1}', {"a": 1}),
        ('  {"a": {"b": [1, 2.5, null, true]}}  ', {"a": {"b": [1, 2.5, None, True]}}),
        ('```json\n{"a": 1}\n```', {"a": 1}),
        ('```\n{"a": 1}\n```', {"a": 1}),
        ('Sure! Here is the JSON:\n```json\n{"a": "x"}\n```\nLet me know if you need more.', {"a": "x"}),
        ('The answer is {"dx": "mel", "p": 0.9}. Hope that helps!', {"dx": "mel", "p": 0.9}),
        ('{"a": [1, 2,], "b": 3,}', {"a": [1, 2], "b": 3}),
        ("{'a': 'single', 'b': ['x', 'y']}", {"a": "single", "b": ["x", "y"]}),
        ("{'flag': True, 'none': None, 'off': False}", {"flag": True, "none": None, "off": False}),
        ("{diagnosis: 'nv', confidence: 0.4}", {"diagnosis": "nv", "confidence": 0.4}),
        ('{"a": 1, // the first\n "b": 2 /* second */}', {"a": 1, "b": 2}),
        ('{"text": "don\'t stop", "n": -1.5e3}', {"text": "don't stop", "n": -1500.0}),
        ('{"text": "say \\"hi\\"\\n", "u": "\\u00e9"}', {"text": 'say "hi"\n', "u": "\u00e9"}),
        ('{"a": "line one\nline two"}', {"a": "line one\nline two"}),
        ('{"a": {"b": 1, "c": [1, 2', {"a": {"b": 1, "c": [1, 2]}}),
        ('{"a": 1, "b": [true, false],', {"a": 1, "b": [True, False]}),
        ('```json\n{"a": {"b": "x"}', {"a": {"b": "x"}}),
        ('I think {melanoma} fits. {"dx": "mel"}', {"dx": "mel"}),
        ('{"first": 1} and then {"second": 2}', {"first": 1}),
        ('{"brace in string": "a } b { c"}', {"brace in string": "a } b { c"}),
        ('{"nested": {\'mixed\': "quotes"}}', {"nested": {"mixed": "quotes"}}),
        ('{"a": 1}\n```', {"a": 1}),
    ],
)
def test_extract_json_tolerates(text, expected):
    assert extract_json(text) == expected


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "no JSON object"),
        ("no json here at all", "no JSON object"),
        ("[1, 2, 3]", "array"),
        ('{"a": "cut inside a str', "inside a string"),
        ('{"a": 1, "b"', "after key"),
        ('{"a": 1, "b":', "value was expected"),
        ('{"a" 1}', "expected ':'"),
        ('{"a": 1 "b": 2}', "expected ','"),
        ('{"a": @}', "unexpected"),
    ],
)
def test_extract_json_reports_reason(text, reason):
    with pytest.raises(MalformedOutput, match=reason):
        extract_json(text)


def test_extract_json_rejects_non_text():
    with pytest.raises(MalformedOutput):
        extract_json(None)  # type: ignore[arg-type]


def test_schema_hint_lists_fields():
    hint = schema_hint(Dx)
    assert '"diagnosis": one of "mel", "nv", "bcc"' in hint
    assert '"confidence": number' in hint
    assert '"features": array of string (optional)' in hint


def test_generate_structured_first_try():
    llm = TestLLM(['Here you go: {"diagnosis": "mel", "confidence": 0.8}'])
    res = generate_structured(llm, [{"role": "user", "content": "dx?"}], Dx, max_new_tokens=32)
    assert isinstance(res, StructuredResult) and res.ok
    assert res.value == Dx(diagnosis="mel", confidence=0.8)
    assert res.attempts == [{"raw": 'Here you go: {"diagnosis": "mel", "confidence": 0.8}', "error": None}]
    assert llm.calls[0]["kwargs"]["max_new_tokens"] == 32


def test_generate_structured_feeds_errors_back():
    llm = TestLLM(
        [
            "I am not sure.",  # no JSON at all
            '{"diagnosis": "melanoma", "confidence": 2}',  # schema violations
            '{"diagnosis": "bcc", "confidence": 0.6, "features": ["arborizing vessels"]}',
        ]
    )
    conv = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "dx?"}]
    res = generate_structured(llm, conv, Dx, retries=2, seed=7, temperature=0.7)
    assert res.ok and res.value.diagnosis == "bcc"
    assert [a["error"] is None for a in res.attempts] == [False, False, True]
    assert "no JSON object" in res.attempts[0]["error"]
    assert "diagnosis" in res.attempts[1]["error"] and "confidence" in res.attempts[1]["error"]

    second, third = llm.calls[1]["conversation"], llm.calls[2]["conversation"]
    assert second[:2] == conv
    assert second[2] == {"role": "assistant", "content": "I am not sure."}
    assert second[3]["role"] == "user" and "no JSON object" in second[3]["content"]
    assert '"diagnosis": one of' in second[3]["content"]
    assert len(third) == 6 and "confidence" in third[5]["content"]
    # Sampling retries use fresh seeds; the caller's conversation is left untouched.
    assert [c["kwargs"]["seed"] for c in llm.calls] == [7, 8, 9]
    assert len(conv) == 2


def test_generate_structured_gives_up_without_raising():
    llm = TestLLM(["nope", '{"diagnosis": "mel"', "{'diagnosis': 'xx', 'confidence': 0.1}"], repeat_last=False)
    res = generate_structured(llm, [{"role": "user", "content": "dx?"}], Dx, retries=2)
    assert res.value is None and not res.ok
    assert len(res.attempts) == 3 and all(a["error"] for a in res.attempts)
    assert res.last_error == res.attempts[-1]["error"]
    assert llm.remaining == 0


def test_generate_structured_keeps_assistant_prefix_in_raw():
    llm = TestLLM(['"diagnosis": "nv", "confidence": 0.3}'])
    res = generate_structured(llm, [{"role": "user", "content": "dx?"}], Dx, assistant_prefix="{", retries=0)
    assert res.value == Dx(diagnosis="nv", confidence=0.3)
    assert res.attempts[0]["raw"].startswith('{"diagnosis"')
    assert llm.calls[0]["kwargs"]["assistant_prefix"] == "{"


def test_generate_structured_zero_retries():
    llm = TestLLM(lambda conv: "garbage")
    res = generate_structured(llm, [{"role": "user", "content": "dx?"}], Dx, retries=0)
    assert res.value is None and len(res.attempts) == 1 and len(llm.calls) == 1


def test_test_llm_basics():
    llm = TestLLM(["a. b", "c"], scores=lambda conv, prefix, conts: [len(c) for c in conts], repeat_last=False)
    assert llm.chat([[{"role": "user", "content": "x"}]] * 2, stop=["."]) == ["a", "c"]
    assert llm.score_continuations([], "", ["ab", "abc"]).tolist() == [2.0, 3.0]
    with pytest.raises(AssertionError, match="ran out"):
        llm.chat([[{"role": "user", "content": "x"}]])
    with pytest.raises(NotImplementedError):
        TestLLM([], scores=None).score_continuations([], "", ["a"])
    # Defaults: the last reply repeats, scores by preference (-5 for the rest).
    again = TestLLM(["only"], scores={"b": 1.0})
    assert again.chat([[{"role": "user", "content": "x"}]] * 3) == ["only"] * 3 and len(again.chats) == 3
    assert again.score_continuations([], "", ["a", "b"]).tolist() == [-5.0, 1.0] and again.scored == 1
