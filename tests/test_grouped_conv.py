"""Grouped convolutions: every subset of every offered group's units plans, applies and equals
zeroing (issue 11, item 4), on random models and on torchvision's RegNetY and ResNeXt."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_zoo import _zeroing_hooks, assert_equals_zeroing
from torch import nn

from pruneplan.apply import apply_plan, apply_to_state_dict, load_pruned
from pruneplan.graph.discover import prunable_groups
from pruneplan.planner import build_plan


class Layer(nn.Module):
    """conv (any groups) -> BN -> ReLU, plus the input when ``residual``."""

    def __init__(self, cin: int, cout: int, groups: int, residual: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, groups=groups)
        self.bn = nn.BatchNorm2d(cout)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        return x + y if self.residual else y


class Net(nn.Module):
    def __init__(self, cin: int, layers: list[tuple[int, int, bool]]) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, cin, 1)
        mods = []
        for cout, groups, residual in layers:
            mods.append(Layer(cin, cout, groups, residual))
            cin = cout
        self.body = nn.Sequential(*mods)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))


@st.composite
def grouped_nets(draw: st.DrawFn) -> tuple[int, list[tuple[int, int, bool]]]:
    """A stem width and layers ``(out channels, groups, residual)``: plain, depthwise (with a
    channel multiplier) and grouped convolutions of random widths; residual where widths match."""
    cin = draw(st.sampled_from([4, 6, 8, 12]))
    c0, layers = cin, []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["plain", "depthwise", "grouped", "grouped"]))
        if kind == "plain":
            groups, cout = 1, draw(st.sampled_from([cin, 4, 6, 8]))
        elif kind == "depthwise":
            groups, cout = cin, cin * draw(st.sampled_from([1, 1, 2]))
        else:
            divisors = [d for d in range(2, cin) if cin % d == 0]
            if not divisors:
                groups, cout = 1, cin
            else:
                groups = draw(st.sampled_from(divisors))
                cout = groups * draw(st.integers(1, 3))
        residual = cout == cin and draw(st.booleans())
        layers.append((cout, groups, residual))
        cin = cout
    return c0, layers


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(spec=grouped_nets(), data=st.data())
def test_random_subsets_of_grouped_conv_groups_apply_and_equal_zeroing(spec, data) -> None:
    torch.manual_seed(0)
    model = Net(*spec).eval()
    for m in model.modules():  # non-trivial BN statistics, so zeroing at the wrong place shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 5, 5)
    # a depthwise multiplier summed with a residual couples groups of different sizes: such
    # roots are left out (with the reason), the rest must work
    groups = prunable_groups(model, x, on_unsupported="skip")
    chosen = []
    for g in groups:
        if g.size < 2:
            continue
        k = data.draw(st.integers(0, g.size - 1), label=f"how many of {g.name}")
        removed = sorted(data.draw(st.permutations(range(g.size)), label=g.name)[:k])
        if removed:
            chosen.append((g, removed))
    if not chosen:
        return
    plan = build_plan(model, chosen)
    pruned = apply_plan(copy.deepcopy(model), plan)
    handles = _zeroing_hooks(model, plan)
    try:
        with torch.no_grad():
            masked = model(x)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        out = pruned(x)
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-5)
    # every grouped conv still has equal groups, and the replay on saved weights is the same
    for m in pruned.modules():
        if isinstance(m, nn.Conv2d):
            assert m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0
            assert m.weight.shape[:2] == (m.out_channels, m.in_channels // m.groups)
    fresh = load_pruned(Net(*spec).eval(), plan, apply_to_state_dict(plan, model.state_dict()))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), out, rtol=0, atol=0)


def test_grouped_conv_group_sizes_are_local_widths() -> None:
    # 12 channels into a conv of 3 groups (4 per group) giving 6 (2 per group): the stem's unit
    # is one local position in each of the 3 blocks (4 units of 3 channels), the grouped conv's
    # unit one local output position in each block (2 units of 3 channels)
    model = Net(12, [(6, 3, False)]).eval()
    groups = {g.name: g for g in prunable_groups(model, torch.randn(1, 3, 4, 4))}
    assert {n: g.size for n, g in groups.items()} == {"stem": 4, "body.0.conv": 2}
    stem = next(s for s in groups["stem"].slices if s.tensor == "stem.weight")
    # unit u: channels u, u + 4, u + 8 of the stem
    assert (stem.offset, stem.repeat, stem.tiles, stem.tile_stride) == (0, 1, 3, 4)
    conv = next(s for s in groups["body.0.conv"].slices if s.tensor == "body.0.conv.weight")
    # unit u: output channels u, u + 2, u + 4
    assert (conv.axis, conv.offset, conv.repeat, conv.tiles, conv.tile_stride) == (0, 0, 1, 3, 2)


@pytest.mark.parametrize("name", ["regnet_y_400mf", "resnext50_32x4d"])
def test_torchvision_grouped_conv_models_prune_and_equal_zeroing(name: str) -> None:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(tv.models, name)().eval()
    x = torch.randn(1, 3, 32, 32)
    groups = prunable_groups(model, x)
    # every root but the classifier (which reaches the output) is offered
    assert [lo.name for lo in groups.left_out] == ["fc"]
    rng = np.random.default_rng(0)
    chosen = [(g, sorted(rng.choice(g.size, round(0.3 * g.size), replace=False).tolist()))
              for g in groups if round(0.3 * g.size) > 0]
    plan = build_plan(model, chosen)
    pruned = apply_plan(copy.deepcopy(model), plan)
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in pruned.parameters())
    assert after < 0.8 * before
    assert_equals_zeroing(model, pruned, plan, x, rtol=1e-4, atol=1e-4)
