"""The graph under LangGraph's own server: `langgraph dev` on a free localhost port, driven by
`langgraph_sdk`: a case reaches the review interrupt, is resumed, and its final state is read.
Models are the test doubles ($DERMGRAPH_BACKENDS), so the run takes seconds."""

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("langgraph_api")
sdk = pytest.importorskip("langgraph_sdk")

from tests.serve_helpers import free_port, png_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def langgraph_cli() -> str:
    exe = Path(sys.executable).with_name("langgraph")
    return str(exe) if exe.exists() else shutil.which("langgraph") or pytest.skip("langgraph CLI not installed")


@pytest.fixture
def server(tmp_path):
    port = free_port()
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("review:\n  when: always\n  where: verify\n")
    env = dict(os.environ, DERMGRAPH_CONFIG=str(cfg), DERMGRAPH_BACKENDS="agent.testing:backends", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               LANGSMITH_TRACING="false", LANGCHAIN_TRACING_V2="false")  # fmt: skip
    # The repository's langgraph.json with its paths made absolute, so the server's files stay in tmp_path.
    spec = json.loads((ROOT / "langgraph.json").read_text())
    spec["dependencies"] = [str(ROOT)]
    spec["graphs"] = {k: str(ROOT / v.removeprefix("./")) for k, v in spec["graphs"].items()}
    (tmp_path / "langgraph.json").write_text(json.dumps(spec))
    cmd = [langgraph_cli(), "dev", "--no-browser", "--no-reload", "--host", "127.0.0.1", "--port", str(port), "--config", str(tmp_path / "langgraph.json")]
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    import re

    import httpx

    deadline = time.time() + 90
    try:
        while True:
            text = (tmp_path / "server.log").read_text(errors="replace")
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(text[-3000:])
            # `langgraph dev` moves to another port when the one asked for was taken meanwhile: read the one it uses.
            m = re.search(r"API: \S*(http://127\.0\.0\.1:\d+)", text)
            url = m.group(1) if m else f"http://127.0.0.1:{port}"
            try:
                if httpx.get(f"{url}/ok", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.mark.slow
def test_case_through_langgraph_dev_pauses_and_resumes(server, tmp_path):
    client = sdk.get_sync_client(url=server)
    assistants = client.assistants.search(graph_id="dermgraph")
    assert assistants and assistants[0]["graph_id"] == "dermgraph"
    schema = client.assistants.get_schemas(assistants[0]["assistant_id"])["input_schema"]
    assert set(schema["properties"]) == {"image", "question", "metadata"} and schema["required"] == ["image"]

    thread = client.threads.create()
    image = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    transcript = {"thread_id": thread["thread_id"]}
    client.runs.wait(thread["thread_id"], "dermgraph", input={"image": image, "question": "Is this melanoma?", "metadata": {"age": 61}})
    state = client.threads.get_state(thread["thread_id"])
    assert state["next"] == ["review"]
    request = state["interrupts"][0]["value"]
    transcript["interrupt"] = request
    assert request["case_id"] == thread["thread_id"] and request["stage"] == "verify" and request["differential"][0]["label"] == "mel"
    assert {f["criterion"] for f in request["findings"]} >= {"blue_whitish_veil", "pigment_network"}

    # A value outside the vocabulary is refused by the typed resume and nothing is saved.
    bad = client.runs.create(thread["thread_id"], "dermgraph", command={"resume": {"reviewer": "dr-a", "findings": {"blue_whitish_veil": "maybe"}}})
    client.runs.join(thread["thread_id"], bad["run_id"])
    assert client.threads.get_state(thread["thread_id"])["next"] == ["review"]

    client.runs.wait(thread["thread_id"], "dermgraph", command={"resume": {"reviewer": "dr-a", "findings": {"blue_whitish_veil": "absent"}}})
    state = client.threads.get_state(thread["thread_id"])
    transcript["after_edit"] = {"next": state["next"], "verification": state["values"]["verification"]}
    assert state["next"] == ["review"]  # the re-run answer comes back for sign-off
    client.runs.wait(thread["thread_id"], "dermgraph", command={"resume": {"reviewer": "dr-a", "diagnosis": "nv", "note": "override for the test"}})
    final = client.threads.get_state(thread["thread_id"])
    values = final["values"]
    transcript["final"] = {"next": final["next"], "verification": values["verification"], "review": values["review"]}
    assert final["next"] == []
    nodes = [t["node"] for t in values["trace"]]
    assert nodes == ["encode", "modality", "morphology", "retrieve", "reason", "verify", "review", "retrieve", "reason", "verify", "review"]
    assert values["review"]["override"] == "nv" and values["reasoning"]["differential"][0]["label"] == "mel"
    assert [r["action"] for r in values["review"]["records"]] == ["edit", "override"]
    assert "image" not in values or values["image"] is None  # pixels are never part of the thread state
    (tmp_path / "transcript.json").write_text(json.dumps(transcript, indent=1, default=str))
    if os.environ.get("DERMGRAPH_TRANSCRIPT"):
        Path(os.environ["DERMGRAPH_TRANSCRIPT"]).write_text(json.dumps(transcript, indent=1, default=str))
