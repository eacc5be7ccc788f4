"""The project's one vocabulary: HAM10000 codes and names, modalities, the Derm7pt 7-point criteria and
values, their phrases (as the agent writes them, and as the knowledge base words them) and the parser that
reads them back from free text.

It sits at the bottom layer (it imports nothing of the project): models, retrieval, the agent's nodes,
evals and training all read labels and findings from here, so a criterion value is spelled once.
"""


from __future__ import annotations

import re

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
training targets; :func:`parse_findings` reads each back to its value (tested)."""

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


# ---------------------------------------------------------------------- knowledge-base wording

SEVEN_POINT_TEXTBOOK: dict[str, dict[str, str]] = {
    "pigment_network": {"absent": "no pigment network", "typical": "typical (regular) pigment network",
                        "atypical": "atypical pigment network"},
    "streaks": {"absent": "no streaks", "regular": "regular streaks (symmetric starburst)",
                "irregular": "irregular streaks (pseudopods, radial streaming)"},
    "pigmentation": {"absent": "no blotches", "diffuse regular": "diffuse regular pigmentation",
                     "diffuse irregular": "diffuse irregular pigmentation (blotches)",
                     "localized irregular": "localized irregular pigmentation (blotch)"},
    "regression_structures": {"absent": "no regression structures",
                              "blue areas": "regression with blue-grey areas (peppering)",
                              "white areas": "regression with white scar-like areas",
                              "combinations": "regression with combined blue and white areas"},
    "dots_and_globules": {"absent": "no dots or globules", "regular": "regular dots and globules",
                          "irregular": "irregular dots and globules"},
    "blue_whitish_veil": {"absent": "no blue-whitish veil", "present": "blue-whitish veil"},
    "vascular_structures": {"absent": "no vascular structures", "arborizing": "arborizing vessels",
                            "comma": "comma vessels", "hairpin": "hairpin (looped) vessels",
                            "dotted": "dotted vessels", "linear irregular": "linear irregular vessels",
                            "within regression": "vessels within regression", "wreath": "wreath (crown) vessels"},
}
"""The knowledge base's wording of each value (with textbook synonyms in brackets): the text of its checklist
passages, embedded in the shipped ``kb-index``. It differs from :data:`SEVEN_POINT_PHRASES` on purpose:
changing either changes what the agent says or retrieves, so each stays as its artifacts were built."""


def seven_point_phrase(criterion: str, value: str) -> str:
    """Readable phrase for a 7-point criterion value, e.g. ('streaks', 'irregular') -> 'irregular streaks (...)'."""
    try:
        return SEVEN_POINT_TEXTBOOK[criterion][value]
    except KeyError:
        raise ValueError(f"unknown 7-point criterion/value {criterion!r}={value!r}") from None


# ---------------------------------------------------------------------- reading findings back from text

# Ordered: more specific phrases first so that "atypical network" is not read as "typical network".
# A negation's scope ends at a comma ("no streaks, regression with blue areas" does not negate regression).
SEVEN_POINT_PATTERNS: dict[str, list[tuple[str, str]]] = {
    "pigment_network": [
        (r"\b(no|without|absent)\b[^.;,]{0,20}\b(pigment(ed)? )?network", "absent"),
        (r"\b(atypical|irregular|broadened|prominent)\b[^.;]{0,20}network", "atypical"),
        (r"\b(typical|regular|reticular|delicate)\b[^.;]{0,20}network", "typical"),
    ],
    "streaks": [
        (r"\b(no|without|absent)\b[^.;,]{0,15}(streaks|pseudopods|radial streaming)", "absent"),
        (r"\birregular\b[^.;]{0,15}(streaks|pseudopods)|\bpseudopods\b", "irregular"),
        (r"\b(regular|symmetric|starburst)\b[^.;]{0,15}(streaks|pattern)", "regular"),
    ],
    "pigmentation": [
        (r"\b(no|without|absent)\b[^.;,]{0,10}\b(blotch\w*|pigmentation)\b", "absent"),
        (r"\b(localized|localised|focal) irregular (pigmentation|blotch)", "localized irregular"),
        (r"\b(diffuse )?irregular (pigmentation|blotch)", "diffuse irregular"),
        (r"\b(diffuse )?regular (pigmentation|blotch)", "diffuse regular"),
    ],
    "regression_structures": [
        (r"\b(no|without|absent)\b[^.;,]{0,15}regression", "absent"),
        (r"(blue|peppering)[^.;]{0,20}(and|with)[^.;]{0,20}white[^.;]{0,20}(regression|scar)|combin\w+ regression", "combinations"),
        (r"combined blue and white", "combinations"),
        (r"(white|scar-like)[^.;]{0,20}(area|regression)", "white areas"),
        (r"(blue|grey|gray|peppering)[^.;]{0,20}(area|regression|granul)", "blue areas"),
    ],
    "dots_and_globules": [
        (r"\b(no|without|absent)\b[^.;,]{0,15}(dots|globules)", "absent"),
        (r"\birregular\b[^.;]{0,15}(dots|globules)", "irregular"),
        (r"\bregular\b[^.;]{0,15}(dots|globules)", "regular"),
    ],
    "blue_whitish_veil": [
        (r"\b(no|without|absent)\b[^.;,]{0,15}(blue[- ]white|blue[- ]whitish)", "absent"),
        (r"blue[- ]?(white|whitish)[^.;]{0,10}(veil|structure)", "present"),
    ],
    "vascular_structures": [
        (r"\b(no|without|absent)\b[^.;,]{0,15}(vessels|vascular)", "absent"),
        (r"arboriz\w*|arboris\w*|branching vessels|telangiectas", "arborizing"),
        (r"hairpin", "hairpin"),
        (r"comma", "comma"),
        (r"wreath|crown vessels", "wreath"),
        (r"dotted vessels|pinpoint vessels|dotted", "dotted"),
        (r"linear irregular|polymorphous vessels|irregular vessels", "linear irregular"),
        (r"vessels within regression", "within regression"),
    ],
}


def parse_findings(text: str) -> dict[str, str]:
    """Recover Derm7pt criteria values mentioned in free text; unmentioned criteria are omitted.

    >>> parse_findings("Atypical pigment network with a blue-whitish veil; no vessels.")["blue_whitish_veil"]
    'present'
    """
    t = text.lower()
    out: dict[str, str] = {}
    for criterion, patterns in SEVEN_POINT_PATTERNS.items():
        for pattern, value in patterns:
            if re.search(pattern, t):
                out[criterion] = value
                break
    return out
