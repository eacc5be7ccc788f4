"""The clinical feature probe: its inputs, the artifact, where the agent runs it, and its place in the clinical stacker."""

import json

import numpy as np
import pytest
from PIL import Image

from agent import Agent
from agent.testing import FakeCases, FakeClinicalProbe, FakeSecondExpert, backends, fusion_model, modality_heads
from models.heads import Head, HeadSet
from models.probe import PROBE_FEATURES, PROBE_STAGE_FEATURES, FeatureProbe, ImageNetEncoder, imagenet_blocks, probe_inputs


def img():
    return Image.new("RGB", (64, 48), (150, 90, 70))


class StubImageNet:
    """Fixed ImageNet features (the network itself is exercised by the efficientnet tests)."""

    def __init__(self, dim: int = 3):
        self.dim = dim

    def embed(self, images):
        return np.tile(np.arange(1, self.dim + 1, dtype=np.float32), (len(images), 1))


def _probe_file(tmp_path, features=PROBE_FEATURES, d_lesion=2, d_imagenet=3, classes=("Eczema", "Psoriasis")):
    d = d_lesion + d_imagenet
    rng = np.random.default_rng(0)
    head = Head("dermnet", list(classes), rng.normal(size=(d, len(classes))).astype(np.float32), np.zeros(len(classes), np.float32))
    path = tmp_path / "probe.safetensors"
    HeadSet(np.zeros(d, np.float32), np.ones(d, np.float32), {"dermnet": head}, inputs=features, meta={"id": "test-probe", "features": features}).save(path)
    return path, head


def test_probe_inputs_scale_each_network_to_unit_length_and_keep_rows_paired():
    x = probe_inputs(np.array([[3.0, 4.0]]), np.array([[0.0, 0.0, 2.0]]))
    np.testing.assert_allclose(x, [[0.6, 0.8, 0.0, 0.0, 1.0]], atol=1e-6)
    assert probe_inputs(np.zeros(2), np.ones(3)).shape == (1, 5)  # one image as 1-d vectors; a zero vector stays zero
    with pytest.raises(ValueError, match="rows"):
        probe_inputs(np.ones((2, 2)), np.ones((3, 3)))


def test_the_probe_reads_both_networks_features_and_refuses_other_head_sets(tmp_path):
    path, head = _probe_file(tmp_path)
    probe = FeatureProbe(path, imagenet=StubImageNet())
    lesion = np.array([[1.0, 1.0], [2.0, 0.0]])
    got = probe.predict([img(), img()], lesion)
    want = head.predict_proba(probe_inputs(lesion, StubImageNet().embed([0, 0])))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert probe.classes == ["Eczema", "Psoriasis"] and probe.model_id == "test-probe"
    assert np.allclose(got.sum(1), 1) and not np.allclose(got[0], got[1])  # the lesion features move the answer
    other, _ = _probe_file(tmp_path, features="lesion-encoder")
    with pytest.raises(ValueError, match="dermgraph train probe"):
        FeatureProbe(other, imagenet=StubImageNet())


def test_stage_features_are_normalised_block_by_block():
    widths = imagenet_blocks(stages=True)
    assert widths[0] == 1280 and widths[1:] == [80, 80, 112, 112, 192, 192, 320, 320]
    rng = np.random.default_rng(1)
    imagenet = rng.normal(size=(2, sum(widths))) * np.repeat(np.arange(1, len(widths) + 1), widths)  # blocks of very different scales
    x = probe_inputs(rng.normal(size=(2, 4)), imagenet, stages=True)
    edges = np.cumsum([4] + widths)
    norms = [np.linalg.norm(x[:, a:b], axis=1) for a, b in zip(np.r_[0, edges[:-1]], edges)]
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)  # the lesion block and each ImageNet block at unit length
    with pytest.raises(ValueError, match="stage features"):
        probe_inputs(np.ones((1, 4)), np.ones((1, 1280)), stages=True)


def test_a_stage_probe_reads_stage_features(tmp_path):
    d_imagenet = sum(imagenet_blocks(stages=True))
    path, head = _probe_file(tmp_path, features=PROBE_STAGE_FEATURES, d_imagenet=d_imagenet)
    probe = FeatureProbe(path, imagenet=StubImageNet(d_imagenet))
    lesion = np.array([[1.0, 1.0]])
    np.testing.assert_allclose(probe.predict([img()], lesion), head.predict_proba(probe_inputs(lesion, StubImageNet(d_imagenet).embed([0]), stages=True)), rtol=1e-6)
    assert probe.stages and FeatureProbe(path).imagenet.stages  # its own ImageNet encoder computes the stage statistics


