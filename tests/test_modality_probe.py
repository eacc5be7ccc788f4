"""The modality probe (a linear model on frozen ImageNet features) and how the agent combines it with the modality head."""

import numpy as np
import pytest
from PIL import Image

from agent import Agent
from agent.config import AgentConfig
from agent.nodes.modality import combine_opinions
from agent.testing import FakeModalityProbe, backends
from models.heads import Head, HeadSet
from models.probe import IMAGENET_STAGE_FEATURES, FeatureProbe, ImageNetEncoder, imagenet_blocks, imagenet_inputs
from models.vocabulary import MODALITIES


def img(colour=(150, 90, 70)):
    return Image.new("RGB", (64, 48), colour)


class CountingEncoder(ImageNetEncoder):
    """The real memo around a stub forward pass that counts images (the network is exercised by the efficientnet tests)."""

    def __init__(self):
        super().__init__(stages=True)
        self.forwarded = 0

    def _forward(self, images):
        self.forwarded += len(images)
        return np.stack([np.full(self.dim, float(np.asarray(im).mean()), np.float32) for im in images])


def _probe_file(tmp_path):
    d = sum(imagenet_blocks(True))
    rng = np.random.default_rng(0)
    head = Head("modality", list(MODALITIES), rng.normal(size=(d, len(MODALITIES))).astype(np.float32), np.zeros(len(MODALITIES), np.float32))
    path = tmp_path / "modality_probe.safetensors"
    HeadSet(np.zeros(d, np.float32), np.ones(d, np.float32), {"modality": head}, inputs="imagenet", meta={"id": "test-modality-probe", "features": IMAGENET_STAGE_FEATURES}).save(path)
    return path, head


def test_an_imagenet_probe_reads_imagenet_features_only(tmp_path):
    path, head = _probe_file(tmp_path)
    enc = CountingEncoder()
    probe = FeatureProbe(path, imagenet=enc)
    assert probe.stages and not probe.reads_lesion_features and probe.classes == list(MODALITIES)
    got = probe.predict([img(), img((10, 200, 30))])  # no lesion features needed
    want = head.predict_proba(imagenet_inputs(enc._forward([img(), img((10, 200, 30))]), stages=True))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    x = imagenet_inputs(np.random.default_rng(1).normal(size=(2, sum(imagenet_blocks(True)))) * 7, stages=True)
    edges = np.cumsum(imagenet_blocks(True))
    np.testing.assert_allclose([np.linalg.norm(x[:, a:b], axis=1) for a, b in zip(np.r_[0, edges[:-1]], edges)], 1.0, rtol=1e-5)


def test_the_encoder_reuses_its_pass_for_the_same_image_objects_only():
    enc = CountingEncoder()
    a, b, c = img(), img((0, 0, 0)), img((255, 255, 255))
    first = enc.embed([a, b])
    assert enc.forwarded == 2
    np.testing.assert_array_equal(enc.embed([b]), first[1:])  # the clinical probe after the modality probe: no second pass
    assert enc.forwarded == 2
    enc.embed([b, c])  # b is the previous call's: only c runs
    assert enc.forwarded == 3
    enc.embed([img((0, 0, 0))])  # an equal image that is another object runs again (identity, not content)
    assert enc.forwarded == 4


def test_combine_opinions_gives_the_head_the_remaining_weight():
    head, probe, expert = np.array([0.7, 0.2, 0.05, 0.05]), np.array([0.1, 0.8, 0.05, 0.05]), np.array([0.25, 0.25, 0.25, 0.25])
    geo = combine_opinions(head, [(probe, 0.5), (expert, 0.0)])
    want = np.sqrt(head * probe)
    np.testing.assert_allclose(geo, want / want.sum())
    assert combine_opinions(head, [(None, 0.5)]).tolist() == pytest.approx(head.tolist())  # a missing opinion leaves the head alone
    np.testing.assert_allclose(combine_opinions(head, [(probe, 0.25), (expert, 0.25)], "arithmetic"), 0.5 * head + 0.25 * probe + 0.25 * expert)
    rows = combine_opinions(np.stack([head, probe]), [(np.stack([probe, head]), 0.5)])
    assert rows.shape == (2, 4) and np.allclose(rows.sum(1), 1) and np.allclose(rows[0], rows[1])  # rows, symmetric weights


