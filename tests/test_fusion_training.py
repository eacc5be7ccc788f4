"""dermgraph train fusion on synthetic expert outputs: stacker, morphology expert, conformal sets, risk control."""

import json

import numpy as np
import pytest

from models.stacker import FusionModel
from models.vocabulary import HAM_CLASSES, SEVEN_POINT

MORPH = {"mel": ("pigment_network", "atypical"), "nv": ("pigment_network", "typical"), "bcc": ("vascular_structures", "arborizing"),
         "bkl": ("pigmentation", "diffuse regular"), "df": ("regression_structures", "white areas"), "vasc": ("vascular_structures", "hairpin")}  # fmt: skip


def _noisy(label, rng, strength):
    p = rng.dirichlet(np.ones(len(HAM_CLASSES)))
    p[HAM_CLASSES.index(label)] += strength * rng.uniform(0.3, 1.0)
    return dict(zip(HAM_CLASSES, (p / p.sum()).tolist()))


def _findings(label, rng):
    out = {}
    for c, vals in SEVEN_POINT.items():
        p = rng.dirichlet(np.ones(len(vals)))
        if MORPH.get(label, (None,))[0] == c:
            p[vals.index(MORPH[label][1])] += 1.5
        out[c] = dict(zip(vals, (p / p.sum()).tolist()))
    return out


