"""EfficientNet-Lite0: key mapping, safe loading of the wheel's pickle, parity with the reference
implementation (``efficientnet_lite_pytorch``), and the multi-task expert artifact."""

import io
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from models import efficientnet as E
from models.protocols import ImageClassifier


def _reference_keys() -> list[str]:
    """The state-dict keys of the reference Lite0 (``_blocks.N`` flat, lukemelas-style names)."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = ["_conv_stem.weight", *(f"_bn0.{s}" for s in bn)]
    for n in range(sum(E.STAGE_DEPTHS)):
        layers = ["_depthwise_conv", "_bn1", "_project_conv", "_bn2"] if n == 0 else ["_expand_conv", "_bn0", "_depthwise_conv", "_bn1", "_project_conv", "_bn2"]
        for layer in layers:
            keys += [f"_blocks.{n}.{layer}.{s}" for s in (bn if "_bn" in layer else ("weight",))]
    return keys + ["_conv_head.weight", *(f"_bn1.{s}" for s in bn), "_fc.weight", "_fc.bias"]


def test_key_mapping_covers_timm_exactly():
    timm = pytest.importorskip("timm")
    want = set(timm.create_model(E.TIMM_ARCH, pretrained=False).state_dict())
    got = [E.reference_to_timm_key(k) for k in _reference_keys()]
    assert len(got) == len(set(got)) == len(want)
    assert set(got) == want
    assert E.reference_to_timm_key("_blocks.0._project_conv.weight") == "blocks.0.0.conv_pw.weight"
    assert E.reference_to_timm_key("_blocks.3._project_conv.weight") == "blocks.2.0.conv_pwl.weight"
    assert E.reference_to_timm_key("_blocks.15._bn2.bias") == "blocks.6.0.bn3.bias"
    assert E.reference_to_timm_key("_bn1.weight") == "bn2.weight"


@pytest.mark.parametrize("bad", ["_blocks.16._bn0.weight", "_blocks.0._expand_conv.weight", "_se.weight", "module._fc.bias"])
def test_unknown_keys_are_errors(bad):
    with pytest.raises(KeyError):
        E.reference_to_timm_key(bad)


class _Boom:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickle_with_code_is_refused(tmp_path):
    """The wheel's file is a pickle: only tensors and containers may come out of it."""
    import torch

    path = tmp_path / "evil.pth"
    buf = io.BytesIO()
    torch.save({"x": torch.zeros(1), "y": _Boom()}, buf, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    path.write_bytes(buf.getvalue())
    with pytest.raises(pickle.UnpicklingError):
        E.load_reference_pth(path)


def _tiny_expert(tmp_path):
    heads = {"ham": ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"], "dermnet": ["a", "b", "c"], "modality": ["clinical", "dermoscopy", "histopathology", "not_skin"]}
    net = E.multitask_net(heads, pretrained=False)
    return net, E.save_expert(net, tmp_path / "expert.safetensors", {"image_size": 64})


def test_expert_roundtrip_fp16_and_classifier_protocol(tmp_path):
    import torch
    from PIL import Image

    net, path = _tiny_expert(tmp_path)
    assert E.expert_info(path)["heads"]["dermnet"] == ["a", "b", "c"]
    loaded, info = E.load_expert(path)
    ref = {k: v.half().float() for k, v in net.state_dict().items()}
    for k, v in loaded.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, ref[k]), k
    expert = E.EfficientNetExpert(path)
    assert isinstance(expert, ImageClassifier)
    imgs = [Image.fromarray(np.full((50, 70, 3), c, np.uint8)) for c in (0, 128, 255)]
    out = expert.predict(imgs)
    assert out.probs.shape == (3, 7) and out.features.shape == (3, E.FEATURE_DIM)
    np.testing.assert_allclose(out.probs.sum(1), 1, atol=1e-5)
    assert out.labels == tuple(info["heads"]["ham"])
    feats, probs = expert.predict_heads(imgs)
    assert set(probs) == {"ham", "dermnet", "modality"} and probs["modality"].shape == (3, 4)
    np.testing.assert_allclose(feats, out.features, atol=1e-5)  # deterministic inference


def test_view_size_encodes_the_viewed_images_again_at_that_resolution(tmp_path):
    """view_size (FixRes): the images the condition picks get their view heads and pooled features from passes at
    that size (the same network saved for that size is the reference); the others and the other heads keep the
    trained size; an absurd size is refused."""
    import torch
    from PIL import Image

    torch.manual_seed(1)
    net, path = _tiny_expert(tmp_path)
    big = E.save_expert(net, tmp_path / "expert96.safetensors", {"image_size": 96})
    ramp = np.linspace(0, 255, 56).astype(np.uint8)
    grads = [Image.fromarray(np.stack([np.tile(ramp, (40, 1)), np.full((40, 56), c, np.uint8), np.full((40, 56), 255 - c, np.uint8)], -1)) for c in (0, 60, 120, 180, 255)]
    views = ("hflip", "vflip", "rot90")
    f64, p64 = E.EfficientNetExpert(path).predict_heads(grads)
    f96, p96 = E.EfficientNetExpert(big, views=views, view_heads=["dermnet"]).predict_heads(grads)
    first = int(p64["modality"][0].argmax())
    picked = p64["modality"].argmax(1) == first
    assert 0 < picked.sum() < len(grads)
    label = E.expert_info(path)["heads"]["modality"][first]
    feats, probs = E.EfficientNetExpert(path, views=views, view_heads=["dermnet"], views_if=f"modality={label}", view_size=96, batch_size=3).predict_heads(grads)
    np.testing.assert_allclose(probs["dermnet"][picked], p96["dermnet"][picked], atol=2e-5)
    np.testing.assert_allclose(feats[picked], f96[picked], atol=1e-4)
    np.testing.assert_allclose(probs["dermnet"][~picked], p64["dermnet"][~picked], atol=2e-5)
    np.testing.assert_allclose(feats[~picked], f64[~picked], atol=1e-4)
    np.testing.assert_allclose(probs["ham"], p64["ham"], atol=2e-5)
    assert not np.allclose(feats[picked], f64[picked])
    with pytest.raises(ValueError, match="view_size"):
        E.EfficientNetExpert(path, view_size=4)


def test_views_average_each_head_over_the_image_and_its_views(tmp_path):
    """CCT for the second expert: each head is the mean over the image and its views (made as PIL would make
    them), one pass per view; features stay the original view's; unknown views are refused."""
    from PIL import Image

    from models.tta import tta_view

    _, path = _tiny_expert(tmp_path)
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)) for _ in range(3)]
    views = ("hflip", "vflip", "rot90")
    plain = E.EfficientNetExpert(path)
    feats, probs = E.EfficientNetExpert(path, views=views, batch_size=5).predict_heads(imgs)  # 5 // 4: one image per pass
    per_view = [plain.predict_heads(imgs)] + [plain.predict_heads([tta_view(im, v) for im in imgs]) for v in views]
    for head in probs:
        np.testing.assert_allclose(probs[head], np.mean([p[head] for _, p in per_view], 0), atol=2e-5)
    np.testing.assert_allclose(feats, per_view[0][0], atol=1e-5)
    assert not np.allclose(probs["ham"], per_view[0][1]["ham"])  # the views do change the output
    # view_heads: only those heads average; the others are the image's own.
    _, some = E.EfficientNetExpert(path, views=views, view_heads=["dermnet"]).predict_heads(imgs)
    np.testing.assert_allclose(some["dermnet"], probs["dermnet"], atol=2e-5)
    np.testing.assert_allclose(some["ham"], per_view[0][1]["ham"], atol=2e-5)
    # views_if: only images whose own modality head ranks the label first get the views (a seeded tiny net and
    # colour gradients, so that the label is first for some images and not for others).
    import torch

    torch.manual_seed(1)
    _, path = _tiny_expert(tmp_path / "seeded")
    ramp = np.linspace(0, 255, 56).astype(np.uint8)
    grads = [Image.fromarray(np.stack([np.tile(ramp, (40, 1)), np.full((40, 56), c, np.uint8), np.full((40, 56), 255 - c, np.uint8)], -1)) for c in (0, 60, 120, 180, 255)]
    single = E.EfficientNetExpert(path).predict_heads(grads)[1]
    every = E.EfficientNetExpert(path, views=views, view_heads=["dermnet"]).predict_heads(grads)[1]
    first = int(single["modality"][0].argmax())
    picked = single["modality"].argmax(1) == first
    assert 0 < picked.sum() < len(grads)
    label = E.expert_info(path)["heads"]["modality"][first]
    _, cond = E.EfficientNetExpert(path, views=views, view_heads=["dermnet"], views_if=f"modality={label}").predict_heads(grads)
    np.testing.assert_allclose(cond["dermnet"][picked], every["dermnet"][picked], atol=2e-5)
    np.testing.assert_allclose(cond["dermnet"][~picked], single["dermnet"][~picked], atol=2e-5)
    assert not np.allclose(cond["dermnet"][picked], single["dermnet"][picked])
    np.testing.assert_allclose(cond["ham"], single["ham"], atol=2e-5)
    with pytest.raises(ValueError, match="head=label"):
        E.EfficientNetExpert(path, views=views, views_if="clinical")
    with pytest.raises(ValueError, match="no head 'modality' with label 'skin'"):
        E.EfficientNetExpert(path, views=views, views_if="modality=skin").predict_heads(imgs)
    with pytest.raises(ValueError, match="unknown test-time views"):
        E.EfficientNetExpert(path, views=("rot180",))
    with pytest.raises(ValueError, match="not heads of"):
        E.EfficientNetExpert(path, views=views, view_heads=["crit_streaks"]).predict_heads(imgs)


