"""Reasoner cases rendered exactly as the agent renders them, from images the lesion classifier has not seen.

Why: the sklesion classifier was trained on HAM10000, so on HAM10000 images its probabilities are far
more confident and accurate than in deployment; a reasoner trained on them learns to trust it blindly.

Training cases (``TRAIN_SOURCES``):

* Derm7pt ``train`` + ``extra`` (diagnoses mapped to HAM10000 classes; unseen by the classifier): the
  bulk, with the classifier's real out-of-sample outputs.
* Optionally a few HAM10000 train-subset images of classes Derm7pt lacks or barely has (akiec, df,
  vasc, bcc), whose classifier probabilities are **perturbed to the error profile measured on Derm7pt
  train** (:func:`measure_error_profile`, :func:`perturb_probs`): a temperature matching the mean top
  probability, then the top class redrawn from the smoothed Derm7pt-train confusion row of the true
  class (swapping it with the original top), so the classifier is wrong as often, and as confidently,
  as on unseen images. Their retrieved cases exclude every image of the same HAM lesion.

Report sets, never used for training: ``isic2018_val`` (all of it) and Derm7pt ``val``
(:func:`report_rows`); :func:`check_no_report_leak` enforces it.

Each case's image goes through the agent's own graph (encode, modality, morphology, retrieval:
``Agent.run(..., until="retrieve")``) with the two image networks replayed from their cached outputs
(:mod:`models.backends.replay`, keyed by the image's pixels). The query's own image (and, for HAM10000, its lesion) is
excluded from its retrieved cases (``CaseState.exclude_cases``). The prompt and the candidates are
``agent.nodes.reason.reasoner_inputs``, what the reason node sends the LLM; the target is
``Diagnosis: <true name>\\nRationale: <one line citing [E#] tags>``.

    dermgraph train reasoner-sft --config configs/train/reasoner_sft.yaml --set build_only=true   # build and inspect (no training)
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from pydantic import Field

from models.vocabulary import HAM_CLASSES, derm7pt_to_ham
from training.config import Strict

TRAIN_SOURCES = ("derm7pt:train", "derm7pt:extra")
REPORT_SOURCES = ("isic2018_val", "derm7pt:val")
"""The sets reasoner results are reported on; nothing from them may enter training."""


class ReasonerDataConfig(Strict):
    """Which cases the reasoner trains on, and how they are rendered."""

    derm7pt_splits: list[str] = Field(["train", "extra"], description="Derm7pt splits used for training ('val' is a report set and is refused).")
    ham_classes: list[str] = Field(
        ["akiec", "bcc", "df", "vasc"], description="HAM10000 classes added with perturbed classifier outputs (Derm7pt has no akiec and few df/vasc/bcc)."
    )
    ham_per_class: int = Field(30, ge=0, description="HAM10000 train-subset images per class in ham_classes (0: none).")
    max_cases: int | None = Field(None, ge=1, description="Class-stratified, seeded subsample of the built cases (None: all).")
    class_power: float = Field(1.0, ge=0, le=1, description="Subsampling class quotas ∝ count**class_power (1: data proportions, 0.5: rare classes up-weighted).")
    agent_config: Path | None = Field(None, description="Agent YAML whose heads, indexes and fusion render the cases (None: the shipped defaults).")
    profile_smoothing: float = Field(10.0, ge=0, description="Pseudo-counts pulling sparse confusion rows of the error profile towards the pooled one.")
    expert_crossfit: str | None = Field(None, description="The second visual expert's cross-fitted outputs on its training images (registry id "
                                                          "efficientnet-lite0-derm-crossfit, a bundle or folder): each HAM10000 / Derm7pt row it "
                                                          "covers gets a deployment-like second opinion (ImageEncoding.expert_probs).")
    expert_features: Path | None = Field(None, description="The shipped expert's outputs on unseen images (python -m training.eval_encoder features), for rows the cross-fitted ones do not cover.")


# --------------------------------------------------------------------------- case rows


@dataclass
class CaseRow:
    """One image with its cached classifier outputs, before rendering."""

    id: str
    source: str
    split: str
    image: str  # relative to the source folder (the feature cache's id)
    label: str  # HAM10000 code
    probs: np.ndarray
    features: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)
    exclude: set[str] = field(default_factory=set)  # case-index ids the query must not retrieve
    perturbed: bool = False
    expert_heads: dict[str, np.ndarray] = field(default_factory=dict)  # the second visual expert's head outputs (none: no opinion)
    expert_features: np.ndarray | None = None  # its pooled features (ImageEncoding.expert_features; clinical photos search cases with them)


def _features(source: str, feature_dir: Path) -> dict[str, np.ndarray]:
    from training.data import load_features

    return load_features(source, "full", feature_dir)


def derm7pt_rows(splits: Iterable[str], feature_dir: Path) -> list[CaseRow]:
    """Derm7pt cases of ``splits`` that have cached features and a HAM10000-mappable diagnosis."""
    from training.data import aligned, source_table

    splits = set(splits)
    rows, f = aligned([r for r in source_table("derm7pt") if r["split"] in splits], _features("derm7pt", feature_dir))
    out = []
    for r, p, x in zip(rows, f["probs"], f["features"]):
        label = derm7pt_to_ham(r["diagnosis"])
        if label is None:
            continue
        cid = f"derm7pt:{r['case_index']}"
        # The case index stores Derm7pt cases under this id and this image path.
        out.append(CaseRow(cid, "derm7pt", r["split"], r["image"], label, p, x, exclude={cid}))
    return out


def isic_rows(feature_dir: Path, part: str = "all") -> list[CaseRow]:
    """isic2018_val cases; ``part`` 'all', or the 'calib'/'report' half of ``training.calibrate_fusion.isic_split``."""
    from training.calibrate_fusion import isic_split
    from training.data import aligned, source_table

    table = source_table("isic2018_val")
    half = isic_split(table)
    keep = [r for r in table if part == "all" or half[r["image_id"]] == part]
    rows, f = aligned(keep, _features("isic2018_val", feature_dir))
    return [CaseRow(f"isic2018_val:{r['image_id']}", "isic2018_val", half[r["image_id"]], r["image"], r["dx"], p, x,
                    exclude={f"isic2018_val:{r['image_id']}"}) for r, p, x in zip(rows, f["probs"], f["features"])]  # fmt: skip


def report_rows(feature_dir: Path, isic_part: str = "all") -> list[CaseRow]:
    """The report sets: isic2018_val (``isic_part``) and Derm7pt val."""
    return isic_rows(feature_dir, isic_part) + derm7pt_rows(["val"], feature_dir)


def _ham_metadata(r: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if r.get("age") not in (None, "", "nan"):
        meta["age"] = float(r["age"])
    if r.get("sex") in ("male", "female"):
        meta["sex"] = r["sex"]
    if r.get("localization") not in (None, "", "unknown"):
        meta["site"] = r["localization"]
    return meta


def ham_rows(classes: Iterable[str], per_class: int, feature_dir: Path, seed: int, only: set[str] | None = None) -> list[CaseRow]:
    """Up to ``per_class`` HAM10000 ``train`` images of each class (seeded; one image per lesion; among ``only``
    images if given), probabilities NOT yet perturbed."""
    from training.data import aligned, source_table

    table = source_table("ham10000")
    rows, f = aligned([r for r in table if r["split"] == "train" and (only is None or r["image"] in only)], _features("ham10000", feature_dir))
    by_lesion: dict[str, list[str]] = {}
    for r in table:
        by_lesion.setdefault(r["lesion_id"], []).append(f"ham10000:{r['image_id']}")
    out = []
    for c in classes:
        idx = [i for i, r in enumerate(rows) if r["dx"] == c]
        # One image per lesion: several images of one lesion are near-duplicates.
        firsts, seen = [], set()
        for i in sorted(idx, key=lambda i: _hash(seed, rows[i]["image_id"])):
            if rows[i]["lesion_id"] not in seen:
                seen.add(rows[i]["lesion_id"])
                firsts.append(i)
        for i in firsts[:per_class]:
            r = rows[i]
            out.append(CaseRow(f"ham10000:{r['image_id']}", "ham10000", "train", r["image"], c, f["probs"][i], f["features"][i],
                               metadata=_ham_metadata(r), exclude=set(by_lesion[r["lesion_id"]])))  # fmt: skip
    return out


def attach_expert_probs(rows: list[CaseRow], features: Path | None = None, crossfit: str | Path | None = None, second: Any = None) -> dict[str, int]:
    """Give each row the second visual expert's outputs to replay (``CaseRow.expert_heads``, and
    ``expert_features`` where cached): cross-fitted ones for the expert's own training images, else the
    shipped expert's cached ones.
    Training images the cross-fitted outputs miss get none (never in-sample ones). Returns counts. ``second``: the
    agent's ``encoder.second_expert`` (default: the default agent's), whose ``members`` / ``views`` options the
    cross-fitted outputs are combined by (:func:`training.encoder.agent_outputs`), as the agent runs its expert."""
    from agent.config import AgentConfig
    from training.encoder import TRAINED_SPLITS, VIEWS_SUFFIX, agent_outputs, expert_outputs

    if second is None:
        second = AgentConfig().encoder.second_expert
    opts = second.options if second is not None else {}
    counts = {"crossfit": 0, "shipped": 0, "none": 0}
    by_source: dict[str, dict] = {}
    for r in rows:
        if r.source not in by_source:
            by_source[r.source] = expert_outputs(r.source, features, crossfit)
        got = by_source[r.source].get(r.image)
        if got is None or (not got[1] and r.split in TRAINED_SPLITS.get(r.source, ())):
            counts["none"] += 1
            continue
        if got[1]:
            view_heads = () if not opts.get("views") else opts.get("view_heads") or [k.removesuffix(VIEWS_SUFFIX) for k in got[0] if k.endswith(VIEWS_SUFFIX)]
            heads = agent_outputs(got[0], opts.get("members_if"), tuple(view_heads), opts.get("views_if"))[0]
        else:
            heads = got[0]
        r.expert_heads = {h: v for h, v in heads.items() if h != "features"}
        if "features" in got[0]:  # the shipped expert's on an image it did not train on, or the fold model's (crossfit_features)
            r.expert_features = np.asarray(got[0]["features"], np.float32)
        counts["crossfit" if got[1] else "shipped"] += 1
    return counts


def _hash(seed: int, key: str) -> str:
    return hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()


def check_no_report_leak(rows: Iterable[CaseRow]) -> None:
    """Raise if any row belongs to a report set (isic2018_val, Derm7pt val)."""
    bad = [r.id for r in rows if r.source == "isic2018_val" or (r.source == "derm7pt" and r.split == "val")]
    if bad:
        raise ValueError(f"{len(bad)} report-set cases in the training data (first: {bad[:3]})")


# --------------------------------------------------------------------------- error profile of unseen images


def measure_error_profile(feature_dir: Path, smoothing: float = 10.0) -> dict[str, Any]:
    """The classifier's error profile on Derm7pt ``train`` (unseen by it; never the report sets).

    Returns ``confusion`` (7x7 row-stochastic P(top = k | true = y), each row smoothed with
    ``smoothing`` pseudo-counts towards the pooled profile: pooled accuracy on the diagonal, errors
    spread by the pooled predicted-class marginal), ``mean_top`` (mean top probability), ``accuracy``
    and per-class counts ``n``.
    """
    rows = derm7pt_rows(["train"], feature_dir)
    y = np.array([HAM_CLASSES.index(r.label) for r in rows])
    p = np.stack([r.probs for r in rows])
    k = p.argmax(1)
    counts = np.zeros((7, 7))
    np.add.at(counts, (y, k), 1)
    acc = float((k == y).mean())
    marginal = np.bincount(k, minlength=7) + 1.0
    conf = np.zeros((7, 7))
    for c in range(7):
        prior = marginal.copy()
        prior[c] = 0
        prior = (1 - acc) * prior / prior.sum()
        prior[c] = acc
        conf[c] = (counts[c] + smoothing * prior) / (counts[c].sum() + smoothing)
    return {"confusion": conf.round(4).tolist(), "mean_top": float(p.max(1).mean()), "accuracy": acc,
            "n": dict(zip(HAM_CLASSES, counts.sum(1).astype(int).tolist())), "measured_on": "derm7pt:train"}  # fmt: skip


def fit_temperature(probs: np.ndarray, target_mean_top: float) -> float:
    """Temperature T such that the mean top probability of ``probs ** (1/T)`` (renormalised) is ``target_mean_top``."""
    logp = np.log(np.clip(probs, 1e-8, 1))

    def mean_top(t: float) -> float:
        z = logp / t
        z = z - z.max(1, keepdims=True)
        q = np.exp(z)
        return float((q.max(1) / q.sum(1)).mean())

    lo, hi = 0.25, 20.0
    if mean_top(1.0) <= target_mean_top:
        return 1.0  # never sharpen: only soften over-confident outputs
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_top(mid) > target_mean_top else (lo, mid)
    return round((lo + hi) / 2, 4)


def perturb_probs(probs: np.ndarray, label: str, profile: dict[str, Any], temperature: float, rng: np.random.Generator) -> np.ndarray:
    """Classifier probabilities of a seen (HAM10000) image made to look like an unseen one: soften with
    ``temperature``, draw the top class from the profile's confusion row of ``label`` and swap it in."""
    z = np.log(np.clip(probs, 1e-8, 1)) / temperature
    q = np.exp(z - z.max())
    q = q / q.sum()
    row = np.asarray(profile["confusion"][HAM_CLASSES.index(label)], dtype=float)
    k = int(rng.choice(7, p=row / row.sum()))
    top = int(q.argmax())
    if k != top:
        q[[k, top]] = q[[top, k]]
    return q.astype(np.float32)


