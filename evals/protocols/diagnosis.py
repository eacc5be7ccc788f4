"""Protocol 1 (agent diagnosis) with ablations, abstention/selective prediction, calibration and fairness.

Every case runs ``Agent.diagnose`` once (cached; ``dermgraph batch`` records can be imported). The
ablations are read from the same record's append-only trace, so they cost nothing:

- classifier alone: argmax of the ``encode`` node's ``classifier_probs``;
- retrieved cases (kNN) alone: argmax of the first ``retrieve`` node's ``knn_probs``;
- LLM reasoner alone: argmax of the first ``reason`` node's ``llm_probs`` (none when it fell back);
- full agent: the final label (given even when the verdict is 'abstain').

Options (benchmark ``options`` or ``--opt``): ``n_bootstrap`` (1000), ``seed`` (0), ``coverages``
([0.5, 0.8, 0.9, 1.0]), ``set_alphas`` ([0.05, 0.1, 0.2]), ``calibration_bins`` (10), ``selective_score`` ('acceptance'),
``age_bins`` ([40, 60]), ``group_bins``, ``min_group_size`` (10), ``allow_partial`` (false), ``top_k`` ([1, 3, 5]: the
differential's top-k accuracy).
"""

from __future__ import annotations

import csv
from typing import Any

import numpy as np

from evals.base import Predictions, ProtocolContext, ProtocolResult
from evals.cache import AGENT
from evals.classification import fmt, headline_names, score
from evals.metrics import accuracy_at_coverage, bootstrap_ci, expected_calibration_error, reliability_bins, risk_coverage

SYSTEMS = {"classifier": "classifier alone", "knn": "retrieved cases (kNN) alone", "morphology": "findings model alone",
           "effnet": "second visual expert alone", "probe": "clinical feature probe alone", "llm": "LLM reasoner alone", "agent": "full agent"}
NO_ANSWER = "none"
"""Prediction of a system that gave no answer for a case (counts as wrong)."""
DEFAULT_COVERAGES = (0.5, 0.8, 0.9, 1.0)
DEFAULT_SET_ALPHAS = (0.05, 0.1, 0.2)
DEFAULT_TOP_K = (1, 3, 5)


def sets_by_alpha(ctx: ProtocolContext, with_set: list, alphas: list[float], canon, n_boot: int, seed: int) -> dict[str, Any]:
    """Coverage and mean size of each case's split-conformal set at every α in ``alphas``: the sets are rebuilt
    from the recorded fused probabilities with the fusion artifact's calibration scores (no model runs), so one run
    at the configured α gives the whole table. Empty without an agent configuration or a loadable artifact."""
    if ctx.agent_config is None or not alphas:
        return {}
    from models.integrity import artifact_sha256
    from models.resolve import resolve_artifact
    from models.stacker import FusionModel

    ref = ctx.agent_config.reasoner.fusion
    try:
        path = resolve_artifact(ref)
        fusion, sha = FusionModel.load(path), artifact_sha256(path)
    except (ValueError, OSError, KeyError) as exc:
        ctx.log(f"[eval] prediction sets per alpha skipped: {exc}")
        return {}
    made_by = {((d.get("versions") or {}).get("sha256") or {}).get("fusion") for d, _ in with_set}
    if made_by != {sha}:
        ctx.log(f"[eval] prediction sets per alpha skipped: the records were not made with {ref!r} (sha256 {sha[:12]}…)")
        return {}

    def rebuilt(d, alpha):
        mf = fusion.modalities.get((d.get("modality") or {}).get("label"))
        if mf is None:
            return None
        names = mf.set_groups.names if mf.set_groups is not None else []
        group = names.index(d["prediction_set_group"]) if d.get("prediction_set_group") in names else None
        return mf.prediction_set({x["label"]: x["probability"] for x in d.get("differential", [])}, alpha, group)

    # The artifact must be the one that made the records: each rebuilt set at the record's own α is its recorded set.
    if any(rebuilt(d, d["prediction_set_alpha"]) != d["prediction_set"] for d, _ in with_set):
        ctx.log(f"[eval] prediction sets per alpha skipped: {ref!r} does not rebuild the recorded sets")
        return {}
    out: dict[str, Any] = {}
    for alpha in alphas:
        hits, sizes = [], []
        for d, t in with_set:
            members = rebuilt(d, alpha)
            if members is None:
                continue
            hits.append(canon(t) in {canon(c) for c in members} or t in members)
            sizes.append(len(members))
        if not hits:
            continue
        h = np.array(hits)
        entry = {"n": len(h), "coverage": round(float(h.mean()), 4), "target": round(1 - alpha, 4), "mean_size": round(float(np.mean(sizes)), 3)}
        if n_boot and len(h) > 1:
            entry["coverage_ci95"] = [round(v, 4) for v in bootstrap_ci(lambda x: x.mean(), h, n=n_boot, seed=seed)]
        out[f"{alpha:g}"] = entry
    return out


