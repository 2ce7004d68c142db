"""Every example runs end to end (fast settings) and prints what it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

import pruneplan as pp

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_and_writes_its_outputs(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "pruned file loaded into a fresh model == live-pruned model: True" in result.stdout
    plan = pp.PrunePlan.load(out / "plan.json")
    # the demo removes half the units of each of its three roots
    assert [(g.name, g.size, len(g.removed)) for g in plan.groups] == [("0", 32, 16), ("10", 128, 64), ("4", 64, 32)]
    with safe_open(str(out / "model.pruned.safetensors"), framework="pt") as f:
        assert f.metadata()["pruneplan.plan_digest"] == plan.digest()
        assert f.get_slice("10.weight").get_shape() == [64, 32 * 8 * 8]
