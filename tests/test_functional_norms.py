"""Functional norms read as the layers (issue 11, item 2), and layer subclasses with their own
``forward`` (timm's norm-act layers) whether traced through or treated as their base class.

Expected values: a per-channel norm (batch/instance norm, group norm with one channel per group)
acts on each channel alone, so pruning equals zeroing the removed channels at the consumer's
input. Layer/RMS norm and group norm with groups of several channels take statistics over the
channels: there the reference is computed by hand on the kept channels (the norm applied to the
kept slice with the kept affine entries), independent of the plan.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pruneplan as pp
from pruneplan.apply import apply_to_state_dict
from pruneplan.graph import _ir
from pruneplan.graph.discover import prunable_groups
from pruneplan.graph.rules import base, module_rule

TRACERS = ["fx", "record"]


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(base, "_MODULE", dict(base._MODULE))
    monkeypatch.setattr(base, "_FUNCTION", dict(base._FUNCTION))
    monkeypatch.setattr(base, "_module_cache", {})
    monkeypatch.setattr(_ir, "_LEAF_TYPES", set(_ir._LEAF_TYPES))


class BNAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d in miniature: F.batch_norm with the layer's tensors, then ReLU."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(x)


class TorchSpellingBN(nn.BatchNorm2d):
    """``torch.batch_norm``: 9 positional arguments, weight and bias first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var,
                                False, 0.1, self.eps, False)


class FreeBN(nn.Module):
    """Not a norm subclass: F.batch_norm on its own tensors (named differently)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(c))
        self.beta = nn.Parameter(torch.zeros(c))
        self.register_buffer("mu", torch.zeros(c))
        self.register_buffer("var", torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(F.batch_norm(x, self.mu, self.var, self.gamma, self.beta))


class LN2d(nn.LayerNorm):
    """timm's LayerNorm2d: channels-last layer norm of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class RMS2d(nn.RMSNorm):
    """The same with ``torch.rms_norm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.rms_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.eps)
        return x.permute(0, 3, 1, 2)


class GN(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class Chain(nn.Module):
    """conv a (8 ch) -> norm -> relu -> conv b -> pool -> fc (a's units leave at b's input)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = norm
        self.b = nn.Conv2d(8, 5, 3)
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.a(x)))
        return self.fc(F.adaptive_avg_pool2d(self.b(h), 1).flatten(1))


def _randomise(m: nn.Module) -> nn.Module:
    torch.manual_seed(3)
    with torch.no_grad():
        for name, t in [*m.named_parameters(), *m.named_buffers()]:
            if name.startswith("norm.") and t.dim() == 1 and t.is_floating_point():
                t.uniform_(0.5, 1.5)
    return m.eval()


REMOVED = [0, 3, 4]
KEEP = [1, 2, 5, 6, 7]


def _prune(m: nn.Module, x: torch.Tensor, tracer: str):
    groups = {g.name: g for g in prunable_groups(m, x, tracer=tracer)}
    plan = pp.plan_pruning(m, {"a": REMOVED}, example_inputs=x)
    pruned = pp.apply_plan(copy.deepcopy(m), plan)
    # replay: the plan applied to the saved state dict and loaded into a fresh copy
    fresh = pp.load_pruned(copy.deepcopy(m), plan, apply_to_state_dict(plan, m.state_dict()))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), pruned(x), rtol=0, atol=0)
    return groups, plan, pruned


