"""Whole conv groups as units where local positions tie every channel together (issue 11, item
4; timm's NextViT): a grouped conv (4 channels per group) and a head-reshaped attention
(``head_dim`` 4, ``num_heads = C // 4``) read the same stream. Local position ``j`` of every
conv group and the 4-channel block of every head together tie all 12 stream channels into one
unit; discovery then analyses again with the conv's whole groups as units (one group = one
head)."""

from __future__ import annotations

import copy
import itertools
import logging

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_zoo import assert_equals_zeroing
from torch import nn

from pruneplan.apply import apply_plan
from pruneplan.graph.discover import prunable_groups
from pruneplan.planner import build_plan


class ConvAttn(nn.Module):
    """stem -> x + proj(relu(bn(gconv(x)))) -> tokens -> t + o(attention(t)) -> mean -> head.

    ``gconv``: ``c`` to ``c * mult`` channels in ``c // head_dim`` groups; the attention splits
    q, k, v into ``num_heads = c // head_dim`` heads of ``head_dim`` and merges them back with
    the stream's width ``C`` read at run time (as timm's NextViT ``EfficientAttention``)."""

    def __init__(self, c: int = 12, head_dim: int = 4, mult: int = 1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.gconv = nn.Conv2d(c, c * mult, 3, padding=1, groups=c // head_dim, bias=mult > 1)
        self.bn = nn.BatchNorm2d(c * mult)
        self.proj = nn.Conv2d(c * mult, c, 1)
        self.num_heads, self.head_dim = c // head_dim, head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(c, c) for _ in range(4))
        self.head = nn.Linear(c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.proj(torch.relu(self.bn(self.gconv(x))))
        t = x.flatten(2).transpose(1, 2)
        B, N, C = t.shape
        q = self.q(t).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(t).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v(t).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        t = t + self.o(a)
        return self.head(t.mean(1))


def _model(mult: int = 1) -> ConvAttn:
    torch.manual_seed(0)
    model = ConvAttn(mult=mult).eval()
    model.bn.running_mean.uniform_(-1, 1)  # so zeroing at a wrong place shows
    model.bn.running_var.uniform_(0.5, 2)
    return model


def test_whole_conv_groups_are_the_units_when_positions_tie_everything(caplog) -> None:
    model = _model()
    with caplog.at_level(logging.INFO, logger="pruneplan.graph._analysis"):
        groups = prunable_groups(model, torch.randn(1, 3, 5, 5))
    assert "grouped convs gconv: their local positions tie every channel" in caplog.text
    # one group: the stream (stem, proj and o by the residual sums; q, k, v by the heads that
    # the merge back to C ties to 4-channel blocks of it); the conv is no root of its own
    assert [g.name for g in groups] == ["stem"]
    assert [lo.name for lo in groups.left_out] == ["head"]  # reaches the output
    g = groups[0]
    assert (g.kind, g.size) == ("heads", 3)
    assert g.roots == ("stem", "proj", "q", "k", "v", "o")
    edits = {(e.module, e.attribute): (e.before, e.per_unit) for e in g.edits}
    # a unit is one conv group = 4 input and 4 output channels of gconv, one head
    assert edits[("gconv", "groups")] == (3, 1)
    assert edits[("gconv", "in_channels")] == (12, 4)
    assert edits[("gconv", "out_channels")] == (12, 4)
    assert edits[("", "num_heads")] == (3, 1)
    assert edits[("bn", "num_features")] == (12, 4)
    gw = [(s.axis, s.offset, s.repeat, s.tiles) for s in g.slices if s.tensor == "gconv.weight"]
    # rows 4u .. 4u + 3 (its output block); the input axis (local positions) keeps its width
    assert gw == [(0, 0, 4, 1)]


@pytest.mark.parametrize("mult", [1, 2])
def test_every_subset_of_whole_groups_applies_and_equals_zeroing(mult: int) -> None:
    model = _model(mult)
    x = torch.randn(2, 3, 5, 5)
    (g,) = prunable_groups(model, x)
    assert g.size == 3
    for k in (1, 2):
        for removed in itertools.combinations(range(3), k):
            plan = build_plan(model, [(g, list(removed))])
            pruned = apply_plan(copy.deepcopy(model), plan)
            # hand-derived: each removed unit takes one conv group (4 input, 4 * mult output
            # channels) and one head
            gc = pruned.gconv
            assert (gc.groups, gc.in_channels, gc.out_channels) == (3 - k, 12 - 4 * k,
                                                                    (12 - 4 * k) * mult)
            assert tuple(gc.weight.shape) == ((12 - 4 * k) * mult, 4, 3, 3)
            keep = [u for u in range(3) if u not in removed]
            rows = [r for u in keep for r in range(4 * mult * u, 4 * mult * (u + 1))]
            torch.testing.assert_close(gc.weight, model.gconv.weight[rows], rtol=0, atol=0)
            assert pruned.num_heads == 3 - k and pruned.head_dim == 4
            assert tuple(pruned.q.weight.shape) == (12 - 4 * k, 12 - 4 * k)
            assert_equals_zeroing(model, pruned, plan, x, rtol=1e-4, atol=1e-5)


def test_a_grouped_conv_alone_keeps_local_positions() -> None:
    # without the attention nothing else ties the blocks: the stem's units stay one local
    # position of every conv group (4 units of 3 channels), the conv a root of its own
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 12, 1)
            self.gconv = nn.Conv2d(12, 12, 3, padding=1, groups=3)
            self.head = nn.Conv2d(12, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.gconv(self.stem(x)))

    groups = {g.name: g.size for g in prunable_groups(Plain().eval(), torch.randn(1, 3, 4, 4))}
    assert groups == {"stem": 4, "gconv": 4}


class TiedHeads(nn.Module):
    """The stem's channels feed a grouped conv (``groups`` blocks) and, split into ``heads``
    heads, are the values of an attention (q, k: linear roots with as many heads)."""

    def __init__(self, c: int, groups: int, heads: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.gconv = nn.Conv2d(c, c, 3, padding=1, groups=groups)
        self.num_heads, self.head_dim = heads, c // heads
        self.q, self.k = nn.Linear(c, c), nn.Linear(c, c)
        self.fc, self.fc2 = nn.Linear(c, 3), nn.Linear(c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        y = self.gconv(s)
        t = s.flatten(2).transpose(1, 2)
        B, N, C = t.shape
        q = self.q(t).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(t).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        v = t.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        return self.fc(a.mean(1)) + self.fc2(y.mean((2, 3)))


@pytest.mark.parametrize(("groups", "heads", "after"), [
    # 2 conv blocks of 4, 4 heads of 2: position j of both blocks ties head h to head h + 2,
    # so a unit is 2 heads (stem channels 0, 1, 4, 5 or 2, 3, 6, 7) = 2 local positions of
    # each block: groups stays 2, in_channels 8 -> 4; gconv stays a root (its outputs)
    (2, 4, {"groups": 2, "in": 4, "out": 8, "heads": 2}),
    # 4 conv blocks of 2, 2 heads of 4: local positions tie both heads together; whole conv
    # groups (2 blocks = 1 head) are the units: groups 4 -> 2, in and out channels 8 -> 4
    (4, 2, {"groups": 2, "in": 4, "out": 4, "heads": 1}),
])
def test_units_tied_by_a_grouped_conv_and_gathered_into_heads(groups, heads, after) -> None:
    torch.manual_seed(0)
    model = TiedHeads(8, groups, heads).eval()
    x = torch.randn(2, 3, 5, 5)
    stem = {g.name: g for g in prunable_groups(model, x)}["stem"]
    assert (stem.kind, stem.size, stem.roots) == ("heads", 2, ("stem", "q", "k"))
    for u in (0, 1):
        plan = build_plan(model, [(stem, [u])])
        pruned = apply_plan(copy.deepcopy(model), plan)
        gc = pruned.gconv
        assert {"groups": gc.groups, "in": gc.in_channels, "out": gc.out_channels,
                "heads": pruned.num_heads} == after
        assert pruned.head_dim == 8 // heads
        assert_equals_zeroing(model, pruned, plan, x, rtol=1e-4, atol=1e-5)


def test_whole_groups_that_do_not_help_fall_back_to_local_positions(caplog) -> None:
    # 3 conv blocks of 4, 2 heads of 6: block 1 (channels 4..7) straddles both heads, so whole
    # blocks tie everything too; the conv goes back to local positions and stays a root (4
    # units: one output position of each block), the stream is left out with the reason
    model = TiedHeads(12, 3, 2).eval()
    with caplog.at_level(logging.INFO, logger="pruneplan.graph._analysis"):
        groups = prunable_groups(model, torch.randn(1, 3, 5, 5))
    assert "grouped convs gconv: whole conv groups leave their channels one unit too" in caplog.text
    assert [(g.name, g.size) for g in groups] == [("gconv", 4)]
    why = {lo.name: lo.reason for lo in groups.left_out}
    assert why["stem"].startswith("all of its units are tied together (by gconv in gconv")


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_subsets_with_grouped_convs_and_heads_equal_zeroing(data) -> None:
    # widths, conv groups and heads drawn at random: whatever groups discovery offers (local
    # positions, whole conv groups, several heads per unit), every subset of their units
    # plans, applies and equals zeroing, and every grouped conv keeps equal groups
    c = data.draw(st.sampled_from([8, 12, 16, 24]), label="channels")
    divisors = [d for d in range(2, c) if c % d == 0]
    groups = data.draw(st.sampled_from(divisors), label="conv groups")
    heads = data.draw(st.sampled_from([d for d in divisors if d * d != c]), label="heads")
    torch.manual_seed(0)
    model = TiedHeads(c, groups, heads).eval()
    x = torch.randn(2, 3, 4, 4)
    chosen = []
    for g in prunable_groups(model, x):
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
    gc = pruned.gconv
    assert gc.in_channels % gc.groups == 0 and gc.out_channels % gc.groups == 0
    assert tuple(gc.weight.shape[:2]) == (gc.out_channels, gc.in_channels // gc.groups)
    assert pruned.num_heads * pruned.head_dim == pruned.q.out_features
    assert_equals_zeroing(model, pruned, plan, x, rtol=1e-4, atol=1e-5)
