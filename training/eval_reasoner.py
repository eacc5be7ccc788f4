"""Reasoner evaluation: base vs SFT vs SFT+GRPO adapters on held-out cases rendered as the agent renders them.

Cases: the report sets (isic2018_val and Derm7pt val: unseen by the classifier and by reasoner
training), through the same nodes and prompt as :mod:`training.reasoner_data`. Per model:

* top-1 accuracy, balanced accuracy and melanoma sensitivity of the LLM's candidate scoring (argmax of
  ``score_continuations`` after ``Diagnosis: ``, exactly what the agent fuses);
* format-valid rate and consistency of a greedy free generation (``max_new_tokens``): the share whose
  stated diagnosis has morphology agreement >= the verifier's threshold (0.35), and the mean agreement.

Per-case outputs are cached in ``<out_dir>/records.jsonl`` keyed by case id and adapter fingerprint, so
reruns (and a larger ``--limit``) only compute what is missing.

    python -m training.eval_reasoner --config configs/train/reasoner_eval.yaml [--limit 60]
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from training.config import Strict
from training.rewards import is_format_valid, min_agreement, stated_consistency


class Config(Strict):
    """What to evaluate."""

    seed: int = Field(0, description="Seeds the stratified subset.")
    out_dir: Path = Field(Path("runs/eval/reasoner"), description="records.jsonl (cache), metrics.json and table.md go here.")
    feature_dir: Path = Field(Path(".cache/features"))
    agent_config: Path | None = Field(None, description="Agent YAML rendering the cases (None: shipped defaults).")
    model: str = Field("smollm2-135m-instruct", description="Base LLM.")
    models: dict[str, str | None] = Field(
        default_factory=lambda: {"base": None, "sft": "runs/train/reasoner_sft/adapter", "sft+grpo": "runs/train/reasoner_grpo/adapter"},
        description="Row name → PEFT adapter (directory or registry id; None: the base model). Missing adapters are reported and skipped.",
    )
    sets: list[Literal["isic2018_val", "derm7pt:val"]] = Field(["isic2018_val", "derm7pt:val"])
    isic_part: Literal["all", "report", "calib"] = Field("all", description="isic2018_val half (training.calibrate_fusion.isic_split).")
    limit: int | None = Field(None, ge=1, description="Seeded subset stratified by set and class (None: all cases).")
    max_new_tokens: int = Field(64, ge=8, description="Budget of the free generation.")
    threads: int | None = Field(None, ge=1)
    device: str = Field("cpu")


def adapter_key(adapter: str | None) -> str:
    """Cache key of a model: 'base', or the adapter's name plus a hash of its weights."""
    if adapter is None:
        return "base"
    from models.backends.hf_llm import locate_adapter

    path = locate_adapter(adapter)
    h = hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()[:12]
    return f"{path.name}:{h}"


def eval_cases(cfg: Config) -> list[dict[str, Any]]:
    """The held-out records (rendered like the training data), subset as configured."""
    from training.reasoner_data import derm7pt_rows, isic_rows, make_agent, render_cases, stratified_subset

    rows = []
    if "isic2018_val" in cfg.sets:
        rows += isic_rows(cfg.feature_dir, cfg.isic_part)
    if "derm7pt:val" in cfg.sets:
        rows += derm7pt_rows(["val"], cfg.feature_dir)
    rows = stratified_subset(rows, cfg.limit, cfg.seed, key=lambda r: (r.source, r.label))
    records, _ = render_cases(rows, make_agent(cfg.agent_config), cfg.seed)
    return records


def case_output(llm, rec: dict[str, Any], max_new_tokens: int) -> dict[str, Any]:
    """Candidate scores (the agent's call) and a greedy free generation for one case."""
    return case_outputs(llm, [rec], max_new_tokens)[0]


def case_outputs(llm, recs: list[dict[str, Any]], max_new_tokens: int) -> list[dict[str, Any]]:
    """:func:`case_output` for several cases, the free generations batched (``llm.max_batch_size``)."""
    texts = llm.chat([rec["prompt"] for rec in recs], max_new_tokens=max_new_tokens, temperature=0.0) if len(recs) > 1 else [None]
    return [_case_output(llm, rec, max_new_tokens, text) for rec, text in zip(recs, texts)]


