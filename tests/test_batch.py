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


def test_folder_every_file_gets_a_record(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _images(src, 1)
    (src / "notes.txt").write_text("hello")
    Image.new("RGB", (8, 8)).save(src / "renamed.dat", format="PNG")  # a real image with an odd suffix
    os.mkfifo(src / "pipe")
    (src / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(src / "sub" / "deep.png")
    os.symlink(src / "sub", src / "link_to_dir")
    os.symlink(src / "loop_a", src / "loop_b")
    os.symlink(src / "loop_b", src / "loop_a")
    out = src / "out.jsonl"  # --out inside the input folder is not a case
    cases = read_cases(src, exclude=[out])
    by_id = {c.id: c for c in cases}
    assert set(by_id) == {"img000.png", "notes.txt", "renamed.dat", "pipe", "sub/deep.png", "link_to_dir", "loop_a", "loop_b"}
    assert "FIFO" in by_id["pipe"].error and "directory" in by_id["link_to_dir"].error and "link" in by_id["loop_a"].error

    def diagnose(case):
        from agent.imageio import load_image

        return {"size": list(load_image(case.image).image.size)}

    stats = run_batch(cases, out, diagnose, progress=False)
    status = {r["id"]: r["status"] for r in _recs(out)}
    assert status == {"img000.png": "ok", "renamed.dat": "ok", "sub/deep.png": "ok", "notes.txt": "error", "pipe": "error",
                      "link_to_dir": "error", "loop_a": "error", "loop_b": "error"}  # fmt: skip
    assert stats["ok"] == 3 and stats["error"] == 5


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
