"""The bundled knowledge base: schema, dataset-label coverage, 7-point expectations, lookup."""

from __future__ import annotations

import csv
import json

import pytest
from pydantic import ValidationError

from models.vocabulary import HAM_CLASSES, SEVEN_POINT, derm7pt_to_ham
from retrieval.kb import (
    KB_PATH,
    KBEntry,
    KnowledgeBase,
    kb_sha256,
    load_kb,
    normalize_label,
)

DERM7PT_DIAGNOSES = (
    "basal cell carcinoma", "blue nevus", "clark nevus", "combined nevus", "congenital nevus", "dermal nevus",
    "dermatofibroma", "lentigo", "melanoma (0.76 to 1.5 mm)", "melanoma (in situ)", "melanoma (less than 0.76 mm)",
    "melanoma (more than 1.5 mm)", "melanoma metastasis", "melanosis", "miscellaneous", "recurrent nevus",
    "reed or spitz nevus", "seborrheic keratosis", "vascular lesion",
)
DERMNET_LABELS = (
    "Acne vulgaris", "Actinic keratosis", "Acute febrile neutrophilic dermatosis (Sweet syndrome)", "Alopecia areata",
    "Amelanotic melanoma", "Atopic dermatitis", "Atypical mycobacterial infection", "Basal cell carcinoma",
    "Bullous pemphigoid", "Cutaneous lupus erythematosus", "Discoid eczema", "Discoid lupus erythematosus",
    "Generalised pustular psoriasis", "Genital psoriasis", "Granuloma annulare", "Hand dermatitis", "Herpes simplex",
    "Hidradenitis suppurativa", "Ichthyosis", "Impetigo", "Keloid scar", "Keratosis pilaris", "Leg ulcer",
    "Lichen planus", "Lichen simplex", "Melanocytic naevus", "Melanoma in situ", "Molluscum contagiosum", "Morphoea",
    "Mycosis fungoides", "Onychomycosis", "Oral mucositis - Stomatitis", "Orf", "Palmoplantar keratoderma",
    "Palmoplantar pustulosis", "Papular acrodermatitis of childhood", "Pemphigoid gestationis", "Pemphigus vulgaris",
    "Pityriasis versicolor", "Pretibial myxoedema", "Prurigo", "Psoriasis", "Purpura", "Pyoderma", "Rosacea",
    "Sarcoidosis", "Scabies", "Squamous cell carcinoma", "Sunburn", "Syphilis", "Systemic lupus erythematosus",
    "Telangiectasia", "Venous eczema", "Vitiligo", "Vulval intraepithelial neoplasia", "Xanthoma",
)
ALL_LABELS = (*HAM_CLASSES, *DERM7PT_DIAGNOSES, *DERMNET_LABELS)


@pytest.fixture(scope="module")
def kb() -> KnowledgeBase:
    return KnowledgeBase.load()


def _matching_entries(entries: list[KBEntry], label: str) -> list[str]:
    key = normalize_label(label)
    return [e.id for e in entries if key in {normalize_label(n) for n in (e.name, *e.aliases)}]


def test_kb_loads_and_ids_are_unique(kb):
    assert len(kb) >= 73
    ids = [e.id for e in kb]
    assert len(ids) == len(set(ids))
    assert all(e.id.startswith("kb:") for e in kb)


def test_every_differential_exists(kb):
    ids = {e.id for e in kb}
    for e in kb:
        assert e.id not in e.differentials, f"{e.id} lists itself"
        for d in e.differentials:
            assert d in ids, f"{e.id}: unknown differential {d}"


@pytest.mark.parametrize("label", ALL_LABELS)
def test_every_dataset_label_maps_to_exactly_one_entry(kb, label):
    assert _matching_entries(kb.entries, label) == [kb.entry_for_label(label).id]


def test_expected_7pt_uses_derm7pt_vocabulary(kb):
    for e in kb:
        for criterion, values in e.expected_7pt.items():
            assert criterion in SEVEN_POINT
            assert values and set(values) <= set(SEVEN_POINT[criterion]), (e.id, criterion)
    # The dermoscopic diagnoses carry expectations; the residual Derm7pt class does not need any.
    for label in (*HAM_CLASSES, *DERM7PT_DIAGNOSES):
        entry = kb.entry_for_label(label)
        assert entry.expected_7pt or entry.id == "kb:miscellaneous", label


def test_ham_class_mapping_matches_dataset_conventions(kb):
    for code in HAM_CLASSES:
        assert kb.ham_class_for(code) == code
    for diagnosis in DERM7PT_DIAGNOSES:
        assert kb.ham_class_for(diagnosis) == derm7pt_to_ham(diagnosis), diagnosis
    assert kb.ham_class_for("Melanoma in situ") == "mel"
    assert kb.ham_class_for("Melanocytic naevus") == "nv"
    assert kb.ham_class_for("Acne vulgaris") is None
    assert kb.ham_class_for("not a label") is None


