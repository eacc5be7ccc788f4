"""The default agent's outputs on 40 isic2018_val + 20 Derm7pt val cases equal the saved records: labels, texts and
verdicts exactly, numbers within float noise (timings and package versions aside; ``make_golden.first_difference``).
Regenerate after a deliberate behaviour change: ``python scripts/make_golden.py``."""

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.weights, pytest.mark.data, pytest.mark.slow, pytest.mark.timeout(3600)]

ROOT = Path(__file__).resolve().parent.parent


def _golden_module():
    spec = importlib.util.spec_from_file_location("make_golden", ROOT / "scripts" / "make_golden.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_selection_is_fixed(shared_data):
    g = _golden_module()
    for name in g.SETS:
        saved = [json.loads(line)["id"] for line in (g.GOLDEN / f"{name}.jsonl").read_text().splitlines()]
        assert [c["id"] for c in g.select_cases(shared_data, name)] == saved


def test_agent_outputs_are_identical_to_the_golden_records(shared_data):
    import subprocess
    import sys

    # The script pins the hash seed and threads (it re-runs itself under them) and prints the differing cases.
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_golden.py"), "--check", "--data", str(shared_data)],
                         capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0 and "identical" in res.stdout, res.stdout[-4000:] + res.stderr[-2000:]
