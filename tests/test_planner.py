"""plan_pruning's own options: discovery of output roots, the couple policy, index forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import pruneplan as pp


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def test_output_root_needs_include_output() -> None:
    m, x = mlp(), torch.randn(2, 4)
    with pytest.raises(pp.PlanningError, match=r"^'2' is not prunable: its units reach the model output "
                       r"\(include_output=True allows pruning it\)$"):
        pp.plan_pruning(m, {"2": [0]}, example_inputs=x)
    plan = pp.plan_pruning(m, {"2": [0]}, example_inputs=x, include_output=True)
    pp.apply_plan(m, plan)
    assert m(x).shape == (2, 2)  # the output lost one unit, as asked


def test_couple_policy_is_checked() -> None:
    with pytest.raises(pp.PlanningError, match="couple must be 'error' or 'expand', got 'loose'"):
        pp.plan_pruning(mlp(), {"0": [1]}, example_inputs=torch.randn(2, 4), couple="loose")


@pytest.mark.parametrize("indices", [[4, 1], np.array([1, 4]), torch.tensor([4, 1])], ids=["list", "numpy", "tensor"])
def test_index_forms_give_the_same_plan(indices) -> None:
    # lists, numpy arrays and tensors, sorted or not, are normalised to sorted ints
    plan = pp.plan_pruning(mlp(), {"0": indices}, cascades={"0": ["2"]})
    assert plan.groups[0].removed == [1, 4]
    assert plan.pruned_shapes()["2.weight"] == [3, 4]


def quick_start() -> tuple[nn.Sequential, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    ).eval()
    return model, torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize("cascades, message", [
    # a cascade key that names no module: before, it was ignored and only 0.weight/0.bias sliced
    ({"9": ["1", "5"]}, r"^cascades key '9': no module named '9' in the model; "
                        r"valid names: 0, 1, 2, 3, 4, 5$"),
    ({"0": ["1", "x5"]}, r"^cascades\['0'\]: no module named 'x5' in the model; did you mean '5'\? "
                         r"valid names: 0, 1, 2, 3, 4, 5$"),
    # the BatchNorm right after the conv reads its 16 channels (running_mean has 16 elements)
    ({"0": ["5"]}, r"^cascade of '0' leaves out module '1' \(BatchNorm2d\), which the probe pass "
                   r"sees reading the channels of '0'; the cascade lists '5': add '1' in the order "
                   r"the model runs it$"),
    ({"0": ["2", "5"]}, r"leaves out module '1' \(BatchNorm2d\).* lists '2', '5': add '1'"),
    # the Linear reads 16*4*4 features flattened from the conv's channels
    ({"0": ["1"]}, r"leaves out module '5' \(Linear\).* lists '1': add '5'"),
    ({"5": []}, r"^cascades key '5' is not a root in removed \(roots: 0\)"),
])
def test_cascades_naming_wrong_modules_are_refused(cascades, message) -> None:
    model, x = quick_start()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(pp.PlanningError, match=message):
        pp.plan_pruning(model, {"0": [1, 5, 9]}, example_inputs=x, cascades=cascades)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_complete_cascade_still_plans_and_runs() -> None:
    model, x = quick_start()
    plan = pp.plan_pruning(model, {"0": [1, 5, 9]}, example_inputs=x, cascades={"0": ["1", "5"]})
    pp.apply_plan(model, plan)
    # 16 - 3 channels; the Linear keeps 13 blocks of 4*4 features
    assert model[1].running_mean.shape == (13,) and model[5].in_features == 13 * 16
    assert model(x).shape == (2, 10)