def _zeroed_at_b(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    ref = copy.deepcopy(m)

    def zero(_mod, args):
        h = args[0].clone()
        h[:, REMOVED] = 0
        return (h,)

    ref.b.register_forward_pre_hook(zero)
    with torch.no_grad():
        return ref(x)


@pytest.mark.parametrize("tracer", TRACERS)
@pytest.mark.parametrize("norm", [BNAct, TorchSpellingBN, nn.BatchNorm2d])
def test_functional_batch_norm_reads_as_the_layer(norm: type, tracer: str) -> None:
    m, x = _randomise(Chain(norm(8))), torch.randn(2, 3, 7, 7)
    groups, _, pruned = _prune(m, x, tracer)
    g = groups["a"]
    # the same group the built-in BatchNorm2d gives: the norm's four tensors and its width
    assert g.tensors == ["a.bias", "a.weight", "b.weight", "norm.bias", "norm.running_mean",
                         "norm.running_var", "norm.weight"]
    assert ("norm", "num_features", 8) in [(e.module, e.attribute, e.before) for e in g.edits]
    assert pruned.norm.num_features == 5
    torch.testing.assert_close(pruned.norm.running_mean, m.norm.running_mean[KEEP], rtol=0, atol=0)
    with torch.no_grad():
        got = pruned(x)
    torch.testing.assert_close(got, _zeroed_at_b(m, x), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(got, m(x), atol=1e-4)


@pytest.mark.parametrize("tracer", TRACERS)
def test_functional_batch_norm_on_free_tensors(tracer: str) -> None:
    m, x = _randomise(Chain(FreeBN(8))), torch.randn(2, 3, 7, 7)
    groups, _, pruned = _prune(m, x, tracer)
    # no layer attribute to edit; the four tensors it was called with are sliced
    assert groups["a"].tensors == ["a.bias", "a.weight", "b.weight", "norm.beta", "norm.gamma",
                                   "norm.mu", "norm.var"]
    assert tuple(pruned.norm.var.shape) == (5,)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), _zeroed_at_b(m, x), rtol=1e-5, atol=1e-6)


