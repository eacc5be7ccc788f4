"""Linear probe on any image encoder (SkinVL protocol): frozen features → logistic regression.

Features of every case come from an ``ImageEmbedder`` (``models.protocols``) built from the
``image_embedder`` registry in ``models.backends``, cached per image (sha256 of its bytes) and
encoder; :func:`evals.probe.linear_probe` picks C by cross-validated macro ROC-AUC on the
training cases, refits and scores the test cases once.

Options (``options:`` in the benchmark YAML, or ``--opt``):

- ``encoder``: ``{backend, model, options}`` (default ``{backend: sklesion}``: the L2-normalised
  pooled Xception features of ``models.sklesion.SklesionImageEmbedder``; ``open_clip`` takes
  ``options: {model_name, pretrained, model_config}``).
- ``train_filter`` / ``test_filter``: column → allowed values, applied to each case's extra
  columns, groups or metadata (default ``{split: [train]}`` / ``{split: [val]}``; the column must
  be in the benchmark's ``dataset.extra_columns``).
- ``feature_cache``: a ``scripts/extract_features.py`` file (``.cache/features/<source>__full.npz``;
  a relative path is taken from the working directory) whose features seed the cache, so images it
  holds are not encoded again; a missing file is noted and ignored. Default sklesion encoder only.
- ``train_only_cached`` (false): train on only the training cases found in ``feature_cache`` (the
  HAM10000 file holds every non-nevus train image plus 1,200 nevi, not all 5,087).
- ``Cs`` (1e-5 … 1e1, one per decade), ``folds`` (5), ``seed`` (0), ``max_iter`` (2000),
  ``class_weight`` (null or ``balanced``), ``batch_size`` (16 images per encoder call),
  ``n_bootstrap`` (1000 resamples for the test CIs; 0 = none).
- ``allow_partial`` (false): with ``--rescore`` (no encoder is loaded), use only the cases whose
  features are cached.

``--limit N`` keeps both splits: N cases split between training and test cases in proportion to their
numbers, at least one of each, the first ones of each in file order (:func:`limit_cases`).

When the benchmark says ``seen_by_default_classifier`` and the encoder is sklesion, the report
says the encoder was trained on these images, so the figures are optimistic.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from evals.base import EvalCase, Predictions, ProtocolContext, ProtocolResult
from evals.metrics import with_ci
from evals.probe import DEFAULT_CS, linear_probe
from evals.fill import cached_map
from evals.protocols.common import BackendSpec, config_hash, open_rgb
from models.resolve import sha256_file


class Options(BaseModel):
    """Linear-probe protocol options (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    encoder: BackendSpec = Field(default_factory=lambda: BackendSpec(backend="sklesion"))
    train_filter: dict[str, list[str]] = Field(default_factory=lambda: {"split": ["train"]})
    test_filter: dict[str, list[str]] = Field(default_factory=lambda: {"split": ["val"]})
    feature_cache: str | None = Field(None, description="extract_features.py .npz seeding the feature cache (sklesion only).")
    train_only_cached: bool = Field(False, description="Train on only the training cases in feature_cache.")
    Cs: list[float] = Field(default_factory=lambda: list(DEFAULT_CS), min_length=1)
    folds: int = Field(5, ge=2)
    seed: int = 0
    max_iter: int = Field(2000, ge=1)
    class_weight: str | None = Field(None, pattern="^balanced$")
    batch_size: int = Field(16, ge=1)
    n_bootstrap: int = Field(1000, ge=0)
    allow_partial: bool = Field(False, description="With --rescore: probe only the cases with cached features.")


def _field(case: EvalCase, column: str) -> Any:
    for where in (case.extra, case.groups, case.metadata):
        if column in where:
            return where[column]
    raise ValueError(f"case {case.id} has no column {column!r}; list it in the benchmark's dataset.extra_columns")


def _keep(case: EvalCase, flt: dict[str, list[str]]) -> bool:
    return all(str(_field(case, col)) in {str(v) for v in allowed} for col, allowed in flt.items())


def limit_cases(cases: list[EvalCase], limit: int, options: dict[str, Any]) -> list[EvalCase]:
    """At most ``limit`` cases with both splits in them (the first N rows could all be training cases):
    each split gets its share of ``limit`` by size, at least one, the first ones in file order."""
    opts = Options.model_validate(options)
    labelled = [c for c in cases if c.label is not None and c.image is not None]
    train = [c for c in labelled if _keep(c, opts.train_filter)]
    test = [c for c in labelled if _keep(c, opts.test_filter)]
    if limit < 2:
        raise ValueError(f"--limit {limit} cannot keep both training and test cases; the linear probe needs --limit >= 2")
    if not train or not test:
        return cases[:limit]  # load() then reports the empty split
    n_test = min(len(test), max(1, round(limit * len(test) / (len(train) + len(test)))), limit - 1)
    n_train = min(len(train), limit - n_test)
    keep = {c.id for c in train[:n_train]} | {c.id for c in test[:n_test]}
    return [c for c in cases if c.id in keep]


def _pack(v: np.ndarray) -> dict[str, Any]:
    # float16 bytes in base64: ~4 kB per 2048-d image instead of ~40 kB as a JSON list.
    return {"f16": base64.b64encode(np.asarray(v, np.float16).tobytes()).decode("ascii"), "dim": int(v.shape[-1])}


def _unpack(rec: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(rec["f16"]), dtype=np.float16).astype(np.float32)


def _l2(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def _npz_features(path: Path) -> dict[str, np.ndarray]:
    """id (relative to the data folder) → L2-normalised features, as ``SklesionImageEmbedder`` gives them."""
    with np.load(path, allow_pickle=False) as z:
        ids, feats = z["ids"].astype(str), z["features"].astype(np.float32)
    return dict(zip(ids, _l2(feats)))


def _rel_id(image: Path, root: Path) -> str | None:
    try:
        return Path(image).resolve().relative_to(root).as_posix()
    except ValueError:
        return None


def run(ctx: ProtocolContext) -> ProtocolResult:
    """Encode (or read cached features of) the train and test cases, probe, report."""
    return score_predictions(ctx, predict(ctx))


@dataclass
class Loaded:
    """The options, the train and test cases, and the local feature file's vectors (``seeded``: relative image id ->
    vector) when one is given and found."""

    opts: Options
    train: list[EvalCase]
    test: list[EvalCase]
    seeded: dict[str, np.ndarray]
    feature_file: Path | None
    root: Path
    notes: list[str]


def load(ctx: ProtocolContext, log: bool = True) -> Loaded:
    from models.paths import data_dir

    opts = Options.model_validate(ctx.options)
    if opts.feature_cache and (opts.encoder.backend != "sklesion" or opts.encoder.model or set(opts.encoder.options) - {"device", "batch_size"}):
        raise ValueError("feature_cache holds the default sklesion features; it cannot seed another encoder's cache")
    if opts.train_only_cached and not opts.feature_cache:
        raise ValueError("train_only_cached needs feature_cache")
    labelled = [c for c in ctx.cases if c.label is not None and c.image is not None]
    train = [c for c in labelled if _keep(c, opts.train_filter)]
    test = [c for c in labelled if _keep(c, opts.test_filter)]
    overlap = {c.id for c in train} & {c.id for c in test}
    if overlap:
        raise ValueError(f"{len(overlap)} cases pass both train_filter and test_filter (e.g. {sorted(overlap)[:3]})")

    seeded: dict[str, np.ndarray] = {}
    root = data_dir().resolve()
    notes: list[str] = []
    say = ctx.log if log else (lambda m: None)
    feature_file = Path(opts.feature_cache).expanduser() if opts.feature_cache else None
    if feature_file is not None and not feature_file.is_file():
        # The file is a local speed-up (git-ignored, absent in CI): without it every image is encoded.
        notes.append(f"feature_cache {feature_file} not found: every image was encoded; train_only_cached ignored.")
        say(f"linear_probe: {notes[-1]}")
        feature_file = None
    if feature_file is not None:
        seeded = _npz_features(feature_file)
        if opts.train_only_cached:
            n_before = len(train)
            train = [c for c in train if _rel_id(c.image, root) in seeded]
            say(f"linear_probe: training on the {len(train)} of {n_before} training cases in {opts.feature_cache}")
    if not train or not test:
        raise ValueError(f"{ctx.bench.name}: {len(train)} training and {len(test)} test cases after the filters")
    return Loaded(opts, train, test, seeded, feature_file, root, notes)


def predict(ctx: ProtocolContext) -> Predictions:
    """One feature record per train then test case (cached per image and encoder; the local feature file seeds the
    cache first), None where ``allow_partial`` left a case without one."""
    from evals.cache import case_key

    ld = load(ctx)
    opts, train, test, seeded, root = ld.opts, ld.train, ld.test, ld.seeded, ld.root
    # The features depend on the encoder spec alone (the spec names the weights), not on the probe's settings.
    cfg = config_hash({"encoder": opts.encoder.model_dump()})
    cases = train + test
    keys = [case_key(sha256_file(c.image), cfg, kind="image_features") for c in cases]
    # Features in the optional local feature file enter the cache first (as float16, like computed ones).
    n_cached = n_seeded = 0
    for case, key in zip(cases, keys):
        if ctx.cache.get(key) is not None:
            n_cached += 1
            continue
        rel = _rel_id(case.image, root) if seeded else None
        if rel in seeded:
            ctx.cache.put(key, {"kind": "image_features", "case_id": case.id, "status": "ok", **_pack(seeded[rel]), "source": str(opts.feature_cache)})
            n_seeded += 1
    encoder_id = f"{opts.encoder.backend}:{opts.encoder.model or ''}".rstrip(":")
    ctx.log(f"linear_probe: {len(cases)} images, {n_cached} cached, "
            f"{n_seeded} from {opts.feature_cache}, {len(cases) - n_cached - n_seeded} to encode with {encoder_id}")  # fmt: skip
    case_of = dict(zip(keys, cases))
    backend: dict[str, Any] = {}

    def prepare(missing: int, todo: int) -> None:
        backend["encoder"] = opts.encoder.create("image_embedder")

    def encode(chunk: list[str]) -> list[dict[str, Any]]:
        encoder = backend["encoder"]
        out = encoder.embed_images(open_rgb(case_of[k].image for k in chunk))
        return [{"kind": "image_features", "case_id": case_of[k].id, "status": "ok", **_pack(v), "source": encoder.model_id} for k, v in zip(chunk, out)]

    filled = cached_map(ctx, keys, encode, what="linear_probe features", batch_size=opts.batch_size, allow_partial=opts.allow_partial, prepare=prepare)
    if "encoder" in backend:
        encoder_id = backend["encoder"].model_id
    return Predictions([filled.records.get(k) for k in keys], {"n_seeded": n_seeded, "missing": filled.missing, "encoder_id": encoder_id, "n_train": len(train)})


def score_predictions(ctx: ProtocolContext, predictions: Predictions) -> ProtocolResult:
    """Fit the probe on the train cases' features and score it on the test cases' (no encoder runs)."""
    from evals.classification import fmt
    from evals.metrics import accuracy, balanced_accuracy, macro_f1, macro_roc_auc
    from evals.report import md_table

    ld = load(ctx, log=False)
    opts, feature_file, notes = ld.opts, ld.feature_file, list(ld.notes)
    n_train = len(ld.train)
    recs = predictions.records
    if len(recs) != n_train + len(ld.test):
        raise ValueError(f"{len(recs)} feature records for {n_train} training and {len(ld.test)} test cases")
    # --rescore with allow_partial: cases without features are not scored.
    train = [c for c, r in zip(ld.train, recs[:n_train]) if r is not None]
    test = [c for c, r in zip(ld.test, recs[n_train:]) if r is not None]
    # The cached (float16) values, so a re-run sees the same numbers.
    feats = [_unpack(r) for r in recs if r is not None]
    n_seeded, encoder_id = predictions.stats.get("n_seeded", 0), predictions.stats.get("encoder_id", opts.encoder.backend)
    filled_missing = predictions.stats.get("missing", 0)

    X = np.stack(feats)
    X_train, X_test = X[: len(train)], X[len(train) :]
    y_train = np.array([c.label for c in train])
    y_test = np.array([c.label for c in test])
    ctx.log(f"linear_probe: fitting {len(opts.Cs)} Cs x {opts.folds} folds on {X_train.shape}")
    res = linear_probe(X_train, y_train, X_test, y_test, Cs=opts.Cs, folds=opts.folds, seed=opts.seed,
                       max_iter=opts.max_iter, class_weight=opts.class_weight)  # fmt: skip
    labels, proba, y_pred = res["labels"], res["proba"], res["y_pred"]
    test_labels = sorted(set(y_test))

    boot = {"n": opts.n_bootstrap, "seed": opts.seed}
    majority = max(labels, key=lambda c: (y_train == c).sum())
    metrics: dict[str, Any] = {
        "n_train": len(train),
        "n_test": len(test),
        "encoder": opts.encoder.model_dump(),
        "best_C": res["best_C"],
        "cv_folds": res["folds"],
        "cv_auc": {str(r["C"]): round(r["auc_mean"], 4) for r in res["cv"]},
        "accuracy": with_ci(accuracy, y_test, y_pred, **boot),
        "balanced_accuracy": with_ci(balanced_accuracy, y_test, y_pred, **boot),
        "macro_f1": with_ci(lambda y, p: macro_f1(y, p, sorted(set(y))), y_test, y_pred, **boot),
        "macro_auc": with_ci(lambda y, pr: macro_roc_auc(y, pr, labels), y_test, proba, **boot),
        "majority_class_accuracy": round(float((y_test == majority).mean()), 4),
        "unconverged_fits": res["unconverged_fits"],
        "train_class_counts": {c: int((y_train == c).sum()) for c in labels},
        "test_class_counts": {c: int((y_test == c).sum()) for c in test_labels},
    }
    encoder_saw_data = bool(ctx.bench.seen_by_default_classifier and opts.encoder.backend == "sklesion")
    metrics["encoder_trained_on_probe_data"] = encoder_saw_data

    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    with open(ctx.out_dir / "linear_probe_predictions.jsonl", "w", encoding="utf-8") as f:
        for c, p, row in zip(test, y_pred, proba):
            f.write(json.dumps({"id": c.id, "label": c.label, "pred": str(p), "proba": dict(zip(labels, np.round(row, 5).tolist()))}) + "\n")

    tables = {
        "Linear probe (test)": md_table(
            ["metric", "value [95% CI]"],
            [[k, fmt(metrics[k])] for k in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")]
            + [["majority-class accuracy", f"{metrics['majority_class_accuracy']:.3f}"]],
        ),
        "Cross-validated macro ROC-AUC per C": md_table(
            ["C", "CV AUC (mean)", "std", "selected"],
            [[f"{r['C']:g}", f"{r['auc_mean']:.4f}", f"{r['auc_std']:.4f}", "yes" if r["C"] == res["best_C"] else ""] for r in res["cv"]],
        ),
        "Per class (test)": md_table(
            ["class", "n train", "n test", "recall", "precision"],
            [[c, int((y_train == c).sum()), int((y_test == c).sum()),
              f"{((y_pred == c) & (y_test == c)).sum() / max((y_test == c).sum(), 1):.3f}" if (y_test == c).any() else "n/a",
              f"{((y_pred == c) & (y_test == c)).sum() / (y_pred == c).sum():.3f}" if (y_pred == c).any() else "n/a"]
             for c in sorted(set(labels) | set(test_labels))],
        ),  # fmt: skip
    }
    plots = {"CV ROC-AUC per C": _plot_cv(res["cv"], res["best_C"], ctx.out_dir / "plots" / "linear_probe_cv.png")}
    notes += [
        f"Encoder {encoder_id} ({opts.encoder.backend}), frozen; standardised features, multinomial logistic "
        f"regression (lbfgs); C chosen by {res['folds']}-fold stratified CV on macro one-vs-rest ROC-AUC "
        f"(C = {res['best_C']:g}), refitted on all {len(train)} training cases, scored once on {len(test)} test cases.",
        f"Train: {opts.train_filter}; test: {opts.test_filter}. {n_seeded} feature vectors from {opts.feature_cache}, "
        f"{filled_missing} encoded this run.",
    ]
    if opts.train_only_cached and feature_file is not None:
        notes.append(f"Training used only the training cases present in {opts.feature_cache}.")
    if encoder_saw_data:
        notes.append("The encoder (sklesion) was trained on HAM10000, these images included: the probe's figures are optimistic.")
    if res["unconverged_fits"]:
        notes.append(f"{res['unconverged_fits']} fits hit max_iter={opts.max_iter} before converging.")
    missing = sorted(set(test_labels) - set(labels))
    if missing:
        notes.append(f"Test classes absent from training (never predicted): {missing}.")
    return ProtocolResult(metrics=metrics, tables=tables, plots=plots, n_cases=len(test), notes=notes)


def _plot_cv(cv: list[dict], best_C: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.errorbar([r["C"] for r in cv], [r["auc_mean"] for r in cv], yerr=[r["auc_std"] for r in cv], marker="o", capsize=3)
    ax.axvline(best_C, color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("C")
    ax.set_ylabel("CV macro ROC-AUC")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
