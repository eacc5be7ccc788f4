"""Linear probe: C selection by cross-validated ROC-AUC, the AUC itself, and the protocol with an
encoder double, a seeding feature file and the prediction cache."""

import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from agent.testing import ColourEmbedder
from evals.base import EvalCase
from evals.metrics import macro_roc_auc
from evals.probe import linear_probe
from evals.protocols import linear_probe as probe_protocol
from evals.testing import DictStore, make_ctx
from models.backends import BACKENDS


def test_macro_roc_auc_by_hand_and_against_sklearn():
    # Binary: positives score 0.35 and 0.8, negatives 0.1 and 0.4 → 3 of 4 pairs ordered right.
    y = ["n", "n", "p", "p"]
    proba = np.array([[0.9, 0.1], [0.6, 0.4], [0.65, 0.35], [0.2, 0.8]])
    assert macro_roc_auc(y, proba, ["n", "p"]) == pytest.approx(0.75)
    rng = np.random.default_rng(0)
    y = rng.choice(["a", "b", "c"], 200)
    proba = rng.dirichlet([1, 1, 1], 200)
    assert macro_roc_auc(y, proba, ["a", "b", "c"]) == pytest.approx(roc_auc_score(y, proba, multi_class="ovr", average="macro"))
    # A class absent from y is skipped, not counted as 0.5 or NaN.
    assert macro_roc_auc(["a", "b"], [[0.9, 0.1, 0.0], [0.2, 0.8, 0.0]], ["a", "b", "c"]) == 1.0


def _noisy(rng, n, d=150, shift=0.06):
    """Isotropic classes whose means differ a little in every one of ``d`` dimensions, with about as
    many training cases as dimensions: the mean-difference direction that strong shrinkage gives is
    right, a weakly regularised fit chases noise."""
    y = np.arange(n) % 2
    rng.shuffle(y)
    X = rng.normal(size=(n, d)) + shift * (2 * y - 1)[:, None]
    return X, np.array(["neg", "pos"])[y]


def _correlated(rng, n=300):
    """x0 = z + 0.1*label, x1 = z, z with a large variance: the label is x0 - x1, which only a weakly
    regularised fit finds (a heavily shrunk one follows the mean difference, i.e. x0 alone)."""
    y = rng.integers(0, 2, n)
    z = rng.normal(scale=3.0, size=n)
    X = np.stack([z + 0.3 * y + rng.normal(scale=0.02, size=n), z + rng.normal(scale=0.02, size=n)], axis=1)
    return X, np.array(["neg", "pos"])[y]


def test_probe_prefers_strong_regularisation_on_noise():
    rng = np.random.default_rng(0)
    X, y = _noisy(rng, 500)
    res = linear_probe(X[:200], y[:200], X[200:], y[200:], folds=5, seed=0)
    aucs = {r["C"]: r["auc_mean"] for r in res["cv"]}
    assert res["best_C"] == max(aucs, key=lambda c: (aucs[c], -c))
    assert res["best_C"] <= 1e-2
    assert aucs[res["best_C"]] > aucs[10.0] + 0.05
    assert res["test"]["macro_auc"] > 0.7


def test_probe_prefers_weak_regularisation_when_features_interact():
    rng = np.random.default_rng(1)
    X, y = _correlated(rng, 600)
    res = linear_probe(X[:300], y[:300], X[300:], y[300:])
    assert res["best_C"] >= 1.0
    assert res["test"]["macro_auc"] > 0.95
    # The returned test metrics are those of the returned predictions.
    assert res["test"]["accuracy"] == pytest.approx(float((res["y_pred"] == y[300:]).mean()))
    assert res["proba"].shape == (300, 2) and res["labels"] == ["neg", "pos"]


