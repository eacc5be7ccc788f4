"""The one-lease GPU job: every trainer at full scale, in order of value, within a time budget.

    python -m training.gpu_job --pack .gpu_pack --out $OUT --budget-s 540        # on the device machine
    python -m training.gpu_job --pack /tmp/smoke_pack --out /tmp/o --smoke        # CPU rehearsal, same code path

First the pack is checked against its manifest (files carried by this call, and those an earlier call stashed
under the system temp dir): anything missing or altered is named, with the call that brings it, and the job
stops (exit 3). Then, each stage with a share of the time left and stopped cleanly at its deadline:

1. ``reasoner_sft``: :mod:`training.reasoner_sft` on every training case of the pack (LoRA on all linear layers);
2. ``reasoner_grpo``: :mod:`training.reasoner_grpo` from the SFT adapter, rewards of :mod:`training.rewards`;
3. ``describer``: :mod:`training.describer_vlm`, both stages, then its Derm7pt-val evaluation vs the concept heads;
4. ``encoder``: :mod:`training.modality_encoder` on the pack's images (Xception from ``unfreeze_from``,
   per held-out-source fold and once on everything: frozen vs tuned on the same held-out images);
5. ``effnet``: HOOK for the EfficientNet-Lite0 expert (``training.gpu_effnet.run`` when that module exists);
6. ``eval``: base vs SFT vs SFT+GRPO on the pack's isic2018_val / Derm7pt val prompts (``evals.protocols.reasoner`` metrics).

Each finished stage is written to ``--out`` at once (so a run cut off later still returns it), as at most
8 files of < 16 MiB: ``job.log``, ``summary.json``, ``reasoner_sft.tar.gz``, ``reasoner_grpo.tar.gz``,
``describer.tar.gz``, ``effnet.tar.gz``, ``encoder.tar.gz``, ``eval.tar.gz`` (the reward curves travel inside
``reasoner_grpo.tar.gz``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from training.gpu_manifest import Verification, member_path, stash_dir, verify

STAGES = ("reasoner_sft", "reasoner_grpo", "describer", "effnet", "encoder", "eval")
OUT_FILES = ("job.log", "summary.json", "reasoner_sft.tar.gz", "reasoner_grpo.tar.gz", "describer.tar.gz", "effnet.tar.gz", "encoder.tar.gz", "eval.tar.gz")
NEEDS = {"reasoner_sft": "llm/", "reasoner_grpo": "llm/", "describer": "describer/", "eval": "llm/", "encoder": "xception/", "effnet": "effnet/"}
"""The pack member each stage reads (a pack built without it skips the stage)."""
MAX_OUT_BYTES = 16 * (1 << 20)
CONFIG = Path("configs/train/gpu_job.yaml")
SMOKE_CONFIG = Path("configs/train/gpu_job_smoke.yaml")


# --------------------------------------------------------------------------- configuration


def job_config_class():
    """The job's config model (pydantic is imported here: the manifest check runs before any dependency)."""
    from pydantic import Field

    from training.config import Strict
    from training.modality import EncoderFinetune

    class EvalSettings(Strict):
        max_new_tokens: int = Field(48, ge=8, description="Free-generation budget (as the CPU evaluation).")
        batch_size: int = Field(64, ge=1, description="Prompts generated together.")
        chunk: int = Field(64, ge=1, description="Cases per round over all models (the deadline is checked between rounds).")
        limit: int | None = Field(None, ge=1, description="At most this many report cases (None: all in the pack).")
        dtype: str = Field("float32", description="Weights dtype of the evaluated models (float32: as the CPU agent).")

    class JobConfig(Strict):
        """GPU-scale settings of every stage; each trainer section is validated by that trainer's Config."""

        seed: int = 0
        device: str = Field("auto", description="auto: cuda when available.")
        shares: dict[str, float] = Field(description="Relative time share of each stage; time a stage leaves unused goes to the later ones.")
        reserve_s: float = Field(8.0, ge=0, description="Kept at the end for writing the outputs.")
        describer_stage_shares: list[float] = Field([0.35, 1.0], description="Of the describer's time left at each stage's start (stage 1, stage 2).")
        describer_eval_share: float = Field(0.2, ge=0, lt=1, description="Of the describer's time kept for its val evaluation.")
        encoder_eval_share: float = Field(0.15, ge=0, lt=1, description="Of the encoder's time kept for embedding and head fits.")
        reasoner_sft: dict[str, Any] = Field(default_factory=dict, description="training.reasoner_sft.Config fields.")
        reasoner_grpo: dict[str, Any] = Field(default_factory=dict, description="training.reasoner_grpo.Config fields.")
        describer: dict[str, Any] = Field(default_factory=dict, description="training.describer_vlm.Config fields.")
        encoder: EncoderFinetune = Field(default_factory=EncoderFinetune, description="Encoder fine-tuning (the modality config comes from the pack).")
        effnet: dict[str, Any] = Field(default_factory=dict, description="training.encoder.Config fields over the packed config (sizes and tables come from the pack).")
        effnet_eval_reserve_s: float = Field(10.0, ge=0, description="Of the effnet stage's time kept for its last held-out evaluation and outputs.")
        effnet_folds: int = Field(0, ge=0, description="Cross-fitting models (k >= 2; 0: none), each from ImageNet without one fold, predicting it.")
        effnet_final: bool = Field(True, description="Then train the expert on everything (effnet.init or ImageNet).")
        effnet_member: dict[str, Any] | None = Field(None, description="Continue each cross-fitting fold model by these training.encoder.Config fields over "
                                                     "the effnet config (init: the fold model), as the agent's ensemble member was continued from the shipped "
                                                     "expert; the held-out fold also gets the member's outputs (training.encoder.crossfit member). None: no member.")
        effnet_member_share: float = Field(0.4, gt=0, lt=1, description="Of each fold's time, the member's share.")
        eval: EvalSettings = Field(default_factory=EvalSettings)

    return JobConfig