def trace_node(diagnosis: dict[str, Any], name: str) -> dict[str, Any]:
    """The first trace entry of node ``name`` (empty when the node did not run)."""
    return next((t for t in diagnosis.get("trace", []) if t.get("node") == name), {})


def _top(probs: dict[str, float] | None) -> tuple[str | None, float | None]:
    if not probs:
        return None, None
    label = max(probs, key=probs.get)
    total = sum(probs.values())
    return label, float(probs[label] / total) if total > 0 else None


def differential_top_k(y: list[str], ranked: list[list[str | None]], ks: list[int], n_boot: int, seed: int) -> dict[str, dict[str, Any]]:
    """Share of cases whose true label is among the first k of the agent's differential (its label first), per k,
    with a percentile-bootstrap 95 % CI: DermNet's 56 labels are judged at top-5 as well as top-1."""
    out = {}
    for k in ks:
        hit = np.array([t in r[:k] for t, r in zip(y, ranked)], float)
        out[str(k)] = {"accuracy": round(float(hit.mean()), 4), "ci95": [round(v, 4) for v in bootstrap_ci(lambda h: h.mean(), hit, n=n_boot, seed=seed)]}
    return out


def system_predictions(diagnosis: dict[str, Any]) -> dict[str, tuple[str | None, float | None]]:
    """``{system: (label, probability of that label)}`` for the ablations and the full agent, from one
    Diagnosis JSON (None where the system gave no answer, e.g. no LLM distribution after a fallback)."""
    enc = trace_node(diagnosis, "encode").get("outputs", {}).get("encoding") or {}
    ret = trace_node(diagnosis, "retrieve").get("outputs", {}).get("retrieval") or {}
    rea = trace_node(diagnosis, "reason").get("outputs", {}).get("reasoning") or {}
    diff = diagnosis.get("differential") or []
    agent_p = diff[0]["probability"] if diff else diagnosis.get("confidence")
    return {
        "classifier": _top(enc.get("classifier_probs")),
        "knn": _top(ret.get("knn_probs")),
        "morphology": _top((rea.get("expert_probs") or {}).get("morphology")),
        "effnet": _top((rea.get("expert_probs") or {}).get("effnet")),
        "probe": _top((rea.get("expert_probs") or {}).get("probe")),
        "llm": _top(rea.get("llm_probs")),
        "agent": (diagnosis.get("label"), agent_p if diagnosis.get("label") else None),
    }


def grounding(diagnosis: dict[str, Any], kb) -> dict[str, Any]:
    """Whether every reasoning step cites ids that exist in the case, and the claim check of the rationale."""
    from agent.claims import check_text

    ids = {e["id"] for e in diagnosis.get("evidence") or []}
    ids |= {f"finding:{f['criterion']}" for f in diagnosis.get("findings") or []}
    rea = trace_node(diagnosis, "reason").get("outputs", {}).get("reasoning") or {}
    ids |= {f"expert:{e}" for e in {*(rea.get("expert_probs") or {}), *(rea.get("contributions") or {})}}  # the experts this case had
    steps = diagnosis.get("reasoning_steps") or []
    missing = sorted({e for st in steps for e in st.get("evidence", []) if e not in ids})
    observed = {f["criterion"]: f.get("probs") or {f["value"]: f["confidence"]} for f in diagnosis.get("findings") or []}
    check = check_text(diagnosis.get("rationale") or "", candidates=[d["label"] for d in diagnosis.get("differential") or []], observed=observed, kb=kb, evidence_ids=ids)
    return {"citations_exist": not missing, "missing_citations": missing, "claims": len(check.claims), "unsupported": check.reasons()}


