"""Zero-shot candidate-list classification for any VLM backend (MM-Skin protocol).

Each image is shown to the VLM with MM-Skin's prompt listing the candidate names; the answer is
mapped to a label with :func:`evals.answers.match_candidate` (no match or several labels: invalid,
scored as wrong). Answers are cached per image (sha256 of its bytes) and configuration, so
re-scoring, a changed candidate matcher or a resumed run never calls the VLM again for a done image.

Options (``options:`` in the benchmark YAML, or ``--opt``):

- ``vlm`` (required): ``{backend, model, options}`` from the ``vlm`` registry in
  ``models.backends`` (``transformers`` for local image-text-to-text weights, ``openai-compatible``
  for a served model, ``feature-vlm`` for the project's feature VLM, which is given the sklesion
  features and probabilities of each image); ``options`` are constructor arguments (``device``,
  ``base_url``, ...).
- ``candidates``: label → name shown in the prompt, or a list of labels. Default: the benchmark's
  labels with their readable names (``models.vocabulary.HAM_NAMES`` for HAM10000 codes).
- ``prompt``: the template, with ``{candidates}`` (default: MM-Skin's, ``evals.answers.MMSKIN_PROMPT``).
- ``max_new_tokens`` (32), ``batch_size`` (8 images per ``generate`` call).
- ``n_bootstrap`` (1000 resamples for the 95% CIs; 0 = none), ``seed`` (0, the bootstrap's).
- ``allow_partial`` (false): with ``--rescore``, score only the cases with a cached answer.

Metrics: accuracy, macro precision (over the classes present), balanced accuracy and the
invalid-answer rate, each with a bootstrap 95% CI; per-class recall; confusion matrix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from evals.answers import MMSKIN_PROMPT, format_prompt, match_candidate
from evals.base import Predictions, ProtocolContext, ProtocolResult
from evals.metrics import with_ci
from evals.fill import cached_map
from evals.protocols.common import BackendSpec, config_hash, open_rgb
from models.resolve import sha256_file

INVALID = "(invalid)"
HEADLINE = ("accuracy", "macro_precision", "balanced_accuracy")


class Options(BaseModel):
    """Zero-shot protocol options (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    vlm: BackendSpec = Field(description="The VLM backend: {backend, model, options}.")
    candidates: dict[str, str] | list[str] | None = Field(None, description="label → prompt name, or labels; default: the benchmark's labels, readable.")
    prompt: str = Field(MMSKIN_PROMPT, description="Prompt template with {candidates}.")
    max_new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(8, ge=1)
    n_bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples for the CIs (0: none).")
    seed: int = Field(0, description="Bootstrap seed.")
    allow_partial: bool = Field(False, description="With --rescore: score only the cases with a cached answer.")


def default_candidates(labels: list[str]) -> dict[str, str]:
    """label → readable name: HAM10000 codes get ``HAM_NAMES``; other labels are shown as written."""
    from models.vocabulary import HAM_NAMES

    return {label: HAM_NAMES.get(label, label.replace("_", " ")) for label in labels}


def run(ctx: ProtocolContext) -> ProtocolResult:
    """Ask the VLM about every labelled case and score the matched answers."""
    return score_predictions(ctx, predict(ctx))


@dataclass
class Loaded:
    """What both steps derive from the context: options, the labelled cases with images, the candidates and the prompt."""

    opts: Options
    cases: list[Any]
    skipped: int
    labels: list[str]
    candidates: dict[str, str]
    prompt: str


def load(ctx: ProtocolContext) -> Loaded:
    if "vlm" not in ctx.options:
        # No VLM ships with the project: say how to name one rather than pydantic's bare "field required".
        raise ValueError(
            f"{ctx.bench.name}: the zero_shot protocol needs a VLM, e.g. --opt 'vlm={{backend: transformers, model: /path/to/hf-vlm}}' "
            "or --opt 'vlm={backend: openai-compatible, model: NAME, options: {base_url: http://host:8000/v1}}'"
        )
    opts = Options.model_validate(ctx.options)
    cases = [c for c in ctx.cases if c.label is not None and c.image is not None]
    if not cases:
        raise ValueError(f"{ctx.bench.name}: no case has both an image and a label")
    labels = list(ctx.bench.labels) or sorted({c.label for c in cases})
    if opts.candidates is None:
        candidates = default_candidates(labels)
    elif isinstance(opts.candidates, list):
        candidates = {c: c for c in opts.candidates}
    else:
        candidates = dict(opts.candidates)
    missing = sorted({c.label for c in cases} - set(candidates))
    if missing:
        raise ValueError(f"case labels {missing} are not among the candidates {sorted(candidates)}")
    return Loaded(opts, cases, len(ctx.cases) - len(cases), labels, candidates, format_prompt(list(candidates.values()), opts.prompt))


def predict(ctx: ProtocolContext) -> Predictions:
    """The VLM's answer for each labelled image (cached per image and configuration)."""
    from evals.cache import case_key

    ld = load(ctx)
    opts, cases, prompt = ld.opts, ld.cases, ld.prompt
    # The answer depends on the VLM, its options, the prompt and the generation length; matching is redone every run.
    cfg = config_hash({"vlm": opts.vlm.model_dump(), "prompt": prompt, "max_new_tokens": opts.max_new_tokens})
    keys = [case_key(sha256_file(c.image), cfg, kind="zero_shot") for c in cases]
    case_of = dict(zip(keys, cases))
    backend: dict[str, Any] = {}

    def prepare(missing: int, todo: int) -> None:
        backend["vlm"] = vlm = opts.vlm.create("vlm")
        ctx.log(f"zero_shot: {len(cases)} cases, {len(cases) - missing} cached, {missing} to ask {vlm.model_id}")

    def ask(chunk: list[str]) -> list[dict[str, Any]]:
        vlm = backend["vlm"]
        images = open_rgb(case_of[k].image for k in chunk)
        kwargs = {}
        if getattr(vlm, "needs_features", False):
            # Feature-based VLMs (models.backends.feature_vlm) read the lesion classifier's output, not pixels.
            if "classifier" not in backend:
                from models.sklesion import SklesionClassifier

                backend["classifier"] = SklesionClassifier()
            enc = backend["classifier"].predict(images)
            kwargs = {"features": enc.features, "probs": enc.probs}
        out = vlm.generate(images, [prompt] * len(chunk), max_new_tokens=opts.max_new_tokens, temperature=0.0, **kwargs)
        return [{"kind": "zero_shot", "case_id": case_of[k].id, "status": "ok", "answer": text, "model_id": vlm.model_id} for k, text in zip(chunk, out)]

    filled = cached_map(ctx, keys, ask, what="zero_shot", batch_size=opts.batch_size, allow_partial=opts.allow_partial, prepare=prepare)
    model_id = backend["vlm"].model_id if "vlm" in backend else None
    return Predictions([filled.records.get(k) for k in keys], {"missing": filled.missing, "computed": filled.computed, "seconds": filled.seconds, "model_id": model_id})


def score_predictions(ctx: ProtocolContext, predictions: Predictions) -> ProtocolResult:
    """Match each answer to a candidate and score (no VLM runs)."""
    import numpy as np

    from evals import plots
    from evals.classification import fmt, score
    from evals.report import md_table

    ld = load(ctx)
    opts, labels, candidates, prompt, skipped = ld.opts, ld.labels, ld.candidates, ld.prompt, ld.skipped
    keep = [i for i, r in enumerate(predictions.records) if r is not None]
    cases = [ld.cases[i] for i in keep]
    answers = [predictions.records[i]["answer"] for i in keep]
    model_id = predictions.stats.get("model_id")
    n_missing, n_computed, seconds = predictions.stats.get("missing", 0), predictions.stats.get("computed", 0), predictions.stats.get("seconds", 0.0)

    y = [c.label for c in cases]
    matched = [match_candidate(a or "", candidates, ctx.bench.aliases) for a in answers]
    p = [m if m is not None else INVALID for m in matched]
    scored = score(y, p, labels, list(HEADLINE), n_boot=opts.n_bootstrap, seed=opts.seed)
    invalid = np.array([m is None for m in matched], float)
    metrics: dict[str, Any] = {
        "n": len(cases),
        "vlm": opts.vlm.model_dump(),
        "prompt": prompt,
        **scored["headline"],
        "invalid_rate": with_ci(np.mean, invalid, n=opts.n_bootstrap, seed=opts.seed),
        "per_class_recall": scored["per_class_recall"],
        "support": scored["support"],
        "confusion": scored["confusion"],
    }

    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    with open(ctx.out_dir / "zero_shot_predictions.jsonl", "w", encoding="utf-8") as f:
        for c, a, m in zip(cases, answers, matched):
            f.write(json.dumps({"id": c.id, "label": c.label, "answer": a, "matched": m}) + "\n")

    cm = scored["confusion"]
    tables = {
        "Zero-shot classification": md_table(
            ["metric", "value [95% CI]"], [[k, fmt(metrics[k])] for k in (*HEADLINE, "invalid_rate")]
        ),
        "Per class": md_table(
            ["class", "name in prompt", "n", "recall"],
            [[c, candidates[c], scored["support"][c], scored["per_class_recall"].get(c, "-")] for c in labels if scored["support"][c]],
        ),
        "Confusion (rows: truth, columns: matched answer)": md_table(
            ["truth \\ answer", *cm["labels"]], [[c, *row] for c, row in zip(cm["labels"], cm["matrix"]) if any(row)]
        ),
    }
    title = f"{ctx.bench.name}: zero-shot"
    figs = {"Confusion matrix": plots.confusion_matrix(cm["matrix"], cm["labels"], ctx.out_dir / "plots" / "zero_shot_confusion.png", title)}
    notes = [
        f"Prompt: {prompt!r}. Answers are matched to the candidates case-insensitively, whole words, longest match; "
        "an answer naming no candidate, or several, is invalid and counted as wrong.",
        f"VLM {opts.vlm.backend}:{opts.vlm.model}; {n_missing} answers generated this run, {len(cases) - n_missing} from the cache.",
    ]
    if skipped:
        notes.append(f"{skipped} cases without a label or image were skipped.")
    if n_computed:
        notes.append(f"Throughput: {n_computed / max(seconds, 1e-9):.2f} images/s ({model_id}).")
    return ProtocolResult(metrics=metrics, tables=tables, plots=figs, n_cases=len(cases), notes=notes)
