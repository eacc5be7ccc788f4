"""Build the GPU pack: everything the one-lease GPU job (:mod:`training.gpu_job`) reads, in ``.gpu_pack/``.

The device machine sees the work tree and what a call carries (64 MiB per call, work tree included), never
``../shared`` or a package registry. So the pack holds, each with its sha256 in the manifest
(:mod:`training.gpu_manifest`):

* ``llm/``: the base LLM's GGUF as the resolver caches it (xz-compressed), with the cache marker, so the job
  rebuilds the exact cache entry and converts it with the project's own GGUF → safetensors conversion
  (``models.backends.hf_llm.gguf_to_hf_dir``): SmolLM2-135M in bf16 safetensors is ~270 MB, more than two
  calls carry, while the Q4_1 GGUF is 98 MB (~88 MB as xz) and dequantises to the exact weights the CPU
  agent runs.
* ``xception/``: the sklesion Xception as float16 safetensors (state dict + BatchNorm epsilons).
* ``reasoner/``: training cases and report-set cases (isic2018_val, Derm7pt val) rendered exactly as the
  agent's prompt by :mod:`training.reasoner_data` (no FAISS, LangGraph or image model on the GPU).
* ``describer/``: the Derm7pt 7-point rows and HAM10000 rows with their cached features, from which
  :mod:`training.describer_data` builds the feature/text turns on the GPU.
* ``encoder/``: the modality images (a seeded sample per source/view) at the encoder's 254x254 input as
  JPEG, with their labels, groups and colour/texture statistics.
* ``effnet/``: the EfficientNet-Lite0 expert's training and selection images (:mod:`training.encoder`'s
  tables, HAM10000 capped per class) decoded at its cache sizes and stored as JPEG, its records, and the
  ImageNet base weights' cache entry (the PyPI wheel's ``.pth``, installed into the resolver's cache on the GPU).

Files are assigned to parts that each fit one device call; the last part is carried by the call that runs
the job, the earlier ones by calls that only stash them (see ``CALLS.md`` written into the pack).

    python -m training.gpu_pack build --config configs/train/gpu_pack.yaml      # -> .gpu_pack/
    python -m training.gpu_pack wheels                                          # -> .gpu_wheels/
    python -m training.gpu_pack preflight                                       # each call's size, now
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from training.config import Strict, load_train_config
from training.gpu_manifest import FORMAT, MANIFEST, part_name, sha256_file
from training.reasoner_data import ReasonerDataConfig

MiB = 1 << 20
WHEELS = ("trl", "datasets", "dill", "multiprocess", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "gguf")
"""What the GPU image lacks among the job's imports (it has torch, transformers, peft, accelerate, timm,
safetensors, numpy, pyarrow, pandas, scikit-learn, matplotlib, pillow, pyyaml): pinned to the versions
installed here, where the CPU rehearsal ran. typing-extensions: pydantic needs a recent one."""
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")


class EffnetPack(Strict):
    """The EfficientNet-Lite0 expert's data in the pack (``training.encoder`` at GPU scale)."""

    config: Path = Field(Path("configs/train/encoder_gpu.yaml"), description="The encoder trainer's config whose tables and cache sizes are packed.")
    set: list[str] = Field(default_factory=list, description="key=value overrides of that config (e.g. limit_per_source for rehearsals).")
    ham_per_class: int | None = Field(500, ge=1, description="HAM10000 train images kept per class (sha1 order; None: all 5,087).")
    store_size: int | None = Field(None, ge=32, description="Side of the stored dermoscopy/histology images (None: the config's store_size).")
    dermnet_store_size: int | None = Field(None, ge=32, description="Side of the stored DermNet training photos (None: the config's).")
    jpeg_quality: int = Field(88, ge=50, le=100)
    base: Literal["none", "xz", "raw"] = Field("none", description="Carry the ImageNet base weights (16 MB as xz) for a job that trains from ImageNet "
                                                        "rather than from the job's effnet.init (an expert already in the work tree).")


