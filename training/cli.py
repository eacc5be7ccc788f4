"""``dermgraph train NODE --config FILE.yaml [--set key=value ...]``: one entry point for every trainer.

Each trainer is a module ``training.<name>`` exposing ``Config`` (a :class:`training.config.TrainConfig`)
and ``train(cfg) -> dict`` (its summary, also written to ``<out_dir>/summary.json``). The same module
runs as ``python -m training.<name> --config FILE.yaml``.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

TRAINERS: dict[str, str] = {
    "modality": "training.modality",
    "modality-heldout": "training.modality_heldout",
    "concepts": "training.concepts",
    "verifier": "training.verifier",
    "describer": "training.describer_vlm",
    "reasoner-sft": "training.reasoner_sft",
    "reasoner-grpo": "training.reasoner_grpo",
    "fusion": "training.fusion",
    "encoder": "training.encoder",
    "encoder-crossfit": "training.encoder_crossfit",
    "probe": "training.probe",
}


def trainer_module(node: str):
    """The trainer module for ``node``; unknown names list the valid ones."""
    if node not in TRAINERS:
        raise ValueError(f"unknown trainer {node!r}; valid: {', '.join(sorted(TRAINERS))}")
    return importlib.import_module(TRAINERS[node])


def run_training(node: str, config: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """Validate the config, train, write ``summary.json`` (with the config and wall time) and return it."""
    from training.config import load_train_config, seed_everything

    mod = trainer_module(node)
    cfg = load_train_config(mod.Config, config, overrides)
    seed_everything(cfg.seed)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "config.yaml").write_text(_yaml(cfg))
    t0 = time.time()
    summary = dict(mod.train(cfg) or {})
    summary.setdefault("trainer", node)
    summary["wall_s"] = round(time.time() - t0, 1)
    summary["config"] = cfg.model_dump(mode="json")
    (cfg.out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _yaml(cfg) -> str:
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def module_main(node: str, argv: list[str] | None = None) -> None:
    """``python -m training.<node> [--config FILE] [key=value ...]`` (also accepts ``--set key=value``)."""
    import argparse

    p = argparse.ArgumentParser(prog=f"python -m {TRAINERS[node]}")
    p.add_argument("--config", "-c", type=Path, default=None)
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    summary = run_training(node, a.config, a.sets + a.overrides)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2, default=str))


if __name__ == "__main__":  # pragma: no cover
    module_main(sys.argv[1], sys.argv[2:])
