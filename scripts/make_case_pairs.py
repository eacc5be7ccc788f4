"""Write the image-caption pairs JSONL that the case index is built from.

Sources (read from the shared data folder, ``models.paths.data_dir()`` unless ``--data-dir``):
  ham10000  the ``train`` split; caption from dx, age, sex and site
  derm7pt   the ``train`` and ``extra`` splits; caption from the diagnosis and the seven criteria
  dermnet   all images; caption "Clinical photograph of <label>."
The ``val`` splits stay out so that they remain usable for model selection. Image paths are written
relative to the data folder (pass it as ``--image-root`` when encoding images). Labels are the
HAM10000 code where the dataset label maps to one (via the knowledge base), else the dataset label.

    python scripts/make_case_pairs.py runs/pairs.jsonl [--sources ham10000,derm7pt,dermnet]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from models.paths import data_dir
from models.vocabulary import SEVEN_POINT, seven_point_phrase
from retrieval.kb import KnowledgeBase
from training.data import DERMNET_HOLDOUT_EVERY, is_dermnet_heldout

SOURCES = ("ham10000", "derm7pt", "dermnet")

HAM_PHRASES = {
    "akiec": "an actinic keratosis or intraepithelial carcinoma",
    "bcc": "a basal cell carcinoma",
    "bkl": "a benign keratosis-like lesion",
    "df": "a dermatofibroma",
    "mel": "a melanoma",
    "nv": "a melanocytic nevus",
    "vasc": "a vascular lesion",
}
_SITE_PHRASES = {"acral": "on acral skin", "genital": "in the genital area", "unknown": ""}


def _article(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def _person(age: str, sex: str) -> str:
    """'a 45-year-old man', 'a girl', 'an infant', '' (nothing known)."""
    sex = sex.strip().lower()
    try:
        years: float | None = float(age)
    except ValueError:
        years = None
    if years is not None and years < 1:
        return "an infant"
    child = years is not None and years < 18
    noun = {"male": "boy" if child else "man", "female": "girl" if child else "woman"}.get(sex)
    if noun is None:
        noun = "child" if child else ("patient" if years is not None else "")
    if years is None:
        return _article(noun) if noun else ""
    return f"a {int(years)}-year-old {noun}" if noun else f"a {int(years)}-year-old patient"


def ham_caption(dx: str, age: str, sex: str, site: str) -> str:
    """E.g. 'Dermoscopy of a melanocytic nevus on the trunk of a 45-year-old man.'"""
    site = site.strip().lower()
    where = _SITE_PHRASES.get(site, f"on the {site}" if site else "")
    who = _person(age, sex)
    parts = [f"Dermoscopy of {HAM_PHRASES[dx]}"]
    if where:
        parts.append(where)
    if who:
        parts.append(f"of {who}")
    return " ".join(parts) + "."


def derm7pt_caption(diagnosis: str, criteria: dict[str, str]) -> str:
    """Diagnosis plus the seven criteria in words."""
    findings = "; ".join(seven_point_phrase(c, criteria[c]) for c in SEVEN_POINT)
    return f"Dermoscopy of {_article(diagnosis)}. 7-point checklist: {findings}."


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def ham10000_pairs(root: Path, kb: KnowledgeBase) -> Iterator[dict[str, Any]]:
    for r in _rows(root / "ham10000" / "metadata.csv"):
        if r["split"] != "train":
            continue
        yield {
            "id": f"ham10000:{r['image_id']}",
            "image": f"ham10000/{r['image']}",
            "caption": ham_caption(r["dx"], r["age"], r["sex"], r["localization"]),
            "label": kb.ham_class_for(r["dx"]) or r["dx"],
            "source": "ham10000",
            "metadata": {k: r[k] for k in ("lesion_id", "dx_type", "age", "sex", "localization") if r.get(k)},
        }


def derm7pt_pairs(root: Path, kb: KnowledgeBase) -> Iterator[dict[str, Any]]:
    for r in _rows(root / "derm7pt" / "meta.csv"):
        if r["split"] not in ("train", "extra"):
            continue
        criteria = {c: r[c] for c in SEVEN_POINT}
        yield {
            "id": f"derm7pt:{r['case_index']}",
            "image": f"derm7pt/images/{r['derm']}",
            "caption": derm7pt_caption(r["diagnosis"], criteria),
            "label": kb.ham_class_for(r["diagnosis"]) or r["diagnosis"],
            "source": "derm7pt",
            "metadata": {"diagnosis": r["diagnosis"], "split": r["split"], **criteria},
        }


def dermnet_pairs(root: Path, kb: KnowledgeBase, holdout_every: int = DERMNET_HOLDOUT_EVERY) -> Iterator[dict[str, Any]]:
    for r in _rows(root / "dermnet" / "labels.csv"):
        if is_dermnet_heldout(r["sha1"], holdout_every):
            continue  # kept for evaluating the clinical path on photos the index has never seen
        yield {
            # File names repeat across classes; the content hash is unique (the set is de-duplicated by it).
            "id": f"dermnet:{r['sha1'][:12]}",
            "image": f"dermnet/{r['image']}",
            "caption": f"Clinical photograph of {r['label']}.",
            "label": kb.ham_class_for(r["label"]) or r["label"],
            "source": "dermnet",
            "metadata": {"diagnosis": r["label"]},
        }


BUILDERS = {"ham10000": ham10000_pairs, "derm7pt": derm7pt_pairs, "dermnet": dermnet_pairs}


def make_pairs(root: Path, sources: tuple[str, ...] = SOURCES, dermnet_holdout: int = DERMNET_HOLDOUT_EVERY) -> list[dict[str, Any]]:
    """All pairs of the given sources, in source order; ids are unique."""
    kb = KnowledgeBase()
    pairs = [p for s in sources for p in (dermnet_pairs(root, kb, dermnet_holdout) if s == "dermnet" else BUILDERS[s](root, kb))]
    dup = [i for i, n in Counter(p["id"] for p in pairs).items() if n > 1]
    if dup:
        raise ValueError(f"duplicate pair ids: {dup[:5]}")
    return pairs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="output JSONL path")
    ap.add_argument("--data-dir", type=Path, default=None, help="shared data folder (default: models.paths.data_dir())")
    ap.add_argument("--sources", default=",".join(SOURCES), help=f"comma-separated subset of {','.join(SOURCES)}")
    ap.add_argument("--dermnet-holdout", type=int, default=DERMNET_HOLDOUT_EVERY, help="hold out 1 in N DermNet photos (0: none)")
    args = ap.parse_args(argv)
    sources = tuple(s.strip() for s in args.sources.split(",") if s.strip())
    unknown = [s for s in sources if s not in BUILDERS]
    if unknown:
        ap.error(f"unknown sources {unknown}; valid: {list(SOURCES)}")
    root = args.data_dir or data_dir()
    if not root.is_dir():
        ap.error(f"data folder not found: {root}")
    pairs = make_pairs(root, sources, args.dermnet_holdout)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
    counts = Counter(p["source"] for p in pairs)
    print(f"wrote {len(pairs)} pairs to {args.out}: {dict(counts)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
