"""The GPU pack and job: parts that fit the device calls, manifest checks, and the CPU rehearsal (--smoke)."""

from __future__ import annotations

import gzip
import json
import lzma
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from training import gpu_manifest as gm
from training.gpu_pack import MiB, device_calls, part_sizes, plan_parts, write_manifests, write_parts


def test_plan_parts_cuts_large_items_and_reserves_the_wheels_in_the_last_part():
    parts = plan_parts([("llm", 250, True), ("cases", 30, True), ("tiny", 5, False)], capacity=100, reserve_last=40, min_chunk=10)
    used = [sum(n for _, _, n in p) for p in parts]
    assert all(u <= 100 for u in used)
    assert used[-1] + 40 <= 100
    llm = [(o, n) for p in parts for name, o, n in p if name == "llm"]
    assert sum(n for _, n in llm) == 250 and [o for o, _ in llm] == sorted(o for o, _ in llm)
    with pytest.raises(ValueError, match="cannot fit"):
        plan_parts([("big", 150, False)], capacity=100)


def _pack(tmp_path: Path, capacity: int = 3 * MiB) -> tuple[Path, dict, bytes]:
    """A three-part pack of an xz member (split across parts) and two plain files."""
    staging = tmp_path / "pack" / ".staging"
    (staging / "llm").mkdir(parents=True)
    (staging / "data").mkdir()
    raw = os.urandom(5 * MiB)
    with lzma.open(staging / "llm" / "model.gguf.xz", "wb", preset=0) as f:
        f.write(raw)
    (staging / "data" / "cases.jsonl.gz").write_bytes(b"x" * 1000)
    (staging / "data" / "tiny.json").write_text("{}")
    import hashlib

    comps = [{"member": "llm/model.gguf", "stored": staging / "llm" / "model.gguf.xz", "codec": "xz", "sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)},
             {"member": "data/cases.jsonl.gz", "stored": staging / "data" / "cases.jsonl.gz"},
             {"member": "data/tiny.json", "stored": staging / "data" / "tiny.json"}]  # fmt: skip
    out = tmp_path / "pack"
    files, members, contents, n = write_parts(out, staging, comps, capacity, reserve_last=MiB)
    manifest = {"format": gm.FORMAT, "files": files, "members": members, "contents": contents, "parts": part_sizes(files, n)}
    manifest["calls"] = device_calls(n, Path(".gpu_pack"), Path(".gpu_wheels"))
    write_manifests(out, manifest)
    return out, manifest, raw


def test_manifest_verifies_assembles_and_names_missing_or_tampered_files(tmp_path):
    out, manifest, raw = _pack(tmp_path)
    assert len(manifest["parts"]) >= 2 and len(manifest["members"]["llm/model.gguf"]["files"]) >= 2
    v = gm.verify([out])
    assert v.ok, v.report()
    assert gm.assemble(v, "llm/model.gguf", tmp_path / "work" / "model.gguf").read_bytes() == raw

    first = manifest["members"]["llm/model.gguf"]["files"][0]
    (out / "part1" / first).unlink()
    tiny = out / gm.part_name(manifest["files"]["data/tiny.json"]["part"]) / "data/tiny.json"
    tiny.write_text('{"x": 1}')
    v = gm.verify([out])
    assert v.missing == [first] and v.tampered == ["data/tiny.json"]
    report = v.report()
    assert first in report and "part1" in report and "stash" in report and "data/tiny.json" in report


def test_stashed_parts_complete_the_pack(tmp_path):
    out, manifest, _ = _pack(tmp_path)
    stash = tmp_path / "tmp" / gm.STASH_NAME
    for k in range(1, len(manifest["parts"])):
        gm.stash(out / gm.part_name(k), stash)
    carried = tmp_path / "carried"
    last = gm.part_name(len(manifest["parts"]))
    (carried / last).parent.mkdir(parents=True)
    os.rename(out / last, carried / last)  # the last call carries only its own part
    assert not gm.verify([carried]).ok
    assert gm.verify([carried, stash]).ok
    assert manifest["calls"][0]["command"].startswith("python3 -m training.gpu_manifest stash")
    assert "training.gpu_job" in manifest["calls"][-1]["command"] and ".gpu_wheels" in manifest["calls"][-1]["carry"]


def test_job_stops_before_training_when_the_pack_is_incomplete(tmp_path, capsys):
    from training.gpu_job import main

    out, manifest, _ = _pack(tmp_path)
    import shutil

    shutil.rmtree(out / "part1")
    rc = main(["--pack", str(out), "--stash", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), "--budget-s", "30"])
    assert rc == 3
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "missing" in summary["error"] and "part1" in summary["error"]
    assert summary["pack"]["missing"] and not summary["stages"]


