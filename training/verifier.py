"""Train the consistency verifier: P(consistent | observed 7-point findings, stated diagnosis).

Pairs come from Derm7pt. Findings are concept-head probabilities: on ``train``+``extra`` from heads
cross-fitted K-fold (each case described by heads that never saw it; the shipped heads were fitted on
these cases, so their outputs there are optimistic), on ``val`` from the shipped heads (what the agent
sees). Positives: a case's findings with its true diagnosis (Derm7pt → HAM class). Negatives: the same
findings with every other diagnosis (swapped) and another case's findings with this diagnosis
(perturbed). A logistic model (:class:`models.verifier.ConsistencyModel`) is fitted on train pairs
(C by case-grouped CV AUROC), Platt-calibrated on val pairs, and compared on val pairs with the rule
score ``agent.consistency.morphology_agreement`` (AUROC, consistent vs inconsistent).

The summary also re-scores existing agent batch records offline (no model is re-run): selective
prediction when ranking/abstaining as recorded (rule verifier) vs with the trained score.

    dermgraph train verifier --config configs/train/verifier.yaml
    python -m training.verifier --report runs/default/isic_a.jsonl runs/default/isic_b.jsonl --model models/artifacts/consistency_verifier.safetensors
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from agent.config import AgentConfig
from models.vocabulary import HAM_CLASSES, SEVEN_POINT, derm7pt_to_ham
from training.cli import module_main
from training.config import TrainConfig

LICENCE = "CC-BY-NC-ND-4.0 (derived from Derm7pt)"
MORPHOLOGY_PROBLEM = "findings do not match"  # how agent/nodes/verify.py words the morphology check
NEUTRAL = 0.5  # calibrated P when the findings say nothing (equal-weight calibration)


class Config(TrainConfig):
    """Consistency verifier on (findings, diagnosis) pairs from Derm7pt."""

    concept_heads: str = Field(default_factory=lambda: AgentConfig().morphology.heads, description="Registry id of the concept heads that describe val cases (the agent's morphology.heads); "
                               "their per-criterion C is reused for cross-fitting.")  # fmt: skip
    concept_c: float | None = Field(None, gt=0, description="C of the cross-fitted concept heads; None = the shipped heads' per-criterion choice.")
    crossfit_folds: int = Field(5, ge=2, description="K of the K-fold cross-fitted concept heads on the training cases.")
    train_splits: list[str] = Field(["train", "extra"], description="Derm7pt splits the verifier is fitted on.")
    val_split: str = Field("val", description="Derm7pt split the verifier is calibrated and evaluated on.")
    negatives: int | None = Field(None, ge=1, description="Swapped diagnoses per case: None = every other diagnosis, else this many sampled.")
    perturbed_per_case: int = Field(1, ge=0, description="Negatives made of another case's findings (with a different diagnosis) per case.")
    ground_truth_pairs: bool = Field(False, description="Also train on the ground-truth criteria as one-hot findings (augmentation).")
    use_expert: bool = Field(False, description="Add the lesion classifier's probability of the stated diagnosis as a feature (expert agreement).")
    balance_per_label: bool = Field(True, description="Weight pairs so that, per stated diagnosis, consistent and inconsistent pairs count equally "
                                    "(the verifier then judges the findings, not how common the diagnosis is).")  # fmt: skip
    min_positives: int = Field(5, ge=1, description="Diagnoses with fewer training positives get no diagnosis-specific weights (shared features only).")
    c_grid: list[float] = Field([0.03, 0.1, 0.3, 1.0, 3.0, 10.0], min_length=1, description="Inverse L2 strengths tried (3-fold CV by case on train pairs, AUROC with the training weights).")
    max_iter: int = Field(3000, ge=10)
    rule_threshold: float = Field(0.35, ge=0, le=1, description="The rule verifier's min_morphology_agreement; the trained threshold is set to reject "
                                  "the same share of consistent val pairs.")  # fmt: skip
    records: dict[str, list[Path]] = Field(
        default_factory=lambda: {"isic2018_val": [Path("runs/default/isic_a.jsonl"), Path("runs/default/isic_b.jsonl")], "derm7pt_val": [Path("runs/default/derm7pt_val.jsonl")]},
        description="Agent batch records per evaluation set, re-scored offline with the new verifier (missing files are skipped and listed).",
    )
    compare_with: str | None = Field(
        default_factory=lambda: AgentConfig().verifier.consistency_model,
        description="Registry id of a shipped trained verifier, compared too (the rule score always is); default: the agent's verifier.consistency_model.",
    )
    artifact_id: str = Field("consistency-verifier", description="Id stored in the artifact's metadata.")


# ----------------------------------------------------------------------------- data


def _derm7pt(cfg: Config) -> tuple[list[dict[str, str]], dict[str, np.ndarray]]:
    from training.data import aligned, load_features, source_table

    rows, f = aligned(source_table("derm7pt"), load_features("derm7pt", feature_dir=cfg.feature_dir))
    keep = [i for i, r in enumerate(rows) if derm7pt_to_ham(r["diagnosis"]) and r["split"] in (*cfg.train_splits, cfg.val_split)]
    rows = [rows[i] for i in keep]
    for r in rows:
        r["ham"] = derm7pt_to_ham(r["diagnosis"])
    return rows, {k: v[keep] for k, v in f.items()}


def _as_findings(heads, probs: dict[str, np.ndarray], i: int) -> dict[str, dict[str, float]]:
    return {c: {v: float(p) for v, p in zip(heads.heads[c].classes, probs[c][i])} for c in heads.heads}


def crossfit_findings(features: np.ndarray, rows: list[dict[str, str]], cs: dict[str, float], k: int, seed: int) -> list[dict[str, dict[str, float]]]:
    """Out-of-fold concept-head probabilities for every row (heads from training.concepts.fit_heads)."""
    from training.concepts import fit_heads

    rng = np.random.default_rng(seed)
    fold = np.empty(len(rows), int)
    fold[rng.permutation(len(rows))] = np.arange(len(rows)) % k
    out: list[Any] = [None] * len(rows)
    for j in range(k):
        tr, te = fold != j, np.flatnonzero(fold == j)
        if not len(te) or not tr.any():
            continue
        heads = fit_heads(features[tr], {c: np.array([rows[i][c] for i in np.flatnonzero(tr)]) for c in SEVEN_POINT}, cs)
        probs = heads.predict_proba(features[te])
        for n, i in enumerate(te):
            out[i] = _as_findings(heads, probs, n)
    return out


def one_hot_findings(row: dict[str, str]) -> dict[str, dict[str, float]]:
    return {c: {v: float(row[c] == v) for v in vals} for c, vals in SEVEN_POINT.items()}


def make_pairs(findings: list[dict], truth: list[str], labels: list[str], rng: np.random.Generator, negatives: int | None = None,
               perturbed: int = 1, expert: list[dict[str, float]] | None = None) -> list[tuple[dict, str, int, int, float | None]]:  # fmt: skip
    """(findings, stated label, consistent 0/1, case index, expert prob) pairs: each case's true label,
    swapped labels (all others or ``negatives`` sampled) and ``perturbed`` other cases' findings with this
    case's label (taken from cases with a different diagnosis). Deterministic given ``rng``'s state."""
    pairs = []
    by_label = {lab: [i for i, t in enumerate(truth) if t != lab] for lab in labels}
    for i, (f, t) in enumerate(zip(findings, truth)):
        ex = expert[i] if expert is not None else {}
        if t not in labels:
            continue
        pairs.append((f, t, 1, i, ex.get(t)))
        others = [lab for lab in labels if lab != t]
        if negatives is not None and negatives < len(others):
            others = [others[j] for j in sorted(rng.choice(len(others), negatives, replace=False))]
        pairs += [(f, lab, 0, i, ex.get(lab)) for lab in others]
        pool = by_label[t]
        for j in (rng.choice(pool, min(perturbed, len(pool)), replace=False) if pool and perturbed else []):
            pairs.append((findings[j], t, 0, i, (expert[j] if expert is not None else {}).get(t)))
    return pairs


# ----------------------------------------------------------------------------- fit


def _auroc(y: np.ndarray, s: np.ndarray, weight: np.ndarray | None = None) -> float | None:
    from sklearn.metrics import roc_auc_score

    return round(float(roc_auc_score(y, s, sample_weight=weight)), 4) if len(set(y.tolist())) == 2 else None


def _balanced_weights(y: np.ndarray) -> np.ndarray:
    """Equal total weight for consistent and inconsistent pairs."""
    w = np.ones(len(y))
    for v in (0, 1):
        if (y == v).any():
            w[y == v] = len(y) / (2 * (y == v).sum())
    return w


def per_label_weights(y: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Within each stated label, the inconsistent pairs weigh as much as the consistent ones (each of
    which weighs 1). Without this, how often a label is the true one (nv: 40% of cases, vasc: 2%) is
    enough to separate pairs, and the verifier would learn the diagnosis prior the classifier already gives."""
    w = np.ones(len(y))
    for lab in set(labels.tolist()):
        pos, neg = (labels == lab) & (y == 1), (labels == lab) & (y == 0)
        if pos.any() and neg.any():
            w[neg] = pos.sum() / neg.sum()
    return w * len(y) / w.sum()


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float, max_iter: int = 3000, weight: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=max_iter).fit(x, y, sample_weight=_balanced_weights(y) if weight is None else weight)
    return clf.coef_[0].astype(np.float32), float(clf.intercept_[0])