def test_probe_handles_rare_and_unseen_classes():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(40, 5))
    y = np.array(["a"] * 20 + ["b"] * 17 + ["c"] * 3)
    X[y == "b"] += 2
    res = linear_probe(X, y, X[:10], np.array(["a"] * 5 + ["d"] * 5), Cs=[0.1, 1.0])
    assert res["folds"] == 3  # the rarest class has 3 members
    assert set(res["y_pred"]) <= {"a", "b", "c"}
    with pytest.raises(ValueError, match="at least 2"):
        linear_probe(X, ["a"] * 40, X, ["a"] * 40)


# --------------------------------------------------------------------------- protocol


def _cases(root, n_per=8):
    """Images under ``root/src/`` whose colour encodes the class (red = mel, blue = nv), noisy."""
    rng = np.random.default_rng(0)
    cases = []
    (root / "src").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        for label, base in (("mel", (170, 60, 60)), ("nv", (60, 60, 170))):
            for k in range(n_per):
                arr = np.clip(np.array(base) + rng.normal(0, 40, (8, 8, 3)), 0, 255).astype(np.uint8)
                path = root / "src" / f"{split}_{label}_{k}.png"
                Image.fromarray(arr).save(path)
                cases.append(EvalCase(id=path.name, image=path, label=label, extra={"split": split}))
    return cases


@pytest.fixture
def colour_encoder(monkeypatch, tmp_path):
    """The colour double stands in for sklesion (so a feature file may seed it) with data under tmp_path."""
    monkeypatch.setitem(BACKENDS["image_embedder"], "sklesion", "agent.testing:ColourEmbedder")
    monkeypatch.setenv("DERMGRAPH_DATA", str(tmp_path))
    ColourEmbedder.calls.clear()


def test_protocol_probes_and_caches_features(tmp_path, colour_encoder):
    cases = _cases(tmp_path)
    store = DictStore()
    opts = {"Cs": [0.01, 1.0], "folds": 3, "n_bootstrap": 100, "batch_size": 5}
    res = probe_protocol.run(make_ctx("linear_probe", cases, tmp_path / "out", opts, store, labels=["mel", "nv"]))
    m = res.metrics
    assert m["n_train"] == 16 and m["n_test"] == 16
    assert sum(ColourEmbedder.calls) == 32 and max(ColourEmbedder.calls) == 5
    assert m["accuracy"]["value"] >= 0.9 and m["macro_auc"]["value"] >= 0.95
    assert set(m["cv_auc"]) == {"0.01", "1.0"} and m["best_C"] in (0.01, 1.0)
    lo, hi = m["macro_auc"]["ci95"]
    assert lo <= m["macro_auc"]["value"] <= hi
    assert m["encoder_trained_on_probe_data"] is False
    lines = (tmp_path / "out" / "linear_probe_predictions.jsonl").read_text().splitlines()
    assert len(lines) == 16 and set(json.loads(lines[0])["proba"]) == {"mel", "nv"}
    assert res.plots["CV ROC-AUC per C"].is_file()

    # Same encoder: every feature comes from the cache; a different probe setting does not re-encode.
    ColourEmbedder.calls.clear()
    again = probe_protocol.run(make_ctx("linear_probe", cases, tmp_path / "out2", {**opts, "Cs": [1.0]}, store, labels=["mel", "nv"]))
    assert ColourEmbedder.calls == []
    assert again.metrics["best_C"] == 1.0