def load_job_config(path: Path, overrides: list[str]):
    from training.config import load_train_config

    return load_train_config(job_config_class(), path, overrides)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- time


class Clock:
    """The budget: each stage gets ``share / sum(shares of the stages left)`` of the time left."""

    def __init__(self, budget_s: float, reserve_s: float, t0: float | None = None):
        self.t0 = t0 if t0 is not None else time.time()
        self.end = self.t0 + budget_s - reserve_s

    def elapsed(self) -> float:
        return time.time() - self.t0

    def left(self) -> float:
        return max(0.0, self.end - time.time())

    def deadline(self, share: float, shares_left: float) -> float:
        return time.time() + self.left() * (share / shares_left if shares_left > 0 else 0.0)


def deadline_callback(end: float, shares: tuple[float, ...] = (1.0,)):
    """A TrainerCallback ending training at ``end``; with several ``shares``, the i-th ``train()`` it serves
    may use ``shares[i]`` of the time left when it begins (the describer's two stages)."""
    from transformers import TrainerCallback

    class Deadline(TrainerCallback):
        def __init__(self):
            self.calls = 0
            self.stop_at = end
            self.stopped_at_step: list[int] = []

        def on_train_begin(self, args, state, control, **kwargs):
            share = shares[min(self.calls, len(shares) - 1)]
            self.calls += 1
            self.stop_at = time.time() + max(0.0, end - time.time()) * share

        def on_step_end(self, args, state, control, **kwargs):
            if time.time() >= self.stop_at:
                control.should_training_stop = True
                self.stopped_at_step.append(state.global_step)
            return control

    return Deadline()


class SliceStop:
    """``should_stop(stage, step)`` for the encoder: each new fine-tune (fold or final) gets an equal slice of the time left."""

    def __init__(self, end: float, n: int):
        self.end, self.n, self.stage, self.stop_at = end, n, None, end
        self.stopped: dict[str, int] = {}

    def __call__(self, stage: str, step: int) -> bool:
        if stage != self.stage:
            self.stage = stage
            self.stop_at = time.time() + max(0.0, self.end - time.time()) / max(1, self.n)
            self.n -= 1
        if time.time() >= self.stop_at:
            self.stopped[stage] = step
            return True
        return False


# --------------------------------------------------------------------------- outputs