def test_members_average_every_head_over_the_ensemble_where_picked(tmp_path):
    """An output ensemble: for the images members_if picks (judged on the first network's own output), each head is
    the mean of the networks' probabilities, each network run as the first is (its views on the same images); the
    others and the pooled features are the first network's; members with other heads, a condition without members
    and a condition on a missing label are refused."""
    import torch
    from PIL import Image

    torch.manual_seed(1)
    _, path = _tiny_expert(tmp_path / "a")
    torch.manual_seed(2)
    _, other = _tiny_expert(tmp_path / "b")
    ramp = np.linspace(0, 255, 56).astype(np.uint8)
    grads = [Image.fromarray(np.stack([np.tile(ramp, (40, 1)), np.full((40, 56), c, np.uint8), np.full((40, 56), 255 - c, np.uint8)], -1)) for c in (0, 60, 120, 180, 255)]
    fa, pa = E.EfficientNetExpert(path).predict_heads(grads)
    _, pb = E.EfficientNetExpert(other).predict_heads(grads)
    ens = E.EfficientNetExpert(path, members=[str(other)])
    assert ens.model_id == "efficientnet-lite0-derm+expert"  # both in the trace (a member file by its stem)
    fe, pe = ens.predict_heads(grads)
    for head in pa:
        np.testing.assert_allclose(pe[head], (pa[head] + pb[head]) / 2, atol=2e-5)
    np.testing.assert_allclose(fe, fa, atol=1e-5)
    first = int(pa["modality"][0].argmax())
    picked = pa["modality"].argmax(1) == first
    assert 0 < picked.sum() < len(grads)
    label = E.expert_info(path)["heads"]["modality"][first]
    _, pc = E.EfficientNetExpert(path, members=[str(other)], members_if=f"modality={label}", batch_size=3).predict_heads(grads)
    for head in pa:
        np.testing.assert_allclose(pc[head][picked], pe[head][picked], atol=2e-5)
        np.testing.assert_allclose(pc[head][~picked], pa[head][~picked], atol=2e-5)
    # Views: each member is averaged over the same views of the same images.
    views = ("hflip", "rot90")
    _, va = E.EfficientNetExpert(path, views=views, view_heads=["dermnet"]).predict_heads(grads)
    _, vb = E.EfficientNetExpert(other, views=views, view_heads=["dermnet"]).predict_heads(grads)
    _, ve = E.EfficientNetExpert(path, views=views, view_heads=["dermnet"], members=[str(other)]).predict_heads(grads)
    np.testing.assert_allclose(ve["dermnet"], (va["dermnet"] + vb["dermnet"]) / 2, atol=2e-5)
    heads = {"ham": ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"], "dermnet": ["a", "b"], "modality": ["clinical", "dermoscopy", "histopathology", "not_skin"]}
    odd = E.save_expert(E.multitask_net(heads, pretrained=False), tmp_path / "odd.safetensors", {"image_size": 64})
    with pytest.raises(ValueError, match="members must share"):
        E.EfficientNetExpert(path, members=[str(odd)]).predict_heads(grads)
    with pytest.raises(ValueError, match="members_if without members"):
        E.EfficientNetExpert(path, members_if="modality=dermoscopy")
    with pytest.raises(ValueError, match="members_if modality=skin"):
        E.EfficientNetExpert(path, members=[str(other)], members_if="modality=skin").predict_heads(grads)


def test_networks_run_in_channels_last_memory_by_default_with_the_same_outputs(tmp_path):
    """Channels-last memory (faster depthwise convolutions) is the default for the expert, its members and views, and
    changes no output beyond float rounding; memory_channels_last=False keeps NCHW."""
    import torch
    from PIL import Image

    torch.manual_seed(1)
    _, path = _tiny_expert(tmp_path / "a")
    torch.manual_seed(2)
    _, other = _tiny_expert(tmp_path / "b")
    ramp = np.linspace(0, 255, 56).astype(np.uint8)
    grads = [Image.fromarray(np.stack([np.tile(ramp, (40, 1)), np.full((40, 56), c, np.uint8), np.full((40, 56), 255 - c, np.uint8)], -1)) for c in (0, 90, 200)]
    opts = {"views": ("hflip", "rot90"), "view_heads": ["dermnet"], "members": [str(other)]}
    fast, plain = E.EfficientNetExpert(path, **opts), E.EfficientNetExpert(path, **opts, memory_channels_last=False)
    (ff, pf), (fp, pp) = fast.predict_heads(grads), plain.predict_heads(grads)
    np.testing.assert_allclose(ff, fp, atol=1e-4)
    for head in pp:
        np.testing.assert_allclose(pf[head], pp[head], atol=1e-5)
    conv = fast._net.backbone.conv_stem.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert all(m.backbone.conv_stem.weight.is_contiguous(memory_format=torch.channels_last) for m in fast._member_nets)
    assert plain._net.backbone.conv_stem.weight.is_contiguous()


def test_bfloat16_precision_is_an_option_with_float32_outputs_close_to_the_default(tmp_path):
    """precision: bfloat16 autocasts the forward pass (faster on CPUs with BF16 and on GPUs); outputs stay float32 and
    near the float32 ones; another precision is refused, naming the valid ones."""
    import torch
    from PIL import Image

    from models.precision import PRECISIONS

    torch.manual_seed(1)
    _, path = _tiny_expert(tmp_path)
    ramp = np.linspace(0, 255, 56).astype(np.uint8)
    grads = [Image.fromarray(np.stack([np.tile(ramp, (40, 1)), np.full((40, 56), c, np.uint8), np.full((40, 56), 255 - c, np.uint8)], -1)) for c in (0, 120, 255)]
    f32, p32 = E.EfficientNetExpert(path, views=("hflip",)).predict_heads(grads)
    f16, p16 = E.EfficientNetExpert(path, views=("hflip",), precision="bfloat16").predict_heads(grads)
    assert f16.dtype == np.float32 and all(v.dtype == np.float32 for v in p16.values())
    assert not np.array_equal(f16, f32)  # the pass did run in bfloat16
    np.testing.assert_allclose(f16, f32, atol=0.1 * float(np.abs(f32).max()))
    for head in p32:
        np.testing.assert_allclose(p16[head], p32[head], atol=0.1)
    assert PRECISIONS == ("float32", "bfloat16")
    with pytest.raises(ValueError, match="unknown precision 'half'; valid: float32, bfloat16"):
        E.EfficientNetExpert(path, precision="half")


def test_forward_batches_are_small_on_a_cpu_unless_asked_and_large_on_a_gpu(tmp_path):
    from models.batching import CPU_FORWARD_BATCH, forward_batch_size

    assert forward_batch_size("cpu", None, 32) == CPU_FORWARD_BATCH == 4 and forward_batch_size("cuda:0", None, 32) == 32
    assert forward_batch_size("cpu", 16, 32) == 16
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        forward_batch_size("cpu", 0, 32)
    _, path = _tiny_expert(tmp_path)
    assert E.EfficientNetExpert(path).batch_size == 4 and E.EfficientNetExpert(path, device="cuda", batch_size=8).batch_size == 8


def test_non_expert_file_is_refused(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an EfficientNet-Lite0 expert"):
        E.expert_info(tmp_path / "other.safetensors")


# ---------------------------------------------------------------------------------------------- real weights


@pytest.mark.weights
def test_base_weights_convert_to_safetensors_and_load_strictly():
    from safetensors.torch import load_file

    path = E.base_weights(progress=False)
    assert path.suffix == ".safetensors"
    model = E.create_backbone(pretrained=True)
    sd = load_file(str(path))
    assert len(sd) == len(model.state_dict()) == 296
    assert sum(v.numel() for k, v in sd.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))) == 4_652_008


