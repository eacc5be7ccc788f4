"""The trained consistency verifier: scoring, calibration, offline re-scoring and the verify node's use of it."""

import numpy as np
import pytest
from PIL import Image

from agent import Agent
from agent.testing import backends
from models.verifier import ConsistencyModel
from models.vocabulary import SEVEN_POINT
from retrieval.kb import KnowledgeBase
from training import verifier as tv


def _findings(values: dict[str, str], sharp: float = 0.8) -> dict[str, dict[str, float]]:
    """Findings putting ``sharp`` on the given value per criterion ('absent' otherwise), the rest spread."""
    out = {}
    for c, vals in SEVEN_POINT.items():
        top = values.get(c, "absent")
        rest = (1 - sharp) / (len(vals) - 1)
        out[c] = {v: sharp if v == top else rest for v in vals}
    return out


MEL = {"pigment_network": "atypical", "streaks": "irregular", "blue_whitish_veil": "present", "dots_and_globules": "irregular", "pigmentation": "localized irregular"}
NV = {"pigment_network": "typical", "dots_and_globules": "regular", "pigmentation": "diffuse regular"}
BKL = {"pigment_network": "absent", "pigmentation": "diffuse regular"}


@pytest.fixture(scope="module")
def fitted():
    """A verifier fitted with the training code on constructed cases (jittered findings of mel, nv, bkl)."""
    rng = np.random.default_rng(0)
    kb = KnowledgeBase()
    expected = {c: {k: list(v) for k, v in kb.entry_for_label(c).expected_7pt.items()} for c in ("mel", "nv", "bkl")}
    findings, truth = [], []
    for lab, vals in (("mel", MEL), ("nv", NV), ("bkl", BKL)):
        for _ in range(30):
            findings.append(_findings(vals, float(rng.uniform(0.5, 0.95))))
            truth.append(lab)
    model = ConsistencyModel(sorted(expected), sorted(expected), expected, np.zeros(0, np.float32), 0.0, meta={"id": "test-verifier"})
    pairs = tv.make_pairs(findings, truth, sorted(expected), rng)
    x = np.stack([model.features(p[0], p[1]) for p in pairs])
    y = np.array([p[2] for p in pairs])
    model.weight, model.bias = tv.fit_logistic(x, y, 1.0, weight=tv.per_label_weights(y, np.array([p[1] for p in pairs])))
    model.platt = tv.fit_platt(model.logit(x), y)
    return model


def test_swapped_diagnosis_scores_lower_than_the_true_one(fitted):
    mel_case = _findings(MEL, 0.7)
    assert fitted.score(mel_case, "mel") > fitted.score(mel_case, "nv")
    assert fitted.score(mel_case, "mel") > fitted.score(mel_case, "bkl")
    nv_case = _findings(NV, 0.7)
    assert fitted.score(nv_case, "nv") > fitted.score(nv_case, "mel")


def test_calibrated_scores_are_probabilities_and_monotone(fitted):
    logits = np.array([-1e3, -5.0, 0.0, 5.0, 1e3])
    p = fitted.calibrate(logits)
    assert np.all((p >= 0) & (p <= 1)) and np.all(np.diff(p) >= 0)
    a, b = tv.fit_platt(np.array([-2.0, -1.0, 1.0, 2.0, -0.5, 0.5]), np.array([0, 0, 1, 1, 1, 0]))
    assert a > 0  # a higher raw logit never means less consistent


def test_unscorable_labels_and_empty_findings_give_none(fitted):
    assert fitted.score(_findings(MEL), "Acne vulgaris") is None
    assert fitted.score({}, "mel") is None


def test_save_load_round_trip(fitted, tmp_path):
    fitted.save(tmp_path / "v.safetensors")
    back = ConsistencyModel.load(tmp_path / "v.safetensors")
    case = _findings(MEL, 0.6)
    assert back.score(case, "mel") == fitted.score(case, "mel") and back.threshold == fitted.threshold and back.model_id == "test-verifier"


def test_rescore_uses_trained_score_for_ranking_and_acceptance(fitted):
    def record(label, truth, conf, findings, verdict="accept", reasons=("ok",)):
        fs = [{"criterion": c, "value": max(p, key=p.get), "confidence": max(p.values()), "probs": p} for c, p in findings.items()]
        return {"id": f"{label}{conf}", "truth": truth, "status": "ok",
                "diagnosis": {"label": label, "confidence": conf, "verdict": verdict, "findings": fs, "reasons": list(reasons), "morphology_agreement": 0.5, "trace": []}}  # fmt: skip

    fitted.threshold = 0.5
    recs = [record("mel", "mel", 0.6, _findings(MEL)), record("nv", "mel", 0.9, _findings(MEL)),  # confident but inconsistent: wrong
            record("nv", "nv", 0.7, _findings(NV), "abstain", ["findings do not match melanocytic nevus (agreement 0.30 < 0.35)", "refer to a dermatologist"])]  # fmt: skip
    res = tv.rescore(recs, fitted)
    assert res["rules (as recorded)"]["aurc"] > res["confidence x P(consistent)"]["aurc"]
    # the morphology-only abstention is lifted by a consistent score; the inconsistent accept becomes an abstention
    assert res["confidence x P(consistent)"]["accuracy_on_accepted"] == 1.0 and res["confidence x P(consistent)"]["abstention_rate"] == pytest.approx(1 / 3, abs=1e-3)


def _img():
    return Image.new("RGB", (64, 48), (150, 90, 70))


def _constant_model(bias: float) -> ConsistencyModel:
    expected = {"mel": {"pigment_network": ["atypical"]}, "nv": {"pigment_network": ["typical"]}}
    m = ConsistencyModel(["mel", "nv"], [], expected, np.zeros(0, np.float32), bias, threshold=0.5, meta={"id": "const-verifier"})
    m.weight = np.zeros(m.dim, np.float32)
    return m


def test_verify_node_uses_the_trained_score_when_configured():
    d = Agent(backends=backends(consistency_model=_constant_model(3.0)), overrides=["verifier.consistency_model=const-verifier"]).diagnose(_img())
    v = [t for t in d.trace if t.node == "verify"][-1]
    assert d.verdict == "accept" and v.model_id == "const-verifier"
    assert v.outputs["verification"]["consistency_score"] == pytest.approx(0.9526, abs=1e-3)


def test_inconsistent_trained_score_sends_back_then_abstains():
    agent = Agent(backends=backends(consistency_model=_constant_model(-3.0)), overrides=["verifier.consistency_model=const-verifier", "verifier.max_rounds=2"])
    d = agent.diagnose(_img())
    verdicts = [t.outputs["verification"] for t in d.trace if t.node == "verify"]
    assert verdicts[0]["decision"] == "revise" and "P(consistent)" in verdicts[0]["feedback"]
    assert d.verdict == "abstain" and any("P(consistent) 0.05 < 0.50" in r for r in d.reasons)


def test_default_config_uses_risk_control_without_the_trained_score():
    d = Agent(backends=backends()).diagnose(_img())
    v = [t for t in d.trace if t.node == "verify"][-1]
    assert v.model_id == "risk-control" and v.outputs["verification"]["consistency_score"] is None
    assert v.outputs["verification"]["acceptance_score"] is not None
