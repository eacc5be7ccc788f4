"""CLI behaviour that needs no model weights: bad input, config errors, graph, models list and pull, bench usage errors."""

import json
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


def test_models_list_is_a_table_with_sha256():
    from models.registry import list_specs

    res = runner.invoke(app, ["models", "list"])
    assert res.exit_code == 0
    lines = res.output.splitlines()
    assert lines[0].split() == ["ID", "ROLE", "SOURCE", "SHA256", "LICENCE"]
    specs = list_specs()
    assert len(lines) == len(specs) + 1
    col = lines[0].index("SHA256")
    for line, spec in zip(lines[1:], specs):  # aligned: every row's hash starts under the header, whatever the id or licence
        assert line.startswith(spec.id + " ") and line[col:].split()[0] == (spec.sha256[:12] if spec.sha256 else "-")
    full = runner.invoke(app, ["models", "list", "--full"])
    xcp = next(s for s in specs if s.id == "sklesion-xception")
    assert xcp.sha256 in full.output
    data = json.loads(runner.invoke(app, ["models", "list", "--json"]).output)
    assert {d["id"]: d["sha256"] for d in data}["sklesion-xception"] == xcp.sha256 and data[0]["licence"]


def test_models_pull_takes_the_default_configurations_models_and_reports_every_failure(monkeypatch):
    import models.resolve
    from models.registry import list_specs

    pulled = []

    def fake_pull(mid):
        pulled.append(mid)
        if mid in ("modality-head", "kb-index"):
            raise RuntimeError(f"network down for {mid}")
        return f"/cache/{mid}"

    monkeypatch.setattr(models.resolve, "pull", fake_pull)
    res = runner.invoke(app, ["models", "pull"])
    assert res.exit_code == 1
    assert set(pulled) >= {"sklesion-xception", "efficientnet-lite0-derm", "efficientnet-lite0-derm-continued", "dermnet-probe",
                           "efficientnet-lite0-imagenet", "modality-head", "derm7pt-concept-heads", "kb-index", "case-index",
                           "case-index-effnet", "all-minilm-l6-v2", "fusion-stacker"}  # fmt: skip
    assert not set(pulled) & {"smollm2-135m-instruct", "feature-vlm-describer", "fusion-calibration"}  # registered, not used by default
    assert "FAIL modality-head: network down for modality-head" in res.output and "FAIL kb-index" in res.output
    assert f"error: 2 of {len(pulled)} model(s) failed: modality-head, kb-index" in res.output
    pulled.clear()
    res = runner.invoke(app, ["models", "pull", "--all"])
    assert res.exit_code == 1 and pulled == [s.id for s in list_specs()]
    pulled.clear()
    res = runner.invoke(app, ["models", "pull", "--set", "reasoner.llm_summary=true"])
    assert "smollm2-135m-instruct" in pulled  # a configuration that calls the LLM pulls it
    pulled.clear()
    assert runner.invoke(app, ["models", "pull", "case-index"]).exit_code == 0 and pulled == ["case-index"]


@pytest.mark.parametrize("args, needle", [
    (["/nonexist", "-n", "2"], "/nonexist: no such file or folder"),
    (["--modes", "foo"], "unknown mode(s) 'foo'; valid: sequential, batched"),
    (["-n", "1", "--set", "reasoner.nope=1"], "reasoner.nope"),
])  # fmt: skip
def test_bench_usage_errors_are_one_line(args, needle):
    res = runner.invoke(app, ["bench", *args])
    assert res.exit_code != 0 and "Traceback" not in res.output and isinstance(res.exception, SystemExit)
    err = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and needle in err[0], res.output


def test_train_help_lists_every_trainer_the_dispatcher_accepts():
    from training.cli import TRAINERS

    res = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "400"})
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    assert all(name in text for name in TRAINERS) and "modality-heldout" in text and "encoder-crossfit" in text
