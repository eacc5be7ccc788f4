"""Label vocabularies shared by nodes: HAM10000 codes and their readable names, Derm7pt criteria."""

from __future__ import annotations

HAM_CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
HAM_NAMES: dict[str, str] = {
    "akiec": "actinic keratosis / intraepithelial carcinoma",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "vasc": "vascular lesion",
}
MALIGNANT = {"akiec", "bcc", "mel"}

MODALITIES: tuple[str, ...] = ("clinical", "dermoscopy", "histopathology", "not_skin")

SEVEN_POINT: dict[str, tuple[str, ...]] = {
    "pigment_network": ("absent", "typical", "atypical"),
    "streaks": ("absent", "regular", "irregular"),
    "pigmentation": ("absent", "diffuse regular", "diffuse irregular", "localized irregular"),
    "regression_structures": ("absent", "blue areas", "white areas", "combinations"),
    "dots_and_globules": ("absent", "regular", "irregular"),
    "blue_whitish_veil": ("absent", "present"),
    "vascular_structures": ("absent", "arborizing", "comma", "hairpin", "dotted", "linear irregular", "within regression", "wreath"),
}
"""Derm7pt criteria and their values (the heads' class lists are read from the artifact)."""

SEVEN_POINT_PHRASES: dict[str, dict[str, str]] = {
    "pigment_network": {"absent": "no pigment network", "typical": "a typical (regular) pigment network", "atypical": "an atypical pigment network"},
    "streaks": {"absent": "no streaks", "regular": "regular streaks", "irregular": "irregular streaks"},
    "pigmentation": {
        "absent": "no blotches of pigmentation",
        "diffuse regular": "diffuse regular pigmentation",
        "diffuse irregular": "diffuse irregular pigmentation",
        "localized irregular": "localized irregular pigmentation",
    },
    "regression_structures": {
        "absent": "no regression structures",
        "blue areas": "regression with blue (peppering) areas",
        "white areas": "regression with white scar-like areas",
        "combinations": "regression with combined blue and white areas",
    },
    "dots_and_globules": {"absent": "no dots or globules", "regular": "regular dots and globules", "irregular": "irregular dots and globules"},
    "blue_whitish_veil": {"absent": "no blue-whitish veil", "present": "a blue-whitish veil"},
    "vascular_structures": {
        "absent": "no visible vessels",
        "arborizing": "arborizing vessels",
        "comma": "comma vessels",
        "hairpin": "hairpin vessels",
        "dotted": "dotted vessels",
        "linear irregular": "linear irregular vessels",
        "within regression": "vessels within regression areas",
        "wreath": "wreath vessels",
    },
}
"""One phrase per Derm7pt criterion value: how the agent verbalises findings for the reasoner, and the describer's
training targets; ``evals.morphology.parse_findings`` reads each back to its value (tested)."""

# Findings that score in the 7-point checklist (Argenziano 1998): major = 2 points, minor = 1.
SEVEN_POINT_SCORING: dict[tuple[str, str], int] = {
    ("pigment_network", "atypical"): 2,
    ("blue_whitish_veil", "present"): 2,
    ("vascular_structures", "dotted"): 2,
    ("vascular_structures", "linear irregular"): 2,
    ("streaks", "irregular"): 1,
    ("pigmentation", "diffuse irregular"): 1,
    ("pigmentation", "localized irregular"): 1,
    ("dots_and_globules", "irregular"): 1,
    ("regression_structures", "blue areas"): 1,
    ("regression_structures", "white areas"): 1,
    ("regression_structures", "combinations"): 1,
}


def derm7pt_to_ham(diagnosis: str) -> str | None:
    """Map a Derm7pt diagnosis string to a HAM10000 code (None for 'miscellaneous')."""
    d = diagnosis.lower()
    if "melanoma" in d:
        return "mel"
    if "nevus" in d:
        return "nv"
    if "basal cell" in d:
        return "bcc"
    if "seborrheic" in d or "lentigo" in d or "melanosis" in d:
        return "bkl"
    if "dermatofibroma" in d:
        return "df"
    if "vascular" in d:
        return "vasc"
    return None
