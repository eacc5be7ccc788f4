"""The LangGraph graph: encode → modality → morphology → retrieve → reason ⇄ verify, with an optional
``review`` pause (agent.review) after morphology or verify."""

from __future__ import annotations

from typing import Literal

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


def after_retrieve(state: CaseState) -> Literal["reason", "verify"]:
    # Only dermoscopy and clinical photos have diagnosis models; histopathology goes to the verifier
    # (which abstains with the reason) after its findings and evidence have been gathered.
    return "reason" if state.modality.label in ("dermoscopy", "clinical") else "verify"


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


def builder(runtime, input_schema=None, first: tuple[str, object] | None = None, reviews: bool = True):
    """The uncompiled graph with nodes bound to ``runtime`` (their backends).

    ``first``: an extra (name, node) run before ``encode`` (the LangGraph server's input loader).
    ``reviews``: whether cases may pause (only where a checkpointer will hold them)."""
    from langgraph.graph import END, START, StateGraph

    g = StateGraph(CaseState, input_schema=input_schema) if input_schema is not None else StateGraph(CaseState)
    for name, fn in {**NODES, "review": review_node}.items():
        g.add_node(name, traced(name, _sees_review(fn) if name in AFTER_REVIEW else fn, runtime))
    if first is not None:
        g.add_node(first[0], first[1])
        g.add_edge(START, first[0])
        g.add_edge(first[0], "encode")
    else:
        g.add_edge(START, "encode")
    g.add_edge("encode", "modality")
    g.add_conditional_edges("modality", after_modality, {"morphology": "morphology", "verify": "verify"})
    g.add_conditional_edges("morphology", _router(runtime, after_morphology, wants_review_after_morphology, reviews), {"retrieve": "retrieve", "review": "review"})
    g.add_conditional_edges("retrieve", after_retrieve, {"reason": "reason", "verify": "verify"})
    g.add_edge("reason", "verify")
    g.add_conditional_edges("verify", _router(runtime, after_verify, wants_review_after_verify, reviews), {"reason": "reason", "review": "review", "__end__": END})
    g.add_conditional_edges("review", after_review, {"retrieve": "retrieve", "reason": "reason", "__end__": END})
    return g


def build_graph(runtime, checkpointer=None):
    """Compile the agent graph. A ``checkpointer`` is needed for review pauses (agent.persistence)."""
    return builder(runtime, reviews=checkpointer is not None).compile(checkpointer=checkpointer)


def mermaid() -> str:
    """The graph as a Mermaid diagram (no models are loaded)."""
    return build_graph(runtime=None).get_graph().draw_mermaid()
