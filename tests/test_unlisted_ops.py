"""Operations nobody listed (issue 11, item 3): stochastic depth, drop-path, empty-Sequential and
Identity shortcuts, in-place activations, and calls no rule knows, examined on their example.

Reference: every structure here acts on each channel alone between the root and its consumer,
so pruning equals zeroing the removed channels at the consumer's input (DESIGN invariant 1).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth, stochastic_depth

import pruneplan as pp
from pruneplan.apply import apply_to_state_dict
from pruneplan.graph.discover import prunable_groups

TRACERS = ["fx", "record"]


def check_equals_zeroing(m: nn.Module, x: torch.Tensor, group: str, removed: list[int],
                         consumers: list[str]) -> nn.Module:
    """Plan + apply; pruned(x) == original with ``removed`` zeroed at every consumer's input
    (channel axis 1); replay on the state dict gives the same output; returns the pruned model."""
    m.eval()
    plan = pp.plan_pruning(m, {group: removed}, example_inputs=x)
    pruned = pp.apply_plan(copy.deepcopy(m), plan)
    ref = copy.deepcopy(m)

    def zero(_mod, args):
        h = args[0].clone()
        h[:, removed] = 0
        return (h, *args[1:])

    for c in consumers:
        ref.get_submodule(c).register_forward_pre_hook(zero)
    with torch.no_grad():
        got, want, original = pruned(x), ref(x), m(x)
        fresh = pp.load_pruned(copy.deepcopy(m), plan, apply_to_state_dict(plan, m.state_dict()))
        torch.testing.assert_close(fresh.eval()(x), got, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, original, atol=1e-4)
    return pruned


class Residual(nn.Module):
    """stem -> [branch: conv1 -> relu -> conv2 -> drop] + shortcut(stem) -> head."""

    def __init__(self, shortcut: nn.Module, drop: nn.Module | None = None, training_sd: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv1 = nn.Conv2d(6, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.shortcut = shortcut
        self.drop = drop if drop is not None else nn.Identity()
        self.training_sd = training_sd
        self.head = nn.Conv2d(6, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        b = self.conv2(torch.relu(self.conv1(s)))
        if self.training_sd:  # the functional form, in its random (training) mode
            b = stochastic_depth(b, 0.5, "row", True)
        y = self.drop(b) + self.shortcut(s)
        return self.head(y).mean((2, 3))


@pytest.mark.parametrize("tracer", TRACERS)
@pytest.mark.parametrize("shortcut", [nn.Sequential, nn.Identity])
@pytest.mark.parametrize("drop", ["stochastic_depth", "none"])
def test_shortcuts_and_stochastic_depth(shortcut: type, drop: str, tracer: str) -> None:
    torch.manual_seed(0)
    d = StochasticDepth(0.2, "row") if drop == "stochastic_depth" else None
    m, x = Residual(shortcut(), d).eval(), torch.randn(2, 3, 6, 6)
    groups = prunable_groups(m, x, tracer=tracer)
    # the shortcut sum couples the stem with conv2; head reaches the output
    assert [(g.name, g.roots) for g in groups] == [("stem", ("stem", "conv2")), ("conv1", ("conv1",))]
    check_equals_zeroing(m, x, "stem", [0, 4], ["conv1", "head"])


@pytest.mark.parametrize("tracer", TRACERS)
def test_stochastic_depth_in_training_mode_follows(tracer: str) -> None:
    m, x = Residual(nn.Sequential(), training_sd=True).eval(), torch.randn(2, 3, 6, 6)
    groups = prunable_groups(m, x, tracer=tracer)
    assert [(g.name, g.roots) for g in groups] == [("stem", ("stem", "conv2")), ("conv1", ("conv1",))]


@pytest.mark.parametrize("tracer", TRACERS)
def test_timm_drop_path_follows(tracer: str) -> None:
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(1)
    m, x = Residual(nn.Identity(), timm_layers.DropPath(0.3)).eval(), torch.randn(2, 3, 6, 6)
    groups = prunable_groups(m, x, tracer=tracer)
    assert [(g.name, g.roots) for g in groups] == [("stem", ("stem", "conv2")), ("conv1", ("conv1",))]
    check_equals_zeroing(m, x, "stem", [1, 2, 5], ["conv1", "head"])


class InPlace(nn.Module):
    """Every spelling of an in-place activation and an in-place gate, between root and consumer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.g = nn.Conv2d(3, 6, 1)
        self.act = nn.ReLU(inplace=True)
        self.hs = nn.Hardswish(inplace=True)
        self.b = nn.Conv2d(6, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.a(x))
        h = F.relu6(h, inplace=True)
        h = self.hs(h)
        h.add_(1.0).relu_()
        h = F.silu(h, inplace=True)
        h.mul_(torch.sigmoid(self.g(x)))  # gate: couples a with g
        return self.b(h).mean((2, 3))