def fit_platt(logit: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Platt scaling of a 1-d logit, consistent and inconsistent pairs weighted equally (prior 0.5)."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=1e4, max_iter=1000).fit(logit[:, None], y, sample_weight=_balanced_weights(y))
    return float(clf.coef_[0, 0]), float(clf.intercept_[0])


def train(cfg: Config) -> dict:
    """Cross-fit findings, build pairs, fit + select C, calibrate on val, compare with the rules, save."""
    from agent.consistency import morphology_agreement
    from models.heads import HeadSet
    from models.verifier import ConsistencyModel
    from retrieval.kb import KnowledgeBase
    from training.outputs import MetricsLog, publish, shipped_path, table, write_registry_fragment

    log = MetricsLog(cfg.out_dir)
    rng = np.random.default_rng(cfg.seed)
    kb = KnowledgeBase()
    expected = {c: {k: list(v) for k, v in e.expected_7pt.items()} for c in HAM_CLASSES if (e := kb.entry_for_label(c)) is not None and e.expected_7pt}
    rows, f = _derm7pt(cfg)
    split = np.array([r["split"] for r in rows])
    tr, va = np.flatnonzero(np.isin(split, cfg.train_splits)), np.flatnonzero(split == cfg.val_split)
    if not len(tr) or not len(va):
        raise ValueError(f"need Derm7pt rows in {cfg.train_splits} and {cfg.val_split!r}")

    heads_path = shipped_path(cfg.concept_heads)
    if heads_path is None:
        raise ValueError(f"concept heads {cfg.concept_heads!r} are not registered")
    shipped_heads = HeadSet.load(heads_path)
    shipped_c = (shipped_heads.meta.get("metrics") or {}).get("C") or {}
    cs = {c: cfg.concept_c or float(shipped_c.get(c, 0.003)) for c in SEVEN_POINT}
    train_rows = [rows[i] for i in tr]
    tr_findings = crossfit_findings(f["features"][tr], train_rows, cs, cfg.crossfit_folds, cfg.seed)
    va_probs = shipped_heads.predict_proba(f["features"][va])
    va_findings = [_as_findings(shipped_heads, va_probs, n) for n in range(len(va))]
    expert_of = lambda idx: [dict(zip(HAM_CLASSES, f["probs"][i].tolist())) for i in idx] if cfg.use_expert else None  # noqa: E731

    truth_tr = [r["ham"] for r in train_rows]
    pos_counts = {lab: truth_tr.count(lab) for lab in expected}
    labels = [lab for lab in expected if pos_counts[lab] > 0]  # no positives: nothing to learn, scored by shared features only
    diagnoses = [lab for lab in labels if pos_counts[lab] >= cfg.min_positives]
    model = ConsistencyModel(sorted(expected), diagnoses, expected, np.zeros(0, np.float32), 0.0, use_expert=cfg.use_expert,
                             meta={"id": cfg.artifact_id})  # fmt: skip
    pairs_tr = make_pairs(tr_findings, truth_tr, labels, rng, cfg.negatives, cfg.perturbed_per_case, expert_of(tr))
    if cfg.ground_truth_pairs:
        gt = make_pairs([one_hot_findings(r) for r in train_rows], truth_tr, labels, rng, cfg.negatives, cfg.perturbed_per_case, expert_of(tr))
        pairs_tr += gt  # same case index: a case's ground-truth pairs share its CV group
    truth_va = [rows[i]["ham"] for i in va]
    pairs_va = make_pairs(va_findings, truth_va, [lab for lab in sorted(expected)], rng, cfg.negatives, cfg.perturbed_per_case, expert_of(va))

    def design(pairs):
        x = np.stack([model.features(p[0], p[1], p[4]) for p in pairs])
        return x, np.array([p[2] for p in pairs]), np.array([p[3] % len(train_rows) for p in pairs]), np.array([p[1] for p in pairs])

    x_tr, y_tr, g_tr, l_tr = design(pairs_tr)
    x_va, y_va, _, l_va = design(pairs_va)
    w_tr = per_label_weights(y_tr, l_tr) if cfg.balance_per_label else _balanced_weights(y_tr)
    log.log(event="pairs", n_train=len(y_tr), n_train_consistent=int(y_tr.sum()), n_val=len(y_va), n_val_consistent=int(y_va.sum()), diagnoses=diagnoses)

    # C by 3-fold CV grouped by case (a case's pairs never straddle folds).
    folds = np.asarray(g_tr) % 3
    best = None
    for c in cfg.c_grid:
        s = np.zeros(len(y_tr))
        for j in range(3):
            trn, tst = folds != j, folds == j
            if len(set(y_tr[trn].tolist())) < 2 or not tst.any():
                continue
            w, b = fit_logistic(x_tr[trn], y_tr[trn], c, cfg.max_iter, w_tr[trn])
            s[tst] = x_tr[tst] @ w + b
        auc = _auroc(y_tr, s, w_tr)
        w, b = fit_logistic(x_tr, y_tr, c, cfg.max_iter, w_tr)
        logit = x_tr @ w + b
        loss = float(np.average(np.logaddexp(0, -logit * (2 * y_tr - 1)), weights=w_tr))
        log.log(C=c, cv_auroc=auc, train_loss=round(loss, 5))
        if best is None or (auc or 0) > (best[0] or 0):
            best = (auc, c, w, b)
    cv_auc, c_best, model.weight, model.bias = best

    logit_va = model.logit(x_va)
    model.platt = fit_platt(logit_va, y_va) if len(set(y_va.tolist())) == 2 else (1.0, 0.0)
    p_va = model.calibrate(logit_va)
    rule_va = np.array([morphology_agreement(p[0], expected[p[1]]) or 0.0 for p in pairs_va])
    # Operating point: reject the same share of consistent val pairs as the rule threshold does.
    rule_reject = float(np.mean(rule_va[y_va == 1] < cfg.rule_threshold)) if (y_va == 1).any() else 0.0
    model.threshold = round(float(np.quantile(p_va[y_va == 1], rule_reject)), 4) if rule_reject > 0 else 0.0
    swapped = np.array([p[0] is va_findings[p[3]] for p in pairs_va])

    pert = (y_va == 1) | ~swapped
    w_lab = per_label_weights(y_va, l_va)

    def aurocs(s):
        return {"all": _auroc(y_va, s), "all_per_label_balanced": _auroc(y_va, s, w_lab), "swapped_only": _auroc(y_va[swapped], s[swapped]),
                "perturbed_only": _auroc(y_va[pert], s[pert])}  # fmt: skip

    # How far the stated diagnosis alone goes: its rate of being the true one among train pairs.
    prior = {lab: float(y_tr[l_tr == lab].mean()) if (l_tr == lab).any() else 0.0 for lab in set(l_va.tolist())}
    prior_va = np.array([prior[lab] for lab in l_va])

    from evals.metrics import expected_calibration_error

    w_va = _balanced_weights(y_va)
    metrics = {
        "val_auroc": {"rule_morphology_agreement": aurocs(rule_va), "diagnosis_prior_only": aurocs(prior_va), "trained": aurocs(p_va)},
        "val_brier_balanced": round(float(np.average((p_va - y_va) ** 2, weights=w_va)), 4),
        "val_ece_unweighted": round(expected_calibration_error(p_va, y_va.astype(bool)), 4),
        "threshold": model.threshold,
        "rule_threshold": cfg.rule_threshold,
        "val_consistent_rejected": {"rule": round(rule_reject, 4), "trained": round(float(np.mean(p_va[y_va == 1] < model.threshold)), 4)},
        "val_inconsistent_rejected": {"rule": round(float(np.mean(rule_va[y_va == 0] < cfg.rule_threshold)), 4), "trained": round(float(np.mean(p_va[y_va == 0] < model.threshold)), 4)},
        "cv_auroc_train": cv_auc,
        "C": c_best,
        "platt": [round(v, 5) for v in model.platt],
        "n_pairs": {"train": len(y_tr), "val": len(y_va), "val_consistent": int(y_va.sum())},
        "n_cases": {"train": len(tr), "val": len(va)},
        "diagnoses_specific": diagnoses,
        "concept_c": cs,
    }
    model.meta = {"id": cfg.artifact_id, "metrics": metrics, "trained_on": f"Derm7pt {'+'.join(cfg.train_splits)} pairs (cross-fitted findings), calibrated on {cfg.val_split} (CC BY-NC-ND 4.0)"}
    weights = cfg.out_dir / "consistency_verifier.safetensors"
    model.save(weights)
    (cfg.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.log(event="final", val_auroc_rule=metrics["val_auroc"]["rule_morphology_agreement"]["all"], val_auroc_trained=metrics["val_auroc"]["trained"]["all"])

    shipped = None
    old = shipped_path(cfg.compare_with)
    if old is not None:
        try:
            om = ConsistencyModel.load(old)
            shipped = aurocs(np.array([om.score(p[0], p[1], p[4]) if p[1] in om.expected else NEUTRAL for p in pairs_va], float))
        except ValueError as exc:  # a shipped model for another vocabulary: report, do not fail
            log.log(event="shipped_unusable", error=str(exc))
    va_auc = metrics["val_auroc"]
    rows_t = [[k, va_auc["rule_morphology_agreement"][k], va_auc["diagnosis_prior_only"][k], shipped[k] if shipped else None, va_auc["trained"][k]]
              for k in ("all", "all_per_label_balanced", "swapped_only", "perturbed_only")]  # fmt: skip
    tbl = table(["val pairs", "rule morphology_agreement (before)", "diagnosis prior only", shipped_header(cfg.compare_with), "new verifier (after)"], rows_t)
    tbl = f"Consistency verifier on Derm7pt {cfg.val_split} pairs (n={len(y_va)}, {int(y_va.sum())} consistent), AUROC:\n{tbl}"
    print(tbl, flush=True)

    agent_level = report_records(model, cfg.records)
    if agent_level.get("table"):
        print(agent_level["table"], flush=True)
    published = publish(weights, cfg.artifact, metrics, overwrite=cfg.overwrite_artifact)
    reg = write_registry_fragment(cfg.out_dir, cfg.register_as, weights, role="head", licence=LICENCE,
                                  notes="Trained consistency verifier: P(consistent | 7-point findings, diagnosis), logistic + Platt on Derm7pt pairs.")  # fmt: skip
    return {
        "metrics": metrics,
        "before_after": {"rule": metrics["val_auroc"]["rule_morphology_agreement"], "shipped": shipped, "new": metrics["val_auroc"]["trained"], "table": tbl},
        "agent_level": agent_level,
        "weights": str(weights),
        "artifact": str(published) if published else None,
        "registry": str(reg) if reg else None,
    }


def shipped_header(compare_with: str | None) -> str:
    """The before/after table's column for the shipped verifier (``compare_with: null`` compares none)."""
    return f"shipped {compare_with}" if compare_with else "no shipped model to compare"


# ----------------------------------------------------------------------------- offline re-scoring of agent records


def _other_problems(reasons: list[str]) -> list[str]:
    from agent.nodes.verify import REFER

    return [r for r in reasons if r != REFER and r != "revision rounds exhausted" and MORPHOLOGY_PROBLEM not in r]


def selective_metrics(score: np.ndarray, correct: np.ndarray, accepted: np.ndarray, baseline: np.ndarray | None = None) -> dict[str, float | None]:
    """AURC and accuracy at 80% coverage ranking by ``score``; abstention and accuracy on accepted; with
    ``baseline`` scores, also the accuracy the baseline ranking reaches at the same coverage (is the
    extra abstention better than abstaining on low confidence?)."""
    from evals.metrics import accuracy_at_coverage, risk_coverage

    _, _, aurc = risk_coverage(score, correct)
    out = {
        "aurc": round(aurc, 4),
        "accuracy_at_80pct_coverage": round(accuracy_at_coverage(score, correct, 0.8), 4),
        "abstention_rate": round(float(1 - accepted.mean()), 4),
        "accuracy_on_accepted": round(float(correct[accepted].mean()), 4) if accepted.any() else None,
    }
    if baseline is not None and accepted.any():
        out["baseline_accuracy_at_same_coverage"] = round(accuracy_at_coverage(baseline, correct, float(accepted.mean())), 4)
    return out


def rescore(records: list[dict], model, threshold: float | None = None) -> dict[str, dict]:
    """Selective prediction on batch records with the recorded (rule) verifier vs the trained score.

    * ``rules (as recorded)``: ranked by the recorded confidence, accepted as recorded;
    * ``confidence x rule agreement``: the rule score used for ranking too;
    * ``confidence x P(consistent)``: ranked by confidence times the trained score; accepted when the
      recorded verdict had no problem besides the morphology check and P(consistent) >= threshold;
    * ``Bayes odds``: confidence odds times the verifier's likelihood ratio P/(1-P) (same acceptance).
    Cases without findings, or whose label the model cannot score, keep the neutral P=0.5. A revision
    round the trained verifier would have triggered (or skipped) cannot be replayed from records.
    """
    thr = model.threshold if threshold is None else threshold
    ok = [r for r in records if r.get("status") == "ok" and r.get("truth")]
    if not ok:
        return {}
    conf, correct, acc_rec, acc_new, p, agree, n_scored = [], [], [], [], [], [], 0
    for r in ok:
        d = r["diagnosis"]
        conf.append(float(d["confidence"]))
        correct.append(d["label"] is not None and d["label"] == r["truth"])
        acc_rec.append(d["verdict"] == "accept")
        observed = {fi["criterion"]: fi["probs"] for fi in d.get("findings") or [] if fi.get("probs")}
        expert = None
        if getattr(model, "use_expert", False):
            enc = next((t for t in d["trace"] if t["node"] == "encode"), {}).get("outputs", {}).get("encoding", {})
            expert = (enc.get("classifier_probs") or {}).get(d["label"])
        s = model.score(observed, d["label"], expert) if d["label"] else None
        n_scored += s is not None
        p.append(NEUTRAL if s is None else s)
        agree.append(1.0 if d.get("morphology_agreement") is None else float(d["morphology_agreement"]))
        if s is None:
            acc_new.append(d["verdict"] == "accept")
        else:
            # An accepted record's reasons are a summary, an abstained one's are its problems.
            others_ok = d["verdict"] == "accept" or not _other_problems(d.get("reasons") or [])
            acc_new.append(others_ok and s >= thr)
    conf, correct, p, agree = np.array(conf), np.array(correct), np.array(p), np.array(agree)
    acc_rec, acc_new = np.array(acc_rec), np.array(acc_new)
    odds = conf / np.clip(1 - conf, 1e-6, None) * p / np.clip(1 - p, 1e-6, None)
    return {
        "n": len(ok),
        "n_scored_by_model": n_scored,
        "rules (as recorded)": selective_metrics(conf, correct, acc_rec),
        "confidence x rule agreement": selective_metrics(conf * agree, correct, acc_rec),
        "confidence x P(consistent)": selective_metrics(conf * p, correct, acc_new, conf),
        "Bayes odds x LR(consistent)": selective_metrics(odds / (1 + odds), correct, acc_new, conf),
    }


def beats_rules(res: dict) -> bool:
    """The switch criterion: with the trained score (confidence x P), AURC is lower than the recorded
    rules' and than confidence x rule agreement, and the accepted cases are more accurate than the
    recorded confidence ranking achieves at the same coverage."""
    t, rules, rule_x = res["confidence x P(consistent)"], res["rules (as recorded)"], res["confidence x rule agreement"]
    same_cov = t.get("baseline_accuracy_at_same_coverage")
    return bool(t["aurc"] < rules["aurc"] and t["aurc"] < rule_x["aurc"] and t["accuracy_on_accepted"] is not None
                and same_cov is not None and t["accuracy_on_accepted"] > same_cov)  # fmt: skip


def report_records(model, sets: dict[str, list[Path]], threshold: float | None = None) -> dict[str, Any]:
    """:func:`rescore` per evaluation set (files that do not exist are listed as missing) and a table."""
    from agent.batch import iter_records
    from training.outputs import table

    out: dict[str, Any] = {"sets": {}, "missing": []}
    rows = []
    for name, files in sets.items():
        recs = []
        for path in files:
            if Path(path).exists():
                recs += list(iter_records(path))
            else:
                out["missing"].append(str(path))
        res = rescore(recs, model, threshold)
        if not res:
            continue
        out["sets"][name] = res
        for method in ("rules (as recorded)", "confidence x rule agreement", "confidence x P(consistent)", "Bayes odds x LR(consistent)"):
            m = res[method]
            rows.append([f"{name} (n={res['n']})", method, m["aurc"], m["accuracy_at_80pct_coverage"], m["abstention_rate"], m["accuracy_on_accepted"],
                         m.get("baseline_accuracy_at_same_coverage")])  # fmt: skip
    if rows:
        out["table"] = "Agent records re-scored offline (lower AURC is better):\n" + table(
            ["set", "ranking / abstention", "AURC", "acc@80% cov.", "abstention", "acc. on accepted", "confidence ranking at that coverage"], rows)
        out["trained_beats_rules"] = {n: beats_rules(s) for n, s in out["sets"].items()}
    return out


def _report_main(argv: list[str]) -> None:
    """``python -m training.verifier --report FILE... --model PATH|ID [--set-name NAME] [--threshold T]``."""
    import argparse

    from models.resolve import resolve_artifact
    from models.verifier import ConsistencyModel

    p = argparse.ArgumentParser(prog="python -m training.verifier --report")
    p.add_argument("--report", nargs="+", type=Path, required=True, help="Batch results JSONL files (pooled into one set).")
    p.add_argument("--model", default="consistency-verifier", help="Registry id or path of the trained verifier.")
    p.add_argument("--name", default="records")
    p.add_argument("--threshold", type=float, default=None)
    a = p.parse_args(argv)
    res = report_records(ConsistencyModel.load(resolve_artifact(a.model)), {a.name: a.report}, a.threshold)
    print(res.get("table", "no scorable records"))
    print(json.dumps({k: v for k, v in res.items() if k != "table"}, indent=2))


if __name__ == "__main__":
    if "--report" in sys.argv[1:]:
        _report_main(sys.argv[1:])
    else:
        module_main("verifier")