# --------------------------------------------------------------------------- rendering through the agent's nodes


def make_agent(agent_config: Path | None = None):
    """The agent (real heads, KB, case index, fusion) whose graph renders the cases. Its two image networks are
    replayed (:mod:`models.backends.replay`): :func:`render_state` records each row's cached (cross-fitted,
    perturbed) outputs for the row's image, and the graph runs from the encode node as for a live case."""
    from agent.agent import Agent
    from agent.config import load_config
    from models.backends.replay import ReplayClassifier, ReplayExpert
    from models.efficientnet import expert_info
    from models.resolve import resolve

    config = load_config(agent_config)
    backends: dict[str, Any] = {"classifier": ReplayClassifier(labels=HAM_CLASSES, model_id=getattr(config.encoder.classifier, "model", "sklesion-xception"))}
    ref = config.encoder.second_expert
    if ref is not None:
        backends["second_expert"] = ReplayExpert(expert_info(Path(resolve(ref.model, progress=False)))["heads"], model_id=ref.model)
    backends["clinical_probe"] = None  # its outputs are collected on their own (training.fusion_data.write_probe_outputs)
    return Agent(config, backends=backends)


def render_state(row: CaseRow, agent):
    """The agent's state after encode → modality → morphology → retrieval on the row's image, the networks
    replaying the row's recorded outputs, with the row's own image(s) left out of its retrieved cases. Every
    expert runs, on a rejected image too (the whole graph would send it to the verifier): training data
    records them all."""
    from models.paths import data_dir

    rt = agent.runtime
    if not hasattr(rt.classifier, "add"):
        raise TypeError("render_state needs an agent whose networks replay recorded outputs (training.reasoner_data.make_agent)")
    state = agent.prepare(data_dir() / row.source / row.image, metadata=row.metadata or None, exclude_cases=row.exclude)
    rt.classifier.add(state.image_sha256, row.probs, row.features)
    if rt.second_expert is not None:
        rt.second_expert.add(state.image_sha256, row.expert_heads or None, row.expert_features)
    state = agent.run(state, until="modality")
    return agent.run(state, start_at="morphology", until="retrieve")


