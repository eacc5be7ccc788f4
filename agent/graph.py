"""The LangGraph graph: encode → modality → morphology → retrieve → reason ⇄ verify, with an optional
``review`` pause (agent.review) after morphology or verify.

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
from agent.review import after_review, policy, review_node, reviewed_view, wants_review_after_morphology, wants_review_after_verify
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


def _sees_review(fn):
    """Nodes after a review read the reviewer's findings in place of the model's."""

    def run(state: CaseState, rt):
        return fn(reviewed_view(state), rt)

    run.__name__ = fn.__name__
    return run


AFTER_REVIEW = ("retrieve", "reason", "verify")
"""Nodes that can run after a review: they read the reviewer's findings (the model's stay in the state)."""


def after_retrieve(state: CaseState, config: AgentConfig) -> Literal["reason", "verify"]:
    # Modalities without a diagnosis route (histopathology) go to the verifier, which abstains with the
    # reason, after their findings and evidence have been gathered.
    return "reason" if config.route(state.modality.label).reasoner else "verify"


def _router(runtime, route, review_route, reviews: bool):
    """A router that first asks the run's review policy whether to pause (``config.configurable.review``)."""

    def decide(state: CaseState, config=None) -> str:
        if reviews and runtime is not None and review_route(state, policy(runtime, config)):
            return "review"
        return route(state)

    decide.__name__ = route.__name__
    return decide


def after_morphology(state: CaseState) -> Literal["retrieve"]:
    return "retrieve"


def after_verify(state: CaseState) -> Literal["reason", "__end__"]:
    decision = state.verification.decision if state.verification else None
    if decision == "revise":
        return "reason"
    if decision in ("accept", "abstain"):
        return "__end__"
    raise ValueError(f"unexpected verifier decision {decision!r}")


def builder(runtime, input_schema=None, first: tuple[str, object] | None = None, reviews: bool = True,
            *, start_at: str | None = None, stop_after: str | None = None):  # fmt: skip
    """The uncompiled graph with nodes bound to ``runtime`` (their backends).

    ``first``: an extra (name, node) run before ``encode`` (the LangGraph server's input loader).
    ``reviews``: whether cases may pause (only where a checkpointer will hold them).
    ``start_at``/``stop_after``: only the part between these two nodes; the state given must then hold
    what the skipped nodes would have written (e.g. ``encoding`` for ``start_at="modality"``)."""
    from langgraph.graph import END, START, StateGraph

    part = nodes_between(start_at, stop_after)
    if part == tuple(NODES):
        part += ("review",)  # the whole graph has the review node; a part never pauses

    def to(*names: str) -> dict[str, str]:
        return {n: n if n in part else END for n in names}

    def edge(a: str, b: str) -> None:
        if a in part:
            g.add_edge(a, b if b in part else END)

    def branch(a: str, router, *names: str) -> None:
        if a in part:
            g.add_conditional_edges(a, router, to(*names))

    g = StateGraph(CaseState, input_schema=input_schema) if input_schema is not None else StateGraph(CaseState)
    for name in part:
        fn = review_node if name == "review" else NODES[name]
        g.add_node(name, traced(name, _sees_review(fn) if name in AFTER_REVIEW else fn, runtime))
    if first is not None:
        g.add_node(first[0], first[1])
        g.add_edge(START, first[0])
        g.add_edge(first[0], part[0])
    else:
        g.add_edge(START, part[0])
    config = runtime.config if runtime is not None else AgentConfig()

    def reason_or_verify(state: CaseState) -> Literal["reason", "verify"]:
        return after_retrieve(state, config)

    edge("encode", "modality")
    branch("modality", after_modality, "morphology", "verify")
    branch("morphology", _router(runtime, after_morphology, wants_review_after_morphology, reviews), "retrieve", "review")
    branch("retrieve", reason_or_verify, "reason", "verify")
    edge("reason", "verify")
    branch("verify", _router(runtime, after_verify, wants_review_after_verify, reviews), "reason", "review", "__end__")
    branch("review", after_review, "retrieve", "reason", "__end__")
    return g


def build_graph(runtime, checkpointer=None, *, start_at: str | None = None, stop_after: str | None = None):
    """Compile the agent graph (or the part from ``start_at`` to ``stop_after``). A ``checkpointer`` is
    needed for review pauses (agent.persistence)."""
    return builder(runtime, reviews=checkpointer is not None, start_at=start_at, stop_after=stop_after).compile(checkpointer=checkpointer)


def mermaid() -> str:
    """The graph as a Mermaid diagram (no models are loaded)."""
    return build_graph(runtime=None).get_graph().draw_mermaid()
