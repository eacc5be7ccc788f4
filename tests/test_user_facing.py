"""What a user reads: configuration overrides and their errors, metadata checks, the reported reasoner source and
versions, the order of the differential and where input warnings are shown (test doubles only: fast)."""

import dataclasses

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from agent import Agent
from agent.config import DEFAULT_ROUTING, AgentConfig, load_config
from agent.limits import InputError, InputLimits, check_metadata
from agent.state import PatientMetadata
from agent.testing import backends, fusion_model
from models.vocabulary import HAM_CLASSES


def img(colour=(150, 90, 70), size=(64, 48), mode="RGB"):
    return Image.new(mode, size, colour if mode == "RGB" else (*colour, 128))


def no_llm_fusion():
    """The fusion double without the LLM among its experts (like the shipped artifact)."""
    fm = fusion_model()
    d, c = fm.modalities["dermoscopy"], fm.modalities["clinical"]
    fm.modalities["dermoscopy"] = dataclasses.replace(d, experts=d.experts[:3], coef=d.coef[:, : 3 * len(HAM_CLASSES)],
                                                      centre={k: v for k, v in d.centre.items() if k != "llm"})  # fmt: skip
    fm.modalities["clinical"] = dataclasses.replace(c, experts=["knn"], coef=c.coef[:1])
    return fm


# --------------------------------------------------------------------------- routing overrides (defect 1)


def test_a_routing_override_changes_one_key_and_keeps_the_shipped_table():
    cfg = load_config(None, ["routing.dermoscopy.classifier=false"])
    assert cfg.route("dermoscopy") == DEFAULT_ROUTING["dermoscopy"].model_copy(update={"classifier": False})
    for modality in ("clinical", "histopathology", "not_skin"):
        assert cfg.route(modality) == DEFAULT_ROUTING[modality]
    assert cfg.route("clinical").reasoner and cfg.route("dermoscopy").reasoner  # diagnosis stays on
    # Setting a key to its shipped value is the default configuration, fingerprint included.
    same = load_config(None, ["routing.clinical.reasoner=true"])
    assert same.routing is None and same.fingerprint() == AgentConfig().fingerprint()