_OPENERS = ["{finding}", "The findings fit {name}: {finding}", "{Finding} point to {name}", "Dermoscopy shows {finding}, typical of {name}"]


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def target_rationale(state, rt, label: str, names: dict[str, str], clf_display: dict[str, float] | None, rng: random.Random) -> str:
    """A one-line rationale for ``label`` citing real [E#] tags: supporting findings (the KB's expected
    7-point values the describer observed) with the KB passage, classifier agreement or disagreement,
    and similar cases with that label. Always cites at least one tag."""
    from models.vocabulary import SEVEN_POINT_PHRASES
    from agent.prompts import evidence_tags

    name = names[label]
    tags = {v: k for k, v in evidence_tags(state.retrieval.evidence).items()}
    entry = rt.knowledge.entry_for_label(label)
    kb_tag = next((tags[ev.id] for ev in state.retrieval.evidence if ev.kind == "knowledge" and entry is not None
                   and ev.label in {label, entry.id}), None)  # fmt: skip
    case_tags = [tags[ev.id] for ev in state.retrieval.evidence if ev.kind == "case" and ev.label == label]
    parts: list[str] = []

    expected = entry.expected_7pt if entry is not None else {}
    support = [f for f in (state.morphology.findings if state.morphology else [])
               if f.value != "absent" and f.value in expected.get(f.criterion, ())]  # fmt: skip
    if support:
        phrases = [SEVEN_POINT_PHRASES[f.criterion][f.value] for f in sorted(support, key=lambda f: -f.confidence)[:2]]
        text = rng.choice(_OPENERS).format(finding=_join(phrases), Finding=_join(phrases)[:1].upper() + _join(phrases)[1:], name=name)
        parts.append(text[:1].upper() + text[1:] + (f" [{kb_tag}]" if kb_tag else ""))
    elif kb_tag:
        parts.append(rng.choice([f"The knowledge base entry on {name} fits [{kb_tag}]", f"{name[:1].upper() + name[1:]} is described in [{kb_tag}]"]))

    if clf_display:
        top = max(clf_display, key=clf_display.get)
        if top == label:
            parts.append(rng.choice([f"the classifier agrees ({clf_display[label]:.2f})", f"the lesion classifier also favours it ({clf_display[label]:.2f})"]))
        else:
            parts.append(rng.choice([f"the classifier favours {names[top]} ({clf_display[top]:.2f}), but the evidence conflicts",
                                     f"although the classifier prefers {names[top]} ({clf_display[top]:.2f})"]))  # fmt: skip

    if case_tags:
        cited = "".join(f"[{t}]" for t in case_tags[:3])
        parts.append(rng.choice([f"similar cases {cited} were {name}", f"similar {name} cases {cited} match"]))
    elif not any("[E" in p for p in parts):
        nearest = next((ev for ev in state.retrieval.evidence), None)
        if nearest is not None:
            parts.append(f"the nearest evidence [{tags[nearest.id]}] is {names.get(nearest.label or '', nearest.label)}")

    # One or two clauses: the agent writes the rationale with a ~40-token budget.
    first, rest = parts[0], parts[1:]
    if len(rest) > 1:
        cited_rest = [p for p in rest if "[E" in p]
        rest = [rng.choice(cited_rest if "[E" not in first and cited_rest else rest)]
    text = first[:1].upper() + first[1:]
    if rest:
        text += "; " + rest[0]
    return text + "."


