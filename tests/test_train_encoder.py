"""``dermgraph train encoder``: configs, deterministic sampling and augmentation, frozen stages, the smoke
run on real images (artifact, metrics, curves, registry fragment) and resuming from its checkpoint."""

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from training import encoder
from training.cli import run_training, trainer_module
from training.config import load_train_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "train"


@pytest.mark.parametrize("name", ["encoder_smoke", "encoder_cpu", "encoder_gpu", "encoder_cpu_continue", "encoder_cpu_clinical"])
def test_shipped_configs_validate(name):
    cfg = load_train_config(trainer_module("encoder").Config, CONFIGS / f"{name}.yaml")
    assert cfg.train_from in encoder.STAGES
    with pytest.raises(ValidationError):
        load_train_config(encoder.Config, CONFIGS / f"{name}.yaml", ["mix.no_such_option=1"])


def test_selection_score_averages_the_chosen_figures():
    m = {"val_isic2018/balanced_accuracy": 0.7, "val_derm7pt/balanced_accuracy": 0.6, "val_dermnet/top1": 0.3, "val_dermnet/top5": 0.6,
         "val_derm7pt/criteria_f1/mean": 0.5, "modality_acc": 0.9}  # fmt: skip
    assert encoder.selection_score(m) == pytest.approx(0.6)  # one figure per task, top-5 not among them
    assert encoder.selection_score(m, ["val_dermnet/top1", "val_dermnet/top5"]) == pytest.approx(0.45)
    assert encoder.selection_score({"modality_acc": 0.9}, ["val_dermnet/top1", "modality_acc"]) == pytest.approx(0.9)  # absent figures skipped
    assert encoder.selection_score({}) == 0.0
    with pytest.raises(ValidationError, match="val_dermnet/top1"):
        encoder.Config(select_on=["val_dermnet/top3"])  # the valid names are listed


def _pools(n_ham=(50, 5), n_dn=6):
    lab = encoder._empty_labels
    ham = [{"labels": {**lab(), "ham": c, "modality": 1}} for c, n in enumerate(n_ham) for _ in range(n)]
    dn = [{"labels": {**lab(), "dermnet": i % 3, "modality": 0}} for i in range(n_dn)]
    return {"train_ham": ham, "train_derm7pt": [], "train_dermnet": dn, "train_histology": [], "train_not_skin": []}


def test_epoch_plan_is_deterministic_and_rebalances():
    cfg = encoder.Config(mix={"ham": 4000, "derm7pt_repeats": 1, "dermnet_repeats": 2, "closeups": 10, "histology": 0, "not_skin": 0})
    pools = _pools()
    a, b = encoder._epoch_plan(pools, cfg, 0), encoder._epoch_plan(pools, cfg, 0)
    assert a == b and a != encoder._epoch_plan(pools, cfg, 1)
    ham = [pools["train_ham"][i]["labels"]["ham"] for name, i, _ in a if name == "train_ham"]
    # sampling weight n^-0.5: the 10x rarer class is drawn sqrt(10)x less often, not 10x
    ratio = ham.count(0) / ham.count(1)
    assert 2.5 < ratio < 4.0
    assert sum(1 for name, _, close in a if name == "train_dermnet" and close) == 10
    assert sum(1 for name, _, close in a if name == "train_dermnet" and not close) == 12


def test_loss_class_weights_complete_the_balancing():
    w = encoder._class_weights(np.array([0] * 100 + [1] * 25 + [-1] * 7), 3, 0.5)
    assert w[2] == 0 and w[1] / w[0] == pytest.approx(2.0)


def test_augmentation_is_seeded_and_closeups_lose_the_disease_label():
    import torch

    cfg = encoder.Config(image_size=48)
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    pools = {"train_dermnet": [{"kind": "clinical", "labels": {**encoder._empty_labels(), "dermnet": 2, "modality": 0}}]}
    images = {"train_dermnet": img[None]}
    x1, y1 = encoder._batch([("train_dermnet", 0, False), ("train_dermnet", 0, True)], pools, images, cfg, 7)
    x2, _ = encoder._batch([("train_dermnet", 0, False), ("train_dermnet", 0, True)], pools, images, cfg, 7)
    x3, _ = encoder._batch([("train_dermnet", 0, False), ("train_dermnet", 0, True)], pools, images, cfg, 8)
    assert x1.shape == (2, 3, 48, 48)
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert y1["dermnet"].tolist() == [2, -1] and y1["modality"].tolist() == [0, 0]