class PackConfig(Strict):
    """What goes into the pack (defaults: the full GPU-scale pack)."""

    out: Path = Field(Path(".gpu_pack"), description="Pack folder (git-ignored); rebuilt from scratch.")
    feature_dir: Path = Field(Path(".cache/features"), description="Cached sklesion features (scripts/extract_features.py).")
    seed: int = 0
    agent_config: Path | None = Field(None, description="Agent YAML rendering the reasoner cases (None: shipped defaults).")
    reasoner: ReasonerDataConfig = Field(default_factory=ReasonerDataConfig, description="Reasoner training cases (default: every case).")
    eval_sets: list[Literal["isic2018_val", "derm7pt:val"]] = Field(["isic2018_val", "derm7pt:val"], description="Report sets rendered for the job's evaluation.")
    eval_limit: int | None = Field(None, ge=1, description="Seeded subset of the report cases, stratified by set and class (None: all).")
    describer_ham_rows: int = Field(400, ge=0, description="HAM10000 train rows (seeded) for the describer's stage-1 format turns (0: none).")
    encoder: Path | None = Field(Path("configs/train/modality_finetune.yaml"), description="Modality config whose images the encoder stage tunes on (None: no encoder data).")
    encoder_set: list[str] = Field(default_factory=list, description="key=value overrides of that modality config (e.g. sources whose features exist).")
    encoder_max_per_tag: int | None = Field(80, ge=1, description="Images per source/view (seeded sample; None: all).")
    jpeg_quality: int = Field(85, ge=50, le=100)
    llm: str | None = Field("smollm2-135m-instruct", description="Registry id of the base LLM (a GGUF resolved into the cache); None: an image-only "
                                                                 "pack without the LLM, reasoner and describer data (their stages are skipped).")
    llm_codec: Literal["xz", "none"] = Field("xz", description="xz saves ~10 MB of the GGUF (~2 min to compress); none for quick rehearsals.")
    xception: str | None = Field("sklesion-xception", description="Registry id of the Keras Xception (None: no encoder stage).")
    xception_dtype: Literal["float16", "float32"] = "float16"
    xception_codec: Literal["xz", "none"] = Field("xz", description="xz saves ~3 MB of the float16 weights; none for quick rehearsals.")
    call_limit_mib: float = Field(64.0, gt=1, description="What one device call may carry, work tree included.")
    tree_bytes: int | None = Field(None, ge=0, description="Size of the work tree that travels with every call (None: measured with git here).")
    margin_mib: float = Field(1.0, ge=0)
    wheels: Path = Field(Path(".gpu_wheels"), description="Wheels carried by the last call (their size is reserved in it).")
    effnet: EffnetPack | None = Field(default_factory=EffnetPack, description="The EfficientNet-Lite0 expert's images and base weights (None: no effnet stage).")


# --------------------------------------------------------------------------- sizes and splitting


def tree_bytes(root: Path = Path(".")) -> int:
    """Bytes of what every device call sends: tracked files and untracked files git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root, capture_output=True, check=True).stdout
    total = 0
    for name in {n for n in out.decode().split("\0") if n}:
        p = Path(root) / name
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if Path(path).exists() else 0


def plan_parts(items: list[tuple[str, int, bool]], capacity: int, reserve_last: int = 0, min_chunk: int = MiB) -> list[list[tuple[str, int, int]]]:
    """Assign ``(name, size, splittable)`` items, in order, to parts of ``capacity`` bytes; a splittable item
    is cut at part boundaries. ``reserve_last`` bytes (the wheels) must fit in the last part.
    Returns per part ``(name, offset, length)`` pieces."""
    parts: list[list[tuple[str, int, int]]] = [[]]
    used = [0]
    queue = [(n, s, sp) for n, s, sp in items] + [("", reserve_last, False)]
    for name, size, splittable in queue:
        if size > capacity:
            if not splittable:
                raise ValueError(f"{name or 'the wheels'} ({size / MiB:.1f} MiB) cannot fit one call ({capacity / MiB:.1f} MiB free per call)")
        offset = 0
        while offset < size or (size == 0 and offset == 0):
            space = capacity - used[-1]
            left = size - offset
            if left <= space:
                if name:
                    parts[-1].append((name, offset, left))
                used[-1] += left
                break
            if splittable and space >= min_chunk:
                parts[-1].append((name, offset, space))
                used[-1] += space
                offset += space
            parts.append([])
            used.append(0)
    # The last part may hold nothing but the reserve: its call then carries only the wheels (and the manifest).
    return [p for p in parts[:-1] if p] + [parts[-1]]


# --------------------------------------------------------------------------- components


def _write_jsonl_gz(records: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=9) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def read_jsonl_gz(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def xz_copy(src: Path, dest: Path, sha: str) -> Path:
    """``dest`` = ``src`` xz-compressed. Compressing ~100 MB takes minutes on a busy CPU, so the result is kept
    in ``.gpu_pack_cache/`` under the source's sha256 (``sha``) and reused by later builds."""
    cached = Path(".gpu_pack_cache") / f"{sha}.xz"
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        with open(src, "rb") as f, lzma.open(tmp, "wb", preset=6) as out:
            shutil.copyfileobj(f, out, 1 << 22)
        os.replace(tmp, cached)
    shutil.copyfile(cached, dest)
    return dest


