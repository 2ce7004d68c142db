"""Every command that writes (`plan -o`, `schema -o`, `apply -o`) follows one rule: the output is
never an input (resolved: hard and symbolic links count), an existing path only with --force,
and it is written to a temporary name and renamed. Refusals are one ``error:`` line, exit 1,
with every file's bytes unchanged."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

import pruneplan as pp
from pruneplan.cli import cli

FACTORY = """
import torch
from torch import nn


def net():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
"""


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry of ``folder``: name -> sha256 of its bytes (or where a link points)."""
    out = {}
    for p in sorted(folder.iterdir()):
        if p.is_symlink():
            out[p.name] = os.readlink(p)
        else:
            out[p.name] = "folder" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    (tmp_path / "facs.py").write_text(FACTORY)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    os.link(tmp_path / "w.safetensors", tmp_path / "hard.safetensors")
    os.symlink("w.safetensors", tmp_path / "sym.safetensors")
    (tmp_path / "victim.txt").write_text("keep me\n")
    return tmp_path


def plan_args(d: Path, out: str, *extra: str) -> list[str]:
    return ["plan", "--model", f"{d / 'facs.py'}:net", "--weights", str(d / "w.safetensors"),
            "--input-shape", "3,8,8", "--metric", "weight_norm", "--ratio", "0.5", "-o", out, *extra]


def refused(args: list[str], d: Path, message: str) -> None:
    before = snapshot(d)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert result.output == f"error: {message}\n"
    assert snapshot(d) == before  # nothing written, nothing replaced, no temporary left


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("name", ["w.safetensors", "hard.safetensors", "sym.safetensors"])
def test_plan_never_writes_its_weights(folder: Path, name: str, force: bool) -> None:
    out = str(folder / name)
    refused(plan_args(folder, out, *(["--force"] if force else [])), folder,
            f"{out}: the output is the input file {str(folder / 'w.safetensors')!r}; choose another output")


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_plan_never_writes_its_model_file(folder: Path, force: bool) -> None:
    out = str(folder / "facs.py")
    refused(plan_args(folder, out, *(["--force"] if force else [])), folder,
            f"{out}: the output is the input file {out!r}; choose another output")


def test_plan_refuses_an_existing_file_and_force_replaces_it(folder: Path) -> None:
    out = str(folder / "victim.txt")
    refused(plan_args(folder, out), folder, f"{out}: output exists (use --force to replace it)")
    result = CliRunner().invoke(cli, plan_args(folder, out, "--force"))
    assert result.exit_code == 0, result.output
    # the plan of a fresh run to a new name has the same bytes (plans are deterministic)
    assert CliRunner().invoke(cli, plan_args(folder, str(folder / "new.json"))).exit_code == 0
    assert (folder / "victim.txt").read_bytes() == (folder / "new.json").read_bytes()
    assert pp.PrunePlan.load(folder / "victim.txt").groups[0].removed  # a plan, not "keep me"
    assert not list(folder.glob(".*.tmp"))


def test_schema_refuses_an_existing_file_and_force_replaces_it(folder: Path) -> None:
    out = str(folder / "victim.txt")
    refused(["schema", "-o", out], folder, f"{out}: output exists (use --force to replace it)")
    result = CliRunner().invoke(cli, ["schema", "-o", out, "--force"])
    assert result.exit_code == 0 and result.output == f"wrote {out}\n"
    assert (folder / "victim.txt").read_text() == pp.json_schema()
    fresh = CliRunner().invoke(cli, ["schema", "-o", str(folder / "s.json")])
    assert fresh.exit_code == 0 and (folder / "s.json").read_text() == pp.json_schema()


def test_apply_refuses_its_input_through_any_link(folder: Path) -> None:
    assert CliRunner().invoke(cli, plan_args(folder, str(folder / "p.json"))).exit_code == 0
    for name in ("hard.safetensors", "sym.safetensors"):
        out = str(folder / name)
        refused(["apply", str(folder / "p.json"), str(folder / "w.safetensors"), "-o", out, "--force"],
                folder, f"{out}: the output is the input file {str(folder / 'w.safetensors')!r}; "
                        f"choose another output")


def test_apply_never_replaces_its_plan(folder: Path) -> None:
    assert CliRunner().invoke(cli, plan_args(folder, str(folder / "p.json"))).exit_code == 0
    plan = str(folder / "p.json")
    refused(["apply", plan, str(folder / "w.safetensors"), "-o", plan, "--force"], folder,
            f"{plan}: the output is the input file {plan!r}; choose another output")
    # a sharded checkpoint's output folder that holds the plan would delete it with --force
    ckpt = folder / "ckpt"
    ckpt.mkdir()
    pp.PrunePlan.load(plan)  # still a plan
    refused(["apply", plan, str(ckpt), "-o", str(folder), "--force"], folder,
            f"{folder}: the output folder contains the input {plan!r}; choose another output")


def test_the_shared_rule_directly(folder: Path) -> None:
    w = folder / "w.safetensors"
    with pytest.raises(pp.OutputFileError, match="the output is the input file"):
        pp.write_output(folder / "hard.safetensors", b"x", [w], overwrite=True)
    with pytest.raises(pp.OutputFileError, match="output exists"):
        pp.write_output(folder / "victim.txt", b"x", [w])
    with pytest.raises(pp.OutputFileError, match="contains the input"):
        pp.check_output(folder, [w], overwrite=True, folder=True)
    assert pp.write_output(folder / "n.txt", b"abc", [w]) == folder / "n.txt"
    assert (folder / "n.txt").read_bytes() == b"abc"
    assert (folder / "w.safetensors").stat().st_nlink == 2  # the hard link pair untouched


def test_plan_device_errors_name_the_device(folder: Path) -> None:
    out = str(folder / "p.json")
    result = CliRunner().invoke(cli, plan_args(folder, out, "--device", "cdua"))
    assert result.exit_code == 1 and len(result.output.splitlines()) == 1, result.output
    assert result.output.startswith("error: --device cdua: device 'cdua' is not a device name (")
    assert result.output.endswith("give cpu, cuda, cuda:N or mps\n")
    assert "bug in pruneplan" not in result.output and not (folder / "p.json").exists()
    if not torch.cuda.is_available():
        result = CliRunner().invoke(cli, plan_args(folder, out, "--device", "cuda"))
        assert result.exit_code == 1 and len(result.output.splitlines()) == 1, result.output
        assert result.output.startswith("error: --device cuda: device 'cuda' is not available on this machine")
    gone = torch.cuda.device_count() + 1  # a GPU index this machine does not have
    result = CliRunner().invoke(cli, plan_args(folder, out, "--device", f"cuda:{gone}"))
    assert result.exit_code == 1 and f"device 'cuda:{gone}' is not available" in result.output
    with pytest.raises(pp.PlanningError, match="device 'cdua' is not a device name"):
        pp.loading.check_device("cdua")


def test_truncated_plan_names_the_place_once(tmp_path: Path) -> None:
    (tmp_path / "t.json").write_text('{\n  "format": "prunepl')
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "t.json")])
    assert result.exit_code == 1
    assert result.output == (f"error: {tmp_path / 't.json'}: plan is not valid JSON: Unterminated string "
                             f"starting at line 2 column 13\n")
