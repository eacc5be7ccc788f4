"""``dermgraph train fusion``: refit the morphology expert, the stackers, the conformal scores and the risk control.

Input: the experts' first-round outputs on images the lesion classifier has not seen
(``python -m training.fusion_data``). Parts:

* **fit** (dermoscopy): the ``calib`` half of isic2018_val + Derm7pt ``train``/``extra``;
  **evaluation** (never fitted on): the ``report`` half of isic2018_val and Derm7pt ``val``.
* **fit** (clinical): the DermNet photos held out of the case index whose content hash ends in an even
  digit; **evaluation**: the odd ones.

Everything calibrated is cross-fitted: the morphology expert is refitted without each fold's Derm7pt
cases, the stacker's out-of-fold probabilities give the conformal scores (with ``conformal_groups: source``, one
threshold per source, each image assigned by a linear model over its encoder features, out of fold for the
calibration cases), and the acceptance model's out-of-fold scores give the SGR calibration pairs. The deployed
models are refits on the whole fit part.
The command prints coverage and risk on the evaluation part, and the ablations (each expert dropped).

    dermgraph train fusion --config configs/train/fusion.yaml
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import Field

from agent.config import DEFAULT_CONCEPT_HEADS
from agent.nodes.reason import CANDIDATE_HEADS
from models.conformal import max_coverage_at_accuracy, prediction_set, risk_coverage, true_label_scores
from models.stacker import ACCEPTANCE_FEATURES, LEGACY_ACCEPTANCE_FEATURES, FusionModel, ModalityFusion, MorphologyExpert, acceptance_features, log_probs, top_candidate
from models.vocabulary import HAM_CLASSES, SEVEN_POINT
from training.config import TrainConfig
from training.data import is_dermnet_fit_half

DERM_EXPERTS = ("classifier", "knn", "morphology", "llm")
CLIN_EXPERTS = ("knn", "llm")
FIT_PART_NAMES = {"isic2018_val": "isic2018_val {half} half", "derm7pt": "Derm7pt train/extra"}
ISIC_HALVES = ("calib", "report")
DERMNET_HALVES = ("even", "odd")  # last hex digit of the photo's sha1 (training.data.is_dermnet_fit_half: even)


def other_half(half: str, halves: Sequence[str]) -> str:
    """The half of a two-way split that ``half`` is not (the evaluation half of a fit half, and back)."""
    return next(h for h in halves if h != half)


class Config(TrainConfig):
    """Fusion refit (see the module docstring)."""

    experts_file: Path = Field(Path(".cache/fusion/experts.jsonl"), description="Output of `python -m training.fusion_data`.")
    extra_experts: list[str] = Field([], description="Extra expert files next to experts_file (<stem>_<name>.jsonl), e.g. 'effnet' (second visual expert: HAM head for dermoscopy, DermNet head for clinical photos).")
    fit_sources: list[Literal["isic2018_val", "derm7pt"]] = Field(["isic2018_val", "derm7pt"], description="Sources of the dermoscopy fit part (drop 'derm7pt' when an expert was trained on Derm7pt train/extra).")
    isic_fit_half: Literal[ISIC_HALVES] = Field("calib", description="The isic2018_val half the dermoscopy stacker fits on; the other "
                                                      "is evaluated. The shipped artifact fits on 'calib'; 'report' is the swapped fold of "
                                                      "a two-fold estimate over all of isic2018_val (scripts/fusion_two_fold.py).")
    dermnet_fit_half: Literal[DERMNET_HALVES] = Field("even", description="The half of the held-out DermNet photos the clinical stacker fits on "
                                                      "(clinical_fit: heldout_even); the other is evaluated. 'odd' is the swapped fold of "
                                                      "scripts/fusion_two_fold.py.")
    acceptance_features: list[str] = Field(list(LEGACY_ACCEPTANCE_FEATURES), description=f"Signals of the acceptance model, from {list(ACCEPTANCE_FEATURES)}.")
    acceptance_sources: list[str] | None = Field(None, description="Dermoscopy sources whose fit rows train the acceptance model and set the SGR threshold (None: all); "
                                                 "leave out those the second expert trained on when its agreement is a signal.")
    clinical_fit: list[Literal["heldout_even", "train"]] = Field(["heldout_even"], description="Clinical fit rows: the even-hash half of the held-out DermNet "
                                                                "photos, and/or the case index's DermNet photos (fusion_data --sources dermnet_train; "
                                                                "needs the second expert's cross-fitted outputs there).")
    stand_in_offsets: bool = Field(False, description="Fit a weight offset per expert for the rows whose output of it comes from cross-fitted "
                                   "stand-in models (<expert>_crossfit: weaker than the expert the agent runs), so that those rows inform every other "
                                   "parameter without pulling that expert's deployed weight down; the artifact keeps the deployed weights only.")
    findings_from: Literal["concept-heads", "effnet"] = Field("concept-heads", description="Whose 7-point findings the findings model reads, as the "
                                                              "agent's morphology.kind: the concept heads (records' findings) or the second expert's "
                                                              "criteria heads (<extra expert>_findings; cross-fitted where it trained).")
    clinical_extra_candidates: int = Field(0, ge=0, le=20, description="Clinical candidates added from each proposing expert the clinical stacker reads (the second expert's DermNet head, the "
                                             "clinical feature probe): its top-k not already proposed (by similar cases, then the experts before it).")
    artifact_id: str = "fusion-stacker"
    dermoscopy_experts: list[str] = Field(list(DERM_EXPERTS), description="Experts of the dermoscopy stacker.")
    clinical_experts: list[str] = Field(list(CLIN_EXPERTS), description="Experts of the clinical stacker.")
    folds: int = Field(5, ge=2)
    eps: float = Field(1e-3, gt=0, lt=0.1, description="Probability floor before taking logs.")
    c_grid: list[float] = Field([0.001, 0.01, 0.1, 1.0], description="Inverse L2 strengths of the per-class weight deviations tried (cross-validated).")
    gamma_grid: list[float] = Field([0.0, 0.25, 0.5, 0.75, 1.0], description="Class weights of the decision model ∝ n_c^-γ tried (0: none, 1: balanced).")
    melanoma_sensitivity_target: float | None = Field(None, gt=0, lt=1, description="Operating point: the smallest log-odds bias on melanoma's decision "
                                                      "score (melanoma_bias_grid) whose out-of-fold melanoma sensitivity on the fit cases reaches this, "
                                                      "accuracy kept within max_accuracy_drop (None: no bias).")
    melanoma_bias_grid: list[float] = Field([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0], description="Biases tried (log-odds added to melanoma's decision score).")
    max_accuracy_drop: float = Field(0.02, ge=0, description="Choose the γ of best CV balanced accuracy among those whose CV accuracy is at most this below the previous default's on the fit cases.")
    morphology_c_grid: list[float] = Field([0.03, 0.1, 0.3, 1.0, 3.0])
    conformal_score: str = Field("lac", pattern="^(lac|aps)$")
    conformal_groups: Literal["source"] | None = Field(None, description="Group-conditional (Mondrian) dermoscopy sets: 'source' fits a linear model "
                                                       "of the fit case's source (isic2018_val / Derm7pt) over the lesion encoder's features and "
                                                       "calibrates one threshold per predicted source (None: one pooled threshold).")
    group_c: float = Field(0.01, gt=0, description="Inverse L2 strength of the group model (standardised features).")
    feature_dir: Path = Field(Path(".cache/features"), description="Cached lesion-encoder features (scripts/extract_features.py) the group model reads.")
    alphas: list[float] = Field([0.05, 0.1, 0.2], description="Miscoverage levels reported.")
    alpha: float = Field(0.1, gt=0, lt=1, description="The α whose set size feeds the acceptance model.")
    target_accuracy: float = Field(0.85, gt=0, lt=1)
    delta: float = Field(0.1, gt=0, lt=1, description="SGR confidence: the risk guarantee holds with probability 1-δ.")
    n_bootstrap: int = Field(1000, ge=0)


# --------------------------------------------------------------------------- data


def load_parts(path: Path, extra: Sequence[str] = (), clinical_extra_candidates: int = 0, findings_from: str = "concept-heads",
               isic_fit_half: str = "calib", dermnet_fit_half: str = "even", candidate_experts: Sequence[str] = ("effnet",)) -> dict[str, list[dict]]:  # fmt: skip
    """Records by part: derm_fit, isic_eval, derm7pt_eval, clin_fit / clin_eval (even / odd hash halves of the
    held-out DermNet photos), clin_train (the case index's DermNet photos, when collected). ``findings_from``
    'effnet': each record's findings are the second expert's criteria heads (``effnet_findings``).
    ``isic_fit_half`` / ``dermnet_fit_half``: the isic2018_val half in derm_fit (the other is isic_eval) and the
    held-out DermNet half in clin_fit (the other is clin_eval)."""
    for name, value, valid in (("isic_fit_half", isic_fit_half, ISIC_HALVES), ("dermnet_fit_half", dermnet_fit_half, DERMNET_HALVES)):
        if value not in valid:
            raise ValueError(f"{name} {value!r}; valid: {', '.join(valid)}")
    from training.fusion_data import read_records

    parts: dict[str, list[dict]] = {k: [] for k in ("derm_fit", "isic_eval", "derm7pt_eval", "clin_fit", "clin_eval", "clin_train")}
    for r in read_records(path, tuple(extra)):
        if findings_from != "concept-heads" and r["findings"]:
            if f"{findings_from}_findings" not in r:
                raise ValueError(f"record {r['id']} has no {findings_from}_findings: rerun python -m training.fusion_data --expert-weights ... (findings_from: {findings_from})")
            r["findings"] = r[f"{findings_from}_findings"]
            r["morphology_crossfit"] = bool(r.get(f"{findings_from}_crossfit"))
        elif r["findings"]:
            r["morphology_crossfit"] = bool(r.get("crossfit_findings"))
        if r.get("modality") == "clinical":
            if "effnet_dermnet" in r:
                r["effnet"] = r["effnet_dermnet"]  # the second expert's clinical head
            for e in (e for e in CANDIDATE_HEADS if e in candidate_experts and clinical_extra_candidates):  # as the agent's candidates_for
                head = r.get(f"{e}_dermnet" if e == "effnet" else e)  # the record's 'effnet' is that head on clinical photos
                ranked = sorted(head or {}, key=(head or {}).get, reverse=True)
                r["candidates"] = list(r["candidates"]) + [c for c in ranked if c not in r["candidates"]][:clinical_extra_candidates]
        if r["source"] == "dermnet":
            if r["modality"] == "clinical" and not r["modality_rejected"]:
                if r["split"] == "train":
                    parts["clin_train"].append(r)
                else:
                    even = is_dermnet_fit_half(r["id"].split(":")[1])
                    parts["clin_fit" if even == (dermnet_fit_half == "even") else "clin_eval"].append(r)
        elif r["modality"] == "dermoscopy" and not r["modality_rejected"]:
            if r["source"] == "isic2018_val":
                parts["derm_fit" if r["split"] == isic_fit_half else "isic_eval"].append(r)
            else:
                parts["derm_fit" if r["split"] in ("train", "extra") else "derm7pt_eval"].append(r)
    return parts


def records_heads(recs: list[dict]) -> str:
    """The concept heads whose findings the records carry (``findings_heads``, written by ``training.fusion_data``;
    records from before the field: the shipped heads). Refuses a mix: one findings model reads one describer."""
    heads = {r.get("findings_heads", DEFAULT_CONCEPT_HEADS) for r in recs if r.get("findings")}
    if len(heads) > 1:
        raise ValueError(f"the records carry the findings of several concept heads ({', '.join(sorted(heads))}): collect them with one agent configuration")
    return heads.pop() if heads else DEFAULT_CONCEPT_HEADS


def check_out_of_sample(recs: list[dict], experts: Sequence[str], what: str) -> None:
    """Refuse to fit on an expert's output for an image that expert trained on (``<expert>_in_sample``, written
    by ``training.fusion_data``): its in-sample confidence would teach the fusion to trust it too much."""
    bad = {e: sum(bool(r.get(f"{e}_in_sample")) for r in recs) for e in experts}
    bad = {e: n for e, n in bad.items() if n}
    if bad:
        raise ValueError(f"{what} would be fitted on in-sample outputs ({', '.join(f'{e}: {n} cases' for e, n in bad.items())}); give "
                         "training.fusion_data --expert-crossfit (cross-fitted outputs) or leave those sources out of the fit")


def _folds(y: Sequence[str], k: int, seed: int) -> np.ndarray:
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(y)
    _, counts = np.unique(y, return_counts=True)
    k = max(2, min(k, int(counts.min()))) if counts.min() >= 2 else k
    fold = np.zeros(len(y), int)
    splitter = StratifiedKFold(k, shuffle=True, random_state=seed) if counts.min() >= k else None
    if splitter is None:
        fold = np.random.default_rng(seed).permutation(len(y)) % k
        return fold
    for j, (_, te) in enumerate(splitter.split(np.zeros(len(y)), y)):
        fold[te] = j
    return fold


# --------------------------------------------------------------------------- morphology expert


def morphology_inputs() -> list[tuple[str, str]]:
    return [(c, v) for c, vals in SEVEN_POINT.items() for v in vals]


def fit_morphology(findings: list[dict], y: list[str], c: float, seed: int) -> MorphologyExpert:
    from sklearn.linear_model import LogisticRegression

    inputs = morphology_inputs()
    x = np.array([[float((f.get(cr) or {}).get(v, 0.0)) for cr, v in inputs] for f in findings])
    m = LogisticRegression(C=c, max_iter=5000, class_weight="balanced", random_state=seed).fit(x, y)
    return MorphologyExpert(inputs, [str(k) for k in m.classes_], m.coef_, m.intercept_, list(HAM_CLASSES))


def choose_morphology_c(findings, y, grid, k, seed) -> tuple[float, dict[float, float]]:
    """C by K-fold log-loss of P(true diagnosis | findings)."""
    fold = _folds(y, k, seed)
    losses = {}
    for c in grid:
        nll = []
        for j in range(fold.max() + 1):
            tr, te = np.flatnonzero(fold != j), np.flatnonzero(fold == j)
            me = fit_morphology([findings[i] for i in tr], [y[i] for i in tr], c, seed)
            nll += [-math.log(max(me.predict(findings[i])[y[i]], 1e-9)) for i in te]
        losses[c] = float(np.mean(nll))
    return min(losses, key=losses.get), losses


def add_morphology_outputs(parts: dict[str, list[dict]], cfg: Config) -> tuple[MorphologyExpert, dict]:
    """Fit the morphology expert on Derm7pt train+extra and write each record's ``morphology`` output
    (out-of-fold for the cases it was fitted on)."""
    train = [r for r in parts["derm_fit"] if r["source"] == "derm7pt" and r["findings"]]
    fnd, y = [r["findings"] for r in train], [r["label"] for r in train]
    c, losses = choose_morphology_c(fnd, y, cfg.morphology_c_grid, cfg.folds, cfg.seed)
    fold = _folds(y, cfg.folds, cfg.seed + 1)
    for j in range(fold.max() + 1):
        tr, te = np.flatnonzero(fold != j), np.flatnonzero(fold == j)
        me = fit_morphology([fnd[i] for i in tr], [y[i] for i in tr], c, cfg.seed)
        for i in te:
            train[i]["morphology"] = me.predict(fnd[i])
    final = fit_morphology(fnd, y, c, cfg.seed)
    for recs in parts.values():
        for r in recs:
            if "morphology" not in r:
                r["morphology"] = final.predict(r["findings"]) if r["findings"] else None
    # Alone, on the dermoscopy evaluation cases.
    info = {"C": c, "cv_log_loss": losses, "n_train": len(train), "classes": final.classes}
    return final, info


# --------------------------------------------------------------------------- stackers


def derm_design(recs: list[dict], experts: Sequence[str], eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(X, missing mask): concatenated log-probabilities over HAM_CLASSES per expert (NaN where missing)."""
    C = len(HAM_CLASSES)
    x = np.full((len(recs), C * len(experts)), np.nan)
    for i, r in enumerate(recs):
        for j, e in enumerate(experts):
            v = log_probs(r.get(e), HAM_CLASSES, eps)
            if v is not None:
                x[i, j * C:(j + 1) * C] = v
    return x, np.isnan(x)


