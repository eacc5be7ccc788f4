"""Property-based tests (Hypothesis) over the input boundaries of issue 15: image bytes, CSV/JSONL rows,
metadata, configs and overrides, and resume after a kill at a random point.

Properties: no uncaught exception (only the boundary's documented error types), exactly one record per
input case, and a resume from any kill point or damaged file that neither crashes, loses nor duplicates.
The agent runs with the test doubles (no weights). Settings: the ``ci`` profile below, derandomized so a
CI run is deterministic (the same examples every time); ``HYPOTHESIS_PROFILE=deep`` explores more.
"""

from __future__ import annotations

import csv
import io
import json
import os
import string
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from agent.batch import Case, read_cases, run_batch
from agent.imageio import ImageInputError, load_image
from agent.limits import InputError, InputLimits, check_metadata, check_question

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("deep", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

_SMALL = 50  # examples of the tests that run the whole agent graph per case or the CLI


def _png(size=(8, 8), colour=(120, 60, 30), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


SEEDS = [_png(), _png(fmt="JPEG"), _png(fmt="GIF"), _png(fmt="BMP"), _png(fmt="WEBP"), _png(fmt="TIFF")]


@st.composite
def image_bytes(draw) -> bytes:
    """Random bytes, or a real image with random byte flips, truncation or appended junk."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=256))
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut] if draw(st.booleans()) else data) + draw(st.binary(max_size=16))


@given(image_bytes())
@settings(max_examples=200)
def test_image_bytes_load_or_raise_image_input_error(data):
    try:
        loaded = load_image(data)
    except ImageInputError as exc:
        assert str(exc).startswith("cannot read image ")
    else:
        assert loaded.image.mode == "RGB" and min(loaded.image.size) >= 1


scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.text(max_size=30))
json_value = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)), max_leaves=6)
metadata = st.dictionaries(st.sampled_from(["age", "sex", "site", "fitzpatrick", "history", "colour", ""]), json_value, max_size=4)


@given(metadata, st.one_of(st.none(), st.text(max_size=50), st.integers(), st.lists(st.text(max_size=3), max_size=2)))
@settings(max_examples=300)
def test_metadata_and_question_are_validated_or_refused_by_field(meta, question):
    limits = InputLimits(max_metadata_chars=12, max_question_chars=40)
    try:
        check_question(question, limits)
        out = check_metadata(meta, limits)
    except InputError as exc:
        assert exc.field.startswith(("metadata", "question"))
    else:
        assert out is None or set(out.as_dict()) <= {"age", "sex", "site", "fitzpatrick", "history"}


@pytest.fixture(scope="module")
def agent():
    from agent.testing import backends

    from agent.agent import Agent

    return Agent(overrides=["limits.max_question_chars=60", "limits.max_metadata_chars=20"], backends=backends())


_cell = st.one_of(st.text(max_size=12), st.sampled_from(["", "abc", "-5", "55", "1e400", "nan", "unknown", "male", "F", "x" * 40, "a.png", "b.png", "missing.png"]))
COLUMNS = ["image", "id", "label", "question", "age", "sex", "site", "localization", "junk"]


def _refused(columns: list[str], has_rows: bool) -> bool:
    """Whether read_cases refuses an input with these columns as a whole (an unknown column, no 'image' column)."""
    from agent.batch import valid_columns

    return any(c not in valid_columns(jsonl=True) for c in columns) or (has_rows and "image" not in columns)


@st.composite
def csv_file(draw) -> tuple[bytes, int]:
    """A CSV (maybe with a BOM, ragged rows, odd quoting) and the number of data rows csv reads from it (None when
    its columns are refused)."""
    header = draw(st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=5, unique=True))
    if draw(st.integers(0, 3)):  # mostly valid columns, so that most examples reach the records
        header = list(dict.fromkeys(["image", *(c for c in header if c != "junk")]))
    rows = draw(st.lists(st.lists(_cell, min_size=0, max_size=len(header) + 1), max_size=6))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for r in rows:
        w.writerow(r)
    text = buf.getvalue()
    n = sum(1 for r in csv.reader(io.StringIO(text)) if r) - 1  # DictReader skips blank rows
    n = None if _refused(header, True) else n
    return (b"\xef\xbb\xbf" if draw(st.booleans()) else b"") + text.encode(), n


@st.composite
def jsonl_file(draw) -> tuple[bytes, int]:
    """A JSONL of objects with odd values, non-objects and broken lines; and its number of non-blank lines (None when
    its columns are refused)."""
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["object", "object", "object", "value", "broken", "blank"]))
        if kind == "object":
            obj = draw(st.dictionaries(st.sampled_from(COLUMNS if draw(st.integers(0, 5)) == 0 else COLUMNS[:-1]), st.one_of(_cell, json_value), max_size=5))
            lines.append(json.dumps(obj))
        elif kind == "value":
            lines.append(json.dumps(draw(json_value)))
        elif kind == "broken":
            lines.append(draw(st.text(alphabet=string.printable.replace("\n", "").replace("\r", ""), max_size=20)) + "{")
        else:
            lines.append("   ")
    objects = [o for o in (json.loads(x) for x in lines if x.strip() and not x.endswith("{")) if isinstance(o, dict)]
    columns = list(dict.fromkeys(k for o in objects for k in o))
    return "\n".join(lines).encode(), None if _refused(columns, bool(objects)) else sum(1 for x in lines if x.strip())


def _images(folder: Path) -> None:
    for name, colour in (("a.png", (200, 50, 50)), ("b.png", (50, 200, 50))):
        if not (folder / name).exists():
            Image.new("RGB", (40, 40), colour).save(folder / name)


def _run(agent, cases, out, **kw):
    def diagnose(case):
        d = agent.diagnose(case.image, question=case.question, metadata=case.metadata or None)
        return {"label": d.label}

    return run_batch(cases, out, diagnose, progress=False, **kw)


@given(st.one_of(csv_file().map(lambda f: (".csv", f)), jsonl_file().map(lambda f: (".jsonl", f))))
@settings(max_examples=_SMALL)
def test_rows_give_exactly_one_record_each_and_resume_is_a_no_op(agent, source):
    suffix, (data, n_cases) = source
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _images(tmp)
        src = tmp / f"cases{suffix}"
        src.write_bytes(data)
        if n_cases is None:  # an unknown column or no image column: the whole input is refused, naming the columns
            with pytest.raises(ValueError, match="unknown column|no 'image' column"):
                read_cases(src)
            return
        cases = read_cases(src)
        assert len(cases) == n_cases
        out = tmp / "out.jsonl"
        stats = _run(agent, cases, out)
        recs = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(recs) == n_cases == stats["ok"] + stats["error"]
        assert len({r["id"] for r in recs}) == n_cases
        for r in recs:
            assert r["status"] in ("ok", "error") and (r["status"] == "ok") == ("diagnosis" in r)
        again = _run(agent, read_cases(src), out, resume=True)
        assert again["skipped"] == n_cases and again["ok"] == again["error"] == 0


@given(st.integers(0, 10_000), st.lists(st.tuples(st.integers(0, 10_000), st.binary(min_size=1, max_size=12)), max_size=3), st.booleans())
@settings(max_examples=80)
def test_resume_after_a_kill_at_any_point_loses_and_duplicates_nothing(kill_at, damage, retry):
    """The output of a complete run, cut at a random byte (a kill mid-write) and with random bytes spliced in
    (a damaged file); resuming must produce each case's record exactly once and quarantine the rest."""
    cases = [Case(f"c{i}", Path(f"/nonexistent/{i}.png")) for i in range(8)]

    def diagnose(case):
        if case.id in ("c3", "c5"):
            raise MemoryError("transient")  # retryable error records
        return {"n": case.id}

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.jsonl"
        run_batch(cases, out, diagnose, progress=False)
        data = bytearray(out.read_bytes()[: kill_at % (len(out.read_bytes()) + 1)])
        for pos, junk in damage:
            p = pos % (len(data) + 1)
            data[p:p] = junk
        out.write_bytes(bytes(data))
        stats = run_batch(cases, out, lambda c: {"n": c.id}, resume=True, retry_errors=retry, progress=False)
        recs = [json.loads(line) for line in out.read_text().splitlines()]
        ids = [r["id"] for r in recs if r.get("id") in {c.id for c in cases}]
        assert sorted(ids) == sorted(c.id for c in cases)  # nothing lost, nothing duplicated
        assert all(isinstance(r, dict) and isinstance(r.get("id"), str) for r in recs)
        assert stats["skipped"] + stats["ok"] + stats["error"] == len(cases)
        if retry:
            assert all(r["status"] == "ok" for r in recs if r["id"] in ("c3", "c5"))


_yaml_text = st.one_of(
    st.text(max_size=60),
    st.builds(lambda k, v: f"{k}: {v}\n", st.sampled_from(["device", "seed", "reasoner", "limits", "verifier", "x", "modality"]), st.text(max_size=20)),
    st.sampled_from(["!!python/object/apply:os.system ['true']", "a: !!binary xx", "[1, 2", "reasoner: {num_samples: 99}", "seed: 3\n", "- 1\n- 2", "\ufeffseed: 1\n"]),
)
_override = st.one_of(
    st.text(max_size=30),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["seed", "reasoner.num_samples", "reasoner", "limits.max_question_chars", "device.x", "a.b.c", ""]),
              st.one_of(st.text(max_size=12), st.sampled_from(["!!python/name:os.system", "[1", "{a: 1}", "-1", "3", "null"]))),
)  # fmt: skip