def pack_cached(model_id: str, codec: str, staging: Path, folder: str) -> dict[str, Any]:
    """The resolver's cache entry of a registry model (its file, compressed, and the completion marker), so the
    job recreates the exact entry and the id resolves offline there (:func:`training.gpu_job.install_cached`)."""
    from models.paths import cache_dir
    from models.registry import get_spec
    from models.resolve import resolve

    path = Path(resolve(model_id, progress=False)).resolve()
    spec = get_spec(model_id)
    root = path.parents[len(Path(spec.file).parts) - 1] if spec.file else path.parent
    rel = root.relative_to(cache_dir().resolve())
    marker = json.loads((root / ".complete").read_text())
    dest = staging / folder / (path.name + (".xz" if codec == "xz" else ""))
    dest.parent.mkdir(parents=True, exist_ok=True)
    sha = sha256_file(path)
    if codec == "xz":
        xz_copy(path, dest, sha)
    else:
        shutil.copyfile(path, dest)
    return {"member": f"{folder}/{path.name}", "stored": dest, "codec": codec, "sha256": sha, "bytes": path.stat().st_size,
            "info": {"id": model_id, "cache_entry": rel.as_posix(), "file": spec.file, "marker": marker}}  # fmt: skip


def pack_llm(cfg: PackConfig, staging: Path) -> dict[str, Any]:
    """The resolver's cache entry of the LLM: the GGUF (compressed) and its completion marker."""
    return pack_cached(cfg.llm, cfg.llm_codec, staging, "llm")


def save_xception(keras_path: Path, out: Path, dtype: str = "float16", meta: dict | None = None) -> Path:
    """The sklesion network's state dict (``SklesionNet`` keys) as safetensors, BatchNorm epsilons in the metadata."""
    import torch
    from safetensors.torch import save_file

    from models.sklesion import keras_state_dict

    sd, eps = keras_state_dict(keras_path)
    tensors = {k: torch.as_tensor(v).to(getattr(torch, dtype)).contiguous() for k, v in sd.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"dermgraph": json.dumps({"eps": eps, **(meta or {})})})
    return out


def load_xception(path: Path, device: str = "cpu"):
    """A ``SklesionNet`` (eval, float32, channels_last) from :func:`save_xception`'s file: what the GPU job
    fine-tunes instead of ``models.sklesion.build_model`` (which reads the 86 MB Keras file)."""
    import torch
    from safetensors.torch import load_file

    from models.safetensors_meta import read_meta
    from models.xception import SklesionNet

    info = read_meta(path)
    model = SklesionNet()
    sd = {k: v.float() for k, v in load_file(str(path)).items()}
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"{path}: missing tensors {missing[:5]}")
    model.load_state_dict(sd, strict=False)
    modules = dict(model.named_modules())
    for name, e in info["eps"].items():
        modules[name].eps = e
    return model.eval().to(device=device, memory_format=torch.channels_last)