def test_the_agent_decides_modality_with_the_probe_by_default():
    """The head double is sure of dermoscopy (0.88); a probe sure of a clinical photo turns the geometric mean to clinical,
    and its weight 0 (or no probe) leaves the head alone. The trace keeps each opinion."""
    probe = FakeModalityProbe({"clinical": 0.999, "dermoscopy": 0.0001, "histopathology": 0.0005, "not_skin": 0.0004})
    state = Agent(backends=backends(modality_probe=probe)).run(img(), until="modality")
    step = state.trace[-1]
    p_head = np.array([step.inputs["opinions"]["head"][c] for c in MODALITIES])
    p_probe = np.array([probe.probs[c] for c in MODALITIES])
    want = p_head ** (2 / 3) * p_probe ** (1 / 3)  # a third for the probe; no second expert here, so the head has two
    assert state.modality.label == "clinical" and probe.calls == 1
    assert state.modality.probs["clinical"] == pytest.approx(float(want[0] / want.sum()), abs=1e-3)
    assert step.inputs["opinions"]["imagenet_probe"]["clinical"] == 0.999 and step.inputs["uses"].endswith("decided by the geometric mean of the head (0.67), the modality probe fake-modality-probe (0.33)")
    assert step.model_id.endswith("+fake-modality-probe")
    off = Agent(AgentConfig.model_validate({"modality": {"imagenet_weight": 0}}), backends=backends(modality_probe=probe)).run(img(), until="modality")
    assert off.modality.label == "dermoscopy" and probe.calls == 1 and "imagenet_probe" not in off.trace[-1].inputs["opinions"]
    none = Agent(backends=backends()).run(img(), until="modality")
    assert none.modality.probs == off.modality.probs


def test_modality_weights_must_leave_the_head_a_share():
    with pytest.raises(ValueError, match="exceed 1"):
        AgentConfig.model_validate({"modality": {"imagenet_weight": 0.7, "second_expert_weight": 0.5}})
    # without a probe its weight does not count: the head and the expert alone, as before the probe
    assert AgentConfig.model_validate({"modality": {"imagenet_probe": None, "second_expert_weight": 0.8}}).modality.second_expert_weight == 0.8
    assert AgentConfig().modality.imagenet_probe == "modality-probe" and AgentConfig().modality.combine == "geometric"


def test_the_runtime_shares_one_imagenet_encoder_between_stage_probes(tmp_path):
    from agent.runtime import Runtime

    path, _ = _probe_file(tmp_path)
    rt = Runtime(AgentConfig.model_validate({"modality": {"imagenet_probe": str(path)}}))
    assert rt.modality_probe.imagenet is rt.clinical_probe.imagenet is rt.imagenet_encoder  # the shipped clinical probe reads stages too
    assert Runtime(AgentConfig.model_validate({"modality": {"imagenet_probe": None}})).modality_probe is None
    # weight 0: nothing loads, so the micro-batched path spends no pass on it and records the same models as the sequential one
    assert Runtime(AgentConfig.model_validate({"modality": {"imagenet_probe": str(path), "imagenet_weight": 0}})).modality_probe is None