def test_subclass_treated_as_its_base_class(registry) -> None:
    # registered with the base class's rule, BNAct is one node: its ReLU is inside it
    pp.register_module_rule(BNAct, module_rule(nn.BatchNorm2d))
    m, x = _randomise(Chain(BNAct(8))), torch.randn(2, 3, 7, 7)
    graph_ops = [n.target for n in pp.graph.discover.build_graph(m, x).nodes if n.kind == "module"]
    assert graph_ops == ["a", "norm", "b", "fc"]
    _, _, pruned = _prune(m, x, "fx")
    assert pruned.norm.num_features == 5
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), _zeroed_at_b(m, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tracer", TRACERS)
@pytest.mark.parametrize("norm", [LN2d, RMS2d])
def test_functional_layer_and_rms_norm_over_the_channels(norm: type, tracer: str) -> None:
    m, x = _randomise(Chain(norm(8))), torch.randn(2, 3, 7, 7)
    groups, _, pruned = _prune(m, x, tracer)
    leaves = ["weight", "bias"] if norm is LN2d else ["weight"]
    owned = sorted(t for t in groups["a"].tensors if t.startswith("norm."))
    assert owned == sorted(f"norm.{k}" for k in leaves)
    assert pruned.norm.normalized_shape == (5,)
    # reference by hand: the norm over the kept channels with the kept affine entries
    with torch.no_grad():
        h = m.a(x)[:, KEEP].permute(0, 2, 3, 1)
        if norm is LN2d:
            h = F.layer_norm(h, (5,), m.norm.weight[KEEP], m.norm.bias[KEEP], m.norm.eps)
        else:
            h = F.rms_norm(h, (5,), m.norm.weight[KEEP], m.norm.eps)
        h = torch.relu(h.permute(0, 3, 1, 2))
        b = F.conv2d(h, m.b.weight[:, KEEP], m.b.bias)
        want = m.fc(F.adaptive_avg_pool2d(b, 1).flatten(1))
        torch.testing.assert_close(pruned(x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tracer", TRACERS)
@pytest.mark.parametrize("groups_", [8, 1])
def test_functional_group_norm_per_channel_or_whole(groups_: int, tracer: str) -> None:
    m, x = _randomise(Chain(GN(groups_, 8))), torch.randn(2, 3, 7, 7)
    _, _, pruned = _prune(m, x, tracer)
    assert pruned.norm.num_channels == 5
    assert pruned.norm.num_groups == (5 if groups_ == 8 else 1)
    with torch.no_grad():
        got = pruned(x)
        if groups_ == 8:  # one channel per group: per-channel, pruning equals zeroing
            torch.testing.assert_close(got, _zeroed_at_b(m, x), rtol=1e-5, atol=1e-6)
        else:  # one group: statistics over the kept channels (by hand)
            h = F.group_norm(m.a(x)[:, KEEP], 1, m.norm.weight[KEEP], m.norm.bias[KEEP], m.norm.eps)
            b = F.conv2d(torch.relu(h), m.b.weight[:, KEEP], m.b.bias)
            torch.testing.assert_close(got, m.fc(F.adaptive_avg_pool2d(b, 1).flatten(1)),
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tracer", TRACERS)
def test_group_norm_of_several_channels_per_group_from_one_layer_is_left_out(tracer: str) -> None:
    m, x = Chain(GN(2, 8)).eval(), torch.randn(2, 3, 7, 7)
    groups = prunable_groups(m, x, tracer=tracer)
    assert [g.name for g in groups] == ["b"]
    assert [(lo.name, lo.reason) for lo in groups.left_out if lo.name == "a"] == [
        ("a", "operation 'group_norm' in module 'norm' normalises 2 groups of 4 channels, and "
              "units of one layer lie in several groups (removing them would leave the groups "
              "unequal)")]


class TwoBranchGN(nn.Module):
    """cat of two 4-channel convs -> GroupNorm(2 groups of 4): each group is one branch, so the
    branches are coupled position by position and lose the same local positions."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.p = nn.Conv2d(3, 4, 3, padding=1)
        self.q = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = GN(2, 8) if functional else nn.GroupNorm(2, 8)
        self.b = nn.Conv2d(8, 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.cat([self.p(x), self.q(x)], 1))
        return self.b(torch.relu(h)).mean((2, 3))


@pytest.mark.parametrize("functional", [True, False])
def test_group_norm_couples_its_groups(functional: bool) -> None:
    torch.manual_seed(5)
    m, x = TwoBranchGN(functional).eval(), torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        m.norm.weight.uniform_(0.5, 1.5)
        m.norm.bias.uniform_(-0.5, 0.5)
    groups = prunable_groups(m, x)
    assert [(g.name, g.roots) for g in groups] == [("p", ("p", "q"))]  # b reaches the output
    plan = pp.plan_pruning(m, {"p": [1]}, example_inputs=x)
    pruned = pp.apply_plan(copy.deepcopy(m), plan)
    assert (pruned.norm.num_channels, pruned.norm.num_groups) == (6, 2)
    keep = [0, 2, 3, 4, 6, 7]  # local position 1 of each group goes
    with torch.no_grad():
        h = torch.cat([m.p(x), m.q(x)], 1)[:, keep]
        h = F.group_norm(h, 2, m.norm.weight[keep], m.norm.bias[keep], m.norm.eps)
        want = F.conv2d(torch.relu(h), m.b.weight[:, keep], m.b.bias).mean((2, 3))
        torch.testing.assert_close(pruned(x), want, rtol=1e-5, atol=1e-6)


class TimmStyleLinear(nn.Linear):
    """timm's Linear: F.linear with the layer's own weight and bias."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@pytest.mark.parametrize("tracer", TRACERS)
def test_functional_linear_with_a_layers_weights_is_that_layer(tracer: str) -> None:
    torch.manual_seed(6)
    m = nn.Sequential(TimmStyleLinear(4, 6), nn.ReLU(), TimmStyleLinear(6, 3)).eval()
    x = torch.randn(5, 4)
    groups = prunable_groups(m, x, tracer=tracer)
    assert [(g.name, g.tensors) for g in groups] == [("0", ["0.bias", "0.weight", "2.weight"])]
    plan = pp.plan_pruning(m, {"0": [2, 5]}, example_inputs=x)
    pruned = pp.apply_plan(copy.deepcopy(m), plan)
    assert (pruned[0].out_features, pruned[2].in_features) == (4, 4)
    ref = copy.deepcopy(m)
    ref[2].register_forward_pre_hook(lambda _m, a: (a[0].index_fill(1, torch.tensor([2, 5]), 0),))
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), ref(x), rtol=1e-5, atol=1e-6)


def test_functional_linear_with_other_weights_blocks() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.w = nn.Parameter(torch.randn(3, 6))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(torch.relu(self.fc(x)), self.w)

    groups = prunable_groups(Tied(), torch.randn(2, 4))
    assert list(groups) == []
    assert [(lo.name, lo.reason) for lo in groups.left_out] == [
        ("fc", "they reach operation 'linear' in module '<top level>'")]