def test_entries_are_complete(kb):
    for e in kb:
        assert e.morphology.clinical.strip()
        assert e.references, e.id
        assert e.sites, e.id
        assert e.malignant is not None or e.id == "kb:miscellaneous"
    assert kb["mel"].malignant and kb["bcc"].malignant and not kb["nv"].malignant


def test_lookup_is_case_and_space_insensitive(kb):
    assert kb.lookup("  MELANOMA  (in situ) ").id == "kb:melanoma_in_situ"
    assert kb.lookup("kb:melanoma").id == "kb:melanoma"
    assert kb.lookup("melanoma").id == "kb:melanoma"
    assert kb.get("melanoma") is None  # get() is by exact id only
    assert "acne vulgaris" in kb and "nonsense" not in kb
    with pytest.raises(KeyError):
        kb["nonsense"]
    assert {e.id for e in kb.for_ham_class("mel")} >= {"kb:melanoma", "kb:melanoma_in_situ", "kb:amelanotic_melanoma"}


def _entry(**over) -> dict:
    base = {"id": "kb:x", "name": "X", "morphology": {"clinical": "text"}}
    base.update(over)
    return base


def test_schema_rejects_bad_entries():
    KBEntry.model_validate(_entry())
    with pytest.raises(ValidationError):
        KBEntry.model_validate(_entry(colour="red"))  # extra='forbid'
    with pytest.raises(ValidationError):
        KBEntry.model_validate(_entry(id="melanoma"))
    with pytest.raises(ValidationError):
        KBEntry.model_validate(_entry(ham_class="naevus"))
    with pytest.raises(ValidationError):
        KBEntry.model_validate(_entry(expected_7pt={"streaks": ["wavy"]}))
    with pytest.raises(ValidationError):
        KBEntry.model_validate(_entry(expected_7pt={"asymmetry": ["present"]}))
    with pytest.raises(ValidationError):
        KBEntry.model_validate(_entry(morphology={"clinical": "x", "confocal": "y"}))


def test_knowledge_base_rejects_conflicts():
    a = KBEntry.model_validate(_entry(id="kb:a", name="A", aliases=["same"]))
    b = KBEntry.model_validate(_entry(id="kb:b", name="B", aliases=["SAME"]))
    with pytest.raises(ValueError, match="claimed by both"):
        KnowledgeBase([a, b])
    c = KBEntry.model_validate(_entry(id="kb:c", name="C", differentials=["kb:missing"]))
    with pytest.raises(ValueError, match="unknown ids"):
        KnowledgeBase([c])
    with pytest.raises(ValueError, match="duplicate"):
        KnowledgeBase([a, a])


def test_load_kb_reports_the_bad_line(tmp_path):
    p = tmp_path / "kb.jsonl"
    p.write_text(json.dumps(_entry()) + "\n" + json.dumps(_entry(id="kb:y", extra_field=1)) + "\n")
    with pytest.raises(ValueError, match=":2:"):
        load_kb(p)


def test_bundled_file_is_one_json_object_per_line():
    lines = [line for line in KB_PATH.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(lines) == len(load_kb())
    assert all(json.loads(line)["id"].startswith("kb:") for line in lines)


def test_shipped_kb_index_matches_the_knowledge_base():
    """Editing knowledge_base.jsonl requires rebuilding models/artifacts/kb_index (see retrieval/cli.py)."""
    from retrieval.kb import default_kb_index_dir

    manifest_path = default_kb_index_dir() / "manifest.json"
    if not manifest_path.is_file():
        pytest.skip("no shipped KB index")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["kind"] == "kb"
    assert manifest["kb_sha256"] == kb_sha256(load_kb()), (
        "stale KB index: dermgraph index build --kind kb --out models/artifacts/kb_index"
    )
    assert "/" not in manifest["created_by"].split()[0]


@pytest.mark.data
def test_dataset_label_lists_are_complete(shared_data, kb):
    with open(shared_data / "derm7pt" / "meta.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["diagnosis"] for r in rows} == set(DERM7PT_DIAGNOSES)
    for criterion, values in SEVEN_POINT.items():
        assert {r[criterion] for r in rows} == set(values), criterion
    with open(shared_data / "dermnet" / "labels.csv", newline="") as f:
        assert {r["label"] for r in csv.DictReader(f)} == set(DERMNET_LABELS)
    with open(shared_data / "ham10000" / "metadata.csv", newline="") as f:
        assert {r["dx"] for r in csv.DictReader(f)} == set(HAM_CLASSES)