def test_frozen_stages():
    timm = pytest.importorskip("timm")
    bb = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    frozen = encoder.frozen_modules(bb, "3")
    assert frozen[:2] == [bb.conv_stem, bb.bn1] and frozen[2:] == [bb.blocks[0], bb.blocks[1], bb.blocks[2]]
    assert encoder.frozen_modules(bb, "stem") == []
    with pytest.raises(ValueError, match="valid"):
        encoder.frozen_modules(bb, "block9")


def test_speed_options_prepare_the_network_and_batches():
    import torch

    pytest.importorskip("timm")
    from models.efficientnet import multitask_net

    net = multitask_net({"ham": ["a", "b"]}, pretrained=False)
    cfg = encoder.Config(channels_last=True, compile_mode="reduce-overhead")
    fwd = encoder.encoder_forward(net, cfg, "cpu")
    assert fwd is not net and fwd._orig_mod is net  # compiled lazily: nothing is compiled until the first call
    assert net.backbone.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    x = encoder.to_input(torch.zeros(2, 3, 8, 8), cfg, "cpu")
    assert x.is_contiguous(memory_format=torch.channels_last)
    plain = encoder.Config()
    assert encoder.encoder_forward(net, plain, "cpu") is net and encoder.to_input(torch.zeros(2, 3, 8, 8), plain, "cpu").is_contiguous()
    with pytest.raises(ValueError):
        encoder.Config(compile_mode="fastest")


@pytest.mark.data
@pytest.mark.weights
@pytest.mark.slow
def test_smoke_run_writes_expert_and_resumes(shared_data, tmp_path):
    import torch
    from safetensors.torch import load_file

    from models.efficientnet import EfficientNetExpert, base_weights, load_expert

    out, cache = tmp_path / "run", tmp_path / "cache"
    over = [f"out_dir={out}", f"cache_dir={cache}"]
    summary = run_training("encoder", CONFIGS / "encoder_smoke.yaml", over)
    for f in ("best.safetensors", "checkpoint.pt", "metrics.jsonl", "learning_curves.png", "MODEL_CARD.md", "registry.yaml", "summary.json"):
        assert (out / f).exists(), f
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["kind"] == "step"]
    assert steps and all(np.isfinite(r["loss"]["total"]) for r in steps)
    assert {"val_isic2018/balanced_accuracy", "val_dermnet/top5", "val_derm7pt/criteria_f1/mean", "modality_acc"} <= set(recs[-1])
    assert summary["best_epoch"] == 1 and summary["size_mb"] < 10

    net, info = load_expert(out / "best.safetensors")
    assert info["image_size"] == 64 and len(info["heads"]["dermnet"]) == 56 and info["heads"]["modality"] == encoder.MODALITIES
    # frozen stages (smoke: everything before stage 5) keep the ImageNet weights
    base = load_file(str(base_weights(progress=False)))
    assert torch.allclose(net.backbone.conv_stem.weight, base["conv_stem.weight"].half().float())
    assert not torch.allclose(net.backbone.blocks[6][0].conv_pwl.weight, base["blocks.6.0.conv_pwl.weight"].half().float())
    from PIL import Image

    img = Image.open(next((shared_data / "isic2018_val" / "images").glob("*.jpg")))
    assert EfficientNetExpert(out / "best.safetensors").predict([img]).probs.shape == (1, 7)

    # the same command with more epochs resumes where the first stopped; speed options may differ on resuming
    n_steps = len(steps)
    summary2 = run_training("encoder", CONFIGS / "encoder_smoke.yaml", [*over, "epochs=2", "channels_last=true", "log_every=2"])
    recs2 = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps2 = [r["step"] for r in recs2 if r["kind"] == "step"]
    logged = [s for s in range(n_steps + 1, 2 * n_steps + 1) if s % 2 == 0 or s == 2 * n_steps]  # and each epoch's last step
    assert steps2 == list(range(1, n_steps + 1)) + logged and summary2["epochs_run"] == 2
    # another configuration in the same folder is refused rather than mixed
    with pytest.raises(ValueError, match="another configuration"):
        run_training("encoder", CONFIGS / "encoder_smoke.yaml", [*over, "epochs=3", "lr=0.1"])


