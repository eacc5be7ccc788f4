"""`dermgraph serve` killed with SIGKILL while cases are paused, restarted: every paused case is still
listed and resumable, none lost or duplicated (double-backed agent, real server processes)."""

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from tests.serve_helpers import free_port, png_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "restart-test-token-0123456789"  # serve refuses tokens under 16 characters
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def start(data_dir: Path, port: int) -> subprocess.Popen:
    env = dict(os.environ, DERMGRAPH_API_TOKENS=TOKEN, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "dermgraph", "serve", "--port", str(port), "--data-dir", str(data_dir), "--backends", "agent.testing:backends"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode()[-2000:])
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


@pytest.mark.slow
def test_sigkill_while_paused_loses_nothing(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(tmp_path, port)
    try:
        ids = []
        for i in range(6):
            r = httpx.post(f"{url}/v1/cases", files={"image": ("x.png", png_bytes(colour=(100 + i * 20, 80, 70)), "image/png")}, headers=AUTH, timeout=60)
            assert r.status_code == 200, r.text
            ids.append(r.json()["case_id"])
        # one finished before the kill
        assert httpx.post(f"{url}/v1/cases/{ids[0]}/review", json={"reviewer": "dr-a", "diagnosis": "mel"}, headers=AUTH, timeout=60).json()["status"] == "complete"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    log = proc.stderr.read().decode()
    assert all(f"case {cid} created: awaiting_review in " in log for cid in ids) and f"case {ids[0]} reviewed: complete in " in log
    assert TOKEN not in log
    private = [tmp_path / "cases.sqlite", *(tmp_path / "images").iterdir()]
    assert {stat.S_IMODE(p.stat().st_mode) for p in private} == {0o600} and stat.S_IMODE((tmp_path / "images").stat().st_mode) == 0o700

    proc = start(tmp_path, port)
    try:
        waiting = httpx.get(f"{url}/v1/cases?status=awaiting_review", headers=AUTH, timeout=60).json()
        assert sorted(c["case_id"] for c in waiting) == sorted(ids[1:])  # none lost, none duplicated
        everything = httpx.get(f"{url}/v1/cases", headers=AUTH, timeout=60).json()
        assert sorted(c["case_id"] for c in everything) == sorted(ids)
        for cid in ids[1:]:
            r = httpx.post(f"{url}/v1/cases/{cid}/review", json={"reviewer": "dr-b", "diagnosis": "mel"}, headers=AUTH, timeout=60)
            assert r.status_code == 200 and r.json()["status"] == "complete"
            assert [t["node"] for t in r.json()["diagnosis"]["trace"]].count("review") == 1
        assert httpx.get(f"{url}/v1/cases?status=awaiting_review", headers=AUTH, timeout=60).json() == []
        assert len(list((tmp_path / "images").iterdir())) == 6
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