class Tee:
    """Writes to the terminal and to ``$OUT/job.log``."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, s):
        self.stream.write(s)
        self.log.write(s)
        self.log.flush()
        return len(s)

    def flush(self):
        self.stream.flush()
        self.log.flush()

    def isatty(self):
        return False

    def fileno(self):
        return self.stream.fileno()


def write_tar(out: Path, name: str, root: Path, members: list[str]) -> Path | None:
    """``out/name`` (tar.gz) of the existing ``members`` under ``root``; refuses to exceed the 16 MiB per-file limit."""
    assert name in OUT_FILES, name
    target = Path(out) / name
    tmp = target.with_name(name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tf:
        for m in members:
            if (Path(root) / m).exists():
                tf.add(Path(root) / m, arcname=m)
    size = tmp.stat().st_size
    if size > MAX_OUT_BYTES:
        tmp.unlink()
        print(f"[gpu_job] {name} would be {size / 2**20:.1f} MiB (> 16 MiB): not written", flush=True)
        return None
    os.replace(tmp, target)
    return target


HALF_DELTA = "modality_encoder.fp16.safetensors"
"""The tuned encoder stages travel as float16 (a block13+ delta is ~27 MB in float32, over the 16 MiB per file)."""


def to_float16(src: Path, dest: Path) -> Path:
    """A float16 copy of a safetensors file, its metadata kept (plus the original dtype)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata() or {})
    save_file({k: v.half().contiguous() for k, v in load_file(str(src)).items()}, str(dest), metadata={**meta, "transport": "float16"})
    return dest


