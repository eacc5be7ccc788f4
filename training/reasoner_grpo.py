"""Reasoner GRPO: TRL ``GRPOTrainer`` from the SFT adapter, with the rewards of :mod:`training.rewards`.

Rewards (weights in ``rewards``): correctness of the stated diagnosis, format validity, MAVIC-style
consistency of the stated diagnosis with the observed findings (the verifier's rule score, or the
trained consistency verifier with ``consistency_model``), and an optional calibration term. Each
component and the weighted total are logged per step to ``metrics.jsonl`` and plotted to
``reward_curves.png``.

    dermgraph train reasoner-grpo --config configs/train/reasoner_grpo.yaml
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from pydantic import Field

from training.cli import module_main
from training.config import Strict, TrainConfig
from training.reasoner_data import ReasonerDataConfig
from training.reasoner_sft import (
    LoraSettings,
    base_model_dir,
    load_cases,
    load_causal_lm,
    load_tokenizer,
    metrics_callback,
    precision,
    publish,
    save_adapter,
    setup_torch,
    shared_trainer_args,
    token_lengths,
)


class RewardWeights(Strict):
    """Weight of each reward function in the total (0 logs it without training on it)."""

    correctness: float = Field(1.0, description="Stated diagnosis = ground truth.")
    format: float = Field(0.5, description="Share of format checks passed (candidate, usable rationale, valid [E#] tags).")
    consistency: float = Field(0.5, description="Agreement of the observed findings with those expected for the stated diagnosis.")
    calibration: float = Field(0.0, description="The rationale flags conflicting evidence exactly when there is some.")


class Config(TrainConfig):
    """Reasoner GRPO settings (defaults: the CPU-scale run)."""

    model: str = Field("smollm2-135m-instruct", description="Base LLM (as the agent's reasoner.llm.model).")
    init_adapter: str | None = Field(None, description="PEFT adapter to continue from (the SFT result: a directory or registry id). None: fresh LoRA on the base.")
    data: ReasonerDataConfig = Field(default_factory=ReasonerDataConfig)
    cases: Path | None = Field(None, description="A prebuilt cases.jsonl (e.g. the SFT run's) instead of building.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="Used only without init_adapter.")
    rewards: RewardWeights = Field(default_factory=RewardWeights)
    consistency_model: str | None = Field(None, description="Trained consistency verifier (registry id or path) scoring the consistency reward. None: the rule score.")
    max_steps: int = Field(40, ge=1)
    num_generations: int = Field(4, ge=2, description="Completions per prompt (the GRPO group).")
    prompts_per_step: int = Field(1, ge=1, description="Prompts per optimiser step (per device).")
    steps_per_generation: int | None = Field(
        None, ge=1, description="Optimiser steps served by one generation batch (TRL; None: 1). On a GPU, generating for 4 steps at once costs about one step's generation time."
    )
    answer_prefix: bool = Field(
        True,
        description="Prompts end with the agent's assistant prefix 'Diagnosis: ' (as the agent scores and writes), so the "
        "policy learns the diagnosis and rationale rather than the opening; False: plain conversational prompts.",
    )
    max_completion_length: int = Field(64, ge=8)
    max_prompt_tokens: int = Field(768, ge=32, description="Cases with longer prompts are dropped.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature of the GRPO group (a 135M model at 1.0 mostly writes noise).")
    learning_rate: float = Field(5e-5, gt=0)
    beta: float = Field(0.0, ge=0, description="KL weight to the reference policy (0: no reference model, as in recent GRPO practice).")
    logging_steps: int = Field(1, ge=1)
    save_steps: int | None = Field(None, ge=1)
    threads: int | None = Field(None, ge=1)
    bf16: bool | None = None
    gradient_checkpointing: bool | None = None


def reward_functions(cfg: Config) -> tuple[list, list[float]]:
    """The reward functions (named as TRL logs them) and their weights, in config order."""
    from training import rewards as R

    consistency = R.consistency_reward if cfg.consistency_model is None else R.make_consistency_reward(R.verifier_scorer(cfg.consistency_model))
    funcs = {"correctness": R.correctness_reward, "format": R.format_reward, "consistency": consistency, "calibration": R.calibration_reward}
    weights = cfg.rewards.model_dump()
    return [funcs[k] for k in weights], [float(weights[k]) for k in weights]


def plot_reward_curves(log_history: list[dict[str, Any]], path: Path, weights: dict[str, float] | None = None) -> Path:
    """Each reward component's mean and the weighted total (TRL's ``reward``) per step, from the trainer's log history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in log_history if "reward" in r]
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    names = sorted({k.split("/")[1] for r in rows for k in r if k.startswith("rewards/") and k.endswith("/mean")})
    for name in names:
        key = f"rewards/{name}/mean"
        label = name.removesuffix("_reward") + (f" (w={weights.get(name.removesuffix('_reward'), 0):g})" if weights else "")
        ax.plot(steps, [r.get(key, float("nan")) for r in rows], marker=".", label=label)
    ax.plot(steps, [r["reward"] for r in rows], color="black", linewidth=2, label="total (weighted)")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean reward over the group")
    ax.set_title("Reasoner GRPO rewards")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _steps(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in log_history if "reward" in r]


