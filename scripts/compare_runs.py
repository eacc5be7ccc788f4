"""Paired comparison of two `dermgraph eval` runs of one benchmark (the same cases): accuracy and balanced
accuracy differences with paired-bootstrap 95% CIs, exact McNemar on correctness, and the selective figures.

    python scripts/compare_runs.py runs/eval_before/isic2018_val_report runs/eval/isic2018_val_report
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from evals.metrics import accuracy, balanced_accuracy, mcnemar_exact, paired_difference


NOT_SYSTEMS = {"id", "truth", "verdict", "confidence"}


class CompareError(ValueError):
    """A problem with the runs or the arguments (one line; exit status 2)."""


def read_cases(run: Path) -> dict[str, dict[str, str]]:
    """``cases.csv`` of a diagnosis run: case id -> row."""
    run = Path(run)
    if not run.is_dir():
        raise CompareError(f"{run}: no such run directory")
    path = run / "cases.csv"
    if not path.is_file():
        raise CompareError(f"{path}: not found (compare runs of a diagnosis benchmark, written by `dermgraph eval`)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"id", "truth", "verdict"} <= set(rows[0]):
        raise CompareError(f"{path}: expected columns id, truth, verdict and a column per system")
    return {r["id"]: r for r in rows}


def benchmark_name(run: Path) -> str | None:
    """The benchmark named in the run's metrics.json (None when absent or unreadable)."""
    try:
        return json.loads((Path(run) / "metrics.json").read_text())["benchmark"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def compare(before: Path, after: Path, system: str = "agent", warn=lambda msg: print(msg, file=sys.stderr)) -> dict:
    """The paired comparison; raises CompareError for runs that cannot be compared."""
    a, b = read_cases(before), read_cases(after)
    na, nb = benchmark_name(before), benchmark_name(after)
    if na and nb and na != nb:
        raise CompareError(f"the runs are of different benchmarks: {before} is {na!r}, {after} is {nb!r}")
    systems = [c for c in next(iter(a.values())) if c not in NOT_SYSTEMS and c in next(iter(b.values()))]
    if system not in systems:
        raise CompareError(f"unknown system {system!r}; valid systems (columns of both cases.csv): {', '.join(systems)}")
    ids = sorted(set(a) & set(b))
    if not ids:
        raise CompareError("the two runs share no case")
    differ = [i for i in ids if a[i]["truth"] != b[i]["truth"]]
    if differ:
        i = differ[0]
        raise CompareError(f"{len(differ)} shared cases have different truth labels (first: {i!r}: {a[i]['truth']!r} vs {b[i]['truth']!r}): "
                           "not runs of the same benchmark")
    if len(ids) < max(len(a), len(b)):
        warn(f"warning: only {len(ids)} cases are in both runs ({len(a)} in {before}, {len(b)} in {after}); comparing those")
    y = [a[i]["truth"] for i in ids]
    pa, pb = [a[i][system] for i in ids], [b[i][system] for i in ids]
    acc_a = [a[i]["verdict"] == "accept" for i in ids]
    acc_b = [b[i]["verdict"] == "accept" for i in ids]

    def accepted(acc, p):
        n = sum(acc)
        return {"coverage": round(n / len(ids), 4), "accuracy": round(sum(t == q for t, q, k in zip(y, p, acc) if k) / n, 4) if n else None}

    mel = [i for i, t in enumerate(y) if t == "mel"]
    return {
        "cases": len(ids), "only_in_one_run": len(set(a) ^ set(b)), "system": system,
        "before": {"accuracy": round(accuracy(y, pa), 4), "balanced_accuracy": round(balanced_accuracy(y, pa), 4), "accepted": accepted(acc_a, pa),
                   "mel_sensitivity": round(sum(pa[i] == "mel" for i in mel) / len(mel), 4) if mel else None},
        "after": {"accuracy": round(accuracy(y, pb), 4), "balanced_accuracy": round(balanced_accuracy(y, pb), 4), "accepted": accepted(acc_b, pb),
                  "mel_sensitivity": round(sum(pb[i] == "mel" for i in mel) / len(mel), 4) if mel else None},
        "accuracy_difference": paired_difference(accuracy, y, pa, pb),
        "balanced_accuracy_difference": paired_difference(balanced_accuracy, y, pa, pb),
        "mcnemar": mcnemar_exact([t == q for t, q in zip(y, pa)], [t == q for t, q in zip(y, pb)]),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--system", default="agent", help="column of cases.csv to compare (agent, classifier, knn, ...)")
    a = ap.parse_args()
    try:
        result = compare(a.before, a.after, a.system)
    except CompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
