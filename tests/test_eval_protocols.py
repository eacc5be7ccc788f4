"""The eval runner and the diagnosis / modality / morphology protocols, with test doubles."""

import json

import numpy as np
import pytest
from PIL import Image

from agent import Agent
from agent.testing import backends, concept_heads, modality_heads
from evals.predictions import MissingPredictions
from evals.runner import run_benchmark

CALLS: list[str] = []


def fake_agent(config):
    """Module-level (picklable) factory: the agent with test doubles."""
    CALLS.append("built")
    agent = Agent(config, backends=backends())
    real = agent.diagnose

    def diagnose(*a, **k):
        CALLS.append("diagnose")
        return real(*a, **k)

    agent.diagnose = diagnose
    return agent


def no_models(config):
    raise AssertionError("a model was loaded during --rescore")


def _images(tmp_path, n):
    (tmp_path / "img").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(tmp_path / "img" / f"c{i}.png")
        rows.append(f"c{i}.png")
    return rows


def _diagnosis_bench(tmp_path, n=6):
    rows = _images(tmp_path, n)
    labels = ["mel", "nv", "mel", "bkl", "nv", "mel", "nv", "nv"]
    sexes = ["male", "female"]
    lines = ["image,dx,sex,age"] + [f"{r},{labels[i % 8]},{sexes[i % 2]},{30 + 10 * i}" for i, r in enumerate(rows)]
    (tmp_path / "cases.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "bench.yaml").write_text(
        "name: tiny_dx\ntask: diagnosis\nlabels: [akiec, bcc, bkl, df, mel, nv, vasc]\npositive: mel\n"
        "options: {n_bootstrap: 50, min_group_size: 1}\n"
        "dataset: {path: cases.csv, image_root: img, label_column: dx, metadata: {age: age, sex: sex}, group_columns: {sex: sex, age: age}}\n"
    )
    return tmp_path / "bench.yaml"


def test_diagnosis_run_cache_resume_rescore(tmp_path):
    bench = _diagnosis_bench(tmp_path)
    out = tmp_path / "out"
    logs: list[str] = []
    CALLS.clear()
    run_benchmark(bench, out, limit=3, agent_factory=fake_agent, log=logs.append)  # a partial run (as if killed)
    assert CALLS.count("diagnose") == 3
    CALLS.clear()
    summary = run_benchmark(bench, out, agent_factory=fake_agent, log=logs.append)  # resume: only the missing 3
    assert CALLS.count("diagnose") == 3
    keys = [json.loads(x)["key"] for x in (out / "predictions" / "main.jsonl").read_text().splitlines()]
    assert len(keys) == 6 == len(set(keys))
    assert any("cases/s" in m for m in logs)
    m = summary["metrics"]
    assert m["n_scored"] == 6 and set(m["systems"]) == {"classifier", "knn", "morphology", "llm", "agent"}
    assert m["prediction_sets"]["n_with_calibrated_set"] == 6 and 0 <= m["prediction_sets"]["coverage"] <= 1
    g = m["grounding"]
    assert g["n"] == 6 and g["citations_exist"] == 6 and g["unsupported_claims"] == 0 and g["claims_checked"] > 0
    # the doubles: classifier says mel, every system ends on mel
    assert m["systems"]["classifier"]["headline"]["accuracy"]["value"] == pytest.approx(3 / 6)
    assert m["headline"]["mel_sensitivity"]["value"] == 1.0
    for h in m["headline"].values():
        if h["value"] is not None:
            assert h["ci95"][0] <= h["value"] <= h["ci95"][1]
    assert set(m["fairness"]) == {"sex", "age"} and set(m["fairness"]["age"]["groups"]) == {"<40", "40-59", ">=60"}
    assert m["selective"]["accuracy_at_coverage"]["1"]["value"] == m["headline"]["accuracy"]["value"]
    for f in ("metrics.json", "report.md", "config.yaml", "cases.csv", "plots/confusion_agent.png", "plots/reliability_agent.png",
              "plots/risk_coverage.png", "plots/fairness_sex.png", "plots/fairness_age.png"):  # fmt: skip
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    report = (out / "report.md").read_text()
    assert "full agent" in report and "By sex" in report and "smollm2" in report  # tables, fairness, versions

    logs.clear()
    again = run_benchmark(bench, out, rescore=True, agent_factory=no_models, log=logs.append)
    assert again["metrics"]["headline"] == m["headline"]
    assert any(x.startswith("[eval] rescored tiny_dx in") for x in logs)

    with pytest.raises(MissingPredictions, match="6 of 6 cases have no cached prediction"):
        run_benchmark(bench, tmp_path / "empty", rescore=True, agent_factory=no_models, log=logs.append)
    part = run_benchmark(bench, out, rescore=True, agent_factory=no_models, options={"allow_partial": True}, log=logs.append)
    assert part["metrics"]["n_missing"] == 0


