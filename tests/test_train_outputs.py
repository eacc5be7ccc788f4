"""The training core's one way to publish: file or directory artifacts, registry fragments with relative paths."""

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