def render_case(row: CaseRow, agent, seed: int = 0) -> dict[str, Any] | None:
    """The training/eval record of one case (None when the modality head does not see dermoscopy:
    the agent would then not ask the reasoner about HAM10000 classes)."""
    from agent.nodes.reason import reasoner_inputs
    from agent.prompts import write_answer

    state, rt = render_state(row, agent), agent.runtime
    if state.modality.label != "dermoscopy":
        return None
    shown = reasoner_inputs(state, rt)
    names = shown["names"]
    rng = random.Random(_hash(seed, row.id))
    rationale = target_rationale(state, rt, row.label, names, shown["classifier_display"], rng)
    return {
        "id": row.id,
        "source": row.source,
        "split": row.split,
        "image": f"{row.source}/{row.image}",
        "label": row.label,
        "label_name": names[row.label],
        "perturbed": row.perturbed,
        "prompt": shown["prompt"],
        "completion": [{"role": "assistant", "content": write_answer(names[row.label], rationale)}],
        **{k: shown[k] for k in ("candidates", "candidate_labels", "tags", "evidence_ids", "classifier_top")},
        # JSON strings: variable-key dicts do not fit an Arrow schema.
        "observed": json.dumps(shown["observed"], sort_keys=True),
        "expected": json.dumps(shown["expected"], sort_keys=True),
    }


