"""Helpers for the serving tests: a double-backed agent, a PNG, a free port, a uvicorn server in a thread."""

from __future__ import annotations

import io
import socket
import threading
import time

from PIL import Image

TOKEN = "test-token-1"


def png_bytes(colour=(150, 90, 70), size=(64, 48), exif: bool = False) -> bytes:
    buf = io.BytesIO()
    im = Image.new("RGB", size, colour)
    if exif:
        ex = Image.Exif()
        ex[0x010F] = "SecretCameraMaker"  # Make
        im.save(buf, "JPEG", exif=ex.tobytes())
    else:
        im.save(buf, "PNG")
    return buf.getvalue()


def make_agent(tmp_path, backends=None):
    from agent import Agent
    from agent.testing import backends as doubles

    return Agent(backends=backends or doubles(), overrides=[f"review.checkpointer={tmp_path / 'cases.sqlite'}"])


def make_app(tmp_path, agent=None, **settings):
    from serve.app import Settings, create_app

    s = Settings(data_dir=tmp_path / "data", tokens=[TOKEN], **settings)
    return create_app(agent or make_agent(tmp_path), s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 in a daemon thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