def _reference_module(tmp_path):
    """``efficientnet_lite_pytorch`` (the implementation the weights were exported for), from its wheel on
    the side: downloaded with ``pip download --no-deps`` and imported from a temporary folder."""
    d = tmp_path / "ref"
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "efficientnet-lite-pytorch==0.1.0", "-d", str(d), "--progress-bar", "off"],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"cannot download the reference implementation: {proc.stderr[-300:]}")
    (wheel,) = d.glob("*.whl")
    zipfile.ZipFile(wheel).extractall(d / "site")
    sys.path.insert(0, str(d / "site"))
    try:
        import efficientnet_lite_pytorch
    finally:
        sys.path.remove(str(d / "site"))
    return efficientnet_lite_pytorch


def _images(n=6):
    """A few real images when ../shared/data exists (dermoscopy, clinical, histology), else fixed noise."""
    from PIL import Image

    from models.paths import data_dir

    root = data_dir()
    files = sorted((root / "ham10000" / "images").glob("*.jpg"))[:2] + sorted((root / "dermnet" / "images").glob("*/*.jpg"))[:2]
    files += sorted((root / "histology" / "images").glob("*/*.png"))[:2]
    if files:
        return [Image.open(f).convert("RGB") for f in files[:n]]
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.weights
@pytest.mark.slow
def test_parity_with_reference_implementation(tmp_path):
    """Same ImageNet top-1 and the same pooled 1280-d features as the reference network with the wheel's weights."""
    import torch

    ref_pkg = _reference_module(tmp_path)
    ref = ref_pkg.EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(E.load_reference_pth(E.resolve_base_pth()))  # never the reference's own torch.load
    ref.eval()
    ours = E.create_backbone(pretrained=True).eval()
    x = E.to_tensor(_images(), 224)
    with torch.inference_mode():
        logits_ref = ref(x)
        feats_ref = ref._avg_pooling(ref.extract_features(x)).flatten(1)
        logits = ours(x)
        feats = ours.forward_head(ours.forward_features(x), pre_logits=True)
    assert feats.shape == (len(x), E.FEATURE_DIM)
    assert torch.equal(logits.argmax(1), logits_ref.argmax(1))
    torch.testing.assert_close(feats, feats_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, logits_ref, atol=1e-4, rtol=1e-4)


def test_shipped_expert_artifact():
    """The committed expert resolves by registry id, is small fp16 and has every head."""
    from models.efficientnet import EfficientNetExpert
    from models.resolve import resolve

    path = resolve("efficientnet-lite0-derm", progress=False)
    assert path.stat().st_size < 10e6
    info = E.expert_info(path)
    assert info["base"] == E.BASE_ID and info["image_size"] == 224
    assert len(info["heads"]["dermnet"]) == 56 and info["heads"]["modality"] == ["clinical", "dermoscopy", "histopathology", "not_skin"]
    assert len([h for h in info["heads"] if h.startswith("crit_")]) == 7
    expert = EfficientNetExpert()
    assert expert.labels == ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
