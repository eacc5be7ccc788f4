"""Write the benchmark CSVs of the evaluation halves the fusion never fitted on (see training/fusion.py).

    python scripts/make_eval_halves.py      # -> evals/benchmarks/isic2018_val_report.csv, dermnet_clinical_eval.csv
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from training.calibrate_fusion import isic_split  # noqa: E402
from training.data import is_dermnet_fit_half, is_dermnet_heldout, source_table  # noqa: E402


def main() -> None:
    out = REPO / "evals" / "benchmarks"
    isic = source_table("isic2018_val")
    half = isic_split(isic)
    rows = [{"image": r["image"], "image_id": r["image_id"], "dx": r["dx"]} for r in isic if half[r["image_id"]] == "report"]
    with (out / "isic2018_val_report.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["image", "image_id", "dx"])
        w.writeheader()
        w.writerows(rows)
    dn = [r for r in source_table("dermnet") if is_dermnet_heldout(r["sha1"]) and not is_dermnet_fit_half(r["sha1"])]
    with (out / "dermnet_clinical_eval.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["image", "sha1", "label"])
        w.writeheader()
        w.writerows({"image": r["image"], "sha1": r["sha1"], "label": r["label"]} for r in dn)
    print(f"isic2018_val report half: {len(rows)}; DermNet held-out odd half: {len(dn)}")


if __name__ == "__main__":
    main()