@pytest.mark.parametrize("tracer", TRACERS)
def test_in_place_activations(tracer: str) -> None:
    torch.manual_seed(2)
    m, x = InPlace().eval(), torch.randn(2, 3, 6, 6)
    groups = prunable_groups(m, x, tracer=tracer)
    assert [(g.name, g.roots) for g in groups] == [("a", ("a", "g"))]
    pruned = check_equals_zeroing(m, x, "a", [0, 3], ["b"])
    assert tuple(pruned.g.weight.shape) == (4, 3, 1, 1)


def expit_twice(x: torch.Tensor) -> torch.Tensor:
    """A function no rule knows (``special_expit``) that acts on each channel alone."""
    return torch.special.expit(x) * 2


torch.fx.wrap("expit_twice")


def channel_cumsum(x: torch.Tensor) -> torch.Tensor:
    """Mixes channels: output channel c depends on input channels 0..c."""
    return torch.cumsum(x, dim=1)


class Unknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 4, 3)
        self.c = nn.Conv2d(3, 5, 3, padding=1)
        self.d = nn.Conv2d(5, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.b(expit_twice(self.a(x)))
        v = self.d(channel_cumsum(self.c(x)))
        if self.training:  # the training trace differs, so the two traces are merged
            v = v * 0.5
        return (u + v).mean((2, 3))


@pytest.mark.parametrize("training_pass", ["auto", "always"])
@pytest.mark.parametrize("tracer", TRACERS)
def test_unknown_calls_examined_on_their_example(tracer: str, training_pass: str) -> None:
    torch.manual_seed(3)
    m, x = Unknown().eval(), torch.randn(2, 3, 6, 6)
    # strict: no error; "always" merges an eval and a training trace (the calls kept in both)
    groups = prunable_groups(m, x, tracer=tracer, training_pass=training_pass)
    assert [g.name for g in groups] == ["a"]
    # fx records the wrapped function, the recording tracer the torch function inside it
    per_channel = "expit_twice" if tracer == "fx" else "special_expit"
    assert groups[0].notes == ()
    left = {lo.name: lo.reason for lo in groups.left_out}
    assert left["c"] == (
        "operation 'cumsum' in module '<top level>', which no rule describes, mixes their "
        "channels (seen by running it again with single channels perturbed); register a rule "
        "for it (pruneplan.register_module_rule / register_function_rule) to prune through it")
    assert per_channel  # the per-channel one was followed: 'a' is a group
    check_equals_zeroing(m, x, "a", [1, 4], ["b"])


class Sorted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, _ = torch.sort(self.a(x), dim=1)
        return self.b(values).mean((2, 3))


def test_unexaminable_call_errors_naming_op_module_and_remedy() -> None:
    m, x = Sorted().eval(), torch.randn(1, 3, 5, 5)
    with pytest.raises(pp.UnsupportedOperationError) as err:
        prunable_groups(m, x)
    assert str(err.value) == (
        "operation 'sort' in module '<top level>' is not an operation pruneplan knows how to "
        "follow (it does not return one tensor) (channels of 'a'): cannot tell which tensors "
        "follow the pruned channels; teach pruneplan with pruneplan.register_module_rule / "
        "register_function_rule, or pass on_unsupported='skip' to leave those roots out")
    groups = prunable_groups(m, x, on_unsupported="skip")
    assert list(groups) == [] and [lo.name for lo in groups.left_out] == ["a", "b"]


def test_unknown_leaf_module_without_state_is_examined() -> None:
    # nn.Softmax2d has no rule: a softmax over the channels mixes them
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.sm, self.b = nn.Conv2d(3, 6, 1), nn.Softmax2d(), nn.Conv2d(6, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.sm(self.a(x))).mean((2, 3))

    groups = prunable_groups(Net().eval(), torch.randn(1, 3, 4, 4))
    assert [(lo.name, lo.reason.split(",")[0]) for lo in groups.left_out] == [
        ("a", "module 'sm' (Softmax2d)"), ("b", "its units reach the model output "
                                                 "(include_output=True allows pruning it)")]
    assert "mixes their channels" in groups.left_out[0].reason
