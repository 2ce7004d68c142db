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
