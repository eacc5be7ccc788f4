"""Train the feature VLM morphology describer (LLaVA-style, two stages) and compare it with the concept heads.

Stage 1 trains the projector only (LLM frozen), stage 2 the projector plus a LoRA adapter, both with
TRL's ``SFTTrainer`` (the model is the LLM itself, with the projector as a submodule and a decoder
pre-hook that splices the projected features in; see :mod:`models.backends.feature_vlm_net`). Data: Derm7pt train +
extra (and HAM10000 train questions in stage 1), from :mod:`training.describer_data`. Evaluation
generates a description for every Derm7pt ``val`` case, reads the seven criteria back with
:func:`models.vocabulary.parse_findings` and scores them like the concept heads.

    dermgraph train describer --config configs/train/describer.yaml
    python -m training.describer_vlm --config configs/train/describer.yaml eval_only=models/artifacts/feature_vlm_describer
    accelerate launch --config_file configs/accelerate/fsdp.yaml -m training.describer_vlm --config configs/train/describer.yaml device=cuda
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydantic import Field

from models.vocabulary import SEVEN_POINT
from training.cli import module_main
from training.config import Strict, TrainConfig, resolve_device

LICENCE = "CC-BY-NC-ND-4.0 (derived from Derm7pt; stage-1 data also HAM10000, CC BY-NC-SA 4.0); base LLM Apache-2.0"
ARTIFACT_FILES = ("feature_vlm.json", "projector.safetensors", "adapter_model.safetensors", "adapter_config.json")
_SHORT = {"pigment_network": "PN", "streaks": "STR", "pigmentation": "PIG", "regression_structures": "RS",
          "dots_and_globules": "DaG", "blue_whitish_veil": "BWV", "vascular_structures": "VS"}  # fmt: skip


class StageConfig(Strict):
    """One training stage (stage 1: projector only; stage 2: projector + LoRA)."""

    steps: int = Field(100, ge=0, description="Optimiser steps (0 skips the stage).")
    batch_size: int = Field(8, ge=1, description="Per-device batch size.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (cosine schedule with warm-up).")
    warmup_ratio: float = Field(0.05, ge=0, le=1, description="Fraction of steps spent warming up.")
    describe_fraction: float = Field(0.6, ge=0, le=1, description="Share of Derm7pt turns that are full descriptions (the rest: one-criterion questions).")
    ham_fraction: float = Field(0.0, ge=0, le=1, description="Share of HAM10000 diagnosis/site/age/sex turns (format, not vision: sklesion was fitted on HAM10000).")
    balance: float = Field(0.5, ge=0, description="Draw Derm7pt cases with weight mean_c freq(value)^-balance (0 = uniform).")


class Config(TrainConfig):
    """Feature VLM describer: sklesion features (+ probabilities) → MLP projector → SmolLM2 (+ LoRA)."""

    base_model: str = Field("smollm2-135m-instruct", description="Registry id, HF directory or GGUF of the base LLM.")
    n_visual_tokens: int = Field(4, ge=1, description="Embeddings the projector makes from one feature vector.")
    projector_hidden: int = Field(512, ge=8, description="Hidden width of the projector MLP.")
    projector_dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the standardised input features.")
    use_probs: bool = Field(True, description="Append the lesion classifier's 7 probabilities to the features.")
    max_length: int = Field(128, ge=16, description="Training sequences are cut to this many tokens (never inside the prompt).")
    stage1: StageConfig = Field(default_factory=lambda: StageConfig(steps=100, lr=1e-3, ham_fraction=0.15))
    stage2: StageConfig = Field(default_factory=lambda: StageConfig(steps=150, lr=2e-4))
    lora_r: int = Field(8, ge=1, description="LoRA rank (stage 2).")
    lora_alpha: int = Field(16, ge=1, description="LoRA alpha.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    lora_targets: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], description="Linear layers that get LoRA adapters.")
    max_train_cases: int | None = Field(None, ge=1, description="Use only the first N Derm7pt train/extra cases (smoke runs).")
    eval_max_cases: int | None = Field(None, ge=1, description="Evaluate on the first N Derm7pt val cases (None: all).")
    eval_max_new_tokens: int = Field(80, ge=1, description="Tokens generated per val description.")
    eval_batch_size: int = Field(24, ge=1, description="Val cases generated together.")
    eval_stage1: bool = Field(True, description="Also evaluate the stage-1 model (for the before/after table).")
    eval_only: Path | None = Field(None, description="Skip training: evaluate the describer saved in this directory against the concept heads.")
    concept_heads: str = Field("derm7pt-concept-heads", description="Registry id or path of the concept heads to compare with.")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default).")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward on CUDA (ignored on CPU).")
    artifact: Path | None = Field(None, description="Directory to publish the final describer to (e.g. models/artifacts/feature_vlm_describer).")


# --------------------------------------------------------------------------- data → batches


class TurnCollator:
    """Batches of {row, question, answer} → input_ids / attention_mask / labels (prompt masked with -100)
    and image_features (the rows of the feature matrix). Right padding; the prompt is never cut."""

    def __init__(self, vlm: Any, features: np.ndarray, max_length: int):
        self.vlm, self.features, self.max_length = vlm, features, max_length

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        from models.backends.feature_vlm_net import encode_turn

        tok, cfg = self.vlm.tokenizer, self.vlm.cfg
        ids, labels = [], []
        for e in examples:
            p, a = encode_turn(tok, cfg, e["question"], e["answer"], self.vlm.image_token_id)
            if len(p) >= self.max_length:
                raise ValueError(f"max_length={self.max_length} would cut the prompt ({len(p)} tokens)")
            ids.append((p + a)[: self.max_length])
            labels.append(([-100] * len(p) + a)[: self.max_length])
        width = max(map(len, ids))
        batch_ids = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
        batch_labels = torch.full((len(ids), width), -100, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for r, (i, l) in enumerate(zip(ids, labels)):
            batch_ids[r, : len(i)] = torch.tensor(i)
            batch_labels[r, : len(l)] = torch.tensor(l)
            mask[r, : len(i)] = 1
        rows = [int(e["row"]) for e in examples]
        return {"input_ids": batch_ids, "attention_mask": mask, "labels": batch_labels, "image_features": torch.from_numpy(self.features[rows])}


def _dataset(turns):
    from datasets import Dataset

    return Dataset.from_list([{"row": t.row, "question": t.question, "answer": t.answer} for t in turns])


# --------------------------------------------------------------------------- training


def _stage(name: str, vlm: Any, turns, features: np.ndarray, sc: StageConfig, cfg: Config, device: str, log, callbacks=()) -> dict[str, Any]:
    """Run one SFT stage with TRL on ``vlm.lm`` (whatever is trainable in it) and return its loss summary."""
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    losses: list[float] = []

    class LogLoss(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs and state.is_world_process_zero:
                losses.append(float(logs["loss"]))
                log.log(stage=name, step=state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))})

    cuda = device.startswith("cuda")
    args = SFTConfig(
        output_dir=str(cfg.out_dir / name / "trainer"),
        max_steps=sc.steps,
        per_device_train_batch_size=sc.batch_size,
        gradient_accumulation_steps=sc.grad_accum,
        learning_rate=sc.lr,
        lr_scheduler_type="cosine",
        warmup_steps=int(round(sc.warmup_ratio * sc.steps)),
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cuda,
        use_cpu=not cuda,
        # Explicit: TRL turns checkpointing on by default, which only costs time on a CPU.
        gradient_checkpointing=cuda and cfg.gradient_checkpointing,
        # The collator builds input_ids/labels from the raw turns: TRL must neither tokenize nor drop columns.
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        packing=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=vlm.lm,
        args=args,
        train_dataset=_dataset(turns),
        data_collator=TurnCollator(vlm, features, cfg.max_length),
        processing_class=vlm.tokenizer,
        callbacks=[LogLoss(), *callbacks],
    )
    t0 = time.time()
    trainer.train()
    n_trainable = sum(p.numel() for p in vlm.lm.parameters() if p.requires_grad)
    head, tail = losses[: max(1, len(losses) // 10)], losses[-max(1, len(losses) // 10) :]
    return {
        "steps": sc.steps,
        "steps_done": trainer.state.global_step,
        "trainable_params": n_trainable,
        "wall_s": round(time.time() - t0, 1),
        "loss_first": round(float(np.mean(head)), 4) if losses else None,
        "loss_last": round(float(np.mean(tail)), 4) if losses else None,
        "n_turns": len(turns),
    }


def _load_base(cfg: Config, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.backends.hf_llm import locate_causal_lm

    where = locate_causal_lm(cfg.base_model)
    tok = AutoTokenizer.from_pretrained(where)
    lm = AutoModelForCausalLM.from_pretrained(where).to(device)
    for p in lm.parameters():
        p.requires_grad_(False)
    return lm, tok


def train(cfg: Config, callbacks: Sequence[Any] = ()) -> dict:
    """``callbacks``: extra TrainerCallbacks for both stages (e.g. the GPU job's deadline)."""
    import torch

    from models.backends.feature_vlm_net import FeatureVLM, FeatureVLMConfig
    from training.describer_data import build_turns, load_cases
    from training.outputs import MetricsLog

    from accelerate import PartialState

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    is_main = PartialState().is_main_process
    device = resolve_device(cfg.device)
    if cfg.eval_only is not None:
        return evaluate_saved(cfg, device)
    log = MetricsLog(cfg.out_dir)
    lm, tok = _load_base(cfg, device)
    vcfg = FeatureVLMConfig(base_model=cfg.base_model, n_visual_tokens=cfg.n_visual_tokens, projector_hidden=cfg.projector_hidden,
                            projector_dropout=cfg.projector_dropout, use_probs=cfg.use_probs)  # fmt: skip
    vlm = FeatureVLM(lm, tok, vcfg)
    # Standardiser from the Derm7pt training cases (the evaluation domain; HAM10000 features are overconfident).
    _, x_train = load_cases(cfg.feature_dir, ("train", "extra"))
    if not cfg.use_probs:
        x_train = x_train[:, : vcfg.feature_dim]
    with torch.no_grad():
        vlm.projector.feature_mean.copy_(torch.from_numpy(x_train.mean(0)))
        vlm.projector.feature_std.copy_(torch.from_numpy(x_train.std(0) + 1e-3))
    vlm.projector.requires_grad_(True)

    summary: dict[str, Any] = {"device": device, "stages": {}, "eval": {}}
    heads = concept_head_eval(cfg)
    summary["eval"]["concept_heads"] = heads
    stages = (("stage1", cfg.stage1), ("stage2", cfg.stage2))
    for i, (name, sc) in enumerate(stages):
        if name == "stage2":
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM")
            vlm.set_lm(get_peft_model(vlm.lm, lora))
            vlm.projector.requires_grad_(True)  # PEFT froze everything but the adapter
        if sc.steps > 0:
            turns, feats = build_turns(cfg.feature_dir, n_turns=sc.steps * sc.batch_size * sc.grad_accum, seed=cfg.seed + i,
                                       describe_fraction=sc.describe_fraction, ham_fraction=sc.ham_fraction, balance=sc.balance,
                                       max_cases=cfg.max_train_cases)  # fmt: skip
            if not cfg.use_probs:
                feats = feats[:, : vcfg.feature_dim]
            summary["stages"][name] = _stage(name, vlm, turns, feats, sc, cfg, device, log, callbacks)
        if not is_main:  # under `accelerate launch`, rank 0 saves and evaluates
            continue
        vcfg.meta = {"id": cfg.register_as or "feature-vlm-describer", "stage": name, "trained_on": "Derm7pt train+extra" + (" + HAM10000 train (stage 1)" if cfg.stage1.ham_fraction else "")}
        saved = vlm.save_pretrained(cfg.out_dir / name)
        if name == "stage1" and not cfg.eval_stage1:
            continue
        ev = evaluate_describer(vlm, cfg, saved / "val_predictions.jsonl")
        summary["eval"][f"vlm_{name}"] = ev
        log.log(stage=name, eval=ev["metrics"]["mean"], parsed=ev["parsed_fraction"])

    if not is_main:
        return {"device": device, "rank": PartialState().process_index}
    summary["table"] = comparison_table(summary["eval"])
    final = cfg.out_dir / "stage2"
    metrics = {k: {m: v[m] for m in ("metrics", "parsed_fraction", "n_val")} for k, v in summary["eval"].items()}
    vcfg.meta["metrics_val"] = metrics.get("vlm_stage2", {})
    (final / "feature_vlm.json").write_text(json.dumps({**json.loads((final / "feature_vlm.json").read_text()), "meta": vcfg.meta}, indent=2))
    (final / "metrics.json").write_text(json.dumps(metrics, indent=2))
    from training.outputs import publish, write_registry_fragment

    summary["artifact"] = str(publish(final, cfg.artifact, files=(*ARTIFACT_FILES, "metrics.json"), overwrite=cfg.overwrite_artifact)) if cfg.artifact else None
    reg = write_registry_fragment(cfg.out_dir, cfg.register_as, final, role="vlm", licence=LICENCE, fmt="feature-vlm",
                                  notes="Feature VLM describer (sklesion features -> projector -> SmolLM2-135M-Instruct + LoRA).")  # fmt: skip
    summary["registry"] = str(reg) if reg else None
    heads_f1 = heads["metrics"]["mean"]["macro_f1"]
    vlm_f1 = summary["eval"].get("vlm_stage2", {}).get("metrics", {}).get("mean", {}).get("macro_f1")
    summary["beats_concept_heads"] = vlm_f1 is not None and vlm_f1 > heads_f1
    print(summary["table"])
    return summary


# --------------------------------------------------------------------------- evaluation


def _val_cases(cfg: Config):
    from training.describer_data import load_cases

    rows, x = load_cases(cfg.feature_dir, ("val",))
    if cfg.eval_max_cases is not None:
        rows, x = rows[: cfg.eval_max_cases], x[: cfg.eval_max_cases]
    if not rows:
        raise ValueError(f"no Derm7pt val cases with features in {cfg.feature_dir}")
    return rows, x


def criteria_from_text(texts: list[str]) -> tuple[dict[str, list[str]], float]:
    """Per-criterion predictions read from generated text; a criterion the text does not mention counts
    as 'absent' (descriptions usually omit what is not there). Also the fraction that was mentioned."""
    from models.vocabulary import parse_findings

    parsed = [parse_findings(t) for t in texts]
    pred = {c: [p.get(c, "absent") for p in parsed] for c in SEVEN_POINT}
    mentioned = sum(len(p) for p in parsed) / max(1, len(parsed) * len(SEVEN_POINT))
    return pred, round(mentioned, 4)


def evaluate_describer(vlm: Any, cfg: Config, predictions: Path | None = None) -> dict[str, Any]:
    """Generate the description of every val case, parse the criteria, score them (criteria_metrics)."""
    from evals.metrics import criteria_metrics

    rows, x = _val_cases(cfg)
    feats, probs = x[:, : vlm.cfg.feature_dim], x[:, vlm.cfg.feature_dim :]
    t0 = time.time()
    texts = vlm.generate(feats, probs=probs if vlm.cfg.use_probs else None, max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.eval_batch_size)
    pred, mentioned = criteria_from_text(texts)
    truth = {c: [r[c] for r in rows] for c in SEVEN_POINT}
    if predictions is not None:
        with predictions.open("w") as f:
            for r, t in zip(rows, texts):
                f.write(json.dumps({"id": r["image"], "text": t, "truth": {c: r[c] for c in SEVEN_POINT}}) + "\n")
    return {"metrics": criteria_metrics(truth, pred), "parsed_fraction": mentioned, "n_val": len(rows),
            "gen_s": round(time.time() - t0, 1), "examples": texts[:3]}  # fmt: skip


def concept_head_eval(cfg: Config) -> dict[str, Any]:
    """The shipped concept heads on the same val cases (argmax per criterion)."""
    from models.resolve import resolve_artifact
    from models.heads import HeadSet
    from evals.metrics import criteria_metrics

    rows, x = _val_cases(cfg)
    heads = HeadSet.load(resolve_artifact(cfg.concept_heads))
    probs = heads.predict_proba(x[:, : heads.mean.shape[0]])
    pred = {c: [heads.heads[c].classes[int(i)] for i in probs[c].argmax(1)] for c in SEVEN_POINT if c in heads.heads}
    truth = {c: [r[c] for r in rows] for c in SEVEN_POINT}
    return {"metrics": criteria_metrics(truth, pred), "parsed_fraction": 1.0, "n_val": len(rows)}


def comparison_table(evals: dict[str, dict[str, Any]]) -> str:
    """Markdown table: per-criterion macro-F1, mean accuracy and mean macro-F1 per system."""
    from training.outputs import table

    names = {"concept_heads": "concept heads (shipped)", "vlm_stage1": "feature VLM, stage 1 (projector)", "vlm_stage2": "feature VLM, stage 2 (+ LoRA)"}
    headers = ["system", *(f"{_SHORT[c]} F1" for c in SEVEN_POINT), "mean acc", "mean macro-F1", "criteria mentioned"]
    rows = []
    for key, ev in evals.items():
        m = ev["metrics"]
        rows.append([names.get(key, key), *(m.get(c, {}).get("macro_f1") for c in SEVEN_POINT), m["mean"]["accuracy"], m["mean"]["macro_f1"], ev["parsed_fraction"]])
    n = next(iter(evals.values()))["n_val"] if evals else 0
    return f"Derm7pt val ({n} cases), criteria read back from the generated text\n\n" + table(headers, rows)


def evaluate_saved(cfg: Config, device: str) -> dict[str, Any]:
    """``eval_only``: the saved describer vs the concept heads; prints the table."""
    from models.backends.feature_vlm_net import FeatureVLM

    vlm = FeatureVLM.load(cfg.eval_only, device=device)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    evals = {"concept_heads": concept_head_eval(cfg), "vlm_stage2": evaluate_describer(vlm, cfg, cfg.out_dir / "val_predictions.jsonl")}
    evals = {"concept_heads": evals["concept_heads"], Path(cfg.eval_only).name: evals["vlm_stage2"]}
    out = {"eval": evals, "table": comparison_table(evals)}
    print(out["table"])
    return out


if __name__ == "__main__":  # pragma: no cover
    module_main("describer")
