"""The CLI through click's runner, and once through the installed entry point."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from timeouts import scaled
from torch import nn

import pruneplan as pp
from pruneplan.cli import cli
from pruneplan.plan import json_schema


@pytest.fixture
def files(tmp_path: Path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    plan = pp.plan_pruning(model, {"0": [0, 1, 2, 5]}, cascades={"0": ["1", "3"]})
    weights = tmp_path / "net.safetensors"
    save_file(model.state_dict(), str(weights))
    return model, plan, plan.save(tmp_path / "plan.json"), weights


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_apply_default_output_and_force(files) -> None:
    model, plan, plan_path, weights = files
    result = run("apply", str(plan_path), str(weights))
    out = weights.with_name("net.pruned.safetensors")
    assert result.exit_code == 0, result.output
    assert result.output == f"wrote {out}\n"
    expected = pp.apply_to_state_dict(plan, model.state_dict())
    got = load_file(str(out))
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    # a second run refuses to overwrite, --force replaces
    assert run("apply", str(plan_path), str(weights)).exit_code == 1
    assert run("apply", str(plan_path), str(weights), "--force").exit_code == 0


def test_validate(files) -> None:
    _, plan, plan_path, weights = files
    result = run("validate", str(plan_path), str(weights))
    assert result.exit_code == 0
    assert result.output == f"ok: 1 groups, digest {plan.digest()}; fits {weights}\n"


def test_show_table(files) -> None:
    model, plan, plan_path, _ = files
    result = run("show", str(plan_path))
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].split() == ["group", "kept/size", "removed", "parameters", "buffers"]
    # removing 4 of 8 filters: conv0 4*3*3*3 + 4 bias, BN weight and bias 4*2, conv3 inputs
    # 4*4*3*3 -> 108 + 4 + 8 + 144 = 264 parameters; BN running mean and var 4*2 = 8 buffer values
    assert lines[1].split() == ["0", "4/8", "50.0%", "264", "8"]
    # touched parameter tensors hold 8*27 + 8 + 8 + 8 + 4*8*9 = 528 scalars
    assert lines[2].startswith("1 groups; 4 of 8 units; 264 of 528 parameters in touched tensors "
                               "removed (50.0%), and 8 buffer values;")
    # the parameter count is the model's actual drop
    pruned = pp.apply_plan(copy.deepcopy(model), plan)
    drop = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in pruned.parameters())
    assert drop == 264


def test_show_plan_without_buffer_record(files, tmp_path: Path) -> None:
    # a plan written before buffers were recorded: the count is labelled as mixed
    _, plan, _, _ = files
    data = json.loads(plan.to_json())
    del data["model"]["buffers"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    lines = run("show", str(old)).output.splitlines()
    assert lines[0].split() == ["group", "kept/size", "removed", "params+bufs"]
    assert lines[1].split() == ["0", "4/8", "50.0%", "272"]  # 264 + 8, as before
    assert "this plan does not record which are buffers" in lines[2]


def test_show_model_counts_before_and_after(files, tmp_path: Path) -> None:
    _, _, plan_path, _ = files
    factory = tmp_path / "net.py"
    factory.write_text(
        "from torch import nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))\n"
    )
    result = run("show", str(plan_path), "--model", f"{factory}:make", "--input-shape", "3,8,8")
    assert result.exit_code == 0, result.output
    tail = result.output.splitlines()[-3:]
    # params 8*27+8 + 16 + 4*8*9+4 = 532 -> 4*27+4 + 8 + 4*4*9+4 = 268; buffers 8+8+1 = 17 -> 9;
    # MACs: conv0 6*6 outputs * 8 * 27 = 7776 + conv3 4*4 * 4 * 72 = 4608 -> 12384;
    # after: 36 * 4 * 27 = 3888 + 16 * 4 * 36 = 2304 -> 6192
    assert tail == ["parameters: 532 -> 268 (-49.6%)", "buffers: 17 -> 9 (-47.1%)",
                    "MACs: 12,384 -> 6,192 (-50.0%)"]
    assert run("show", str(plan_path), "--input-shape", "3,8,8").exit_code == 2


def test_diff_exit_status(files, tmp_path: Path) -> None:
    model, _, plan_path, _ = files
    other = pp.plan_pruning(model, {"0": [0, 1, 3]}, cascades={"0": ["1", "3"]}).save(tmp_path / "b.json")
    same = run("diff", str(plan_path), str(plan_path))
    assert same.exit_code == 0 and same.output == "plans are identical in what they prune\n"
    result = run("diff", str(plan_path), str(other))
    assert result.exit_code == 1
    assert result.output == "0: -[2, 5] +[3]\n"


def test_schema_command(tmp_path: Path) -> None:
    result = run("schema")
    assert result.exit_code == 0 and result.output == json_schema()
    out = tmp_path / "s.json"
    assert run("schema", "-o", str(out)).exit_code == 0
    assert out.read_text() == json_schema()


def test_usage_error_exits_2() -> None:
    result = run("apply")
    assert result.exit_code == 2
    assert "Missing argument 'PLAN'" in result.output


def test_installed_entry_point(files) -> None:
    _, _, plan_path, weights = files
    exe = shutil.which("pruneplan", path=str(Path(sys.executable).parent)) or shutil.which("pruneplan")
    assert exe is not None, "the `pruneplan` console script is not installed"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    ok = subprocess.run([exe, "apply", str(plan_path), str(weights)], capture_output=True, text=True,
                        env=env, timeout=scaled(120))
    assert ok.returncode == 0, ok.stderr
    assert Path(weights.with_name("net.pruned.safetensors")).stat().st_size > 0
    bad = subprocess.run([exe, "show", str(weights)], capture_output=True, text=True, env=env, timeout=scaled(120))
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1
    assert "Traceback" not in bad.stderr


def test_apply_progress_bar_goes_to_stderr_and_changes_nothing(files, tmp_path: Path) -> None:
    _, _, plan_path, weights = files
    quiet, loud = tmp_path / "quiet.safetensors", tmp_path / "loud.safetensors"
    a = run("apply", str(plan_path), str(weights), "-o", str(quiet), "--no-progress")
    b = run("apply", str(plan_path), str(weights), "-o", str(loud), "--progress")
    assert a.exit_code == b.exit_code == 0
    assert a.stderr == "" and "loud.safetensors" in b.stderr  # tqdm's bar, labelled by file
    assert quiet.read_bytes() == loud.read_bytes()
