"""Image-text case index: similar labelled cases for a query image, and kNN label votes.

Cases come from a pairs JSONL (see ``scripts/make_case_pairs.py``): ``id``, ``image`` (path relative to
the image root), ``caption``, ``label``, ``source`` and optional ``metadata``. Vectors come from an image
encoder or from precomputed feature files. Records keep relative paths and text only, never pixels.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from retrieval.index import FaissIndex, Hit

FeatureInput = str | Path | Sequence[str | Path] | Mapping[str, np.ndarray]


class CasePair(BaseModel):
    """One image-caption pair."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, description="Globally unique, e.g. 'ham10000:ISIC_0024306'.")
    image: str = Field(min_length=1, description="Posix path relative to the image root.")
    caption: str = Field(min_length=1)
    label: str = Field(min_length=1, description="HAM10000 code where the dataset label maps, else the dataset label.")
    source: str = Field(min_length=1, description="Dataset name, e.g. 'ham10000'.")
    metadata: dict[str, Any] | None = None

    @field_validator("image")
    @classmethod
    def _relative(cls, v: str) -> str:
        if PurePosixPath(v).is_absolute() or PureWindowsPath(v).is_absolute() or ".." in PurePosixPath(v).parts:
            raise ValueError(f"image path must be relative to the image root, got {v!r}")
        return v


def _read_pairs(path: str | Path) -> tuple[list[CasePair], list[str]]:
    """The pairs of a JSONL file and where each is (``FILE:LINE``); a bad line is a one-line ValueError."""
    from retrieval.kb import one_line_error

    out, where = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(CasePair.model_validate_json(line))
                except ValueError as exc:
                    raise ValueError(f"{path}:{lineno}: {one_line_error(exc)}") from exc
                where.append(f"{path}:{lineno}")
    return out, where


def load_pairs(path: str | Path) -> list[CasePair]:
    """Read and validate a pairs JSONL file."""
    return _read_pairs(path)[0]


def _as_pairs(pairs: str | Path | Iterable[CasePair | dict[str, Any]]) -> tuple[list[CasePair], list[str]]:
    """The pairs and where each came from (``FILE:LINE``, or ``pair N`` for in-memory ones)."""
    if isinstance(pairs, (str, Path)):
        return _read_pairs(pairs)
    items = [p if isinstance(p, CasePair) else CasePair.model_validate(p) for p in pairs]
    return items, [f"pair {i}" for i in range(1, len(items) + 1)]


def _feature_source(path: Path) -> str | None:
    """``<source>__<view>.npz`` -> source (the feature cache's naming); None for other names."""
    stem = path.name.removesuffix(".npz")
    return stem.split("__", 1)[0] if "__" in stem else None


def load_feature_files(features: FeatureInput) -> tuple[dict[str | None, dict[str, np.ndarray]], dict[str, Any]]:
    """Read feature files (npz with ``ids`` and ``features``) into ``{source or None: {id: vector}}``.

    A file named ``<source>__<view>.npz`` only serves pairs of that source (its ids are paths relative
    to that source's folder); other files, or a mapping ``{id: vector}``, serve every pair.
    """
    if isinstance(features, Mapping):
        return {None: {str(k): np.asarray(v) for k, v in features.items()}}, {"features": ["in-memory"],
                                                                              "feature_models": []}
    paths = [features] if isinstance(features, (str, Path)) else list(features)
    table: dict[str | None, dict[str, np.ndarray]] = {}
    info: dict[str, Any] = {"features": [], "feature_models": []}
    for p in map(Path, paths):
        src = _feature_source(p)
        if src in table:
            raise ValueError(f"two feature files for source {src!r} (pass one view per source): {p.name}")
        with np.load(p, allow_pickle=False) as z:
            if "ids" not in z or "features" not in z:
                raise ValueError(f"{p}: expected arrays 'ids' and 'features', found {list(z.keys())}")
            ids = [str(i) for i in z["ids"]]
            feats = z["features"]
            if "model_id" in z:
                info["feature_models"].append(str(z["model_id"]))
        if len(ids) != len(feats):
            raise ValueError(f"{p}: {len(ids)} ids but {len(feats)} feature rows")
        table[src] = dict(zip(ids, feats))
        info["features"].append(p.name)
    return table, info


def _lookup(pair: CasePair, table: dict[str | None, dict[str, np.ndarray]]) -> np.ndarray | None:
    rel = pair.image.removeprefix(f"{pair.source}/")
    for scope in (pair.source, None):
        rows = table.get(scope)
        if rows is None:
            continue
        for key in (rel, pair.image, pair.id):
            if key in rows:
                return rows[key]
    return None