def render_cases(rows: list[CaseRow], agent, seed: int = 0) -> tuple[list[dict[str, Any]], list[str]]:
    """Render rows (in order) through ``agent`` (:func:`make_agent`); returns the records and the ids skipped as not dermoscopy."""
    out, skipped = [], []
    for r in rows:
        rec = render_case(r, agent, seed)
        if rec is None:
            skipped.append(r.id)
        else:
            out.append(rec)
    return out, skipped


def stratified_subset(items: list, n: int | None, seed: int, power: float = 1.0, key: Callable[[Any], Any] | None = None) -> list:
    """A seeded, class-stratified subset of ``n`` items (CaseRows or records with ``id`` and ``label``),
    in a deterministic order. Class quotas are proportional to ``count ** power`` (1: as in the data,
    0.5: rare classes up-weighted), at least one per class where ``n`` allows, never above the count.
    ``key`` gives an item's stratum (default: its label)."""
    def get(x, k):
        return x[k] if isinstance(x, dict) else getattr(x, k)

    key = key or (lambda x: get(x, "label"))

    ordered = sorted(items, key=lambda x: _hash(seed, get(x, "id")))
    if n is None or n >= len(items):
        return ordered
    by: dict[str, list] = {}
    for x in ordered:
        by.setdefault(key(x), []).append(x)
    weight = {c: len(v) ** power for c, v in by.items()}
    total = sum(weight.values())
    quota = {c: min(len(by[c]), max(1, round(n * w / total))) for c, w in weight.items()}
    while sum(quota.values()) > n:
        quota[max(quota, key=lambda c: (quota[c], c))] -= 1
    while sum(quota.values()) < n:
        quota[max((c for c in by if quota[c] < len(by[c])), key=lambda c: (len(by[c]) - quota[c], c))] += 1
    keep = {id(x) for c, v in by.items() for x in v[: quota[c]]}
    return [x for x in ordered if id(x) in keep]


