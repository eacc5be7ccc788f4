"""Outputs of an evaluation run: ``metrics.json``, ``report.md``, the run's configuration and versions."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from evals.base import ProtocolContext, ProtocolResult


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (cells are str()-ed; pipes escaped)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            v = "-" if math.isnan(v) else f"{v:.3f}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _jsonable(obj.item())
    return obj


SEEN_WARNING = (
    "> **Warning: the default lesion classifier was trained on these images.** Its outputs (and everything "
    "built on them: retrieval features, fusion, verifier) are over-confident here, so these figures are "
    "optimistic and must not be used to select or report models. Use isic2018_val and Derm7pt val."
)


def write_outputs(ctx: ProtocolContext, result: ProtocolResult, run_info: dict[str, Any]) -> dict[str, Any]:
    """Write metrics.json, report.md, config.yaml and benchmark.yaml into ``ctx.out_dir``; returns metrics.json's content."""
    import yaml

    from agent.diagnosis import versions

    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bench = ctx.bench
    cfg = ctx.agent_config
    vers = versions(cfg) if cfg is not None else {}
    plots = {title: str(Path(p).relative_to(out)) if Path(p).is_relative_to(out) else str(p) for title, p in result.plots.items()}
    summary = _jsonable({
        "benchmark": {"name": bench.name, "task": bench.task, "description": bench.description, "licence": bench.licence,
                      "seen_by_default_classifier": bench.seen_by_default_classifier, "file": bench.source_file},
        "n_cases": result.n_cases,
        "metrics": result.metrics,
        "notes": result.notes,
        "plots": plots,
        "run": run_info,
        "config": cfg.model_dump(mode="json") if cfg is not None else None,
        "versions": vers,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
    if cfg is not None:
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    (out / "benchmark.yaml").write_text(yaml.safe_dump(bench.model_dump(mode="json"), sort_keys=False))
    (out / "report.md").write_text(render_report(ctx, result, summary))
    return summary


def render_report(ctx: ProtocolContext, result: ProtocolResult, summary: dict[str, Any]) -> str:
    """The Markdown report: warning, description, tables, plots, notes, configuration and versions."""
    bench = ctx.bench
    run = summary["run"]
    parts = [f"# {bench.name} ({bench.task})", ""]
    if bench.seen_by_default_classifier:
        parts += [SEEN_WARNING, ""]
    if bench.description:
        parts += [bench.description.strip(), ""]
    data = run.get("data", {})
    parts += [
        f"Cases scored: **{result.n_cases}** (rows read {data.get('rows')}, filtered out {data.get('filtered_out')}, "
        f"unmapped labels dropped {data.get('unmapped_dropped')}{', limit ' + str(run['limit']) if run.get('limit') else ''}). "
        f"Generated {summary['created_at']}; {'re-scored from the cache' if run.get('rescore') else 'predictions computed where missing'}; "
        f"protocol time {run.get('protocol_seconds')} s.",
        "",
    ]
    notes = list(result.notes)
    if run.get("import_configs_accepted"):
        notes.append(f"Batch records made with config(s) {', '.join(run['import_configs_accepted'])} were accepted as made with this configuration (--import-config).")
    if notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    for title, table in result.tables.items():
        parts += [f"## {title}", "", table, ""]
    if summary["plots"]:
        parts += ["## Plots", ""]
        for title, rel in summary["plots"].items():
            parts += [f"### {title}", "", f"![{title}]({rel})", ""]
    parts += ["## Run", ""]
    rows = [["benchmark file", bench.source_file], ["config file", run.get("config_file") or "(defaults)"],
            ["overrides", " ".join(run.get("overrides") or []) or "-"], ["options", json.dumps(run.get("options"), default=str)],
            ["workers", run.get("workers")]]  # fmt: skip
    for path, s in (run.get("imported") or {}).items():
        rows.append([f"imported {path}", json.dumps(s)])
    parts += [md_table(["", ""], rows), ""]
    vers = summary.get("versions") or {}
    if vers:
        vrows = [[k, v] for k, v in vers.items() if k != "models"] + [[f"model: {k}", v] for k, v in (vers.get("models") or {}).items()]
        rec_vers = (result.metrics or {}).get("record_versions")
        if rec_vers:
            vrows.append(["versions in the cached records", json.dumps(rec_vers)])
        parts += ["### Versions", "", md_table(["component", "version / id"], vrows), ""]
    if summary.get("config"):
        import yaml

        parts += ["### Agent configuration", "", "```yaml", yaml.safe_dump(summary["config"], sort_keys=False).strip(), "```", ""]
    return "\n".join(parts)