def pack_xception(cfg: PackConfig, staging: Path) -> dict[str, Any]:
    from models.registry import get_spec
    from models.resolve import resolve

    keras = resolve(cfg.xception, progress=False)
    spec = get_spec(cfg.xception)
    raw = save_xception(keras, staging / "xception.tmp" / f"{cfg.xception}.{cfg.xception_dtype}.safetensors", cfg.xception_dtype,
                        meta={"base_id": cfg.xception, "base_sha256": spec.sha256})  # fmt: skip
    sha, size = sha256_file(raw), raw.stat().st_size
    out = staging / "xception" / (raw.name + (".xz" if cfg.xception_codec == "xz" else ""))  # float16 weights still lose ~8% to xz
    out.parent.mkdir(parents=True, exist_ok=True)
    if cfg.xception_codec == "xz":
        xz_copy(raw, out, sha)
    else:
        shutil.copyfile(raw, out)
    shutil.rmtree(raw.parent)
    return {"member": f"xception/{raw.name}", "stored": out, "codec": cfg.xception_codec, "sha256": sha, "bytes": size,
            "info": {"id": cfg.xception, "base_sha256": spec.sha256, "dtype": cfg.xception_dtype}}  # fmt: skip


def pack_reasoner(cfg: PackConfig, staging: Path) -> list[dict[str, Any]]:
    """Training cases (as the SFT trainer builds them) and the report-set cases, rendered through the agent's nodes."""
    from training.reasoner_data import build_training_cases, derm7pt_rows, isic_rows, make_agent, render_cases, stratified_subset

    agent = make_agent(cfg.agent_config)
    train, info = build_training_cases(cfg.reasoner, cfg.feature_dir, cfg.seed, agent=agent)
    rows = []
    if "isic2018_val" in cfg.eval_sets:
        rows += isic_rows(cfg.feature_dir, "all")
    if "derm7pt:val" in cfg.eval_sets:
        rows += derm7pt_rows(["val"], cfg.feature_dir)
    rows = stratified_subset(rows, cfg.eval_limit, cfg.seed, key=lambda r: (r.source, r.label))
    evals, skipped = render_cases(rows, agent, cfg.seed)
    ids = {r["id"] for r in train}
    if ids & {r["id"] for r in evals}:
        raise ValueError("a report-set case is also a training case")
    a = _write_jsonl_gz(train, staging / "reasoner" / "train.jsonl.gz")
    b = _write_jsonl_gz(evals, staging / "reasoner" / "eval.jsonl.gz")
    summary = {k: v for k, v in info.items() if k != "error_profile"}
    return [
        {"member": "reasoner/train.jsonl.gz", "stored": a, "info": {"cases": len(train), "build": summary}},
        {"member": "reasoner/eval.jsonl.gz", "stored": b, "info": {"cases": len(evals), "skipped_not_dermoscopy": len(skipped),
                                                                    "by_set": {s: sum(r["source"] == s.split(":")[0] for r in evals) for s in cfg.eval_sets}}},
    ]  # fmt: skip


def pack_describer(cfg: PackConfig, staging: Path) -> dict[str, Any]:
    """Derm7pt rows (every split: train/extra for training, val for evaluation) and a seeded HAM10000 train
    subset, each with its cached features and probabilities: :mod:`training.describer_data` reads this file
    in place of the tables and the feature cache (``describer_data.PACK_FILE``)."""
    from training.data import aligned, load_features, source_table
    from training.describer_data import PACK_FILE

    rows, f = aligned(source_table("derm7pt"), load_features("derm7pt", feature_dir=cfg.feature_dir))
    arrays: dict[str, Any] = {"derm7pt_rows": np.array(json.dumps(rows)), "derm7pt_features": f["features"].astype(np.float16), "derm7pt_probs": f["probs"]}
    n_ham = 0
    if cfg.describer_ham_rows:
        hrows, hf = aligned([r for r in source_table("ham10000") if r["split"] == "train"], load_features("ham10000", feature_dir=cfg.feature_dir))
        pick = np.sort(np.random.default_rng(cfg.seed).permutation(len(hrows))[: cfg.describer_ham_rows])
        arrays.update(ham_rows=np.array(json.dumps([hrows[i] for i in pick])), ham_features=hf["features"][pick].astype(np.float16), ham_probs=hf["probs"][pick])
        n_ham = len(pick)
    out = staging / "describer" / PACK_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    splits = {s: sum(r["split"] == s for r in rows) for s in sorted({r["split"] for r in rows})}
    return {"member": f"describer/{PACK_FILE}", "stored": out, "info": {"derm7pt": splits, "ham10000": n_ham}}