def build_training_cases(cfg: ReasonerDataConfig, feature_dir: Path, seed: int = 0, agent=None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Training records (deterministic given ``seed``) and a summary of how they were built."""
    if "val" in cfg.derm7pt_splits:
        raise ValueError("Derm7pt 'val' is a report set: it cannot be used for reasoner training")
    feature_dir = Path(feature_dir)
    rows = derm7pt_rows(cfg.derm7pt_splits, feature_dir)
    info: dict[str, Any] = {"derm7pt": len(rows)}
    if cfg.ham_per_class and cfg.ham_classes:
        profile = measure_error_profile(feature_dir, cfg.profile_smoothing)
        only = None
        if cfg.expert_crossfit:  # HAM10000 rows only where the second expert has a deployment-like (cross-fitted) opinion
            from training.encoder import crossfit_outputs

            cf = crossfit_outputs(cfg.expert_crossfit, "ham10000")
            only = {str(i) for i in cf["ids"]} if cf is not None else set()
        ham = ham_rows(cfg.ham_classes, cfg.ham_per_class, feature_dir, seed, only)
        all_ham = _features("ham10000", feature_dir)["probs"]
        temperature = fit_temperature(all_ham, profile["mean_top"])
        rng = np.random.default_rng(seed)
        for r in ham:
            r.probs = perturb_probs(r.probs, r.label, profile, temperature, rng)
            r.perturbed = True
        rows += ham
        info.update(ham10000=len(ham), error_profile=profile, temperature=temperature)
    check_no_report_leak(rows)
    rows = stratified_subset(rows, cfg.max_cases, seed, cfg.class_power)
    if cfg.expert_crossfit or cfg.expert_features:
        info["second_expert"] = attach_expert_probs(rows, cfg.expert_features, cfg.expert_crossfit)
    records, skipped = render_cases(rows, agent or make_agent(cfg.agent_config), seed)
    info.update(cases=len(records), skipped_not_dermoscopy=len(skipped), labels=dict(sorted(Counter(r["label"] for r in records).items())))
    return records, info


def write_jsonl(records: Iterable[dict[str, Any]], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
