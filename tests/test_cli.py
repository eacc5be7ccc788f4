"""CLI behaviour that needs no model weights: bad input, config errors, graph, models list."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from dermgraph.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_text("hello, I am text"), "not an image"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: None, "file not found"),
    ],
)
def test_diagnose_bad_input_exits_nonzero_with_reason(tmp_path, make, reason):
    p = tmp_path / "case.jpg"
    make(p)
    res = runner.invoke(app, ["diagnose", str(p)])
    assert res.exit_code != 0
    assert reason in res.output and "case.jpg" in res.output
    assert "Traceback" not in res.output


def test_unknown_config_key_is_an_error(tmp_path):
    from PIL import Image

    img = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(img)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("reasoner:\n  num_sampels: 3\n")
    res = runner.invoke(app, ["diagnose", str(img), "--config", str(cfg)])
    assert res.exit_code != 0 and "num_sampels" in res.output


def test_a_dotted_override_inside_a_defaulted_section_keeps_its_other_defaults(tmp_path):
    """--set encoder.second_expert.options.views=[] needs no full second_expert; unknown keys still fail."""
    import pytest
    from pydantic import ValidationError

    from agent.config import AgentConfig, load_config

    cfg = load_config(None, ["encoder.second_expert.options.views=[]"])
    default = AgentConfig().encoder.second_expert
    assert cfg.encoder.second_expert.model == default.model and cfg.encoder.second_expert.options == {**default.options, "views": []}
    f = tmp_path / "c.yaml"
    f.write_text("reasoner:\n  retries: 1\n")
    cfg = load_config(f, ["reasoner.num_samples=3"])
    assert (cfg.reasoner.retries, cfg.reasoner.num_samples) == (1, 3)
    with pytest.raises(ValidationError, match="num_sampels"):
        load_config(f, ["reasoner.num_sampels=3"])


def test_graph_prints_mermaid():
    res = runner.invoke(app, ["graph"])
    assert res.exit_code == 0 and "encode --> modality" in res.output and "verify -.-> reason" in res.output


def test_models_list_shows_sources_and_licences():
    res = runner.invoke(app, ["models", "list"])
    assert res.exit_code == 0
    assert "sklesion-xception" in res.output and "pypi:sklesion==0.2.2" in res.output and "MIT" in res.output


def test_console_script_bad_input_has_no_traceback(tmp_path):
    p = tmp_path / "trunc.jpg"
    p.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20)
    res = subprocess.run([sys.executable, "-m", "dermgraph", "diagnose", str(p)], capture_output=True, text=True)
    assert res.returncode != 0 and "trunc.jpg" in res.stderr and "Traceback" not in res.stderr


def test_schema_command_prints_the_diagnosis_schema():
    import json

    res = runner.invoke(app, ["schema"])
    assert res.exit_code == 0
    schema = json.loads(res.output)
    assert schema["title"] == "Diagnosis" and "differential" in schema["properties"] and "thumbnail" not in schema["properties"]