def stand_in_mask(recs: list[dict], experts: Sequence[str]) -> np.ndarray:
    """(n, E): True where a record's output of an expert comes from cross-fitted stand-in models
    (``<expert>_crossfit``, written by ``training.fusion_data --expert-crossfit``), not the model the agent runs."""
    return np.array([[bool(r.get(f"{e}_crossfit")) for e in experts] for r in recs], bool).reshape(len(recs), len(experts))


def _class_weights(y: Sequence[str], gamma: float) -> dict[str, float]:
    labels, counts = np.unique(np.asarray(y), return_counts=True)
    w = counts.astype(float) ** -gamma
    w *= len(y) / float((w * counts).sum())
    return {str(k): float(v) for k, v in zip(labels, w)}


def fit_multinomial(x: np.ndarray, y: Sequence[str], c: float, gamma: float, experts: Sequence[str], eps: float, seed: int,
                    stand_in: np.ndarray | None = None) -> ModalityFusion:  # fmt: skip
    """A product of experts with class-specific corrections, as one multinomial logit:

        z_c = b_c + Σ_e (w_e + v_ec + u_e · s_ne) · log p_e(c)

    w_e is each expert's weight, v_ec its per-class deviation, shrunk towards 0 by an L2 penalty 1/C
    (C → 0: a pure weighted product of experts with class biases; C large: free per-class weights);
    samples are weighted ∝ n_class^-γ. 2E·C + C parameters at most, fitted by L-BFGS. ``stand_in`` (n, E)
    marks outputs from cross-fitted stand-in models (s_ne = 1): their own weight offset u_e, lightly penalised,
    is fitted and kept in ``meta['stand_in_offsets']`` but not in the returned coefficients, which are the
    deployed expert's (:func:`with_stand_in` puts it back)."""
    from scipy.optimize import minimize

    C = len(HAM_CLASSES)
    E = len(experts)
    centre_full = np.nanmean(x, axis=0)
    centre_full = np.where(np.isnan(centre_full), np.log(1.0 / C), centre_full)
    x = np.where(np.isnan(x), centre_full, x)
    X = x.reshape(len(x), E, C)
    yi = np.array([HAM_CLASSES.index(k) for k in y])
    Y = np.eye(C)[yi]
    cw = _class_weights(y, gamma)
    sw = np.array([cw[k] for k in y])
    sw = sw / sw.sum()
    lam_v, lam_b = 1.0 / c, 1e-3
    present = np.isin(np.arange(C), yi)
    S = np.zeros((len(x), E)) if stand_in is None else np.asarray(stand_in, float)

    def unpack(theta):
        return theta[:E], theta[E:E + E * C].reshape(E, C), theta[E + E * C:E + E * C + C], theta[E + E * C + C:]

    def loss(theta):
        w, v, b, u = unpack(theta)
        wv = w[:, None] + v  # (E, C)
        z = b + np.einsum("nec,ec->nc", X, wv) + np.einsum("nec,ne->nc", X, S * u)
        z = np.where(present, z, -30.0)  # a class absent from the fit data is never predicted
        z = z - z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        p = np.exp(logp)
        nll = -(sw * (Y * logp).sum(1)).sum()
        g = (p - Y) * sw[:, None]  # dL/dz
        g = np.where(present, g, 0.0)
        gwv = np.einsum("nc,nec->ec", g, X)
        gw = gwv.sum(1)
        gv = gwv + 2 * lam_v * v
        gb = g.sum(0) + 2 * lam_b * b
        gu = (np.einsum("nc,nec->ne", g, X) * S).sum(0) + 2 * lam_b * u
        penalty = lam_v * (v ** 2).sum() + lam_b * ((b ** 2).sum() + (u ** 2).sum())
        return nll + penalty, np.concatenate([gw, gv.ravel(), gb, gu])

    theta0 = np.concatenate([np.full(E, 1.0 / E), np.zeros(E * C), np.zeros(C), np.zeros(E)])
    res = minimize(loss, theta0, jac=True, method="L-BFGS-B", options={"maxiter": 2000})
    w, v, b, u = unpack(res.x)
    wv = w[:, None] + v
    coef = np.zeros((C, E * C))
    for j in range(E):
        coef[np.arange(C), j * C + np.arange(C)] = wv[j]
    intercept = np.where(present, b, -30.0)
    centre = {e: centre_full[j * C:(j + 1) * C] for j, e in enumerate(experts)}
    return ModalityFusion("dermoscopy", "multinomial", list(experts), eps, list(HAM_CLASSES), coef, intercept, centre,
                          meta={"C": c, "gamma": gamma, "expert_weights": {e: round(float(wj), 4) for e, wj in zip(experts, w)},
                                "stand_in_offsets": {e: float(uj) for e, uj, on in zip(experts, u, S.any(0)) if on}})  # fmt: skip


