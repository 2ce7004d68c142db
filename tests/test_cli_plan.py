"""`pruneplan groups` and `pruneplan plan`: models and data named by factory specs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import pruneplan as pp
from pruneplan.cli import cli

ROOT = Path(__file__).resolve().parents[1]
MODEL = f"{ROOT / 'examples' / 'digits.py'}:make_cnn"
DATA = f"{ROOT / 'examples' / 'digits.py'}:attribution_batches"


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_groups_lists_the_prunable_roots() -> None:
    result = run("groups", "--model", MODEL, "--input-shape", "1,8,8")
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines()][:4]  # then the roots left out
    assert rows[0] == ["group", "size", "tensors", "roots"]
    # conv 16 (conv, bias, BN x4, next conv) = 7 tensors; conv 32 likewise; fc 64 (w, b, next) = 3;
    # the 10-way classifier is not prunable (its units are the model's output)
    assert rows[1:] == [["0", "16", "7", "0"], ["3", "32", "7", "3"], ["9", "64", "3", "9"]]


def test_plan_weight_norm_round_to_matches_the_library(tmp_path: Path) -> None:
    torch.manual_seed(0)
    from_lib_model = pp.loading.load_model(MODEL)
    weights = tmp_path / "w.safetensors"
    save_file(from_lib_model.state_dict(), str(weights))
    out = tmp_path / "plan.json"
    result = run("plan", "--model", MODEL, "--weights", str(weights), "--input-shape", "1,8,8",
                 "--metric", "weight_norm", "--ratio", "0.3", "--round-to", "8", "-o", str(out))
    assert result.exit_code == 0, result.output
    plan = pp.PrunePlan.load(out)
    # 30% of 16/32/64 leaves 11.2/22.4/44.8 units, rounded up to multiples of 8: 16/24/48 kept
    assert [(g.name, g.size - len(g.removed)) for g in plan.groups] == [("3", 24), ("9", 48)]
    expected = pp.plan_from_metric(from_lib_model, pp.loading.example_input((1, 8, 8), batch_size=2),
                                   "weight_norm", 0.3, round_to=8)
    assert plan.to_json() == expected.to_json()
    assert json.loads(out.read_text())["provenance"]["metric"] == "weight_norm"


def test_data_metric_needs_data_and_works_with_it(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    missing = run("plan", "--model", MODEL, "--input-shape", "1,8,8", "--metric", "taylor",
                  "--ratio", "0.5", "-o", str(out))
    assert missing.exit_code == 2 and "metric 'taylor' needs --data" in missing.output
    assert not out.exists()
    ok = run("plan", "--model", MODEL, "--input-shape", "1,8,8", "--metric", "taylor", "--ratio", "0.5",
             "--data", DATA, "-o", str(out))
    assert ok.exit_code == 0, ok.output
    plan = pp.PrunePlan.load(out)
    assert [(g.name, len(g.removed)) for g in plan.groups] == [("0", 8), ("3", 16), ("9", 32)]


def test_bad_model_spec_is_one_error_line(tmp_path: Path) -> None:
    result = run("groups", "--model", "no_such_module_xyz:factory", "--input-shape", "1,8,8")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
