"""Claim check (agent.claims): adversarial LLM outputs are caught; supported statements pass."""

import pytest

from agent.claims import check_text
from retrieval.kb import KnowledgeBase

HAM = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
# A basal cell carcinoma: arborizing vessels, no pigment network, no veil.
OBSERVED = {
    "pigment_network": {"absent": 0.72, "typical": 0.2, "atypical": 0.08},
    "streaks": {"absent": 0.9, "regular": 0.06, "irregular": 0.04},
    "blue_whitish_veil": {"absent": 0.93, "present": 0.07},
    "vascular_structures": {"arborizing": 0.68, "absent": 0.2, "dotted": 0.12},
}
EVIDENCE = {"kb:basal_cell_carcinoma#checklist", "case:derm7pt:12", "finding:vascular_structures", "expert:classifier"}


@pytest.fixture(scope="module")
def kb():
    return KnowledgeBase()


def check(kb, text, candidates=HAM):
    return check_text(text, candidates=candidates, observed=OBSERVED, kb=kb, evidence_ids=EVIDENCE)


@pytest.mark.parametrize(
    "text, kind",
    [
        ("Basal cell carcinoma is a type of benign keratosis that is often associated with actinic keratosis.", "category"),  # the example
        ("Melanoma is a benign lesion.", "category"),
        ("Dermatofibroma is a form of melanoma.", "category"),
        ("Arborizing vessels point to melanoma.", "pairing"),  # finding attributed to the wrong diagnosis
        ("The arborizing vessels are typical of a melanocytic nevus.", "pairing"),
        ("A blue-whitish veil is present, typical of melanoma.", "finding"),  # invented finding
        ("There are irregular streaks at the periphery.", "finding"),
        ("The lesion shows an atypical pigment network.", "finding"),
        ("The similar cases [case:isic:999] show basal cell carcinoma.", "citation"),  # invented citation
        ("See [kb:melanoma#checklist].", "citation"),
        ("This is most likely bullous pemphigoid.", "diagnosis"),  # not a candidate
        ("Palmoplantar pustulosis and ichthyosis are in the differential.", "diagnosis"),
        ("No pigment network argues against basal cell carcinoma.", "pairing"),  # argues against with a finding it expects
    ],
)
def test_adversarial_outputs_are_caught(kb, text, kind):
    result = check(kb, text)
    assert not result.passed
    assert kind in {c.kind for c in result.failures}, result.reasons()


@pytest.mark.parametrize(
    "text",
    [
        "Arborizing vessels and no pigment network fit basal cell carcinoma [kb:basal_cell_carcinoma#checklist].",
        "Basal cell carcinoma is a keratinocyte carcinoma.",
        "Basal cell carcinoma is malignant.",
        "Arborizing vessels argue against a melanocytic nevus.",
        "The classifier [expert:classifier] and a similar case [case:derm7pt:12] favour basal cell carcinoma.",
        "Seborrheic keratosis is a type of benign keratosis.",
    ],
)
def test_supported_statements_pass(kb, text):
    result = check(kb, text)
    assert result.passed, result.reasons()


def test_clinical_candidates_are_kb_labels(kb):
    text = "Psoriasis is the most likely diagnosis."
    assert check(kb, text, candidates=["Psoriasis", "Discoid eczema"]).passed
    assert not check(kb, text, candidates=["Discoid eczema"]).passed
