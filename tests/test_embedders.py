"""Text and image embedder backends: tiny random models by default, real weights under -m weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.protocols import ImageEmbedder, TextEmbedder


def test_imports_are_cheap():
    """Importing the registry, resolver and backends must not pull in torch/transformers/hub."""
    code = (
        "import sys, models.registry, models.resolve, models.backends.sentence, models.backends.openclip\n"
        "heavy = [m for m in ('torch', 'transformers', 'open_clip', 'huggingface_hub') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_constructors_do_not_resolve(monkeypatch):
    import models.resolve

    def boom(*a, **k):
        raise AssertionError("resolved at construction time")

    monkeypatch.setattr(models.resolve, "resolve", boom)
    from models.backends.openclip import OpenCLIPEmbedder
    from models.backends.sentence import SentenceEmbedder

    SentenceEmbedder()
    OpenCLIPEmbedder("ViT-B-32", pretrained="all-minilm-l6-v2")


# ---------------------------------------------------------------------------------------------
# SentenceEmbedder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A random 2-layer BERT with a toy vocabulary, saved like a sentence-transformers folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny-bert")
    words = "melanoma malignant skin acne vulgaris of the a nevus benign lesion".split()
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(d / "vocab.txt")).save_pretrained(d)
    config = BertConfig(vocab_size=len(words) + 5, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=64)
    BertModel(config).eval().save_pretrained(d)
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 24,
                                                             "pooling_mode_mean_tokens": True}))
    return d


def test_sentence_embedder_tiny(tiny_bert):
    import torch
    from transformers import AutoModel, AutoTokenizer

    from models.backends.sentence import SentenceEmbedder

    texts = ["melanoma", "malignant melanoma of the skin", "acne vulgaris", "a benign nevus"]
    emb = SentenceEmbedder(str(tiny_bert), batch_size=3)
    assert isinstance(emb, TextEmbedder)
    assert emb.dim == 24 and emb.model_id == str(tiny_bert)
    out = emb.embed(texts)
    assert out.shape == (4, 24) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)

    # reference: masked mean pooling + L2 norm over one padded batch
    tok, model = AutoTokenizer.from_pretrained(tiny_bert), AutoModel.from_pretrained(tiny_bert).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5)

    # batching and order do not change a text's embedding
    np.testing.assert_allclose(emb.embed(texts[::-1])[::-1], out, atol=1e-5)
    np.testing.assert_allclose(emb.embed([texts[1]])[0], out[1], atol=1e-5)
    assert emb.embed([]).shape == (0, 24)
    with pytest.raises(TypeError):
        emb.embed("melanoma")


@pytest.mark.weights
def test_minilm_real_weights():
    from models.backends.sentence import SentenceEmbedder

    emb = SentenceEmbedder("all-minilm-l6-v2")
    assert emb.dim == 384
    texts = ["melanoma", "malignant melanoma of the skin", "acne vulgaris"]
    out = emb.embed(texts)
    assert out.shape == (3, 384) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    cos = out @ out.T
    assert cos[0, 1] > cos[0, 2] + 0.2
    np.testing.assert_array_equal(emb.embed(texts), out)  # deterministic
    np.testing.assert_allclose(emb.embed(texts[::-1])[::-1], out, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# OpenCLIPEmbedder

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
    # open_clip's default SimpleTokenizer ships its BPE vocabulary (49408 tokens) inside the package.
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture
def tiny_clip_config(tmp_path) -> Path:
    path = tmp_path / "dermgraph-tiny-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return path


def images():
    from PIL import Image

    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).convert("L"),  # non-RGB input
    ]


def test_openclip_tiny_roundtrip(tiny_clip_config, tmp_path, monkeypatch):
    import torch

    from models.backends.openclip import OpenCLIPEmbedder

    name = tiny_clip_config.stem
    texts = ["a melanoma", "an acne lesion"]
    a = OpenCLIPEmbedder(name, model_config=tiny_clip_config)
    assert isinstance(a, ImageEmbedder)
    assert a.dim == 16 and a.model_id == name
    img_a, txt_a = a.embed_images(images()), a.embed_texts(texts)
    for arr in (img_a, txt_a):
        assert arr.shape == (2, 16) and arr.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(arr, axis=1), 1.0, atol=1e-5)

    ckpt = tmp_path / "tiny.pt"
    torch.save(a.model.state_dict(), ckpt)
    b = OpenCLIPEmbedder(name, pretrained=str(ckpt), model_config=tiny_clip_config)
    np.testing.assert_allclose(b.embed_images(images()), img_a, atol=1e-6)
    np.testing.assert_allclose(b.embed_texts(texts), txt_a, atol=1e-6)
    assert b.embed_images([]).shape == (0, 16)

    # the same checkpoint registered as a model id
    reg = tmp_path / "models.yaml"
    reg.write_text(f"models:\n  - id: tiny-clip\n    role: image_embedder\n    source: 'path:{ckpt}'\n")
    monkeypatch.setenv("DERMGRAPH_MODELS", str(reg))
    c = OpenCLIPEmbedder(name, pretrained="tiny-clip", model_config=tiny_clip_config)
    np.testing.assert_allclose(c.embed_images(images()), img_a, atol=1e-6)


def test_openclip_config_errors(tmp_path):
    from models.backends.openclip import OpenCLIPEmbedder

    cfg = tmp_path / "arch.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    with pytest.raises(ValueError, match="file stem"):
        OpenCLIPEmbedder("other-name", model_config=cfg)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"embed_dim": 4}))
    with pytest.raises(ValueError, match="not an open_clip model config"):
        OpenCLIPEmbedder("bad", model_config=bad)


def test_openclip_unknown_pretrained(tiny_clip_config):
    from models.backends.openclip import OpenCLIPEmbedder

    emb = OpenCLIPEmbedder(tiny_clip_config.stem, pretrained="no-such-tag", model_config=tiny_clip_config)
    with pytest.raises(ValueError, match="not a file, a registry id"):
        emb.embed_texts(["x"])
