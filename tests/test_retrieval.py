"""FAISS index, KB passage retrieval, case index, kNN votes, pairs script and the index CLI."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from retrieval.cases import (
    CaseRetriever,
    build_case_index,
    knn_label_distribution,
    load_pairs,
)
from retrieval.index import FaissIndex, Hit, l2_normalize
from retrieval.kb import (
    KBRetriever,
    KnowledgeBase,
    build_kb_index,
    chunk_text,
    entry_passages,
)

REPO = Path(__file__).resolve().parent.parent


class HashingTextEmbedder:
    """Deterministic bag-of-words embedder: each word hashes to a signed bucket; no weights."""

    def __init__(self, dim: int = 256, model_id: str = "hashing-test"):
        self.dim = dim
        self.model_id = model_id

    def embed(self, texts):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in re.findall(r"[a-z0-9]+", text.lower()):
                h = int.from_bytes(hashlib.md5(word.encode()).digest()[:4], "little")
                out[i, h % self.dim] += 1.0 if (h >> 31) & 1 else -1.0
        return l2_normalize(out)


class FixedImageEmbedder:
    """ImageEmbedder double: mean colour of the image, padded to 8 dims."""

    model_id = "mean-colour"
    dim = 8

    def embed_images(self, images):
        feats = np.zeros((len(images), self.dim), dtype=np.float32)
        for i, im in enumerate(images):
            feats[i, :3] = np.asarray(im, dtype=np.float32).reshape(-1, 3).mean(0) / 255.0
            feats[i, 3] = 0.1
        return l2_normalize(feats)


def _records(n, source="synthetic", prefix="r"):
    return [{"id": f"{prefix}{i}", "source": source, "label": "ab"[i % 2]} for i in range(n)]


# ---------------------------------------------------------------------- FaissIndex


def test_search_returns_nearest_by_cosine():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 16)).astype(np.float32)
    idx = FaissIndex.build(x, _records(50), kind="test", embedder_id="rand", created_by="pytest")
    hits = idx.search(x[[3, 7]] * 5.0, k=4)  # scale must not matter: vectors are normalised
    assert [h[0].id for h in hits] == ["r3", "r7"]
    assert hits[0][0].score == pytest.approx(1.0, abs=1e-5)
    xn = l2_normalize(x)
    expected = np.argsort(-(xn @ xn[3]))[:4]
    assert [h.id for h in hits[0]] == [f"r{i}" for i in expected]
    assert all(a.score >= b.score for a, b in zip(hits[0], hits[0][1:]))
    assert isinstance(hits[0][0], Hit) and hits[0][0].record["label"] == "b"
    assert len(idx.search(x[0], k=100)[0]) == 50  # k is capped, a 1-D query is one row
    assert idx.search(x[:2], k=0) == [[], []]


def test_round_trip_preserves_results_and_manifest(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 12)).astype(np.float32)
    idx = FaissIndex.build(x, _records(40), kind="test", embedder_id="rand", created_by="pytest")
    idx.save(tmp_path / "ix")
    assert {p.name for p in (tmp_path / "ix").iterdir()} == {"index.faiss", "records.jsonl", "manifest.json"}
    back = FaissIndex.load(tmp_path / "ix")
    q = rng.normal(size=(5, 12)).astype(np.float32)
    a, b = idx.search(q, 5), back.search(q, 5)
    assert [[h.id for h in row] for row in a] == [[h.id for h in row] for row in b]
    m = back.manifest
    assert (m["kind"], m["embedder"], m["dim"], m["count"], m["metric"]) == ("test", "rand", 12, 40, "inner_product")
    assert m["created_by"] == "pytest" and len(m["records_sha256"]) == 64 and m["pca"] is None


def test_tampered_records_are_detected(tmp_path):
    x = np.eye(4, dtype=np.float32)
    FaissIndex.build(x, _records(4), kind="test", embedder_id="e").save(tmp_path)
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    (tmp_path / "records.jsonl").write_text("\n".join(reversed(lines)) + "\n")
    with pytest.raises(ValueError, match="sha256"):
        FaissIndex.load(tmp_path)


def test_pca_and_float16_keep_neighbours(tmp_path):
    rng = np.random.default_rng(2)
    # Low-rank data plus noise: 8 informative directions in 64 dims.
    x = (rng.normal(size=(300, 8)) @ rng.normal(size=(8, 64)) + 0.01 * rng.normal(size=(300, 64))).astype(np.float32)
    exact = FaissIndex.build(x, _records(300), kind="test", embedder_id="e")
    small = FaissIndex.build(x, _records(300), kind="test", embedder_id="e", pca_dim=16, float16=True)
    small.save(tmp_path)
    assert (tmp_path / "pca.npz").is_file()
    back = FaissIndex.load(tmp_path)
    assert back.manifest["pca"]["out_dim"] == 16 and back.manifest["index_dim"] == 16
    assert back.manifest["storage"] == "float16" and back.manifest["pca"]["explained_variance"] > 0.99
    assert back.dim == 64  # queries keep the original dimension
    q = x[:20] + 0.01 * rng.normal(size=(20, 64)).astype(np.float32)
    top_exact = [row[0].id for row in exact.search(q, 1)]
    top_small = [row[0].id for row in back.search(q, 1)]
    assert top_exact == top_small == [f"r{i}" for i in range(20)]
    with pytest.raises(ValueError, match=r"\(M, 64\)"):
        back.search(np.zeros((1, 16), np.float32), 1)


def test_ivf_index_finds_exact_duplicates():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2000, 16)).astype(np.float32)
    idx = FaissIndex.build(x, _records(2000), kind="test", embedder_id="e", ivf_nlist=16)
    assert idx.manifest["index_type"].startswith("IVF")
    assert [row[0].id for row in idx.search(x[:10], 1)] == [f"r{i}" for i in range(10)]


def test_build_validates_inputs():
    x = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="records"):
        FaissIndex.build(x, _records(2), kind="t", embedder_id="e")
    with pytest.raises(ValueError, match="duplicate"):
        FaissIndex.build(x, [{"id": "a", "source": "s"}] * 3, kind="t", embedder_id="e")
    with pytest.raises(ValueError, match="'id' and 'source'"):
        FaissIndex.build(x, [{"id": str(i)} for i in range(3)], kind="t", embedder_id="e")
    with pytest.raises(ValueError, match="NaN"):
        FaissIndex.build(np.full((3, 3), np.nan, np.float32), _records(3), kind="t", embedder_id="e")


def test_gpu_flag_falls_back_to_cpu_without_gpus():
    import faiss

    x = np.eye(4, dtype=np.float32)
    idx = FaissIndex.build(x, _records(4), kind="t", embedder_id="e", use_gpu=True)
    assert idx.search(x[:1], 1)[0][0].id == "r0"
    if faiss.get_num_gpus() == 0:
        assert idx._search_index is idx.index


def test_default_created_by_has_no_absolute_paths(monkeypatch, tmp_path):
    import sys

    monkeypatch.setattr(sys, "argv", [str(tmp_path / "bin" / "dermgraph"), "index", "--out", str(tmp_path / "o")])
    idx = FaissIndex.build(np.eye(2, dtype=np.float32), _records(2), kind="t", embedder_id="e")
    assert str(tmp_path) not in idx.manifest["created_by"]
    assert idx.manifest["created_by"].startswith("dermgraph index --out")


# ---------------------------------------------------------------------- knowledge-base index


@pytest.fixture(scope="module")
def kb_index_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("kb_index")
    build_kb_index(KnowledgeBase().entries, HashingTextEmbedder(), out, created_by="pytest")
    return out


def test_kb_index_records_and_manifest(kb_index_dir):
    idx = FaissIndex.load(kb_index_dir)
    kb = KnowledgeBase()
    assert idx.manifest["kind"] == "kb" and idx.manifest["kb_entries"] == len(kb)
    assert idx.manifest["embedder"] == "hashing-test"
    entry_ids = {r["entry_id"] for r in idx.records}
    assert entry_ids == {e.id for e in kb}
    for r in idx.records:
        assert r["evidence_id"] == f"{r['entry_id']}#{r['passage']}" and r["source"] == "dermgraph-kb"
        assert r["chunk"] and r["text"]
    mel = {r["passage"] for r in idx.records if r["entry_id"] == "kb:melanoma"}
    assert mel == {"overview", "clinical", "dermoscopy", "checklist", "histopathology"}


def test_kb_retriever_dedupes_and_filters_modality(kb_index_dir):
    r = KBRetriever(kb_index_dir, HashingTextEmbedder())
    hits = r.search("arborizing vessels, blue-grey ovoid nests, no pigment network", k=5)
    assert len(hits) == 5 and len({h["entry_id"] for h in hits}) == 5
    assert hits[0]["entry_id"] == "kb:basal_cell_carcinoma" and hits[0]["ham_class"] == "bcc"
    assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))
    h = hits[0]
    assert h["id"].startswith("kb:basal_cell_carcinoma#") and h["kind"] == "knowledge"
    assert h["source"] == "dermgraph-kb" and h["title"] == "Basal cell carcinoma" and h["label"] == "bcc"
    for modality in ("clinical", "dermoscopy", "histopathology"):
        hits = r.search("nests of basaloid cells with peripheral palisading", k=3, modality=modality)
        assert hits and all(x["modality"] == modality for x in hits)
        assert all(x["id"].split("#")[1] in {modality, "checklist"} for x in hits)
    assert r.search("honey-coloured crusts", k=3, modality="clinical")[0]["entry_id"] == "kb:impetigo"
    assert r.search("anything", k=0) == [] and r.search("   ", k=3) == []
    with pytest.raises(ValueError, match="modality"):
        r.search("x", modality="confocal")


def test_kb_retriever_rejects_a_different_embedder(kb_index_dir):
    with pytest.raises(ValueError, match="built with embedder"):
        KBRetriever(kb_index_dir, HashingTextEmbedder(model_id="other"))


def test_passages_and_chunks():
    kb = KnowledgeBase()
    passages = {p["passage"]: p for p in entry_passages(kb["kb:melanoma"])}
    assert "blue-whitish veil" in passages["checklist"]["text"]
    # Absent findings are shown but not embedded (the small encoder ignores negation).
    assert all(" no " not in c for c in passages["checklist"]["chunks"])
    assert passages["dermoscopy"]["modality"] == "dermoscopy" and passages["overview"]["modality"] is None
    text = "One two three. Four five six. Seven eight nine."
    assert chunk_text(text, max_words=6) == ["One two three. Four five six.", "Seven eight nine."]
    assert chunk_text(text, max_words=2) == ["One two three.", "Four five six.", "Seven eight nine."]


# ---------------------------------------------------------------------- case index


def _pairs(n=12):
    return [
        {"id": f"toy:{i}", "image": f"toy/images/{i}.png", "caption": f"Case {i}.", "label": "ab"[i % 2],
         "source": "toy", "metadata": {"i": i}}
        for i in range(n)
    ]


def test_case_index_from_precomputed_features(tmp_path):
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(12, 32)).astype(np.float16)
    # Ids relative to the source folder, as in the feature cache's <source>__<view>.npz files.
    np.savez(tmp_path / "toy__full.npz", ids=np.array([f"images/{i}.png" for i in range(12)]), features=feats)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in _pairs()))
    idx = build_case_index(pairs, tmp_path / "cases", features=tmp_path / "toy__full.npz", pca_dim=8,
                           embedder_id="toy-encoder", created_by="pytest")
    assert idx.manifest["label_counts"] == {"a": 6, "b": 6} and idx.manifest["embedder"] == "toy-encoder"
    cr = CaseRetriever(tmp_path / "cases")
    assert cr.dim == 32 and cr.labels == ["a", "b"] and cr.model_id == "toy-encoder"
    hits = cr.search(feats[:3].astype(np.float32), k=4)
    assert [row[0].id for row in hits] == ["toy:0", "toy:1", "toy:2"]
    h = hits[0][0]
    assert (h.caption, h.label, h.source, h.image) == ("Case 0.", "a", "toy", "toy/images/0.png")
    assert set(h.as_dict()) == {"id", "caption", "label", "source", "image", "score"}
    loo = cr.search(feats[0].astype(np.float32), k=3, exclude_ids=["toy:0"])[0]
    assert len(loo) == 3 and "toy:0" not in [x.id for x in loo]
    assert cr.search(feats[:1].astype(np.float32), k=3, sources=["other"]) == [[]]
    records = (tmp_path / "cases" / "records.jsonl").read_text()
    assert str(tmp_path) not in records and "pixels" not in records


def test_source_filtered_search_is_exact_when_the_source_is_rare(tmp_path):
    """A source filter over-fetches and doubles the fetch for short rows: the hits equal a brute-force search over
    that source's cases, however rare it is in the index, and exclusions still apply."""
    rng = np.random.default_rng(7)
    n, rare = 400, {3, 150, 222, 301, 399}
    pairs = [dict(_pairs(1)[0], id=f"x:{i}", image=f"x/{i}.png", source="rare" if i in rare else "common") for i in range(n)]
    feats = rng.normal(size=(n, 16)).astype(np.float32)
    build_case_index(pairs, tmp_path / "cases", features={p["id"]: f for p, f in zip(pairs, feats)}, pca_dim=None, created_by="pytest")
    cr = CaseRetriever(tmp_path / "cases")
    q = rng.normal(size=(6, 16)).astype(np.float32)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    for row, hits in zip(q, cr.search(q, k=3, sources=["rare"], exclude_ids=["x:150"])):
        scores = {f"x:{i}": float(unit[i] @ (row / np.linalg.norm(row))) for i in rare - {150}}
        assert [h.id for h in hits] == sorted(scores, key=scores.get, reverse=True)[:3]
    assert [len(r) for r in cr.search(q[:2], k=8, sources=["rare"])] == [5, 5]  # fewer than k exist: all of them
    assert [len(r) for r in cr.search(q[:2], k=8, sources=["common"])] == [8, 8]


