"""The LangGraph server graph without the server: input schema, image decoding, no compiled-in checkpointer."""

import base64

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command

from agent.imageio import ImageInputError
from serve import langgraph_app
from tests.serve_helpers import png_bytes


def test_decode_image_input(tmp_path):
    raw = png_bytes()
    b64 = base64.b64encode(raw).decode()
    assert langgraph_app.decode_image_input("data:image/png;base64," + b64) == raw
    assert langgraph_app.decode_image_input(b64) == raw
    assert str(langgraph_app.decode_image_input(str(tmp_path / "x.jpg"), allow_paths=True)) == str(tmp_path / "x.jpg")
    with pytest.raises(ImageInputError, match="file paths are off"):  # off by default: no file is read or probed
        langgraph_app.decode_image_input(str(tmp_path / "x.jpg"))
    with pytest.raises(ImageInputError, match="non-empty"):
        langgraph_app.decode_image_input("  ")


def test_factory_graph_has_narrow_input_and_no_checkpointer(monkeypatch):
    monkeypatch.setenv("DERMGRAPH_BACKENDS", "agent.testing:backends")
    monkeypatch.setattr(langgraph_app, "_runtime", None)
    g = langgraph_app.make_graph()
    assert g.checkpointer is None
    schema = g.get_input_jsonschema()
    assert set(schema["properties"]) == {"image", "question", "metadata"} and schema["required"] == ["image"]

    kept = g.builder.compile(checkpointer=InMemorySaver())  # what the server does
    cfg = {"configurable": {"thread_id": "t1", "review": {"when": "always"}}}
    out = kept.invoke({"image": base64.b64encode(png_bytes()).decode(), "metadata": {"age": 50}}, cfg)
    assert out["__interrupt__"][0].value["stage"] == "verify"
    out = kept.invoke(Command(resume={"reviewer": "r1", "diagnosis": "mel"}), cfg)
    assert out["review"].last.action == "confirm" and [t.node for t in out["trace"]][-1] == "review"
    with pytest.raises(ImageInputError, match="file paths are off"):
        kept.invoke({"image": "/no/such/file.jpg"}, {"configurable": {"thread_id": "t2"}})
    monkeypatch.setenv("DERMGRAPH_ALLOW_IMAGE_PATHS", "1")  # opted in: a path is read, and a missing file says so
    with pytest.raises(ImageInputError, match="file not found"):
        kept.invoke({"image": "/no/such/file.jpg"}, {"configurable": {"thread_id": "t3"}})