def test_a_routing_override_on_a_configured_table_keeps_that_table(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("routing:\n  dermoscopy: {classifier: true, reasoner: true}\n")
    cfg = load_config(f, ["routing.dermoscopy.describer=true"])
    assert set(cfg.routing) == {"dermoscopy"}
    assert (cfg.route("dermoscopy").classifier, cfg.route("dermoscopy").describer, cfg.route("dermoscopy").case_sources) == (True, True, [])


# --------------------------------------------------------------------------- configuration errors (defect 6)


@pytest.mark.parametrize(
    ("override", "where", "suggestion", "valid"),
    [
        ("reasoner.num_sample=3", ("reasoner", "num_sample"), "num_samples", "valid keys of reasoner: llm, fusion"),
        ("routing.dermoscopy.classifer=false", ("routing", "dermoscopy", "classifer"), "classifier", "valid keys of routing.dermoscopy: describer"),
        ("encoder.second_expert.bakend=x", ("encoder", "second_expert", "bakend"), "backend", "valid keys of encoder.second_expert: backend, model, options"),
        ("devise=cpu", ("devise",), "device", "valid top-level keys: device, seed"),
    ],
)
def test_an_unknown_key_names_the_valid_keys_and_the_likely_one(override, where, suggestion, valid):
    with pytest.raises(ValidationError) as info:
        load_config(None, [override])
    err = info.value.errors()[0]
    assert tuple(err["loc"]) == where
    assert f"did you mean {suggestion!r}?" in err["msg"] and valid in err["msg"]


def test_an_unknown_key_in_a_file_gets_the_same_message(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("verifier:\n  max_round: 3\n")
    with pytest.raises(ValidationError, match="did you mean 'max_rounds'"):
        load_config(f)


@pytest.mark.parametrize("device", ["tpu", "cuda0", "cuda:x", "auto"])
def test_an_unknown_device_lists_the_valid_ones(device):
    with pytest.raises(ValidationError) as info:
        load_config(None, [f"device={device}"])
    err = info.value.errors()[0]
    assert err["loc"] == ("device",) and err["msg"] == f"unknown device {device!r}; valid: cpu, cuda, cuda:N (N a GPU index), mps"


def test_cuda_on_a_machine_without_it_fails_before_a_model_loads(monkeypatch):
    import torch

    from agent.config import check_device
    from agent.runtime import Runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=f"^device={device}: CUDA is not available on this machine .*; use device=cpu$"):
            check_device(device)
    # The configuration itself loads (a Ray driver on a CPU-only head node sends it to GPU actors) ...
    config = load_config(None, ["device=cuda"])
    built = []
    with pytest.raises(ValueError, match="CUDA is not available"):  # ... but a runtime here refuses to build a model on it
        Runtime(config)._get("classifier", lambda: built.append(1))
    assert not built
    assert Runtime(config, {"classifier": "double"})._get("classifier", lambda: built.append(1)) == "double"  # a given backend needs no device
    check_device("cpu")


def test_a_device_index_beyond_the_machine_is_refused(monkeypatch):
    import torch

    from agent.config import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_device("cuda:0")
    with pytest.raises(ValueError, match=r"there is no GPU 3 \(this machine has 1: cuda:0..cuda:0\)"):
        check_device("cuda:3")


@pytest.mark.parametrize("age", [float("nan"), float("inf"), "nan", "-inf"])
def test_a_non_finite_age_is_rejected_clearly(age):
    with pytest.raises(InputError, match="age must be a finite number of years"):
        check_metadata({"age": age}, InputLimits())
    assert check_metadata({"age": 62.5}, InputLimits()).age == 62.5


# --------------------------------------------------------------------------- site vocabulary (defect 2)


def test_an_unrecognised_site_is_reported_as_not_used():
    from models.sklesion import map_location, metadata_vector

    (warning,) = PatientMetadata(site="bakc").site_warnings()
    assert "'bakc' is not a recognised body site and was not used" in warning and "did you mean 'back'?" in warning
    assert "arm, head-or-neck, leg-or-genital, trunk" in warning
    assert "did you mean" not in PatientMetadata(site="moon").site_warnings()[0]
    # The classifier reads what the warning says: an unrecognised site is the "unknown" location.
    assert map_location("bakc") == "unknown" and np.array_equal(metadata_vector({"site": "bakc"}), metadata_vector({}))


@pytest.mark.parametrize(("site", "location"), [("back", "trunk"), ("Upper-Back", "trunk"), ("head-or-neck", "head-or-neck"),
                                                ("lower_extremity", "leg-or-genital"), ("acral", "unknown"), ("unknown", "unknown")])  # fmt: skip
def test_recognised_sites_give_no_warning(site, location):
    from models.sklesion import map_location

    assert PatientMetadata(site=site).site_warnings() == [] and map_location(site) == location


def test_the_diagnosis_carries_the_site_warning_and_shows_it():
    d = Agent(backends=backends()).diagnose(img(), metadata={"site": "bakc"})
    assert d.metadata.site == "bakc"  # echoed as given, with the warning that it was not used
    assert len(d.input_warnings) == 1 and "not used" in d.input_warnings[0]
    assert f"input warning: {d.input_warnings[0]}" in d.summary()
    assert Agent(backends=backends()).diagnose(img(), metadata={"site": "back"}).input_warnings == []


# --------------------------------------------------------------------------- reasoner source and versions (defect 3)


def test_without_the_llm_the_stacker_is_reported_and_the_llm_is_not_a_version():
    llm = backends()["llm"]
    d = Agent(backends=backends(llm=llm, fusion=no_llm_fusion())).diagnose(img())
    assert llm.scored == 0 and llm.chats == []
    assert d.reasoner_source == "stacker"
    assert "llm" not in d.versions["models"] and d.versions["models"]["fusion"] == "fusion-stacker"
    reason = [t for t in d.trace if t.node == "reason"][0].outputs["reasoning"]
    assert reason["llm_probs"] is None and "llm_ran" not in reason


def test_when_the_llm_runs_it_is_reported_and_listed():
    llm = backends()["llm"]
    d = Agent(backends=backends(llm=llm)).diagnose(img())  # this fusion double reads the LLM's scores
    assert llm.scored > 0 and d.reasoner_source == "llm" and d.versions["models"]["llm"] == "smollm2-135m-instruct"
    summary_only = Agent(backends=backends(fusion=no_llm_fusion()), overrides=["reasoner.llm_summary=true"]).diagnose(img())
    assert summary_only.reasoner_source == "stacker" and summary_only.versions["models"]["llm"] == "smollm2-135m-instruct"


# --------------------------------------------------------------------------- differential order (defect 4)


def test_the_differential_is_the_decided_label_then_by_probability():
    fm = fusion_model()
    d = fm.modalities["dermoscopy"]
    C = len(HAM_CLASSES)
    # A decision model that always decides 'nv' while the calibrated probabilities favour melanoma.
    fm.modalities["dermoscopy"] = dataclasses.replace(d, decision_coef=np.zeros((C, d.coef.shape[1])),
                                                      decision_intercept=np.where(np.array(HAM_CLASSES) == "nv", 5.0, 0.0))  # fmt: skip
    out = Agent(backends=backends(fusion=fm)).diagnose(img())
    probs = {x.label: x.probability for x in out.differential}
    assert out.label == out.differential[0].label == "nv" and probs["mel"] > probs["nv"]
    rest = [x.probability for x in out.differential[1:]]
    assert rest == sorted(rest, reverse=True)
    line = next(x for x in out.summary().splitlines() if x.startswith("differential"))
    assert line.startswith("differential (decided label first, then by probability): melanocytic nevus ")
    assert "decided label first" in out._repr_html_()


# --------------------------------------------------------------------------- input warnings in text and HTML (defect 5)


def test_input_warnings_are_shown_in_the_summary_and_the_html():
    d = Agent(backends=backends()).diagnose(img(size=(20, 20), mode="RGBA"))
    assert {"alpha channel composited on white", "very small image (20x20 px): results are unreliable"} <= set(d.input_warnings)
    text, page = d.summary(), d._repr_html_()
    for w in d.input_warnings:
        assert f"input warning: {w}" in text
        assert w in page
    assert "Input warnings" in page
    plain = Agent(backends=backends()).diagnose(img())
    assert "input warning" not in plain.summary() and "Input warnings" not in plain._repr_html_()


@pytest.mark.parametrize(("override", "message"), [
    ("reasoner.fusion=nonexistent", "reasoner.fusion=nonexistent: not a registered model id, a source URI (pypi:, pkg:, path:, hf:) or an existing path "
                                    "(registered calibration ids: efficientnet-lite0-derm-crossfit, fusion-calibration, fusion-stacker)"),
    ("modality.head=modality-hed", "modality.head=modality-hed: not a registered model id, a source URI (pypi:, pkg:, path:, hf:) or an existing path; "
                                   "did you mean modality-head? (registered head ids: "),
])  # fmt: skip
def test_an_unknown_artifact_is_one_plain_line_naming_the_valid_ids(override, message):
    from agent.config import check_references

    with pytest.raises(ValueError) as info:
        check_references(load_config(None, [override]))
    text = str(info.value)
    assert text.startswith(message) and "\n" not in text and "['" not in text and not text.startswith(("'", '"'))
    check_references(load_config(None, [override]), skip=[override.split("=")[0]])  # e.g. a test double stands in


def test_registered_ids_source_uris_and_paths_are_valid_references(tmp_path):
    from agent.config import check_references

    check_references(AgentConfig())
    check_references(load_config(None, [f"reasoner.fusion={tmp_path}", "modality.head=pkg:artifacts/modality_head"]))


def test_the_documented_default_config_file_is_the_default():
    """configs/default.yaml says it is what Agent() uses: loading it gives exactly the defaults (a changed default must be
    written there too)."""
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
    assert load_config(path).model_dump() == AgentConfig().model_dump()