def test_case_index_missing_features(tmp_path):
    feats = {f"toy:{i}": np.ones(4, np.float32) * (i + 1) + np.arange(4) for i in range(6)}  # keyed by pair id
    with pytest.raises(KeyError, match="no features"):
        build_case_index(_pairs(8), None, features=feats, pca_dim=None)
    idx = build_case_index(_pairs(8), None, features=feats, pca_dim=None, skip_missing=True)
    assert idx.manifest["count"] == 6 and idx.manifest["skipped"] == 2
    with pytest.raises(ValueError, match="exactly one"):
        build_case_index(_pairs(2), None)


def test_case_index_with_an_image_encoder(tmp_path):
    from PIL import Image

    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    (tmp_path / "toy" / "images").mkdir(parents=True)
    for i, c in enumerate(colours):
        Image.new("RGB", (10, 10), c).save(tmp_path / "toy" / "images" / f"{i}.png")
    idx = build_case_index(_pairs(4), tmp_path / "cases", image_root=tmp_path, encoder=FixedImageEmbedder(),
                           pca_dim=None, float16=False)
    assert idx.manifest["embedder"] == "mean-colour"
    q = FixedImageEmbedder().embed_images([Image.new("RGB", (4, 4), (190, 40, 40))])
    assert CaseRetriever(tmp_path / "cases").search(q, k=1)[0][0].id == "toy:0"