def test_job_configs_validate():
    """Every section of both job configs is a valid config of its trainer (a typo fails here, not on the GPU)."""
    from training import describer_vlm, encoder, reasoner_grpo, reasoner_sft
    from training.config import load_train_config
    from training.gpu_job import CONFIG, SMOKE_CONFIG, STAGES, load_job_config
    from training.gpu_pack import PackConfig

    for path in (CONFIG, SMOKE_CONFIG):
        cfg = load_job_config(path, [])
        assert set(cfg.shares) == set(STAGES)
        reasoner_sft.Config.model_validate(cfg.reasoner_sft)
        reasoner_grpo.Config.model_validate(cfg.reasoner_grpo)
        describer_vlm.Config.model_validate(cfg.describer)
        encoder.Config.model_validate(cfg.effnet)
    for path in ("configs/train/gpu_pack.yaml", "configs/train/gpu_pack_smoke.yaml"):
        pack = load_train_config(PackConfig, path, [])
        load_train_config(encoder.Config, pack.effnet.config, pack.effnet.set)
    gpu = load_job_config(CONFIG, [])
    assert gpu.effnet["train_from"] == "stem" and gpu.effnet["image_size"] >= 224 and gpu.effnet["workers"] > 0
    assert gpu.reasoner_sft["epochs"] >= 3 and gpu.reasoner_sft["lora"]["layers"] is None and len(gpu.reasoner_sft["lora"]["target_modules"]) == 7
    assert gpu.reasoner_grpo["max_steps"] >= 300 and gpu.reasoner_grpo["num_generations"] >= 8


NOT_ON_GPU = ("langgraph", "langchain_core", "faiss", "open_clip", "h5py")
"""What the GPU job must not import: the pack replaces the agent's graph, indexes and image models (h5py: the Keras weights)."""

_BLOCKED = """
import importlib.abc, importlib.util, sys
BLOCKED = {blocked!r}
class NotOnGpu(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ModuleNotFoundError(name + ' is not available to the GPU job', name=name)
sys.meta_path.insert(0, NotOnGpu())
_find_spec = importlib.util.find_spec
def find_spec(name, package=None):  # libraries probing for optional packages see them as absent
    return None if name.split('.')[0] in BLOCKED else _find_spec(name, package)
importlib.util.find_spec = find_spec
"""


def _run_blocked(code: str, timeout: float) -> subprocess.CompletedProcess:
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo)}
    return subprocess.run([sys.executable, "-c", _BLOCKED.format(blocked=NOT_ON_GPU) + code], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)


def test_job_imports_nothing_the_gpu_image_lacks():
    code = """
from training import gpu_job, gpu_pack, reasoner_sft, reasoner_grpo, describer_vlm, modality_encoder, rewards, encoder
import evals.protocols.reasoner
import models.efficientnet, training.synthetic, training.views
from models.backends import hf_llm
import models.backends.feature_vlm_net, models.heads, training.concepts, models.vocabulary
from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer  # datasets probes for faiss
gpu_job.load_job_config(gpu_job.CONFIG, [])
"""
    r = _run_blocked(code, 120)
    assert r.returncode == 0, r.stderr[-3000:]


def test_clock_gives_unused_time_to_later_stages():
    from training.gpu_job import Clock, SliceStop

    c = Clock(100.0, 10.0, t0=time.time())
    d = c.deadline(0.25, 1.0)
    assert 21 < d - time.time() <= 22.5
    s = SliceStop(time.time() + 30, 3)
    assert not s("fold0", 0) and 9 < s.stop_at - time.time() <= 10.5


