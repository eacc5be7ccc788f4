"""Whole-batch augmentation on the training device (training.batch_augment) and the encoder recipe using it."""

import json
from pathlib import Path

import numpy as np
import pytest

from training import batch_augment as ba

torch = pytest.importorskip("torch")
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "train"


def _images(n=3, side=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def _identity(b):
    theta = np.tile(np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32), (b, 1, 1))
    one = np.ones(b, np.float32)
    return ba.ViewParams(theta=theta, brightness=one, contrast=one, saturation=one, sigma=np.zeros(b, np.float32))


def test_identity_view_returns_the_image():
    imgs = _images()
    src = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
    out = ba.apply([src], [(0, 2), (0, 0)], _identity(2), 32)
    ref = torch.from_numpy(imgs[[2, 0]]).permute(0, 3, 1, 2).float() / 255
    assert out.shape == (2, 3, 32, 32) and torch.allclose(out, ref, atol=1e-5)


def test_views_are_seeded_and_stay_in_range():
    di = ba.DeviceImages({"a": _images(4, 32), "b": _images(2, 48, seed=1)}, "cpu")
    items = [("a", 0, False), ("b", 1, False), ("b", 0, True), ("a", 3, False)]
    kinds = ["dermoscopy", "clinical", "clinical", "dermoscopy"]
    x1 = di.batch(items, kinds, seed=7, size=24, closeup_scale=(0.06, 0.3))
    x2 = di.batch(items, kinds, seed=7, size=24, closeup_scale=(0.06, 0.3))
    x3 = di.batch(items, kinds, seed=8, size=24, closeup_scale=(0.06, 0.3))
    assert x1.shape == (4, 3, 24, 24) and torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert float(x1.min()) >= 0 and float(x1.max()) <= 1


def test_whole_clinical_photos_keep_their_up_and_closeups_are_small():
    rng = np.random.default_rng(0)
    n = 400
    p = ba.draw_params(["clinical"] * n, [False] * n, rng, (0.06, 0.3))
    lin = p.theta[:, :, :2]
    # no rotation, no vertical flip: the y row keeps a positive y scale and no x term
    assert np.all(lin[:, 1, 1] > 0) and np.allclose(lin[:, 1, 0], 0) and np.allclose(lin[:, 0, 1], 0)
    assert (lin[:, 0, 0] < 0).any() and (lin[:, 0, 0] > 0).any()  # horizontal flips happen
    q = ba.draw_params(["clinical"] * n, [True] * n, rng, (0.06, 0.3))
    area = np.abs(np.linalg.det(q.theta[:, :, :2]))
    assert area.max() <= 0.3 + 1e-6 and (np.abs(q.theta[:, 0, 1]) > 0).any()  # close-ups rotate
    d = ba.draw_params(["dermoscopy"] * n, [False] * n, rng, (0.06, 0.3))
    assert np.abs(np.linalg.det(d.theta[:, :, :2])).min() >= ba.LESION_SCALE[0] - 1e-6
    # crops stay inside the image: |centre| + half-extent <= 1 on each axis
    assert np.all(np.abs(d.theta[:, :, 2]) + np.abs(d.theta[:, :, :2]).sum(2) <= 1 + 1e-5)
    assert 0.15 < (d.sigma > 0).mean() < 0.35


def test_blur_is_per_image():
    x = torch.rand(2, 3, 16, 16)
    y = ba._blur(x, torch.tensor([0.0, 1.5]))
    assert torch.allclose(y[0], x[0], atol=1e-6) and y[1].std() < x[1].std()


@pytest.mark.data
@pytest.mark.weights
@pytest.mark.slow
def test_smoke_run_on_device_batches_with_ema_ships_the_average_and_resumes(shared_data, tmp_path):
    from safetensors import safe_open

    from training.cli import run_training

    out = tmp_path / "run"
    over = [f"out_dir={out}", f"cache_dir={tmp_path / 'cache'}", "device_augment=true", "ema_decay=0.5", "artifact=null"]
    run_training("encoder", CONFIGS / "encoder_smoke.yaml", over)
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert "ema" in ck
    with safe_open(str(out / "best.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["dermgraph"])["ema_decay"] == 0.5
        w = f.get_tensor("backbone.conv_head.weight").float()
    # the shipped weights are the average's, not the last step's
    assert torch.allclose(w, ck["ema"]["module.backbone.conv_head.weight"].half().float())
    assert not torch.allclose(w, ck["model"]["backbone.conv_head.weight"].half().float())
    summary = run_training("encoder", CONFIGS / "encoder_smoke.yaml", [*over, "epochs=2"])
    assert summary["epochs_run"] == 2