def _uint8_image(img) -> np.ndarray:
    from models.sklesion import preprocess

    return preprocess([img])[0].round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def pack_encoder(cfg: PackConfig, staging: Path) -> list[dict[str, Any]]:
    """The modality images at the encoder's input size (JPEG) with labels, groups, tags and colour/texture statistics."""
    from PIL import Image

    from training import modality
    from training.modality_encoder import N_FEATURES, sample_per_tag

    mcfg = load_train_config(modality.Config, cfg.encoder, [f"feature_dir={cfg.feature_dir}", f"seed={cfg.seed}", *cfg.encoder_set])
    x, y, groups, tags, refs = modality.build_dataset(mcfg)
    sel = sample_per_tag(tags, cfg.encoder_max_per_tag, cfg.seed)
    x, y, groups, tags, refs = x[sel], y[sel], groups[sel], tags[sel], refs[sel]
    zpath = staging / "encoder" / "images.zip"
    zpath.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_STORED) as zf:
        for i, ref in enumerate(refs):
            buf = io.BytesIO()
            Image.fromarray(_uint8_image(modality.load_image(str(ref)))).save(buf, format="JPEG", quality=cfg.jpeg_quality)
            zf.writestr(f"{i:05d}.jpg", buf.getvalue())
    npz = staging / "encoder" / "dataset.npz"
    # No frozen features: the job computes them from these very images (as the tuned ones), which also saves ~4 KB an image.
    np.savez_compressed(npz, stats=x[:, N_FEATURES:].astype(np.float32), y=y.astype(str), groups=groups.astype(str), tags=tags.astype(str), refs=refs.astype(str))
    counts = {t: int((tags == t).sum()) for t in sorted(set(tags))}
    info = {"images": len(refs), "by_tag": counts, "size": [254, 254], "jpeg_quality": cfg.jpeg_quality,
            "modality_config": mcfg.model_dump(mode="json", exclude={"finetune"})}  # fmt: skip
    return [{"member": "encoder/dataset.npz", "stored": npz, "info": info}, {"member": "encoder/images.zip", "stored": zpath, "info": {"images": len(refs)}}]


def read_encoder_images(path: Path):
    """(N, 3, 254, 254) float32 tensor (0..255) of the pack's encoder images, in row order."""
    import torch
    from PIL import Image

    with zipfile.ZipFile(path) as zf:
        names = sorted(zf.namelist())
        arrs = [np.asarray(Image.open(io.BytesIO(zf.read(n))).convert("RGB")) for n in names]
    if not arrs:
        return torch.zeros((0, 3, 254, 254))
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float().contiguous()


def pack_effnet(cfg: PackConfig, staging: Path) -> list[dict[str, Any]]:
    """The EfficientNet-Lite0 expert's tables (records without paths) and images, decoded exactly as
    :func:`training.encoder.image_cache` would at the config's sizes and stored as JPEG, plus the base weights."""
    from PIL import Image

    from models.efficientnet import BASE_ID
    from training import encoder

    ec = cfg.effnet
    ecfg = load_train_config(encoder.Config, ec.config, [f"seed={cfg.seed}", *ec.set])
    overrides = {k: v for k, v in (("store_size", ec.store_size), ("dermnet_store_size", ec.dermnet_store_size)) if v is not None}
    ecfg = ecfg.model_copy(update=overrides)
    sets, classes = encoder.build_tables(ecfg)
    if ec.ham_per_class is not None:  # the sampler balances classes anyway: the surplus of nv/bkl/mel is what a call cannot carry
        by: dict[int, list[dict]] = {}
        for r in sorted(sets["train_ham"], key=lambda r: hashlib.sha1(r["image"].encode()).hexdigest()):
            by.setdefault(r["labels"]["ham"], []).append(r)
        sets["train_ham"] = sorted((r for rs in by.values() for r in rs[: ec.ham_per_class]), key=lambda r: r["image"])
    zpath = staging / "effnet" / "images.zip"
    zpath.parent.mkdir(parents=True, exist_ok=True)
    counts = {}
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, recs in sets.items():
            size = ecfg.dermnet_store_size if name == "train_dermnet" else ecfg.store_size
            arr = encoder.decode_records(recs, size)
            for i, a in enumerate(arr):
                buf = io.BytesIO()
                Image.fromarray(a).save(buf, format="JPEG", quality=ec.jpeg_quality)
                zf.writestr(f"{name}/{i:05d}.jpg", buf.getvalue())
            counts[name] = len(recs)
    tables = {"sets": {k: [{kk: vv for kk, vv in r.items() if kk != "path"} for r in v] for k, v in sets.items()}, "classes": classes,
              "config": ecfg.model_dump(mode="json")}  # fmt: skip
    tpath = staging / "effnet" / "tables.json.gz"
    with gzip.open(tpath, "wt", encoding="utf-8", compresslevel=9) as f:
        json.dump(tables, f)
    info = {"images": counts, "store_size": ecfg.store_size, "dermnet_store_size": ecfg.dermnet_store_size, "jpeg_quality": ec.jpeg_quality,
            "ham_per_class": ec.ham_per_class, "config": str(ec.config)}  # fmt: skip
    comps = [{"member": "effnet/tables.json.gz", "stored": tpath, "info": info}, {"member": "effnet/images.zip", "stored": zpath, "info": {"images": sum(counts.values())}}]
    if ec.base != "none":
        comps.append(pack_cached(BASE_ID, "xz" if ec.base == "xz" else "none", staging, "effnet_base"))
    return comps


