"""The dermatology knowledge base: typed entries, label lookup, and a passage index for retrieval.

``knowledge_base.jsonl`` (bundled) holds one :class:`KBEntry` per diagnosis, covering the HAM10000
classes, the Derm7pt diagnoses and the DermNet classes; every dataset label is an alias of exactly
one entry, so ``KnowledgeBase.entry_for_label`` maps any of them to the knowledge and HAM10000 class.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.vocabulary import SEVEN_POINT, seven_point_phrase

if TYPE_CHECKING:
    from models.protocols import TextEmbedder
    from retrieval.index import FaissIndex

KB_PATH = Path(__file__).resolve().parent / "knowledge_base.jsonl"
KB_SOURCE = "dermgraph-kb"

Modality = Literal["clinical", "dermoscopy", "histopathology"]
PASSAGE_MODALITY: dict[str, str | None] = {
    "overview": None,
    "clinical": "clinical",
    "dermoscopy": "dermoscopy",
    "checklist": "dermoscopy",
    "histopathology": "histopathology",
}
"""Passage kind -> the image modality it describes (None: modality-independent)."""

_ID_RE = re.compile(r"^kb:[a-z0-9_]+$")


class Morphology(BaseModel):
    """Textbook morphology per modality (null where the modality is not informative)."""

    model_config = ConfigDict(extra="forbid")

    clinical: str = Field(min_length=1)
    dermoscopy: str | None = None
    histopathology: str | None = None


class KBEntry(BaseModel):
    """One diagnosis.

    ``expected_7pt`` maps a 7-point criterion to the values typical of the diagnosis; a criterion left
    out carries no information for this diagnosis, and "absent" is listed where absence is itself
    characteristic (e.g. no pigment network in basal cell carcinoma).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(description="Stable slug, e.g. 'kb:melanoma'.")
    name: str = Field(min_length=1)
    aliases: list[str] = Field(default_factory=list, description="Synonyms and the exact dataset label strings.")
    ham_class: Literal["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"] | None = None
    malignant: bool | None = None
    categories: list[str] = Field(default_factory=list, description="Groups the diagnosis belongs to (e.g. 'keratinocyte carcinoma', 'melanocytic', 'benign keratosis'): what category claims are checked against.")
    morphology: Morphology
    expected_7pt: dict[str, list[str]] = Field(default_factory=dict)
    sites: list[str] = Field(default_factory=list)
    differentials: list[str] = Field(default_factory=list, description="KB ids.")
    red_flags: list[str] = Field(default_factory=list)
    references: list[str] = Field(default_factory=list)

    @field_validator("id")
    @classmethod
    def _check_id(cls, v: str) -> str:
        if not _ID_RE.match(v):
            raise ValueError(f"id {v!r} must match {_ID_RE.pattern}")
        return v

    @field_validator("expected_7pt")
    @classmethod
    def _check_7pt(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for criterion, values in v.items():
            if criterion not in SEVEN_POINT:
                raise ValueError(f"unknown 7-point criterion {criterion!r}; valid: {sorted(SEVEN_POINT)}")
            if not values:
                raise ValueError(f"{criterion}: list at least one expected value or leave the criterion out")
            bad = [x for x in values if x not in SEVEN_POINT[criterion]]
            if bad:
                raise ValueError(f"{criterion}: invalid values {bad}; valid: {list(SEVEN_POINT[criterion])}")
        return v

    @property
    def slug(self) -> str:
        return self.id.removeprefix("kb:")

    def names(self) -> list[str]:
        """Name plus aliases, de-duplicated case-insensitively, name first."""
        seen: set[str] = set()
        out = []
        for n in [self.name, *self.aliases]:
            key = normalize_label(n)
            if key not in seen:
                seen.add(key)
                out.append(n)
        return out


def normalize_label(label: str) -> str:
    """Lookup key: case-folded, whitespace collapsed."""
    return " ".join(str(label).split()).casefold()


def load_kb(path: str | Path | None = None) -> list[KBEntry]:
    """Read and validate the knowledge base JSONL (default: the bundled ``knowledge_base.jsonl``)."""
    p = Path(path) if path is not None else KB_PATH
    entries = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entries.append(KBEntry.model_validate_json(line))
            except ValueError as exc:
                raise ValueError(f"{p}:{lineno}: {one_line_error(exc)}") from exc
    return entries


def one_line_error(exc: Exception) -> str:
    """A validation error as one line: the first problem's field and message (pydantic's own is many lines); other
    errors' message flattened (:func:`models.errors.message`)."""
    from pydantic import ValidationError

    from models.errors import errors_line, message

    return errors_line(exc.errors(), show_input=False) if isinstance(exc, ValidationError) else message(exc)


def kb_sha256(entries: Sequence[KBEntry]) -> str:
    """Content hash of the entries (recorded in the index manifest to detect a stale index)."""
    h = hashlib.sha256()
    for e in entries:
        h.update(e.model_dump_json().encode("utf-8"))
    return h.hexdigest()


class KnowledgeBase:
    """Validated collection of entries with lookup by id, name or alias (case-insensitive)."""

    def __init__(self, entries: Iterable[KBEntry] | None = None):
        self.entries: list[KBEntry] = list(entries) if entries is not None else load_kb()
        self._by_id: dict[str, KBEntry] = {}
        self._by_key: dict[str, KBEntry] = {}
        for e in self.entries:
            if e.id in self._by_id:
                raise ValueError(f"duplicate knowledge-base id {e.id!r}")
            self._by_id[e.id] = e
        for e in self.entries:
            for key in {normalize_label(n) for n in (e.id, e.slug, *e.names())}:
                other = self._by_key.get(key)
                if other is not None and other.id != e.id:
                    raise ValueError(f"label {key!r} is claimed by both {other.id} and {e.id}")
                self._by_key[key] = e
        missing = sorted({d for e in self.entries for d in e.differentials if d not in self._by_id})
        if missing:
            raise ValueError(f"differentials reference unknown ids: {missing}")

    @classmethod
    def load(cls, path: str | Path | None = None) -> KnowledgeBase:
        """Load and validate a KB file (default: the bundled one)."""
        return cls(load_kb(path))

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[KBEntry]:
        return iter(self.entries)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.lookup(key) is not None

    def __getitem__(self, key: str) -> KBEntry:
        entry = self.lookup(key)
        if entry is None:
            raise KeyError(f"no knowledge-base entry for {key!r}")
        return entry

    def get(self, entry_id: str) -> KBEntry | None:
        """Entry by exact id ('kb:melanoma'), or None."""
        return self._by_id.get(entry_id)

    def lookup(self, key: str) -> KBEntry | None:
        """Entry whose id, slug, name or alias matches ``key`` case-insensitively, or None."""
        return self._by_key.get(normalize_label(key))

    def entry_for_label(self, label: str) -> KBEntry | None:
        """Entry for a dataset label (HAM10000 code, Derm7pt diagnosis, DermNet class), or None."""
        return self.lookup(label)

    def ham_class_for(self, label: str) -> str | None:
        """HAM10000 code a dataset label maps to, or None when it does not map."""
        entry = self.lookup(label)
        return entry.ham_class if entry is not None else None

    def for_ham_class(self, code: str) -> list[KBEntry]:
        """All entries that map to a HAM10000 code."""
        return [e for e in self.entries if e.ham_class == code]


# ---------------------------------------------------------------------- passages

def entry_passages(entry: KBEntry) -> list[dict[str, Any]]:
    """The citable passages of one entry: overview, per-modality morphology, 7-point checklist.

    Each dict has ``passage`` (kind), ``modality``, ``text`` (what is shown and cited) and ``chunks``
    (what is embedded: sentence groups of the text; for the checklist only the findings that are
    present, because the small embedder reads "no streaks" much like "streaks").
    """
    status = {True: "Malignant.", False: "Not malignant.", None: ""}[entry.malignant]
    names = f"{entry.name} (also: {', '.join(entry.aliases)})." if entry.aliases else f"{entry.name}."
    sites = f"Typical sites: {', '.join(entry.sites)}." if entry.sites else ""
    red_flags = f"Red flags: {'; '.join(entry.red_flags)}." if entry.red_flags else ""
    overview = " ".join(x for x in (names, status, sites, red_flags) if x)
    # Red flags name other diagnoses' features ("atypical network" in seborrhoeic keratosis): shown, not embedded.
    overview_chunks = chunk_text(" ".join(x for x in (names, status, sites) if x))
    out = [("overview", overview, overview_chunks), ("clinical", entry.morphology.clinical, None)]
    if entry.morphology.dermoscopy:
        out.append(("dermoscopy", entry.morphology.dermoscopy, None))
    if entry.expected_7pt:
        parts = [" or ".join(seven_point_phrase(c, v) for v in vals) for c, vals in entry.expected_7pt.items()]
        present = [" or ".join(seven_point_phrase(c, v) for v in vals if v != "absent")
                   for c, vals in entry.expected_7pt.items()]
        present = [x for x in present if x]
        out.append((
            "checklist",
            f"Typical 7-point checklist findings: {'; '.join(parts)}.",
            [f"Dermoscopy shows {', '.join(present)}."] if present else [],
        ))
    if entry.morphology.histopathology:
        out.append(("histopathology", entry.morphology.histopathology, None))
    return [
        {"passage": kind, "modality": PASSAGE_MODALITY[kind], "text": text,
         "chunks": chunk_text(text) if chunks is None else chunks}
        for kind, text, chunks in out
    ]


_SENTENCE_END = re.compile(r"(?<=[.;])\s+(?=[A-Z(])")


def chunk_text(text: str, max_words: int = 40) -> list[str]:
    """Split text into groups of whole sentences of at most ~``max_words`` words (a long sentence stays whole).

    Short units embed far more specifically than whole paragraphs with a small sentence encoder.
    """
    chunks: list[str] = []
    current: list[str] = []
    for sentence in (x.strip() for x in _SENTENCE_END.split(text)):
        if not sentence:
            continue
        if current and len(" ".join([*current, sentence]).split()) > max_words:
            chunks.append(" ".join(current))
            current = []
        current.append(sentence)
    if current:
        chunks.append(" ".join(current))
    return chunks


_STOPWORDS = frozenset(
    ["a", "an", "the", "and", "or", "of", "in", "on", "at", "to", "with", "without", "for", "from", "by", "as", "is", "are", "be", "been", "it", "its", "this", "that", "these", "those", "than", "then", "into", "over", "under", "no", "not", "nor", "often", "usually", "may", "can", "some", "most", "more", "less", "very", "each", "per"]
)


def lexical_tokens(text: str) -> list[str]:
    """Lower-cased word tokens without stopwords, with a crude plural strip ('vessels' -> 'vessel')."""
    out = []
    for w in re.findall(r"[a-z0-9]+", text.lower()):
        if w in _STOPWORDS or len(w) < 2:
            continue
        if len(w) > 4 and w.endswith("es") and not w.endswith("ses"):
            w = w[:-2]
        elif len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
            w = w[:-1]
        out.append(w)
    return out


class BM25:
    """Okapi BM25 over a small fixed corpus (dense matrix; fine for a few thousand chunks)."""

    def __init__(self, docs: Sequence[str], k1: float = 1.2, b: float = 0.75):
        import numpy as np

        counts = [Counter(lexical_tokens(d)) for d in docs]
        self.vocab = {w: i for i, w in enumerate(sorted({w for c in counts for w in c}))}
        tf = np.zeros((len(self.vocab), len(docs)), dtype=np.float32)
        for j, c in enumerate(counts):
            for w, n in c.items():
                tf[self.vocab[w], j] = n
        lengths = tf.sum(axis=0)
        avg = max(float(lengths.mean()), 1e-9) if len(docs) else 1.0
        df = (tf > 0).sum(axis=1)
        idf = np.log(1.0 + (len(docs) - df + 0.5) / (df + 0.5))
        self.weights = idf[:, None] * tf * (k1 + 1) / (tf + k1 * (1 - b + b * lengths / avg))
        self.n_docs = len(docs)

    def scores(self, query: str):
        """(n_docs,) BM25 scores of ``query`` (each query term counted once)."""
        import numpy as np

        rows = [self.vocab[w] for w in set(lexical_tokens(query)) if w in self.vocab]
        return self.weights[rows].sum(axis=0) if rows else np.zeros(self.n_docs, dtype=np.float32)


def build_kb_index(
    entries: Sequence[KBEntry],
    embedder: TextEmbedder,
    out_dir: str | Path | None = None,
    *,
    created_by: str | None = None,
    float16: bool = True,
    use_gpu: bool = False,
) -> FaissIndex:
    """Embed every passage chunk of every entry and build (and, given ``out_dir``, save) a cosine index.

    One record per chunk: ``id`` ('kb:melanoma#dermoscopy/0'), ``evidence_id`` ('kb:melanoma#dermoscopy',
    the citable passage), ``entry_id``, ``title``, ``passage``, ``modality``, ``chunk`` (embedded text),
    ``text`` (the whole passage), ``label`` (HAM10000 code, else the entry id), ``ham_class`` and ``source``.
    Vectors are stored as float16 unless ``float16=False`` (scores move by ~1e-3; the index halves).
    """
    from retrieval.index import FaissIndex

    entries = list(KnowledgeBase(entries))  # validates ids, aliases and differentials
    records: list[dict[str, Any]] = []
    for e in entries:
        for p in entry_passages(e):
            for i, chunk in enumerate(p["chunks"]):
                records.append({
                    "id": f"{e.id}#{p['passage']}/{i}",
                    "evidence_id": f"{e.id}#{p['passage']}",
                    "entry_id": e.id,
                    "title": e.name,
                    "passage": p["passage"],
                    "modality": p["modality"],
                    "chunk": chunk,
                    "text": p["text"],
                    "label": e.ham_class or e.id,
                    "ham_class": e.ham_class,
                    "source": KB_SOURCE,
                })
    vectors = embedder.embed([r["chunk"] for r in records])
    index = FaissIndex.build(
        vectors, records, kind="kb", embedder_id=embedder.model_id, created_by=created_by, float16=float16,
        use_gpu=use_gpu,
        extra={"kb_entries": len(entries), "kb_sha256": kb_sha256(entries)},
    )
    if out_dir is not None:
        index.save(out_dir)
    return index


def default_kb_index_dir() -> Path:
    """The shipped KB index (``models/artifacts/kb_index``)."""
    from models.paths import ARTIFACTS

    return ARTIFACTS / "kb_index"


class KBRetriever:
    """Search the KB with free text; returns evidence dicts, one per entry at most.

    Ranking is hybrid: cosine similarity of the query to each chunk plus ``lexical_weight`` times the
    chunk's BM25 score scaled to [0, 1] by the best chunk's. The small sentence embedder alone blurs
    the dermoscopic vocabulary ("arborizing", "veil", "pearly") that decides most queries.

    ``embedder`` must be the text embedder the index was built with (its ``model_id`` is checked against
    the manifest); when omitted, a :class:`models.backends.sentence.SentenceEmbedder` for that id is
    created (weights load on the first search).
    """

    def __init__(self, index_dir: str | Path | None = None, embedder: TextEmbedder | None = None,
                 *, lexical_weight: float = 0.5, use_gpu: bool = False):
        from retrieval.index import FaissIndex

        self.index_dir = Path(index_dir) if index_dir is not None else default_kb_index_dir()
        self.index = FaissIndex.load(self.index_dir, use_gpu=use_gpu)
        if self.index.manifest.get("kind") != "kb":
            raise ValueError(f"{self.index_dir} is a {self.index.manifest.get('kind')!r} index, not 'kb'")
        built_with = self.index.manifest["embedder"]
        if embedder is None:
            from models.backends import create

            embedder = create("text_embedder", "sentence-transformers", model=built_with)
        elif embedder.model_id != built_with:
            raise ValueError(
                f"{self.index_dir} was built with embedder {built_with!r}, not {embedder.model_id!r}: "
                "rebuild the index or pass the matching embedder"
            )
        self.embedder = embedder
        self.lexical_weight = float(lexical_weight)
        self._bm25 = BM25([r["chunk"] for r in self.index.records])
        self._position = {r["id"]: i for i, r in enumerate(self.index.records)}

    @property
    def model_id(self) -> str:
        """Id of the text embedder used for queries."""
        return self.embedder.model_id

    def search(self, text: str, k: int = 4, modality: str | None = None) -> list[dict[str, Any]]:
        """Top-``k`` evidence dicts for ``text``, the best passage per entry, best first.

        ``modality`` ('clinical' | 'dermoscopy' | 'histopathology') restricts the passages to those
        describing that modality; None searches all passages. Each dict has id ('kb:melanoma#dermoscopy'),
        kind ('knowledge'), entry_id, passage, modality, title, text (the whole passage), label (HAM10000
        code, else the entry id), ham_class (or None), source, score (hybrid) and dense_score (cosine).
        """
        import numpy as np

        valid = sorted(m for m in set(PASSAGE_MODALITY.values()) if m)
        if modality is not None and modality not in valid:
            raise ValueError(f"modality must be one of {valid} or None, got {modality!r}")
        if k <= 0 or not text.strip():
            return []
        q = self.embedder.embed([text])
        records = self.index.records
        # The KB has a few hundred chunks: score them all, then filter and dedupe in Python.
        dense = np.full(len(records), -np.inf, dtype=np.float32)
        for h in self.index.search(q, len(records))[0]:
            dense[self._position[h.id]] = h.score
        lexical = self._bm25.scores(text)
        top = float(lexical.max()) if len(lexical) else 0.0
        score = dense + (self.lexical_weight * lexical / top if top > 0 else 0.0)
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        for i in np.argsort(-score, kind="stable"):
            r = records[int(i)]
            if (modality is not None and r["modality"] != modality) or r["entry_id"] in seen:
                continue
            seen.add(r["entry_id"])
            out.append({
                "id": r["evidence_id"], "kind": "knowledge", "entry_id": r["entry_id"], "passage": r["passage"],
                "modality": r["modality"], "title": r["title"], "text": r["text"], "label": r["label"],
                "ham_class": r["ham_class"], "source": r["source"], "score": float(score[i]),
                "dense_score": float(dense[i]),
            })
            if len(out) >= k:
                break
        return out
