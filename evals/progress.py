"""One progress reporter for every evaluation loop (the agent's prediction runs and the protocols' cache fills)."""

from __future__ import annotations

import time
from typing import Callable


class Progress:
    """Logs ``done/total``, errors, the throughput of what was actually computed (cache hits excluded) and an
    ETA: at the first and fifth item, every ``every_s`` seconds and at the end."""

    def __init__(self, log: Callable[[str], None], what: str, total: int, every_s: float = 10.0, unit: str = "cases") -> None:
        self.log, self.what, self.total, self.every_s, self.unit = log, what, total, every_s, unit
        self.done = self.computed = self.errors = 0
        self.t0 = self.last = time.perf_counter()

    def rate(self) -> float:
        """Computed items per second so far."""
        dt = time.perf_counter() - self.t0
        return self.computed / dt if dt > 0 else 0.0

    def update(self, n_done: int = 1, n_computed: int | None = None, status: str = "ok", force: bool = False) -> None:
        """``n_done`` more items finished, ``n_computed`` of them computed now (default: all); ``status`` other than ok counts an error."""
        self.done += n_done
        self.computed += n_done if n_computed is None else n_computed
        self.errors += status != "ok"
        now = time.perf_counter()
        if force or self.done >= self.total or now - self.last >= self.every_s or self.done in (1, 5):
            self.last = now
            r = self.rate()
            eta = (self.total - self.done) / r if r > 0 else float("nan")
            self.log(f"{self.what}: {self.done}/{self.total} {self.unit} ({self.errors} errors, {self.computed} computed), "
                     f"{r:.2f} {self.unit}/s, ETA {eta:.0f} s")  # fmt: skip

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.t0
