"""Example inputs the model itself does not run on: one `ExamplePassError` naming the module
where the forward pass failed and the inputs, chained to the model's own exception."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pruneplan as pp
from pruneplan.graph import discover


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.block = Block()
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv(x).mean((2, 3))
        if scale is not None:
            h = h * scale.view(-1, 6)  # fails in Net.forward itself, outside any submodule
        return self.head(self.block(h))


def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def check(err: pytest.ExceptionInfo, where: str, inputs: str, cause_contains: str) -> None:
    cause = err.value.__cause__
    assert isinstance(cause, RuntimeError) and cause_contains in str(cause)
    # the message: where, the inputs' shapes and dtypes, then the model's own error on one line
    assert str(err.value) == (f"the example pass failed {where} on the example inputs given ({inputs}): "
                              f"RuntimeError: {'; '.join(str(cause).split(chr(10)))}")


BAD = torch.randn(2, 4, 8, 8)  # 4 channels; conv expects 3


@pytest.mark.parametrize("call", [
    lambda m: pp.prunable_groups(m, BAD),
    lambda m: pp.plan_pruning(m, {"conv": [1]}, example_inputs=BAD),
    lambda m: pp.plan_from_metric(m, BAD, "lp_norm", 0.5),
    lambda m: pp.plan_from_metric(m, BAD, "lp_norm", target={"macs": 0.3}),  # count runs first
    lambda m: pp.count(m, BAD),
], ids=["prunable_groups", "plan_pruning", "plan_from_metric", "target", "count"])
def test_wrong_channels_name_the_first_conv(call) -> None:
    model = net()
    before = state(model)
    with pytest.raises(pp.ExamplePassError) as err:
        call(model)
    check(err, "in module 'conv' (Conv2d) of Net", "[2, 4, 8, 8] float32",
          "expected input[2, 4, 8, 8] to have 3 channels")
    assert isinstance(err.value, pp.PlanningError) and err.value.module == "conv"
    after = state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not model.training


def test_the_innermost_running_module_is_named() -> None:
    model = net()
    model.conv = nn.Conv2d(3, 7, 3, padding=1)  # 7 features reach block.fc, which takes 6
    with pytest.raises(pp.ExamplePassError) as err:
        pp.prunable_groups(model, torch.randn(2, 3, 8, 8))
    check(err, "in module 'block.fc' (Linear) of Net", "[2, 3, 8, 8] float32", "(2x7 and 6x5)")
    assert err.value.module == "block.fc"


def test_a_failure_outside_any_submodule_names_the_model() -> None:
    x, scale = torch.randn(2, 3, 8, 8), torch.ones(2, 5, dtype=torch.float64)
    with pytest.raises(pp.ExamplePassError) as err:
        pp.prunable_groups(net(), (x, scale))
    check(err, "in Net", "[2, 3, 8, 8] float32, [2, 5] float64", "shape '[-1, 6]' is invalid")
    assert err.value.module is None


def test_a_tracer_failure_on_inputs_the_model_runs_stays_the_tracers(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("the tracer's own failure")

    monkeypatch.setattr(discover, "_trace_call", broken)
    with pytest.raises(RuntimeError) as err:
        pp.prunable_groups(net(), torch.randn(2, 3, 8, 8))
    assert type(err.value) is RuntimeError and str(err.value) == "the tracer's own failure"
