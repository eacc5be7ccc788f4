"""VLM backends: transformers on a tiny random LLaVA built offline, OpenAI-compatible request format."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from agent.testing import FakeOpenAIServer, build_tiny_llava
from models.backends import create
from models.backends.hf_vlm import TransformersVLM
from models.backends.openai_compat import OpenAICompatibleVLM, image_data_url
from models.protocols import VLM

PROMPTS = ["Describe the lesion.", "What is a melanoma? Be brief."]


def _images():
    rng = np.random.RandomState(0)
    return [
        Image.fromarray(rng.randint(0, 255, (40, 56, 3), dtype=np.uint8)),
        Image.fromarray(rng.randint(0, 255, (64, 48, 3), dtype=np.uint8)).convert("L"),  # grey: converted to RGB
    ]


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    path = build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))
    return TransformersVLM(str(path), max_batch_size=2)


def test_tiny_vlm_generates_deterministically(tiny_vlm):
    assert isinstance(tiny_vlm, VLM)
    images = _images()
    first = tiny_vlm.generate(images, PROMPTS, max_new_tokens=6)
    assert len(first) == 2 and all(isinstance(t, str) for t in first)
    assert tiny_vlm.generate(images, PROMPTS, max_new_tokens=6) == first
    # Batched == one at a time (left padding), and the image matters.
    assert [tiny_vlm.generate([im], [p], max_new_tokens=6)[0] for im, p in zip(images, PROMPTS)] == first


def test_tiny_vlm_prompt_uses_template_with_image(tiny_vlm):
    prompt = tiny_vlm._prompt("Is it a nevus?")
    assert "<image>" in prompt and "Is it a nevus?" in prompt and prompt.endswith("assistant\n")


def test_tiny_vlm_accepts_arrays_and_checks_lengths(tiny_vlm):
    arr = np.asarray(_images()[0])
    assert len(tiny_vlm.generate([arr], ["Describe the lesion."], max_new_tokens=3)) == 1
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        tiny_vlm.generate(_images(), PROMPTS[:1])


def test_vlm_registry_is_lazy(tmp_path):
    vlm = create("vlm", "transformers", model=str(tmp_path / "not-built-yet"))
    assert vlm._model is None and vlm.model_id == "not-built-yet"


def test_vlm_hub_id_offline_gives_guidance(no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vlm = TransformersVLM("some-org/some-vlm-that-is-not-cached")
    with pytest.raises(Exception, match=r"(?s)some-org/some-vlm-that-is-not-cached.*local-dir.*path:"):
        vlm.generate(_images()[:1], PROMPTS[:1])


def test_openai_vlm_request_format(no_network):
    with FakeOpenAIServer() as srv:
        vlm = create("vlm", "openai-compatible", base_url=srv.base_url, model="vlm-m")
        assert isinstance(vlm, VLM)
        out = vlm.generate(_images(), PROMPTS, max_new_tokens=16, temperature=0.2)
        assert sorted(out) == sorted(f"1 image(s): {p}" for p in PROMPTS)
        bodies = sorted((b for _, b in srv.requests), key=lambda b: b["messages"][0]["content"][1]["text"])
    for body, prompt, image in zip(bodies, PROMPTS, _images()):
        assert body["model"] == "vlm-m" and body["max_tokens"] == 16 and body["temperature"] == 0.2
        (msg,) = body["messages"]
        assert msg["role"] == "user"
        img_part, text_part = msg["content"]
        assert text_part == {"type": "text", "text": prompt}
        url = img_part["image_url"]["url"]
        assert img_part["type"] == "image_url" and url.startswith("data:image/png;base64,")
        decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert decoded.format == "PNG" and decoded.mode == "RGB" and decoded.size == image.size


def test_image_data_url_inputs(tmp_path):
    img = _images()[0]
    path = tmp_path / "x.jpg"
    img.save(path)
    for src in (img, np.asarray(img), path, str(path)):
        assert image_data_url(src).startswith("data:image/png;base64,")


def test_openai_vlm_checks_lengths():
    vlm = OpenAICompatibleVLM("http://127.0.0.1:9/v1", "m")
    with pytest.raises(ValueError):
        vlm.generate(_images(), PROMPTS[:1])
