"""Seven-point criteria from free text (for VLM describers) and criteria metrics."""

from __future__ import annotations

import re

# Ordered: more specific phrases first so that "atypical network" is not read as "typical network".
# A negation's scope ends at a comma ("no streaks, regression with blue areas" does not negate regression).
_PATTERNS: dict[str, list[tuple[str, str]]] = {
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
    for criterion, patterns in _PATTERNS.items():
        for pattern, value in patterns:
            if re.search(pattern, t):
                out[criterion] = value
                break
    return out
