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
    with pytest.raises(ValueError, match="duplicate"):
        read_cases(dup)


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
        run_batch(read_cases(Path({str(tmp_path)!r})), Path({str(out)!r}), slow, resume=True, progress=False)
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
