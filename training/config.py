"""Training configuration: one pydantic model per trainer, loaded from YAML, overridable with ``key=value``.

Every trainer module (``training.<node>``) defines ``Config(TrainConfig)`` and ``train(cfg) -> dict``.
Unknown keys are errors, as in the agent's configuration: the message names the likely key and the valid ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field

from agent.config import _merge, parse_overrides, validate_explained


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TrainConfig(Strict):
    """Fields every trainer shares."""

    seed: int = Field(0, description="Seeds python, numpy and torch; data building is deterministic given the seed.")
    out_dir: Path = Field(Path("runs/train"), description="Checkpoints, metrics.jsonl, summary.json and plots go here.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' picks CUDA when available.")
    feature_dir: Path = Field(Path(".cache/features"), description="Cached encoder features (scripts/extract_features.py).")
    artifact: Path | None = Field(None, description="Where to write the artifact the agent loads (e.g. models/artifacts/...). None: only out_dir.")
    register_as: str | None = Field(
        None, description="Registry id written to <out_dir>/registry.yaml, so DERMGRAPH_MODELS=<that file> makes the result usable by config."
    )
    overwrite_artifact: bool = Field(
        False, description="Replace `artifact` even when it is a shipped, registered file (its registry sha256 must then be updated). "
        "False: a registered artifact is kept and the new one is written under out_dir."
    )


C = TypeVar("C", bound=TrainConfig)


def load_train_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """``cls`` from YAML (optional) plus dotted overrides; unknown keys raise a ValidationError.

    Relative paths in the YAML stay relative to the working directory (run from the repository root).
    """
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: top level must be a mapping")
        data = loaded
    return validate_explained(cls, _merge(data, parse_overrides(overrides)))


def resolve_device(name: str) -> str:
    """'auto' → 'cuda' when a GPU is visible, else 'cpu'."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover - torch is a core dependency
        pass
