"""Reasoner SFT: TRL ``SFTTrainer`` + PEFT LoRA on SmolLM2-135M-Instruct.

Cases come from :mod:`training.reasoner_data` (images the classifier has not seen, rendered exactly as
the agent's prompt); each is a conversational prompt-completion pair, so the loss is on the completion
``Diagnosis: <true name>\\nRationale: ...`` only. The adapter is saved with PEFT ``save_pretrained``
and loads in the agent with ``reasoner.llm.options.adapter: <dir or registry id>``.

    dermgraph train reasoner-sft --config configs/train/reasoner_sft.yaml
    dermgraph train reasoner-sft --config configs/train/reasoner_sft.yaml --set build_only=true   # data only

On a GPU: ``device: cuda`` uses bf16 and gradient checkpointing; multi-GPU with
``accelerate launch --config_file configs/accelerate/fsdp.yaml -m training.reasoner_sft --config ...``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from pydantic import Field

from training.cli import module_main
from training.config import Strict, TrainConfig, resolve_device
from training.reasoner_data import ReasonerDataConfig, build_training_cases, read_jsonl, write_jsonl

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class LoraSettings(Strict):
    """PEFT LoRA settings."""

    r: int = Field(16, ge=1, description="Rank.")
    alpha: int = Field(32, ge=1, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], description="Linear layers that get adapters."
    )
    layers: list[int] | None = Field(
        None, description="Transformer layers that get adapters (None: all). On CPU the top layers only: backward then stops there."
    )


class Config(TrainConfig):
    """Reasoner SFT settings (defaults: the CPU-scale run)."""

    model: str = Field("smollm2-135m-instruct", description="Base LLM: registry id, HF dir, GGUF or hub id (as the agent's reasoner.llm.model).")
    data: ReasonerDataConfig = Field(default_factory=ReasonerDataConfig)
    cases: Path | None = Field(None, description="A prebuilt cases.jsonl (from a previous run or --build-only) instead of building.")
    build_only: bool = Field(False, description="Build and write cases.jsonl, then stop (inspect the data).")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="Stop after this many optimiser steps (-1: epochs decide).")
    batch_size: int = Field(1, ge=1, description="Per-device batch size.")
    grad_accum: int = Field(8, ge=1, description="Gradient accumulation steps.")
    learning_rate: float = Field(2e-4, gt=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_length: int = Field(768, ge=32, description="Prompt + completion tokens; longer cases are dropped, never truncated (counted in the summary).")
    logging_steps: int = Field(5, ge=1)
    save_steps: int | None = Field(None, ge=1, description="Also save PEFT checkpoints every N steps under out_dir/checkpoints (None: only the final adapter).")
    threads: int | None = Field(None, ge=1, description="torch threads on CPU (None: torch's default).")
    bf16: bool | None = Field(None, description="None: bf16 on CUDA, fp32 on CPU.")
    gradient_checkpointing: bool | None = Field(None, description="None: on for CUDA, off on CPU.")


# --------------------------------------------------------------------------- shared by the reasoner trainers


def base_model_dir(model: str) -> str:
    """A local transformers directory of the base LLM (GGUF dequantised once into the cache)."""
    from models.backends.hf_llm import locate_causal_lm

    return locate_causal_lm(model)


def setup_torch(cfg: Any) -> str:
    """Thread count and device; returns the device name."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return resolve_device(cfg.device)


def shared_trainer_args(cfg: Any, prec: dict[str, Any]) -> dict[str, Any]:
    """TrainingArguments both reasoner trainers (SFT, GRPO) set the same way: output, logging,
    checkpointing, seeds, no dataloader workers or tqdm, and ``prec`` (from :func:`precision`)."""
    return dict(
        output_dir=str(cfg.out_dir / "checkpoints"),
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **prec,
    )


def precision(cfg: Any, device: str) -> dict[str, Any]:
    """TrainingArguments precision/memory kwargs: bf16 + gradient checkpointing on CUDA, fp32 on CPU
    (``bf16: true`` on a CPU with bf16 instructions autocasts the matmuls: about 2x faster)."""
    cuda = device.startswith("cuda")
    bf16 = cfg.bf16 if cfg.bf16 is not None else cuda
    gc = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else cuda
    import dataclasses

    from transformers import TrainingArguments

    # transformers 5 renamed gradient_checkpointing (the old name still works, with a warning).
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {"bf16": bf16, key: gc, "use_cpu": not cuda}


