"""Applying a plan to a wrapped model (nn.DataParallel) or to a model it already pruned: a message
naming the cause and what to pass instead, not a generic missing-tensor or shape error (trial
findings F-misc-msg: DataParallel, second apply)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pruneplan as pp


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()


def _plan(model: nn.Module) -> pp.PrunePlan:
    # conv 0 loses units 1 and 6: 0.weight [8, 3, 3, 3] -> [6, 3, 3, 3], 3.weight [4, 8, 3, 3] -> [4, 6, 3, 3]
    return pp.plan_pruning(model, {"0": [1, 6]}, example_inputs=torch.randn(1, 3, 8, 8))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_data_parallel_wrapper_is_refused_with_pass_model_module_then_that_works() -> None:
    model = _net()
    plan = _plan(model)
    wrapped = nn.DataParallel(copy.deepcopy(model))  # on a machine without GPUs it just calls .module
    before = _state(wrapped)
    with pytest.raises(pp.PlanMismatchError) as err:
        pp.apply_plan(wrapped, plan)
    # the first tensor of the plan's fingerprint (sorted names): '0.bias'
    assert str(err.value) == (
        "model: the plan's tensors are all here under the prefix 'module.' (e.g. 'module.0.bias' "
        "for '0.bias'): the model is a wrapper such as nn.DataParallel; apply the plan to "
        "model.module (nn.DataParallel replicates it at every forward, so the wrapper then runs "
        "the pruned model)")
    assert all(torch.equal(before[k], v) for k, v in wrapped.state_dict().items())  # untouched
    pp.apply_plan(wrapped.module, plan)  # the advice works: the wrapper runs the pruned model
    expected = pp.apply_plan(copy.deepcopy(model), plan)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(wrapped(x), expected(x))
    assert list(wrapped.module[0].weight.shape) == [6, 3, 3, 3]


def test_state_dict_of_a_wrapper_and_a_plan_made_on_a_wrapper_are_named() -> None:
    model = _net()
    plan = _plan(model)
    with pytest.raises(pp.PlanMismatchError) as err:
        pp.apply_to_state_dict(plan, nn.DataParallel(model).state_dict())
    assert str(err.value) == (
        "state dict: the plan's tensors are all here under the prefix 'module.' (e.g. "
        "'module.0.bias' for '0.bias'): the weights are from a wrapper such as nn.DataParallel; "
        "strip 'module.' from the names (save model.module.state_dict())")
    # the other way round: planned on the wrapper, applied to the bare model
    on_wrapper = pp.plan_pruning(nn.DataParallel(model), {"module.0": [1, 6]},
                                 example_inputs=torch.randn(1, 3, 8, 8))
    with pytest.raises(pp.PlanMismatchError) as err:
        pp.apply_plan(copy.deepcopy(model), on_wrapper)
    assert str(err.value) == (
        "model: the plan names every tensor with the prefix 'module.' (e.g. 'module.0.bias'), the "
        "model names them without it: the plan was made on a wrapper such as nn.DataParallel; "
        "apply it to the wrapped model, or make the plan on the unwrapped one")
    # and on the wrapper it applies
    assert list(pp.apply_plan(nn.DataParallel(copy.deepcopy(model)), on_wrapper).module[0].weight.shape) == [6, 3, 3, 3]


def test_a_second_apply_of_the_same_plan_says_already_pruned() -> None:
    model = _net()
    plan = _plan(model)
    pp.apply_plan(model, plan)
    before = _state(model)
    with pytest.raises(pp.AlreadyPrunedError) as err:
        pp.apply_plan(model, plan)
    # the first touched tensor whose shape the plan changes: '0.bias' [8] -> [6]
    assert str(err.value) == (
        f"model: already pruned: every tensor this plan ({plan.digest()[:12]}) touches has the "
        "shape the plan leaves (e.g. '0.bias': [6], before pruning [8]); apply the plan to the "
        "unpruned model")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    with pytest.raises(pp.AlreadyPrunedError, match=r"^state dict: already pruned: every tensor"):
        pp.apply_to_state_dict(plan, model.state_dict())
    # a plan that removes nothing leaves the shapes as they were: applying it twice is fine
    empty = pp.plan_pruning(_net(), {}, example_inputs=torch.randn(1, 3, 8, 8))
    twice = pp.apply_plan(pp.apply_plan(_net(), empty), empty)
    assert list(twice[0].weight.shape) == [8, 3, 3, 3]
