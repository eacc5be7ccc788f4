"""``dermgraph index build``: build the knowledge-base or the case FAISS index."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

index_app = typer.Typer(no_args_is_help=True, help="Build FAISS indexes (knowledge base or image-text cases).")

DEFAULT_TEXT_EMBEDDER = "all-minilm-l6-v2"
DEFAULT_IMAGE_EMBEDDER = "sklesion"


class IndexKind(str, Enum):
    kb = "kb"
    cases = "cases"


@index_app.callback()
def _group() -> None:
    """Build FAISS indexes (knowledge base or image-text cases)."""
    # A callback keeps `build` a named subcommand even though it is the only one.


def _image_embedder(spec: str, device: str):
    """'BACKEND' or 'BACKEND:MODEL' (e.g. 'sklesion', 'open_clip:ViT-B-32') -> an ImageEmbedder."""
    from models.backends import create

    backend, _, model = spec.partition(":")
    kwargs: dict = {"device": device}
    if model:
        kwargs["weights" if backend == "sklesion" else "model_name"] = model
    return create("image_embedder", backend, **kwargs)


@index_app.command("build")
def build(
    kind: IndexKind = typer.Option(..., "--kind", help="kb: knowledge-base passages; cases: image-text pairs."),
    out: Path = typer.Option(..., "--out", help="Output index directory."),
    input: Path | None = typer.Option(
        None, "--input", help="kb: knowledge-base JSONL (default: the bundled one); cases: pairs JSONL (required)."
    ),
    image_root: Path | None = typer.Option(
        None, "--image-root", help="cases: folder the pairs' image paths are relative to (default: shared data)."
    ),
    features: list[Path] | None = typer.Option(
        None, "--features", help="cases: precomputed features npz (ids, features); repeatable, one per source."
    ),
    embedder: str | None = typer.Option(
        None, "--embedder",
        help=f"kb: text embedder id (default {DEFAULT_TEXT_EMBEDDER}); cases: the image embedder "
        f"'BACKEND[:MODEL]' that encodes the images (default {DEFAULT_IMAGE_EMBEDDER}), or with --features the id "
        "of the model that produced them (recorded in the manifest).",
    ),
    pca_dim: int | None = typer.Option(256, "--pca-dim", help="cases: PCA dimension (0 = no PCA)."),
    float16: bool = typer.Option(True, "--float16/--float32", help="cases: store vectors as float16."),
    skip_missing: bool = typer.Option(
        False, "--skip-missing", help="cases: skip pairs without features (or without an image file); the count is reported."
    ),
    device: str = typer.Option("cpu", "--device", help="Device for the embedder ('cpu', 'cuda')."),
    gpu: bool = typer.Option(False, "--gpu", help="Use GPU faiss when available (CPU otherwise)."),
) -> None:
    """Build an index and write index.faiss, records.jsonl, manifest.json (and pca.npz) to --out."""
    try:
        index = _build(kind, out, input, image_root, features, embedder, pca_dim, float16, skip_missing, device, gpu)
    except (ValueError, KeyError, OSError) as exc:  # bad input files: one line naming the file/line, not a traceback
        from retrieval.kb import one_line_error

        typer.secho(f"error: {one_line_error(exc)}", fg=typer.colors.RED, err=True)  # pydantic's first problem only
        raise typer.Exit(2) from None
    m = index.manifest
    skipped = f", skipped {m['skipped']} (no features or image)" if m.get("skipped") else ""
    typer.echo(f"{m['kind']} index: {m['count']} vectors, dim {m['dim']}->{m['index_dim']} ({m['index_type']}), "
               f"embedder {m['embedder']}{skipped} -> {out}")


def _build(kind, out, input, image_root, features, embedder, pca_dim, float16, skip_missing, device, gpu):
    if kind is IndexKind.kb:
        from models.backends import create
        from retrieval.kb import build_kb_index, load_kb

        if features or image_root:
            raise typer.BadParameter("--features/--image-root apply to --kind cases only")
        entries = load_kb(input)
        text_embedder = create("text_embedder", "sentence-transformers", model=embedder or DEFAULT_TEXT_EMBEDDER,
                               device=device)
        index = build_kb_index(entries, text_embedder, out, use_gpu=gpu)
    else:
        from retrieval.cases import build_case_index

        if input is None:
            raise typer.BadParameter("--input PAIRS.jsonl is required for --kind cases")
        encoder = None if features else _image_embedder(embedder or DEFAULT_IMAGE_EMBEDDER, device)
        index = build_case_index(
            input, out, image_root=image_root, encoder=encoder, features=list(features) if features else None,
            pca_dim=pca_dim or None, float16=float16, skip_missing=skip_missing, use_gpu=gpu,
            embedder_id=embedder if features else None,
        )
    return index
