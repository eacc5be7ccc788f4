"""Batch runs: inputs, error records, and kill -9 + resume without lost or duplicated records."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from agent.batch import Case, read_cases, run_batch


def _images(tmp_path: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        p = tmp_path / f"img{i:03d}.png"
        Image.new("RGB", (8, 8), (i, 2 * i % 255, 100)).save(p)
        paths.append(p)
    return paths


def test_read_cases_folder_csv_jsonl(tmp_path):
    imgs = _images(tmp_path, 3)
    assert [c.id for c in read_cases(tmp_path)] == [p.name for p in imgs]
    csv_path = tmp_path / "cases.csv"
    csv_path.write_text("image,label,age,sex,localization\nimg000.png,mel,55,male,back\nimg001.png,nv,,unknown,\n")
    cases = read_cases(csv_path)
    assert cases[0].metadata == {"age": 55.0, "sex": "male", "site": "back"} and cases[0].label == "mel"
    assert cases[1].metadata == {} and cases[0].image == tmp_path / "img000.png"
    jl = tmp_path / "cases.jsonl"
    jl.write_text(json.dumps({"id": "a", "image": "img002.png", "question": "q?"}) + "\n")
    assert read_cases(jl)[0].question == "q?"
    dup = tmp_path / "dup.csv"
    dup.write_text("image\nimg000.png\nimg000.png\n")
    cases = read_cases(dup)  # the second row is an error record named by its row, not a lost case
    assert [c.id for c in cases] == ["img000.png", "dup.csv:row 3"] and "duplicate case id" in cases[1].error


def test_bad_cases_become_error_records_and_batch_goes_on(tmp_path):
    imgs = _images(tmp_path, 2)
    (tmp_path / "bad.jpg").write_text("not an image")
    cases = [Case("0", imgs[0]), Case("bad", tmp_path / "bad.jpg"), Case("missing", tmp_path / "nope.png"), Case("1", imgs[1])]

    def diagnose(case):
        from agent.imageio import load_image

        return {"size": list(load_image(case.image).image.size)}

    out = tmp_path / "out.jsonl"
    stats = run_batch(cases, out, diagnose, progress=False)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == ["0", "bad", "missing", "1"]
    assert [r["status"] for r in recs] == ["ok", "error", "error", "ok"]
    assert "bad.jpg" in recs[1]["error"]["message"] and recs[1]["error"]["type"] == "ImageInputError"
    assert stats["ok"] == 2 and stats["error"] == 2
    with pytest.raises(FileExistsError):
        run_batch(cases, out, diagnose, progress=False)


def test_resume_truncates_torn_line_and_skips_done(tmp_path):
    imgs = _images(tmp_path, 3)
    cases = [Case(str(i), p) for i, p in enumerate(imgs)]
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": "0", "status": "ok"}) + "\n" + '{"id": "1", "sta')
    calls = []
    run_batch(cases, out, lambda c: calls.append(c.id) or {}, resume=True, progress=False)
    assert calls == ["1", "2"]
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["0", "1", "2"]


def test_kill_and_resume_loses_and_duplicates_nothing(tmp_path):
    imgs = _images(tmp_path, 40)
    out = tmp_path / "out.jsonl"
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from agent.batch import read_cases, run_batch
        def slow(case):
            time.sleep(0.05)
            return {{"name": case.image.name}}
        out = Path({str(out)!r})
        run_batch(read_cases(Path({str(tmp_path)!r}), exclude=[out, str(out) + '.lock']), out, slow, resume=True, progress=False)
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    deadline = time.time() + 30
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 8):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(out.read_text().splitlines())
    assert 0 < n_before < 40
    subprocess.run([sys.executable, "-c", script], env=env, check=True)
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == sorted(p.name for p in imgs) and len(ids) == len(set(ids)) == 40


# --------------------------------------------------------------------------------------------
# hardening (issue 15)


def _recs(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_bad_rows_become_error_records_naming_the_row(tmp_path):
    _images(tmp_path, 2)
    csv_path = tmp_path / "c.csv"
    big = "x" * 200_000  # over csv's default 128 KB field limit
    csv_path.write_bytes(("\ufeffimage,age,site\nimg000.png,abc,back\nimg001.png,40," + big + "\n,3,\n").encode())
    cases = read_cases(csv_path)
    assert [c.id for c in cases] == ["img000.png", "img001.png", "c.csv:row 4"]
    assert "c.csv:row 2" in cases[0].error and "age must be a number" in cases[0].error
    assert cases[1].error is None and len(cases[1].metadata["site"]) == 200_000  # the agent's limits reject it per case
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(['[1, 2]', '{"image": 5}', '{"image": "img000.png", "age": [1]}', "{not json", '{"id": "q", "image": "img001.png", "question": {"a": 1}}',
                             '{"image": "img001.png"}']) + "\n")  # fmt: skip
    cases = read_cases(jl)
    assert [c.id for c in cases] == ["c.jsonl:line 1", "c.jsonl:line 2", "img000.png", "c.jsonl:line 4", "q", "img001.png"]
    assert [c.error is None for c in cases] == [False, False, False, False, False, True]
    out = tmp_path / "out.jsonl"
    stats = run_batch(cases, out, lambda c: {"ok": 1}, progress=False)
    recs = _recs(out)
    assert len(recs) == 6 and stats["ok"] == 1 and stats["error"] == 5
    assert all(r["error"]["retryable"] is False for r in recs if r["status"] == "error")


def test_folder_every_image_file_gets_a_record_and_other_files_are_counted(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _images(src, 1)
    (src / "notes.txt").write_text("hello")
    (src / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    Image.new("RGB", (8, 8)).save(src / "renamed.dat", format="PNG")  # an image, but not by its suffix: skipped
    Image.new("RGB", (8, 8)).save(src / "UPPER.JPG", format="JPEG")  # suffixes match in any case
    (src / "fake.png").write_text("not an image")
    os.mkfifo(src / "pipe.png")
    (src / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(src / "sub" / "deep.png")
    os.symlink(src / "sub", src / "link_to_dir.jpg")
    os.symlink(src / "loop_a.png", src / "loop_b.png")
    os.symlink(src / "loop_b.png", src / "loop_a.png")
    out = src / "out.jsonl"  # --out inside the input folder is neither a case nor a skipped file
    cases = read_cases(src, exclude=[out])
    by_id = {c.id: c for c in cases}
    assert set(by_id) == {"img000.png", "UPPER.JPG", "fake.png", "pipe.png", "sub/deep.png", "link_to_dir.jpg", "loop_a.png", "loop_b.png"}
    assert cases.not_images == [".DS_Store", "notes.txt", "renamed.dat"]
    assert "FIFO" in by_id["pipe.png"].error and "directory" in by_id["link_to_dir.jpg"].error and "link" in by_id["loop_a.png"].error

    def diagnose(case):
        from agent.imageio import load_image

        return {"size": list(load_image(case.image).image.size)}

    stats = run_batch(cases, out, diagnose, progress=False)
    status = {r["id"]: r["status"] for r in _recs(out)}
    assert status == {"img000.png": "ok", "UPPER.JPG": "ok", "sub/deep.png": "ok", "fake.png": "error", "pipe.png": "error",
                      "link_to_dir.jpg": "error", "loop_a.png": "error", "loop_b.png": "error"}  # fmt: skip
    assert stats["ok"] == 3 and stats["error"] == 5
    again = read_cases(src, exclude=[out, src / "out.jsonl.lock"])
    assert again.not_images == [".DS_Store", "notes.txt", "renamed.dat"]  # --out and its lock are excluded, not counted


def test_resume_quarantines_damaged_and_idless_lines(tmp_path):
    cases = [Case(str(i), tmp_path / f"{i}.png") for i in range(5)]
    out = tmp_path / "out.jsonl"
    out.write_text("\n".join([json.dumps({"id": "0", "status": "ok"}), "garbage{", json.dumps({"status": "ok"}), "[1]",
                              json.dumps({"id": "1", "status": "ok"}), json.dumps({"id": "1", "status": "ok"})]) + "\n" + '{"id": "2", "sta')  # fmt: skip
    calls = []
    stats = run_batch(cases, out, lambda c: calls.append(c.id) or {}, resume=True, progress=False)
    assert calls == ["2", "3", "4"]
    assert [r["id"] for r in _recs(out)] == ["0", "1", "2", "3", "4"]
    q = [json.loads(line) for line in (tmp_path / "out.jsonl.quarantine.jsonl").read_text().splitlines()]
    assert [x["line"] for x in q] == [2, 3, 4, 6, 7] and q[0]["text"] == "garbage{" and "without an id" in q[1]["why"]
    assert stats["quarantined"] == 5 and stats["skipped"] == 2


def test_retry_errors_reruns_only_environment_failures(tmp_path):
    imgs = _images(tmp_path, 2)
    (tmp_path / "bad.png").write_text("not an image")
    cases = [Case("a", imgs[0]), Case("b", imgs[1]), Case("bad", tmp_path / "bad.png"), Case("row", None, error="c.csv:row 3: age must be a number")]
    out = tmp_path / "out.jsonl"

    def flaky(case):
        from agent.imageio import load_image

        load_image(case.image)
        if case.id == "b":
            raise MemoryError("out of memory")
        return {"ok": True}

    run_batch(cases, out, flaky, progress=False)
    assert {r["id"]: (r["status"], r.get("error", {}).get("retryable")) for r in _recs(out)} == {
        "a": ("ok", None), "b": ("error", True), "bad": ("error", False), "row": ("error", False)}  # fmt: skip
    calls = []
    stats = run_batch(cases, out, lambda c: calls.append(c.id) or {"ok": True}, resume=True, retry_errors=True, progress=False)
    assert calls == ["b"] and stats["retried"] == 1
    recs = _recs(out)
    assert sorted(r["id"] for r in recs) == ["a", "b", "bad", "row"] and {r["id"]: r["status"] for r in recs}["b"] == "ok"


def test_second_writer_is_refused(tmp_path):
    from agent.batch import BatchLockedError, locked

    out = tmp_path / "out.jsonl"
    with locked(out):
        for resume in (False, True):
            with pytest.raises(BatchLockedError, match="another dermgraph batch"):
                run_batch([Case("a", tmp_path / "a.png")], out, lambda c: {}, resume=resume, progress=False)
    assert not out.exists() or out.read_text() == ""
    run_batch([Case("a", tmp_path / "a.png")], out, lambda c: {}, progress=False)  # released: runs
    with pytest.raises(IsADirectoryError):
        run_batch([], tmp_path, lambda c: {}, resume=True, progress=False)


def test_case_timeout_turns_a_hung_case_into_an_error_record(tmp_path):
    cases = [Case("slow", tmp_path / "a.png"), Case("fast", tmp_path / "b.png")]

    def diagnose(case):
        if case.id == "slow":
            try:
                time.sleep(30)
            except Exception:  # a node's broad except must not swallow the timeout
                pass
        return {"ok": True}

    t0 = time.time()
    stats = run_batch(cases, tmp_path / "out.jsonl", diagnose, case_timeout=0.3, progress=False)
    assert time.time() - t0 < 10
    recs = _recs(tmp_path / "out.jsonl")
    assert recs[0]["status"] == "error" and recs[0]["error"]["type"] == "CaseTimeout" and recs[0]["error"]["retryable"]
    assert recs[1]["status"] == "ok" and stats["error"] == 1


# --------------------------------------------------------------------------------------------
# input columns, ids, --out = input, what --case-timeout covers


def test_unknown_columns_fail_up_front_listing_the_valid_ones(tmp_path):
    _images(tmp_path, 2)
    for name, text in [("c.csv", "image,gender,age_years\nimg000.png,male,60\n"),
                       ("c.jsonl", json.dumps({"image": "img000.png", "anatom_site": "back"}) + "\n" + json.dumps({"image": "img001.png", "diagnosis": "mel"}) + "\n")]:  # fmt: skip
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError) as err:
            read_cases(tmp_path / name)
        msg = str(err.value)
        assert "unknown column(s)" in msg and "valid columns: image, id, image_id, label, dx, question, age, sex, site" in msg
        assert ("'gender', 'age_years'" in msg) if name == "c.csv" else ("'anatom_site', 'diagnosis'" in msg)
    cases = read_cases(tmp_path / "c.csv", ignore_columns=["gender", "age_years"])  # skipped on purpose
    assert [(c.id, c.metadata, c.error) for c in cases] == [("img000.png", {}, None)]
    assert [c.label for c in read_cases(tmp_path / "c.jsonl", label_column="diagnosis", ignore_columns=["anatom_site"])] == [None, "mel"]


def test_jsonl_metadata_object_takes_the_python_api_keys(tmp_path):
    _images(tmp_path, 2)
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "image": "img000.png", "metadata": {"age": 61, "sex": "female", "site": "face", "fitzpatrick": "II"}},
        {"id": "b", "image": "img001.png", "age": 50, "metadata": {"age": 40}},
        {"id": "c", "image": "img001.png", "metadata": "age 40"},
    ]) + "\n")  # fmt: skip
    a, b, c = read_cases(jl)
    assert a.metadata == {"age": 61.0, "sex": "female", "site": "face", "fitzpatrick": "II"} and a.error is None
    assert "given both as a column and in 'metadata'" in b.error and "c.jsonl:line 2" in b.error
    assert "'metadata' must be an object" in c.error
    jl.write_text(json.dumps({"image": "img000.png", "metadata": {"age": 61, "gender": "f"}}) + "\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'gender' in 'metadata'; valid keys: age, sex, site, fitzpatrick, history"):
        read_cases(jl)
    (tmp_path / "m.csv").write_text("image,metadata\nimg000.png,{}\n")  # a CSV cell is text: not a metadata object
    with pytest.raises(ValueError, match="unknown column.*'metadata'"):
        read_cases(tmp_path / "m.csv")


def test_missing_image_column_fails_naming_the_columns_found(tmp_path):
    (tmp_path / "c.csv").write_text("path,label\na.png,mel\n")
    with pytest.raises(ValueError, match=r"c.csv: no 'image' column \(columns found: 'path', 'label'\)"):
        read_cases(tmp_path / "c.csv", ignore_columns=["path"])
    (tmp_path / "c.jsonl").write_text('{"id": "x", "label": "mel"}\n{"id": "y"}\n')
    with pytest.raises(ValueError, match=r"no 'image' column \(columns found: 'id', 'label'\)"):
        read_cases(tmp_path / "c.jsonl")
    (tmp_path / "empty.csv").write_text("")
    assert read_cases(tmp_path / "empty.csv") == []
    (tmp_path / "some.jsonl").write_text('{"image": "a.png"}\n{"id": "y"}\n')  # the column exists: a row without it is that row's error
    assert [c.error is None for c in read_cases(tmp_path / "some.jsonl")] == [True, False]


def test_falsy_ids_are_kept_as_strings(tmp_path):
    _images(tmp_path, 3)
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in [{"id": 0, "image": "img000.png"}, {"image_id": 0, "id": None, "image": "img001.png"},
                                                    {"id": "", "image": "img002.png"}, {"id": 1.5, "image": "img002.png"}]) + "\n")  # fmt: skip
    cases = read_cases(jl)
    assert [c.id for c in cases] == ["0", "c.jsonl:line 2", "img002.png", "c.jsonl:line 4"]
    assert "duplicate case id '0'" in cases[1].error and "'id' must be text or an integer, got float" in cases[3].error
    (tmp_path / "c.csv").write_text("id,image\n0,img000.png\n,img001.png\n")
    assert [c.id for c in read_cases(tmp_path / "c.csv")] == ["0", "img001.png"]


def test_out_that_is_the_input_is_refused(tmp_path):
    from agent.batch import check_output

    src = tmp_path / "cases.jsonl"
    src.write_text(json.dumps({"image": "a.png"}) + "\n")
    os.symlink(src, tmp_path / "link.jsonl")
    os.link(src, tmp_path / "hard.jsonl")
    for out in (src, tmp_path / "sub" / ".." / "cases.jsonl", tmp_path / "link.jsonl", tmp_path / "hard.jsonl"):
        with pytest.raises(ValueError, match="is the input file"):
            check_output(src, out)
    with pytest.raises(ValueError, match=r"--out's \.quarantine\.jsonl file .* is the input file"):  # a resume appends there
        check_output(tmp_path / "x.jsonl.quarantine.jsonl", tmp_path / "x.jsonl")
    check_output(src, tmp_path / "results.jsonl")  # another file: fine
    folder = tmp_path / "imgs"
    folder.mkdir()
    check_output(folder, folder / "results.jsonl")  # inside a folder input: excluded from its cases (and not an image)
    with pytest.raises(ValueError, match="image file inside the input folder"):
        check_output(folder, folder / "sub" / "x.PNG")


class SlowClassifier:
    """A FakeClassifier (agent.testing) that takes ``load_s`` on its first call (loading its weights), ``per_image_s``
    per image, and hangs on images of size ``hang_size``."""

    def __init__(self, load_s=0.0, per_image_s=0.0, hang_size=None):
        from agent.testing import FakeClassifier

        self.inner, self.load_s, self.per_image_s, self.hang_size, self.loaded = FakeClassifier(), load_s, per_image_s, hang_size, False
        self.model_id, self.labels, self.feature_dim = self.inner.model_id, self.inner.labels, self.inner.feature_dim

    def predict(self, images, metadata=None):
        if not self.loaded:
            time.sleep(self.load_s)
            self.loaded = True
        for im in images:
            time.sleep(60 if im.size == self.hang_size else self.per_image_s)
        return self.inner.predict(images, metadata)


def _timed_run(tmp_path, classifier, batch_size, timeout, sizes):
    from agent import Agent
    from agent.batched import batched_case_diagnose
    from agent.testing import backends

    cases = []
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (40 * i, 90, 120)).save(tmp_path / f"t{i}.png")
        cases.append(Case(f"t{i}", tmp_path / f"t{i}.png"))
    agent = Agent(backends=backends(classifier=classifier))
    run = batched_case_diagnose(agent, cases, batch_size)
    out = tmp_path / f"out{batch_size}.jsonl"
    stats = run_batch(cases, out, run, case_timeout=timeout, progress=False)
    return stats, {r["id"]: r for r in _recs(out)}, run


@pytest.mark.parametrize("batch_size", [1, 3])
def test_case_timeout_does_not_count_model_loading_or_the_micro_batch_prefetch(tmp_path, batch_size):
    """Loading (1.2 s) and a 3-case prefetch (3 x 0.4 s) each exceed the 1 s deadline; no case's own run does."""
    stats, recs, _ = _timed_run(tmp_path, SlowClassifier(load_s=1.2, per_image_s=0.4), batch_size, 1.0, [(40, 32)] * 3)
    assert {k: r["status"] for k, r in recs.items()} == {"t0": "ok", "t1": "ok", "t2": "ok"}, recs
    assert stats["ok"] == 3 and stats["warmup_seconds"] >= 1.2


def test_a_hung_case_in_a_micro_batch_times_out_alone(tmp_path):
    """The prefetch of a micro-batch holding a hung image runs past its budget (3 cases x 0.5 s): it is abandoned,
    the cases run one at a time, and only the hung one becomes a CaseTimeout error record."""
    t0 = time.time()
    stats, recs, run = _timed_run(tmp_path, SlowClassifier(per_image_s=0.01, hang_size=(33, 33)), 3, 0.5, [(40, 32), (33, 33), (40, 32)])
    assert time.time() - t0 < 20
    assert {k: r["status"] for k, r in recs.items()} == {"t0": "ok", "t1": "error", "t2": "ok"}
    assert recs["t1"]["error"]["type"] == "CaseTimeout" and recs["t1"]["error"]["retryable"]
    assert any("ran past 0.5 s per case" in e for e in run.batched_agent.prefetch_errors)