def read_effnet_images(path: Path, name: str, n: int) -> np.ndarray:
    """(n, S, S, 3) uint8 images of one table of the pack's ``effnet/images.zip``, in record order."""
    from PIL import Image

    with zipfile.ZipFile(path) as zf:
        arrs = [np.asarray(Image.open(io.BytesIO(zf.read(f"{name}/{i:05d}.jpg"))).convert("RGB")) for i in range(n)]
    return np.stack(arrs) if arrs else np.zeros((0, 1, 1, 3), np.uint8)


def write_parts(out: Path, staging: Path, comps: list[dict[str, Any]], capacity: int, reserve_last: int = 0):
    """Move the staged components into ``out/part<k>/`` (cut into chunks where a part ends); returns the
    manifest's ``files`` (stored name → sha256, bytes, part) and ``members`` (name → its stored pieces, codec and
    the sha256 of the whole), the components' ``contents`` and the number of parts. Empties ``staging``."""
    items = [(str(c["stored"].relative_to(staging)), c["stored"].stat().st_size, True) for c in comps]
    parts = plan_parts(items, capacity, reserve_last=reserve_last)
    files: dict[str, dict[str, Any]] = {}
    pieces: dict[str, list[str]] = {}
    for k, part in enumerate(parts, start=1):
        for name, offset, length in part:
            size = (staging / name).stat().st_size
            stored = name if length == size else f"{name}.chunk{len(pieces.get(name, [])):03d}"
            dest = out / part_name(k) / stored
            dest.parent.mkdir(parents=True, exist_ok=True)
            if length == size:
                shutil.copyfile(staging / name, dest)
            else:
                with open(staging / name, "rb") as src, open(dest, "wb") as f:
                    src.seek(offset)
                    f.write(src.read(length))
            files[stored] = {"sha256": sha256_file(dest), "bytes": length, "part": k}
            pieces.setdefault(name, []).append(stored)
    members, contents = {}, {}
    for c in comps:
        stored = str(c["stored"].relative_to(staging))
        whole = c.get("sha256")
        if whole is None:  # stored as is: the sha256 of the file (the join of its chunks)
            h = hashlib.sha256()
            for piece in pieces[stored]:
                h.update((out / part_name(files[piece]["part"]) / piece).read_bytes())
            whole = h.hexdigest()
        members[c["member"]] = {"files": pieces[stored], "codec": c.get("codec", "none"), "sha256": whole,
                                "bytes": c.get("bytes", sum(files[p]["bytes"] for p in pieces[stored]))}  # fmt: skip
        contents[c["member"]] = c.get("info", {})
    shutil.rmtree(staging)
    return files, members, contents, len(parts)


def part_sizes(files: dict[str, dict[str, Any]], n_parts: int) -> dict[str, dict[str, int]]:
    return {str(k): {"bytes": sum(f["bytes"] for f in files.values() if f["part"] == k), "files": sum(f["part"] == k for f in files.values())}
            for k in range(1, n_parts + 1)}  # fmt: skip


