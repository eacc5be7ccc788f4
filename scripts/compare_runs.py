"""Paired comparison of two `dermgraph eval` runs of one benchmark (the same cases): accuracy and balanced
accuracy differences with paired-bootstrap 95% CIs, exact McNemar on correctness, and the selective figures.

    python scripts/compare_runs.py runs/eval_before/isic2018_val_report runs/eval/isic2018_val_report
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from evals.metrics import accuracy, balanced_accuracy, mcnemar_exact, paired_difference


def read_cases(run: Path) -> dict[str, dict[str, str]]:
    with open(Path(run) / "cases.csv", newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def compare(before: Path, after: Path, system: str = "agent") -> dict:
    a, b = read_cases(before), read_cases(after)
    ids = sorted(set(a) & set(b))
    if not ids:
        raise SystemExit("the two runs share no case")
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
    print(json.dumps(compare(a.before, a.after, a.system), indent=1))


if __name__ == "__main__":
    main()