def train(cfg: Config, callbacks: Sequence[Any] = ()) -> dict:
    """``callbacks``: extra TrainerCallbacks (e.g. the GPU job's deadline)."""
    import numpy as np
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from trl import GRPOConfig, GRPOTrainer

    records, info = load_cases(cfg)
    device = setup_torch(cfg)
    where = base_model_dir(cfg.model)
    tok = load_tokenizer(where)
    lengths = token_lengths(tok, [{"prompt": r["prompt"], "completion": []} for r in records])
    kept = [r for r, n in zip(records, lengths) if n <= cfg.max_prompt_tokens]
    if not kept:
        raise ValueError(f"every prompt is longer than max_prompt_tokens={cfg.max_prompt_tokens}")
    columns = ("prompt", "label_name", "candidates", "tags", "observed", "expected", "classifier_top")
    rows = [{k: r[k] for k in columns} for r in kept]
    if cfg.answer_prefix:
        from agent.prompts import DIAGNOSIS_PREFIX
        from models.backends.hf_llm import render_prompt

        # TRL uses a text prompt as is: the chat template + the agent's assistant prefix, exactly as
        # TransformersLLM renders it; the rewards put the prefix back in front before parsing.
        for r in rows:
            r["prompt"] = render_prompt(tok, r["prompt"], DIAGNOSIS_PREFIX)
            r["completion_prefix"] = DIAGNOSIS_PREFIX
    dataset = Dataset.from_list(rows)

    prec = precision(cfg, device)
    funcs, weights = reward_functions(cfg)
    batch = cfg.num_generations * cfg.prompts_per_step
    args = GRPOConfig(
        max_steps=cfg.max_steps,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_generations=cfg.num_generations,
        steps_per_generation=cfg.steps_per_generation,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="constant",
        beta=cfg.beta,
        reward_weights=weights,
        log_completions=False,
        **shared_trainer_args(cfg, prec),
    )
    model = load_causal_lm(where, device, prec["bf16"])
    peft_config = None
    if cfg.init_adapter:
        from models.backends.hf_llm import locate_adapter

        model = PeftModel.from_pretrained(model, str(locate_adapter(cfg.init_adapter)), is_trainable=True)
    else:
        peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=list(cfg.lora.target_modules),
                                 layers_to_transform=cfg.lora.layers, task_type="CAUSAL_LM")  # fmt: skip
    trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=dataset, processing_class=tok, peft_config=peft_config,
                          callbacks=[metrics_callback(cfg.out_dir), *callbacks])  # fmt: skip
    trainer.train()

    history = trainer.state.log_history
    steps = _steps(history)
    plot = plot_reward_curves(history, cfg.out_dir / "reward_curves.png", cfg.rewards.model_dump())

    def mean_of(key: str, rows: list[dict[str, Any]]) -> float | None:
        vals = [r[key] for r in rows if key in r]
        return round(float(np.mean(vals)), 4) if vals else None

    k = max(1, len(steps) // 4)
    keys = ["reward"] + sorted({key for r in steps for key in r if key.startswith("rewards/") and key.endswith("/mean")})
    curve = {key: {"first_quarter": mean_of(key, steps[:k]), "last_quarter": mean_of(key, steps[-k:])} for key in keys}
    meta = {"trainer": "reasoner-grpo", "base": cfg.model, "init_adapter": cfg.init_adapter, "cases": len(kept), "steps": trainer.state.global_step,
            "num_generations": cfg.num_generations, "reward_weights": cfg.rewards.model_dump(), "seed": cfg.seed, "device": device}  # fmt: skip
    adapter = save_adapter(trainer.model, cfg.out_dir / "adapter", cfg.model, meta)
    summary: dict[str, Any] = {**meta, "data": {k: v for k, v in info.items() if k != "error_profile"}, "rewards": curve, "reward_plot": str(plot)}
    summary.update(publish(adapter, cfg, "LoRA adapter of SmolLM2-135M-Instruct for the reasoner (SFT, then GRPO with correctness, format and consistency rewards)."))
    return summary


if __name__ == "__main__":  # pragma: no cover
    module_main("reasoner-grpo")
