"""Benchmark YAMLs: validation errors, columns, label map, aliases, filters; the shipped definitions."""

import csv

import pytest
from PIL import Image

from evals.benchmark import BenchmarkError, list_benchmarks, load_benchmark, load_cases
from evals.protocols import PROTOCOLS, get_protocol


def _dataset(tmp_path, rows, header=("image", "dx", "sex", "age")):
    (tmp_path / "img").mkdir(exist_ok=True)
    with (tmp_path / "cases.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            Image.new("RGB", (8, 8), (len(r[0]) * 20 % 255, 50, 90)).save(tmp_path / "img" / r[0])
            w.writerow(r)
    return tmp_path / "cases.csv"


def _yaml(tmp_path, body: str):
    p = tmp_path / "bench.yaml"
    p.write_text(body)
    return p


BASE = """
name: tiny
task: diagnosis
labels: [mel, nv, bkl]
dataset:
  path: cases.csv
  image_root: img
  label_column: dx
"""


def test_unknown_key_and_bad_task_are_errors(tmp_path):
    with pytest.raises(BenchmarkError, match="colour"):
        load_benchmark(_yaml(tmp_path, BASE + "colour: blue\n"))
    with pytest.raises(BenchmarkError, match="task"):
        load_benchmark(_yaml(tmp_path, BASE.replace("task: diagnosis", "task: guessing")))
    with pytest.raises(BenchmarkError, match="labelcolumn"):
        load_benchmark(_yaml(tmp_path, BASE.replace("label_column", "labelcolumn")))


def test_missing_column_file_and_image_are_named(tmp_path):
    _dataset(tmp_path, [("a.png", "mel", "male", "50")])
    b = load_benchmark(_yaml(tmp_path, BASE))
    assert len(load_cases(b)[0]) == 1
    b = load_benchmark(_yaml(tmp_path, BASE.replace("label_column: dx", "label_column: diagnosis")))
    with pytest.raises(BenchmarkError, match=r"label_column names column 'diagnosis'.*columns: image, dx, sex, age"):
        load_cases(b)
    b = load_benchmark(_yaml(tmp_path, BASE.replace("cases.csv", "nope.csv")))
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_cases(b)
    (tmp_path / "img" / "a.png").unlink()
    b = load_benchmark(_yaml(tmp_path, BASE))
    with pytest.raises(FileNotFoundError, match="a.png"):
        load_cases(b)


def test_label_map_aliases_drop_unmapped_metadata_groups(tmp_path):
    _dataset(tmp_path, [("a.png", "clark nevus", "male", "35"), ("b.png", "melanoma (in situ)", "female", "70"),
                        ("c.png", "Seborrheic Keratosis", "unknown", ""), ("d.png", "miscellaneous", "", "")])  # fmt: skip
    body = BASE + """  label_map: {clark nevus: nv, melanoma (in situ): mel}
  metadata: {age: age, sex: sex}
  group_columns: {sex: sex, age: age}
aliases: {bkl: [seborrheic keratosis]}
"""
    # unmapped raw labels are kept and go through the aliases; one that is still unknown is an error
    with pytest.raises(BenchmarkError, match="row 4 has label 'miscellaneous'"):
        load_cases(load_benchmark(_yaml(tmp_path, body)))
    cases, _ = load_cases(load_benchmark(_yaml(tmp_path, body)), limit=3)
    assert [c.label for c in cases] == ["nv", "mel", "bkl"]  # alias matched case-insensitively
    assert cases[0].metadata == {"age": 35.0, "sex": "male"} and cases[2].metadata == {}
    assert cases[1].groups == {"sex": "female", "age": "70"} and cases[2].groups == {"sex": "unknown", "age": "unknown"}
    cases, stats = load_cases(load_benchmark(_yaml(tmp_path, body.replace("  metadata:", "  drop_unmapped: true\n  metadata:"))))
    assert [c.label for c in cases] == ["nv", "mel"]
    assert stats["unmapped_dropped"] == 2 and stats["unmapped_labels"] == {"Seborrheic Keratosis": 1, "miscellaneous": 1}


def test_filter_and_filter_fn(tmp_path):
    _dataset(tmp_path, [("a.png", "mel", "val", "00000006"), ("b.png", "nv", "val", "00000007"), ("c.png", "nv", "train", "0000000c")],
             header=("image", "dx", "split", "sha1"))  # fmt: skip
    for name in ("dermnet_heldout", "training.data:is_dermnet_heldout"):  # registered name, and the old spelling (a key, not an import)
        b = load_benchmark(_yaml(tmp_path, BASE + f"  filter: {{split: [val]}}\n  filter_fn: {{sha1: '{name}'}}\n"))
        cases, stats = load_cases(b)
        assert [c.id for c in cases] == ["a.png"] and stats["filtered_out"] == 2
    with pytest.raises(BenchmarkError, match="no_such_fn.*not a registered filter.*dermnet_heldout"):
        load_benchmark(_yaml(tmp_path, BASE + "  filter_fn: {sha1: 'training.data:no_such_fn'}\n"))


def test_declarative_where_rules(tmp_path):
    _dataset(tmp_path, [("a.png", "mel", "val", "00000006"), ("b.png", "nv", "val", "00000007"), ("cc.png", "nv", "train", "0000000c")],
             header=("image", "dx", "split", "sha1"))  # fmt: skip
    def ids(rules):
        return [c.id for c in load_cases(load_benchmark(_yaml(tmp_path, BASE + "  where:\n" + rules)))[0]]

    assert ids("  - {column: split, in: [val]}\n") == ["a.png", "b.png"]
    assert ids("  - {column: split, not_in: [val]}\n") == ["cc.png"]
    assert ids("  - {column: image, regex: '[a-b]\\.png'}\n  - {column: dx, in: [nv]}\n") == ["b.png"]
    assert ids("  - {column: sha1, hash_split: {every: 6, keep: [0], of: hex}}\n") == ["a.png", "cc.png"]
    sha = ids("  - {column: image, hash_split: {every: 2, keep: [0]}}\n") + ids("  - {column: image, hash_split: {every: 2, keep: [1]}}\n")
    assert sorted(sha) == ["a.png", "b.png", "cc.png"]  # the two buckets partition the rows
    for bad in ("  - {column: split}\n", "  - {column: split, in: [val], regex: x}\n", "  - {column: split, regex: '('}\n",
                "  - {column: split, in: [val], run: 'os:system'}\n"):  # fmt: skip
        with pytest.raises(BenchmarkError, match="invalid benchmark"):
            load_benchmark(_yaml(tmp_path, BASE + "  where:\n" + bad))
    with pytest.raises(BenchmarkError, match="dataset.where names column 'nope'"):
        ids("  - {column: nope, in: [x]}\n")


def test_benchmark_cannot_run_code(tmp_path, monkeypatch):
    """The attack of issue 15: filter_fn naming os:system and a cell holding a shell command."""
    marker = tmp_path / "pwned"
    _dataset(tmp_path, [("a.png", "mel", f"touch {marker}")], header=("image", "dx", "cmd"))
    calls = []
    import os
    import subprocess

    monkeypatch.setattr(os, "system", lambda *a: calls.append(a) or 0)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: calls.append(a))
    for ref in ("os:system", "subprocess:getoutput", "builtins:eval", "os.system"):
        with pytest.raises(BenchmarkError, match="not a registered filter"):
            load_cases(load_benchmark(_yaml(tmp_path, BASE + f"  filter_fn: {{cmd: '{ref}'}}\n")))
    assert not calls and not marker.exists()


