"""A battery of wrong arguments, as a new user would type them.

Every case asserts: the exit status (1 for bad input, 2 for a usage error), exactly one
`error:` line on stderr naming the place (or click's usage message naming the option), no
traceback, no file left behind (temporary files included), and every input file byte-identical
(hashes of the whole folder before and after).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from timeouts import scaled
from torch import nn

import pruneplan as pp
from pruneplan.cli import cli

ROOT = Path(__file__).resolve().parents[1]

FACTORIES = '''
import torch
from torch import nn


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def broken_model():
    raise RuntimeError("no GPU here")


def not_a_model():
    return 42


def needs_arg(n):
    return [(torch.randn(2, 4), torch.tensor([0, 1]))]


def no_targets():
    return [torch.randn(2, 4)]


def empty():
    return []


def number():
    return 7


def good():
    return [(torch.randn(2, 4), torch.tensor([0, 1]))]


def wrong_inputs():
    return [(torch.randn(2, 5), torch.tensor([0, 1]))]


def lm():  # a toy language model: token ids (N, T) -> logits (N, T, 96)
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(96, 8), nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 96))


def tokens():  # next-token data as (input_ids, input_ids)
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    return [(ids, ids)]


def fails_later():
    def gen():
        yield torch.randn(2, 4), torch.tensor([0, 1])
        raise ValueError("the second batch is corrupt")
    return gen()
'''


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    (d / "facs.py").write_text(FACTORIES)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    save_file(model.state_dict(), str(d / "w.safetensors"))
    save_file(nn.Linear(3, 4).state_dict(), str(d / "other.safetensors"))
    save_file({"0.weight": torch.zeros(5, 4), "0.bias": torch.zeros(5), "2.weight": torch.zeros(3, 5),
               "2.bias": torch.zeros(3)}, str(d / "wider.safetensors"))
    (d / "junk.safetensors").write_text("these are not weights")
    (d / "junk.pt").write_bytes(b"\x80\x04junk")
    plan = pp.plan_pruning(model, {"0": [1, 4]}, cascades={"0": ["2"]})
    plan.save(d / "plan.json")
    (d / "deep.json").write_text("[" * 100_000)
    (d / "pruned.safetensors").write_bytes(b"an earlier output")
    (d / "existing").mkdir()
    (d / "existing" / "keep.txt").write_text("keep")
    (d / "dangling.safetensors").symlink_to(d / "nowhere")
    (d / "empty_ckpt").mkdir()
    return d


def snapshot(d: Path) -> dict[str, str]:
    out = {}
    for p in sorted(d.rglob("*")):
        rel = str(p.relative_to(d))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def _cases(d: Path) -> list[tuple[str, list[str], int, str]]:
    model = f"{d / 'facs.py'}:model"
    plan_args = ["plan", "--model", model, "--input-shape", "4", "--metric", "weight_norm",
                 "--ratio", "0.3", "-o", str(d / "new.json")]

    def plan_with(*extra: str, metric: str = "weight_norm", data: str | None = None) -> list[str]:
        args = ["plan", "--model", model, "--input-shape", "4", "--metric", metric, "--ratio", "0.3",
                "-o", str(d / "new.json")]
        if data:
            args += ["--data", f"{d / 'facs.py'}:{data}"]
        return args + list(extra)

    def replace(args: list[str], option: str, value: str) -> list[str]:
        args = list(args)
        args[args.index(option) + 1] = value
        return args

    weights, plan = str(d / "w.safetensors"), str(d / "plan.json")
    return [
        # bad input: exit 1, one error line
        ("input shape does not fit", replace(plan_args, "--input-shape", "5"), 1,
         # the first Linear (4 -> 6) meets 5 features: it is named, with torch's own message
         "error: --input-shape 5: the model does not run on an example input of shape [2, 5], in module "
         "'0' (RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x5 and 4x6))"),
        ("groups input shape", ["groups", "--model", model, "--input-shape", "3,2"], 1,
         "error: --input-shape 3,2: the model does not run"),
        ("weights of another model", plan_with("--weights", str(d / "other.safetensors")), 1,
         "other.safetensors: weights do not fit"),
        ("weights of another width", plan_with("--weights", str(d / "wider.safetensors")), 1,
         "tensor '0.bias' has shape [5] in the file, [6] in the model"),
        ("weights not safetensors", plan_with("--weights", str(d / "junk.safetensors")), 1,
         "junk.safetensors: not a safetensors file or a torch state dict (SafetensorError"),
        ("weights not a torch file", plan_with("--weights", str(d / "junk.pt")), 1,
         "junk.pt: not a safetensors file or a torch state dict"),
        ("weights missing", plan_with("--weights", str(d / "absent.safetensors")), 1,
         "absent.safetensors' does not exist"),
        ("weights a folder", plan_with("--weights", str(d / "existing")), 1, "is a folder, not a regular file"),
        ("model factory fails", replace(plan_args, "--model", f"{d / 'facs.py'}:broken_model"), 1,
         "calling it with no arguments failed (RuntimeError: no GPU here)"),
        ("model factory gives a number", replace(plan_args, "--model", f"{d / 'facs.py'}:not_a_model"), 1,
         "gave a int, not a torch.nn.Module"),
        ("model not importable", replace(plan_args, "--model", "no_such_module_xyz:f"), 1,
         "error: --model no_such_module_xyz:f: cannot import 'no_such_module_xyz'"),
        ("model spec without colon", replace(plan_args, "--model", "model"), 1,
         "expected 'pkg.module:factory', got 'model'"),
        ("data factory needs an argument", plan_with(metric="taylor", data="needs_arg"), 1,
         "calling it with no arguments failed (TypeError"),
        ("data without targets", plan_with(metric="taylor", data="no_targets"), 1,
         "batches must be (inputs, targets) pairs; the first batch is a Tensor"),
        ("data empty", plan_with(metric="taylor", data="empty"), 1, "yields no batches"),
        ("data not iterable", plan_with(metric="taylor", data="number"), 1, "gave a int, not an iterable"),
        ("data of another input size", plan_with(metric="taylor", data="wrong_inputs"), 1,
         "the data's inputs (first batch: [2, 5]) do not fit the model, in module '0' (RuntimeError: "
         "mat1 and mat2 shapes cannot be multiplied (2x5 and 4x6))"),
        ("mse with class labels", plan_with("--criterion", "mse", metric="taylor", data="good"), 1,
         "criterion 'mse' needs float targets shaped like the model's output [2, 3]; the data gives "
         "int64 targets of shape [2]"),
        ("cross_entropy with token targets",
         ["plan", "--model", f"{d / 'facs.py'}:lm", "--input-shape", "16", "--input-dtype", "long",
          "--metric", "taylor", "--data", f"{d / 'facs.py'}:tokens", "--criterion", "cross_entropy",
          "--ratio", "0.3", "-o", str(d / "new.json")], 1,
         # outputs (4, 16, 96), targets (4, 16): F.cross_entropy reads axis 1 (16) as the classes
         "error: criterion 'cross_entropy' needs outputs [N, classes] and targets [N] (here N = 4); the "
         "model gives outputs [4, 16, 96] and the data int64 targets [4, 16], one per token "
         "(cross_entropy would read axis 1, of size 16, as the classes: RuntimeError: Expected target "
         "size [4, 96], got [4, 16]); for next-token targets use the causal_lm criterion"),
        ("plan output folder missing", replace(plan_args, "-o", str(d / "missing" / "dir" / "p.json")), 1,
         f"error: {d / 'missing' / 'dir' / 'p.json'}: folder '{d / 'missing' / 'dir'}' does not exist"),
        ("schema output folder missing", ["schema", "-o", str(d / "missing" / "s.json")], 1,
         f"error: {d / 'missing' / 's.json'}: folder '{d / 'missing'}' does not exist"),
        ("apply onto an existing folder", ["apply", plan, weights, "-o", str(d / "existing"), "--force"], 1,
         "existing: is a folder; give a file name, or end the path with '/' to write into the folder"),
        ("apply output exists", ["apply", plan, weights, "-o", str(d / "pruned.safetensors")], 1,
         "pruned.safetensors: output exists (use --force to replace it)"),
        ("apply onto a dangling link", ["apply", plan, weights, "-o", str(d / "dangling.safetensors")], 1,
         "output exists (a dangling symbolic link) (use --force to replace it)"),
        ("apply into a missing folder", ["apply", plan, weights, "-o", str(d / "missing") + "/"], 1,
         "folder '" + str(d / "missing") + "' does not exist"),
        ("apply a deep plan", ["apply", str(d / "deep.json"), weights, "-o", str(d / "o.safetensors")], 1,
         "deep.json: plan is nested deeper than 64 levels"),
        ("apply to junk", ["apply", plan, str(d / "junk.safetensors"), "-o", str(d / "o.safetensors")], 1,
         "junk.safetensors: not a valid safetensors file"),
        ("apply to a folder without index", ["apply", plan, str(d / "empty_ckpt"), "-o", str(d / "out")], 1,
         "empty_ckpt: no *.safetensors.index.json file in this folder"),
        ("validate against other weights", ["validate", plan, str(d / "other.safetensors")], 1,
         "tensor '0.bias' named by the plan is missing"),
        ("show a device", ["show", "/dev/zero"], 1, "error: plan file '/dev/zero' is a character device"),
        ("show a folder", ["show", str(d)], 1, "is a folder, not a regular file"),
        ("diff a missing plan", ["diff", plan, str(d / "absent.json")], 1, "No such file or directory"),
        # usage errors: exit 2, naming the option
        ("ratio 1.0", replace(plan_args, "--ratio", "1.0"), 2, "Invalid value for '--ratio': 1.0 is not in the range 0<=x<1"),
        ("ratio negative", replace(plan_args, "--ratio", "-0.1"), 2, "Invalid value for '--ratio'"),
        ("ratio a percentage", replace(plan_args, "--ratio", "30"), 2, "Invalid value for '--ratio': 30.0"),
        ("ratio not a number", replace(plan_args, "--ratio", "half"), 2, "Invalid value for '--ratio'"),
        ("round-to 0", [*plan_args, "--round-to", "0"], 2, "Invalid value for '--round-to'"),
        ("min-keep 0", [*plan_args, "--min-keep", "0"], 2, "Invalid value for '--min-keep'"),
        ("input shape not numbers", replace(plan_args, "--input-shape", "4,x"), 2,
         "Invalid value for '--input-shape': '4,x' is not a shape"),
        ("input shape zero", replace(plan_args, "--input-shape", "0"), 2, "Invalid value for '--input-shape'"),
        ("plan output is a folder", replace(plan_args, "-o", str(d / "existing") + "/"), 2,
         "Invalid value for '-o' / '--output'"),
        ("unknown metric", replace(plan_args, "--metric", "magic"), 2, "Invalid value for '--metric'"),
        ("data metric without data", plan_with(metric="taylor"), 2, "metric 'taylor' needs --data"),
    ]


CASE_IDS = [c[0] for c in _cases(Path("/x"))]


@pytest.mark.parametrize("index", range(len(CASE_IDS)), ids=CASE_IDS)
def test_wrong_arguments_give_one_clear_error_and_change_nothing(folder: Path, index: int) -> None:
    _, args, status, message = _cases(folder)[index]
    before = snapshot(folder)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == status, (result.stdout, result.stderr)
    assert "Traceback" not in result.output + result.stderr
    lines = result.stderr.strip().splitlines()
    if status == 1:
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    else:
        assert lines[-1].startswith("Error: "), result.stderr
    assert message in result.stderr, result.stderr
    assert snapshot(folder) == before  # inputs unchanged, no output, no temporary file


def test_the_battery_is_large() -> None:
    assert sum(c[2] == 1 for c in _cases(Path("/x"))) >= 30
    assert sum(c[2] == 2 for c in _cases(Path("/x"))) >= 10


def test_an_unanticipated_error_is_one_line_and_a_hint(folder: Path) -> None:
    # the data factory's second batch raises: nobody can foresee that one
    args = ["plan", "--model", f"{folder / 'facs.py'}:model", "--input-shape", "4", "--metric", "taylor",
            "--ratio", "0.3", "--data", f"{folder / 'facs.py'}:fails_later", "-o", str(folder / "new.json")]
    before = snapshot(folder)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: unexpected ValueError: the second batch is corrupt",
                     "hint: run `pruneplan --debug ...` to see the traceback; if the input looks right, "
                     "this is a bug in pruneplan: please report it"]
    assert snapshot(folder) == before
    # --debug shows the traceback (a real process: what a user sees)
    proc = subprocess.run([sys.executable, "-m", "pruneplan.cli", "--debug", *args], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=scaled(300))
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert 'raise ValueError("the second batch is corrupt")' in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: unexpected ValueError: the second batch is corrupt"
    assert snapshot(folder) == before


def test_trailing_slash_means_a_folder(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "into"
    out.mkdir()
    result = CliRunner().invoke(cli, ["apply", str(folder / "plan.json"), str(folder / "w.safetensors"),
                                      "-o", f"{out}/"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"wrote {out / 'w.pruned.safetensors'}\n"
    assert sorted(p.name for p in out.iterdir()) == ["w.pruned.safetensors"]
