"""A small FAISS wrapper: cosine (inner-product) search over L2-normalised vectors plus JSON records.

An index directory holds ``index.faiss``, ``records.jsonl`` (one record per vector, same order),
``manifest.json`` and, when PCA was used, ``pca.npz``. faiss is imported lazily.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
RECORDS_FILE = "records.jsonl"
MANIFEST_FILE = "manifest.json"
PCA_FILE = "pca.npz"


@dataclass(frozen=True)
class Hit:
    """One search result: the record id, the cosine similarity and the stored record."""

    id: str
    score: float
    record: dict[str, Any] = field(repr=False)


def _faiss():
    from models.backends import require

    return require("faiss", "gpu", "vector search")


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation in float32 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def records_sha256(records: Sequence[dict[str, Any]]) -> str:
    """sha256 of the records as written to records.jsonl (detects records/index drift)."""
    h = hashlib.sha256()
    for r in records:
        h.update(_record_line(r).encode("utf-8"))
    return h.hexdigest()


def _record_line(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n"


@dataclass
class PCA:
    """Linear projection fitted on build vectors; queries go through the same mean and components."""

    mean: np.ndarray  # (D,)
    components: np.ndarray  # (d, D)
    explained_variance_ratio: np.ndarray  # (d,)

    @classmethod
    def fit(cls, x: np.ndarray, dim: int) -> PCA:
        """Fit a ``dim``-component PCA on rows of ``x`` (dim is capped by the data's rank bound)."""
        x = np.asarray(x, dtype=np.float64)
        dim = int(min(dim, x.shape[0], x.shape[1]))
        if dim < 1:
            raise ValueError("PCA needs at least one vector and one dimension")
        mean = x.mean(axis=0)
        _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
        var = s**2
        ratio = var[:dim] / max(var.sum(), 1e-12)
        return cls(mean.astype(np.float32), vt[:dim].astype(np.float32), ratio.astype(np.float32))

    @property
    def in_dim(self) -> int:
        return int(self.components.shape[1])

    @property
    def out_dim(self) -> int:
        return int(self.components.shape[0])

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float32) - self.mean) @ self.components.T

    def save(self, path: Path) -> None:
        np.savez(path, mean=self.mean, components=self.components,
                 explained_variance_ratio=self.explained_variance_ratio)

    @classmethod
    def load(cls, path: Path) -> PCA:
        with np.load(path) as z:
            return cls(z["mean"], z["components"], z["explained_variance_ratio"])


