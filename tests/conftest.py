import socket

import pytest

from models.paths import data_dir


@pytest.fixture(scope="session")
def shared_data():
    """Path to ../shared/data; tests that need it are skipped when it is absent."""
    d = data_dir()
    if not d.is_dir():
        pytest.skip(f"shared data not found at {d}")
    return d


@pytest.fixture
def no_network(monkeypatch):
    """Block outbound sockets for the duration of a test (loopback stays allowed)."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1")):
            return real_connect(self, address)
        raise OSError(f"network blocked in test: {address}")

    monkeypatch.setattr(socket.socket, "connect", guarded)
    yield


def pytest_collection_modifyitems(config, items):
    """GPU-only tests are skipped where no CUDA device is present (CI never has one)."""
    if not any("gpu" in item.keywords for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