def with_stand_in(model: ModalityFusion, flags: Sequence[bool]) -> ModalityFusion:
    """``model`` as fitted for a row whose experts' outputs are stand-ins where ``flags`` says so (each such
    expert's weight offset added to its block of coefficients)."""
    offsets = model.meta.get("stand_in_offsets") or {}
    if not any(flags) or not offsets:
        return model
    C = len(model.classes)
    coef = np.array(model.coef, float).copy()
    for j, (e, on) in enumerate(zip(model.experts, flags)):
        if on and e in offsets:
            coef[np.arange(C), j * C + np.arange(C)] += offsets[e]
    return replace(model, coef=coef)


def fuse_fit_rows(model: ModalityFusion, recs: list[dict]) -> list[dict[str, float]]:
    """Fused probabilities of fit/calibration rows, each with the stand-in offsets its outputs call for."""
    mask = stand_in_mask(recs, model.experts)
    variants: dict[tuple[bool, ...], ModalityFusion] = {}
    out = []
    for r, flags in zip(recs, map(tuple, mask)):
        m = variants.setdefault(flags, with_stand_in(model, flags))
        out.append(m.fuse(HAM_CLASSES, _outputs(r, m.experts)).probs)
    return out


def _outputs(r: dict, experts: Sequence[str]) -> dict[str, Any]:
    return {e: r.get(e) for e in experts}


