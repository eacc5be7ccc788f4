"""Serving dermgraph: the LangGraph server graph (``langgraph.json``), the HTTP API with its review page
(``dermgraph serve``) and the review CLI (``dermgraph review``). Needs the ``serve`` extra for the HTTP parts."""
