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


# Rows per source for the trainers' smoke tests: a deterministic, class-spread handful per split.
TINY_ROWS = {"derm7pt": 36, "isic2018_val": 14, "ham10000": 24, "dermnet": 12, "histology": 8}


@pytest.fixture(scope="session")
def tiny_features(shared_data, tmp_path_factory):
    """A feature cache in the layout of ``.cache/features`` (``<source>__full.npz``: ids, probs,
    features, labels) computed with the real sklesion network for a few images per source, so the
    trainers' smoke configurations run in CI where the full cache does not exist.

    Derm7pt rows span train, extra and val; HAM10000 rows span train and val and every class."""
    import csv

    import numpy as np
    from PIL import Image

    from models.sklesion import SklesionClassifier

    out = tmp_path_factory.mktemp("features")
    clf = SklesionClassifier()
    files = {"ham10000": ("metadata.csv", "image", ""), "isic2018_val": ("labels.csv", "image", ""),
             "derm7pt": ("meta.csv", "derm", "images/"), "dermnet": ("labels.csv", "image", ""),
             "histology": ("labels.csv", "image", "")}  # fmt: skip
    for source, n in TINY_ROWS.items():
        name, col, prefix = files[source]
        with open(shared_data / source / name, newline="") as f:
            rows = list(csv.DictReader(f))
        key = next((k for k in ("split", "dx", "label", "source_group") if k in rows[0]), None)
        groups: dict[str, list] = {}
        for r in rows:
            g = r.get(key, "") + "|" + (r.get("dx") or r.get("diagnosis") or "") if key else ""
            groups.setdefault(g, []).append(r)
        picked, i = [], 0
        while len(picked) < n and any(len(v) > i for v in groups.values()):
            picked += [v[i] for v in groups.values() if len(v) > i][: n - len(picked)]
            i += 1
        ids = [f"{source}/{prefix}{r[col]}" for r in picked]
        metas = [{"age": r.get("age") or None, "sex": r.get("sex"), "localization": r.get("localization")} for r in picked] if source == "ham10000" else None
        res = clf.predict([Image.open(shared_data / i).convert("RGB") for i in ids], metas)
        np.savez(out / f"{source}__full.npz", ids=np.array(ids, dtype=str), probs=res.probs.astype(np.float32),
                 features=res.features.astype(np.float16), labels=np.array(clf.labels, dtype=str))  # fmt: skip
    return out