def restore_encoder(folder: Path) -> Path | None:
    """Back on CPU: the float16 delta as the float32 ``modality_encoder.safetensors`` the agent loads, and the
    head re-paired with it (its ``encoder_sha256``: the rounding changed the bytes, by < 1e-3 relative)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from models.heads import HeadSet
    from models.resolve import sha256_file

    half = Path(folder) / HALF_DELTA
    if not half.is_file():
        return None
    with safe_open(str(half), framework="pt") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if k != "transport"}
    delta = Path(folder) / "modality_encoder.safetensors"
    save_file({k: v.float().contiguous() for k, v in load_file(str(half)).items()}, str(delta), metadata=meta)
    head = Path(folder) / "modality_head.safetensors"
    if head.is_file():
        hs = HeadSet.load(head)
        hs.meta = {**hs.meta, "encoder_sha256": sha256_file(delta), "encoder_transport": "float16"}
        hs.save(head)
    reg = Path(folder) / "registry.yaml"
    if reg.is_file():  # the fragment's sha256 of each file, as restored here
        import yaml

        doc = yaml.safe_load(reg.read_text())
        for e in doc.get("models", []):
            f = Path(folder) / str(e.get("source", "")).removeprefix("path:")
            if e.get("sha256") and f.is_file():
                e["sha256"] = sha256_file(f)
        reg.write_text(yaml.safe_dump(doc, sort_keys=False))
    return delta


def extract_outputs(out: Path, dest: Path) -> dict[str, Path]:
    """Back on CPU: unpack the job's tarballs (as the device call returned them) into ``dest/<stage>/``
    and restore the float32 encoder delta (:func:`restore_encoder`)."""
    got = {}
    for tar in sorted(Path(out).glob("*.tar.gz")):
        stage = tar.name.removesuffix(".tar.gz")
        with tarfile.open(tar) as tf:
            tf.extractall(Path(dest) / stage, filter="data")
        got[stage] = Path(dest) / stage
    if "encoder" in got:
        restore_encoder(got["encoder"])
    if "effnet" in got and (got["effnet"] / "crossfit").is_dir():
        from training.encoder import bundle_crossfit, fold_summary

        runs = {f.parent.name: fold_summary(json.loads(f.read_text())) for f in sorted(got["effnet"].glob("fold*/summary.json"))}
        bundle_crossfit(got["effnet"] / "crossfit", got["effnet"] / "crossfit.npz", {"fold_models": runs})
    return got


# --------------------------------------------------------------------------- the job


class Job:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="dermgraph_gpu_job_"))
        self.summary: dict[str, Any] = {"command": " ".join(sys.argv), "smoke": bool(args.smoke), "budget_s": args.budget_s, "stages": {}}
        self.clock: Clock | None = None
        self.v: Verification | None = None
        self.cfg: Any = None

    # ---- bookkeeping

    def log(self, msg: str) -> None:
        el = self.clock.elapsed() if self.clock else 0.0
        print(f"[gpu_job {el:6.1f}s] {msg}", flush=True)

    def save_summary(self) -> None:
        self.summary["elapsed_s"] = round(self.clock.elapsed(), 1) if self.clock else None
        tmp = self.out / "summary.json.tmp"
        tmp.write_text(json.dumps(self.summary, indent=1, default=str))
        os.replace(tmp, self.out / "summary.json")

    def member(self, name: str) -> Path:
        return member_path(self.v, name, self.work / "members")

    # ---- setup

    def check_pack(self) -> bool:
        roots = [Path(self.args.pack), Path(self.args.stash) if self.args.stash else stash_dir()]
        try:
            self.v = verify(roots)
        except (FileNotFoundError, ValueError) as exc:
            self.summary["error"] = f"pack: {exc}"
            self.log(self.summary["error"])
            return False
        self.log(self.v.report())
        self.summary["pack"] = {"ok": self.v.ok, "missing": self.v.missing, "tampered": self.v.tampered, "git_commit": self.v.manifest.get("git_commit"),
                                "smoke": self.v.manifest.get("smoke"), "contents": {k: {kk: vv for kk, vv in c.items() if kk not in ("modality_config", "marker")}
                                                                                     for k, c in self.v.manifest["contents"].items()}}  # fmt: skip
        if not self.v.ok:
            self.summary["error"] = self.v.report()
        return self.v.ok

    def install_cached(self, folder: str) -> str:
        """Put the pack's model file under ``folder/`` where the resolver caches it (unless an identical entry is
        there), so its registry id resolves offline; returns the id."""
        from models.paths import cache_dir

        name = next(n for n in self.v.manifest["members"] if n.startswith(f"{folder}/"))
        info = self.v.manifest["contents"][name]
        entry = cache_dir() / info["cache_entry"]
        marker = entry / ".complete"
        target = entry / info["file"]
        have = marker.is_file() and json.loads(marker.read_text()).get("sha256") == info["marker"]["sha256"] and target.is_file()
        if not have:
            from training.gpu_manifest import assemble

            self.log(f"installing {name} into {entry}")
            if entry.exists():
                shutil.rmtree(entry)
            assemble(self.v, name, target)
            marker.write_text(json.dumps(info["marker"], sort_keys=True))
        return info["id"]

    def install_llm(self) -> str:
        """The base LLM's GGUF into the resolver's cache (the project's own GGUF conversion then runs on it)."""
        return self.install_cached("llm")

    def setup(self) -> None:
        import torch

        from training.gpu_pack import read_jsonl_gz
        from training.reasoner_data import write_jsonl

        cfg = self.cfg
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        env: dict[str, Any] = {"device": self.device, "python": sys.version.split()[0]}
        for mod in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "pyarrow", "pydantic"):
            try:
                env[mod] = __import__(mod).__version__
            except Exception as exc:  # noqa: BLE001 - a missing one is reported, the stage that needs it fails later
                env[mod] = f"unavailable: {exc}"
        if self.device.startswith("cuda"):
            env["gpu"] = torch.cuda.get_device_name(0)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.summary["env"] = env
        self.log(f"env: {json.dumps(env)}")
        if not self.has("llm/"):  # an image-only pack (gpu_pack llm: null): the LLM stages are skipped
            self.summary["setup"] = {"llm": None}
            self.log("setup done: the pack has no LLM")
            return
        t = time.time()
        self.llm = self.install_llm()
        from models.backends.hf_llm import locate_causal_lm

        self.llm_dir = locate_causal_lm(self.llm)
        self.summary["setup"] = {"llm": self.llm, "llm_dir_s": round(time.time() - t, 1)}
        self.train_cases = write_jsonl(read_jsonl_gz(self.member("reasoner/train.jsonl.gz")), self.work / "reasoner" / "train.jsonl")
        self.eval_cases = read_jsonl_gz(self.member("reasoner/eval.jsonl.gz"))
        self.log(f"setup done: base LLM {self.llm} at {self.llm_dir}; {sum(1 for _ in open(self.train_cases))} training cases, {len(self.eval_cases)} report cases")

    def has(self, prefix: str) -> bool:
        """Whether the pack holds a member under ``prefix``."""
        return any(m.startswith(prefix) for m in self.v.manifest["members"])

    # ---- stages

    def stage_reasoner_sft(self, end: float) -> dict[str, Any]:
        from training import reasoner_sft

        out = self.work / "reasoner_sft"
        cfg = reasoner_sft.Config.model_validate({**self.cfg.reasoner_sft, "seed": self.cfg.seed, "out_dir": out, "device": self.device,
                                                  "model": self.llm, "cases": self.train_cases})  # fmt: skip
        dl = deadline_callback(end)
        res = reasoner_sft.train(cfg, callbacks=[dl])
        res["stopped_at_deadline"] = bool(dl.stopped_at_step)
        (out / "summary.json").write_text(json.dumps(res, indent=1, default=str))
        self.sft_adapter = out / "adapter"
        write_tar(self.out, "reasoner_sft.tar.gz", out, ["adapter", "metrics.jsonl", "summary.json"])
        return _brief(res, ("steps", "train_loss", "cases", "tokens", "stopped_at_deadline"))

    def stage_reasoner_grpo(self, end: float) -> dict[str, Any]:
        from training import reasoner_grpo

        out = self.work / "reasoner_grpo"
        init = str(self.sft_adapter) if getattr(self, "sft_adapter", None) and (self.sft_adapter / "adapter_config.json").is_file() else None
        cfg = reasoner_grpo.Config.model_validate({**self.cfg.reasoner_grpo, "seed": self.cfg.seed, "out_dir": out, "device": self.device,
                                                   "model": self.llm, "cases": self.train_cases, "init_adapter": init})  # fmt: skip
        dl = deadline_callback(end)
        res = reasoner_grpo.train(cfg, callbacks=[dl])
        res["stopped_at_deadline"] = bool(dl.stopped_at_step)
        (out / "summary.json").write_text(json.dumps(res, indent=1, default=str))
        self.grpo_adapter = out / "adapter"
        write_tar(self.out, "reasoner_grpo.tar.gz", out, ["adapter", "metrics.jsonl", "summary.json", "reward_curves.png"])
        return _brief(res, ("steps", "init_adapter", "num_generations", "rewards", "stopped_at_deadline"))

    def stage_describer(self, end: float) -> dict[str, Any]:
        from training import describer_vlm

        out = self.work / "describer"
        feature_dir = self.member("describer/describer_cases.npz").parent
        cfg = describer_vlm.Config.model_validate({**self.cfg.describer, "seed": self.cfg.seed, "out_dir": out, "device": self.device,
                                                   "base_model": self.llm, "feature_dir": feature_dir, "artifact": None})  # fmt: skip
        train_end = end - (end - time.time()) * self.cfg.describer_eval_share
        dl = deadline_callback(train_end, tuple(self.cfg.describer_stage_shares))
        res = describer_vlm.train(cfg, callbacks=[dl])
        res["stopped_at_deadline"] = bool(dl.stopped_at_step)
        (out / "summary.json").write_text(json.dumps(res, indent=1, default=str))
        write_tar(self.out, "describer.tar.gz", out, ["stage2", "metrics.jsonl", "summary.json", "registry.yaml"])
        ev = res.get("eval", {})
        return {"stages": res.get("stages"), "table": res.get("table"), "beats_concept_heads": res.get("beats_concept_heads"),
                "macro_f1": {k: v.get("metrics", {}).get("mean", {}).get("macro_f1") for k, v in ev.items()}, "stopped_at_deadline": res["stopped_at_deadline"]}  # fmt: skip

    def stage_encoder(self, end: float) -> dict[str, Any]:
        import numpy as np

        from training import modality
        from training.gpu_pack import load_xception, read_encoder_images
        from training.modality import train_with_encoder
        from training.modality_encoder import embed
        from training.outputs import MetricsLog

        out = self.work / "encoder"
        info = self.v.manifest["contents"]["encoder/dataset.npz"]
        ft = self.cfg.encoder.model_dump()
        mcfg = modality.Config.model_validate({**info["modality_config"], "seed": self.cfg.seed, "out_dir": out, "device": self.device, "artifact": None,
                                               "encoder_artifact": None, "finetune": {**ft, "max_per_tag": None}})  # fmt: skip
        with np.load(self.member("encoder/dataset.npz")) as z:
            stats, y, groups, tags, refs = z["stats"], z["y"], z["groups"], z["tags"], z["refs"]
        images = read_encoder_images(self.member("encoder/images.zip"))
        xcp = self.member(next(n for n in self.v.manifest["members"] if n.startswith("xception/")))
        # Frozen features of the very images the encoder is tuned on, so frozen vs tuned differ in the encoder only.
        x = np.concatenate([embed(load_xception(xcp, self.device), images, self.cfg.encoder.embed_batch_size), stats], axis=1)
        stop = SliceStop(end - (end - time.time()) * self.cfg.encoder_eval_share, mcfg.n_folds + 1)
        out.mkdir(parents=True, exist_ok=True)
        res = train_with_encoder(mcfg, x, y, groups, tags, refs, MetricsLog(out), images=images, load_base=lambda device: load_xception(xcp, device), should_stop=stop)
        res["stopped_early"] = stop.stopped
        (out / "summary.json").write_text(json.dumps(res, indent=1, default=str))
        self.write_encoder_tar()
        ba = res.get("before_after", {})
        return {"images": len(y), "frozen_heldout": ba.get("frozen_heldout"), "tuned_heldout": ba.get("new_heldout"), "new_is_better": ba.get("new_is_better"),
                "table": ba.get("table"), "stopped_early": stop.stopped, "finetune": {k: ft[k] for k in ("unfreeze_from", "steps", "batch_size", "lr")}}  # fmt: skip

    def write_encoder_tar(self) -> None:
        out = self.work / "encoder"
        if (out / "modality_encoder.safetensors").is_file():
            to_float16(out / "modality_encoder.safetensors", out / HALF_DELTA)
        write_tar(self.out, "encoder.tar.gz", out, [HALF_DELTA, "modality_head.safetensors", "metrics.json", "metrics.jsonl", "summary.json", "registry.yaml"])

    def stage_effnet(self, end: float) -> dict[str, Any]:
        """The EfficientNet-Lite0 expert on the pack's images (:func:`training.encoder.train` unchanged, the packed
        records and their decoded images in place of the data folder): first ``effnet_folds`` cross-fitting models
        from the ImageNet weights, each leaving one fold of the training images out and predicting it, then
        (``effnet_final``) the expert on everything, from ``effnet.init`` or ImageNet."""
        import gzip

        from training import encoder
        from training.gpu_pack import read_effnet_images

        if "effnet/tables.json.gz" not in self.v.manifest["members"]:
            return {"status": "skipped", "why": "the pack has no effnet data"}
        t0 = time.time()
        has_base = self.has("effnet_base/")
        if has_base:
            self.install_cached("effnet_base")
        if self.cfg.effnet_folds and not has_base:
            raise ValueError("cross-fitting trains from the ImageNet weights, which the pack does not carry (gpu_pack effnet.base)")
        if self.cfg.effnet_final and not has_base and not self.cfg.effnet.get("init"):
            raise ValueError("effnet.init is unset and the pack carries no ImageNet base weights (gpu_pack effnet.base): nothing to start from")
        with gzip.open(self.member("effnet/tables.json.gz"), "rt", encoding="utf-8") as f:
            tables = json.load(f)
        out = self.work / "effnet"
        out.mkdir(parents=True, exist_ok=True)
        base = {k: v for k, v in tables["config"].items() if k not in ("out_dir", "device", "cache_dir", "artifact", "register_as", "max_minutes")}
        cfg = encoder.Config.model_validate({**base, **self.cfg.effnet, "seed": self.cfg.seed, "out_dir": out, "device": self.device, "artifact": None,
                                             "cache_dir": self.work / "effnet_images", "store_size": tables["config"]["store_size"],
                                             "dermnet_store_size": tables["config"]["dermnet_store_size"], "progress": False, "resume": False})  # fmt: skip
        sets, classes = tables["sets"], tables["classes"]
        zpath = self.member("effnet/images.zip")
        images = {name: read_effnet_images(zpath, name, len(recs)) for name, recs in sets.items()}
        decode_s = round(time.time() - t0, 1)
        self.log(f"effnet: {sum(len(v) for v in sets.values())} images decoded in {decode_s} s")
        runs = [f"fold{k}" for k in range(self.cfg.effnet_folds)] + (["final"] if self.cfg.effnet_final else [])
        results: dict[str, Any] = {}
        if self.cfg.effnet_folds:  # the folds get their share of the time, the final run the rest
            share = self.cfg.effnet_folds / len(runs)
            deadline = time.time() + (end - time.time() - self.cfg.effnet_eval_reserve_s) * share
            results.update(encoder.crossfit(cfg, sets, classes, images, self.cfg.effnet_folds, deadline=deadline, device=self.device, log=self.log,
                                            member=self.cfg.effnet_member, member_share=self.cfg.effnet_member_share))  # fmt: skip
        if self.cfg.effnet_final:
            rcfg = cfg.model_copy(update={"max_minutes": max(0.05, (end - time.time() - self.cfg.effnet_eval_reserve_s) / 60)})
            (out / "config.yaml").write_text(json.dumps(rcfg.model_dump(mode="json"), indent=1))
            self.log(f"effnet final: {rcfg.max_minutes * 60:.0f} s, init {rcfg.init or 'ImageNet'}")
            results["final"] = encoder.train(rcfg, tables=(sets, classes), images=images)
            (out / "summary.json").write_text(json.dumps({**results["final"], "decode_s": decode_s}, indent=1, default=str))
        members = []
        if self.cfg.effnet_folds:
            folds = [r for r in runs if r != "final"] + ([f"{r}{encoder.MEMBER_SUFFIX}" for r in runs if r != "final"] if self.cfg.effnet_member is not None else [])
            members += ["crossfit"] + [f"{r}/{f}" for r in folds for f in ("metrics.jsonl", "summary.json", "learning_curves.png", "config.yaml")]
        if "final" in results:
            members += ["best.safetensors", "metrics.jsonl", "summary.json", "MODEL_CARD.md", "learning_curves.png", "config.yaml", "registry.yaml"]
        write_tar(self.out, "effnet.tar.gz", out, members)
        keys = ("val_isic2018/balanced_accuracy", "val_isic2018/accuracy", "val_derm7pt/balanced_accuracy", "val_dermnet/top1", "val_dermnet/top5",
                "val_derm7pt/criteria_f1/mean", "modality_acc", "score")  # fmt: skip
        brief = {run: {"best_epoch": r.get("best_epoch"), "epochs_run": r.get("epochs_run"), "stopped_early": r.get("stopped_early"), "train_wall_s": r.get("train_wall_s"),
                       "held_out": r.get("held_out"), "best": {k: (r.get("best") or {}).get(k) for k in keys}} for run, r in results.items()}  # fmt: skip
        final = brief.get("final", {})
        return {**final, "decode_s": decode_s, "sizes": (results.get("final") or {}).get("sizes"), "runs": brief}

    def stage_eval(self, end: float) -> dict[str, Any]:
        from models.backends.hf_llm import TransformersLLM
        from evals.protocols.reasoner import case_outputs, metrics, table

        ec = self.cfg.eval
        out = self.work / "eval"
        out.mkdir(parents=True, exist_ok=True)
        models = {"base": None}
        for name, attr in (("sft", "sft_adapter"), ("sft+grpo", "grpo_adapter")):
            path = getattr(self, attr, None)
            if path is not None and (path / "adapter_config.json").is_file():
                models[name] = str(path)
        cases = self.eval_cases[: ec.limit] if ec.limit else self.eval_cases
        llms = {n: TransformersLLM(self.llm, device=self.device, dtype=ec.dtype, max_batch_size=ec.batch_size, adapter=a) for n, a in models.items()}
        outs: dict[str, list[dict[str, Any]]] = {n: [] for n in models}
        done = 0
        records = (out / "records.jsonl").open("w")
        while done < len(cases) and time.time() < end:
            chunk = cases[done : done + ec.chunk]
            for n, llm in llms.items():
                got = case_outputs(llm, chunk, ec.max_new_tokens)
                outs[n] += got
                for o in got:
                    records.write(json.dumps({**o, "model": n}) + "\n")
            done += len(chunk)
            records.flush()
            self.log(f"eval: {done}/{len(cases)} cases x {len(llms)} models")
        records.close()
        sets = sorted({c["source"] for c in cases[:done]})
        results = {n: {"all": metrics(o), **{s: metrics([x for x in o if x["source"] == s]) for s in sets}} for n, o in outs.items()}
        paired = {}
        for n in outs:
            if n != "base" and outs[n]:
                b = sum(o["pred"] == o["label"] and p["pred"] != p["label"] for o, p in zip(outs[n], outs["base"]))
                c = sum(o["pred"] != o["label"] and p["pred"] == p["label"] for o, p in zip(outs[n], outs["base"]))
                paired[f"{n}_vs_base"] = {"only_new_right": b, "only_base_right": c, "mcnemar_p": _mcnemar(b, c)}
        md = table(results)
        (out / "metrics.json").write_text(json.dumps({"results": results, "paired": paired, "cases": done, "of": len(cases), "models": models}, indent=1))
        (out / "table.md").write_text(md + "\n")
        write_tar(self.out, "eval.tar.gz", out, ["records.jsonl", "metrics.json", "table.md"])
        print(md, flush=True)
        return {"cases": done, "of": len(cases), "table": md, "paired": paired}

    # ---- driver

    def run(self) -> int:
        args = self.args
        self.clock = Clock(args.budget_s, 0.0)
        log = open(self.out / "job.log", "a", buffering=1)
        sys.stdout, sys.stderr = Tee(sys.__stdout__, log), Tee(sys.__stderr__, log)
        try:
            if not self.check_pack():
                self.save_summary()
                return 3
            self.cfg = load_job_config(Path(args.config) if args.config else (SMOKE_CONFIG if args.smoke else CONFIG), args.sets)
            self.clock = Clock(args.budget_s, self.cfg.reserve_s, self.clock.t0)
            self.summary["config"] = self.cfg.model_dump(mode="json")
            self.summary["work"] = str(self.work)
            self.setup()
            self.summary["setup"]["s"] = round(self.clock.elapsed(), 1)
            self.save_summary()
            todo = [s for s in STAGES if not args.stages or s in args.stages.split(",")]
            for i, stage in enumerate(todo):
                shares_left = sum(self.cfg.shares.get(s, 0.0) for s in todo[i:])
                share = self.cfg.shares.get(stage, 0.0)
                end = self.clock.deadline(share, shares_left)
                if end - time.time() < 1.0:
                    self.summary["stages"][stage] = {"status": "skipped", "why": "no time left"}
                    continue
                need = NEEDS.get(stage)
                if need and not self.has(need):
                    self.summary["stages"][stage] = {"status": "skipped", "why": f"the pack has no {need}"}
                    continue
                self.log(f"=== {stage}: {max(0.0, end - time.time()):.0f} s of {self.clock.left():.0f} s left ===")
                t = time.time()
                try:
                    res = getattr(self, f"stage_{stage}")(end)
                    res.setdefault("status", "done")
                except Exception as exc:  # noqa: BLE001 - one failing stage must not lose the others
                    traceback.print_exc()
                    res = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
                res["wall_s"] = round(time.time() - t, 1)
                res["planned_s"] = round(end - t, 1)
                self.summary["stages"][stage] = res
                self.log(f"=== {stage}: {res['status']} in {res['wall_s']} s ===")
                self.save_summary()
            failed = [s for s, r in self.summary["stages"].items() if r.get("status") == "failed"]
            self.summary["status"] = "failed stages: " + ", ".join(failed) if failed else "ok"
            self.save_summary()
            self.log(f"done: {self.summary['status']}; outputs: {sorted(p.name for p in self.out.iterdir())}")
            return 1 if failed else 0
        except Exception as exc:  # noqa: BLE001 - setup failures still leave a summary behind
            traceback.print_exc()
            self.summary["error"] = f"{type(exc).__name__}: {exc}"
            self.save_summary()
            return 2
        finally:
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
            log.close()
            if not args.work and not args.keep_work:
                shutil.rmtree(self.work, ignore_errors=True)