def test_protocol_seeds_from_feature_file_and_flags_seen_data(tmp_path, colour_encoder):
    cases = _cases(tmp_path)
    train = [c for c in cases if c.extra["split"] == "train"]
    # The file holds 12 of the 16 training images (ids relative to the data folder), unnormalised.
    held = train[:12]
    feats = ColourEmbedder().embed_images([Image.open(c.image) for c in held]) * 7.0
    ColourEmbedder.calls.clear()
    npz = tmp_path / "feats.npz"
    np.savez(npz, ids=np.array([f"src/{c.image.name}" for c in held]), features=feats.astype(np.float16))
    store = DictStore()
    opts = {"Cs": [1.0], "folds": 3, "n_bootstrap": 0, "feature_cache": str(npz), "train_only_cached": True}
    res = probe_protocol.run(make_ctx("linear_probe", cases, tmp_path / "out", opts, store, labels=["mel", "nv"],
                                      seen_by_default_classifier=True))  # fmt: skip
    # Only the 16 test images were encoded; training used the 12 cached ones.
    assert sum(ColourEmbedder.calls) == 16
    assert res.metrics["n_train"] == 12
    assert res.metrics["encoder_trained_on_probe_data"] is True
    assert any("optimistic" in n for n in res.notes)
    # Seeded vectors are L2-normalised like the encoder's own output.
    seeded = [r for r in store.data.values() if r["source"] == str(npz)]
    assert len(seeded) == 12
    v = np.frombuffer(__import__("base64").b64decode(seeded[0]["f16"]), np.float16).astype(float)
    assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-2)


def test_protocol_rejects_bad_options(tmp_path, colour_encoder):
    cases = _cases(tmp_path, n_per=3)
    with pytest.raises(ValueError, match="Cz"):
        probe_protocol.run(make_ctx("linear_probe", cases, tmp_path, {"Cz": [1.0]}))
    with pytest.raises(ValueError, match="another encoder"):
        opts = {"feature_cache": "x.npz", "encoder": {"backend": "open_clip", "options": {"model_name": "ViT-B-32"}}}
        probe_protocol.run(make_ctx("linear_probe", cases, tmp_path, opts))
    with pytest.raises(ValueError, match="extra_columns"):
        probe_protocol.run(make_ctx("linear_probe", cases, tmp_path, {"train_filter": {"fold": ["1"]}}))
    with pytest.raises(ValueError, match="both train_filter and test_filter"):
        probe_protocol.run(make_ctx("linear_probe", cases, tmp_path, {"test_filter": {"split": ["train", "val"]}}))


def test_rescore_never_loads_the_encoder(tmp_path, colour_encoder):
    cases = _cases(tmp_path, n_per=4)
    store = DictStore()
    opts = {"Cs": [1.0], "folds": 2, "n_bootstrap": 0}
    probe_protocol.run(make_ctx("linear_probe", cases, tmp_path / "a", opts, store))
    ColourEmbedder.calls.clear()
    ctx = make_ctx("linear_probe", cases, tmp_path / "b", opts, store)
    ctx.rescore = True
    probe_protocol.run(ctx)
    assert ColourEmbedder.calls == []
    from evals.predictions import MissingPredictions

    ctx = make_ctx("linear_probe", cases, tmp_path / "c", opts, DictStore())
    ctx.rescore = True
    with pytest.raises(MissingPredictions):
        probe_protocol.run(ctx)


@pytest.mark.parametrize("name", ["ham10000_probe", "derm7pt_probe"])
def test_shipped_benchmark_options_validate(name):
    from evals.benchmark import load_benchmark

    bench = load_benchmark(name)
    opts = probe_protocol.Options.model_validate(bench.options)
    assert bench.task == "linear_probe" and "split" in bench.dataset.extra_columns
    assert set(opts.train_filter) == set(opts.test_filter) == {"split"}
    assert min(opts.Cs) == 1e-5 and max(opts.Cs) == 10.0


def test_limit_keeps_both_splits():
    # --limit 4 on a file whose first rows are all training cases used to leave "4 training and 0 test cases".
    from pathlib import Path

    cases = [EvalCase(id=f"{s}{i}", image=Path(f"{s}{i}.png"), label="mel", extra={"split": s}) for s in ("train", "val") for i in range(6)]
    kept = probe_protocol.limit_cases(cases, 4, {})
    assert len(kept) == 4 and {c.extra["split"] for c in kept} == {"train", "val"}
    assert [c.id for c in kept] == ["train0", "train1", "val0", "val1"]  # the first of each split, in file order
    assert len(probe_protocol.limit_cases(cases, 50, {})) == 12
    with pytest.raises(ValueError, match="--limit >= 2"):
        probe_protocol.limit_cases(cases, 1, {})
