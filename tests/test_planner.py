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
