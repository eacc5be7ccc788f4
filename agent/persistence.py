"""Checkpointers that keep paused (and finished) cases: SQLite by default, Postgres for teams.

A case is a LangGraph thread; its id is the thread id. Nothing here loads a model.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any

CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
"""Case ids are plain tokens: they name threads and never become paths, but are validated like one would."""


def check_case_id(case_id: str) -> str:
    if not isinstance(case_id, str) or not CASE_ID.match(case_id) or ".." in case_id:
        raise ValueError(f"invalid case id {case_id!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit")
    return case_id


def serializer():
    """LangGraph's serializer, allowed to rebuild only the state's own types from a checkpoint."""
    from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

    import agent.state as st

    names = [n for n in dir(st) if isinstance(getattr(st, n), type) and getattr(getattr(st, n), "__module__", "") == st.__name__]
    return JsonPlusSerializer(allowed_msgpack_modules=[(st.__name__, n) for n in names])


def open_checkpointer(target: str | Path):
    """A checkpointer for ``target``: a ``postgresql://`` URL (extra 'postgres') or a SQLite file path."""
    target = str(target)
    if target.startswith(("postgres://", "postgresql://")):
        try:
            from langgraph.checkpoint.postgres import PostgresSaver
            from psycopg import Connection
            from psycopg.rows import dict_row
        except ImportError as exc:  # pragma: no cover - depends on the extra
            raise ImportError("a postgresql:// checkpointer needs the 'postgres' extra: pip install 'dermgraph[postgres]'") from exc
        conn = Connection.connect(target, autocommit=True, prepare_threshold=0, row_factory=dict_row)
        saver = PostgresSaver(conn, serde=serializer())
        saver.setup()
        return saver
    try:
        from langgraph.checkpoint.sqlite import SqliteSaver
    except ImportError as exc:  # pragma: no cover - core dependency
        raise ImportError("the SQLite checkpointer needs langgraph-checkpoint-sqlite: pip install langgraph-checkpoint-sqlite") from exc
    path = Path(target).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
    # WAL: readers (the review page) do not block the writer; several worker processes can share the file.
    conn.execute("PRAGMA journal_mode=WAL")
    saver = SqliteSaver(conn, serde=serializer())
    saver.setup()
    return saver


def thread_ids(saver) -> list[str]:
    """Every case (thread) the checkpointer holds, oldest first."""
    conn = getattr(saver, "conn", None)
    if isinstance(conn, sqlite3.Connection):
        with saver.lock:
            rows = conn.execute("SELECT thread_id, MIN(checkpoint_id) FROM checkpoints WHERE checkpoint_ns = '' GROUP BY thread_id ORDER BY 2").fetchall()
        return [r[0] for r in rows]
    if hasattr(saver, "_cursor"):  # Postgres
        with saver._cursor() as cur:
            cur.execute("SELECT thread_id, MIN(checkpoint_id) AS first FROM checkpoints WHERE checkpoint_ns = '' GROUP BY thread_id ORDER BY first")
            return [r["thread_id"] for r in cur.fetchall()]
    seen: dict[str, Any] = {}
    for t in saver.list(None):
        seen.setdefault(t.config["configurable"]["thread_id"], t.checkpoint["id"])
    return sorted(seen, key=seen.get)
