"""DESIGN invariant 1: a pruned model computes what the original computes with those units zeroed.

The independent reference is the *unpruned* model with a forward pre-hook that zeroes, at the
input of the layer where the units leave the network (the consumer), the positions those units
occupy there. Zeroing there (after any BatchNorm/ReLU/depthwise pass-through) is what removal
means: a removed channel contributes nothing to the consumer.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pruneplan as pp


def zero_inputs(model: nn.Module, zero_at: dict[str, list[int]]):
    """Register pre-hooks that zero the given positions of dim 1 of each consumer's input."""
    modules = dict(model.named_modules())
    handles = []
    for name, positions in zero_at.items():
        def pre(_m, args, positions=positions):
            x = args[0].clone()
            x[:, positions] = 0
            return (x, *args[1:])

        handles.append(modules[name].register_forward_pre_hook(pre))
    return handles


def check(model: nn.Module, x: torch.Tensor, removed: dict, cascades: dict, zero_at: dict) -> nn.Module:
    """Plan + apply; assert pruned(x) == masked original(x); return the pruned model."""
    torch.manual_seed(0)
    model.eval()
    # give BatchNorm non-trivial statistics so that slicing the wrong entries would show
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    reference = copy.deepcopy(model)
    handles = zero_inputs(reference, zero_at)
    with torch.no_grad():
        expected = reference(x)
    for h in handles:
        h.remove()
    plan = pp.plan_pruning(model, removed, example_inputs=x, cascades=cascades)
    pp.apply_plan(model, plan)
    with torch.no_grad():
        got = model(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # and the result differs from the unmasked original, so the test can fail
    with torch.no_grad():
        assert not torch.allclose(reference(x), got, atol=1e-4)
    return model


def test_mlp_two_groups_on_one_layer() -> None:
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(7, 6)
    # layer "2" loses inputs (group "0") and outputs (group "2") at once
    check(m, x, {"0": [1, 4, 6], "2": [0, 3]}, {"0": ["2"], "2": ["4"]}, {"2": [1, 4, 6], "4": [0, 3]})
    assert tuple(m[2].weight.shape) == (3, 5) and m[2].in_features == 5 and m[2].out_features == 3
    assert tuple(m[4].weight.shape) == (3, 3)


def test_linear_bn1d_linear() -> None:
    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    check(m, torch.randn(4, 5), {"0": [0, 5]}, {"0": ["1", "3"]}, {"3": [0, 5]})
    assert m[1].num_features == 4 and tuple(m[1].running_var.shape) == (4,)


def test_conv_bn_relu_conv() -> None:
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    check(m, torch.randn(2, 3, 6, 6), {"0": [2, 3, 7]}, {"0": ["1", "3"]}, {"3": [2, 3, 7]})
    assert (m[0].out_channels, m[1].num_features, m[3].in_channels) == (5, 5, 5)


def test_conv_relu_maxpool_flatten_linear() -> None:
    torch.manual_seed(4)
    # 6x6 input -> conv (pad 1) 6x6 -> maxpool 3x3: each channel becomes 9 features
    m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                      nn.Linear(36, 3))
    x = torch.randn(3, 2, 6, 6)
    check(m, x, {"0": [1, 2]}, {"0": ["4"]}, {"4": list(range(9, 27))})
    assert m[4].in_features == 18


def test_conv_adaptive_avgpool_flatten_linear() -> None:
    torch.manual_seed(5)
    # adaptive pool to 2x2: channel c owns features 4c .. 4c+3
    m = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(20, 2))
    check(m, torch.randn(2, 3, 7, 7), {"0": [4]}, {"0": ["4"]}, {"4": [16, 17, 18, 19]})


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_separable_block(multiplier: int) -> None:
    torch.manual_seed(6)
    c = 6
    m = nn.Sequential(
        nn.Conv2d(3, c, 1), nn.BatchNorm2d(c), nn.ReLU(),
        nn.Conv2d(c, c * multiplier, 3, padding=1, groups=c), nn.BatchNorm2d(c * multiplier), nn.ReLU(),
        nn.Conv2d(c * multiplier, 4, 1),
    )
    removed = [0, 4]
    # depthwise output channel u*multiplier + r follows input channel u
    at = [u * multiplier + r for u in removed for r in range(multiplier)]
    check(m, torch.randn(2, 3, 5, 5), {"0": removed}, {"0": ["1", "3", "4", "6"]}, {"6": at})
    assert (m[3].in_channels, m[3].out_channels, m[3].groups) == (4, 4 * multiplier, 4)
    assert tuple(m[3].weight.shape) == (4 * multiplier, 1, 3, 3)