def fuse_records(model: ModalityFusion, recs: list[dict]) -> list[dict[str, float]]:
    return [f.probs for f in fuse_all(model, recs)]


def fuse_all(model: ModalityFusion, recs: list[dict]):
    return [model.fuse(r["candidates"] if model.kind == "conditional_logit" else HAM_CLASSES, _outputs(r, model.experts)) for r in recs]


def oof_multinomial(recs: list[dict], experts, c, gamma, eps, fold, seed, stand_in: bool = False) -> list[dict[str, float]]:
    x, _ = derm_design(recs, experts, eps)
    s = stand_in_mask(recs, experts) if stand_in else None
    y = [r["label"] for r in recs]
    out: list[Any] = [None] * len(recs)
    for j in range(fold.max() + 1):
        tr, te = np.flatnonzero(fold != j), np.flatnonzero(fold == j)
        m = fit_multinomial(x[tr], [y[i] for i in tr], c, gamma, experts, eps, seed, None if s is None else s[tr])
        for i, p in zip(te, fuse_fit_rows(m, [recs[i] for i in te])):
            out[i] = p
    return out


def top_metrics(y: Sequence[str], probs: list[dict[str, float]], order: list[list[str]] | None = None) -> dict[str, float]:
    from evals.metrics import diagnosis_metrics

    pred = decide_all(probs, order)
    return {k: round(float(v), 4) for k, v in diagnosis_metrics(list(y), pred).items() if v is not None and not (isinstance(v, float) and math.isnan(v))}


def reference_accuracy(recs: list[dict], experts: Sequence[str]) -> float:
    """The accuracy a new stacker must keep (within ``max_accuracy_drop``): the previous default fusion's on
    the same cases when it is available, else the classifier's alone."""
    try:
        return float(legacy_baseline(recs, "dermoscopy")["accuracy"])
    except (LookupError, OSError, ValueError):
        return single_expert(recs, "classifier")["accuracy"] if "classifier" in experts else 0.0


def decide_all(probs: list[dict[str, float]], order: list[list[str]] | None = None) -> list[str]:
    """The decided labels: the decision order's first where given, else the most probable."""
    if order is not None:
        return [o[0] if o else "" for o in order]
    return [max(p, key=p.get) if p else "" for p in probs]


def choose_stacker(recs: list[dict], experts, cfg: Config) -> tuple[float, list[dict], list[dict[str, float]]]:
    """C by cross-validated log-loss (unweighted fit: calibrated probabilities); returns (C, grid, OOF probabilities)."""
    y = [r["label"] for r in recs]
    fold = _folds(y, cfg.folds, cfg.seed)
    grid, oofs = [], {}
    for c in cfg.c_grid:
        oof = oof_multinomial(recs, experts, c, 0.0, cfg.eps, fold, cfg.seed, cfg.stand_in_offsets)
        nll = float(np.mean([-math.log(max(p.get(t, 0.0), 1e-9)) for p, t in zip(oof, y)]))
        grid.append({"C": c, "log_loss": round(nll, 4), **top_metrics(y, oof)})
        oofs[c] = oof
    best = min(grid, key=lambda g: g["log_loss"])
    return best["C"], grid, oofs[best["C"]]


def choose_decision(recs: list[dict], experts, cfg: Config) -> tuple[float, float, list[dict], list[str]]:
    """(C, γ) of the decision model (a class-weighted stacker, sample weights ∝ n_class^-γ): the best CV
    balanced accuracy among settings whose CV accuracy is at most ``max_accuracy_drop`` below
    :func:`reference_accuracy` (the issue's constraint: balanced accuracy up, accuracy down by at most 2
    points), then melanoma's operating point (:func:`choose_melanoma_bias`). Returns (C, γ, grid, out-of-fold
    decided labels); the bias is the grid's last entry."""
    y = [r["label"] for r in recs]
    fold = _folds(y, cfg.folds, cfg.seed)
    reference = reference_accuracy(recs, experts)
    grid: list[dict] = []
    probs: dict[tuple[float, float], list[dict[str, float]]] = {}
    for c in cfg.c_grid:
        for g in cfg.gamma_grid:
            oof = oof_multinomial(recs, experts, c, g, cfg.eps, fold, cfg.seed, cfg.stand_in_offsets)
            grid.append({"C": c, "gamma": g, **top_metrics(y, oof)})
            probs[(c, g)] = oof
    ok = [g for g in grid if g["accuracy"] >= reference - cfg.max_accuracy_drop] or grid
    best = max(ok, key=lambda g: (g["balanced_accuracy"], g["accuracy"]))
    bias, bias_grid = choose_melanoma_bias(y, probs[(best["C"], best["gamma"])], reference, cfg)
    grid = grid + [{"reference_accuracy": round(reference, 4)}, {"melanoma_bias": bias, "melanoma_bias_grid": bias_grid}]
    return best["C"], best["gamma"], grid, decide_all(shift_melanoma(probs[(best["C"], best["gamma"])], bias))


