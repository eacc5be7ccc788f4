"""Golden outputs of the default agent: a fixed set of 40 isic2018_val + 20 Derm7pt val cases.

    python scripts/make_golden.py            # (re)write tests/golden/*.jsonl
    python scripts/make_golden.py --check    # compare against them, exit 1 on any difference

A record is the case's Diagnosis JSON without what is not behaviour: trace timings (``started_at``,
``duration_s``) and the package/config versions (only the model ids of ``versions`` are kept).
``tests/test_golden.py`` runs the comparison (marked weights, data, slow). Regenerate after a
deliberate behaviour change; a refactor must leave every label, text and verdict as it is, and every number
within float noise (another CPU's kernels change the last bits of float32 outputs: ``first_difference``).

The script re-runs itself with ``PYTHONHASHSEED=0`` and one thread: the knowledge base's BM25 sums
its query terms in set order, so the last bits of a score depend on the string hash seed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "golden"
# Last-bit noise of float32 kernels, and one unit in the last decimal of outputs rounded to 4 places (a value
# near a rounding boundary moves by 1e-4 when its float32 bits do).
FLOAT_REL_TOL, FLOAT_ABS_TOL = 1e-5, 1.5e-4
SETS = {  # name: (table, image column, id column, label column, image folder, rows kept (column: value), n)
    "isic2018_val": ("isic2018_val/labels.csv", "image", "image_id", "dx", "isic2018_val", None, 40),
    "derm7pt_val": ("derm7pt/meta.csv", "derm", "case_index", "diagnosis", "derm7pt/images", ("split", "val"), 20),
}


def select_cases(data: Path, name: str) -> list[dict]:
    """A deterministic, class-spread selection: rows sorted by id, then round-robin over labels (sorted)."""
    table, img_col, id_col, label_col, folder, keep, n = SETS[name]
    with open(data / table, newline="") as f:
        rows = [r for r in csv.DictReader(f) if keep is None or r[keep[0]] == keep[1]]
    from training.data import round_robin

    by_label: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (r[id_col].zfill(12), r[id_col])):
        by_label.setdefault(r[label_col], []).append(r)
    picked = round_robin(by_label, n)
    return [{"id": f"{name}/{r[id_col]}", "image": str(data / folder / r[img_col]), "label": r[label_col]} for r in picked]


def record(case: dict, diagnosis) -> dict:
    """The comparable part of a Diagnosis (timings and package versions dropped)."""
    d = json.loads(diagnosis.model_dump_json())
    for step in d["trace"]:
        step.pop("started_at", None)
        step.pop("duration_s", None)
    d["versions"] = {"models": d.get("versions", {}).get("models")}
    return {"id": case["id"], "label": case["label"], "diagnosis": d}


def run(data: Path, agent=None, sink=None) -> dict[str, list[str]]:
    """Each set's records as JSON lines, from the default agent (single-threaded torch for reproducible
    floats); ``sink(name, line)`` receives each record as it is made."""
    import torch

    from agent import Agent

    torch.set_num_threads(1)
    agent = agent or Agent()
    out: dict[str, list[str]] = {}
    for name in SETS:
        lines = []
        for case in select_cases(data, name):
            lines.append(json.dumps(record(case, agent.diagnose(case["image"])), sort_keys=True))
            if sink is not None:
                sink(name, lines[-1])
            print(f"{name}: {len(lines)}", file=sys.stderr, flush=True)
        out[name] = lines
    return out


PINNED_ENV = {"PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(os.environ.get(k) != v for k, v in PINNED_ENV.items()):
        # Hash seed and threads are fixed at interpreter start: run again under them.
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, **PINNED_ENV, "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), root) if p)}
        return subprocess.run([sys.executable, __file__, *argv], env=env).returncode

    from models.paths import data_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="Compare with the golden records instead of writing them.")
    ap.add_argument("--golden", type=Path, default=GOLDEN, help="Folder of the records (default: tests/golden).")
    ap.add_argument("--data", type=Path, default=None, help="Shared data folder (default: ../shared/data).")
    args = ap.parse_args(argv)
    if not args.check:
        args.golden.mkdir(parents=True, exist_ok=True)
        files = {name: open(args.golden / f"{name}.jsonl", "w") for name in SETS}

        def write(name: str, line: str) -> None:
            files[name].write(line + "\n")
            files[name].flush()

        result = run(args.data or data_dir(), sink=write)
        for fh in files.values():
            fh.close()
        print(f"wrote {sum(map(len, result.values()))} records to {args.golden}")
        return 0
    result = run(args.data or data_dir())
    bad = 0
    for name, lines in result.items():
        want = (args.golden / f"{name}.jsonl").read_text().splitlines()
        for got, exp in zip(lines, want):
            where = None if got == exp else first_difference(json.loads(exp), json.loads(got))
            if where is not None:
                bad += 1
                print(f"differs: {json.loads(exp)['id']} at {where}")
        bad += abs(len(lines) - len(want))
    print("identical" if not bad else f"{bad} records differ")
    return 1 if bad else 0


def first_difference(want, got, path: str = "") -> str | None:
    """The path of the first difference between two records, or None. Floats may differ in their last bits across
    CPUs (the vendors' kernels pick other instruction paths), so numbers compare within a tolerance; every label,
    text, verdict, id, flag and count must be equal."""
    if _number(want) and _number(got):
        return None if math.isclose(want, got, rel_tol=FLOAT_REL_TOL, abs_tol=FLOAT_ABS_TOL) else path
    if type(want) is not type(got):
        return path or "/"
    if isinstance(want, dict):
        if want.keys() != got.keys():
            return f"{path}/{{{', '.join(sorted(want.keys() ^ got.keys()))}}}"
        return next((d for k in want if (d := first_difference(want[k], got[k], f"{path}/{k}")) is not None), None)
    if isinstance(want, list):
        if len(want) != len(got):
            return f"{path} (length {len(want)} vs {len(got)})"
        return next((d for i, (w, g) in enumerate(zip(want, got)) if (d := first_difference(w, g, f"{path}[{i}]")) is not None), None)
    return None if want == got else path or "/"


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)  # a flag is compared exactly, not as 0/1


if __name__ == "__main__":
    sys.exit(main())
