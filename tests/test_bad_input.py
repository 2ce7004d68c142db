"""Bad input: a PlanError subclass naming the place, CLI exit 1 with one `error:` line, nothing changed.

Every case runs against the same environment (a model, its optimizer mid-training, a plan file
and a safetensors file in a temporary folder). Before and after the failing call we snapshot
the model's state dict and printed structure, the optimizer state and the bytes of every file
in the folder, and assert they are identical.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

import pruneplan as pp
from pruneplan.cli import cli


def make_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 3))


@dataclass
class Env:
    dir: Path
    model: nn.Module
    opt: torch.optim.Optimizer
    plan: pp.PrunePlan
    plan_path: Path
    weights: Path

    def write_plan(self, name: str, mutate: Callable[[dict], None]) -> Path:
        data = json.loads(self.plan.to_json())
        mutate(data)
        path = self.dir / name
        path.write_text(json.dumps(data))
        return path


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return build_env(tmp_path)


def build_env(tmp_path: Path) -> Env:
    """A model (with its optimizer mid-training), its plan and its weights in ``tmp_path``."""
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(8, 4)
    model(x).sum().backward()
    opt.step()
    plan = pp.plan_pruning(model, {"0": [1, 4]}, cascades={"0": ["1", "3", "4"]})
    plan_path = plan.save(tmp_path / "plan.json")
    weights = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(weights))
    return Env(tmp_path, model, opt, plan, plan_path, weights)


def snapshot(env: Env) -> dict:
    return {
        "files": {p.name: p.read_bytes() for p in sorted(env.dir.iterdir())},
        "model": {k: v.clone() for k, v in env.model.state_dict().items()},
        "grads": [None if p.grad is None else p.grad.clone() for p in env.model.parameters()],
        "ids": [id(p) for p in env.model.parameters()],
        "structure": repr(env.model),
        "opt": copy.deepcopy(env.opt.state_dict()),
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["files"].keys() == b["files"].keys()
    for k in a["files"]:
        assert a["files"][k] == b["files"][k], k
    assert a["structure"] == b["structure"] and a["ids"] == b["ids"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for g, h in zip(a["grads"], b["grads"], strict=True):
        assert (g is None and h is None) or torch.equal(g, h)
    for p, st in a["opt"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["opt"]["state"][p][k]), k


def _mutate_plan(fn):
    """A case whose plan file is broken: library load and `pruneplan apply` both fail."""

    def setup(env: Env):
        path = env.write_plan("bad.json", fn)
        return (lambda: pp.PrunePlan.load(path)), ["apply", str(path), str(env.weights)]

    return setup


def _set(path: str, value):
    def fn(d: dict) -> None:
        *head, last = path.split("/")
        for k in head:
            d = d[int(k)] if k.isdigit() else d[k]
        d[int(last) if last.isdigit() else last] = value

    return _mutate_plan(fn)


def _malformed(env: Env):
    path = env.dir / "bad.json"
    path.write_text('{"format": "pruneplan", ')
    return (lambda: pp.PrunePlan.load(path)), ["validate", str(path)]


def _overlap(d: dict) -> None:
    g = copy.deepcopy(d["groups"][0])
    g["name"] = "other"
    d["groups"].append(g)


def _weights_with(env: Env, name: str, change: Callable[[dict], None]) -> Path:
    sd = {k: v.clone() for k, v in env.model.state_dict().items()}
    change(sd)
    path = env.dir / name
    save_file(sd, str(path))
    return path


def _missing_tensor(env: Env):
    path = _weights_with(env, "other.safetensors", lambda sd: sd.pop("1.running_var"))
    out = env.dir / "out.safetensors"
    return (lambda: pp.apply_to_safetensors(env.plan, path, out)), ["apply", str(env.plan_path), str(path)]


def _shape_mismatch(env: Env):
    def change(sd):
        sd["4.weight"] = torch.zeros(3, 7)

    path = _weights_with(env, "other.safetensors", change)
    out = env.dir / "out.safetensors"
    return (lambda: pp.apply_to_safetensors(env.plan, path, out)), ["apply", str(env.plan_path), str(path)]


def _another_model(env: Env):
    # same shapes for every touched tensor, but one more tensor: a different model
    def change(sd):
        sd["extra.weight"] = torch.zeros(2)

    path = _weights_with(env, "other.safetensors", change)
    out = env.dir / "out.safetensors"
    return (lambda: pp.apply_to_safetensors(env.plan, path, out)), ["apply", str(env.plan_path), str(path)]


def _not_safetensors(env: Env):
    path = env.dir / "notes.safetensors"
    path.write_text("these are not weights")
    out = env.dir / "out.safetensors"
    return (lambda: pp.apply_to_safetensors(env.plan, path, out)), ["apply", str(env.plan_path), str(path)]


def _truncated(env: Env):
    path = env.dir / "cut.safetensors"
    path.write_bytes(env.weights.read_bytes()[:-10])
    out = env.dir / "out.safetensors"
    return (lambda: pp.apply_to_safetensors(env.plan, path, out)), ["apply", str(env.plan_path), str(path)]


def _missing_weights(env: Env):
    path = env.dir / "absent.safetensors"
    out = env.dir / "out.safetensors"
    return (lambda: pp.apply_to_safetensors(env.plan, path, out)), ["apply", str(env.plan_path), str(path)]


def _missing_plan(env: Env):
    path = env.dir / "absent.json"
    return (lambda: pp.PrunePlan.load(path)), ["show", str(path)]


def _output_exists(env: Env):
    out = env.dir / "model.pruned.safetensors"
    out.write_bytes(b"keep me")
    cli_args = ["apply", str(env.plan_path), str(env.weights)]  # default output name
    return (lambda: pp.apply_to_safetensors(env.plan, env.weights, out)), cli_args


def _output_is_input(env: Env):
    w = env.weights
    return (lambda: pp.apply_to_safetensors(env.plan, w, w, overwrite=True)), [
        "apply", str(env.plan_path), str(w), "-o", str(w), "--force"]


def _output_folder_missing(env: Env):
    out = env.dir / "no" / "such" / "dir.safetensors"
    return (lambda: pp.apply_to_safetensors(env.plan, env.weights, out)), [
        "apply", str(env.plan_path), str(env.weights), "-o", str(out)]


def _model_already_pruned(env: Env):
    pruned = pp.apply_to_state_dict(env.plan, env.model.state_dict())
    path = env.dir / "pruned.safetensors"
    save_file(pruned, str(path))
    out = env.dir / "out.safetensors"
    return (lambda: pp.apply_to_safetensors(env.plan, path, out)), ["validate", str(env.plan_path), str(path)]


def _apply_twice_to_model(env: Env):
    # a plan made for the 6-unit model refused by a model whose layer "0" has another shape
    other = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 3))
    env.model = other
    env.opt = torch.optim.SGD(other.parameters(), lr=0.1)
    return (lambda: pp.apply_plan(other, env.plan, env.opt)), None


def _attribute_mismatch(env: Env):
    # shapes fit, but the dropout rate differs from the plan's record: refuse, change nothing
    env.model[3].p = 0.2
    return (lambda: pp.apply_plan(env.model, env.plan, env.opt)), None


def _foreign_optimizer_state(env: Env):
    w = env.model[0].weight
    env.opt.state[w]["odd"] = torch.zeros(3, 3)
    return (lambda: pp.apply_plan(env.model, env.plan, env.opt)), None


def _load_pruned_other_plan(env: Env):
    out = pp.apply_to_safetensors(env.plan, env.weights, env.dir / "p.safetensors")
    other = pp.plan_pruning(env.model, {"0": [2]}, cascades={"0": ["1", "3", "4"]})
    fresh = make_model()
    env.model = fresh
    env.opt = torch.optim.SGD(fresh.parameters(), lr=0.1)
    return (lambda: pp.load_pruned(fresh, other, out)), None


def _planning_unknown_module(env: Env):
    return (lambda: pp.plan_pruning(env.model, {"7": [0]}, cascades={"7": []})), None


def _planning_bad_index(env: Env):
    return (lambda: pp.plan_pruning(env.model, {"0": [9]}, cascades={"0": ["4"]})), None


CASES = [
    ("malformed json", _malformed, pp.PlanValidationError, "plan is not valid JSON"),
    ("unknown field", _set("surprise", 1), pp.PlanValidationError, "surprise: Extra inputs are not permitted"),
    ("wrong version", _set("version", 7), pp.PlanValidationError, "unsupported plan version 7"),
    ("unsorted", _set("groups/0/removed", [4, 1]), pp.PlanValidationError, "removed[1] = 1 is not sorted"),
    ("duplicate", _set("groups/0/removed", [1, 1]), pp.PlanValidationError, "removed[1] = 1 is a duplicate"),
    ("negative", _set("groups/0/removed", [-2, 1]), pp.PlanValidationError, "removed[0] = -2 is negative"),
    ("out of range", _set("groups/0/removed", [1, 6]), pp.PlanValidationError,
     "group '0': removed[1] = 6 is out of range for size 6"),
    ("all removed", _set("groups/0/removed", list(range(6))), pp.PlanValidationError,
     "group '0': removes all 6 units"),
    ("overlapping groups", _mutate_plan(_overlap), pp.PlanValidationError,
     "groups '0' and 'other' both slice tensor"),
    ("dropout rate", _set("groups/0/dropout/0/p_after", 1.5), pp.PlanValidationError,
     "dropout rate 1.5 is outside [0, 1)"),
    ("tensor missing", _missing_tensor, pp.PlanMismatchError, "tensor '1.running_var' named by the plan is missing"),
    ("shape mismatch", _shape_mismatch, pp.PlanMismatchError,
     "tensor '4.weight' has shape [3, 7], the plan expects [3, 6]"),
    # the one extra tensor is found and named (the digest matches without it)
    ("another model", _another_model, pp.PlanMismatchError,
     "tensor 'extra.weight' of shape [2] is not in the model the plan was made for"),
    ("not safetensors", _not_safetensors, pp.WeightsFileError, "notes.safetensors: not a valid safetensors file"),
    ("truncated", _truncated, pp.WeightsFileError, "cut.safetensors: not a valid safetensors file"),
    ("missing weights", _missing_weights, pp.WeightsFileError, "absent.safetensors: no such file"),
    ("missing plan", _missing_plan, pp.PlanValidationError, "cannot read plan file"),
    ("output exists", _output_exists, pp.OutputFileError, "model.pruned.safetensors: output exists"),
    ("output is input", _output_is_input, pp.OutputFileError, "the output is the input file"),
    ("output folder missing", _output_folder_missing, pp.OutputFileError, "does not exist"),
    ("already pruned weights", _model_already_pruned, pp.PlanMismatchError,
     "tensor '0.bias' has shape [4], the plan expects [6]"),
    ("model of another shape", _apply_twice_to_model, pp.PlanMismatchError,
     "model: tensor '0.bias' has shape [5], the plan expects [6]"),
    ("dropout differs", _attribute_mismatch, pp.PlanMismatchError,
     "dropout '3' has rate 0.2, the plan expects 0.5"),
    ("foreign optimizer state", _foreign_optimizer_state, pp.OptimizerStateError,
     "optimizer state 'odd' of parameter '0.weight' has shape [3, 3]"),
    ("load_pruned other plan", _load_pruned_other_plan, pp.PlanMismatchError, "pruned by plan"),
    ("unknown module", _planning_unknown_module, pp.PlanningError, "no module named '7'"),
    ("index out of range", _planning_bad_index, pp.PlanningError, "group '0': index 9 is out of range for 6 units"),
]


@pytest.mark.parametrize(("case", "setup", "exc", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(env: Env, case, setup, exc, message) -> None:
    call, cli_args = setup(env)
    before = snapshot(env)
    with pytest.raises(exc) as info:
        call()
    assert isinstance(info.value, pp.PlanError)
    assert message in str(info.value)
    assert_same(before, snapshot(env))
    if cli_args is not None:
        result = CliRunner().invoke(cli, cli_args)
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert "Traceback" not in result.output
        assert_same(before, snapshot(env))


def test_table_has_at_least_twenty_cases() -> None:
    assert len(CASES) >= 20