def encode_images(pairs: Sequence[CasePair], image_root: str | Path, encoder: Any, batch_size: int = 32,
                  where: Sequence[str] | None = None) -> np.ndarray:
    """(N, D) float32 features of the pairs' images via an ImageEmbedder (``embed_images``) or an
    ImageClassifier (``predict(...).features``). An image that cannot be read is a one-line ValueError
    naming the pair (``where[i]``, e.g. the pairs file and line) and the path."""
    from PIL import Image, UnidentifiedImageError

    root = Path(image_root)
    chunks = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        images = []
        for j, p in enumerate(batch, start):
            try:
                with Image.open(root / p.image) as im:
                    images.append(im.convert("RGB"))
            except (OSError, UnidentifiedImageError) as exc:  # UnidentifiedImageError is an OSError; named for the reader
                at = where[j] if where else f"pair {j + 1}"
                why = "not found" if isinstance(exc, FileNotFoundError) else f"unreadable image ({' '.join(str(exc).split())})"
                raise ValueError(f"{at}: image {root / p.image} {why}") from None
        if hasattr(encoder, "embed_images"):
            chunks.append(np.asarray(encoder.embed_images(images), dtype=np.float32))
        elif hasattr(encoder, "predict"):
            chunks.append(np.asarray(encoder.predict(images).features, dtype=np.float32))
        else:
            raise TypeError("encoder must implement embed_images() (ImageEmbedder) or predict() (ImageClassifier)")
    return np.concatenate(chunks, axis=0)


def build_case_index(
    pairs: str | Path | Iterable[CasePair | dict[str, Any]],
    out_dir: str | Path | None,
    *,
    image_root: str | Path | None = None,
    encoder: Any = None,
    features: FeatureInput | None = None,
    pca_dim: int | None = 256,
    float16: bool = True,
    skip_missing: bool = False,
    embedder_id: str | None = None,
    created_by: str | None = None,
    batch_size: int = 32,
    use_gpu: bool = False,
) -> FaissIndex:
    """Build (and, given ``out_dir``, save) a cosine case index from pairs.

    Exactly one of ``encoder`` (images read from ``image_root``, default the shared data folder) or
    ``features`` (npz file(s) with ``ids``/``features``, or ``{id: vector}``) supplies the vectors.
    Vectors are reduced with PCA to ``pca_dim`` (None: keep all) and stored as float16 by default.
    Pairs without features (or, with an encoder, without an image file) raise, naming the pairs file and
    line, unless ``skip_missing``; the manifest's ``skipped`` counts those left out. ``embedder_id`` records which model produced
    precomputed features (default: the encoder's ``model_id``, or the feature files' names).
    """
    from retrieval.index import FaissIndex

    if (encoder is None) == (features is None):
        raise ValueError("pass exactly one of encoder= or features=")
    items, where = _as_pairs(pairs)
    if not items:
        raise ValueError("no pairs to index")
    extra: dict[str, Any] = {}
    if features is not None:
        table, info = load_feature_files(features)
        kept, rows, missing = [], [], []
        for p in items:
            v = _lookup(p, table)
            if v is None:
                missing.append(p.id)
            else:
                kept.append(p)
                rows.append(v)
        if missing and not skip_missing:
            raise KeyError(f"{len(missing)} pairs have no features (first: {missing[:3]}); pass --skip-missing (skip_missing=True) to leave them out")
        if not kept:
            raise ValueError("no pair matched the feature files")
        items, vectors = kept, np.stack(rows).astype(np.float32)
        models = sorted(set(info.pop("feature_models")))
        embedder_id = embedder_id or (",".join(models) if models else "precomputed:" + ",".join(info["features"]))
        extra.update(info, skipped=len(missing))
    else:
        from models.paths import data_dir

        root = Path(image_root) if image_root is not None else data_dir()
        missing = [i for i, p in enumerate(items) if not (root / p.image).is_file()]
        if missing and not skip_missing:
            first = missing[0]
            raise FileNotFoundError(f"{where[first]}: image {root / items[first].image} not found ({len(missing)} of {len(items)} "
                                    "pairs have no image under the image root; check --image-root, or pass --skip-missing / skip_missing=True)")
        if len(missing) == len(items):
            raise ValueError(f"no pair's image exists under {root} (check --image-root)")
        gone = set(missing)
        items = [p for i, p in enumerate(items) if i not in gone]
        where = [w for i, w in enumerate(where) if i not in gone]
        vectors = encode_images(items, root, encoder, batch_size=batch_size, where=where)
        embedder_id = embedder_id or encoder.model_id
        extra["skipped"] = len(missing)
    records = []
    for p in items:
        rec: dict[str, Any] = {"id": p.id, "source": p.source, "label": p.label, "caption": p.caption,
                               "image": p.image}
        if p.metadata:
            rec["metadata"] = p.metadata
        records.append(rec)
    extra["label_counts"] = dict(sorted(Counter(p.label for p in items).items()))
    extra["source_counts"] = dict(sorted(Counter(p.source for p in items).items()))
    index = FaissIndex.build(
        vectors, records, kind="cases", embedder_id=embedder_id, pca_dim=pca_dim, float16=float16,
        created_by=created_by, use_gpu=use_gpu, extra=extra,
    )
    if out_dir is not None:
        index.save(out_dir)
    return index