def test_the_trainer_reads_cached_imagenet_features_by_ref_and_refuses_finetuning_them(tmp_path):
    from training.modality import Config, head_inputs

    refs = np.array(["data:ham10000:full:a.jpg", "synthetic:60:0:1"])
    feats = np.random.default_rng(2).normal(size=(3, sum(imagenet_blocks(True)))).astype(np.float32)
    np.savez(tmp_path / "imagenet_stages__modality.npz", ids=np.array(["synthetic:60:0:1", "other", "data:ham10000:full:a.jpg"]), features=feats)
    x, inputs, meta = head_inputs(Config(inputs="imagenet-stages", feature_dir=tmp_path), np.zeros((2, 5)), refs)
    np.testing.assert_allclose(x, imagenet_inputs(feats[[2, 0]], stages=True), rtol=1e-6)
    assert meta == {"features": IMAGENET_STAGE_FEATURES} and "ImageNet" in inputs
    plain = np.ones((2, 5))
    assert head_inputs(Config(), plain, refs)[0] is plain
    with pytest.raises(ValueError, match="inputs: lesion-encoder"):
        Config(inputs="imagenet-stages", finetune={})


def test_the_runtime_refuses_a_probe_made_for_another_role_when_it_loads(tmp_path):
    from agent.runtime import Runtime
    from models.probe import PROBE_STAGE_FEATURES

    path, _ = _probe_file(tmp_path)
    with pytest.raises(ValueError, match="encoder.clinical_probe .* needs one reading"):
        Runtime(AgentConfig.model_validate({"encoder": {"clinical_probe": str(path)}})).clinical_probe  # a modality probe as the DermNet probe
    d = sum(imagenet_blocks(True))
    three = tmp_path / "three.safetensors"  # ImageNet features, but without the not_skin class
    head = Head("modality", list(MODALITIES[:3]), np.zeros((d, 3), np.float32), np.zeros(3, np.float32))
    HeadSet(np.zeros(d, np.float32), np.ones(d, np.float32), {"modality": head}, meta={"id": "three", "features": IMAGENET_STAGE_FEATURES}).save(three)
    with pytest.raises(ValueError, match="modality.imagenet_probe 'three'|modality.imagenet_probe .* over"):
        Runtime(AgentConfig.model_validate({"modality": {"imagenet_probe": str(three)}})).modality_probe
    dermnet = tmp_path / "dermnet.safetensors"
    head = Head("dermnet", ["Eczema", "Psoriasis"], np.zeros((2048 + d, 2), np.float32), np.zeros(2, np.float32))
    HeadSet(np.zeros(2048 + d, np.float32), np.ones(2048 + d, np.float32), {"dermnet": head}, meta={"id": "dn", "features": PROBE_STAGE_FEATURES}).save(dermnet)
    with pytest.raises(ValueError, match="needs one reading imagenet-stages"):
        Runtime(AgentConfig.model_validate({"modality": {"imagenet_probe": str(dermnet)}})).modality_probe


def test_a_probe_with_its_classes_in_another_order_is_read_by_name():
    """The probe's columns are matched to the head's classes by name, not position."""
    order = ["not_skin", "histopathology", "dermoscopy", "clinical"]
    probs = {"not_skin": 0.0004, "histopathology": 0.0005, "dermoscopy": 0.0001, "clinical": 0.999}
    probe = FakeModalityProbe({c: probs[c] for c in order})
    assert probe.classes == order
    state = Agent(backends=backends(modality_probe=probe)).run(img(), until="modality")
    assert state.trace[-1].inputs["opinions"]["imagenet_probe"] == {"clinical": 0.999, "dermoscopy": 0.0001, "histopathology": 0.0005, "not_skin": 0.0004}
    assert state.modality.label == "clinical"


def test_concurrent_embeds_each_get_their_own_images_features():
    """A server runs cases on several threads over one runtime: each call gets the rows of its own images."""
    from concurrent.futures import ThreadPoolExecutor

    enc = CountingEncoder()
    images = [img((k * 20, 255 - k * 20, 90)) for k in range(8)]
    want = np.stack([np.full(enc.dim, float(np.asarray(im).mean()), np.float32) for im in images])
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda im: enc.embed([im])[0], images * 3))
    np.testing.assert_array_equal(np.stack(got), np.concatenate([want] * 3))