def test_dermnet_filter_matches_training_split():
    from evals.filters import DERMNET_HOLDOUT_EVERY, is_dermnet_heldout
    from training.data import DERMNET_HOLDOUT_EVERY as TRAIN_EVERY
    from training.data import is_dermnet_heldout as train_fn

    assert DERMNET_HOLDOUT_EVERY == TRAIN_EVERY
    for h in ("00000000", "00000006", "0000000c", "ffffffff", "deadbeef", "12345678aa"):
        assert is_dermnet_heldout(h) == train_fn(h)


def test_bad_yaml_and_bom_csv(tmp_path):
    with pytest.raises(BenchmarkError, match="not valid YAML"):
        load_benchmark(_yaml(tmp_path, "name: [unclosed\n"))
    with pytest.raises(BenchmarkError, match="not valid YAML"):
        load_benchmark(_yaml(tmp_path, "name: !!python/object/apply:os.system ['true']\n"))
    csv_path = _dataset(tmp_path, [("a.png", "mel", "male", "50")])
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes())
    cases, _ = load_cases(load_benchmark(_yaml(tmp_path, BASE)))
    assert [c.id for c in cases] == ["a.png"]


def test_limit_and_unknown_names():
    with pytest.raises(BenchmarkError, match="isic2018_val"):
        load_benchmark("no_such_benchmark")
    with pytest.raises(ValueError, match="valid tasks: diagnosis, modality"):
        get_protocol("guessing")
    assert set(PROTOCOLS) == {"diagnosis", "modality", "morphology", "zero_shot", "linear_probe", "vqa_text", "reasoner"}