@pytest.mark.weights
def test_the_imagenet_stage_statistics_extend_the_pooled_features():
    import torch

    enc, plain = ImageNetEncoder(stages=True), ImageNetEncoder()
    images = [img(), Image.new("RGB", (80, 80), (30, 160, 90))]
    got = enc.embed(images)
    assert got.shape == (2, sum(imagenet_blocks(stages=True)))
    np.testing.assert_allclose(got[:, :1280], plain.embed(images), atol=1e-5)  # the same pass's pooled features
    from models.efficientnet import to_tensor

    net = plain._load()
    with torch.inference_mode():
        h = net.bn1(net.conv_stem(to_tensor(images, 224)))
        for block in net.blocks[:4]:
            h = block(h)
    np.testing.assert_allclose(got[:, 1280:1360], h.mean((2, 3)).numpy(), atol=1e-4)  # stage 3's spatial mean
    np.testing.assert_allclose(got[:, 1360:1440], h.std((2, 3)).numpy(), atol=1e-4)  # and its standard deviation


def test_the_agent_runs_the_probe_on_photos_the_expert_calls_clinical_and_skips_dermoscopy():
    probe = FakeClinicalProbe()
    clinical = FakeSecondExpert(modality={"clinical": 0.9, "dermoscopy": 0.1})
    state = Agent(backends=backends(second_expert=clinical, clinical_probe=probe)).run(img(), until="encode")
    assert probe.calls == 1 and state.encoding.expert_probs["probe_dermnet"] == {"Eczema": 0.5, "Psoriasis": 0.3, "Tinea corporis": 0.2}
    assert state.trace[0].model_id == "fake-classifier+fake-second-expert+fake-clinical-probe"
    dermoscopy = FakeSecondExpert(modality={"clinical": 0.2, "dermoscopy": 0.8})
    state = Agent(backends=backends(second_expert=dermoscopy, clinical_probe=probe)).run(img(), until="encode")
    assert probe.calls == 1 and "probe_dermnet" not in state.encoding.expert_probs  # no pass spent on dermoscopy
    assert state.trace[0].model_id == "fake-classifier+fake-second-expert"
    # Without the expert's modality head there is nothing to judge by: the probe runs.
    state = Agent(backends=backends(clinical_probe=probe)).run(img(), until="encode")
    assert probe.calls == 2 and "probe_dermnet" in state.encoding.expert_probs


def _clinical_with(model, experts: dict[str, float], extra: int):
    mf = model.modalities["clinical"]
    mf.experts = list(mf.experts) + list(experts)
    mf.coef = np.concatenate([mf.coef, list(experts.values())])
    mf.meta["extra_candidates"] = extra
    return model


def test_the_clinical_stacker_reads_the_probe_and_takes_its_top_labels_as_candidates():
    from agent.nodes.reason import expert_candidates

    cases = FakeCases([("dermnet:a", "Acne vulgaris", 0.9), ("dermnet:b", "Psoriasis", 0.6)])
    clinical = FakeSecondExpert(dermnet={"Psoriasis": 0.7, "Acne vulgaris": 0.3}, modality={"clinical": 0.9, "dermoscopy": 0.1})
    model = _clinical_with(fusion_model(), {"effnet": 0.5, "probe": 2.0}, extra=1)
    assert expert_candidates(model, "clinical") == {"effnet_dermnet": 1, "probe_dermnet": 1}

    def diagnose(model):
        return Agent(backends=backends(modality_heads=modality_heads("clinical"), cases=cases, second_expert=clinical, clinical_probe=FakeClinicalProbe(),
                                       fusion=model)).diagnose(img())  # fmt: skip

    d = diagnose(model)
    labels = [x.label for x in d.differential]
    # The expert's labels are all the cases' already; the probe's top one (Eczema) is added, and its weight lifts it.
    assert "Eczema" in labels and "Tinea corporis" not in labels
    unweighted = diagnose(_clinical_with(fusion_model(), {"effnet": 0.5, "probe": 0.0}, extra=1))
    p = {x.label: x.probability for x in d.differential}
    p0 = {x.label: x.probability for x in unweighted.differential}
    assert p["Eczema"] > 100 * p0["Eczema"] and p["Acne vulgaris"] < p0["Acne vulgaris"]  # the probe gives Acne almost nothing
    step = next(s for s in d.reasoning_steps if s.kind == "expert" and s.data["expert"] == "probe")
    assert "clinical feature probe" in step.text
    # Dermoscopy never reads it, and an artifact without 'probe' takes no candidates from it.
    assert expert_candidates(_clinical_with(fusion_model(), {"effnet": 0.5}, extra=2), "clinical") == {"effnet_dermnet": 2}


