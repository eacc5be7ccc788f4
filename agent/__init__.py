"""dermgraph's agent: ``from agent import Agent``. Imports are lazy so that ``import agent`` stays fast."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Agent", "AgentConfig", "Diagnosis", "ImageInputError", "ReviewDecision", "load_config"]

if TYPE_CHECKING:  # pragma: no cover
    from agent.agent import Agent
    from agent.config import AgentConfig, load_config
    from agent.diagnosis import Diagnosis
    from agent.imageio import ImageInputError
    from agent.review import ReviewDecision

_WHERE = {
    "Agent": "agent.agent",
    "AgentConfig": "agent.config",
    "load_config": "agent.config",
    "Diagnosis": "agent.diagnosis",
    "ImageInputError": "agent.imageio",
    "ReviewDecision": "agent.review",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'agent' has no attribute {name!r}")