def test_pairs_reject_absolute_image_paths(tmp_path):
    bad = dict(_pairs(1)[0], image=str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="relative"):
        build_case_index([bad], None, features={"toy:0": np.ones(3)})
    with pytest.raises(ValueError, match="relative"):
        build_case_index([dict(bad, image="../x.png")], None, features={"toy:0": np.ones(3)})


def test_retrievers_check_index_kind(tmp_path, kb_index_dir):
    with pytest.raises(ValueError, match="not 'cases'"):
        CaseRetriever(kb_index_dir)
    FaissIndex.build(np.eye(2, dtype=np.float32), _records(2), kind="cases", embedder_id="e").save(tmp_path)
    with pytest.raises(ValueError, match="not 'kb'"):
        KBRetriever(tmp_path, HashingTextEmbedder())


# ---------------------------------------------------------------------- kNN votes


def test_knn_label_distribution():
    hits = [{"label": "mel", "score": 0.9}, {"label": "mel", "score": 0.8}, {"label": "nv", "score": 0.85},
            {"label": "Acne vulgaris", "score": 0.99}]
    labels = ["mel", "nv", "bcc"]
    p = knn_label_distribution(hits, labels, temperature=0.05)
    assert list(p) == labels and sum(p.values()) == pytest.approx(1.0)
    assert p["mel"] > p["nv"] > p["bcc"] == 0.0
    sharp = knn_label_distribution(hits, labels, temperature=0.001)
    flat = knn_label_distribution(hits, labels, temperature=10.0)
    assert sharp["mel"] > 0.99 and flat["mel"] == pytest.approx(2 / 3, abs=0.01)
    smooth = knn_label_distribution(hits, labels, temperature=0.05, smoothing=0.1)
    assert smooth["bcc"] > 0 and sum(smooth.values()) == pytest.approx(1.0)
    assert knn_label_distribution([], labels) == {lab: pytest.approx(1 / 3) for lab in labels}
    objs = [Hit("a", 0.9, {"label": "nv"}), Hit("b", 0.1, {"label": "mel"})]
    assert max(knn_label_distribution(objs, labels).items(), key=lambda kv: kv[1])[0] == "nv"
    with pytest.raises(ValueError):
        knn_label_distribution(hits, labels, temperature=0)


