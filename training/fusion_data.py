"""Every expert's first-round output on images the lesion classifier has not seen: the data of the fusion.

For each case of isic2018_val, Derm7pt (train, extra, val) and the DermNet photos held out of the case
index, the agent's own nodes run up to retrieval from the cached encoder outputs (as the reasoner's
training data is rendered, :func:`training.reasoner_data.render_state`: the case's own image is never
retrieved), then the LLM scores the candidates exactly as the reasoner node does in its first round.
Derm7pt ``train``/``extra`` were the concept heads' training data, so their findings are replaced by
K-fold cross-fitted ones (heads that never saw the case), as deployment would see them.

One JSON line per case (append-only, fsynced; a rerun skips finished ids). The LLM is by far the slowest
expert, so it runs as a second pass into ``<out>_llm.jsonl``; :func:`read_records` merges the two::

    python -m training.fusion_data --out .cache/fusion/experts.jsonl --no-llm    # every expert but the LLM
    python -m training.fusion_data --out .cache/fusion/experts.jsonl             # + the LLM's candidate scores

The second visual expert's outputs (``<out>_effnet.jsonl``) come from its cached outputs on every image
(``python -m training.eval_encoder features``), named as the agent's encode node names them::

    python -m training.fusion_data --out .cache/fusion/experts.jsonl --expert-weights W --expert-features DIR

The clinical feature probe's outputs (``<out>_probe.jsonl``, DermNet photos only)::

    python -m training.fusion_data --out .cache/fusion/experts.jsonl --probe dermnet-probe --sources dermnet --expert-features DIR
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable

from models.vocabulary import SEVEN_POINT
from training.reasoner_data import CaseRow, derm7pt_rows, isic_rows

SOURCES = ("isic2018_val", "derm7pt", "dermnet")
EXTRA_SOURCES = ("dermnet_train",)

"""Collected on request: the DermNet photos of the case index (clinical fit rows once cross-fitted outputs exist)."""
def dermnet_rows(feature_dir: Path, heldout: bool = True) -> list[CaseRow]:
    """The DermNet photos held out of the shipped case index (``training.data.is_dermnet_heldout``), or
    (``heldout=False``) the ones in it, each then leaving itself out of its retrieved cases (its index id is
    ``dermnet:<sha1[:12]>``, scripts/make_case_pairs.py)."""
    from retrieval.kb import KnowledgeBase
    from training.data import aligned, is_dermnet_heldout, load_features, source_table

    kb = KnowledgeBase()  # labels named by a HAM10000 code as the case index names them (scripts/make_case_pairs.py)
    table = [r for r in source_table("dermnet") if is_dermnet_heldout(r["sha1"]) == heldout]
    rows, f = aligned(table, load_features("dermnet", "full", feature_dir))
    split = "heldout" if heldout else "train"
    return [CaseRow(f"dermnet:{r['sha1']}", "dermnet", split, r["image"], kb.ham_class_for(r["label"]) or r["label"], p, x,
                    exclude=set() if heldout else {f"dermnet:{r['sha1'][:12]}"}) for r, p, x in zip(rows, f["probs"], f["features"])]  # fmt: skip


def crossfit_derm7pt_findings(feature_dir: Path, k: int = 5, seed: int = 0, heads: str | None = None,
                              expert_crossfit: str | Path | None = None) -> dict[str, dict[str, dict[str, float]]]:  # fmt: skip
    """Case id → out-of-fold concept-head findings for Derm7pt train+extra (the heads' training data), by heads
    refitted per fold with ``heads``' regularisation (default: the agent's morphology.heads). Heads on the second
    expert's features need its cross-fitted features there (``expert_crossfit``, a bundle made with the encoder's
    ``crossfit_features: [derm7pt]``): the expert trained on those images, so its own features are in-sample."""
    from agent.config import AgentConfig
    from models.heads import HeadSet
    from models.resolve import resolve_artifact
    from training.data import aligned, load_features, source_table
    from training.encoder import crossfit_outputs
    from training.verifier import crossfit_findings

    ref = heads or AgentConfig().morphology.heads
    shipped = HeadSet.load(resolve_artifact(ref))
    table = [r for r in source_table("derm7pt") if r["split"] in ("train", "extra")]
    if shipped.feature_kind == "second-expert":
        got = crossfit_outputs(expert_crossfit, "derm7pt") if expert_crossfit is not None else None
        if got is None or "features" not in got:
            raise ValueError(f"concept heads {ref!r} read the second expert's features, which are in-sample on Derm7pt train/extra: give "
                             "--expert-crossfit with a bundle made with the encoder's crossfit_features: [derm7pt]")
        rows, f = aligned(table, {"ids": got["ids"].astype(str), "features": got["features"].astype("float32")})
        if len(rows) < len(table):
            raise ValueError(f"the cross-fitted bundle has features for {len(rows)} of {len(table)} Derm7pt train/extra images")
    else:
        rows, f = aligned(table, load_features("derm7pt", "full", feature_dir))
    shipped_c = (shipped.meta.get("metrics") or {}).get("C") or {}
    cs = {c: float(shipped_c.get(c, 0.003)) for c in SEVEN_POINT}
    found = crossfit_findings(f["features"], rows, cs, k, seed)
    return {f"derm7pt:{r['case_index']}": fnd for r, fnd in zip(rows, found)}


def case_rows(sources: Iterable[str], feature_dir: Path) -> list[CaseRow]:
    out: list[CaseRow] = []
    for s in sources:
        if s == "isic2018_val":
            out += isic_rows(feature_dir, "all")
        elif s == "derm7pt":
            out += derm7pt_rows(["train", "extra", "val"], feature_dir)
        elif s == "dermnet":
            out += dermnet_rows(feature_dir)
        elif s == "dermnet_train":
            out += dermnet_rows(feature_dir, heldout=False)
        else:
            raise ValueError(f"unknown source {s!r}; valid: {', '.join(SOURCES + EXTRA_SOURCES)}")
    return out


def expert_record(row: CaseRow, state, rt, with_llm: bool) -> dict[str, Any]:
    """What each expert said about one case (JSON-able)."""
    from agent.nodes.reason import _llm_probs, candidates_for, classifier_display

    cands, names = candidates_for(state, rt.config)
    rec: dict[str, Any] = {
        "id": row.id,
        "source": row.source,
        "split": row.split,
        "label": row.label,
        "modality": state.modality.label,
        "modality_rejected": state.modality.rejected,
        "modality_probs": state.modality.probs,
        "classifier": {c: float(p) for c, p in state.encoding.classifier_probs.items()},
        "findings": {fd.criterion: fd.probs for fd in (state.morphology.findings if state.morphology else [])},
        "knn": state.retrieval.knn_probs if state.retrieval else {},
        "evidence": [{"id": e.id, "label": e.label, "kind": e.kind, "score": round(e.score, 5)} for e in (state.retrieval.evidence if state.retrieval else [])],
        "candidates": cands,
        "llm": None,
    }
    if with_llm and cands and rt.config.route(state.modality.label).reasoner and not state.modality.rejected:
        rec["llm"] = _llm_probs(rt, state, cands, names, classifier_display(state, rt, cands), None, seed=None)
    return rec


def _done_ids(path: Path) -> set[str]:
    done: set[str] = set()
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                done.add(json.loads(line)["id"])
            except (ValueError, KeyError):
                continue  # a line cut by a kill: the case is redone
    return done


def collect(out: Path, sources: Iterable[str], feature_dir: Path, with_llm: bool = True, limit: int | None = None, expert_features: Path | None = None,
            agent_config: Path | None = None, expert_crossfit: str | Path | None = None) -> Path:
    """Append each case's expert record to ``out`` (``<out>_llm.jsonl`` with the LLM); ``limit``: only the first
    ``limit`` cases of the selection (cases already in ``out`` are skipped). ``expert_features``: the
    second expert's cached outputs (``eval_encoder features``), so that clinical photos search similar cases with
    its features as the agent does (never for images it trained on, whose features are in-sample).
    ``agent_config``: the agent YAML whose nodes render the cases (default: the default agent), e.g. one whose
    ``retrieval.expert_case_index`` is a rebuilt index or whose ``morphology.heads`` are other concept heads (each
    record names them: ``findings_heads``). ``expert_crossfit``: the expert's cross-fitted outputs, replayed on its
    own training images (and their cross-fitted features, where the bundle has them, for heads that read them)."""
    from training.reasoner_data import attach_expert_probs, make_agent, render_state

    out = llm_path(out) if with_llm else out
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = case_rows(sources, feature_dir)
    n_all = len(rows)
    rows = rows[:limit]  # the first `limit` cases of the selection, as `dermgraph eval --limit`: repeating the command adds none
    ids = {r.id for r in rows}
    done = {i for i in _done_ids(out) if i in ids}
    todo = [r for r in rows if r.id not in done]
    print(f"{len(rows)} cases{f' (the first {len(rows)} of {n_all})' if len(rows) < n_all else ''}, {len(done)} done, {len(todo)} to go", flush=True)
    if not todo:
        return out
    agent = make_agent(agent_config)
    rt = agent.runtime
    heads = rt.config.morphology.heads
    needs = any(r.source == "derm7pt" and r.split != "val" for r in todo)
    crossfit = crossfit_derm7pt_findings(feature_dir, heads=heads, expert_crossfit=expert_crossfit) if needs else {}
    if expert_features is not None:
        print(f"second expert's outputs: {attach_expert_probs(todo, expert_features, expert_crossfit, rt.config.encoder.second_expert)}", flush=True)
    elif any(r.source == "dermnet" for r in todo):
        print("warning: no --expert-features: clinical photos will search similar cases with the lesion classifier's features, "
              "not the second expert's as the default agent does", flush=True)
    t0 = time.time()
    with out.open("a") as fh:
        for n, row in enumerate(todo, 1):
            state = render_state(row, agent)
            if row.id in crossfit and state.morphology is not None:
                findings = [fd.model_copy(update={"probs": crossfit[row.id][fd.criterion], "value": max(crossfit[row.id][fd.criterion], key=crossfit[row.id][fd.criterion].get)})
                            for fd in state.morphology.findings if fd.criterion in crossfit[row.id]]  # fmt: skip
                state = state.model_copy(update={"morphology": state.morphology.model_copy(update={"findings": findings})})
            rec = expert_record(row, state, rt, with_llm)
            rec["crossfit_findings"] = row.id in crossfit
            if rec["findings"]:
                rec["findings_heads"] = heads
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            if n % 25 == 0 or n == len(todo):
                print(f"{n}/{len(todo)}  {n / (time.time() - t0):.2f} cases/s", flush=True)
    return out


def _read(path: Path) -> dict[str, dict[str, Any]]:
    recs: dict[str, dict[str, Any]] = {}
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            recs[r["id"]] = r
    return recs


def llm_path(path: Path) -> Path:
    """Where the pass with the LLM writes (the LLM is the slow expert, so it runs as a second pass)."""
    return Path(path).with_name(Path(path).stem + "_llm.jsonl")


def expert_path(path: Path, name: str) -> Path:
    """Where an extra expert's outputs for the same cases are written (``<out>_<name>.jsonl``: id + fields)."""
    return Path(path).with_name(Path(path).stem + f"_{name}.jsonl")


