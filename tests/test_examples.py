"""Every example runs end to end (fast settings) and produces what it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from timeouts import scaled

import pruneplan as pp

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args],
                            capture_output=True, text=True, timeout=scaled(timeout))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_demo_quick(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = run_example("demo.py", "--out", str(out), "--quick", timeout=1200)
    assert "CLI-pruned file loaded into a fresh model == live-pruned model: True" in result.stdout
    lines = (out / "results.txt").read_text().splitlines()
    assert lines[0] == "digits CNN, 3 seeds: mean ± sample standard deviation over seeds"
    rows = lines[3:13]
    # the unpruned baseline + nine metrics at the one quick ratio
    assert [r.split()[0] for r in rows] == ["none", "random", "weight_norm", "l2_norm", "fpgm", "lamp", "apoz",
                                             "sensitivity", "taylor", "shapley"]
    params = {int(r.split()[8].replace(",", "")) for r in rows[1:]}
    assert len(params) == 1 and params.pop() < int(rows[0].split()[8].replace(",", ""))
    assert (out / "accuracy_vs_ratio.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plan = pp.PrunePlan.load(out / "plans" / "taylor_50.json")
    assert plan.provenance.metric == "taylor"
    # half of each group: conv 16 -> 8, conv 32 -> 16, linear 64 -> 32
    assert [(g.name, g.size, len(g.removed)) for g in plan.groups] == [("0", 16, 8), ("3", 32, 16), ("9", 64, 32)]
    with safe_open(str(out / "model.pruned.safetensors"), framework="pt") as f:
        assert f.metadata()["pruneplan.plan_digest"] == plan.digest()
        assert f.get_slice("9.weight").get_shape() == [32, 16 * 4 * 4]

    # the committed quick numbers (docs/demo_quick.json, written by `make docs`) reproduce within
    # their spread: every mean within 3 sample standard deviations (at least 0.02) of the committed
    committed = json.loads((ROOT / "docs" / "demo_quick.json").read_text())
    fresh = json.loads((out / "results.json").read_text())
    assert fresh.keys() == committed.keys()
    for key, c in committed.items():
        for field in ("acc", "ft"):
            tolerance = max(3 * c[field + "_sd"], 0.02)
            assert abs(fresh[key][field] - c[field]) <= tolerance, (key, field, fresh[key][field], c[field])


def test_readme_quotes_the_committed_demo_and_criteria_numbers() -> None:
    readme = (ROOT / "README.md").read_text()
    demo = (ROOT / "docs" / "demo_results.txt").read_text().strip().splitlines()
    assert "\n".join(demo) in readme  # the table and both ranking lines, verbatim
    criteria = (ROOT / "docs" / "criteria.md").read_text()
    table = [line for line in criteria.splitlines() if line.startswith("|") or line.startswith("Ranking")]
    assert table and all(line in readme for line in table)