def test_knn_distribution_sums_to_one_on_random_hits():
    rng = np.random.default_rng(5)
    labels = ["a", "b", "c", "d"]
    for _ in range(20):
        hits = [{"label": rng.choice(labels + ["z"]), "score": float(rng.uniform(-1, 1))} for _ in range(8)]
        p = knn_label_distribution(hits, labels, temperature=float(rng.uniform(0.01, 1)))
        assert sum(p.values()) == pytest.approx(1.0) and all(v >= 0 for v in p.values())


# ---------------------------------------------------------------------- pairs script and CLI


def _load_script():
    spec = importlib.util.spec_from_file_location("make_case_pairs", REPO / "scripts" / "make_case_pairs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_captions():
    m = _load_script()
    assert m.ham_caption("nv", "45", "male", "trunk") == "Dermoscopy of a melanocytic nevus on the trunk of a 45-year-old man."
    assert m.ham_caption("mel", "", "unknown", "unknown") == "Dermoscopy of a melanoma."
    assert m.ham_caption("bkl", "10", "female", "face") == "Dermoscopy of a benign keratosis-like lesion on the face of a 10-year-old girl."
    assert m.ham_caption("df", "0", "male", "acral") == "Dermoscopy of a dermatofibroma on acral skin of an infant."
    crit = dict(pigment_network="atypical", streaks="irregular", pigmentation="absent", regression_structures="absent",
                dots_and_globules="irregular", blue_whitish_veil="present", vascular_structures="dotted")
    cap = m.derm7pt_caption("melanoma (in situ)", crit)
    assert cap.startswith("Dermoscopy of a melanoma (in situ). 7-point checklist: atypical pigment network;")
    assert "blue-whitish veil" in cap and "dotted vessels" in cap


@pytest.mark.data
def test_make_case_pairs_on_shared_data(shared_data, tmp_path):
    m = _load_script()
    out = tmp_path / "pairs.jsonl"
    assert m.main([str(out), "--data-dir", str(shared_data)]) == 0
    pairs = load_pairs(out)
    by_source = {}
    for p in pairs:
        by_source.setdefault(p.source, []).append(p)
        assert not Path(p.image).is_absolute() and (shared_data / p.image).is_file()
    # 1 in 6 DermNet photos (by content hash) is held out of the index for evaluation.
    assert len(by_source["ham10000"]) == 5087 and len(by_source["dermnet"]) == 1399
    assert len(by_source["derm7pt"]) == 516  # train + extra, never val
    assert {p.label for p in by_source["ham10000"]} == {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}
    labels = {p.label for p in by_source["derm7pt"]}
    assert labels == {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc", "miscellaneous"} - {"akiec"}
    dermnet = {p.metadata["diagnosis"]: p.label for p in by_source["dermnet"]}
    assert dermnet["Melanoma in situ"] == "mel" and dermnet["Acne vulgaris"] == "Acne vulgaris"
    everything = m.make_pairs(shared_data, ("dermnet",), 0)
    assert len(everything) == 1680
    assert by_source["dermnet"][0].caption.startswith("Clinical photograph of ")


def test_cli_builds_a_case_index(tmp_path):
    from retrieval.cli import index_app

    feats = np.random.default_rng(6).normal(size=(6, 16)).astype(np.float32)
    np.savez(tmp_path / "toy__full.npz", ids=np.array([f"toy/images/{i}.png" for i in range(6)]), features=feats)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in _pairs(6)))
    res = CliRunner().invoke(index_app, ["build", "--kind", "cases", "--input", str(pairs), "--out",
                                         str(tmp_path / "ix"), "--features", str(tmp_path / "toy__full.npz"),
                                         "--pca-dim", "4", "--embedder", "toy-encoder"])
    assert res.exit_code == 0, res.output
    assert "6 vectors" in res.output
    assert CaseRetriever(tmp_path / "ix").search(feats[2], k=1)[0][0].id == "toy:2"
    res = CliRunner().invoke(index_app, ["build", "--kind", "cases", "--out", str(tmp_path / "iy")])
    assert res.exit_code != 0 and "--input" in res.output


