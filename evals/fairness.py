"""Metrics by subgroup (sex, age band, skin type, source, ...): per-group values with CIs, the
worst group and the largest gap between groups."""

from __future__ import annotations

import math
from typing import Any, Sequence

from evals.base import EvalCase
from evals.classification import fmt, headline

DEFAULT_AGE_BINS = (40, 60)
UNKNOWN = "unknown"


def age_band(value: Any, edges: Sequence[float] = DEFAULT_AGE_BINS) -> str:
    """``"<40"``, ``"40-59"``, ``">=60"`` for edges (40, 60); 'unknown' for a missing value.

    >>> [age_band(v) for v in ("35", 40, "59.0", 75, "", None)]
    ['<40', '40-59', '40-59', '>=60', 'unknown', 'unknown']
    """
    try:
        a = float(value)
    except (TypeError, ValueError):
        return UNKNOWN
    if math.isnan(a):
        return UNKNOWN
    edges = sorted(edges)
    if a < edges[0]:
        return f"<{edges[0]:g}"
    for lo, hi in zip(edges[:-1], edges[1:]):
        if lo <= a < hi:
            return f"{lo:g}-{hi - 1:g}"
    return f">={edges[-1]:g}"


def group_values(cases: Sequence[EvalCase], options: dict[str, Any]) -> dict[str, list[str]]:
    """Group name → each case's group. Numeric groups are binned: ``options.group_bins`` maps a group
    name to its edges; the group called ``age`` uses ``options.age_bins`` (default 40, 60). Edges that are
    not a list of increasing numbers raise a one-line ValueError."""
    from evals.options import check_bins

    bins = {k: check_bins(f"group_bins.{k}", v) for k, v in dict(options.get("group_bins") or {}).items()}
    bins.setdefault("age", check_bins("age_bins", options["age_bins"]) if options.get("age_bins") is not None else list(DEFAULT_AGE_BINS))
    names = sorted({n for c in cases for n in c.groups})
    out = {}
    for name in names:
        raw = [c.groups.get(name, UNKNOWN) for c in cases]
        out[name] = [age_band(v, bins[name]) if name in bins else v for v in raw]
    return out


def fairness(groups: dict[str, list[str]], y: Sequence[str], p: Sequence[str], labels: Sequence[str], names: Sequence[str],
             positive: str | None = None, n_boot: int = 1000, seed: int = 0, min_n: int = 10) -> dict[str, Any]:  # fmt: skip
    """For each grouping: every headline metric per group (with n and CI), and per metric the worst
    group and the largest gap, over groups with at least ``min_n`` cases ('unknown' excluded)."""
    out: dict[str, Any] = {}
    for gname, values in groups.items():
        per: dict[str, Any] = {}
        for g in sorted(set(values)):
            idx = [i for i, v in enumerate(values) if v == g]
            per[g] = {"n": len(idx), "metrics": headline([y[i] for i in idx], [p[i] for i in idx], labels, names, positive, n_boot, seed)}
        summary = {}
        for m in names:
            vals = {g: d["metrics"][m]["value"] for g, d in per.items() if g != UNKNOWN and d["n"] >= min_n and d["metrics"][m]["value"] is not None}
            if len(vals) >= 1:
                worst = min(vals, key=vals.get)
                summary[m] = {"worst_group": worst, "worst_value": vals[worst], "gap": round(max(vals.values()) - min(vals.values()), 4) if len(vals) > 1 else None, "groups_compared": len(vals)}
        out[gname] = {"groups": per, "summary": summary, "min_n": min_n}
    return out


def fairness_tables(fair: dict[str, Any], names: Sequence[str]) -> dict[str, str]:
    """One Markdown table per grouping: a row per group, then worst group and largest gap."""
    from evals.report import md_table

    tables = {}
    for gname, f in fair.items():
        rows = [[g, str(d["n"])] + [fmt(d["metrics"][m]) for m in names] for g, d in f["groups"].items()]
        rows.append(["**worst group**", ""] + [f"{s['worst_group']}: {s['worst_value']:.3f}" if (s := f["summary"].get(m)) else "-" for m in names])
        rows.append(["**largest gap**", ""] + [f"{s['gap']:.3f}" if (s := f["summary"].get(m)) and s["gap"] is not None else "-" for m in names])
        tables[f"By {gname} (groups with n >= {f['min_n']} compared)"] = md_table([gname, "n", *names], rows)
    return tables
