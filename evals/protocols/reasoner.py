"""Protocol: the reasoner LLM (the base model and fine-tuned PEFT adapters) on the prompts the agent renders.

Per case the agent runs up to retrieval (encode, modality, morphology, retrieve) and renders the reasoner's
chat exactly as its reason node does (:func:`agent.nodes.reason.reasoner_inputs`). Each model in ``models``
then (1) ranks the candidates by the log-probability of each name after ``Diagnosis: `` (what the agent fuses)
and (2) writes a greedy free answer of ``max_new_tokens``, checked for the answer format
(:func:`agent.prompts.is_format_valid`) and for the agreement of the stated diagnosis with the observed
findings (:func:`agent.prompts.stated_consistency`; consistent when at least the agent configuration's
``verifier.min_morphology_agreement``). Only dermoscopy cases are scored: the agent asks the reasoner about
HAM10000 classes for those alone. One cached record per case and model (the model keyed by its adapter's
weights), so a parsing fix rescoring with ``--rescore`` runs no model.

The GPU job evaluates its pre-rendered prompts with the same :func:`case_outputs` and :func:`metrics`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from evals.base import Predictions, ProtocolContext, ProtocolResult

COLUMNS = ("n", "accuracy", "balanced_accuracy", "mel_sensitivity", "format_valid", "consistency_rate", "mean_agreement")


class Options(BaseModel):
    """Reasoner protocol options (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    llm: str = Field("smollm2-135m-instruct", description="The base LLM (registry id or local path).")
    backend: str = Field("transformers", description="LLM backend name (models.backends, kind 'llm'); it must take the adapter.")
    models: dict[str, str | None] = Field(
        default_factory=lambda: {"base": None, "sft": "runs/train/reasoner_sft/adapter", "sft+grpo": "runs/train/reasoner_grpo/adapter"},
        description="Row name -> PEFT adapter (folder or registry id; None: the base model). Missing adapters are reported and skipped.",
    )
    max_new_tokens: int = Field(64, ge=8, description="Budget of the free answer.")
    batch_size: int = Field(8, ge=1, description="Cases per cache-fill chunk.")
    n_bootstrap: int = Field(1000, ge=0)
    seed: int = 0
    allow_partial: bool = False


def adapter_key(adapter: str | None) -> str:
    """Cache key of a model: 'base', or the adapter's name plus a hash of its weights."""
    if adapter is None:
        return "base"
    from models.backends.hf_llm import locate_adapter

    path = locate_adapter(adapter)
    h = hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()[:12]
    return f"{path.name}:{h}"


# --------------------------------------------------------------------------- one model on rendered prompts


def case_outputs(llm, recs: list[dict[str, Any]], max_new_tokens: int) -> list[dict[str, Any]]:
    """Candidate ranking and a greedy free answer of ``llm`` for rendered prompts (``prompt``, ``candidates``,
    ``candidate_labels``, ``tags``, ``observed``, ``expected``: :func:`agent.nodes.reason.reasoner_inputs`);
    the free answers are generated as one batch."""
    from agent.prompts import DIAGNOSIS_PREFIX

    texts = llm.chat([rec["prompt"] for rec in recs], max_new_tokens=max_new_tokens, temperature=0.0) if recs else []
    out = []
    for rec, text in zip(recs, texts):
        scores = [float(s) for s in llm.score_continuations(rec["prompt"], DIAGNOSIS_PREFIX, rec["candidates"])]
        pred = rec["candidate_labels"][max(range(len(scores)), key=scores.__getitem__)]
        out.append({**{k: rec[k] for k in ("id", "source", "label") if k in rec}, "pred": pred, "scores": [round(s, 4) for s in scores],
                    "text": text, **answer_checks(text, rec)})  # fmt: skip
    return out


def answer_checks(text: str, rec: dict[str, Any]) -> dict[str, Any]:
    """Format validity and the stated diagnosis' agreement with the findings (recomputed from the text)."""
    from agent.prompts import is_format_valid, stated_consistency

    return {"format_valid": is_format_valid(text, rec["candidates"], rec["tags"]),
            "agreement": stated_consistency(text, rec["candidates"], rec["observed"], rec["expected"])}  # fmt: skip


def metrics(outs: list[dict[str, Any]], threshold: float | None = None) -> dict[str, Any]:
    """Top-1 accuracy, balanced accuracy (mean recall over the classes present), melanoma sensitivity,
    format-valid rate, consistency rate (agreement >= ``threshold``, default the shipped configuration's
    ``verifier.min_morphology_agreement``; unparseable answers count as inconsistent) and mean agreement
    of the stated diagnoses."""
    if threshold is None:
        from agent.config import load_config

        threshold = load_config(None).verifier.min_morphology_agreement
    n = len(outs)
    if not n:
        return {"n": 0}
    labels = sorted({o["label"] for o in outs})
    recall = {c: sum(o["pred"] == c for o in outs if o["label"] == c) / sum(o["label"] == c for o in outs) for c in labels}
    agreements = [o["agreement"] for o in outs if o["agreement"] is not None]
    return {
        "n": n,
        "accuracy": round(sum(o["pred"] == o["label"] for o in outs) / n, 4),
        "balanced_accuracy": round(sum(recall.values()) / len(recall), 4),
        "mel_sensitivity": round(recall["mel"], 4) if "mel" in recall else None,
        "format_valid": round(sum(o["format_valid"] for o in outs) / n, 4),
        "consistency_rate": round(sum(a >= threshold for a in agreements) / n, 4),
        "mean_agreement": round(sum(agreements) / len(agreements), 4) if agreements else None,
        "pred_counts": {c: sum(o["pred"] == c for o in outs) for c in sorted({o["pred"] for o in outs})},
    }


def table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table of the metrics per model and set (``{model: {set: metrics}}``)."""
    lines = ["| model | set | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 2)]
    for name, by_set in results.items():
        for part, m in by_set.items():
            lines.append(f"| {name} | {part} | " + " | ".join("-" if m.get(c) is None else f"{m[c]}" for c in COLUMNS) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the protocol


@dataclass
class Loaded:
    opts: Options
    models: dict[str, tuple[str | None, str]]  # row name -> (adapter, cache key)
    skipped: dict[str, str]


def load(ctx: ProtocolContext) -> Loaded:
    opts = Options.model_validate(ctx.options)
    if ctx.agent_config is None:
        raise ValueError(f"{ctx.bench.name}: the reasoner protocol renders prompts with the agent and needs its configuration")
    models, skipped = {}, {}
    for name, adapter in opts.models.items():
        try:
            models[name] = (adapter, adapter_key(adapter))
        except (ValueError, FileNotFoundError) as exc:
            skipped[name] = str(exc)
    if not models:
        raise ValueError(f"{ctx.bench.name}: none of the models is available: {skipped}")
    return Loaded(opts, models, skipped)


def run(ctx: ProtocolContext) -> ProtocolResult:
    return score_predictions(ctx, predict(ctx))


class _Producer:
    """``compute`` for :func:`cached_map`: records of (case, model) keys; the agent and each LLM load on first use,
    and a case's prompt is rendered once for all models."""

    def __init__(self, ctx: ProtocolContext, loaded: Loaded, where: dict[str, tuple[Any, str]]):
        self.ctx, self.loaded, self.where = ctx, loaded, where
        self.agent: Any = None
        self.llms: dict[str, Any] = {}
        self.rendered: dict[str, dict[str, Any] | None] = {}

    def _render(self, case) -> dict[str, Any] | None:
        if case.id not in self.rendered:
            from agent.agent import Agent
            from agent.nodes.reason import reasoner_inputs

            if self.agent is None:
                self.agent = (self.ctx.agent_factory or Agent)(self.ctx.agent_config)
            state = self.agent.run(case.image, case.question, case.metadata or None, until="retrieve")
            ok = state.modality is not None and state.modality.label == "dermoscopy"
            self.rendered[case.id] = {**reasoner_inputs(state, self.agent.runtime), "id": case.id} if ok else None
        return self.rendered[case.id]

    def _llm(self, name: str):
        if name not in self.llms:
            from models.backends import create

            opts = self.loaded.opts  # one model in memory at a time
            self.llms = {name: create("llm", opts.backend, model=opts.llm, device=self.ctx.agent_config.device, adapter=self.loaded.models[name][0])}
        return self.llms[name]

    def __call__(self, keys: list[str]) -> list[dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        todo: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for key in keys:
            case, model = self.where[key]
            try:
                rec = self._render(case)
            except Exception as exc:  # one bad case must not stop the run; its record says what failed
                out[key] = {"status": "error", "error": {"type": type(exc).__name__, "message": str(exc)[:2000]}}
                continue
            if rec is None:
                out[key] = {"status": "ok", "scored": False, "why": "not routed as dermoscopy"}
            else:
                todo.setdefault(model, []).append((key, rec))
        for model, items in todo.items():
            for (key, rec), o in zip(items, case_outputs(self._llm(model), [r for _, r in items], self.loaded.opts.max_new_tokens)):
                out[key] = {"status": "ok", "scored": True, "model": model, "pred": o["pred"], "scores": o["scores"], "text": o["text"],
                            **{k: rec[k] for k in ("candidates", "candidate_labels", "tags", "observed", "expected")}}  # fmt: skip
        return [out[k] for k in keys]


def predict(ctx: ProtocolContext) -> Predictions:
    """One record per (case, model): the rendered candidates, the ranking and the free answer."""
    from evals.predictions import case_keys
    from evals.fill import cached_map

    loaded = load(ctx)
    fp = ctx.agent_config.fingerprint()
    keys_by_model = {name: case_keys(ctx, f"reasoner:{mkey}:{loaded.opts.max_new_tokens}", fp) for name, (_, mkey) in loaded.models.items()}
    where = {k: (c, name) for name, keys in keys_by_model.items() for k, c in zip(keys, ctx.cases)}
    keys = [k for name in loaded.models for k in keys_by_model[name]]
    producer = _Producer(ctx, loaded, where)
    filled = cached_map(ctx, keys, producer, what="reasoner", batch_size=loaded.opts.batch_size, allow_partial=loaded.opts.allow_partial, unit="prompts")
    records = [{name: filled.records.get(keys_by_model[name][i]) for name in loaded.models} for i in range(len(ctx.cases))]
    return Predictions(records, {"computed": filled.computed, "seconds": round(filled.seconds, 2), "skipped_models": loaded.skipped})


def score_predictions(ctx: ProtocolContext, predictions: Predictions) -> ProtocolResult:
    """The reasoner's figures per model from the records alone (format and agreement recomputed from the text)."""
    from evals.classification import fmt, score
    from evals.report import md_table

    loaded = load(ctx)
    threshold = ctx.agent_config.verifier.min_morphology_agreement
    labels = list(ctx.bench.labels)
    pos = ctx.bench.positive
    names = ["accuracy", "balanced_accuracy"] + ([f"{pos}_sensitivity"] if pos else [])
    results: dict[str, dict[str, Any]] = {}
    headline: dict[str, Any] = {}
    for name in loaded.models:
        outs = []
        for case, recs in zip(ctx.cases, predictions.records):
            rec = (recs or {}).get(name)
            if rec is None or rec.get("status") != "ok" or not rec.get("scored") or case.label is None:
                continue
            outs.append({"label": case.label, "pred": rec["pred"], **answer_checks(rec["text"], rec)})
        results[name] = metrics(outs, threshold)
        ci = score([o["label"] for o in outs], [o["pred"] for o in outs], labels, names, pos, loaded.opts.n_bootstrap, loaded.opts.seed)["headline"] if outs else {}
        headline[name] = ci
    rows = [[name, results[name].get("n"), *(fmt(headline[name].get(m)) for m in names),
             *(results[name].get(c) for c in ("format_valid", "consistency_rate", "mean_agreement"))] for name in loaded.models]  # fmt: skip
    tables = {f"Reasoner candidate ranking and free answers ({ctx.bench.name}, 95% CI)":
              md_table(["model", "n", *(m.replace("_", " ") for m in names), "format-valid", "consistency", "mean agreement"], rows)}  # fmt: skip
    notes = [f"Consistent: agreement >= {threshold} (verifier.min_morphology_agreement)."]
    n_unscored = len(ctx.cases) - results[next(iter(loaded.models))].get("n", 0)
    if n_unscored:
        notes.append(f"{n_unscored} cases not scored (not routed as dermoscopy, failed, or unlabelled).")
    if loaded.skipped:
        notes.append("Models skipped: " + "; ".join(f"{k}: {v}" for k, v in loaded.skipped.items()))
    n = max((r.get("n", 0) for r in results.values()), default=0)
    return ProtocolResult(metrics={"models": results, "headline": headline, "threshold": threshold, "predictions": predictions.stats},
                          tables=tables, n_cases=n, notes=notes)  # fmt: skip