def load_tokenizer(where: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(where)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(where: str, device: str, bf16: bool):
    """The base model: bf16 weights on CUDA; fp32 weights on CPU (bf16 there is autocast only, keeping
    the LoRA updates and the optimiser in fp32)."""
    from transformers import AutoModelForCausalLM

    from models.backends.hf_llm import dtype_kwargs

    dtype = "bfloat16" if bf16 and device.startswith("cuda") else "float32"
    return AutoModelForCausalLM.from_pretrained(where, **dtype_kwargs(dtype)).to(device)


def metrics_callback(out_dir: Path):
    """A TrainerCallback appending every log (loss, rewards, lr, ...) with its step to ``<out_dir>/metrics.jsonl``
    (:class:`training.outputs.MetricsLog`, the one metrics log of every trainer)."""
    from transformers import TrainerCallback

    from training.outputs import MetricsLog

    log = MetricsLog(out_dir)

    class JsonlMetrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                log.log(**{"step": state.global_step, "epoch": state.epoch, **logs})  # newer transformers put epoch in logs too

    return JsonlMetrics()


def save_adapter(model, out: Path, base: str, meta: dict[str, Any]) -> Path:
    """PEFT ``save_pretrained`` into ``out`` with the base recorded as its registry id / ref (not a cache path),
    plus ``dermgraph.json`` (how it was trained)."""
    model.peft_config["default"].base_model_name_or_path = base
    out.mkdir(parents=True, exist_ok=True)
    # No embedding check: it would look the base up on the Hub by the name recorded above.
    model.save_pretrained(out, save_embedding_layers=False)
    for extra in out.glob("README.md"):  # PEFT writes a hub model-card stub; the real card is models/artifacts/README.md
        extra.unlink()
    (out / "dermgraph.json").write_text(json.dumps(meta, indent=2, default=str))
    return out


def publish(adapter: Path, cfg: TrainConfig, notes: str) -> dict[str, Any]:
    """Copy the adapter to ``cfg.artifact`` (when set) and write ``out_dir/registry.yaml`` (when ``register_as``)."""
    from training import outputs

    info: dict[str, Any] = {"adapter": str(adapter)}
    target = outputs.publish(adapter, cfg.artifact, files=(*ADAPTER_FILES, "dermgraph.json"), overwrite=cfg.overwrite_artifact) or adapter
    if cfg.artifact is not None:
        info["artifact"] = str(target)
        info["artifact_bytes"] = sum((target / n).stat().st_size for n in ADAPTER_FILES)
    reg = outputs.write_registry_fragment(cfg.out_dir, cfg.register_as, target, role="adapter", fmt="peft-lora", notes=notes,
                                          licence="CC-BY-NC-ND-4.0 (trained on Derm7pt and HAM10000 cases)")  # fmt: skip
    if reg:
        info["registry"] = str(reg)
    return info


def load_cases(cfg: Config | Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The cases of ``cfg.cases`` or freshly built from ``cfg.data`` (also written to out_dir/cases.jsonl)."""
    if cfg.cases is not None:
        records = read_jsonl(cfg.cases)
        info: dict[str, Any] = {"cases_file": str(cfg.cases), "cases": len(records)}
    else:
        records, info = build_training_cases(cfg.data, cfg.feature_dir, cfg.seed)
        write_jsonl(records, cfg.out_dir / "cases.jsonl")
        (cfg.out_dir / "build.json").write_text(json.dumps(info, indent=2))
    return records, info


def token_lengths(tok, records: list[dict[str, Any]]) -> list[int]:
    """Prompt + completion token counts as the chat template renders them."""
    texts = [tok.apply_chat_template(r["prompt"] + r["completion"], tokenize=False) for r in records]
    return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]


# --------------------------------------------------------------------------- training


def train(cfg: Config, callbacks: Sequence[Any] = ()) -> dict:
    """``callbacks``: extra TrainerCallbacks (e.g. the GPU job's deadline)."""
    records, info = load_cases(cfg)
    summary: dict[str, Any] = {"data": {k: v for k, v in info.items() if k != "error_profile"}}
    if cfg.build_only:
        summary["cases_file"] = str(cfg.out_dir / "cases.jsonl")
        return summary

    import numpy as np
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    device = setup_torch(cfg)
    where = base_model_dir(cfg.model)
    tok = load_tokenizer(where)
    lengths = token_lengths(tok, records)
    kept = [r for r, n in zip(records, lengths) if n <= cfg.max_length]
    summary["tokens"] = {"max": int(max(lengths)), "mean": round(float(np.mean(lengths)), 1), "dropped_too_long": len(records) - len(kept)}
    if not kept:
        raise ValueError(f"every case is longer than max_length={cfg.max_length} tokens")
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in kept])

    prec = precision(cfg, device)
    args = SFTConfig(
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_ratio,
        max_length=cfg.max_length,
        completion_only_loss=True,
        **shared_trainer_args(cfg, prec),
    )
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), layers_to_transform=cfg.lora.layers, task_type="CAUSAL_LM")  # fmt: skip
    model = load_causal_lm(where, device, prec["bf16"])
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok, peft_config=lora,
                         callbacks=[metrics_callback(cfg.out_dir), *callbacks])  # fmt: skip
    result = trainer.train()

    meta = {"trainer": "reasoner-sft", "base": cfg.model, "cases": len(kept), "labels": info.get("labels"), "seed": cfg.seed,
            "steps": trainer.state.global_step, "train_loss": round(float(result.training_loss), 4), "device": device}  # fmt: skip
    adapter = save_adapter(trainer.model, cfg.out_dir / "adapter", cfg.model, meta)
    summary.update(meta)
    summary.update(publish(adapter, cfg, "LoRA adapter of SmolLM2-135M-Instruct for the reasoner (SFT on Derm7pt train+extra and perturbed HAM10000 cases)."))
    return summary


if __name__ == "__main__":  # pragma: no cover
    module_main("reasoner-sft")
