"""The LangGraph graph: encode → modality → morphology → retrieve → reason ⇄ verify."""

from __future__ import annotations

from typing import Literal

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


def after_modality(state: CaseState) -> Literal["morphology", "verify"]:
    if state.modality is None:
        raise ValueError("modality node produced no result")
    return "verify" if state.modality.rejected else "morphology"


def after_retrieve(state: CaseState) -> Literal["reason", "verify"]:
    # Only dermoscopy and clinical photos have diagnosis models; histopathology goes to the verifier
    # (which abstains with the reason) after its findings and evidence have been gathered.
    return "reason" if state.modality.label in ("dermoscopy", "clinical") else "verify"


def after_verify(state: CaseState) -> Literal["reason", "__end__"]:
    decision = state.verification.decision if state.verification else None
    if decision == "revise":
        return "reason"
    if decision in ("accept", "abstain"):
        return "__end__"
    raise ValueError(f"unexpected verifier decision {decision!r}")


def build_graph(runtime):
    """Compile the agent graph with nodes bound to ``runtime`` (their backends)."""
    from langgraph.graph import END, START, StateGraph

    g = StateGraph(CaseState)
    for name, fn in NODES.items():
        g.add_node(name, traced(name, fn, runtime))
    g.add_edge(START, "encode")
    g.add_edge("encode", "modality")
    g.add_conditional_edges("modality", after_modality, {"morphology": "morphology", "verify": "verify"})
    g.add_edge("morphology", "retrieve")
    g.add_conditional_edges("retrieve", after_retrieve, {"reason": "reason", "verify": "verify"})
    g.add_edge("reason", "verify")
    g.add_conditional_edges("verify", after_verify, {"reason": "reason", "__end__": END})
    return g.compile()


def mermaid() -> str:
    """The graph as a Mermaid diagram (no models are loaded)."""
    return build_graph(runtime=None).get_graph().draw_mermaid()