def write_manifests(out: Path, manifest: dict[str, Any]) -> None:
    """The same manifest into every part folder (each call carries one part and must be able to check the pack)."""
    for k in range(1, len(manifest["parts"]) + 1):
        (out / part_name(k)).mkdir(parents=True, exist_ok=True)
        (out / part_name(k) / MANIFEST).write_text(json.dumps(manifest, indent=1))


# --------------------------------------------------------------------------- build


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def device_calls(n_parts: int, pack: Path, wheels: Path, budget_s: int = 540) -> list[dict[str, Any]]:
    """The device tool calls, in order: one stash call per part but the last, then the job."""
    calls = []
    for k in range(1, n_parts):
        calls.append({"what": f"call {k} of {n_parts}: stash {part_name(k)}", "carry": [f"{pack.as_posix()}/{part_name(k)}"],
                      "command": f"python3 -m training.gpu_manifest stash {pack.as_posix()}/{part_name(k)}", "timeout_s": 120})  # fmt: skip
    install = (f"python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site {wheels.as_posix()}/*.whl "
               f"&& export PYTHONPATH=/tmp/site:$PWD || exit 1; ")  # fmt: skip
    job = f"PYTHONUNBUFFERED=1 python3 -m training.gpu_job --pack {pack.as_posix()} --out $OUT --budget-s {budget_s}"
    calls.append({"what": f"call {n_parts} of {n_parts}: run the job", "carry": [f"{pack.as_posix()}/{part_name(n_parts)}", wheels.as_posix()],
                  "command": install + job, "timeout_s": min(600, budget_s + 50)})  # fmt: skip
    return calls


def calls_markdown(calls: list[dict[str, Any]], manifest: dict[str, Any]) -> str:
    lines = [f"# Device calls for this pack ({len(calls)} calls, in a row; then give_back)", "",
             "Each call right after the previous one: a stashed part lives only while the machine stays warm (~30 s idle).", ""]  # fmt: skip
    for c in calls:
        lines += [f"## {c['what']}", "", "```json", json.dumps({"command": c["command"], "carry": c["carry"], "timeout_s": c["timeout_s"]}, indent=2), "```", ""]
    lines += ["Then `give_back`.", "", "| part | MiB | files |", "|---|---|---|"]
    lines += [f"| {part_name(int(k))} | {v['bytes'] / MiB:.1f} | {v['files']} |" for k, v in sorted(manifest["parts"].items(), key=lambda kv: int(kv[0]))]
    return "\n".join(lines) + "\n"


def build(cfg: PackConfig, smoke: bool = False) -> dict[str, Any]:
    """Build every component into a staging folder, split into parts, write the manifests and CALLS.md."""
    t0 = time.time()
    out = Path(cfg.out)
    if out.exists():
        shutil.rmtree(out)
    staging = out / ".staging"
    staging.mkdir(parents=True)
    timing: dict[str, float] = {}
    comps: list[dict[str, Any]] = []

    def step(name, fn):
        t = time.time()
        got = fn(cfg, staging)
        comps.extend(got if isinstance(got, list) else [got])
        timing[name] = round(time.time() - t, 1)
        print(f"[gpu_pack] {name}: {timing[name]} s", flush=True)

    if cfg.llm:
        step("llm", pack_llm)
    if cfg.xception:
        step("xception", pack_xception)
    if cfg.llm:
        step("reasoner", pack_reasoner)
        step("describer", pack_describer)
    if cfg.encoder is not None:
        step("encoder", pack_encoder)
    if cfg.effnet is not None:
        step("effnet", pack_effnet)

    tree = cfg.tree_bytes if cfg.tree_bytes is not None else tree_bytes()
    wheels = dir_bytes(cfg.wheels)
    capacity = int(cfg.call_limit_mib * MiB - tree - cfg.margin_mib * MiB)
    if capacity < 4 * MiB:
        raise ValueError(f"the work tree ({tree / MiB:.1f} MiB) leaves {capacity / MiB:.1f} MiB per call")
    files, members, contents, n_parts = write_parts(out, staging, comps, capacity, wheels)

    manifest: dict[str, Any] = {
        "format": FORMAT, "smoke": smoke, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_commit": _git_commit(),
        "config": cfg.model_dump(mode="json"), "files": files, "members": members, "contents": contents,
        "parts": part_sizes(files, n_parts),
        "sizes": {"tree_bytes": tree, "wheels_bytes": wheels, "capacity_per_call_bytes": capacity}, "build_s": timing,
    }  # fmt: skip
    manifest["calls"] = device_calls(n_parts, out, cfg.wheels)
    write_manifests(out, manifest)
    (out / "CALLS.md").write_text(calls_markdown(manifest["calls"], manifest))
    manifest["wall_s"] = round(time.time() - t0, 1)
    return manifest