def selective_scores(diagnosis: dict[str, Any]) -> dict[str, float]:
    """Scores for selective prediction from the verifier's verdict: its acceptance score (the estimated
    probability that the label is right; the confidence where there is none), its confidence (the top
    label's probability), confidence x self-consistency, and accepted-before-abstained (then confidence)."""
    conf = float(diagnosis.get("confidence") or 0.0)
    cons = diagnosis.get("self_consistency")
    acc = diagnosis.get("acceptance_score")
    return {
        "acceptance": float(acc) if acc is not None else conf,
        "confidence": conf,
        "confidence_x_consistency": conf * (1.0 if cons is None else float(cons)),
        "verdict_then_confidence": conf + (1.0 if diagnosis.get("verdict") == "accept" else 0.0),
    }


def run(ctx: ProtocolContext) -> ProtocolResult:
    return score_predictions(ctx, predict(ctx))


def predict(ctx: ProtocolContext) -> Predictions:
    """The agent's record of every case (cached, or computed now unless ``ctx.rescore``)."""
    from evals.predictions import ensure_predictions

    return Predictions(*ensure_predictions(ctx, AGENT))


def score_predictions(ctx: ProtocolContext, predictions: Predictions) -> ProtocolResult:
    """Every figure of the report from the agent's records alone (no model runs)."""
    from evals.benchmark import canonical_label

    opts = ctx.options
    n_boot, seed = int(opts.get("n_bootstrap", 1000)), int(opts.get("seed", 0))
    records, pstats = predictions.records, predictions.stats
    canon = canonical_label(ctx.bench)
    pairs = [(c, r) for c, r in zip(ctx.cases, records) if r is not None and c.label is not None]
    ok = [(c, r) for c, r in pairs if r.get("status") == "ok"]
    errors = [(c, r) for c, r in pairs if r.get("status") != "ok"]
    notes: list[str] = []
    missing = sum(r is None for r in records)
    if missing:
        notes.append(f"PARTIAL: {missing} of {len(ctx.cases)} cases have no cached prediction and are not scored (allow_partial).")
    if errors:
        notes.append(f"{len(errors)} cases failed (error records, not scored): " + "; ".join(f"{c.id}: {r['error']['message'][:120]}" for c, r in errors[:3]))
    if not ok:
        raise ValueError(f"benchmark {ctx.bench.name!r}: no case with a label and a successful prediction to score")

    cases = [c for c, _ in ok]
    diags = [r["diagnosis"] for _, r in ok]
    y = [c.label for c in cases]
    labels = list(ctx.bench.labels) or sorted(set(y))
    positive = ctx.bench.positive if ctx.bench.positive in labels else None
    names = headline_names(positive, ctx.bench.metrics)
    preds = [system_predictions(d) for d in diags]

    systems: dict[str, Any] = {}
    for s in [s for s in SYSTEMS if s == "agent" or any(x[s][0] is not None for x in preds)]:
        p = [canon(x[s][0]) or NO_ANSWER for x in preds]
        res = score(y, p, labels, names, positive, n_boot, seed)
        res["n_no_answer"] = sum(x[s][0] is None for x in preds)
        conf = np.array([x[s][1] or 0.0 for x in preds])
        res["ece"] = round(expected_calibration_error(conf, np.array(p) == np.array(y), int(opts.get("calibration_bins", 10))), 4)
        res["predictions"] = p
        systems[s] = res
    agent_pred = np.array(systems["agent"]["predictions"])
    correct = agent_pred == np.array(y)
    top_k = differential_top_k(y, [[canon(it.get("label")) for it in d.get("differential") or []] for d in diags],
                               [int(k) for k in opts.get("top_k", DEFAULT_TOP_K)], n_boot, seed)  # fmt: skip

    # Abstention and selective prediction (verifier's scores).
    accepted = np.array([d.get("verdict") == "accept" for d in diags])
    abst: dict[str, Any] = {
        "abstention_rate": round(float(1 - accepted.mean()), 4),
        "accuracy_on_accepted": round(float(correct[accepted].mean()), 4) if accepted.any() else None,
        "accuracy_on_abstained": round(float(correct[~accepted].mean()), 4) if (~accepted).any() else None,
    }
    if accepted.sum() > 1 and n_boot:
        lo, hi = bootstrap_ci(lambda k, a: k[a].mean() if a.any() else np.nan, correct, accepted, n=n_boot, seed=seed)
        abst["accuracy_on_accepted_ci95"] = [round(lo, 4), round(hi, 4)]
    coverages = [float(c) for c in opts.get("coverages", DEFAULT_COVERAGES)]
    all_scores = {k: np.array([selective_scores(d)[k] for d in diags]) for k in ("acceptance", "confidence", "confidence_x_consistency", "verdict_then_confidence")}
    main_score = str(opts.get("selective_score", "acceptance"))
    if main_score not in all_scores:
        raise ValueError(f"selective_score {main_score!r}; valid: {', '.join(all_scores)}")
    selective: dict[str, Any] = {"score": main_score, "by_score": {}}
    curves = {}
    for name, sc in all_scores.items():
        cov, risk, aurc = risk_coverage(sc, correct)
        entry: dict[str, Any] = {"aurc": {"value": round(aurc, 4)}, "accuracy_at_coverage": {}}
        boot = n_boot if name == main_score else 0
        if boot and len(y) > 1:
            entry["aurc"]["ci95"] = [round(v, 4) for v in bootstrap_ci(lambda s_, k_: risk_coverage(s_, k_)[2], sc, correct, n=boot, seed=seed)]
        for c in coverages:
            m = {"value": round(accuracy_at_coverage(sc, correct, c), 4)}
            if boot and len(y) > 1:
                m["ci95"] = [round(v, 4) for v in bootstrap_ci(lambda s_, k_, c=c: accuracy_at_coverage(s_, k_, c), sc, correct, n=boot, seed=seed)]
            entry["accuracy_at_coverage"][f"{c:g}"] = m
        selective["by_score"][name] = entry
        step = max(1, len(cov) // 200)
        curves[name] = (cov[::step].tolist() + [float(cov[-1])], risk[::step].tolist() + [float(risk[-1])], aurc)
    selective.update(selective["by_score"][main_score])

    # Prediction sets (split-conformal) and grounding of the reasoning.
    with_set = [(d, t) for d, t in zip(diags, y) if d.get("prediction_set") and d.get("prediction_set_alpha") is not None]
    sets: dict[str, Any] = {"n_with_calibrated_set": len(with_set), "n": len(diags)}
    if with_set:
        alphas = sorted({d["prediction_set_alpha"] for d, _ in with_set})
        hit = np.array([canon(t) in {canon(c) for c in d["prediction_set"]} or t in d["prediction_set"] for d, t in with_set])
        sets.update({"alpha": alphas, "coverage": round(float(hit.mean()), 4), "mean_size": round(float(np.mean([len(d["prediction_set"]) for d, _ in with_set])), 3)})
        if n_boot and len(hit) > 1:
            sets["coverage_ci95"] = [round(v, 4) for v in bootstrap_ci(lambda h: h.mean(), hit, n=n_boot, seed=seed)]
        sets["by_alpha"] = sets_by_alpha(ctx, with_set, [float(a) for a in opts.get("set_alphas", DEFAULT_SET_ALPHAS)], canon, n_boot, seed)
    from retrieval.kb import KnowledgeBase

    kb = KnowledgeBase()
    g = [grounding(d, kb) for d in diags if d.get("reasoning_steps")]
    ground = {"n": len(g), "citations_exist": int(sum(x["citations_exist"] for x in g)), "claims_checked": int(sum(x["claims"] for x in g)),
              "unsupported_claims": int(sum(len(x["unsupported"]) for x in g)), "examples": [u for x in g for u in x["unsupported"]][:5],
              "llm_summaries_shown": int(sum(bool((d.get("summary_check") or {}).get("passed")) for d in diags)),
              "llm_summaries_withheld": int(sum((d.get("summary_check") or {}).get("passed") is False for d in diags))}  # fmt: skip

    conf_top = np.array([x["agent"][1] or 0.0 for x in preds])
    bins = reliability_bins(conf_top, correct, int(opts.get("calibration_bins", 10)))
    calibration = {"ece": systems["agent"]["ece"], "bins": bins, "ece_by_system": {s: systems[s]["ece"] for s in systems}}

    # Fairness: every headline metric of the full agent per group.
    from evals.fairness import fairness, group_values

    groups = group_values(cases, opts)
    fair = fairness(groups, y, list(agent_pred), labels, names, positive, n_boot, seed, int(opts.get("min_group_size", 10))) if groups else {}

    durations = [sum(t.get("duration_s", 0) for t in d.get("trace", [])) for d in diags]
    metrics: dict[str, Any] = {
        "n_scored": len(ok), "n_errors": len(errors), "n_missing": missing, "labels": labels, "positive": positive,
        "headline": systems["agent"]["headline"],
        "systems": {s: {k: v for k, v in res.items() if k != "predictions"} for s, res in systems.items()},
        "abstention": abst, "selective": selective, "calibration": calibration, "fairness": fair,
        "prediction_sets": sets, "grounding": ground, "differential_top_k": top_k,
        "llm_fallback_rate": round(float(np.mean([d.get("reasoner_source") == "fallback" for d in diags])), 4),
        "mean_graph_seconds_per_case": round(float(np.mean(durations)), 3),
        "predictions": pstats,
        "record_versions": _record_versions(diags),
    }  # fmt: skip
    _write_cases_csv(ctx, cases, y, systems, diags, groups)
    tables = _tables(metrics, systems, names, labels, coverages, fair)
    plots = _plots(ctx, metrics, systems, curves, fair, names)
    if (pstats.get("micro_batch") or 1) > 1:
        notes.append(f"Predictions ran in micro-batches of {pstats['micro_batch']}: the networks ran before the graph, so mean_graph_seconds_per_case "
                     "(time inside the graph) leaves them out; predictions.cases_per_second is the throughput.")
    notes.append(f"{len(ok)} cases scored; headline metrics use the top label of every case (abstentions included) with percentile-bootstrap 95% CIs ({n_boot} resamples, seed {seed}).")
    if "llm" in systems and systems["llm"]["n_no_answer"]:
        notes.append(f"LLM alone gave no distribution for {systems['llm']['n_no_answer']} cases (fallback or no reasoning); counted as wrong.")
    return ProtocolResult(metrics=metrics, tables=tables, plots=plots, n_cases=len(ok), notes=notes)


def _record_versions(diags: list[dict[str, Any]]) -> dict[str, Any]:
    configs = sorted({(d.get("versions") or {}).get("config") or "?" for d in diags})
    first = next((d.get("versions") for d in diags if d.get("versions")), {}) or {}
    return {**{k: v for k, v in first.items() if k != "models"}, "configs": configs}


def _write_cases_csv(ctx, cases, y, systems, diags, groups) -> None:
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    with (ctx.out_dir / "cases.csv").open("w", newline="") as f:
        w = csv.writer(f)
        gnames = list(groups)
        w.writerow(["id", "truth", *systems, "verdict", "confidence", *gnames])
        for i, (c, d) in enumerate(zip(cases, diags)):
            w.writerow([c.id, y[i], *(systems[s]["predictions"][i] for s in systems), d.get("verdict"), round(float(d.get("confidence") or 0), 4), *(groups[g][i] for g in gnames)])


def _tables(metrics, systems, names, labels, coverages, fair) -> dict[str, str]:
    from evals.fairness import fairness_tables
    from evals.report import md_table

    n = metrics["n_scored"]
    t = {}
    t[f"Diagnosis, all {n} cases (top label; 95% CI)"] = md_table(
        ["system", *names, "ECE", "no answer"],
        [[SYSTEMS[s], *(fmt(systems[s]["headline"][m]) for m in names), f"{systems[s]['ece']:.3f}", systems[s]["n_no_answer"]] for s in systems],
    )
    t["Differential top-k accuracy (95% CI)"] = md_table(
        ["k", "true label among the first k"], [[k, f"{v['accuracy']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"] for k, v in metrics["differential_top_k"].items()]
    )
    t["Per-class recall"] = md_table(
        ["class", "n", *(SYSTEMS[s] for s in systems)],
        [[c, systems["agent"]["support"][c], *(f"{systems[s]['per_class_recall'][c]:.3f}" if c in systems[s]["per_class_recall"] else "-" for s in systems)] for c in labels if systems["agent"]["support"][c]],
    )
    a, sel = metrics["abstention"], metrics["selective"]
    ci = a.get("accuracy_on_accepted_ci95")
    rows = [["abstention rate", f"{a['abstention_rate']:.3f}"],
            ["accuracy on accepted cases", f"{a['accuracy_on_accepted']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "") if a["accuracy_on_accepted"] is not None else "-"],
            ["accuracy on abstained cases", f"{a['accuracy_on_abstained']:.3f}" if a["accuracy_on_abstained"] is not None else "-"],
            [f"AURC ({sel['score']})", fmt(sel["aurc"])]]  # fmt: skip
    rows += [[f"accuracy at {float(c):.0%} coverage", fmt(sel["accuracy_at_coverage"][f"{c:g}"])] for c in coverages]
    for name, e in sel["by_score"].items():
        if name != sel["score"]:
            rows.append([f"AURC ({name})", f"{e['aurc']['value']:.3f}"])
    t["Abstention and selective prediction (verifier scores)"] = md_table(["", "full agent"], rows)
    ps, g = metrics["prediction_sets"], metrics["grounding"]
    if ps.get("n_with_calibrated_set"):
        ci = ps.get("coverage_ci95")
        t["Prediction sets (split-conformal)"] = md_table(["α", "cases with a calibrated set", "coverage", "mean size"],
                                                          [[", ".join(f"{a:g}" for a in ps["alpha"]), f"{ps['n_with_calibrated_set']} of {ps['n']}",
                                                            f"{ps['coverage']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""), f"{ps['mean_size']:.2f}"]])  # fmt: skip
    if ps.get("by_alpha"):
        t["Prediction sets per α (rebuilt from the recorded fused probabilities)"] = md_table(
            ["α", "target coverage", "coverage", "mean size", "cases"],
            [[a, f"{e['target']:.2f}", f"{e['coverage']:.3f}" + (f" [{e['coverage_ci95'][0]:.3f}, {e['coverage_ci95'][1]:.3f}]" if e.get("coverage_ci95") else ""),
              f"{e['mean_size']:.2f}", e["n"]] for a, e in ps["by_alpha"].items()])  # fmt: skip
    if g["n"]:
        t["Grounding of the reasoning"] = md_table(["cases", "all step citations exist", "claims checked in rationales", "unsupported claims", "LLM summaries shown / withheld"],
                                                   [[g["n"], g["citations_exist"], g["claims_checked"], g["unsupported_claims"], f"{g['llm_summaries_shown']} / {g['llm_summaries_withheld']}"]])  # fmt: skip
    t.update(fairness_tables(fair, names))
    return t


def _plots(ctx, metrics, systems, curves, fair, names) -> dict[str, Any]:
    from evals import plots

    d = ctx.out_dir / "plots"
    out = {}
    for s in ("agent", "classifier"):
        cm = systems[s]["confusion"]
        out[f"Confusion matrix: {SYSTEMS[s]}"] = plots.confusion_matrix(cm["matrix"], cm["labels"], d / f"confusion_{s}.png", f"{ctx.bench.name}: {SYSTEMS[s]}")
    out["Reliability diagram: full agent"] = plots.reliability_diagram(metrics["calibration"]["bins"], d / "reliability_agent.png", metrics["calibration"]["ece"], f"{ctx.bench.name}: full agent")
    out["Risk-coverage: full agent"] = plots.risk_coverage(curves, d / "risk_coverage.png", f"{ctx.bench.name}: selective prediction")
    for g, f in fair.items():
        out[f"Fairness: by {g}"] = plots.fairness_bars(f, [m for m in names if m in ("accuracy", "balanced_accuracy", "macro_f1") or m.endswith("_sensitivity")], d / f"fairness_{g}.png", f"{ctx.bench.name}: full agent by {g}")
    return out