@pytest.mark.data
def test_eval_encoder_reports_every_heldout_figure(shared_data, tmp_path, monkeypatch):
    from models.vocabulary import HAM_CLASSES, SEVEN_POINT
    from models.efficientnet import multitask_net, save_expert
    from training import eval_encoder

    full, syn = encoder.build_tables, encoder._synthetic_records
    monkeypatch.setattr(encoder, "build_tables", lambda cfg, root=None: (lambda s, c: ({k: v[:5] for k, v in s.items()}, c))(*full(cfg, root)))
    monkeypatch.setattr(encoder, "_synthetic_records", lambda n, seed: syn(1, seed))
    _, classes = full(encoder.Config(limit_per_source=1))
    heads = {"ham": list(HAM_CLASSES), "dermnet": classes, "modality": encoder.MODALITIES, **{f"crit_{c}": list(v) for c, v in SEVEN_POINT.items()}}
    path = save_expert(multitask_net(heads, pretrained=False), tmp_path / "e.safetensors", {"image_size": 48})
    res = eval_encoder.evaluate(path, n_bootstrap=20, log=lambda m: None)
    for key in ("val_isic2018/balanced_accuracy", "val_isic2018/mel_sensitivity", "val_derm7pt/accuracy", "val_dermnet/top1", "val_dermnet/top5",
                "closeups/modality_acc", "modality_acc_whole_images", "val_histology/modality_acc", "val_not_skin/modality_acc"):  # fmt: skip
        assert key in res, key
    assert 0 <= res["val_dermnet/top1"] <= res["val_dermnet/top5"] <= 1
    assert set(res["val_derm7pt/criteria_macro_f1"]) == {*SEVEN_POINT, "mean"}
    assert sum(res["val_not_skin/modality_called"].values()) == 8


@pytest.mark.data
def test_write_features_in_load_features_layout(shared_data, tmp_path, monkeypatch):
    from models.vocabulary import HAM_CLASSES
    from models.efficientnet import multitask_net, save_expert
    from training import data, eval_encoder

    rows = data.source_table("isic2018_val")[:3]
    monkeypatch.setattr(data, "source_table", lambda source, root=None: rows)
    path = save_expert(multitask_net({"ham": list(HAM_CLASSES), "modality": encoder.MODALITIES}, pretrained=False), tmp_path / "e.safetensors", {"image_size": 48})
    (out,) = eval_encoder.write_features(path, tmp_path, ["isic2018_val"], log=lambda m: None)
    f = data.load_features("isic2018_val", "effnet", tmp_path)
    assert list(f["ids"]) == [r["image"] for r in rows] and f["features"].shape == (3, 1280) and f["probs"].shape == (3, 7)
    assert np.load(out)["probs_modality"].shape == (3, 4)
    # the view options reach the expert as the agent's options would set them
    from PIL import Image

    from models.efficientnet import EfficientNetExpert
    from models.paths import data_dir
    from training.views import make_view

    opts = eval_encoder.ViewOptions(views=("hflip",), view_heads=("ham",))
    (viewed,) = eval_encoder.write_features(path, tmp_path / "views", ["isic2018_val"], log=lambda m: None, options=opts)
    imgs = [make_view(Image.open(data_dir() / "isic2018_val" / r["image"]).convert("RGB"), "full") for r in rows]
    _, want = EfficientNetExpert(path, views=("hflip",), view_heads=("ham",)).predict_heads(imgs)
    np.testing.assert_allclose(np.load(viewed)["probs_ham"], want["ham"], atol=1e-6)
    assert not np.allclose(np.load(viewed)["probs_ham"], np.load(out)["probs_ham"])
    assert opts.record() == {"views": ["hflip"], "view_heads": ["ham"], "views_if": None, "view_size": None, "members": [], "members_if": None}