def test_cli_builds_a_kb_index(tmp_path, monkeypatch):
    from models import backends
    from retrieval.cli import index_app

    made = {}

    def fake_create(kind, name, **kwargs):
        made.update(kind=kind, name=name, **kwargs)
        return HashingTextEmbedder(model_id=kwargs["model"])

    monkeypatch.setattr(backends, "create", fake_create)
    res = CliRunner().invoke(index_app, ["build", "--kind", "kb", "--out", str(tmp_path / "kb")])
    assert res.exit_code == 0, res.output
    assert made["kind"] == "text_embedder" and made["model"] == "all-minilm-l6-v2"
    assert json.loads((tmp_path / "kb" / "manifest.json").read_text())["embedder"] == "all-minilm-l6-v2"


# ---------------------------------------------------------------------- real weights


@pytest.mark.weights
def test_shipped_kb_index_answers_dermoscopy_queries():
    r = KBRetriever()  # models/artifacts/kb_index with the real all-minilm-l6-v2
    assert r.model_id == "all-minilm-l6-v2"
    top = [h["entry_id"] for h in r.search("blue-white veil, atypical network, irregular streaks", k=3)]
    assert "kb:melanoma" in top
    top = [h["entry_id"] for h in r.search("arborizing vessels, shiny pearly", k=3)]
    assert "kb:basal_cell_carcinoma" in top
    top = [h["entry_id"] for h in r.search("honey-coloured crusts around the mouth", k=3, modality="clinical")]
    assert "kb:impetigo" in top