@pytest.mark.weights
@pytest.mark.data
@pytest.mark.slow
def test_smoke_job_runs_every_stage_and_returns_at_most_8_small_files(tiny_features, tmp_path):
    """The CPU rehearsal: a smoke pack from the tiny feature cache, then the job's code path with tiny settings."""
    from training.config import load_train_config
    from training.gpu_job import MAX_OUT_BYTES, extract_outputs
    from training.gpu_pack import PackConfig, build

    cfg = load_train_config(PackConfig, "configs/train/gpu_pack_smoke.yaml", [f"out={tmp_path / 'pack'}", f"feature_dir={tiny_features}"])
    t0 = time.time()
    manifest = build(cfg, smoke=True)
    t_pack = time.time() - t0
    assert manifest["contents"]["reasoner/train.jsonl.gz"]["cases"] > 0 and manifest["contents"]["encoder/images.zip"]["images"] > 0
    assert all(p["bytes"] <= manifest["sizes"]["capacity_per_call_bytes"] for p in manifest["parts"].values())

    out = tmp_path / "out"
    t1 = time.time()
    # In a fresh interpreter that cannot import the agent's graph, indexes or Keras weights, as on the GPU.
    args = ["--pack", str(tmp_path / "pack"), "--stash", str(tmp_path / "nostash"), "--out", str(out), "--budget-s", "600", "--smoke"]
    r = _run_blocked(f"from training.gpu_job import main; sys.exit(main({args!r}))", 900)
    rc = r.returncode
    t_job = time.time() - t1
    print(f"smoke: pack {t_pack:.0f} s, job {t_job:.0f} s")
    summary = json.loads((out / "summary.json").read_text())
    assert rc == 0, r.stderr[-3000:] + json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1, default=str)[:3000]
    assert {s: r["status"] for s, r in summary["stages"].items()} == {
        "reasoner_sft": "done", "reasoner_grpo": "done", "describer": "done", "encoder": "done", "effnet": "done", "eval": "done"}  # fmt: skip
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all((out / f).stat().st_size < MAX_OUT_BYTES for f in files)
    assert set(files) == {"job.log", "summary.json", "reasoner_sft.tar.gz", "reasoner_grpo.tar.gz", "describer.tar.gz", "effnet.tar.gz", "encoder.tar.gz", "eval.tar.gz"}
    assert summary["stages"]["eval"]["cases"] == 2 and "sft+grpo" in summary["stages"]["eval"]["table"]

    got = extract_outputs(out, tmp_path / "back")
    assert (got["reasoner_sft"] / "adapter" / "adapter_model.safetensors").is_file()
    assert (got["reasoner_grpo"] / "adapter" / "adapter_config.json").is_file() and (got["reasoner_grpo"] / "reward_curves.png").is_file()
    assert (got["describer"] / "stage2" / "projector.safetensors").is_file()
    from models.efficientnet import EfficientNetExpert

    eff = EfficientNetExpert(weights=got["effnet"] / "best.safetensors")
    assert eff.info["image_size"] == 64 and summary["stages"]["effnet"]["epochs_run"] == 1 and summary["stages"]["effnet"]["best"]["score"] is not None
    # Cross-fitting: every training image of the three cross-fitted tables predicted once, by the fold model that left it out.
    from training.encoder import CROSSFIT_TABLES, fold_of

    v = gm.verify([tmp_path / "pack"])
    packed = json.loads(gzip.open(gm.member_path(v, "effnet/tables.json.gz", tmp_path / "members"), "rt").read())
    for table, source in CROSSFIT_TABLES.items():
        z = np.load(got["effnet"] / "crossfit" / f"{source}__effnet.npz")
        assert z["probs_ham"].shape == (len(z["ids"]), 7) and np.allclose(z["probs_ham"].sum(1), 1, atol=1e-3) and set(z["fold"]) <= {0, 1}
        # Each fold model's member (continued from it, effnet_member) predicted the same held-out images.
        assert z["probs_ham__member"].shape == z["probs_ham"].shape and not np.allclose(z["probs_ham__member"], z["probs_ham"])
        assert len(set(z["ids"])) == len(z["ids"]) == summary["stages"]["effnet"]["runs"]["fold0"]["held_out"][table] + summary["stages"]["effnet"]["runs"]["fold1"]["held_out"][table]
        recs = {r["image"]: r for r in packed["sets"][table]}
        assert set(z["ids"]) == set(recs) and all(fold_of(recs[i], 2) == f for i, f in zip(z["ids"], z["fold"]))
    from models.heads import HeadSet
    from models.resolve import sha256_file

    head = HeadSet.load(got["encoder"] / "modality_head.safetensors")
    assert head.meta["encoder_sha256"] == sha256_file(got["encoder"] / "modality_encoder.safetensors")