def read_records(path: Path, extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The collected records, each with the LLM's scores from the LLM pass where it has run, and the fields
    of each extra expert file (:func:`expert_path`) where it exists."""
    recs = _read(path)
    for i, r in _read(llm_path(path)).items():
        if i in recs:
            recs[i]["llm"] = r["llm"]
        else:
            recs[i] = r
    for name in extra:
        for i, r in _read(expert_path(path, name)).items():
            if i in recs:
                recs[i].update({k: v for k, v in r.items() if k != "id"})
    return list(recs.values())


def write_expert_outputs(out: Path, weights: Path, expert_features: Path, feature_dir: Path, sources: Iterable[str] = SOURCES, name: str = "effnet",
                         crossfit: Path | None = None, view_heads: Iterable[str] = (), members_if: str | None = None, views_if: str | None = None) -> Path:
    """``<out>_<name>.jsonl``: per case, the second expert's HAM10000 head (``name``), DermNet head
    (``<name>_dermnet``, via :func:`agent.nodes.encode.dermnet_label_probs`) and 7-point criteria heads
    (``<name>_findings``) from ``<expert_features>/<source>__effnet.npz``.

    ``crossfit``: cross-fitted outputs (:func:`training.encoder.crossfit_outputs`: the GPU job's ``effnet/crossfit``
    folder, its bundle or the registry id ``efficientnet-lite0-derm-crossfit``), used
    for the images it covers (the expert's own training images, which it would otherwise score in-sample);
    those records carry ``<name>_crossfit: true``. ``view_heads``: the heads the agent averages over test-time views
    (``encoder.second_expert`` options, as ``expert_features`` was written): the cross-fitted outputs' view means
    (``<head>__views``, encoder ``crossfit_views``) are used for them where the bundle has them and ``views_if`` holds
    (None: every image); a count of those without is printed (single-view there). Where the bundle has each fold's ensemble member too (encoder ``crossfit``
    ``member``), the two networks' outputs are averaged as the agent's ensemble does (``members_if``, as in
    ``encoder.second_expert`` options; :func:`training.encoder.member_mean`)."""
    from agent.nodes.encode import expert_criteria_from_heads, expert_probs_from_heads
    from models.efficientnet import expert_info
    from retrieval.kb import KnowledgeBase
    from training.encoder import TRAINED_SPLITS, agent_outputs, expert_outputs

    heads = expert_info(Path(weights))["heads"]
    kb = KnowledgeBase()
    dest = expert_path(out, name)
    n = single_view = 0
    with open(dest.with_suffix(".tmp"), "w") as f:
        for source in sources:
            outputs = expert_outputs("dermnet" if source == "dermnet_train" else source, expert_features, crossfit)
            for row in case_rows([source], feature_dir):
                if row.image not in outputs:
                    continue
                probs, crossfitted = outputs[row.image]
                if crossfitted:
                    probs, missing = agent_outputs(probs, members_if, tuple(view_heads), views_if, heads)
                    single_view += missing
                ep = expert_probs_from_heads(heads, probs, kb)
                rec: dict[str, Any] = {"id": row.id, name: ep["effnet"]}
                if crossfitted:
                    rec[f"{name}_crossfit"] = True
                elif row.split in TRAINED_SPLITS.get(row.source, ()):
                    rec[f"{name}_in_sample"] = True  # the expert trained on this image: the fusion trainer refuses to fit on it
                if "effnet_dermnet" in ep:
                    rec[f"{name}_dermnet"] = ep["effnet_dermnet"]
                if crit := expert_criteria_from_heads(heads, probs):
                    rec[f"{name}_findings"] = crit
                f.write(json.dumps(rec) + "\n")
                n += 1
    os.replace(dest.with_suffix(".tmp"), dest)
    print(f"{n} cases -> {dest}")
    if single_view:
        print(f"{single_view} cross-fitted cases have no view means for {list(view_heads)} (a bundle made without crossfit_views): single-view outputs there")
    return dest


def write_probe_outputs(out: Path, probe: str | Path, feature_dir: Path, sources: Iterable[str] = ("dermnet",), expert_features: Path | None = None,
                        expert: str | Path | None = None, batch_size: int = 32) -> Path:  # fmt: skip
    """``<out>_probe.jsonl``: per DermNet photo, the clinical feature probe's distribution (``probe``, under the case
    index's labels, as the agent's encode node names it 'probe_dermnet') from the photo and its cached lesion-encoder
    features. Photos the probe trained on (the case index's, ``dermnet_train``) carry ``probe_in_sample: true``.
    With ``expert_features`` (the second expert's cached outputs) only the photos its modality head calls clinical get
    the probe, as :func:`agent.nodes.encode.wants_probe` decides in the agent (``expert``: its weights, for the head's
    labels; default the agent's)."""
    import numpy as np
    from PIL import Image

    from agent.config import AgentConfig
    from agent.nodes.encode import dermnet_label_probs, wants_probe
    from models.efficientnet import expert_info
    from models.paths import data_dir
    from models.probe import FeatureProbe
    from models.resolve import resolve_artifact
    from retrieval.kb import KnowledgeBase

    unknown = sorted(set(sources) - {"dermnet", "dermnet_train"})
    if unknown:
        raise ValueError(f"the clinical probe speaks to DermNet photos only; got {unknown} (valid: dermnet, dermnet_train)")
    rows = case_rows(sources, feature_dir)
    if expert_features is not None:
        labels = expert_info(resolve_artifact(str(expert or AgentConfig().encoder.second_expert.model)))["heads"]["modality"]
        z = np.load(Path(expert_features) / "dermnet__effnet.npz", allow_pickle=False)
        modality = dict(zip(z["ids"].astype(str), z["probs_modality"]))
        rows = [r for r in rows if r.image in modality and wants_probe({"effnet_modality": dict(zip(labels, map(float, modality[r.image])))})]
    model, kb, dest = FeatureProbe(resolve_artifact(str(probe))), KnowledgeBase(), expert_path(out, "probe")
    with open(dest.with_suffix(".tmp"), "w") as f:
        for lo in range(0, len(rows), batch_size):
            batch = rows[lo : lo + batch_size]
            images = [Image.open(data_dir() / r.source / r.image).convert("RGB") for r in batch]
            for r, p in zip(batch, model.predict(images, np.stack([r.features for r in batch]))):
                rec: dict[str, Any] = {"id": r.id, "probe": {c: round(v, 6) for c, v in dermnet_label_probs(model.classes, p, kb).items()}}
                if r.split == "train":
                    rec["probe_in_sample"] = True  # the probe trained on this photo: the fusion trainer refuses to fit on it
                f.write(json.dumps(rec) + "\n")
    os.replace(dest.with_suffix(".tmp"), dest)
    print(f"{len(rows)} photos -> {dest}")
    return dest


def write_tta_outputs(out: Path, feature_dir: Path, sources: Iterable[str] = ("isic2018_val", "derm7pt"), views: tuple[str, ...] = ()) -> Path:
    """``<out>_tta.jsonl``: per case, the lesion classifier's probabilities on each test-time view of its image
    (:mod:`models.tta`), with the case's metadata as the agent's encode node passes it. Appends; a rerun skips
    finished ids."""
    from PIL import Image

    from agent.runtime import Runtime
    from agent.config import AgentConfig
    from models.paths import data_dir
    from models.tta import TTA_VIEWS, tta_view

    views = views or TTA_VIEWS
    dest = expert_path(out, "tta")
    done = _done_ids(dest)
    clf = Runtime(AgentConfig()).classifier
    rows = [r for r in case_rows(sources, feature_dir) if r.id not in done]
    t0 = time.time()
    with open(dest, "a") as f:
        for i, row in enumerate(rows):
            img = Image.open(data_dir() / row.source / row.image).convert("RGB")
            res = clf.predict([tta_view(img, v) for v in views], [row.metadata or None] * len(views))
            rec = {"id": row.id, "tta_views": list(views), "tta": [{c: round(float(p), 6) for c, p in zip(res.labels, pr)} for pr in res.probs]}
            f.write(json.dumps(rec) + "\n")
            f.flush()
            if (i + 1) % 50 == 0:
                print(f"{i + 1}/{len(rows)}  {(i + 1) / (time.time() - t0):.2f} cases/s", flush=True)
    return dest


def main(argv: list[str] | None = None) -> None:
    from training.data import FEATURE_DIR

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(".cache/fusion/experts.jsonl"))
    ap.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES + EXTRA_SOURCES)
    ap.add_argument("--feature-dir", type=Path, default=FEATURE_DIR)
    ap.add_argument("--no-llm", action="store_true", help="skip the LLM's candidate scores (fast; the LLM pass writes <out>_llm.jsonl)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N cases of the selection (as `dermgraph eval --limit`); "
                    "a rerun resumes within those N and adds no others")
    ap.add_argument("--agent-config", type=Path, default=None, help="agent YAML whose nodes render the cases (default: the default agent)")
    ap.add_argument("--tta", action="store_true", help="write <out>_tta.jsonl: the classifier on test-time views of each image (models.tta)")
    ap.add_argument("--expert-weights", type=Path, default=None, help="write <out>_effnet.jsonl for this second-expert file instead of collecting")
    ap.add_argument("--expert-features", type=Path, default=None, help="the second expert's outputs on every image (python -m training.eval_encoder features "
                    "--feature-dir ...): with --expert-weights, write <out>_effnet.jsonl; else clinical photos search cases with its features")
    ap.add_argument("--expert-view-heads", nargs="*", default=[], help="heads --expert-features averages over test-time views (eval_encoder --view-heads): "
                    "the cross-fitted view means are used for them")
    ap.add_argument("--expert-members-if", default=None, help="the agent's members_if (e.g. modality=dermoscopy): where the cross-fitted bundle has each fold's "
                    "ensemble member, the images it picks get both networks' mean (default: every image the member predicted)")
    ap.add_argument("--expert-views-if", default=None, help="the agent's views_if (e.g. modality=clinical): only the images it picks get the "
                    "cross-fitted view means of --expert-view-heads (default: every image)")
    ap.add_argument("--probe", default=None, help="write <out>_probe.jsonl: the clinical feature probe (registry id or file) on the DermNet photos of "
                    "--sources (dermnet, dermnet_train); with --expert-features, only those the second expert calls clinical, as the agent runs it")
    ap.add_argument("--expert-crossfit", default=None, help="cross-fitted outputs for its training images: registry id (efficientnet-lite0-derm-crossfit), bundle or folder")
    a = ap.parse_args(argv)
    if a.tta:
        write_tta_outputs(a.out, a.feature_dir, a.sources)
        return
    if a.probe is not None:
        write_probe_outputs(a.out, a.probe, a.feature_dir, [s for s in a.sources if s.startswith("dermnet")], a.expert_features, a.expert_weights)
        return
    if a.expert_weights is not None:
        if a.expert_features is None:
            ap.error("--expert-weights needs --expert-features")
        write_expert_outputs(a.out, a.expert_weights, a.expert_features, a.feature_dir, a.sources, crossfit=a.expert_crossfit, view_heads=a.expert_view_heads,
                             members_if=a.expert_members_if, views_if=a.expert_views_if)
        return
    collect(a.out, a.sources, a.feature_dir, with_llm=not a.no_llm, limit=a.limit, expert_features=a.expert_features, agent_config=a.agent_config,
            expert_crossfit=a.expert_crossfit)


if __name__ == "__main__":
    main()