@pytest.mark.data
@pytest.mark.weights
@pytest.mark.slow
def test_crossfit_trainer_predicts_every_training_image_with_the_model_that_left_it_out(shared_data, tmp_path):
    """dermgraph train encoder-crossfit: one model per fold from ImageNet; the bundle holds each training image once,
    with the fold whose model never saw it, and reads back as fusion_data / reasoner_data read it."""
    from training.encoder import CROSSFIT_TABLES, crossfit_outputs, fold_of

    out = tmp_path / "cf"
    summary = run_training("encoder-crossfit", CONFIGS / "encoder_smoke.yaml", [f"out_dir={out}", f"cache_dir={tmp_path / 'cache'}", "folds=2", "init=efficientnet-lite0-derm",
                                                                               "crossfit_views=[hflip,rot90]", "crossfit_features=[derm7pt]"])
    cfg = load_train_config(trainer_module("encoder-crossfit").Config, CONFIGS / "encoder_smoke.yaml", ["folds=2"])
    sets, _ = encoder.build_tables(cfg)
    for table, source in CROSSFIT_TABLES.items():
        got = crossfit_outputs(summary["bundle"], source)
        recs = {r["image"]: r for r in sets[table]}
        assert sorted(map(str, got["ids"])) == sorted(recs) and got["probs_ham"].shape == (len(recs), 7)
        assert all(fold_of(recs[str(i)], 2) == f for i, f in zip(got["ids"], got["fold"]))
        # crossfit_views: each head's mean over the image and its views, beside the single-view outputs
        assert got["probs_dermnet__views"].shape == got["probs_dermnet"].shape and not np.allclose(got["probs_ham__views"], got["probs_ham"])
        np.testing.assert_allclose(got["probs_ham__views"].sum(1), 1, atol=1e-4)
        # crossfit_features: the fold model's pooled features, for the named sources only
        assert ("features" in got) == (source == "derm7pt")
        if source == "derm7pt":
            assert got["features"].shape == (len(recs), 1280) and got["features"].dtype == np.float16 and np.isfinite(got["features"]).all()
    for k in (0, 1):  # every fold started from ImageNet, whatever init says
        assert json.loads((out / f"fold{k}" / "config.yaml").read_text())["init"] is None
    assert json.loads((out / "crossfit.json").read_text())["fold_models"]["fold1"]["held_out"] == summary["held_out"]["fold1"]


@pytest.mark.data
def test_dermnet_selection_on_the_fusion_fit_half_leaves_the_evaluation_half_unseen(shared_data):
    from training.data import is_dermnet_fit_half, is_dermnet_heldout, source_table

    sha = {r["image"]: r["sha1"] for r in source_table("dermnet")}
    full, _ = encoder.build_tables(encoder.Config())
    even, _ = encoder.build_tables(encoder.Config(dermnet_selection="heldout_even"))
    held = {r["image"] for r in full["val_dermnet"]}
    fit = {r["image"] for r in even["val_dermnet"]}
    assert fit and fit < held and all(is_dermnet_fit_half(sha[i]) for i in fit)
    assert held - fit == {i for i in held if not is_dermnet_fit_half(sha[i])}  # the odd half: the fusion's evaluation photos
    assert {r["image"] for r in even["val_dermnet_crop50"]} == fit
    assert [r["image"] for r in even["train_dermnet"]] == [r["image"] for r in full["train_dermnet"]]  # training photos unchanged
    assert all(is_dermnet_heldout(sha[i]) for i in held)


def test_resume_keeps_the_lr_schedule_and_extends_only_finished_runs(tmp_path, capsys):
    spe, ck = 10, tmp_path / "checkpoint.pt"
    planned = [[0, 20]]  # a run of 2 epochs
    # unfinished: another epochs would bend the cosine mid-run
    with pytest.raises(ValueError, match="another configuration.*epochs=2"):
        encoder.resume_schedule({"epoch": 1, "global_step": 10, "schedule": planned}, 3, spe, ck)
    assert encoder.resume_schedule({"epoch": 1, "global_step": 10, "schedule": planned}, 2, spe, ck) == planned
    # finished: the finished steps keep their factors, the added epoch gets its own cosine (noticed)
    ext = encoder.resume_schedule({"epoch": 2, "global_step": 20, "schedule": planned}, 3, spe, ck)
    assert ext == [[0, 20], [20, 30]] and "extending a finished run of 2 epochs to 3" in capsys.readouterr().out
    assert [encoder.lr_factor(s, ext, 2) for s in range(20)] == [encoder.lr_factor(s, planned, 2) for s in range(20)]
    assert encoder.lr_factor(20, ext, 2) == 1.0 and encoder.lr_factor(29, ext, 2) < 0.05
    assert encoder.lr_factor(0, planned, 2) == 0.5 and encoder.lr_factor(19, planned, 2) < 0.01


def test_rows_through_counts_rows_up_to_a_step(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in [{"kind": "start"}, {"step": 1}, {"step": 2}, {"step": 3}]))
    assert encoder.rows_through(p, 2) == 3 and encoder.rows_through(tmp_path / "none.jsonl", 2) == 0