def test_missing_or_bad_images_name_the_pairs_line_and_skip_missing_counts_them(tmp_path, monkeypatch):
    from PIL import Image

    import retrieval.cli as rcli
    from retrieval.cli import index_app

    (tmp_path / "toy" / "images").mkdir(parents=True)
    for i in (0, 1, 3):
        Image.new("RGB", (6, 6), (40 * i, 90, 30)).save(tmp_path / "toy" / "images" / f"{i}.png")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in _pairs(4)))  # toy/images/2.png (line 3) is missing
    with pytest.raises(FileNotFoundError, match=r"pairs.jsonl:3: image .*2.png not found .*--skip-missing"):
        build_case_index(pairs, None, image_root=tmp_path, encoder=FixedImageEmbedder(), pca_dim=None)
    idx = build_case_index(pairs, None, image_root=tmp_path, encoder=FixedImageEmbedder(), pca_dim=None, skip_missing=True)
    assert idx.manifest["count"] == 3 and idx.manifest["skipped"] == 1
    (tmp_path / "toy" / "images" / "2.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"pairs.jsonl:3: image .*2.png unreadable image"):
        build_case_index(pairs, None, image_root=tmp_path, encoder=FixedImageEmbedder(), pca_dim=None)
    (tmp_path / "toy" / "images" / "2.png").unlink()

    monkeypatch.setattr(rcli, "_image_embedder", lambda spec, device: FixedImageEmbedder())
    args = ["build", "--kind", "cases", "--input", str(pairs), "--image-root", str(tmp_path), "--out", str(tmp_path / "ix"), "--pca-dim", "0"]
    res = CliRunner().invoke(index_app, args)
    assert res.exit_code == 2 and "pairs.jsonl:3: image" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(index_app, [*args, "--skip-missing"])
    assert res.exit_code == 0, res.output
    assert "3 vectors" in res.output and "skipped 1" in res.output


def test_bad_kb_or_pairs_jsonl_is_one_line_naming_file_and_line(tmp_path):
    from retrieval.cli import index_app

    kb = tmp_path / "bad.jsonl"
    kb.write_text('{"id": "kb:x"}\n')
    res = CliRunner().invoke(index_app, ["build", "--kind", "kb", "--input", str(kb), "--out", str(tmp_path / "kb")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bad.jsonl:1:" in lines[0]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps(_pairs(1)[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: ") as exc:
        build_case_index(pairs, None, features={"toy:0": np.ones(4)}, pca_dim=None)
    assert "\n" not in str(exc.value)


def test_retrieve_warns_when_the_case_index_has_none_of_the_routes_sources():
    # An index built with "source": "test" was searched with sources=[ham10000, ...]: no case, no kNN, no word.
    from PIL import Image

    from agent import Agent
    from agent.testing import FakeCases, backends

    class Sourced(FakeCases):
        @property
        def sources(self):
            return sorted({i.split(":")[0] for i, _, _ in self.hits})

    cases = Sourced([("test:a", "mel", 0.9), ("test:b", "nv", 0.8)])
    d = Agent(backends=backends(cases=cases)).diagnose(Image.new("RGB", (32, 32), (150, 90, 70)))
    warning = next(w for w in d.input_warnings if "case index" in w)
    assert "['ham10000', 'derm7pt', 'isic2018']" in warning and "its sources: ['test']" in warning
    assert "--set routing.dermoscopy.case_sources=[test]" in warning
    step = next(t for t in d.trace if t.node == "retrieve")
    assert warning in step.notes
    ok = Agent(backends=backends(cases=Sourced())).diagnose(Image.new("RGB", (32, 32), (150, 90, 70)))
    assert not any("case index" in w for w in ok.input_warnings)