def shift_melanoma(probs: list[dict[str, float]], bias: float) -> list[dict[str, float]]:
    """Decision scores with melanoma's log-odds raised by ``bias`` (its probability × e^bias; argmax unchanged otherwise)."""
    return [{c: v * (math.exp(bias) if c == "mel" else 1.0) for c, v in p.items()} for p in probs]


def melanoma_biased(intercept: np.ndarray, bias: float) -> np.ndarray:
    """A decision model's intercept with melanoma's raised by ``bias`` (the same operating point in logit space)."""
    out = np.array(intercept, float)
    out[HAM_CLASSES.index("mel")] += bias
    return out


def choose_melanoma_bias(y: Sequence[str], oof: list[dict[str, float]], reference: float, cfg: Config) -> tuple[float, list[dict]]:
    """The decision's melanoma operating point from out-of-fold decision probabilities on the fit cases: the
    smallest bias δ (melanoma's probability × e^δ before the argmax) whose melanoma sensitivity reaches
    ``melanoma_sensitivity_target`` with accuracy at least ``reference - max_accuracy_drop``; if none does,
    the most sensitive δ that keeps the accuracy. Returns (δ, grid)."""
    grid = []
    for d in cfg.melanoma_bias_grid:
        grid.append({"bias": d, **top_metrics(y, shift_melanoma(oof, d))})
    if cfg.melanoma_sensitivity_target is None:
        return 0.0, grid
    ok = [g for g in grid if g["accuracy"] >= reference - cfg.max_accuracy_drop]
    reach = [g for g in ok if g.get("mel_sensitivity", 0.0) >= cfg.melanoma_sensitivity_target]
    best = min(reach, key=lambda g: g["bias"]) if reach else max(ok, key=lambda g: (g.get("mel_sensitivity", 0.0), -g["bias"]), default={"bias": 0.0})
    return float(best["bias"]), grid


def fit_conditional(recs: list[dict], experts: Sequence[str], eps: float) -> ModalityFusion:
    """Conditional logit over each case's candidates: p(c) ∝ exp(Σ_e w_e log p_e(c)); cases whose truth is
    not a candidate carry no information about the weights and are skipped."""
    from scipy.optimize import minimize

    rows = []
    for r in recs:
        cands = r["candidates"]
        if r["label"] not in cands:
            continue
        feats = []
        for e in experts:
            v = log_probs(r.get(e), cands, eps)
            feats.append(v if v is not None else np.zeros(len(cands)))
        rows.append((np.stack(feats, 1), cands.index(r["label"])))

    def nll(w):
        total = 0.0
        for f, t in rows:
            z = f @ w
            z = z - z.max()
            total -= z[t] - math.log(np.exp(z).sum())
        return total / max(len(rows), 1) + 1e-3 * float(w @ w)

    w = minimize(nll, np.ones(len(experts)), method="L-BFGS-B", bounds=[(0, 10)] * len(experts)).x if rows else np.ones(len(experts))
    return ModalityFusion("clinical", "conditional_logit", list(experts), eps, coef=np.asarray(w), intercept=np.zeros(0),
                          meta={"n_fit_with_truth_in_candidates": len(rows), "n_fit": len(recs)})  # fmt: skip


def oof_conditional(recs, experts, eps, fold) -> list[dict[str, float]]:
    out: list[Any] = [None] * len(recs)
    for j in range(fold.max() + 1):
        tr, te = np.flatnonzero(fold != j), np.flatnonzero(fold == j)
        m = fit_conditional([recs[i] for i in tr], experts, eps)
        for i, p in zip(te, fuse_records(m, [recs[i] for i in te])):
            out[i] = p
    return out


# --------------------------------------------------------------------------- calibration


def conformal_scores(recs: list[dict], probs: list[dict[str, float]], score: str) -> np.ndarray:
    out = []
    for r, p in zip(recs, probs):
        labels = list(p)
        row = np.array([p[c] for c in labels])
        y = labels.index(r["label"]) if r["label"] in labels else -1
        out.append(true_label_scores(row[None, :], np.array([y]), score)[0])  # type: ignore[arg-type]
    return np.array(out)


def second_expert_top(r: dict, candidates: Sequence[str]) -> str | None:
    """The second visual expert's most probable candidate in record ``r`` (None without its outputs)."""
    return top_candidate(r.get("effnet"), candidates)


def signals(r: dict, p: dict[str, float], qhat: float, score: str, experts: Sequence[str], label: str) -> dict[str, float]:
    tops = {e: (max(r[e], key=r[e].get) if r.get(e) else None) for e in experts}
    from models.tta import tta_agreement

    tta = tta_agreement(r.get("tta"), label, list(p))
    return acceptance_features(p, prediction_set(p, qhat, score), tops, r.get("morphology"), label, second_expert_top(r, list(p)), tta)  # type: ignore[arg-type]


def fit_acceptance(sig: list[dict[str, float]], correct: np.ndarray, seed: int, features: Sequence[str] = ACCEPTANCE_FEATURES):
    from sklearn.linear_model import LogisticRegression

    x = np.array([[s[k] for k in features] for s in sig])
    if correct.all() or not correct.any():
        return np.zeros(len(features)), float(np.log((correct.mean() + 1e-3) / (1 - correct.mean() + 1e-3)))
    m = LogisticRegression(C=1.0, max_iter=5000, random_state=seed).fit(x, correct.astype(int))
    return m.coef_[0], float(m.intercept_[0])


def calibrate(model: ModalityFusion, recs: list[dict], oof: list[dict[str, float]], cfg: Config, source: str, labels: list[str] | None = None,
              acceptance_sources: Sequence[str] | None = None) -> None:  # fmt: skip
    """Conformal scores and cross-fitted acceptance calibration, written into ``model``. The acceptance model and
    its SGR calibration use only the rows of ``acceptance_sources`` (None: all), e.g. not the rows one of its
    signals' models trained on."""
    model.conformal_score = cfg.conformal_score
    model.calibration_scores = conformal_scores(recs, oof, cfg.conformal_score)
    model.calibration_source = source
    experts = [e for e in model.experts if e != "morphology"]
    labels = labels or decide_all(oof)
    feats = tuple(cfg.acceptance_features)
    keep = [i for i, r in enumerate(recs) if not acceptance_sources or r["source"] in acceptance_sources]
    recs, oof, labels = [recs[i] for i in keep], [oof[i] for i in keep], [labels[i] for i in keep]
    sig = [signals(r, p, model.qhat(cfg.alpha, r.get(SET_GROUP)), cfg.conformal_score, experts, lab) for r, p, lab in zip(recs, oof, labels)]
    correct = np.array([lab == r["label"] for r, lab in zip(recs, labels)])
    fold = np.random.default_rng(cfg.seed).permutation(len(recs)) % cfg.folds
    kappa = np.zeros(len(recs))
    for j in range(cfg.folds):
        tr, te = np.flatnonzero(fold != j), np.flatnonzero(fold == j)
        coef, b = fit_acceptance([sig[i] for i in tr], correct[tr], cfg.seed, feats)
        for i in te:
            kappa[i] = 1 / (1 + math.exp(-(float(coef @ np.array([sig[i][k] for k in feats])) + b)))
    model.acceptance_features = feats
    model.acceptance_coef, model.acceptance_intercept = fit_acceptance(sig, correct, cfg.seed, feats)
    model.acceptance_kappa, model.acceptance_correct = kappa, correct
    model.meta["acceptance_rows"] = len(recs)