@given(_yaml_text, st.lists(_override, max_size=3))
@settings(max_examples=300)
def test_configs_and_overrides_load_or_raise_value_error(text, overrides):
    from agent.config import AgentConfig, load_config

    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "c.yaml"
        p.write_text(text, encoding="utf-8", errors="surrogatepass") if "\ud800" not in text else p.write_bytes(text.encode("utf-8", "replace"))
        try:
            cfg = load_config(p, overrides)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            assert str(exc)
        else:
            assert isinstance(cfg, AgentConfig)
        with pytest.raises(ValueError):
            load_config(Path(tmp), overrides)  # a directory


@given(st.lists(st.sampled_from(["--age", "--sex", "--site", "--question", "--set", "--config"]), max_size=3), st.lists(st.text(max_size=8), max_size=3))
@settings(max_examples=_SMALL)
def test_cli_diagnose_never_shows_a_traceback(flags, values):
    from typer.testing import CliRunner

    from dermgraph.cli import app

    with tempfile.TemporaryDirectory() as tmp:
        missing = Path(tmp) / "nope.png"  # inputs are validated before any model loads
        args = ["diagnose", str(missing)]
        for f, v in zip(flags, values + [""] * len(flags)):
            args += [f, v]
        res = CliRunner().invoke(app, args)
        assert res.exit_code != 0
        assert "Traceback" not in res.output and not isinstance(res.exception, (AssertionError, TypeError, KeyError, AttributeError))


def test_yaml_dump_roundtrip_of_a_valid_config_is_accepted():
    """Anchor for the generators above: a valid config written as YAML loads."""
    from agent.config import AgentConfig, load_config

    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "c.yaml"
        p.write_text(yaml.safe_dump(AgentConfig().model_dump(mode="json")))
        assert load_config(p) == AgentConfig()