def test_seen_by_default_classifier_warning_and_cli_list(tmp_path):
    from typer.testing import CliRunner

    from dermgraph.cli import app

    bench = _diagnosis_bench(tmp_path, n=2)
    bench.write_text(bench.read_text() + "seen_by_default_classifier: true\n")
    run_benchmark(bench, tmp_path / "out", agent_factory=fake_agent, log=lambda m: None)
    assert "trained on these images" in (tmp_path / "out" / "report.md").read_text()
    res = CliRunner().invoke(app, ["eval", "--list"])
    assert res.exit_code == 0 and "isic2018_val" in res.output and "[seen by the default classifier]" in res.output
    res = CliRunner().invoke(app, ["eval", "no_such_set"])
    assert res.exit_code == 2 and "shipped:" in res.output
    res = CliRunner().invoke(app, ["eval", str(bench), "--out", str(tmp_path / "nothing"), "--rescore"])
    assert res.exit_code == 2 and "no cached prediction" in res.output


def test_ablations_from_one_record():
    from evals.protocols.diagnosis import selective_scores, system_predictions

    diag = {
        "label": "mel", "confidence": 0.6, "verdict": "abstain", "self_consistency": 0.5, "differential": [{"label": "mel", "probability": 0.6}],
        "trace": [
            {"node": "encode", "outputs": {"encoding": {"classifier_probs": {"nv": 0.7, "mel": 0.3}}}},
            {"node": "retrieve", "outputs": {"retrieval": {"knn_probs": {"bkl": 2.0, "mel": 2.0, "nv": 4.0}}}},
            {"node": "reason", "outputs": {"reasoning": {"llm_probs": {"bcc": 0.9, "mel": 0.1}}}},
            {"node": "reason", "outputs": {"reasoning": {"llm_probs": {"mel": 0.9}}}},  # second round: not the LLM alone
        ],
    }  # fmt: skip
    p = system_predictions(diag)
    assert p == {"classifier": ("nv", 0.7), "knn": ("nv", 0.5), "morphology": (None, None), "effnet": (None, None), "probe": (None, None), "llm": ("bcc", 0.9), "agent": ("mel", 0.6)}
    assert system_predictions({"label": None, "trace": [{"node": "encode", "outputs": {"encoding": {"classifier_probs": {"nv": 1.0}}}}]})["llm"] == (None, None)
    s = selective_scores(diag)
    assert s["confidence"] == 0.6 and s["confidence_x_consistency"] == 0.3 and s["verdict_then_confidence"] == 0.6
    assert s["acceptance"] == 0.6  # no acceptance score in the record: falls back to the confidence
    assert selective_scores({**diag, "acceptance_score": 0.2})["acceptance"] == 0.2


def test_fairness_worst_group_and_gap():
    from evals.fairness import fairness

    y = ["mel"] * 4 + ["nv"] * 4 + ["mel", "nv"]
    p = ["mel"] * 4 + ["mel", "nv", "nv", "nv"] + ["nv", "nv"]
    groups = {"sex": ["f"] * 4 + ["m"] * 4 + ["unknown"] * 2}
    f = fairness(groups, y, p, ["mel", "nv"], ["accuracy", "mel_sensitivity"], "mel", n_boot=20, min_n=2)["sex"]
    assert f["groups"]["f"]["metrics"]["accuracy"]["value"] == 1.0 and f["groups"]["m"]["metrics"]["accuracy"]["value"] == 0.75
    assert f["summary"]["accuracy"] == {"worst_group": "m", "worst_value": 0.75, "gap": 0.25, "groups_compared": 2}  # 'unknown' not compared
    assert f["groups"]["m"]["metrics"]["mel_sensitivity"]["value"] is None  # no melanoma among m: undefined, not 0
    assert f["summary"]["mel_sensitivity"]["gap"] is None