def _brief(res: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: res.get(k) for k in keys}


def _mcnemar(b: int, c: int) -> float | None:
    """Exact two-sided McNemar p-value (binomial on the discordant pairs)."""
    from math import comb

    n = b + c
    if n == 0:
        return None
    k = min(b, c)
    return round(min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2**n), 6)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.gpu_job", description=__doc__.split("\n\n")[0])
    p.add_argument("--pack", type=Path, default=Path(".gpu_pack"), help="The carried pack folder (its part*/ folders).")
    p.add_argument("--stash", type=Path, default=None, help="Where earlier calls stashed their parts (default: <tmp>/dermgraph_gpu_pack).")
    p.add_argument("--out", type=Path, required=True, help="Outputs (the device call's $OUT): at most 8 files.")
    p.add_argument("--budget-s", type=float, default=540.0, help="Seconds from the job's start to its last output.")
    p.add_argument("--smoke", action="store_true", help=f"Tiny settings ({SMOKE_CONFIG}): the CPU rehearsal of the same code path.")
    p.add_argument("--config", type=Path, default=None, help=f"Job settings (default {CONFIG}, or {SMOKE_CONFIG} with --smoke).")
    p.add_argument("--set", dest="sets", action="append", default=[], help="key=value override of the job settings.")
    p.add_argument("--stages", default=None, help=f"Comma-separated subset of {','.join(STAGES)}.")
    p.add_argument("--work", type=Path, default=None, help="Scratch folder (default: a temp dir, removed at the end).")
    p.add_argument("--keep-work", action="store_true")
    p.add_argument("--extract", type=Path, default=None, metavar="DEST", help="Back on CPU: unpack the outputs in --out into DEST and exit.")
    a = p.parse_args(argv)
    if a.extract is not None:
        print(json.dumps({k: str(v) for k, v in extract_outputs(a.out, a.extract).items()}, indent=1))
        return 0
    return Job(a).run()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
