"""`dermgraph review list | show | resume` against a case store, with backend doubles."""

import json

from PIL import Image
from typer.testing import CliRunner

from agent import Agent
from agent.testing import backends
from dermgraph.cli import app

runner = CliRunner()


def test_review_cli_lists_shows_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("DERMGRAPH_BACKENDS", "agent.testing:backends")
    store = str(tmp_path / "cases.sqlite")
    Agent(backends=backends(), overrides=[f"review.checkpointer={store}"]).diagnose(Image.new("RGB", (64, 48), (150, 90, 70)), thread_id="case-7", review="always")

    res = runner.invoke(app, ["review", "list", "--store", store])
    assert res.exit_code == 0 and res.stdout.startswith("case-7") and "melanoma" in res.stdout

    res = runner.invoke(app, ["review", "show", "case-7", "--store", store])
    assert res.exit_code == 0 and "AWAITING REVIEW" in res.stdout and "blue_whitish_veil: present [0.98] / absent, present" in res.stdout

    res = runner.invoke(app, ["review", "resume", "case-7", "--store", store, "--set", "blue_whitish_veil=maybe", "--reviewer", "dr-cli"])
    assert res.exit_code == 2 and "valid: absent, present" in res.stderr
    res = runner.invoke(app, ["review", "show", "../../outside-the-store", "--store", store])
    assert res.exit_code == 2 and "invalid case id" in res.stderr

    res = runner.invoke(app, ["review", "resume", "case-7", "--store", store, "--set", "blue_whitish_veil=absent", "--reviewer", "dr-cli", "--json"])
    assert res.exit_code == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["review"]["records"][0]["changes"][0] == {"criterion": "blue_whitish_veil", "model": "present", "reviewer": "absent", "model_confidence": 0.982}
    res = runner.invoke(app, ["review", "resume", "case-7", "--store", store, "--diagnosis", "nv", "--note", "looks benign", "--reviewer", "dr-cli"])
    assert res.exit_code == 0 and "reviewer's diagnosis: nv" in res.stdout
    res = runner.invoke(app, ["review", "list", "--store", store])
    assert res.exit_code == 0 and res.stdout == "" and "no case awaits review" in res.stderr
    res = runner.invoke(app, ["review", "resume", "case-7", "--store", store, "--reviewer", "dr-cli"])
    assert res.exit_code == 2 and "not awaiting review" in res.stderr


def test_serve_refuses_no_auth_off_loopback_and_no_tokens(monkeypatch):
    monkeypatch.delenv("DERMGRAPH_API_TOKENS", raising=False)
    res = runner.invoke(app, ["serve", "--no-auth", "--host", "0.0.0.0"])
    assert res.exit_code == 2 and "only binds to loopback" in res.stderr
    res = runner.invoke(app, ["serve"])
    assert res.exit_code == 2 and "no API tokens" in res.stderr