def _case_output(llm, rec: dict[str, Any], max_new_tokens: int, text: str | None) -> dict[str, Any]:
    from agent.prompts import DIAGNOSIS_PREFIX

    scores = [float(s) for s in llm.score_continuations(rec["prompt"], DIAGNOSIS_PREFIX, rec["candidates"])]
    pred = rec["candidate_labels"][max(range(len(scores)), key=scores.__getitem__)]
    if text is None:  # one case: generated after scoring, reusing the scored prompt's KV cache
        text = llm.chat([rec["prompt"]], max_new_tokens=max_new_tokens, temperature=0.0)[0]
    agreement = stated_consistency(text, rec["candidates"], rec["observed"], rec["expected"])
    return {
        "id": rec["id"], "source": rec["source"], "label": rec["label"], "pred": pred, "scores": [round(s, 4) for s in scores],
        "text": text, "format_valid": is_format_valid(text, rec["candidates"], rec["tags"]), "agreement": agreement,
    }  # fmt: skip


def metrics(outs: list[dict[str, Any]], threshold: float | None = None) -> dict[str, Any]:
    """Top-1 accuracy, balanced accuracy (mean recall over the classes present), melanoma sensitivity,
    format-valid rate, consistency rate (agreement >= the verifier's ``threshold``, default
    :func:`training.rewards.min_agreement`; unparseable answers count as inconsistent) and mean agreement
    of the stated diagnoses."""
    threshold = min_agreement() if threshold is None else threshold
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


def _read_cache(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a torn last line from a killed run
                continue
            out[(r["id"], r["model_key"])] = r
    return out


def table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table of the metrics per model (overall and per set)."""
    cols = ["n", "accuracy", "balanced_accuracy", "mel_sensitivity", "format_valid", "consistency_rate", "mean_agreement"]
    lines = ["| model | set | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for name, by_set in results.items():
        for part, m in by_set.items():
            lines.append(f"| {name} | {part} | " + " | ".join("-" if m.get(c) is None else f"{m[c]}" for c in cols) + " |")
    return "\n".join(lines)


def evaluate(cfg: Config) -> dict[str, Any]:
    """Run (or read from the cache) every model on the cases; write metrics.json and table.md; return them."""
    import torch

    from models.backends.hf_llm import TransformersLLM

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cases = eval_cases(cfg)
    cache_path = cfg.out_dir / "records.jsonl"
    cache = _read_cache(cache_path)
    results: dict[str, dict[str, Any]] = {}
    timing: dict[str, float] = {"render_s": round(time.time() - t0, 1)}
    skipped: dict[str, str] = {}
    for name, adapter in cfg.models.items():
        try:
            key = adapter_key(adapter)
        except (ValueError, FileNotFoundError) as exc:
            skipped[name] = str(exc)
            continue
        t1 = time.time()
        llm = None
        outs = []
        for rec in cases:
            hit = cache.get((rec["id"], key))
            if hit is None:
                if llm is None:
                    llm = TransformersLLM(cfg.model, device=cfg.device, adapter=adapter)
                hit = {**case_output(llm, rec, cfg.max_new_tokens), "model_key": key}
                with cache_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(hit) + "\n")
                cache[(rec["id"], key)] = hit
            # Text scores are recomputed from the cached generation: a parsing fix never needs a model re-run.
            outs.append({**hit, "format_valid": is_format_valid(hit["text"], rec["candidates"], rec["tags"]),
                         "agreement": stated_consistency(hit["text"], rec["candidates"], rec["observed"], rec["expected"])})  # fmt: skip
        del llm
        timing[f"{name}_s"] = round(time.time() - t1, 1)
        threshold = min_agreement(str(cfg.agent_config) if cfg.agent_config else None)
        results[name] = {"all": metrics(outs, threshold)}
        for part in cfg.sets:
            src = part.split(":")[0]
            results[name][part] = metrics([o for o in outs if o["source"] == src], threshold)
    summary = {"results": results, "cases": len(cases), "timing": timing, "skipped": skipped, "config": cfg.model_dump(mode="json")}
    (cfg.out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    md = table(results)
    (cfg.out_dir / "table.md").write_text(md + "\n")
    summary["table"] = md
    return summary


def main(argv: list[str] | None = None) -> None:
    """``python -m training.eval_reasoner [--config FILE] [--limit N] [--set key=value ...]``: print the table."""
    import argparse

    from training.config import load_train_config

    p = argparse.ArgumentParser(prog="python -m training.eval_reasoner")
    p.add_argument("--config", "-c", type=Path, default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--set", dest="sets", action="append", default=[])
    a = p.parse_args(argv)
    overrides = a.sets + ([f"limit={a.limit}"] if a.limit else [])
    cfg = load_train_config(Config, a.config, overrides)  # type: ignore[arg-type]
    summary = evaluate(cfg)
    print(summary["table"])
    print(json.dumps({"cases": summary["cases"], "timing": summary["timing"], "skipped": summary["skipped"]}, indent=2))


if __name__ == "__main__":  # pragma: no cover
    main()
