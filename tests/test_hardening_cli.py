"""Issue 15 probes through the CLI (test doubles, no weights): one line naming file/row/field and the
reason, non-zero exit, no traceback (``--debug`` shows it); batch summary, lock and exit codes; prompt
truncation to the LLM's context."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from typer.testing import CliRunner

from dermgraph import cli
from dermgraph.cli import app

runner = CliRunner()


@pytest.fixture
def doubles_agent(monkeypatch):
    from agent.testing import backends

    from agent.agent import Agent

    real = cli._agent

    def make(config, overrides):
        real(config, overrides)  # the CLI's own config validation
        return Agent(config, overrides=overrides, backends=backends())

    monkeypatch.setattr(cli, "_agent", make)


@pytest.fixture
def img(tmp_path):
    p = tmp_path / "a.png"
    Image.new("RGB", (40, 40), (200, 60, 60)).save(p)
    return p


def _one_line_error(res, *needles):
    assert res.exit_code != 0, res.output
    assert "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    err = [line for line in lines if line.startswith("error:")]
    assert len(err) == 1, res.output
    for n in needles:
        assert n in err[0], (n, err[0])


@pytest.mark.parametrize("args, needles", [
    (["--age", "-5"], ["metadata.age", "greater than or equal to 0"]),
    (["--sex", "alien"], ["metadata.sex"]),
    (["--site", "x" * 300], ["metadata.site", "300 characters, limit 200"]),
    (["--question", "q" * 5000], ["question", "5000 characters, limit 4000"]),
    (["--set", "reasoner.num_samples=[1"], ["reasoner.num_samples=[1", "not valid YAML"]),
    (["--set", "seed=!!python/object/apply:os.system ['true']"], ["not valid YAML", "python/object/apply"]),
    (["--set", "reasoner.nope=1"], ["reasoner.nope", "Extra inputs"]),
    (["--set", "reasoner.fusion=fusion-stackr"], ["reasoner.fusion=fusion-stackr: not a registered model id", "did you mean fusion-stacker?"]),
    (["--set", "modality.head=xyz"], ["modality.head=xyz: not a registered", "modality-head"]),
])  # fmt: skip
def test_diagnose_bad_values_are_one_line_errors(img, args, needles):
    _one_line_error(runner.invoke(app, ["diagnose", str(img), *args]), *needles)


def test_config_file_errors(img, tmp_path):
    _one_line_error(runner.invoke(app, ["diagnose", str(img), "--config", str(tmp_path)]), "is a directory")
    bad = tmp_path / "bad.yaml"
    bad.write_text("reasoner: [unclosed\n")
    _one_line_error(runner.invoke(app, ["diagnose", str(img), "--config", str(bad)]), "bad.yaml", "not valid YAML")
    bad.write_text("seed: !!python/object/apply:os.system ['touch pwned']\n")
    _one_line_error(runner.invoke(app, ["diagnose", str(img), "--config", str(bad)]), "bad.yaml", "not valid YAML")
    assert not Path("pwned").exists()


def test_debug_shows_the_traceback(img, tmp_path):
    res = runner.invoke(app, ["--debug", "diagnose", str(img), "--config", str(tmp_path)])
    assert res.exit_code != 0 and isinstance(res.exception, ValueError)


def test_batch_summary_exit_codes_and_error_records(doubles_agent, img, tmp_path):
    cases = tmp_path / "cases.csv"
    cases.write_bytes(b"\xef\xbb\xbfimage,age,question\na.png,abc,\na.png,50,\n")  # BOM (Excel), a bad age, a duplicate
    out = tmp_path / "out.jsonl"
    res = runner.invoke(app, ["batch", str(cases), "--out", str(out)])
    assert res.exit_code == 1, res.output  # no case succeeded
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == ["a.png", "cases.csv:row 3"]
    assert "cases.csv:row 2" in recs[0]["error"]["message"] and "age must be a number" in recs[0]["error"]["message"]
    assert "batch: 2 cases: 0 ok, 2 errors" in res.output
    cases.write_text("image,question\na.png,fine\nb.png," + "q" * 5000 + "\n")
    Image.new("RGB", (40, 40)).save(tmp_path / "b.png")
    out2 = tmp_path / "out2.jsonl"
    res = runner.invoke(app, ["batch", str(cases), "--out", str(out2)])
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in out2.read_text().splitlines()]
    assert recs[0]["status"] == "ok" and recs[1]["error"]["type"] == "InputError" and recs[1]["error"]["field"] == "question"
    assert "batch: 2 cases: 1 ok, 1 errors" in res.output


def test_batch_usage_errors(doubles_agent, img, tmp_path):
    for limit in ("0", "-1"):
        res = runner.invoke(app, ["batch", str(tmp_path), "--out", str(tmp_path / "o.jsonl"), "--limit", limit])
        assert res.exit_code == 2 and "--limit" in res.output
    _one_line_error(runner.invoke(app, ["batch", str(tmp_path), "--out", str(tmp_path), "--resume"]), "is a directory")
    jl = tmp_path / "c.jsonl"
    jl.write_text('[1]\n{"image": 5}\n{"image": "a.png", "age": [1]}\n')
    res = runner.invoke(app, ["batch", str(jl), "--out", str(tmp_path / "j.jsonl")])
    assert res.exit_code == 1 and "3 errors" in res.output and "Traceback" not in res.output


def test_second_writer_is_refused_by_the_cli(doubles_agent, img, tmp_path):
    from agent.batch import locked

    out = tmp_path / "o.jsonl"
    with locked(out):
        res = runner.invoke(app, ["batch", str(tmp_path), "--out", str(out), "--resume"])
    _one_line_error(res, "being written by another dermgraph batch")


def test_full_disk_is_one_line(doubles_agent, img, tmp_path, monkeypatch):
    import errno

    import agent.batch as B

    real_fsync = B.os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(B.os, "fsync", full)
    res = runner.invoke(app, ["batch", str(tmp_path), "--out", str(tmp_path / "o.jsonl")])
    monkeypatch.setattr(B.os, "fsync", real_fsync)
    _one_line_error(res, "No space left on device")


class _WordTokenizer:
    """Whitespace 'tokenizer' with the slice of the HF API that TransformersLLM._fit uses."""

    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}

    def decode(self, ids):
        return " ".join(ids)


def test_prompt_is_cut_to_the_llm_context_with_a_note():
    from models.backends.hf_llm import TransformersLLM

    llm = TransformersLLM.__new__(TransformersLLM)
    llm._tokenizer, llm._model, llm._notes = _WordTokenizer(), SimpleNamespace(config=SimpleNamespace(max_position_embeddings=200)), []
    short = [{"role": "system", "content": "be careful"}, {"role": "user", "content": "Question: what is it? Candidates: a; b"}]
    assert llm._fit(short, "Diagnosis:", 40) == short and llm.drain_notes() == []
    long = [short[0], {"role": "user", "content": "Question: " + "word " * 5000 + "Candidates: a; b. Give the diagnosis."}]
    fitted = llm._fit(long, "Diagnosis:", 40)
    n = len(_WordTokenizer()(fitted[0]["role"] + ": " + fitted[0]["content"] + "\n" + fitted[1]["role"] + ": " + fitted[1]["content"] + "\nassistant: Diagnosis:")["input_ids"])
    assert n <= 160 and fitted[1]["content"].startswith("Question:") and fitted[1]["content"].endswith("Give the diagnosis.")
    assert "[... truncated ...]" in fitted[1]["content"] and fitted[0] == short[0]
    notes = llm.drain_notes()
    assert len(notes) == 1 and "prompt truncated to the LLM's context" in notes[0] and llm.drain_notes() == []


# --------------------------------------------------------------------------------------------
# batch input checks, diagnose --json input paths


def test_batch_refuses_an_out_that_is_its_input(doubles_agent, img, tmp_path):
    src = tmp_path / "same.jsonl"
    src.write_text(json.dumps({"image": "a.png"}) + "\n")
    before = src.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(src)
    for out in (src, tmp_path / "link.jsonl", tmp_path / "." / "same.jsonl"):
        _one_line_error(runner.invoke(app, ["batch", str(src), "--out", str(out), "--resume"]), "is the input file", "choose another --out")
    assert src.read_bytes() == before and not (tmp_path / "same.jsonl.quarantine.jsonl").exists()
    _one_line_error(runner.invoke(app, ["batch", str(tmp_path), "--out", str(img), "--resume"]), "image file inside the input folder")
    assert Image.open(img).size == (40, 40)


def test_batch_unknown_or_missing_columns_are_one_line_errors(doubles_agent, img, tmp_path):
    cases = tmp_path / "cases.csv"
    cases.write_text("image,gender,age_years,anatom_site\na.png,male,60,back\n")
    out = tmp_path / "out.jsonl"
    _one_line_error(runner.invoke(app, ["batch", str(cases), "--out", str(out)]),
                    "unknown column(s) 'gender', 'age_years', 'anatom_site'", "valid columns: image, id", "--ignore-column")  # fmt: skip
    assert not out.exists()
    res = runner.invoke(app, ["batch", str(cases), "--out", str(out), "--ignore-column", "gender,age_years", "--ignore-column", "anatom_site"])
    assert res.exit_code == 0, res.output
    assert [r["status"] for r in map(json.loads, out.read_text().splitlines())] == ["ok"]
    jl = tmp_path / "cases.jsonl"
    jl.write_text(json.dumps({"file": "a.png", "label": "mel"}) + "\n")
    _one_line_error(runner.invoke(app, ["batch", str(jl), "--out", str(tmp_path / "j.jsonl"), "--ignore-column", "file"]),
                    "no 'image' column (columns found: 'file', 'label')")  # fmt: skip
    jl.write_text(json.dumps({"id": 0, "image": "a.png", "metadata": {"age": 50, "sex": "female"}}) + "\n")
    res = runner.invoke(app, ["batch", str(jl), "--out", str(tmp_path / "k.jsonl")])
    rec = json.loads((tmp_path / "k.jsonl").read_text())
    assert res.exit_code == 0 and rec["id"] == "0" and rec["status"] == "ok", res.output


def test_batch_folder_takes_image_files_and_counts_the_others(doubles_agent, img, tmp_path):
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "notes.txt").write_text("seen on 3 May")
    Image.new("RGB", (40, 40)).save(tmp_path / "b.JPEG")
    out = tmp_path / "out.jsonl"
    res = runner.invoke(app, ["batch", str(tmp_path), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert sorted(json.loads(line)["id"] for line in out.read_text().splitlines()) == ["a.png", "b.JPEG"]
    assert "skipped 2 file(s)" in res.output and ".DS_Store, notes.txt" in res.output
    assert "batch: 2 cases: 2 ok, 0 errors" in res.output and "2 file(s) of the input folder skipped" in res.output


def test_diagnose_json_records_name_their_input(doubles_agent, img, tmp_path):
    second = tmp_path / "b.png"
    Image.new("RGB", (40, 40), (90, 60, 50)).save(second)
    res = runner.invoke(app, ["diagnose", str(img), str(second), "--json"])
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in res.output.splitlines() if line.startswith("{")]
    assert [r["input"] for r in recs] == [str(img), str(second)]
    assert all(len(r["image_sha256"]) == 64 and "verdict" in r for r in recs) and recs[0]["image_sha256"] != recs[1]["image_sha256"]


def test_a_key_error_reads_as_its_message_not_its_repr():
    assert cli._one_line(KeyError("unknown model id 'x'; registered: a, b")) == "unknown model id 'x'; registered: a, b"
    assert cli._one_line(KeyError(3)) == "3"