@dataclass(frozen=True)
class CaseHit:
    """A retrieved case: ``id``, cosine ``score`` and the stored ``record`` (caption, label, source, image)."""

    id: str
    score: float
    record: dict[str, Any] = field(repr=False)

    @property
    def caption(self) -> str:
        return self.record.get("caption", "")

    @property
    def label(self) -> str | None:
        return self.record.get("label")

    @property
    def source(self) -> str:
        return self.record.get("source", "")

    @property
    def image(self) -> str | None:
        """Image path relative to the image root the index was built from."""
        return self.record.get("image")

    def as_dict(self) -> dict[str, Any]:
        """id, caption, label, source, image and score as a plain dict."""
        return {"id": self.id, "caption": self.caption, "label": self.label, "source": self.source,
                "image": self.image, "score": self.score}


class CaseRetriever:
    """Nearest labelled cases for query image features (same encoder as the index was built with)."""

    def __init__(self, index_dir: str | Path, *, use_gpu: bool = False):
        from retrieval.index import FaissIndex

        self.index_dir = Path(index_dir)
        self.index = FaissIndex.load(self.index_dir, use_gpu=use_gpu)
        if self.index.manifest.get("kind") != "cases":
            raise ValueError(f"{self.index_dir} is a {self.index.manifest.get('kind')!r} index, not 'cases'")

    @property
    def model_id(self) -> str:
        """Id of the image encoder whose features the index holds."""
        return self.index.manifest["embedder"]

    @property
    def dim(self) -> int:
        """Feature dimension queries must have."""
        return self.index.dim

    @property
    def labels(self) -> list[str]:
        """Labels present in the index."""
        return sorted(self.index.manifest.get("label_counts", {}))

    @property
    def sources(self) -> list[str]:
        """Datasets (records' ``source``) present in the index: what a ``sources=`` filter can match."""
        counts = self.index.manifest.get("source_counts")
        return sorted(counts) if counts else sorted({r.get("source", "") for r in self.index.records})

    def search(
        self,
        features: np.ndarray,
        k: int = 8,
        *,
        exclude_ids: Iterable[str] | None = None,
        sources: Iterable[str] | None = None,
    ) -> list[list[CaseHit]]:
        """Top-``k`` cases per query row of (M, D) features (a single (D,) row is accepted), best first.

        ``exclude_ids`` drops given cases (e.g. the query itself in leave-one-out evaluation);
        ``sources`` keeps only cases from those datasets.
        """
        q = np.asarray(features, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        excl = set(exclude_ids or ())
        keep = set(sources) if sources is not None else None
        n = len(self.index)
        # Over-fetch so that filtering still leaves k hits: exclusions alone need k + |excl|; a source filter
        # starts at 8x that and doubles for the rows still short (exact: hits come best first).
        fetch = min(n, k + len(excl) if keep is None else 8 * (k + len(excl)))
        out: list[list[CaseHit]] = [[] for _ in range(len(q))]
        todo = list(range(len(q)))
        while todo:
            short = []
            for i, row in zip(todo, self.index.search(q[todo], fetch)):
                hits = []
                for h in row:
                    if h.id in excl or (keep is not None and h.record["source"] not in keep):
                        continue
                    hits.append(CaseHit(h.id, h.score, h.record))
                    if len(hits) >= k:
                        break
                out[i] = hits
                if len(hits) < k and fetch < n:
                    short.append(i)
            todo, fetch = short, min(n, 2 * fetch)
        return out


def knn_label_distribution(
    hits: Sequence[dict[str, Any] | Hit | CaseHit],
    labels: Sequence[str],
    temperature: float = 0.05,
    *,
    smoothing: float = 0.0,
) -> dict[str, float]:
    """Similarity-weighted label votes over ``labels``, summing to 1.

    Hit i weighs ``exp((score_i - best score) / temperature)`` (the best hit weighs 1) and votes for its
    label; ``p(label) ∝ smoothing + Σ weights``. Hits with labels outside ``labels`` are ignored; the
    result is uniform when no hit carries a listed label. Hits are dicts or objects with ``score`` and
    ``record['label']``."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    if not labels:
        return {}
    labs = list(dict.fromkeys(labels))
    pairs = []
    for h in hits:
        if isinstance(h, dict):
            label, score = h.get("label"), h["score"]
        else:
            label, score = h.record.get("label"), h.score
        if label in labs and math.isfinite(float(score)):
            pairs.append((label, float(score)))
    votes = dict.fromkeys(labs, float(smoothing))
    if pairs:
        top = max(s for _, s in pairs)  # shift for numerical stability; cancels in the normalisation
        for label, s in pairs:
            votes[label] += math.exp((s - top) / temperature)
    total = sum(votes.values())
    if total <= 0:
        return {lab: 1.0 / len(labs) for lab in labs}
    return {lab: v / total for lab, v in votes.items()}


def read_manifest(index_dir: str | Path) -> dict[str, Any]:
    """The manifest of an index directory (cheap: loads no vectors)."""
    return json.loads((Path(index_dir) / "manifest.json").read_text())
