"""Weights whose untouched tensors differ from the plan's model: the plan records only a digest of
every name and shape, so the message says what a mismatch means, counts the tensors, and names a
single extra tensor (the one without which the digest matches)."""

from __future__ import annotations

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
from pruneplan import plan as plan_module
from pruneplan.cli import cli

ROOT = Path(pp.__file__).resolve().parent.parent


def model_and_plan() -> tuple[nn.Module, pp.PrunePlan]:
    torch.manual_seed(0)
    # state dict: 0.weight, 0.bias, 2.weight, 2.bias, 4.weight, 4.bias (6 tensors); pruning "0"
    # touches 0.weight, 0.bias, 2.weight (3 tensors); 2.bias, 4.weight, 4.bias are untouched
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    return model, pp.plan_pruning(model, {"0": [1, 4]}, example_inputs=torch.randn(2, 4))


def untouched_message(where: str, here: int, digest: str, plan: pp.PrunePlan) -> str:
    return (f"{where}: the names and shapes of the weights differ from the model the plan was made for "
            "outside the 3 tensors the plan touches (those are present, with the shapes the plan "
            "expects): a tensor the plan does not touch is missing, extra, or has another shape "
            f"({here} tensors here, {here - 3} of them untouched; the plan records only a digest of all "
            f"names and shapes: {digest[:12]} here, {plan.model.digest[:12]} in the plan)")


def test_missing_extra_and_reshaped_untouched_tensors() -> None:
    model, plan = model_and_plan()
    assert sorted(plan.model.tensors) == ["0.bias", "0.weight", "2.weight"]
    sd = model.state_dict()

    extra = {**sd, "extra.weight": torch.zeros(3, 4)}
    with pytest.raises(pp.PlanMismatchError) as err:
        pp.apply_to_state_dict(plan, extra)
    assert str(err.value) == ("state dict: tensor 'extra.weight' of shape [3, 4] is not in the model the "
                              "plan was made for (without it, the names and shapes of the weights are "
                              "the ones the plan records)")

    missing = {k: v for k, v in sd.items() if k != "4.bias"}  # 5 tensors, 2 untouched
    with pytest.raises(pp.PlanMismatchError) as err:
        pp.apply_to_state_dict(plan, missing)
    digest = pp.plan.state_dict_digest({k: v.shape for k, v in missing.items()})
    assert str(err.value) == untouched_message("state dict", 5, digest, plan)

    # a model whose last layer has 4 outputs: 4.weight [4, 5] and 4.bias [4] (6 tensors, 3 untouched)
    other = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    with pytest.raises(pp.PlanMismatchError) as err:
        pp.apply_plan(other, plan)
    digest = pp.plan.state_dict_digest({k: v.shape for k, v in other.state_dict().items()})
    assert str(err.value) == untouched_message("model", 6, digest, plan)
    assert other[0].weight.shape == (6, 4)  # refused before any change
    # check_digest=False: the touched tensors fit, so the plan applies
    assert pp.apply_to_state_dict(plan, missing, check_digest=False)["0.weight"].shape == (4, 4)


def test_extra_tensor_search(monkeypatch: pytest.MonkeyPatch) -> None:
    shapes = {"a": [2], "b": [3, 4], "c": []}
    digest = plan_module.state_dict_digest({"a": [2], "c": []})
    assert plan_module.extra_tensor(shapes, digest) == "b"
    assert plan_module.extra_tensor(shapes, digest, candidates=["a", "c"]) is None  # b not a candidate
    assert plan_module.extra_tensor(shapes, plan_module.state_dict_digest(shapes)) is None  # none extra
    monkeypatch.setattr(plan_module, "EXTRA_SEARCH_LIMIT", 2)  # too many tensors to search
    assert plan_module.extra_tensor(shapes, digest) is None


def test_cli_one_line_and_no_torch_for_files(tmp_path: Path) -> None:
    model, plan = model_and_plan()
    plan_file = plan.save(tmp_path / "plan.json")
    sd = dict(model.state_dict())
    save_file({**sd, "extra.weight": torch.zeros(3, 4)}, str(tmp_path / "extra.safetensors"))
    missing = {k: v for k, v in sd.items() if k != "4.bias"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    digest = pp.plan.state_dict_digest({k: v.shape for k, v in missing.items()})
    cases = [
        ("extra.safetensors", f"error: {tmp_path / 'extra.safetensors'}: tensor 'extra.weight' of shape "
         "[3, 4] is not in the model the plan was made for (without it, the names and shapes of the "
         "weights are the ones the plan records)"),
        ("missing.safetensors",
         "error: " + untouched_message(str(tmp_path / "missing.safetensors"), 5, digest, plan)),
    ]
    for name, line in cases:
        result = CliRunner().invoke(cli, ["apply", str(plan_file), str(tmp_path / name), "-o",
                                          str(tmp_path / "out.safetensors")])
        assert result.exit_code == 1 and result.stderr.strip().splitlines() == [line]
        assert not (tmp_path / "out.safetensors").exists()
    # a fresh interpreter: the refusal of a file never imports torch
    code = ("import sys; from pruneplan.cli import main; sys.argv = ['pruneplan', 'validate', "
            f"{str(plan_file)!r}, {str(tmp_path / 'extra.safetensors')!r}]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    print(e.code, 'torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=scaled(120))
    assert proc.stdout == "1 False\n", proc.stderr
    assert "tensor 'extra.weight' of shape [3, 4] is not in the model" in proc.stderr
