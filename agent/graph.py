"""The LangGraph graph: encode → modality → morphology → retrieve → reason ⇄ verify.

``build_graph(runtime, start_at=..., stop_after=...)`` compiles a part of it: evaluation runs only the
first nodes, training data starts from cached encoder outputs. A part keeps the routing of the whole
(a rejected image still skips the describer); an edge leaving the part ends the run.
"""

from __future__ import annotations

from typing import Literal

from agent.config import AgentConfig
from agent.nodes.base import traced
from agent.nodes.encode import encode
from agent.nodes.modality import classify_modality
from agent.nodes.morphology import describe
from agent.nodes.reason import reason
from agent.nodes.retrieve import retrieve
from agent.nodes.verify import verify
from agent.state import CaseState

NODES = {
    "encode": encode,
    "modality": classify_modality,
    "morphology": describe,
    "retrieve": retrieve,
    "reason": reason,
    "verify": verify,
}
"""The nodes in graph order (each writes the state field of its name, ``encode`` writes ``encoding``)."""

CONFIG_READ = {
    "encode": ("device", "seed", "encoder"),
    "modality": ("modality",),
    "morphology": ("morphology", "routing"),
    "retrieve": ("retrieval", "routing"),
    "reason": ("reasoner",),
    "verify": ("verifier",),
}
"""The configuration sections each node's result depends on (a partial run's results depend on its nodes' only)."""


def nodes_between(start_at: str | None = None, stop_after: str | None = None) -> tuple[str, ...]:
    """Names of the nodes from ``start_at`` to ``stop_after`` (inclusive; None: the first, the last)."""
    order = list(NODES)
    for name in (start_at, stop_after):
        if name is not None and name not in NODES:
            raise ValueError(f"unknown node {name!r}; valid: {', '.join(order)}")
    first = order.index(start_at) if start_at else 0
    last = order.index(stop_after) if stop_after else len(order) - 1
    if last < first:
        raise ValueError(f"stop_after={stop_after!r} comes before start_at={start_at!r}")
    return tuple(order[first : last + 1])


def config_sections(start_at: str | None = None, stop_after: str | None = None) -> tuple[str, ...]:
    """The configuration sections a run from ``start_at`` to ``stop_after`` reads."""
    return tuple(s for n in nodes_between(start_at, stop_after) for s in CONFIG_READ[n])


def after_modality(state: CaseState) -> Literal["morphology", "verify"]:
    if state.modality is None:
        raise ValueError("modality node produced no result")
    return "verify" if state.modality.rejected else "morphology"


def after_retrieve(state: CaseState, config: AgentConfig) -> Literal["reason", "verify"]:
    # Modalities without a diagnosis route (histopathology) go to the verifier, which abstains with the
    # reason, after their findings and evidence have been gathered.
    return "reason" if config.route(state.modality.label).reasoner else "verify"


def after_verify(state: CaseState) -> Literal["reason", "__end__"]:
    decision = state.verification.decision if state.verification else None
    if decision == "revise":
        return "reason"
    if decision in ("accept", "abstain"):
        return "__end__"
    raise ValueError(f"unexpected verifier decision {decision!r}")


def build_graph(runtime, *, start_at: str | None = None, stop_after: str | None = None):
    """Compile the agent graph with nodes bound to ``runtime`` (their backends).

    ``start_at``/``stop_after`` compile the part between two nodes: the state given must then hold what
    the skipped nodes would have written (e.g. ``encoding`` for ``start_at="modality"``)."""
    from langgraph.graph import END, START, StateGraph

    part = nodes_between(start_at, stop_after)

    def to(*names: str) -> dict[str, str]:
        return {n: n if n in part else END for n in names}

    def edge(a: str, b: str) -> None:
        if a in part:
            g.add_edge(a, b if b in part else END)

    def branch(a: str, router, *names: str) -> None:
        if a in part:
            g.add_conditional_edges(a, router, to(*names))

    g = StateGraph(CaseState)
    for name in part:
        g.add_node(name, traced(name, NODES[name], runtime))
    g.add_edge(START, part[0])
    edge("encode", "modality")
    branch("modality", after_modality, "morphology", "verify")
    edge("morphology", "retrieve")
    config = runtime.config if runtime is not None else AgentConfig()

    def reason_or_verify(state: CaseState) -> Literal["reason", "verify"]:
        return after_retrieve(state, config)

    branch("retrieve", reason_or_verify, "reason", "verify")
    edge("reason", "verify")
    branch("verify", after_verify, "reason", "__end__")
    return g.compile()


def mermaid() -> str:
    """The graph as a Mermaid diagram (no models are loaded)."""
    return build_graph(runtime=None).get_graph().draw_mermaid()