def test_headline_ci_bounds_are_ordered():
    from evals.classification import headline

    rng = np.random.default_rng(1)
    y = rng.choice(["a", "b", "c"], 80).tolist()
    p = [t if rng.random() < 0.7 else str(rng.choice(["a", "b", "c"])) for t in y]
    h = headline(y, p, ["a", "b", "c"], ["accuracy", "balanced_accuracy", "macro_f1", "macro_precision", "a_sensitivity", "a_specificity"], "a", n_boot=200)
    from evals.metrics import accuracy, balanced_accuracy, macro_f1

    assert h["accuracy"]["value"] == pytest.approx(accuracy(y, p), abs=1e-4)
    assert h["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy(y, p), abs=1e-4)
    assert h["macro_f1"]["value"] == pytest.approx(macro_f1(y, p, sorted(set(y))), abs=1e-4)
    for m in h.values():
        lo, hi = m["ci95"]
        assert lo <= m["value"] <= hi and lo < hi


def test_modality_protocol_runs_only_the_first_nodes(tmp_path):
    rows = _images(tmp_path, 4)
    (tmp_path / "mix.csv").write_text("image,modality,source\n" + "".join(f"{r},{'dermoscopy' if i % 2 else 'clinical'},s{i % 2}\n" for i, r in enumerate(rows)))
    (tmp_path / "mix.yaml").write_text(
        "name: mix\ntask: modality\nlabels: [clinical, dermoscopy, histopathology, not_skin]\noptions: {n_bootstrap: 20, min_group_size: 1}\n"
        "dataset: {path: mix.csv, image_root: img, label_column: modality, group_columns: {source: source}}\n"
    )
    b = backends(modality_heads=modality_heads("dermoscopy"))
    factory_calls = []

    def factory(config):
        factory_calls.append(1)
        return Agent(config, backends=b)

    s = run_benchmark(tmp_path / "mix.yaml", tmp_path / "out", agent_factory=factory, log=lambda m: None)
    m = s["metrics"]
    assert m["headline"]["accuracy"]["value"] == 0.5 and m["per_class_recall"] == {"clinical": 0.0, "dermoscopy": 1.0}
    assert b["llm"].scored == 0 and b["kb"].queries == []  # reasoner and retrieval never ran
    assert m["fairness"]["source"]["summary"]["accuracy"]["gap"] == 1.0
    rec = json.loads((tmp_path / "out" / "predictions" / "main.jsonl").read_text().splitlines()[0])
    assert rec["kind"] == "modality" and [t["node"] for t in rec["trace"]] == ["encode", "modality"]
    run_benchmark(tmp_path / "mix.yaml", tmp_path / "out", rescore=True, agent_factory=no_models, log=lambda m: None)
    assert (tmp_path / "out" / "plots" / "confusion_modality.png").is_file()


def test_morphology_protocol_structured_and_free_text(tmp_path):
    from evals.protocols.morphology import predicted_criteria

    rows = _images(tmp_path, 4)
    crit = "pigment_network,streaks,pigmentation,regression_structures,dots_and_globules,blue_whitish_veil,vascular_structures"
    values = ["atypical,absent,absent,absent,absent,present,absent", "typical,absent,absent,absent,absent,absent,absent",
              "atypical,absent,absent,absent,absent,absent,absent", "absent,absent,absent,absent,absent,present,dotted"]  # fmt: skip
    (tmp_path / "meta.csv").write_text(f"image,{crit}\n" + "".join(f"{r},{v}\n" for r, v in zip(rows, values)))
    (tmp_path / "crit.yaml").write_text(f"name: crit\ntask: morphology\noptions: {{n_bootstrap: 20}}\ndataset: {{path: meta.csv, image_root: img, extra_columns: [{crit}]}}\n")
    b = backends(concept_heads=concept_heads({"pigment_network": "atypical", "blue_whitish_veil": "present"}))
    s = run_benchmark(tmp_path / "crit.yaml", tmp_path / "out", agent_factory=lambda c: Agent(c, backends=b), log=lambda m: None)
    m = s["metrics"]
    assert m["criteria"]["pigment_network"]["accuracy"] == 0.5 and m["criteria"]["blue_whitish_veil"]["accuracy"] == 0.5
    assert m["criteria"]["streaks"]["accuracy"] == 1.0 and m["criteria"]["vascular_structures"]["accuracy"] == 0.75
    assert m["sources"] == {"structured": 4} and m["headline"]["mean_accuracy"]["value"] == pytest.approx(np.mean([0.5, 1, 1, 1, 1, 0.5, 0.75]), abs=1e-4)
    lo, hi = m["headline"]["mean_accuracy"]["ci95"]
    assert lo <= m["headline"]["mean_accuracy"]["value"] <= hi
    text = {"findings": [], "description": "Atypical pigment network with a blue-whitish veil; no vessels."}
    vals, src = predicted_criteria(text)
    assert src == "text" and vals["pigment_network"] == "atypical" and vals["blue_whitish_veil"] == "present"


@pytest.mark.slow
def test_two_worker_processes_give_each_case_once(tmp_path):
    """Worker processes compute; the parent caches their records as they come (one shard), each case once."""
    bench = _diagnosis_bench(tmp_path, n=4)
    s = run_benchmark(bench, tmp_path / "out", workers=2, agent_factory=fake_agent, log=lambda m: None)
    assert s["metrics"]["n_scored"] == 4
    keys = [json.loads(x)["key"] for p in (tmp_path / "out" / "predictions").glob("*.jsonl") for x in p.read_text().splitlines()]
    assert len(keys) == 4 == len(set(keys))
    one = run_benchmark(bench, tmp_path / "one", workers=1, agent_factory=fake_agent, log=lambda m: None)
    assert one["metrics"]["headline"] == s["metrics"]["headline"]
    # Workers micro-batch too: 5 cases, 2 workers, micro-batches of 2 (each worker prefetches its part).
    (tmp_path / "five").mkdir()
    bench5 = _diagnosis_bench(tmp_path / "five", n=5)
    logs: list[str] = []
    batched = run_benchmark(bench5, tmp_path / "b", workers=2, options={"batch_size": 2}, agent_factory=fake_agent, log=logs.append)
    assert any("(2 processes, micro-batch 2)" in m for m in logs), logs
    plain = run_benchmark(bench5, tmp_path / "p", workers=1, options={"batch_size": 1}, agent_factory=fake_agent, log=lambda m: None)
    assert batched["metrics"]["n_scored"] == 5 and batched["metrics"]["headline"] == plain["metrics"]["headline"]
    # Graph time leaves out the networks' batched forward passes: the report says so, and names the throughput.
    assert (batched["metrics"]["predictions"]["micro_batch"], plain["metrics"]["predictions"]["micro_batch"]) == (2, 1)
    assert any("micro-batches of 2" in n for n in batched["notes"]) and not any("micro-batches" in n for n in plain["notes"])
    recs = lambda d: sorted((json.loads(x)["key"], json.loads(x)["diagnosis"]["label"]) for p in (tmp_path / d / "predictions").glob("*.jsonl") for x in p.read_text().splitlines())  # noqa: E731
    assert recs("b") == recs("p")


def test_metric_helpers():
    from evals.metrics import confusion_matrix, expected_calibration_error, macro_precision, per_group, reliability_bins

    assert confusion_matrix(["mel", "nv", "nv"], ["nv", "nv", "none"], ["mel", "nv"]).tolist() == [[0, 1], [0, 1]]
    assert macro_precision(["a", "a", "b", "b"], ["a", "b", "b", "b"]) == pytest.approx((1 + 2 / 3) / 2)
    bins = reliability_bins([0.05, 0.95, 0.95], [False, True, False], bins=10)
    assert len(bins) == 10 and bins[0] == {"lo": 0.0, "hi": 0.1, "n": 1, "confidence": 0.05, "accuracy": 0.0}
    assert bins[9]["n"] == 2 and bins[9]["accuracy"] == 0.5 and bins[5]["accuracy"] is None
    ece = sum(b["n"] / 3 * abs(b["accuracy"] - b["confidence"]) for b in bins if b["n"])
    assert ece == pytest.approx(expected_calibration_error([0.05, 0.95, 0.95], [False, True, False]))
    assert per_group(["f", "m", "m"], lambda a: float(np.mean(a)), [1, 0, 1]) == {"f": {"n": 1, "value": 1.0}, "m": {"n": 2, "value": 0.5}}


def test_one_progress_reports_errors_cache_hits_and_eta():
    from evals.progress import Progress

    logs: list[str] = []
    p = Progress(logs.append, "[eval]", 4, every_s=1e9)
    p.update(status="ok")
    p.update(status="error")
    p.update(n_done=2, n_computed=0)  # cache hits: done, not computed
    assert len(logs) == 2 and logs[0].startswith("[eval]: 1/4 cases (0 errors, 1 computed)")
    assert "4/4 cases (1 errors, 2 computed)" in logs[-1] and "cases/s" in logs[-1] and "ETA 0 s" in logs[-1]


def _agent_with_fusion_file(config):
    """The doubles, with the fusion double's artifact loaded from the file the configuration names."""
    from agent.testing import backends

    b = backends()
    del b["fusion"]
    return Agent(config, backends=b)


def test_prediction_sets_per_alpha_are_rebuilt_from_the_records(tmp_path):
    from agent.testing import fusion_model

    art = fusion_model().save(tmp_path / "fusion.json")
    bench = _diagnosis_bench(tmp_path)
    s = run_benchmark(bench, tmp_path / "out", overrides=[f"reasoner.fusion={art}"], options={"set_alphas": [0.1, 0.3]},
                      agent_factory=_agent_with_fusion_file, log=lambda m: None)  # fmt: skip
    ps = s["metrics"]["prediction_sets"]
    by = ps["by_alpha"]
    assert list(by) == ["0.1", "0.3"] and by["0.1"]["target"] == 0.9 and by["0.3"]["target"] == 0.7
    assert by["0.1"]["coverage"] == ps["coverage"] and by["0.1"]["mean_size"] == pytest.approx(ps["mean_size"], abs=1e-3)  # the recorded α
    assert by["0.3"]["mean_size"] <= by["0.1"]["mean_size"] and by["0.3"]["coverage"] <= by["0.1"]["coverage"]  # larger α: smaller sets
    assert "Prediction sets per α" in (tmp_path / "out" / "report.md").read_text()
    # Records made by another fusion than the configuration's are not rebuilt with the wrong calibration.
    from agent.config import load_config
    from evals.base import ProtocolContext
    from evals.benchmark import load_benchmark
    from evals.protocols.diagnosis import sets_by_alpha

    fm = fusion_model()
    fm.modalities["dermoscopy"].calibration_scores = fm.modalities["dermoscopy"].calibration_scores * 0.5
    other = fm.save(tmp_path / "other.json")
    records = [json.loads(x)["diagnosis"] for x in (tmp_path / "out" / "predictions" / "main.jsonl").read_text().splitlines()]
    with_set = [(d, d["label"]) for d in records]
    logs: list[str] = []
    for ref, expect in ((art, True), (other, False)):
        ctx = ProtocolContext(bench=load_benchmark(bench), cases=[], out_dir=tmp_path, cache=None, agent_config=load_config(None, [f"reasoner.fusion={ref}"]), log=logs.append)
        assert bool(sets_by_alpha(ctx, with_set, [0.1], str, 0, 0)) is expect
    assert any("were not made with" in m for m in logs)


def test_diagnosis_scores_from_records_alone(tmp_path):
    """predict / score_predictions: the score step reads records only (no agent), so edited records rescore."""
    from evals.base import Predictions, ProtocolContext
    from evals.benchmark import load_benchmark, load_cases
    from evals.protocols import diagnosis

    bench_path = _diagnosis_bench(tmp_path)
    out = tmp_path / "out"
    summary = run_benchmark(bench_path, out, agent_factory=fake_agent, log=lambda m: None)
    bench = load_benchmark(bench_path)
    cases, _ = load_cases(bench)

    class NoCache:
        def get(self, key):
            raise AssertionError("score_predictions read the cache")

        put = get

    ctx = ProtocolContext(bench=bench, cases=cases, out_dir=tmp_path / "rescored", cache=NoCache(), options=dict(bench.options), agent_factory=no_models)
    records = [json.loads(x) for x in (out / "predictions" / "main.jsonl").read_text().splitlines()]
    by_id = {r["case_id"]: r for r in records}
    ordered = [by_id[c.id] for c in cases]
    same = diagnosis.score_predictions(ctx, Predictions(ordered, {"cached": len(ordered)}))
    assert same.metrics["headline"] == summary["metrics"]["headline"]
    for r in ordered:  # every case now answered 'nv': accuracy is the share of nevi
        r["diagnosis"]["label"] = "nv"
    edited = diagnosis.score_predictions(ctx, Predictions(ordered, {}))
    assert edited.metrics["headline"]["accuracy"]["value"] == pytest.approx(sum(c.label == "nv" for c in cases) / len(cases), abs=1e-4)
    # Top-k of the differential: the truth second in every case's list counts from k = 2 on.
    for r, c in zip(ordered, cases):
        r["diagnosis"]["differential"] = [{"label": "df" if c.label != "df" else "vasc", "probability": 0.6}, {"label": c.label, "probability": 0.4}]
    ranked = diagnosis.score_predictions(ctx, Predictions(ordered, {}))
    top = ranked.metrics["differential_top_k"]
    assert top["1"]["accuracy"] == 0.0 and top["3"]["accuracy"] == top["5"]["accuracy"] == 1.0
    assert "Differential top-k accuracy (95% CI)" in ranked.tables


class ReasonerTestLLM:
    """An LLM backend for the reasoner protocol (``create("llm", ...)`` kwargs); it prefers melanoma and
    answers in the agent's format citing [E1]."""

    def __init__(self, model=None, device="cpu", adapter=None):
        from agent.testing import TestLLM

        self._llm = TestLLM(["Diagnosis: melanoma\nRationale: An atypical network and a veil [E1] fit melanoma."])
        self.model_id = "reasoner-test"

    def chat(self, conversations, **kw):
        return self._llm.chat(conversations, **kw)

    def score_continuations(self, conversation, prefix, continuations):
        return self._llm.score_continuations(conversation, prefix, continuations)


def test_reasoner_protocol_renders_the_agents_prompt_caches_per_model_and_rescores(tmp_path):
    from models.backends import register

    register("llm", "reasoner-test", "tests.test_eval_protocols:ReasonerTestLLM")
    bench = _diagnosis_bench(tmp_path, n=4)
    text = bench.read_text().replace("task: diagnosis", "task: reasoner").replace(
        "options: {n_bootstrap: 50, min_group_size: 1}", "options: {n_bootstrap: 50, backend: reasoner-test, models: {base: null, tuned: no/such/adapter}}")
    bench.write_text(text)
    CALLS.clear()
    s = run_benchmark(bench, tmp_path / "out", agent_factory=fake_agent, log=lambda m: None)
    m = s["metrics"]
    # every case is dermoscopy under the doubles; the LLM ranks melanoma first: 2 of 4 labels are mel
    assert m["models"]["base"]["n"] == 4 and m["models"]["base"]["accuracy"] == 0.5 and m["models"]["base"]["mel_sensitivity"] == 1.0
    assert m["models"]["base"]["format_valid"] == 1.0 and "tuned" not in m["models"]
    assert CALLS.count("built") == 1  # one agent renders every case for every model
    # the prompt scored is the one the reason node sends (agent.nodes.reason.reasoner_inputs)
    rec = json.loads((tmp_path / "out" / "predictions" / "main.jsonl").read_text().splitlines()[0])
    assert rec["scored"] and rec["candidates"][rec["candidate_labels"].index("mel")] == "melanoma"
    CALLS.clear()
    s2 = run_benchmark(bench, tmp_path / "out", agent_factory=fake_agent, log=lambda m: None, rescore=True)
    assert CALLS == [] and s2["metrics"]["models"] == m["models"]


@pytest.mark.parametrize("opt, message", [
    ({"n_bootstrap": -5}, "n_bootstrap=-5"), ({"n_bootstrap": 0}, "n_bootstrap=0"), ({"calibration_bins": 0}, "calibration_bins=0"),
    ({"coverages": [1.5]}, r"coverages are fractions in \(0, 1\]"), ({"top_k": [0]}, "top_k values must be >= 1"),
    ({"nbootstrap": 10}, "unknown diagnosis option 'nbootstrap' \\(did you mean 'n_bootstrap'\\?\\); valid options: .*calibration_bins"),
    ({"age_bins": "foo"}, "age_bins must be a list of increasing numbers"), ({"age_bins": 50}, r"write \[50\] for one edge"),
    ({"age_bins": [60, 40]}, "strictly increasing"),
])  # fmt: skip
def test_bad_options_are_one_line_errors_before_any_case_runs(tmp_path, opt, message):
    bench = _diagnosis_bench(tmp_path, n=2)
    with pytest.raises(ValueError, match=message) as exc:
        run_benchmark(bench, tmp_path / "out", options=opt, agent_factory=no_models, log=lambda m: None)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_options_of_model_backed_protocols_and_workers_are_checked(tmp_path):
    from evals.protocols import check_options as validate_options

    with pytest.raises(ValueError, match="unknown zero_shot option 'nbootstrap'.*valid options: .*n_bootstrap"):
        validate_options("zero_shot", {"nbootstrap": 1})
    with pytest.raises(ValueError, match="folds=1"):
        validate_options("linear_probe", {"folds": 1})
    validate_options("zero_shot", {"n_bootstrap": 0})  # 0: no interval (None), documented for those protocols
    bench = _diagnosis_bench(tmp_path, n=2)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="--workers must be an integer >= 1"):
            run_benchmark(bench, tmp_path / "out", workers=bad, agent_factory=no_models, log=lambda m: None)


