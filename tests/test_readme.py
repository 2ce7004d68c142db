"""The README's quick start runs as written, and the README opens with the two commands."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_quick_start_runs(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    quick = next(b for b in blocks if "plan_pruning" in b)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace: dict = {}
        exec(compile(quick, "README quick start", "exec"), namespace)
    finally:
        os.chdir(cwd)
    # the snippet asserts its own shapes; check its side effects independently too
    assert (tmp_path / "plan.json").exists()
    assert namespace["model"][0].weight.shape == (13, 3, 3, 3)
    assert len(quick.strip().splitlines()) <= 20


def test_readme_opens_with_the_two_commands() -> None:
    first = (ROOT / "README.md").read_text().split("```")[1]
    commands = [line.split("#")[0].strip() for line in first.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_discovery_snippet_runs_as_written() -> None:
    pytest.importorskip("torchvision")
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    snippet = next(b for b in blocks if "prunable_groups" in b and "plan_from_metric" in b)
    namespace: dict = {}
    exec(compile(snippet, "README discovery snippet", "exec"), namespace)
    # what the comments promise: the classifier left out with a reason, 30% of the units chosen
    # globally (floor(0.3 * units) at most, rounded to keep multiples of 8), a MAC target met
    assert [lo.name for lo in namespace["groups"].left_out] == ["fc"]
    assert sum(map(len, namespace["removed"].values())) <= int(0.3 * sum(g.size for g in namespace["groups"]))
    assert namespace["plan"].provenance.selection["achieved"]["macs"] >= 0.5
    assert "conv1" not in [g.name for g in namespace["plan"].groups]
