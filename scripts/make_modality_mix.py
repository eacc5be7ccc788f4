"""Write ``evals/benchmarks/modality_mix.csv``: a deterministic mix of image paths (relative to the
shared data folder) with their modality, for the ``modality_mix`` benchmark. Paths only, no images.

    python scripts/make_modality_mix.py [--per-source 40]

Dermoscopy: isic2018_val and Derm7pt val; clinical: DermNet photos held out of the case index;
histopathology: the histology tiles (spread over both source groups). Rows are taken at an even stride
over each source's rows sorted by path, sources interleaved, so the file only changes when the data does.
"""

from __future__ import annotations

import csv
from pathlib import Path

import typer

from models.paths import data_dir
from training.data import is_dermnet_heldout, source_table

OUT = Path(__file__).resolve().parents[1] / "evals" / "benchmarks" / "modality_mix.csv"


def _stride(rows: list[dict[str, str]], n: int) -> list[dict[str, str]]:
    rows = sorted(rows, key=lambda r: r["image"])
    if len(rows) <= n:
        return rows
    step = len(rows) / n
    return [rows[int(i * step)] for i in range(n)]


def main(per_source: int = typer.Option(40, help="Images per source."), out: Path = typer.Option(OUT)):
    root = data_dir()
    picks = [
        ("isic2018_val", "dermoscopy", source_table("isic2018_val", root)),
        ("derm7pt_val", "dermoscopy", [r for r in source_table("derm7pt", root) if r["split"] == "val"]),
        ("dermnet_heldout", "clinical", [r for r in source_table("dermnet", root) if is_dermnet_heldout(r["sha1"])]),
        ("histology", "histopathology", source_table("histology", root)),
    ]
    folder = {"isic2018_val": "isic2018_val", "derm7pt_val": "derm7pt", "dermnet_heldout": "dermnet", "histology": "histology"}
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "modality", "source"])
        chosen = [[(f"{folder[name]}/{r['image']}", modality, name) for r in _stride(rows, per_source)] for name, modality, rows in picks]
        # Interleaved, so that --limit N takes a similar number from every source.
        for i in range(max(map(len, chosen))):
            w.writerows(c[i] for c in chosen if i < len(c))
    typer.echo(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