def test_eval_cli_reports_bad_options_and_workers_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from dermgraph.cli import app

    bench = _diagnosis_bench(tmp_path, n=2)
    for args, message in ((["--opt", "age_bins=foo"], "age_bins must be a list"), (["--workers", "0"], "--workers must be"),
                          (["--opt", "coverages=[1.5]"], "coverages are fractions")):
        res = CliRunner().invoke(app, ["eval", str(bench), "--out", str(tmp_path / "o"), *args])
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output


def test_age_bands_reject_bad_edges():
    from evals.base import EvalCase
    from evals.fairness import group_values

    cases = [EvalCase(id="a", image=None, groups={"age": "35"}), EvalCase(id="b", image=None, groups={"age": "70"})]
    assert group_values(cases, {"age_bins": [50]}) == {"age": ["<50", ">=50"]}
    for bad in ("foo", 50, [50, "x"]):
        with pytest.raises(ValueError, match="age_bins must be a list of increasing numbers"):
            group_values(cases, {"age_bins": bad})


# --------------------------------------------------------------------------- scripts/compare_runs.py


def _compare_runs():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("compare_runs", Path(__file__).resolve().parent.parent / "scripts" / "compare_runs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run_dir(path, rows, bench="tiny_dx"):
    path.mkdir(parents=True)
    lines = ["id,truth,classifier,agent,verdict,confidence"] + [f"{i},{t},{p},{p},accept,0.9" for i, t, p in rows]
    (path / "cases.csv").write_text("\n".join(lines) + "\n")
    (path / "metrics.json").write_text(json.dumps({"benchmark": {"name": bench}}))
    return path


def test_compare_runs_refuses_what_it_cannot_compare(tmp_path, capsys):
    cr = _compare_runs()
    rows = [("a", "mel", "mel"), ("b", "nv", "mel"), ("c", "nv", "nv")]
    a = _run_dir(tmp_path / "a", rows)
    b = _run_dir(tmp_path / "b", rows[:2])
    warnings: list[str] = []
    out = cr.compare(a, b, warn=warnings.append)
    assert out["cases"] == 2 and len(warnings) == 1 and "only 2 cases are in both runs" in warnings[0]
    with pytest.raises(cr.CompareError, match="unknown system 'bogus'; valid systems .*: classifier, agent"):
        cr.compare(a, b, "bogus")
    with pytest.raises(cr.CompareError, match="no such run directory"):
        cr.compare(tmp_path / "nope", b)
    (tmp_path / "empty").mkdir()
    with pytest.raises(cr.CompareError, match="cases.csv: not found"):
        cr.compare(a, tmp_path / "empty")
    with pytest.raises(cr.CompareError, match="different benchmarks"):
        cr.compare(a, _run_dir(tmp_path / "other", rows, bench="other"))
    with pytest.raises(cr.CompareError, match="different truth labels .*'b': 'nv' vs 'bkl'"):
        cr.compare(a, _run_dir(tmp_path / "relabelled", [("a", "mel", "mel"), ("b", "bkl", "mel")]))
    # the command line: one error line, exit status 2
    import sys

    argv = sys.argv
    sys.argv = ["compare_runs.py", str(a), str(b), "--system", "bogus"]
    try:
        with pytest.raises(SystemExit) as exc:
            cr.main()
    finally:
        sys.argv = argv
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: unknown system") and err.count("\n") == 1