def preflight(pack: Path = Path(".gpu_pack"), limit_mib: float = 64.0) -> list[dict[str, Any]]:
    """What each device call of the pack would send now (this work tree + its carried paths) against the limit:
    run it right before the GPU session, in the checkout the device tool sends."""
    from training.gpu_manifest import find_manifest

    manifest = json.loads(find_manifest([pack]).read_text())
    tree = tree_bytes()
    rows = []
    for call in manifest["calls"]:
        carried = sum(dir_bytes(Path(c)) if Path(c).is_dir() else (Path(c).stat().st_size if Path(c).exists() else 0) for c in call["carry"])
        total = tree + carried
        rows.append({"call": call["what"], "tree_mib": round(tree / MiB, 1), "carried_mib": round(carried / MiB, 1), "total_mib": round(total / MiB, 1),
                     "ok": total <= limit_mib * MiB and all(Path(c).exists() for c in call["carry"])})  # fmt: skip
    return rows


# --------------------------------------------------------------------------- wheels


def download_wheels(dest: Path = Path(".gpu_wheels"), names: tuple[str, ...] = WHEELS, python_version: str = "3.12") -> dict[str, int]:
    """``pip download`` the pinned wheels (the versions installed here) for CPython ``python_version`` on manylinux x86-64."""
    from importlib.metadata import version

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    reqs = [f"{n}=={version(n)}" for n in names]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
           *(a for p in WHEEL_PLATFORMS for a in ("--platform", p)), "-d", str(dest), *reqs]  # fmt: skip
    subprocess.run(cmd, check=True)
    return {p.name: p.stat().st_size for p in sorted(dest.glob("*.whl"))}


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m training.gpu_pack")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the pack (../shared/data and the feature cache -> .gpu_pack/)")
    b.add_argument("--config", "-c", type=Path, default=None)
    b.add_argument("--set", dest="sets", action="append", default=[])
    b.add_argument("--smoke", action="store_true", help="mark the pack as a rehearsal pack (tiny settings come from the config)")
    w = sub.add_parser("wheels", help="download the wheels the GPU image lacks")
    w.add_argument("--out", type=Path, default=Path(".gpu_wheels"))
    f = sub.add_parser("preflight", help="check that every device call of the pack fits (work tree as it is now + carried paths)")
    f.add_argument("--pack", type=Path, default=Path(".gpu_pack"))
    a = p.parse_args(argv)
    if a.cmd == "preflight":
        rows = preflight(a.pack)
        print(json.dumps(rows, indent=1))
        sys.exit(0 if all(r["ok"] for r in rows) else 1)
    if a.cmd == "wheels":
        sizes = download_wheels(a.out)
        print(json.dumps({**{k: round(v / MiB, 2) for k, v in sizes.items()}, "total_mib": round(sum(sizes.values()) / MiB, 2)}, indent=1))
        return
    cfg = load_train_config(PackConfig, a.config, a.sets)  # type: ignore[arg-type]
    m = build(cfg, smoke=a.smoke)
    print(json.dumps({"parts_mib": {k: round(v["bytes"] / MiB, 1) for k, v in m["parts"].items()}, "sizes_mib": {k: round(v / MiB, 1) for k, v in m["sizes"].items()},
                      "contents": {k: {kk: vv for kk, vv in v.items() if kk not in ("modality_config", "marker")} for k, v in m["contents"].items()},
                      "build_s": m["build_s"], "wall_s": m["wall_s"]}, indent=1, default=str))  # fmt: skip
    print((Path(cfg.out) / "CALLS.md").read_text())


if __name__ == "__main__":  # pragma: no cover
    main()
