"""The GPU pack's manifest: sha256 of every file, which device call carries it, and verification.

Standard library only (its one project import, `models.integrity`, is too): the GPU job verifies its pack (and the stash script copies a part) before any
wheel is installed or any heavy module is imported.

Layout of a pack folder (``.gpu_pack/``)::

    .gpu_pack/part1/manifest.json          # the same manifest in every part
    .gpu_pack/part1/<file or chunk> ...    # carried by device call 1 (stashed), ...
    .gpu_pack/partN/<file or chunk> ...    # carried by the last call, which runs the job

A file too large for one call is cut into chunks ``<name>.chunk000``, ``<name>.chunk001``, ... (possibly in
different parts) that :func:`assemble` joins (and decompresses, for ``.xz`` members) on the GPU.

    python -m training.gpu_manifest stash .gpu_pack/part1     # device call 1: copy a part out of the work tree
    python -m training.gpu_manifest verify .gpu_pack          # what is missing or altered (exit 3 if anything)
"""

from __future__ import annotations

import json
import lzma
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from models.integrity import sha256_stream

FORMAT = "dermgraph-gpu-pack/1"
MANIFEST = "manifest.json"
STASH_NAME = "dermgraph_gpu_pack"


def stash_dir() -> Path:
    """Where stash calls copy their part: outside the work tree, under the system temp directory
    (the device machine keeps it between calls only while it stays warm)."""
    return Path(tempfile.gettempdir()) / STASH_NAME


sha256_file = sha256_stream  # standard library only, like this module


def part_name(k: int) -> str:
    return f"part{k}"


# --------------------------------------------------------------------------- verification


@dataclass
class Verification:
    """Outcome of :func:`verify`: where each member was found, and what is missing or altered."""

    manifest: dict[str, Any]
    found: dict[str, Path] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    tampered: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.tampered

    def report(self) -> str:
        """A message naming every missing or altered file and the device call that brings it."""
        if self.ok:
            return f"pack verified: {len(self.found)} files, sha256 ok"
        files = self.manifest["files"]
        calls = self.manifest.get("calls", [])
        lines = []
        for what, names in (("missing", self.missing), ("sha256/size mismatch", self.tampered)):
            by_part: dict[int, list[str]] = {}
            for n in names:
                by_part.setdefault(int(files[n]["part"]), []).append(n)
            for k, ns in sorted(by_part.items()):
                call = calls[k - 1]["what"] if k - 1 < len(calls) else f"the call carrying {part_name(k)}"
                lines.append(f"{what}: {len(ns)} file(s) of {part_name(k)} ({call}): " + ", ".join(sorted(ns)))
        lines.append(
            "A stashed part lives only while the device machine stays warm (about 30 s idle): run the whole call sequence "
            "again, each call right after the previous one (README: GPU job)."
        )
        return "\n".join(lines)


def find_manifest(roots: Iterable[Path]) -> Path:
    """The manifest in the first ``root/part*/`` that has one."""
    tried = []
    for root in roots:
        for p in sorted(Path(root).glob(f"part*/{MANIFEST}")):
            return p
        tried.append(str(root))
    raise FileNotFoundError(f"no {MANIFEST} under any part folder of {tried}")


def verify(roots: Iterable[Path], manifest: dict[str, Any] | None = None, check_hash: bool = True) -> Verification:
    """Look up every manifest member under ``<root>/part<k>/`` for each root (the carried pack, then the
    stash) and check its size and sha256."""
    roots = [Path(r) for r in roots]
    if manifest is None:
        manifest = json.loads(find_manifest(roots).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} manifest (format {manifest.get('format')!r})")
    v = Verification(manifest)
    for name, info in sorted(manifest["files"].items()):
        candidates = [r / part_name(int(info["part"])) / name for r in roots]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            v.missing.append(name)
        elif path.stat().st_size != info["bytes"] or (check_hash and sha256_file(path) != info["sha256"]):
            v.tampered.append(name)
        else:
            v.found[name] = path
    return v


# --------------------------------------------------------------------------- members made of chunks


def assemble(v: Verification, name: str, dest: Path) -> Path:
    """Write the member ``name`` (a whole file or the join of its chunks, decompressed when it was packed
    as ``.xz``) to ``dest`` and check its recorded sha256. ``v`` must be a complete verification."""
    info = v.manifest["members"][name]
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "wb") as out:
        sink = lzma.LZMADecompressor() if info.get("codec") == "xz" else None
        for piece in info["files"]:
            with open(v.found[piece], "rb") as f:
                while block := f.read(1 << 22):
                    out.write(sink.decompress(block) if sink else block)
    got = sha256_file(tmp)
    if got != info["sha256"]:
        tmp.unlink()
        raise ValueError(f"{name}: assembled file has sha256 {got}, the manifest says {info['sha256']}")
    os.replace(tmp, dest)
    return dest


def member_path(v: Verification, name: str, work: Path) -> Path:
    """A readable path of member ``name``: the carried file itself when it is one plain file, else assembled into ``work``."""
    info = v.manifest["members"][name]
    if len(info["files"]) == 1 and info.get("codec", "none") == "none":
        return v.found[info["files"][0]]
    return assemble(v, name, Path(work) / name)


# --------------------------------------------------------------------------- stash


def stash(part: Path, dest: Path | None = None) -> Path:
    """Copy one part folder (``.gpu_pack/partK``) to ``<stash_dir>/partK`` and check it against its manifest."""
    part = Path(part)
    dest = Path(dest) if dest is not None else stash_dir()
    manifest = json.loads((part / MANIFEST).read_text())
    target = dest / part.name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(part, target)
    k = int(part.name.removeprefix("part"))
    mine = {n: i for n, i in manifest["files"].items() if int(i["part"]) == k}
    v = verify([dest], {**manifest, "files": mine})
    if not v.ok:
        raise SystemExit(v.report())
    print(f"stashed {part.name}: {len(mine)} files, {sum(i['bytes'] for i in mine.values()) / 2**20:.1f} MiB -> {target}", flush=True)
    return target


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m training.gpu_manifest")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stash", help="copy one carried part out of the work tree (device calls before the last)")
    s.add_argument("part", type=Path)
    s.add_argument("--dest", type=Path, default=None)
    c = sub.add_parser("verify", help="check a pack (and the stash) against the manifest")
    c.add_argument("pack", type=Path)
    c.add_argument("--stash", type=Path, default=None)
    a = p.parse_args(argv)
    if a.cmd == "stash":
        stash(a.part, a.dest)
        return 0
    v = verify([a.pack, a.stash or stash_dir()])
    print(v.report())
    return 0 if v.ok else 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