SET_GROUP = "_set_group"
"""Record key of the calibration group a dermoscopy record's prediction set uses (set by :func:`fit_set_groups`)."""


def record_features(recs: list[dict], feature_dir: Path) -> dict[str, np.ndarray]:
    """The lesion encoder's cached features of ``recs`` by record id (the agent reads the same features live)."""
    from training.fusion_data import case_rows

    sources = sorted({r["source"] for r in recs})
    feats = {row.id: row.features for row in case_rows(sources, feature_dir)}
    missing = [r["id"] for r in recs if r["id"] not in feats]
    if missing:
        raise ValueError(f"{len(missing)} records have no cached features in {feature_dir} (e.g. {missing[:3]}); run scripts/extract_features.py")
    return feats


def fit_set_groups(fit: list[dict], others: list[dict], cfg: Config, feats: dict[str, np.ndarray] | None = None):
    """The group model of group-conditional sets: a logistic regression of each fit case's source over its encoder
    features (``feats`` by record id; default: the cached features). Fit cases get their out-of-fold group (as
    calibration groups), ``others`` the final model's."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from models.stacker import SetGroups

    feats = record_features(fit + others, cfg.feature_dir) if feats is None else feats
    names = sorted({r["source"] for r in fit})
    if len(names) < 2:
        raise ValueError(f"conformal_groups='source' needs fit cases from two sources or more, got {names}")
    x = np.stack([feats[r["id"]] for r in fit]).astype(float)
    g = np.array([names.index(r["source"]) for r in fit])
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    z = (x - mean) / scale
    lr = LogisticRegression(C=cfg.group_c, max_iter=5000)
    cv = cross_val_predict(lr, z, g, cv=StratifiedKFold(cfg.folds, shuffle=True, random_state=cfg.seed))
    lr.fit(z, g)
    groups = SetGroups(names, mean, scale, lr.coef_, lr.intercept_, cv, round(float((cv == g).mean()), 4))
    for r, k in zip(fit, cv):
        r[SET_GROUP] = int(k)
    for r in others:
        r[SET_GROUP] = groups.assign(feats[r["id"]])
    return groups


# --------------------------------------------------------------------------- evaluation


def evaluate(model: ModalityFusion, recs: list[dict], cfg: Config, cases: list[dict] | None = None) -> dict[str, Any]:
    """Label metrics, prediction-set coverage per α, and selective accuracy/coverage on ``recs``; with ``cases``,
    one row per case is appended to it (label, decision, acceptance, the α set, each expert's top label)."""
    from evals.metrics import bootstrap_ci, diagnosis_metrics, risk_coverage as aurc_curve

    if not recs:
        return {"n": 0}
    fused = fuse_all(model, recs)
    probs = [f.probs for f in fused]
    orders = [f.order for f in fused]
    y = [r["label"] for r in recs]
    pred = decide_all(probs, orders)
    out: dict[str, Any] = {"n": len(recs), **top_metrics(y, probs, orders)}
    yp = (np.array(y), np.array(pred))
    for name in ("accuracy", "balanced_accuracy"):
        out[f"{name}_ci"] = [round(v, 4) for v in bootstrap_ci(lambda a, b, n=name: diagnosis_metrics(list(a), list(b))[n], *yp, n=cfg.n_bootstrap)]
    if "mel" in y:
        out["mel_sensitivity_ci"] = [round(v, 4) for v in bootstrap_ci(lambda a, b: diagnosis_metrics(list(a), list(b))["mel_sensitivity"], *yp, n=cfg.n_bootstrap)]
    sets = {}
    for a in cfg.alphas:
        s = [model.prediction_set(p, a, r.get(SET_GROUP)) for p, r in zip(probs, recs)]
        sets[str(a)] = {"coverage": round(float(np.mean([t in si for t, si in zip(y, s)])), 4), "mean_size": round(float(np.mean([len(si) for si in s])), 3)}
    out["prediction_sets"] = sets
    experts = [e for e in model.experts if e != "morphology"]
    kappa = np.array([model.acceptance_score(signals(r, p, model.qhat(cfg.alpha, r.get(SET_GROUP)), cfg.conformal_score, experts, lab))
                      for r, p, lab in zip(recs, probs, pred)])  # fmt: skip
    correct = np.array([a == b for a, b in zip(y, pred)])
    theta, info = model.threshold(cfg.target_accuracy, cfg.delta)
    acc = kappa >= theta
    _, _, aurc = aurc_curve(kappa, correct)
    cov, acc_at = max_coverage_at_accuracy(kappa, correct, cfg.target_accuracy)
    out["selective"] = {
        "threshold": None if math.isinf(theta) else round(theta, 4),
        "calibration": info,
        "coverage": round(float(acc.mean()), 4),
        "accuracy_on_accepted": round(float(correct[acc].mean()), 4) if acc.any() else None,
        "accepted": int(acc.sum()),
        "aurc": round(float(aurc), 4),
        "aurc_ci": [round(v, 4) for v in bootstrap_ci(lambda k, c: aurc_curve(k, c)[2], kappa, correct, n=cfg.n_bootstrap)],
        f"max_coverage_at_{cfg.target_accuracy}": round(cov, 4),
        "oracle_note": "max coverage reaching the target on these cases (not a deployable threshold)",
    }
    out["risk_coverage"] = [[round(float(c), 4), round(float(r), 4)] for c, r in zip(*risk_coverage(kappa, correct))]
    if cases is not None:
        for r, p, lab, k, order in zip(recs, probs, pred, kappa, [o or sorted(q, key=q.get, reverse=True) for o, q in zip(orders, probs)]):
            cases.append({"id": r["id"], "source": r["source"], "split": r["split"], "label": r["label"], "decided": lab, "top5": order[:5], "accepted": bool(k >= theta),
                          "acceptance_score": round(float(k), 4), "prediction_set": model.prediction_set(p, cfg.alpha, r.get(SET_GROUP)),
                          "experts_top": {e: top_candidate(r.get(e)) for e in model.experts}})  # fmt: skip
    return out


def _headline(ev: dict[str, Any]) -> dict[str, Any]:
    """The figures a model card table shows for one evaluation part."""
    sel = ev.get("selective") or {}
    sets = (ev.get("prediction_sets") or {}).get("0.1") or {}
    return {k: v for k, v in {"accuracy": ev.get("accuracy"), "balanced_accuracy": ev.get("balanced_accuracy"), "mel_sensitivity": ev.get("mel_sensitivity"),
                              "accepted": sel.get("coverage"), "accuracy_on_accepted": sel.get("accuracy_on_accepted"), "aurc": sel.get("aurc"),
                              "set_coverage_0.1": sets.get("coverage"), "set_size_0.1": sets.get("mean_size")}.items() if v is not None}  # fmt: skip


def legacy_baseline(recs: list[dict], modality: str) -> dict[str, Any]:
    """The previous default (9-scalar fusion + rule verifier), first round, on the same records."""
    from agent.consistency import morphology_agreement
    from agent.fusion import fuse
    from models.resolve import resolve
    from retrieval.kb import KnowledgeBase

    params = json.loads(Path(resolve("fusion-calibration")).read_text()).get(modality, {})
    kb = KnowledgeBase()
    y, pred, conf, accepted = [], [], [], []
    for r in recs:
        cands = HAM_CLASSES if modality == "dermoscopy" else r["candidates"]
        clf = r["classifier"] if modality == "dermoscopy" else None
        p = fuse(cands, params, classifier=clf, knn=r["knn"] or None, llm=r.get("llm"))
        top = next(iter(p))
        tops = [max(e, key=e.get) for e in (clf, r["knn"], r.get("llm")) if e]
        consistency = sum(t == top for t in tops) / len(tops) if tops else 1.0
        entry = kb.entry_for_label(top)
        agree = morphology_agreement(r["findings"], entry.expected_7pt) if entry is not None and entry.expected_7pt and r["findings"] else None
        min_cons = 1.0 if modality == "clinical" else 0.5
        ok = p[top] >= 0.45 and consistency >= min_cons and (agree is None or agree >= 0.35)
        y.append(r["label"]), pred.append(top), conf.append(p[top]), accepted.append(ok)
    correct = np.array([a == b for a, b in zip(y, pred)])
    accepted = np.array(accepted)
    from evals.metrics import risk_coverage as aurc_curve

    out = {"n": len(recs), **top_metrics(y, [{t: 1.0} for t in pred])}
    out["selective"] = {"coverage": round(float(accepted.mean()), 4), "accuracy_on_accepted": round(float(correct[accepted].mean()), 4) if accepted.any() else None,
                        "aurc": round(float(aurc_curve(np.array(conf), correct)[2]), 4)}  # fmt: skip
    return out


def single_expert(recs: list[dict], expert: str) -> dict[str, float]:
    return top_metrics([r["label"] for r in recs], [r.get(expert) or {} for r in recs])


# --------------------------------------------------------------------------- train


def train(cfg: Config) -> dict[str, Any]:
    t0 = time.time()
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    parts = load_parts(cfg.experts_file, cfg.extra_experts, cfg.clinical_extra_candidates, cfg.findings_from, cfg.isic_fit_half, cfg.dermnet_fit_half,
                       candidate_experts=cfg.clinical_experts)
    counts = {k: len(v) for k, v in parts.items()}
    if not parts["derm_fit"]:
        raise ValueError(f"{cfg.experts_file}: no dermoscopy fit cases (run `python -m training.fusion_data` first)")
    morph, morph_info = add_morphology_outputs(parts, cfg)

    # Dermoscopy.
    fit = [r for r in parts["derm_fit"] if r["source"] in cfg.fit_sources]
    check_out_of_sample(fit, cfg.dermoscopy_experts, "the dermoscopy stacker")
    if "second_expert_agrees" in cfg.acceptance_features:
        check_out_of_sample([r for r in fit if not cfg.acceptance_sources or r["source"] in cfg.acceptance_sources], cfg.extra_experts, "the acceptance model")
    y = [r["label"] for r in fit]
    experts = list(cfg.dermoscopy_experts)
    c, grid, oof = choose_stacker(fit, experts, cfg)
    dc, gamma, dgrid, oof_labels = choose_decision(fit, experts, cfg)
    fold = _folds(y, cfg.folds, cfg.seed)
    x, _ = derm_design(fit, experts, cfg.eps)
    s = stand_in_mask(fit, experts) if cfg.stand_in_offsets else None
    derm = fit_multinomial(x, y, c, 0.0, experts, cfg.eps, cfg.seed, s)
    dec = fit_multinomial(x, y, dc, gamma, experts, cfg.eps, cfg.seed, s)
    mel_bias = float(dgrid[-1]["melanoma_bias"])
    derm.decision_coef, derm.decision_intercept = dec.coef, melanoma_biased(dec.intercept, mel_bias)
    derm.meta.update({"decision_C": dc, "decision_gamma": gamma, "decision_melanoma_bias": mel_bias, "decision_expert_weights": dec.meta["expert_weights"],
                      "decision_stand_in_offsets": dec.meta["stand_in_offsets"],
                      "decision_grid": dgrid})  # fmt: skip
    if cfg.conformal_groups == "source":
        derm.set_groups = fit_set_groups(fit, parts["isic_eval"] + parts["derm7pt_eval"], cfg)
        derm.meta["set_groups"] = {"by": "source", "names": derm.set_groups.names, "oof_accuracy": derm.set_groups.accuracy,
                                   "calibration_cases": [int((derm.set_groups.calibration_group == k).sum()) for k in range(len(derm.set_groups.names))]}  # fmt: skip
    calibrate(derm, fit, oof, cfg, f"out-of-fold stacker outputs on {len(fit)} dermoscopy cases ({' + '.join(FIT_PART_NAMES[s].format(half=cfg.isic_fit_half) for s in cfg.fit_sources)})", oof_labels,
              cfg.acceptance_sources)
    derm.meta.update({"candidate_recall": 1.0, "cv_grid": grid, "folds": int(fold.max() + 1), "n_fit": len(fit), "oof": top_metrics(y, [{t: 1.0} for t in oof_labels])})

    # Clinical.
    modalities = {"dermoscopy": derm}
    clin_fit = (parts["clin_fit"] if "heldout_even" in cfg.clinical_fit else []) + (parts["clin_train"] if "train" in cfg.clinical_fit else [])
    if "train" in cfg.clinical_fit and not parts["clin_train"]:
        raise ValueError(f"clinical_fit names 'train' but {cfg.experts_file} has no DermNet index photos (python -m training.fusion_data --sources dermnet_train)")
    check_out_of_sample(clin_fit, cfg.clinical_experts, "the clinical stacker")
    if clin_fit:
        cexp = list(cfg.clinical_experts)
        cfold = np.random.default_rng(cfg.seed).permutation(len(clin_fit)) % cfg.folds
        coof = oof_conditional(clin_fit, cexp, cfg.eps, cfold)
        clin = fit_conditional(clin_fit, cexp, cfg.eps)
        what = {"heldout_even": f"held-out DermNet photos ({cfg.dermnet_fit_half} last hash digit)", "train": "DermNet case-index photos (each left out of its own retrieval)"}
        calibrate(clin, clin_fit, coof, cfg, f"out-of-fold stacker outputs on {len(clin_fit)} {' + '.join(what[k] for k in cfg.clinical_fit)}")
        clin.meta["oof"] = top_metrics([r["label"] for r in clin_fit], coof)
        clin.meta["candidate_recall"] = round(float(np.mean([r["label"] in r["candidates"] for r in clin_fit])), 4)
        clin.meta["extra_candidates"] = cfg.clinical_extra_candidates if any(e in cexp for e in CANDIDATE_HEADS) else 0
        modalities["clinical"] = clin

    model = FusionModel(morph, modalities, {"id": cfg.artifact_id})
    # Evaluation parts.
    evals: dict[str, Any] = {}
    case_rows: dict[str, list[dict]] = {}
    isic_eval_half, dermnet_eval_half = other_half(cfg.isic_fit_half, ISIC_HALVES), other_half(cfg.dermnet_fit_half, DERMNET_HALVES)
    for name, recs, mod in ((f"isic2018_val_{isic_eval_half}", parts["isic_eval"], "dermoscopy"), ("derm7pt_val", parts["derm7pt_eval"], "dermoscopy"),
                            (f"dermnet_heldout_{dermnet_eval_half}", parts["clin_eval"], "clinical"),
                            ("dermnet_heldout", parts["clin_fit"] + parts["clin_eval"] if "heldout_even" not in cfg.clinical_fit else [], "clinical")):  # fmt: skip
        if mod not in modalities or not recs:
            continue
        ev = {"after": evaluate(modalities[mod], recs, cfg, case_rows.setdefault(name, [])), "before_first_round": legacy_baseline(recs, mod)}
        ev["experts_alone"] = {e: single_expert(recs, e) for e in (experts if mod == "dermoscopy" else cfg.clinical_experts)}
        if mod == "dermoscopy":
            ablation = {}
            for drop in experts:
                keep = [e for e in experts if e != drop]
                xf, _ = derm_design(fit, keep, cfg.eps)
                sf = stand_in_mask(fit, keep) if cfg.stand_in_offsets else None
                m = fit_multinomial(xf, y, dc, gamma, keep, cfg.eps, cfg.seed, sf)  # the decision model without that expert
                m.intercept = melanoma_biased(m.intercept, mel_bias)
                ablation[f"without_{drop}"] = top_metrics([r["label"] for r in recs], fuse_records(m, recs))
            ev["ablation"] = ablation
        evals[name] = ev

    metrics = {"counts": counts, "morphology_expert": morph_info, "evaluation": evals,
               "dermoscopy": {"C": c, "gamma": gamma, "oof": derm.meta["oof"]}, "wall_s": round(time.time() - t0, 1)}  # fmt: skip
    if cfg.findings_from == "concept-heads":
        model.meta["findings_heads"] = records_heads(fit)  # the agent refuses other morphology.heads with this artifact
    model.meta.update({"findings_from": cfg.findings_from, "fitted_on": {"dermoscopy": derm.calibration_source, "clinical": modalities["clinical"].calibration_source if "clinical" in modalities else None,
                                     "morphology_expert": f"Derm7pt train+extra ({morph_info['n_train']} cases, cross-fitted "
                                                          f"{'second-expert criteria' if cfg.findings_from == 'effnet' else 'concept-head'} findings)"},
                       "licence": "derived from ISIC 2018 (CC BY-NC 4.0), Derm7pt (CC BY-NC-ND 4.0), DermNet NZ images (research use): non-commercial",
                       "summary": {k: {kk: vv for kk, vv in v["after"].items() if kk not in ("risk_coverage",)} for k, v in evals.items()}})  # fmt: skip
    out = model.save(cfg.out_dir / "fusion_stacker.json")
    (cfg.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
    with (cfg.out_dir / "predictions.jsonl").open("w") as f:  # per evaluation case, for pooling folds and paired comparisons
        for part, rows in case_rows.items():
            f.writelines(json.dumps({"part": part, **row}) + "\n" for row in rows)
    summary: dict[str, Any] = {"artifact": str(out), "metrics": str(cfg.out_dir / "metrics.json"), "predictions": str(cfg.out_dir / "predictions.jsonl"),
                               "counts": counts, "wall_s": metrics["wall_s"]}  # fmt: skip
    if cfg.artifact is not None:
        from training.outputs import publish

        headline = {f"{part}/{k}": v for part, ev in evals.items() for k, v in _headline(ev.get("after", {})).items()}
        body = (f"The reasoner's fusion `{cfg.artifact_id}` (`dermgraph train fusion`): findings model, per-modality stacker over "
                f"{', '.join(cfg.dermoscopy_experts)} (dermoscopy) and {', '.join(cfg.clinical_experts)} (clinical), split-conformal scores and the "
                f"SGR-calibrated acceptance model ({', '.join(cfg.acceptance_features)}). Fit counts: {json.dumps(counts)}. Metrics below are on "
                "the evaluation halves it never fitted on. Data licences: non-commercial (ISIC 2018, Derm7pt, DermNet NZ); the full card with "
                "ablations is in models/artifacts/README.md.")  # fmt: skip
        summary["published"] = str(publish(out, cfg.artifact, headline, card=body, title=f"{cfg.artifact_id} ({Path(cfg.artifact).name})", overwrite=cfg.overwrite_artifact))
    _plots(evals, cfg.out_dir)
    print(report_table(metrics, cfg))
    return summary


def report_table(metrics: dict, cfg: Config) -> str:
    lines = ["| set | system | n | accuracy | balanced acc. | mel. sens. | coverage | acc. on accepted | AURC |", "|---|---|---|---|---|---|---|---|---|"]
    for name, ev in metrics["evaluation"].items():
        for sysname, m in (("before (first round)", ev["before_first_round"]), ("after", ev["after"])):
            s = m.get("selective", {})
            lines.append(f"| {name} | {sysname} | {m['n']} | {m.get('accuracy')} | {m.get('balanced_accuracy')} | {m.get('mel_sensitivity', '')} | "
                         f"{s.get('coverage')} | {s.get('accuracy_on_accepted')} | {s.get('aurc')} |")  # fmt: skip
    lines.append("")
    lines.append("| set | α | set coverage | mean size |\n|---|---|---|---|")
    for name, ev in metrics["evaluation"].items():
        for a, v in ev["after"]["prediction_sets"].items():
            lines.append(f"| {name} | {a} | {v['coverage']} | {v['mean_size']} |")
    return "\n".join(lines)


def _plots(evals: dict, out_dir: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional (extra 'eval')
        return
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, ev in evals.items():
        rc = np.array(ev["after"]["risk_coverage"])
        ax.plot(rc[:, 0], 1 - rc[:, 1], label=name)
    ax.axhline(0.85, ls="--", c="grey", lw=0.8)
    ax.set_xlabel("coverage")
    ax.set_ylabel("accuracy of accepted cases")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "risk_coverage.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    from training.cli import module_main

    module_main("fusion", argv)


if __name__ == "__main__":
    main()