def test_conv_transpose_root_and_consumer() -> None:
    torch.manual_seed(7)
    # ConvTranspose weights are (in, out/groups, k, k): the root's units are on axis 1,
    # a consumer's inputs on axis 0
    m = nn.Sequential(nn.ConvTranspose2d(3, 6, 2, stride=2), nn.BatchNorm2d(6), nn.ReLU(),
                      nn.ConvTranspose2d(6, 2, 3))
    check(m, torch.randn(2, 3, 4, 4), {"0": [1, 5]}, {"0": ["1", "3"]}, {"3": [1, 5]})
    assert tuple(m[0].weight.shape) == (3, 4, 2, 2) and tuple(m[3].weight.shape) == (4, 2, 3, 3)
    assert (m[0].out_channels, m[3].in_channels) == (4, 4)


def test_conv_into_conv_transpose() -> None:
    torch.manual_seed(8)
    m = nn.Sequential(nn.Conv2d(2, 5, 3), nn.ReLU(), nn.ConvTranspose2d(5, 3, 2, stride=2))
    check(m, torch.randn(2, 2, 5, 5), {"0": [0, 3]}, {"0": ["2"]}, {"2": [0, 3]})
    assert tuple(m[2].weight.shape) == (3, 3, 2, 2)


def test_dropout_in_the_chain() -> None:
    torch.manual_seed(9)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
    check(m, torch.randn(5, 4), {"0": [0, 1]}, {"0": ["2", "3"]}, {"3": [0, 1]})
    # seed rule: p * (1 - k / N) = 0.5 * (1 - 2 / 8)
    assert m[2].p == pytest.approx(0.375)


def test_dropout2d_after_conv() -> None:
    torch.manual_seed(10)
    m = nn.Sequential(nn.Conv2d(1, 5, 3), nn.ReLU(), nn.Dropout2d(0.2), nn.Conv2d(5, 2, 1))
    check(m, torch.randn(2, 1, 5, 5), {"0": [2]}, {"0": ["2", "3"]}, {"3": [2]})
    assert m[2].p == pytest.approx(0.2 * (1 - 1 / 5))


def test_probe_pass_leaves_batchnorm_statistics_and_flags_alone() -> None:
    # planning a Conv->BN->Flatten->Linear chain needs a probe pass; in train mode a forward
    # would update running_mean/var and num_batches_tracked; the probe must not
    torch.manual_seed(11)
    m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 9, 2))
    m.train()
    m[2].eval()  # a mixed set of flags must come back as it was
    before = {k: v.clone() for k, v in m.state_dict().items()}
    pp.plan_pruning(m, {"0": [1]}, example_inputs=torch.randn(3, 2, 5, 5), cascades={"0": ["1", "4"]})
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert int(after["1.num_batches_tracked"]) == 0
    assert [mod.training for mod in m.modules()] == [True, True, True, False, True, True]


def test_explicit_cascade_with_a_norm_of_the_wrong_width_is_refused() -> None:
    # a BatchNorm listed in the cascade must normalise the channels that reach it
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6))
    with pytest.raises(pp.PlanningError, match=r"module '3' \(BatchNorm2d\) normalises 6 channels, but 4 reach it"):
        pp.plan_pruning(m, {"0": [1]}, cascades={"0": ["1", "2", "3"]})


class SharedDropout(nn.Module):
    """One Dropout module applied at two places, to the units of two different groups (as
    RoBERTa's classification head applies ``dropout`` to the hidden size and to its dense
    layer's output)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 6), nn.Linear(6, 2)
        self.drop = nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.drop(torch.relu(self.b(self.drop(torch.relu(self.a(x)))))))


def test_a_dropout_shared_by_two_groups_keeps_its_rate(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(12)
    m, x = SharedDropout().eval(), torch.randn(5, 4)
    with caplog.at_level("INFO", logger="pruneplan.graph.discover"):
        groups = pp.prunable_groups(m, x)
    assert [(g.name, g.dropouts) for g in groups] == [("a", ()), ("b", ())]
    assert ("dropout 'drop' is reached by the units of 2 groups ('a', 'b'); its rate stays as "
            "it is") in caplog.messages
    # one rate cannot follow both counts: summing the seed rule's changes, 0.2 * (1 - 6/8) and
    # 0.2 * (1 - 4/6), would give 0.2 - 0.15 - 0.0667 < 0 (a plan the validator refuses)
    plan = pp.plan_pruning(m, {"a": [0, 1, 2, 3, 4, 5], "b": [0, 1, 2, 3]}, example_inputs=x)
    assert plan.dropout_changes() == {}
    zeroed = zero_inputs(m, {"b": [0, 1, 2, 3, 4, 5], "c": [0, 1, 2, 3]})
    with torch.no_grad():
        want = m(x)
    for h in zeroed:
        h.remove()
    pruned = pp.apply_plan(copy.deepcopy(m), plan)
    assert pruned.drop.p == 0.2
    assert tuple(pruned.b.weight.shape) == (2, 2) and tuple(pruned.c.weight.shape) == (2, 2)
    torch.testing.assert_close(pruned(x), want)