def _records(n, rng):
    labels = rng.choice(["nv"] * 6 + ["mel"] * 2 + ["bkl", "bcc", "df", "vasc", "akiec"], size=n)
    recs = []
    for i, y in enumerate(labels):
        source, split = ("derm7pt", ["train", "extra", "val"][i % 3]) if i % 2 else ("isic2018_val", ["calib", "report"][(i // 2) % 2])
        if source == "derm7pt" and y == "akiec":
            y = "nv"  # Derm7pt has no akiec
        recs.append({"id": f"{source}:{i}", "source": source, "split": split, "label": str(y), "modality": "dermoscopy", "modality_rejected": False,
                     "classifier": _noisy(y, rng, 1.2), "knn": _noisy(y, rng, 1.0), "findings": _findings(y, rng), "candidates": list(HAM_CLASSES),
                     "llm": None, "evidence": []})  # fmt: skip
    for i in range(120):  # clinical photos: candidates are kNN labels
        labs = [f"d{j}" for j in rng.choice(20, 5, replace=False)]
        y = labs[0] if rng.uniform() < 0.6 else "d99"
        knn = dict(zip(labs, rng.dirichlet(np.ones(5)).tolist()))
        if y in knn:
            knn[y] += 0.5
        recs.append({"id": f"dermnet:{i:08x}{'0' * 32}", "source": "dermnet", "split": "heldout", "label": y, "modality": "clinical", "modality_rejected": False,
                     "classifier": {}, "knn": knn, "findings": {}, "candidates": labs, "llm": None, "evidence": []})  # fmt: skip
    return recs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from training.fusion import Config, train

    tmp = tmp_path_factory.mktemp("fusion")
    rng = np.random.default_rng(0)
    path = tmp / "experts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _records(900, rng)) + "\n")
    cfg = Config(experts_file=path, out_dir=tmp / "out", artifact=tmp / "fusion.json", dermoscopy_experts=["classifier", "knn", "morphology"],
                 clinical_experts=["knn"], c_grid=[0.01, 1.0], gamma_grid=[0.0, 0.5], morphology_c_grid=[0.3, 3.0], n_bootstrap=20)  # fmt: skip
    summary = train(cfg)
    return cfg, summary, json.loads((cfg.out_dir / "metrics.json").read_text())


def test_artifact_loads_and_fuses(trained):
    cfg, summary, _ = trained
    model = FusionModel.load(cfg.artifact)
    assert model.meta["findings_from"] == "concept-heads" and model.meta["findings_heads"] == "derm7pt-concept-heads"  # records without the field
    assert set(model.modalities) == {"dermoscopy", "clinical"}
    derm = model.modalities["dermoscopy"]
    fused = derm.fuse(HAM_CLASSES, {"classifier": {"mel": 0.9, "nv": 0.1}, "knn": {"mel": 0.8, "nv": 0.2}, "morphology": None})
    assert next(iter(fused.probs)) == "mel" and abs(sum(fused.probs.values()) - 1) < 1e-9
    assert fused.missing == ["morphology"] and fused.contributions["morphology"]["mel"] == 0.0
    # The findings model learned atypical network -> melanoma.
    f = {c: {v: 1.0 if (c, v) == ("pigment_network", "atypical") else 0.0 for v in vals} for c, vals in SEVEN_POINT.items()}
    assert max(model.morphology_expert.predict(f).items(), key=lambda kv: kv[1])[0] == "mel"


def test_evaluation_half_reports_coverage_and_risk(trained):
    cfg, _, metrics = trained
    for name in ("isic2018_val_report", "derm7pt_val"):
        after = metrics["evaluation"][name]["after"]
        assert after["prediction_sets"]["0.1"]["coverage"] > 0.8
        sel = after["selective"]
        assert sel["calibration"]["target_risk"] == pytest.approx(1 - cfg.target_accuracy)
        if sel["accepted"] >= 30:
            assert sel["accuracy_on_accepted"] >= cfg.target_accuracy - 0.1
        assert set(metrics["evaluation"][name]["ablation"]) == {"without_classifier", "without_knn", "without_morphology"}


def test_fit_parts_never_include_the_evaluation_halves(trained):
    from training.fusion import load_parts

    cfg, _, _ = trained
    parts = load_parts(cfg.experts_file)
    fit = {r["id"] for r in parts["derm_fit"]}
    assert not fit & {r["id"] for r in parts["isic_eval"] + parts["derm7pt_eval"]}
    assert all(r["split"] in ("calib", "train", "extra") for r in parts["derm_fit"])
    assert not {r["id"] for r in parts["clin_fit"]} & {r["id"] for r in parts["clin_eval"]}


def test_findings_from_the_second_expert_replace_the_records_findings_and_are_required(tmp_path):
    """findings_from: effnet reads each record's <expert>_findings (the second expert's criteria heads); a record
    without them is an error that names the command, and the published artifact says which findings it read."""
    from training.fusion import Config, load_parts, train
    from training.fusion_data import expert_path

    rng = np.random.default_rng(2)
    recs = _records(300, rng)
    path = tmp_path / "experts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    theirs = {r["id"]: _findings(r["label"], rng) for r in recs}
    expert_path(path, "effnet").write_text("".join(json.dumps({"id": i, "effnet": r["classifier"], "effnet_findings": theirs[i]}) + "\n"
                                                   for i, r in zip(theirs, recs)))  # fmt: skip
    parts = load_parts(path, ["effnet"], findings_from="effnet")
    derm = [r for p in parts.values() for r in p if r["modality"] == "dermoscopy"]
    assert derm and all(r["findings"] == theirs[r["id"]] for r in derm)
    assert all(not r["findings"] for p in parts.values() for r in p if r["modality"] == "clinical")  # no findings stay none
    cfg = Config(experts_file=path, out_dir=tmp_path / "out", artifact=None, extra_experts=["effnet"], findings_from="effnet",
                 dermoscopy_experts=["classifier", "knn", "morphology", "effnet"], n_bootstrap=0)  # fmt: skip
    train(cfg)
    assert FusionModel.load(tmp_path / "out" / "fusion_stacker.json").meta["findings_from"] == "effnet"
    assert "findings_heads" not in FusionModel.load(tmp_path / "out" / "fusion_stacker.json").meta  # the expert's own criteria heads
    expert_path(path, "effnet").write_text("".join(json.dumps({"id": r["id"], "effnet": r["classifier"]}) + "\n" for r in recs))
    with pytest.raises(ValueError, match="no effnet_findings.*fusion_data"):
        load_parts(path, ["effnet"], findings_from="effnet")


def test_second_expert_agreement_is_an_acceptance_signal_calibrated_on_the_named_sources(tmp_path):
    """With the second expert's outputs in an extra file: the clinical candidates gain its labels, the acceptance
    model weighs its agreement, and only the rows of ``acceptance_sources`` train the acceptance model and set the threshold."""
    from training.fusion import Config, second_expert_top, train
    from training.fusion_data import expert_path

    rng = np.random.default_rng(1)
    recs = _records(600, rng)
    for r in recs:  # weak experts, so that some labels are wrong and agreement has something to tell
        if r["modality"] == "dermoscopy":
            r["classifier"], r["knn"] = _noisy(r["label"], rng, 0.15), _noisy(r["label"], rng, 0.1)
    path = tmp_path / "experts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    # The expert: right on 80 % of the dermoscopy cases; on the clinical photos its head names the truth first.
    extra = []
    for r in recs:
        if r["modality"] == "dermoscopy":
            guess = r["label"] if rng.uniform() < 0.8 else str(rng.choice(HAM_CLASSES))
            extra.append({"id": r["id"], "effnet": {c: (0.7 if c == guess else 0.05) for c in HAM_CLASSES}})
        else:
            extra.append({"id": r["id"], "effnet_dermnet": {r["label"]: 0.6, "d98": 0.4}})
    expert_path(path, "effnet").write_text("\n".join(json.dumps(e) for e in extra) + "\n")
    cfg = Config(experts_file=path, out_dir=tmp_path / "out", artifact=tmp_path / "fusion.json", dermoscopy_experts=["classifier", "knn", "morphology"],
                 clinical_experts=["knn", "effnet"], extra_experts=["effnet"], clinical_extra_candidates=1, c_grid=[1.0], gamma_grid=[0.0],
                 morphology_c_grid=[1.0], n_bootstrap=0, acceptance_features=["log_top", "margin", "set_size", "expert_agreement", "morphology_top", "second_expert_agrees"],
                 acceptance_sources=["isic2018_val"])  # fmt: skip
    train(cfg)
    model = FusionModel.load(cfg.artifact)
    derm, clin = model.modalities["dermoscopy"], model.modalities["clinical"]
    assert derm.acceptance_features[-1] == "second_expert_agrees" and derm.acceptance_coef[-1] > 0  # agreement raises the score
    n_isic_fit = sum(r["source"] == "isic2018_val" and r["split"] == "calib" for r in recs)
    assert len(derm.acceptance_kappa) == n_isic_fit == derm.meta["acceptance_rows"]
    assert clin.meta["extra_candidates"] == 1 and clin.experts == ["knn", "effnet"]
    assert second_expert_top({"effnet": {"a": 0.2, "b": 0.7, "c": 0.9}}, ["a", "b"]) == "b" and second_expert_top({}, ["a"]) is None


def test_in_sample_expert_outputs_are_refused_and_cross_fitted_ones_accepted(tmp_path):
    """An expert's output on an image it trained on (``<expert>_in_sample``) must not fit the stacker, the acceptance
    model or the clinical stacker; cross-fitted outputs for the same rows (and DermNet index photos) may."""
    from training.fusion import Config, train
    from training.fusion_data import expert_path

    rng = np.random.default_rng(2)
    recs = _records(300, rng)
    for i in range(60):  # DermNet case-index photos: clinical fit rows under clinical_fit=[train]
        r = dict(recs[-1 - (i % 100)], id=f"dermnet:{i:040x}", split="train")
        recs.append(r)
    path = tmp_path / "experts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    base = dict(experts_file=path, out_dir=tmp_path / "out", artifact=None, dermoscopy_experts=["classifier", "knn", "morphology", "effnet"],
                clinical_experts=["knn", "effnet"], extra_experts=["effnet"], c_grid=[1.0], gamma_grid=[0.0], morphology_c_grid=[1.0], n_bootstrap=0)  # fmt: skip

    def write_extra(flag):
        rows = []
        for r in recs:
            trained_on = (r["source"] == "derm7pt" and r["split"] in ("train", "extra")) or (r["source"] == "dermnet" and r["split"] == "train")
            e = {"id": r["id"], "effnet": _noisy(r["label"], rng, 1.0) if r["modality"] == "dermoscopy" else None}
            if r["modality"] == "clinical":
                e = {"id": r["id"], "effnet_dermnet": {r["label"]: 0.6, "d98": 0.4}}
            if trained_on:
                e[f"effnet_{flag}"] = True
            rows.append(e)
        expert_path(path, "effnet").write_text("\n".join(json.dumps(e) for e in rows) + "\n")

    write_extra("in_sample")
    with pytest.raises(ValueError, match="dermoscopy stacker would be fitted on in-sample outputs"):
        train(Config(**base))
    with pytest.raises(ValueError, match="clinical stacker would be fitted on in-sample"):
        train(Config(**{**base, "dermoscopy_experts": ["classifier", "knn", "morphology"], "fit_sources": ["isic2018_val"], "clinical_fit": ["train"]}))
    write_extra("crossfit")
    train(Config(**{**base, "clinical_fit": ["train"]}))
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    c = metrics["counts"]
    assert c["clin_train"] == 60 and metrics["evaluation"]["dermnet_heldout"]["after"]["n"] == c["clin_fit"] + c["clin_eval"] > 100  # the whole held-out sixth is evaluation data


def test_melanoma_operating_point_is_the_smallest_bias_reaching_the_target_within_the_accuracy_budget():
    from training.fusion import Config, choose_melanoma_bias

    # 10 melanomas the decision ranks second behind nv by a growing margin, 30 nevi it gets right with margin 0.9.
    y = ["mel"] * 10 + ["nv"] * 30
    oof = [{"mel": 0.5 - 0.02 * i, "nv": 0.5 + 0.02 * i} for i in range(10)] + [{"mel": 0.05, "nv": 0.95}] * 30
    cfg = Config(melanoma_sensitivity_target=0.5, melanoma_bias_grid=[0.0, 0.1, 0.2, 0.5, 3.5])
    bias, grid = choose_melanoma_bias(y, oof, reference=0.9, cfg=cfg)
    sens = {g["bias"]: g["mel_sensitivity"] for g in grid}
    assert sens[0.0] < 0.5 <= sens[bias] and bias == min(b for b, v in sens.items() if v >= 0.5)
    # A bias that flips the nevi too costs accuracy beyond the budget and is never chosen.
    assert choose_melanoma_bias(y, oof, 0.9, cfg.model_copy(update={"melanoma_sensitivity_target": 0.99}))[0] == 0.5
    assert choose_melanoma_bias(y, oof, 0.9, cfg.model_copy(update={"melanoma_sensitivity_target": None}))[0] == 0.0


def test_group_conditional_sets_calibrate_each_source_apart(tmp_path):
    """conformal_groups='source': a linear model of the source over encoder features picks the threshold; the fit
    cases' groups are out of fold; the artifact round-trips; each group's threshold comes from its own scores."""
    from training.fusion import SET_GROUP, Config, fit_set_groups

    rng = np.random.default_rng(1)
    recs = [r for r in _records(300, rng) if r["modality"] == "dermoscopy"]
    fit, others = recs[:200], recs[200:]
    feats = {r["id"]: rng.normal(size=16) + (2.0 if r["source"] == "derm7pt" else -2.0) for r in recs}
    groups = fit_set_groups(fit, others, Config(folds=3), feats)
    assert groups.names == ["derm7pt", "isic2018_val"] and groups.accuracy > 0.95
    assert all(r[SET_GROUP] == groups.names.index(r["source"]) for r in others)
    assert [r[SET_GROUP] for r in fit] == groups.calibration_group.tolist()
    from agent.testing import fusion_model

    model = fusion_model()
    mf = model.modalities["dermoscopy"]
    n = len(mf.calibration_scores)
    mf.calibration_scores = np.where(np.arange(n) % 2 == 0, 0.9, 0.1)  # group 0 hard cases, group 1 easy ones
    groups.calibration_group = (np.arange(n) % 2).astype(int)
    mf.set_groups = groups
    assert mf.qhat(0.1, 0) == pytest.approx(0.9) and mf.qhat(0.1, 1) == pytest.approx(0.1) and mf.qhat(0.1) == pytest.approx(0.9)
    loaded = FusionModel.load(model.save(tmp_path / "f.json")).modalities["dermoscopy"]
    assert loaded.set_groups.names == groups.names and np.array_equal(loaded.set_groups.calibration_group, groups.calibration_group)
    x = feats[others[0]["id"]]
    assert loaded.set_group(x) == groups.assign(x) == others[0][SET_GROUP]
    assert loaded.set_group(x[:3]) is None and loaded.set_group(None) is None  # other features: pooled calibration


def test_stand_in_offsets_keep_a_weaker_stand_ins_rows_from_pulling_the_deployed_weight_down():
    """Rows whose expert output comes from weaker cross-fitted stand-ins (``<expert>_crossfit``) get their own weight
    offset, so the deployed weight moves towards the one the real expert's rows call for and fits those rows better."""
    from training.fusion import derm_design, fit_multinomial, fuse_fit_rows, stand_in_mask, with_stand_in

    rng = np.random.default_rng(3)
    recs = []
    for i, y in enumerate(rng.choice(["nv", "mel", "bkl", "bcc"], size=1200).tolist()):
        stand_in = i % 2 == 0  # half the rows: a much weaker stand-in of the expert
        recs.append({"label": y, "classifier": _noisy(y, rng, 0.6), "effnet": _noisy(y, rng, 0.3 if stand_in else 1.0), "effnet_crossfit": stand_in})
    experts = ["classifier", "effnet"]
    x, _ = derm_design(recs, experts, 1e-3)
    s = stand_in_mask(recs, experts)
    assert s[:, 1].sum() == 600 and not s[:, 0].any()
    y = [r["label"] for r in recs]
    real = np.flatnonzero(~s[:, 1])

    def fit(rows, mask=None):
        return fit_multinomial(x[rows], [y[i] for i in rows], 0.01, 0.0, experts, 1e-3, 0, mask)

    def weight(m):
        return m.meta["expert_weights"]["effnet"]

    def real_rows_nll(m):
        return -np.mean([np.log(m.fuse(HAM_CLASSES, {e: recs[i][e] for e in experts}).probs[y[i]]) for i in real])

    every = np.arange(len(recs))
    clean, pooled, offset = fit(real), fit(every), fit(every, s)
    assert weight(pooled) + 0.5 < weight(offset) < weight(clean)  # the stand-ins drag the pooled weight down; the offset absorbs most of it
    assert real_rows_nll(offset) < 0.85 * real_rows_nll(pooled)
    u = offset.meta["stand_in_offsets"]
    assert set(u) == {"effnet"} and u["effnet"] < -0.5 and not pooled.meta["stand_in_offsets"]
    # The artifact's coefficients are the deployed ones; a stand-in row is fused with its offset added back.
    assert with_stand_in(offset, [False, False]) is offset
    real_row, stand_in_row = recs[1], recs[0]
    assert fuse_fit_rows(offset, [real_row])[0] == offset.fuse(HAM_CLASSES, {e: real_row[e] for e in experts}).probs
    shifted = with_stand_in(offset, [False, True])
    assert fuse_fit_rows(offset, [stand_in_row])[0] == shifted.fuse(HAM_CLASSES, {e: stand_in_row[e] for e in experts}).probs
    assert not np.allclose(shifted.coef, offset.coef)


def test_the_artifact_names_the_concept_heads_of_the_records_findings_and_refuses_a_mix():
    from training.fusion import records_heads

    recs = [{"findings": {"streaks": {"absent": 1.0}}, "findings_heads": "mine"}, {"findings": {}, "findings_heads": "other"}]
    assert records_heads(recs) == "mine"  # a record without findings says nothing
    assert records_heads([{"findings": {"streaks": {"absent": 1.0}}}]) == "derm7pt-concept-heads"
    with pytest.raises(ValueError, match="several concept heads"):
        records_heads(recs + [{"findings": {"streaks": {"absent": 1.0}}}])


def test_the_swapped_fold_fits_the_report_half_and_scores_the_calib_half(trained):
    from training.fusion import load_parts

    cfg, _, _ = trained
    parts = load_parts(cfg.experts_file, isic_fit_half="report")
    assert {r["split"] for r in parts["derm_fit"] if r["source"] == "isic2018_val"} == {"report"}
    assert {r["split"] for r in parts["isic_eval"]} == {"calib"}
    assert {r["id"] for r in parts["derm7pt_eval"]} == {r["id"] for r in load_parts(cfg.experts_file)["derm7pt_eval"]}  # Derm7pt val: never fitted
    with pytest.raises(ValueError, match="valid: calib, report"):
        load_parts(cfg.experts_file, isic_fit_half="val")


def test_the_swapped_fold_fits_the_odd_dermnet_half_and_scores_the_even_one(tmp_path):
    from training.fusion import load_parts

    rec = {"source": "dermnet", "split": "heldout", "label": "d1", "modality": "clinical", "modality_rejected": False, "classifier": {},
           "knn": {"d1": 1.0}, "findings": {}, "candidates": ["d1"], "llm": None, "evidence": []}  # fmt: skip
    path = tmp_path / "experts.jsonl"
    path.write_text("".join(json.dumps({**rec, "id": f"dermnet:{'0' * 39}{d}"}) + "\n" for d in "0a13"))  # even: 0, a; odd: 1, 3
    shipped, swapped = load_parts(path), load_parts(path, dermnet_fit_half="odd")
    assert [r["id"][-1] for r in shipped["clin_fit"]] == ["0", "a"] and [r["id"][-1] for r in shipped["clin_eval"]] == ["1", "3"]
    assert swapped["clin_fit"] == shipped["clin_eval"] and swapped["clin_eval"] == shipped["clin_fit"]


def test_predictions_have_one_row_per_evaluation_case_with_its_decision_and_set(trained):
    from training.fusion import load_parts

    cfg, summary, metrics = trained
    rows = [json.loads(line) for line in open(summary["predictions"])]
    parts = load_parts(cfg.experts_file)
    by_part = {p: [r for r in rows if r["part"] == p] for p in {r["part"] for r in rows}}
    assert [r["id"] for r in by_part["isic2018_val_report"]] == [r["id"] for r in parts["isic_eval"]]
    assert len(by_part["derm7pt_val"]) == len(parts["derm7pt_eval"])
    assert set(by_part) == set(metrics["evaluation"])  # every evaluated part (this fixture's photos are all in the clinical fit half)
    for part, recs in by_part.items():
        after = metrics["evaluation"][part]["after"]
        assert np.mean([r["label"] == r["decided"] for r in recs]) == pytest.approx(after["accuracy"], abs=1e-4)
        assert np.mean([r["accepted"] for r in recs]) == pytest.approx(after["selective"]["coverage"], abs=1e-4)
        assert np.mean([r["label"] in r["prediction_set"] for r in recs]) == pytest.approx(after["prediction_sets"][str(cfg.alpha)]["coverage"], abs=1e-4)
    assert set(by_part["derm7pt_val"][0]["experts_top"]) == {"classifier", "knn", "morphology"}
    assert all(r["top5"][0] == r["decided"] and len(r["top5"]) == len(set(r["top5"])) <= 5 for r in rows)


def _two_fold():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("fusion_two_fold", Path(__file__).resolve().parent.parent / "scripts" / "fusion_two_fold.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_two_fold_estimate_scores_every_isic_case_once_by_the_fold_that_did_not_fit_it(trained, tmp_path):
    import yaml

    cfg, _, _ = trained
    tf = _two_fold()
    conf = tmp_path / "fusion.yaml"
    conf.write_text(yaml.safe_dump({"experts_file": str(cfg.experts_file), "dermoscopy_experts": ["classifier", "knn", "morphology"], "clinical_experts": ["knn"],
                                    "c_grid": [0.01, 1.0], "gamma_grid": [0.0, 0.5], "morphology_c_grid": [0.3, 3.0], "n_bootstrap": 20}))  # fmt: skip
    tf.main(["--config", str(conf), "--out", str(tmp_path / "tf")])
    res = json.loads((tmp_path / "tf" / "two_fold.json").read_text())
    isic = [json.loads(line) for line in open(cfg.experts_file) if '"isic2018_val"' in line]
    assert res["isic2018_val, both halves"]["n"] == len(isic)
    assert res["isic2018_val report half (fit on calib)"]["n"] + res["isic2018_val calib half (fit on report)"]["n"] == len(isic)
    for half in ("calib", "report"):
        rows = tf.read_predictions(tmp_path / "tf" / half / "predictions.jsonl")
        assert not [r for r in rows if r["source"] == "isic2018_val" and r["split"] == half]
    assert "classifier_alone" in res["isic2018_val, both halves"]


def test_two_fold_pooling_refuses_a_fold_that_scored_its_own_fit_half():
    tf = _two_fold()
    row = {"id": "isic2018_val:1", "source": "isic2018_val", "split": "calib", "label": "nv", "decided": "nv", "accepted": True, "prediction_set": ["nv"]}
    with pytest.raises(ValueError, match="fitted on the calib half"):
        tf.pool({"calib": [row], "report": []})
    with pytest.raises(ValueError, match="twice"):
        tf.pool({"calib": [{**row, "split": "report"}], "report": [row, row]})
    photo = {**row, "id": "dermnet:1", "source": "dermnet", "split": "heldout"}
    pooled = tf.pool({"calib": [photo], "report": [{**photo, "id": "dermnet:2"}]})
    assert [r["id"] for r in pooled["DermNet held-out, both halves"]] == ["dermnet:1", "dermnet:2"]
    assert pooled["DermNet held-out, odd half (fit on the even half)"] == [photo]
    with pytest.raises(ValueError, match="same DermNet photo twice"):
        tf.pool({"calib": [photo], "report": [photo]})


def test_collect_limit_means_the_first_n_cases_and_resumes_within_them(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from training import fusion_data, reasoner_data

    rows = [SimpleNamespace(id=f"c{i}") for i in range(5)]
    monkeypatch.setattr(fusion_data, "case_rows", lambda sources, feature_dir: rows)

    class Started(Exception):
        pass

    def no_agent(config):
        raise Started  # collecting would start here: the cases to do are already printed

    monkeypatch.setattr(reasoner_data, "make_agent", no_agent)
    out = tmp_path / "experts.jsonl"
    out.write_text("".join(json.dumps({"id": i}) + "\n" for i in ("c0", "c1")))
    # the first 2 cases are done: a rerun with --limit 2 has nothing to do (it used to add c2, c3)
    assert fusion_data.collect(out, ["x"], tmp_path, with_llm=False, limit=2) == out
    assert "2 cases (the first 2 of 5), 2 done, 0 to go" in capsys.readouterr().out
    with pytest.raises(Started):
        fusion_data.collect(out, ["x"], tmp_path, with_llm=False, limit=3)
    assert "3 cases (the first 3 of 5), 2 done, 1 to go" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        fusion_data.main(["--help"])
    assert "first N cases" in capsys.readouterr().out