def _validate_records(records: Sequence[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    if len(records) != n:
        raise ValueError(f"{n} vectors but {len(records)} records")
    seen: set[str] = set()
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("id"), str) or not isinstance(r.get("source"), str):
            raise ValueError(f"record {i} needs string 'id' and 'source' fields: {r!r}")
        if r["id"] in seen:
            raise ValueError(f"duplicate record id {r['id']!r}")
        seen.add(r["id"])
        out.append(dict(r))
    return out


def _portable_arg(arg: str) -> str:
    """Absolute paths become cwd-relative (or '<abs>/name'): manifests get committed, machine paths must not."""
    prefix, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
    if not Path(value).is_absolute():
        return arg
    try:
        value = str(Path(value).relative_to(Path.cwd()))
    except ValueError:
        value = f"<abs>/{Path(value).name}"
    return f"{prefix}{eq}{value}"


def _default_created_by() -> str:
    argv = list(sys.argv)
    if not argv:
        return "python"
    return shlex.join([Path(argv[0]).name] + [_portable_arg(a) for a in argv[1:]])


class FaissIndex:
    """Inner-product FAISS index over L2-normalised vectors (cosine similarity) with one record per vector."""

    def __init__(self, index: Any, records: list[dict[str, Any]], manifest: dict[str, Any], pca: PCA | None = None):
        self.index = index
        self.records = records
        self.manifest = manifest
        self.pca = pca
        self._search_index = index

    # ------------------------------------------------------------------ build
    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        records: Sequence[dict[str, Any]],
        *,
        kind: str,
        embedder_id: str,
        pca_dim: int | None = None,
        float16: bool = False,
        ivf_nlist: int | None = None,
        created_by: str | None = None,
        use_gpu: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> FaissIndex:
        """Build an index from (N, D) vectors and N records (dicts with string ``id`` and ``source``).

        Vectors are L2-normalised (again after the optional PCA to ``pca_dim``), so scores are cosine
        similarities. ``float16`` stores vectors as fp16 (half the size); ``ivf_nlist`` builds an IVF index,
        worth it only for large N. ``use_gpu`` searches on a GPU when faiss sees one.
        """
        faiss = _faiss()
        x = np.asarray(vectors, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"vectors must be a non-empty (N, D) array, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("vectors contain NaN or inf")
        recs = _validate_records(records, x.shape[0])
        in_dim = x.shape[1]
        pca = None
        if pca_dim is not None and pca_dim < in_dim:
            # Normalise before fitting so PCA sees directions, the quantity cosine search compares.
            pca = PCA.fit(l2_normalize(x), pca_dim)
            x = pca.transform(l2_normalize(x))
        x = np.ascontiguousarray(l2_normalize(x))
        d = x.shape[1]

        metric = faiss.METRIC_INNER_PRODUCT
        if ivf_nlist:
            nlist = int(min(ivf_nlist, max(1, x.shape[0] // 39)))  # faiss wants ~39 points per centroid
            quantizer = faiss.IndexFlatIP(d)
            if float16:
                index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16, metric)
            else:
                index = faiss.IndexIVFFlat(quantizer, d, nlist, metric)
            index.train(x)
            index.nprobe = min(nlist, 16)
            index_type = f"IVF{nlist},{'SQfp16' if float16 else 'Flat'}"
        elif float16:
            index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, metric)
            index_type = "SQfp16"
        else:
            index = faiss.IndexFlatIP(d)
            index_type = "FlatIP"
        index.add(x)
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "embedder": embedder_id,
            "dim": int(in_dim),
            "index_dim": int(d),
            "count": int(x.shape[0]),
            "metric": "inner_product",
            "normalized": True,
            "index_type": index_type,
            "storage": "float16" if float16 else "float32",
            "pca": None if pca is None else {
                "file": PCA_FILE, "in_dim": pca.in_dim, "out_dim": pca.out_dim,
                "explained_variance": round(float(pca.explained_variance_ratio.sum()), 4),
            },
            "records_sha256": records_sha256(recs),
            "created_by": created_by if created_by is not None else _default_created_by(),
            "faiss_version": getattr(faiss, "__version__", "unknown"),
        }
        if extra:
            manifest.update(extra)
        obj = cls(index, recs, manifest, pca)
        if use_gpu:
            obj.to_gpu()
        return obj

    # ------------------------------------------------------------------ io
    def save(self, out_dir: str | Path) -> Path:
        """Write index.faiss, records.jsonl, manifest.json (and pca.npz) into ``out_dir``."""
        faiss = _faiss()
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(out / INDEX_FILE))
        with open(out / RECORDS_FILE, "w", encoding="utf-8") as f:
            f.writelines(_record_line(r) for r in self.records)
        if self.pca is not None:
            self.pca.save(out / PCA_FILE)
        elif (out / PCA_FILE).exists():
            (out / PCA_FILE).unlink()  # a stale projection would silently corrupt queries
        (out / MANIFEST_FILE).write_text(json.dumps(self.manifest, indent=2, sort_keys=True) + "\n")
        return out

    @classmethod
    def load(cls, index_dir: str | Path, *, use_gpu: bool = False) -> FaissIndex:
        """Load an index directory written by :meth:`save`; checks the records against the manifest."""
        faiss = _faiss()
        d = Path(index_dir)
        manifest_path = d / MANIFEST_FILE
        if not manifest_path.is_file():
            raise FileNotFoundError(f"no {MANIFEST_FILE} in {d}: not an index directory")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{d}: unsupported index format {manifest.get('format_version')!r}")
        with open(d / RECORDS_FILE, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        if records_sha256(records) != manifest["records_sha256"]:
            raise ValueError(f"{d}: records.jsonl does not match the manifest's sha256 (rebuild the index)")
        index = faiss.read_index(str(d / INDEX_FILE))
        if index.ntotal != len(records) or index.ntotal != manifest["count"]:
            raise ValueError(f"{d}: index has {index.ntotal} vectors, {len(records)} records")
        pca = PCA.load(d / PCA_FILE) if manifest.get("pca") else None
        obj = cls(index, records, manifest, pca)
        if use_gpu:
            obj.to_gpu()
        return obj

    def to_gpu(self) -> bool:
        """Search on GPU 0 when faiss has GPU support and sees a device; returns whether it moved."""
        faiss = _faiss()
        get_num_gpus = getattr(faiss, "get_num_gpus", None)
        if get_num_gpus is None or get_num_gpus() <= 0:
            return False
        res = faiss.StandardGpuResources()
        self._gpu_resources = res  # keep alive as long as the GPU index
        self._search_index = faiss.index_cpu_to_gpu(res, 0, self.index)
        return True

    # ------------------------------------------------------------------ query
    @property
    def dim(self) -> int:
        """Dimension of the vectors the index expects as queries (before PCA)."""
        return int(self.manifest["dim"])

    def __len__(self) -> int:
        return len(self.records)

    def prepare(self, queries: np.ndarray) -> np.ndarray:
        """Apply the build-time normalisation and PCA to (M, D) queries."""
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (M, {self.dim}), got {q.shape}")
        q = l2_normalize(q)
        if self.pca is not None:
            q = l2_normalize(self.pca.transform(q))
        return np.ascontiguousarray(q)

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-``k`` hits per query row (fewer when the index is smaller), best first."""
        if k <= 0:
            return [[] for _ in range(np.atleast_2d(queries).shape[0])]
        q = self.prepare(queries)
        k = min(int(k), len(self.records))
        scores, idx = self._search_index.search(q, k)
        out: list[list[Hit]] = []
        for srow, irow in zip(scores, idx):
            hits = []
            for s, i in zip(srow, irow):
                if i < 0:  # IVF can return fewer than k
                    continue
                rec = self.records[int(i)]
                hits.append(Hit(rec["id"], float(s), rec))
            out.append(hits)
        return out
