"""The training core's one way to publish: file or directory artifacts, registry fragments with relative paths."""

from pathlib import Path

import yaml

from models.registry import _read_file
from models.resolve import sha256_file
from training.outputs import MetricsLog, publish, write_registry_fragment


def test_publish_a_file_and_a_directory(tmp_path):
    out = tmp_path / "run"
    (out / "adapter").mkdir(parents=True)
    (out / "head.safetensors").write_bytes(b"weights")
    (out / "adapter" / "a.json").write_text("{}")
    (out / "adapter" / "skip.tmp").write_text("x")
    art = publish(out / "head.safetensors", tmp_path / "artifacts" / "head.safetensors", {"acc": 1.0}, card="Trained on X (licence Y).", title="my head")
    assert art.read_bytes() == b"weights" and (tmp_path / "artifacts" / "head.metrics.json").exists()
    card = (tmp_path / "artifacts" / "head.md").read_text()
    assert card.startswith("# my head\n\nTrained on X (licence Y).")
    assert sha256_file(art) in card and "| acc | 1.0 |" in card and "Command:" in card and "Git commit:" in card
    d = publish(out / "adapter", tmp_path / "artifacts" / "adapter", files=["a.json"])
    assert sorted(p.name for p in d.iterdir()) == ["MODEL_CARD.md", "a.json"]
    assert "| a.json | 2 |" in (d / "MODEL_CARD.md").read_text()
    assert publish(out / "adapter", None) is None


def test_registry_fragment_is_relative_and_hashes_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "head.safetensors").write_bytes(b"weights")
    elsewhere = tmp_path / "artifacts" / "adapter"
    elsewhere.mkdir(parents=True)
    reg = write_registry_fragment(out, "my-head", out / "head.safetensors", role="head", licence="x", notes="n")
    entry = yaml.safe_load(reg.read_text())["models"][0]
    assert entry["source"] == "path:head.safetensors" and entry["sha256"] == sha256_file(out / "head.safetensors")
    reg = write_registry_fragment(out, "my-adapter", elsewhere, role="adapter", licence="x", notes="n", fmt="peft-lora")
    entry = yaml.safe_load(reg.read_text())["models"][0]
    assert entry["source"] == "path:../artifacts/adapter" and entry["sha256"] is None
    # The registry resolves the relative path from the fragment's folder.
    assert _read_file(reg, user=True)[0].source == f"path:{elsewhere.resolve()}"
    assert write_registry_fragment(out, None, elsewhere, role="adapter", licence="x", notes="n") is None


def test_metrics_log_appends_json_lines(tmp_path):
    log = MetricsLog(tmp_path)
    log.log(step=1, loss=0.5)
    log.log(step=2, loss=0.25)
    rows = [yaml.safe_load(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("t" in r for r in rows)


def _registered(tmp_path, monkeypatch, content=b"shipped"):
    """A shipped file and a user registry entry that points at it with its sha256."""
    shipped = tmp_path / "artifacts" / "head.safetensors"
    shipped.parent.mkdir(parents=True)
    shipped.write_bytes(content)
    reg = tmp_path / "registry.yaml"
    reg.write_text(yaml.safe_dump({"models": [{"id": "my-head", "role": "head", "source": f"path:{shipped}", "sha256": sha256_file(shipped),
                                               "licence": "x", "format": "safetensors"}]}))  # fmt: skip
    monkeypatch.setenv("DERMGRAPH_MODELS", str(reg))
    return shipped


def test_publish_keeps_a_registered_artifact_unless_told(tmp_path, monkeypatch, capsys):
    from training.outputs import registered_id

    shipped = _registered(tmp_path, monkeypatch)
    out = tmp_path / "run"
    out.mkdir()
    (out / "best.safetensors").write_bytes(b"new weights")
    art = publish(out / "best.safetensors", shipped, {"acc": 0.5})
    # the shipped file (and its card) are untouched; the new artifact is written under out_dir with the shipped name
    assert shipped.read_bytes() == b"shipped" and not (shipped.parent / "head.md").exists()
    assert art == out / "head.safetensors" and art.read_bytes() == b"new weights" and (out / "head.md").exists()
    said = capsys.readouterr().out
    assert "kept the shipped" in said and "my-head" in said and "--set overwrite_artifact=true" in said
    # explicitly asked: replaced, and the sha256 the registry must get is printed
    art = publish(out / "best.safetensors", shipped, {"acc": 0.5}, overwrite=True)
    assert art == shipped and shipped.read_bytes() == b"new weights"
    said = capsys.readouterr().out
    assert "my-head" in said and sha256_file(shipped) in said
    # the README's `dermgraph train verifier` destination is a registered shipped file
    assert registered_id(Path("models/artifacts/consistency_verifier.safetensors")) == "consistency-verifier"
    assert registered_id(tmp_path / "elsewhere.safetensors") is None


def test_shipped_target_for_trainers_that_write_themselves(tmp_path, monkeypatch, capsys):
    from training.outputs import shipped_target

    shipped = _registered(tmp_path, monkeypatch)
    assert shipped_target(shipped, tmp_path / "run", False) == (tmp_path / "run" / "head.safetensors", None)
    assert "kept the shipped" in capsys.readouterr().out
    assert shipped_target(shipped, tmp_path / "run", True) == (shipped, "my-head")
    assert shipped_target(tmp_path / "free.safetensors", tmp_path / "run", False) == (tmp_path / "free.safetensors", None)
    assert shipped_target(None, tmp_path / "run", False) == (None, None)


def test_metrics_log_resumes_at_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path)
    for step in (1, 2, 3):
        log.log(step=step)
    at_checkpoint = 2  # rows the checkpoint had seen; row 3 was written after it, then a kill cut a 4th one short
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "lo')
    log = MetricsLog(tmp_path, keep_rows=at_checkpoint)
    assert log.rows == 2
    log.log(step=3)
    steps = [yaml.safe_load(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3] and log.rows == 3
    assert MetricsLog(tmp_path).rows == 0 and (tmp_path / "metrics.jsonl").read_text() == ""


def test_model_card_command_is_what_the_user_typed():
    from training.outputs import command_line

    assert command_line(["/venv/bin/dermgraph", "train", "verifier"]) == "dermgraph train verifier"
    assert command_line(["/home/u/dermgraph/dermgraph/cli.py", "train", "verifier", "--config", "c.yaml"]) == "dermgraph train verifier --config c.yaml"
    assert command_line(["/home/u/dermgraph/training/verifier.py", "--config", "c.yaml"]) == "python -m training.verifier --config c.yaml"