def test_the_fusion_trainer_fits_the_probe_and_refuses_its_in_sample_photos(tmp_path):
    from models.stacker import FusionModel
    from tests.test_fusion_training import _records
    from training.fusion import Config, load_parts, train
    from training.fusion_data import expert_path

    rng = np.random.default_rng(3)
    recs = _records(300, rng)
    path = tmp_path / "experts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    clin = [r for r in recs if r["modality"] == "clinical"]
    # The probe names the truth first on 70 % of the clinical photos, a label no case proposed otherwise.
    probe = [{"id": r["id"], "probe": {(r["label"] if rng.uniform() < 0.7 else "d97"): 0.6, "d98": 0.4}} for r in clin]
    expert_path(path, "probe").write_text("\n".join(json.dumps(p) for p in probe) + "\n")
    kw = dict(experts_file=path, out_dir=tmp_path / "out", artifact=tmp_path / "fusion.json", dermoscopy_experts=["classifier", "knn", "morphology"],
              clinical_experts=["knn", "probe"], extra_experts=["probe"], clinical_extra_candidates=1, c_grid=[1.0], gamma_grid=[0.0],
              morphology_c_grid=[1.0], n_bootstrap=0)  # fmt: skip
    train(Config(**kw))
    mf = FusionModel.load(tmp_path / "fusion.json").modalities["clinical"]
    assert mf.experts == ["knn", "probe"] and mf.meta["extra_candidates"] == 1 and mf.coef[1] > 0

    def probe_tops_proposed(candidate_experts):
        parts = load_parts(path, ["probe"], 1, candidate_experts=candidate_experts)
        return [max(r["probe"], key=r["probe"].get) in r["candidates"] for r in parts["clin_fit"] + parts["clin_eval"]]

    assert all(probe_tops_proposed(["knn", "probe"])) and not all(probe_tops_proposed(["knn"]))  # 'd97' comes from the probe only
    # A photo the probe trained on must not fit the clinical stacker.
    from training.data import is_dermnet_fit_half

    next(p for p in probe if is_dermnet_fit_half(p["id"].split(":")[1]))["probe_in_sample"] = True
    expert_path(path, "probe").write_text("\n".join(json.dumps(p) for p in probe) + "\n")
    with pytest.raises(ValueError, match="clinical stacker would be fitted on in-sample outputs \\(probe: 1 cases\\)"):
        train(Config(**kw))


def test_the_probe_trainer_cross_validates_each_c_on_the_unmasked_view_and_never_predicts_an_absent_class():
    from training.probe import Config, cross_validate, fit

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 10)  # 4 of 5 classes present: class 4 has no photo
    centres = rng.normal(size=(5, 6)) * 3
    x = {"full": centres[y] + rng.normal(size=(40, 6)), "masked": centres[y] + rng.normal(size=(40, 6))}
    head = fit(np.concatenate([x["masked"], x["full"]]), np.concatenate([y, y]), 1.0, list("abcde"), 500)
    p = head.predict_proba(x["full"])
    assert head.weight.shape == (6, 5) and np.allclose(p.sum(1), 1) and p[:, 4].max() < 1e-6 and (p.argmax(1) == y).mean() > 0.9
    cfg = Config(c_grid=[1e-4, 1.0], folds=2, max_iter=500, train_views=["masked", "full"])
    table = cross_validate(x, y, cfg, list("abcde"))
    assert [r["C"] for r in table] == [1e-4, 1.0]
    assert table[1]["log_loss"] < table[0]["log_loss"] and table[1]["top1"] > 0.9  # almost no fit at C = 1e-4
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="train_views"):
        Config(train_views=["sideways"])