def test_shipped_benchmarks_validate():
    names = list_benchmarks()
    assert {"isic2018_val", "derm7pt_val", "derm7pt_val_criteria", "ham10000_val", "dermnet_clinical", "modality_mix",
            "mmskin_vqa", "isic2018_val_zeroshot", "ham10000_probe", "derm7pt_probe"} <= set(names)  # fmt: skip
    for n in names:
        b = load_benchmark(n)
        assert b.name == n and b.description
    assert load_benchmark("ham10000_val").seen_by_default_classifier


@pytest.mark.data
def test_shipped_benchmarks_read_the_shared_data(shared_data):
    from models.vocabulary import derm7pt_to_ham
    from training.data import is_dermnet_heldout

    d7 = load_benchmark("derm7pt_val")
    with open(shared_data / "derm7pt" / "meta.csv", newline="") as f:
        diagnoses = {r["diagnosis"] for r in csv.DictReader(f)}
    assert d7.dataset.label_map == {d: derm7pt_to_ham(d) for d in diagnoses if derm7pt_to_ham(d)}
    cases, stats = load_cases(d7)
    assert len(cases) == 168 and stats["unmapped_labels"] == {"miscellaneous": 3}
    dn, _ = load_cases(load_benchmark("dermnet_clinical"))
    assert len(dn) == 281 and all(is_dermnet_heldout(c.id) for c in dn)
    ham, _ = load_cases(load_benchmark("ham10000_val"), limit=20)
    assert len(ham) == 20 and all(set(c.groups) == {"sex", "age"} for c in ham)
    mix, _ = load_cases(load_benchmark("modality_mix"))
    assert {c.label for c in mix} == {"dermoscopy", "clinical", "histopathology"} and len(mix) == 160
    crit, _ = load_cases(load_benchmark("derm7pt_val_criteria"))
    assert len(crit) == 171 and crit[0].extra["blue_whitish_veil"] in ("absent", "present")


def test_readme_example_benchmark_validates():
    import re
    from pathlib import Path

    import yaml

    from evals.base import Benchmark

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"```yaml\n(name: my_clinic.*?)```", readme, re.S).group(1)
    b = Benchmark.model_validate(yaml.safe_load(block))
    assert b.dataset.group_columns["skin_type"] == "fitzpatrick" and b.positive == "mel"


def test_positive_must_be_one_of_the_labels(tmp_path):
    # A positive class outside the labels would silently drop the melanoma metrics.
    with pytest.raises(BenchmarkError, match=r"positive 'melanoma' is not one of the benchmark's labels: mel, nv, bkl"):
        load_benchmark(_yaml(tmp_path, BASE + "positive: melanoma\n"))
    assert load_benchmark(_yaml(tmp_path, BASE + "positive: mel\n")).positive == "mel"
