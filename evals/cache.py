"""Per-case prediction cache: re-scoring never re-runs a model, and a killed run resumes.

Records live in append-only JSONL shards under ``<out>/predictions/`` (one shard per writing process,
each line fsynced), one line per case: ``{"key", "kind", "case_id", "status", ...}``. The key is the
SHA-256 of the image (the agent's own ``image_sha256``: size + decoded RGB pixels, so it matches the
``diagnosis.image_sha256`` of ``dermgraph batch`` records), the configuration fingerprint and the case's
inputs (question, patient metadata) and the kind of prediction (full agent, modality only, ...).
A line torn by ``kill -9`` is ignored on read and cut off before the shard is appended to again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

AGENT = "agent"
"""Kind of a full ``Agent.diagnose`` record (what ``dermgraph batch`` writes)."""


def normalise_metadata(metadata: dict[str, Any] | None) -> dict[str, Any]:
    """Patient metadata as the agent records it (validated, None fields dropped), so that a case's
    key and the key of a record carrying the same metadata agree."""
    if not metadata:
        return {}
    from agent.state import PatientMetadata

    return PatientMetadata.model_validate(metadata).as_dict()


def case_key(image_sha256: str, fingerprint: str, question: str | None = None, metadata: dict[str, Any] | None = None, kind: str = AGENT) -> str:
    """The cache key of one prediction."""
    payload = {"kind": kind, "image": image_sha256, "config": fingerprint, "question": question or None, "metadata": normalise_metadata(metadata)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _read_lines(path: Path) -> Iterator[dict[str, Any]]:
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # bytes after the last newline are a torn write
    for line in data[:end].splitlines():
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line followed by a later append; the case is simply recomputed


def _truncate_torn(path: Path) -> None:
    if path.exists():
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with path.open("r+b") as f:
                f.truncate(end)


class PredictionCache:
    """The prediction store of one output folder (implements ``evals.base.PredictionStore``).

    ``shard`` names the file this process appends to; every shard is read. Later lines win.
    """

    def __init__(self, root: str | Path, shard: str = "main"):
        self.root = Path(root)
        self.shard_path = self.root / f"{shard}.jsonl"
        self._records: dict[str, dict[str, Any]] = {}
        self.reload()

    def reload(self) -> None:
        """Re-read every shard (after worker processes have written theirs)."""
        self._records = {}
        if self.root.is_dir():
            for p in sorted(self.root.glob("*.jsonl")):
                for rec in _read_lines(p):
                    if "key" in rec:
                        self._records[rec["key"]] = rec

    def get(self, key: str) -> dict | None:
        return self._records.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def put(self, key: str, record: dict) -> None:
        """Append one record (fsynced) and keep it in memory."""
        rec = {**record, "key": key}
        self.root.mkdir(parents=True, exist_ok=True)
        if not getattr(self, "_opened", False):
            _truncate_torn(self.shard_path)
            self._opened = True
        with self.shard_path.open("a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._records[key] = rec

    def import_records(self, path: str | Path, fingerprint: str | None = None, accept_configs: Sequence[str] = ()) -> dict[str, int]:
        """Import the ``ok`` records of a ``dermgraph batch`` results file as full-agent predictions.

        Only records made with configuration ``fingerprint`` (their ``diagnosis.versions.config``) are
        taken when it is given. Each is keyed from its own inputs (image hash, question, metadata), so it
        is used exactly for the benchmark cases with the same image and inputs. A torn last line (a run
        still writing) is skipped. ``accept_configs``: fingerprints of older configurations to treat as
        ``fingerprint`` (e.g. the schema gained a field with a neutral default after the batch ran); such
        records are keyed as the current configuration and marked ``config_accepted_as``.
        Returns counts: imported, accepted from another config, already cached, other config, not ok.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"batch results not found: {path}")
        stats = {"imported": 0, "accepted_other_config": 0, "already_cached": 0, "other_config": 0, "not_ok": 0}
        for rec in _read_lines(path):
            diag = rec.get("diagnosis")
            if rec.get("status") != "ok" or not isinstance(diag, dict) or not diag.get("image_sha256"):
                stats["not_ok"] += 1
                continue
            fp = (diag.get("versions") or {}).get("config")
            extra: dict[str, Any] = {}
            if fingerprint is not None and fp != fingerprint:
                if fp not in accept_configs:
                    stats["other_config"] += 1
                    continue
                extra = {"config_accepted_as": fingerprint}
                fp = fingerprint
            key = case_key(diag["image_sha256"], fp or "", diag.get("question"), diag.get("metadata"), AGENT)
            if key in self._records:
                stats["already_cached"] += 1
                continue
            self.put(key, {"kind": AGENT, "case_id": rec.get("id"), "status": "ok", "diagnosis": diag, "imported_from": str(path), **extra})
            stats["accepted_other_config" if extra else "imported"] += 1
        return stats


class ImageHashes:
    """Memo of image hashes (``agent.imageio.load_image(...).sha256``) by file path, size and mtime,
    stored beside the predictions so a rescore does not decode every image again."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._memo: dict[str, str] = {}
        if self.path.is_file():
            try:
                self._memo = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                self._memo = {}  # a torn write; hashes are recomputed
        self._dirty = False

    def sha256(self, image: Path) -> str:
        """The agent's hash of ``image``; raises ``agent.imageio.ImageInputError`` when unreadable."""
        st = image.stat()
        memo_key = f"{image.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if memo_key not in self._memo:
            from agent.imageio import load_image

            self._memo[memo_key] = load_image(image).sha256
            self._dirty = True
        return self._memo[memo_key]

    def save(self) -> None:
        if self._dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._memo))
            os.replace(tmp, self.path)
            self._dirty = False
