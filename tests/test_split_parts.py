"""Splits into parts of different sizes that the module holds (issue 11, timm FasterNet and
CoaT): each part keeps its own channels' labels and the plan edits each part's size by the
units removed from that part.

Each construct is a minimal module written like the timm code. Where pruning is correct the
pruned model equals the original with the removed units zeroed at the input of their consumers
(`assert_equals_zeroing`, an independent reference: hooks on the original model); the edited
sizes are derived by hand from the removed units; where it is not possible the roots are left
out with the exact reason.
"""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
from test_zoo import assert_equals_zeroing, random_valid_subsets, randomised_batchnorm
from torch import nn

import pruneplan as pp
from pruneplan.errors import PlanMismatchError, PlanningError, PlanValidationError
from pruneplan.graph.spec import LeftOut
from pruneplan.planner import build_plan
from pruneplan.select import keep_parts

OUTPUT = "its units reach the model output (include_output=True allows pruning it)"



# ---- FasterNet's partial convolution: split(x, [self.dim_conv3, self.dim_untouched]) ---------


class PartialConv(nn.Module):
    """timm's ``Partial_conv3`` (``split_cat``): a conv over the first ``dim // n_div``
    channels, the others passed through; the two sizes are int attributes."""

    def __init__(self, dim: int, n_div: int) -> None:
        super().__init__()
        self.dim_conv3 = dim // n_div
        self.dim_untouched = dim - self.dim_conv3
        self.partial_conv3 = nn.Conv2d(self.dim_conv3, self.dim_conv3, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = torch.split(x, [self.dim_conv3, self.dim_untouched], dim=1)
        return torch.cat((self.partial_conv3(x1), x2), 1)


class FasterBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.spatial_mixing = PartialConv(dim, 4)
        self.mlp = nn.Sequential(nn.Conv2d(dim, 2 * dim, 1, bias=False), nn.BatchNorm2d(2 * dim),
                                 nn.ReLU(), nn.Conv2d(2 * dim, dim, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.spatial_mixing(x))


class FasterNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(FasterBlock(8), FasterBlock(8))
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x))).mean((2, 3))



@pytest.mark.parametrize("tracer", ["fx", "record"])
def test_partial_conv_split_edits_each_part_by_its_own_units(tracer: str) -> None:
    torch.manual_seed(0)
    model, x = randomised_batchnorm(FasterNetLike()), torch.randn(2, 3, 6, 6)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    # the residual stream (stem + both blocks' last convs, 8 channels: the first 2 go through
    # each block's partial conv, the other 6 pass), each partial conv's own 2 outputs, each
    # block's hidden 16 channels; nothing left out but the head
    assert [(g.name, g.size, g.roots) for g in groups] == [
        ("stem", 8, ("stem", "blocks.0.mlp.3", "blocks.1.mlp.3")),
        ("blocks.0.spatial_mixing.partial_conv3", 2, ("blocks.0.spatial_mixing.partial_conv3",)),
        ("blocks.0.mlp.0", 16, ("blocks.0.mlp.0",)),
        ("blocks.1.spatial_mixing.partial_conv3", 2, ("blocks.1.spatial_mixing.partial_conv3",)),
        ("blocks.1.mlp.0", 16, ("blocks.1.mlp.0",)),
    ]
    assert groups.left_out == [LeftOut("head", OUTPUT)]
    stem = groups[0]
    edits = {(e.module, e.attribute): (e.before, e.amounts) for e in stem.edits}
    # units 0-1 hold the partial conv's channels, 2-7 the untouched ones
    first, rest = (1, 1, 0, 0, 0, 0, 0, 0), (0, 0, 1, 1, 1, 1, 1, 1)
    for b in ("blocks.0", "blocks.1"):
        assert edits[(f"{b}.spatial_mixing", "dim_conv3")] == (2, first)
        assert edits[(f"{b}.spatial_mixing", "dim_untouched")] == (6, rest)
        assert edits[(f"{b}.spatial_mixing.partial_conv3", "in_channels")] == (2, first)
    # the partial conv's input columns: only units 0 and 1 own one
    weight = next(s for s in stem.slices
                  if (s.tensor, s.axis) == ("blocks.0.spatial_mixing.partial_conv3.weight", 1))
    assert weight.positions == ((0,), (1,), (), (), (), (), (), ())
    for seed in range(4):
        removed = random_valid_subsets(groups, seed)
        plan = build_plan(model, [(g, removed[g.name]) for g in groups])
        pruned = pp.apply_plan(copy.deepcopy(model), plan)
        gone = set(removed["stem"])
        for i, b in enumerate(pruned.blocks):
            own = len(removed[f"blocks.{i}.spatial_mixing.partial_conv3"])
            # hand derivation: each size drops by the removed residual units in its part
            assert b.spatial_mixing.dim_conv3 == 2 - len(gone & {0, 1})
            assert b.spatial_mixing.dim_untouched == 6 - len(gone - {0, 1})
            assert b.spatial_mixing.partial_conv3.weight.shape == (
                2 - own, 2 - len(gone & {0, 1}), 3, 3)
            assert b.mlp[0].in_channels == 8 - own - len(gone - {0, 1})
        assert_equals_zeroing(model, pruned, plan, x)


def test_a_plan_with_units_owning_nothing_on_a_tensor_round_trips_and_replays() -> None:
    torch.manual_seed(0)
    model, x = randomised_batchnorm(FasterNetLike()), torch.randn(2, 3, 6, 6)
    plan = pp.plan_pruning(model, {"stem": [1, 3, 6]}, example_inputs=x)
    text = plan.to_json()
    # the partial conv's input columns belong to units 0 and 1 only: the others list none
    (col,) = [s.map for g in plan.groups for s in g.slices
              if (s.tensor, s.axis) == ("blocks.0.spatial_mixing.partial_conv3.weight", 1)]
    assert col.positions == [[0], [1], [], [], [], [], [], []]
    # pruneplan before format version 3 refused an empty entry, so such a plan says 3 (the
    # lowest version whose readers take it), and one that claims an older version is refused
    assert plan.version == 3
    older = json.loads(text)
    older["version"] = 2
    with pytest.raises(PlanValidationError, match="a unit with no position in a slice's explicit "
                       "positions needs plan version 3, this plan says 2"):
        pp.PrunePlan.from_json(json.dumps(older))
    again = pp.PrunePlan.from_json(text)
    assert again.digest() == plan.digest()
    pruned = pp.apply_plan(copy.deepcopy(model), again)
    replayed = pp.apply_to_state_dict(again, model.state_dict())
    for k, v in pruned.state_dict().items():
        assert torch.equal(replayed[k], v), k
    # a slice whose units own no position at all is still refused
    doc = json.loads(text)
    for g in doc["groups"]:
        for sl in g["slices"]:
            if sl["tensor"] == "blocks.0.spatial_mixing.partial_conv3.weight" and sl["axis"] == 1:
                sl["map"]["positions"] = [[] for _ in range(8)]
    with pytest.raises(PlanValidationError, match="positions lists no position for any unit"):
        pp.PrunePlan.from_json(json.dumps(doc))


def test_removing_every_unit_of_a_part_is_refused_with_the_units_to_keep() -> None:
    torch.manual_seed(0)
    model, x = FasterNetLike().eval(), torch.randn(2, 3, 6, 6)
    # units 0 and 1 are all of blocks.0's partial-conv part: its size would drop to 0
    with pytest.raises(PlanningError, match=re.escape(
            "group 'stem': these indices remove every unit that blocks.0.spatial_mixing."
            "dim_conv3 (now 2) counts, leaving it at 0; keep at least one of the units 0, 1")):
        pp.plan_pruning(model, {"stem": [0, 1, 5]}, example_inputs=x)


def test_selection_passes_over_a_unit_that_would_empty_a_part() -> None:
    torch.manual_seed(0)
    model, x = FasterNetLike().eval(), torch.randn(2, 3, 6, 6)
    groups = pp.prunable_groups(model, x)
    scores = {"stem": [0.1, 0.2, 5.0, 4.0, 3.0, 6.0, 7.0, 8.0]}
    # 30% of 8 units is 2: the two lowest, 0 and 1, are the whole partial-conv part of both
    # blocks, so unit 1 is passed over for the next lowest outside it, unit 4 (score 3)
    assert pp.select_indices(scores, 0.3, groups=[groups[0]]) == {"stem": [0, 4]}
    assert pp.select_indices(scores, 0.3) == {"stem": [0, 1]}  # no groups: no parts known
    table = {"stem": np.array(scores["stem"])}
    assert keep_parts({"stem": [0, 1]}, groups, table) == {"stem": [0, 4]}
    assert keep_parts({"stem": [1, 3]}, groups, table) == {"stem": [1, 3]}  # part keeps unit 0
    # plan_from_metric goes the same way: make units 0 and 1 the weakest of every root of the
    # residual group (stem and both blocks' last convs), 30% of 8 would take both
    with torch.no_grad():
        for conv in (model.stem, model.blocks[0].mlp[3], model.blocks[1].mlp[3]):
            conv.weight[:2] *= 1e-3
    plan = pp.plan_from_metric(model, x, "weight_norm", ratio=0.3)
    (stem,) = [g for g in plan.groups if g.name == "stem"]
    assert len(stem.removed) == 2 and stem.removed[0] in (0, 1) and stem.removed[1] >= 2
    assert plan.edits()[("blocks.0.spatial_mixing", "dim_conv3")] == (2, 1)


class TwoParts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.rest = 2, 6

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(x, [self.first, self.rest], dim=1)


class NormedPart(nn.Module):
    """One part through BatchNorm, flattened into a Linear; the other part through a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.split = TwoParts()
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 4 * 4, 3)
        self.conv = nn.Conv2d(6, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, q = self.split(self.stem(x))
        return self.fc(torch.relu(self.bn(p)).flatten(1)) * self.conv(q).mean((2, 3))


@pytest.mark.parametrize("tracer", ["fx", "record"])
def test_a_part_through_batchnorm_and_flatten_is_sliced_by_its_own_units(tracer: str) -> None:
    torch.manual_seed(0)
    model, x = randomised_batchnorm(NormedPart()), torch.randn(2, 3, 4, 4)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    assert [(g.name, g.size) for g in groups] == [("stem", 8)]
    for removed in ([0, 5], [1, 2, 3], [4, 6, 7], [0, 2, 3, 4, 5, 6]):
        plan = build_plan(model, [(groups[0], removed)])
        pruned = pp.apply_plan(copy.deepcopy(model), plan)
        first = 2 - len(set(removed) & {0, 1})  # units 0-1 are the first part
        assert (pruned.split.first, pruned.split.rest) == (first, 6 - len(set(removed) - {0, 1}))
        # the norm keeps the first part's channels; each is 4 x 4 = 16 features of fc
        assert (pruned.bn.num_features, pruned.bn.running_mean.shape[0]) == (first, first)
        assert pruned.fc.weight.shape == (3, 16 * first)
        assert_equals_zeroing(model, pruned, plan, x)


# ---- CoaT's convolutional relative position encoding: split(v, self.channel_splits) -----------


class ConvRelPos(nn.Module):
    """timm's ``ConvRelPosEnc``: the heads' value channels split into parts of whole heads
    (``channel_splits``, a list or tuple), a depthwise conv of its own window per part, the
    parts concatenated back."""

    def __init__(self, ch: int, head_splits: tuple[int, ...], windows: tuple[int, ...],
                 as_tuple: bool = False) -> None:
        super().__init__()
        self.conv_list = nn.ModuleList(
            nn.Conv2d(h * ch, h * ch, w, padding=w // 2, groups=h * ch)
            for h, w in zip(head_splits, windows, strict=True))
        splits = [h * ch for h in head_splits]
        self.channel_splits = tuple(splits) if as_tuple else splits

    def forward(self, q: torch.Tensor, v: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        B, num_heads, _, C = q.shape
        H, W = size
        v_img = v.transpose(-1, -2).reshape(B, num_heads * C, H, W)
        v_img_list = torch.split(v_img, self.channel_splits, dim=1)
        conv_v_img_list = []
        for i, conv in enumerate(self.conv_list):
            conv_v_img_list.append(conv(v_img_list[i]))
        conv_v_img = torch.cat(conv_v_img_list, dim=1)
        conv_v_img = conv_v_img.reshape(B, num_heads, C, H * W).transpose(-1, -2)
        return q * conv_v_img


class FactorAttn(nn.Module):
    """timm's ``FactorAttnConvRelPosEnc`` (heads tied to the residual width: ``C // num_heads``)."""

    def __init__(self, dim: int, num_heads: int, crpe: ConvRelPos) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.crpe = crpe

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        factor_att = q @ (k.softmax(dim=2).transpose(-1, -2) @ v)
        x = self.scale * factor_att + self.crpe(q, v, size=size)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class CoaTLike(nn.Module):
    """A patch embedding, two attention blocks sharing one ``ConvRelPos`` (as CoaT's serial
    blocks share ``crpe1``), a classifier. 8 heads of 4 channels; parts of 2, 3 and 3 heads."""

    def __init__(self, as_tuple: bool = False) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 32, 2, stride=2)
        self.crpe = ConvRelPos(4, (2, 3, 3), (3, 5, 7), as_tuple)
        self.attn = nn.ModuleList(FactorAttn(32, 8, self.crpe) for _ in range(2))
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        size = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        for blk in self.attn:
            x = x + blk(x, size)
        return self.head(x.mean(1))


@pytest.mark.parametrize("tracer", ["fx", "record"])
def test_split_by_a_list_attribute_edits_each_element(tracer: str) -> None:
    torch.manual_seed(0)
    model, x = CoaTLike().eval(), torch.randn(2, 3, 8, 8)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    # the residual width is tied to the heads (C // num_heads): one group of 8 heads with
    # both attentions' qkv and proj; every head lies in one part of the split
    assert [(g.name, g.size, g.kind, g.roots) for g in groups] == [
        ("embed", 8, "heads", ("embed", "attn.0.qkv", "attn.0.proj", "attn.1.qkv", "attn.1.proj"))]
    assert groups.left_out == [LeftOut("head", OUTPUT)]
    edits = {(e.module, e.attribute): (e.before, e.amounts) for e in groups[0].edits}
    # a head is 4 channels: heads 0-1 in part 0, 2-4 in part 1, 5-7 in part 2
    parts = [(4, 4, 0, 0, 0, 0, 0, 0), (0, 0, 4, 4, 4, 0, 0, 0), (0, 0, 0, 0, 0, 4, 4, 4)]
    for i, (before, amounts) in enumerate(zip((8, 12, 12), parts, strict=True)):
        assert edits[("crpe", f"channel_splits[{i}]")] == (before, amounts)
        for attr in ("in_channels", "out_channels", "groups"):
            assert edits[(f"crpe.conv_list.{i}", attr)] == (before, amounts)
    assert edits[("attn.0", "num_heads")] == (8, None)
    for seed in range(4):
        removed = random_valid_subsets(groups, seed)
        plan = build_plan(model, [(g, removed[g.name]) for g in groups])
        pruned = pp.apply_plan(copy.deepcopy(model), plan)
        heads = removed["embed"]
        # hand derivation: [2*4, 3*4, 3*4] minus 4 channels per removed head of that part
        want = [4 * (2 - sum(h < 2 for h in heads)), 4 * (3 - sum(2 <= h < 5 for h in heads)),
                4 * (3 - sum(h >= 5 for h in heads))]
        assert pruned.crpe.channel_splits == want
        assert [c.weight.shape[0] for c in pruned.crpe.conv_list] == want
        assert [c.groups for c in pruned.crpe.conv_list] == want
        assert pruned.attn[1].num_heads == 8 - len(heads)
        assert_equals_zeroing(model, pruned, plan, x)


def test_an_indexed_edit_of_a_tuple_attribute_applies_as_a_new_tuple() -> None:
    torch.manual_seed(0)
    model, x = CoaTLike(as_tuple=True).eval(), torch.randn(2, 3, 8, 8)
    plan = pp.plan_pruning(model, {"embed": [1, 4]}, example_inputs=x)
    edits = plan.edits()
    # head 1 in part 0, head 4 in part 1, nothing in part 2
    assert [edits[("crpe", f"channel_splits[{i}]")] for i in range(3)] == [(8, 4), (12, 8), (12, 12)]
    pruned = pp.apply_plan(copy.deepcopy(model), plan)
    assert pruned.crpe.channel_splits == (4, 8, 12)
    assert type(pruned.crpe.channel_splits) is tuple
    assert_equals_zeroing(model, pruned, plan, x)
    # before must match: a model whose element differs is refused, naming the element
    other = copy.deepcopy(model)
    other.crpe.channel_splits = (8, 10, 14)
    with pytest.raises(PlanMismatchError,
                       match=r"'crpe\.channel_splits\[1\]' is 10, the plan expects 12"):
        pp.apply_plan(other, plan)
    assert other.crpe.channel_splits == (8, 10, 14)


def test_a_list_attribute_is_replaced_not_mutated() -> None:
    torch.manual_seed(0)
    model, x = CoaTLike().eval(), torch.randn(2, 3, 8, 8)
    plan = pp.plan_pruning(model, {"embed": [0, 7]}, example_inputs=x)
    held = model.crpe.channel_splits
    pp.apply_plan(model, plan)
    assert model.crpe.channel_splits == [4, 12, 8] and type(model.crpe.channel_splits) is list
    assert held == [8, 12, 12]  # the list the model held before is untouched


# ---- what blocks -----------------------------------------------------------------------------


class Splitter(nn.Module):
    """``split(x, self._sizes)``: the sizes under a private name (never read as a width), and
    the public attributes ``holds``."""

    def __init__(self, holds: dict, sizes: list[int]) -> None:
        super().__init__()
        self._sizes = list(sizes)
        for k, v in holds.items():
            setattr(self, k, v)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(x, self._sizes, dim=1)


class SplitNet(nn.Module):
    def __init__(self, holds: dict, sizes: list[int], multiplier: int = 1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        # a depthwise conv with a channel multiplier: unit u sits at positions m*u .. m*u+m-1
        self.dw = nn.Conv2d(4, 4 * multiplier, 3, padding=1, groups=4)
        self.split = Splitter(holds, sizes)
        self.a = nn.Conv2d(sizes[0], 3, 1)
        self.b = nn.Conv2d(sizes[1], 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, q = self.split(self.dw(self.stem(x)))
        return self.a(p) + self.b(q)


WHERE = "operation 'split' in module 'split'"


@pytest.mark.parametrize(("holds", "sizes", "multiplier", "reason"), [
    # a unit with channels in two parts: stem's unit 1 sits at 2 and 3, the parts are 0-2, 3-7
    ({"first": 3, "second": 5}, [3, 5], 2,
     f"{WHERE} splits them into parts of sizes [3, 5] and some of their units have channels in "
     "two parts, so the parts' sizes cannot follow the units"),
    # nothing holds the sizes
    ({}, [1, 3], 1,
     f"{WHERE} splits them into parts of sizes [1, 3] written as numbers and no attribute of its "
     "module holds them (one int attribute per part, or one list or tuple attribute), so the "
     "parts' sizes would not follow pruned channels (register a rule for the module)"),
    # two ints hold the same size: which part each one sizes is unknown
    ({"left": 2, "right": 2}, [2, 2], 1,
     f"{WHERE} splits them into parts of sizes [2, 2] written as numbers and several attributes "
     "of its module hold the same size (left, right), so the parts' sizes would not follow "
     "pruned channels (register a rule for the module)"),
    # one int holds both sizes: the parts could not change apart
    ({"half": 2}, [2, 2], 1,
     f"{WHERE} splits them into parts of sizes [2, 2] written as numbers and the same attribute "
     "of its module holds the sizes of several parts (half), so the parts' sizes would not follow "
     "pruned channels (register a rule for the module)"),
    # a list and two ints hold them
    ({"parts": [1, 3], "one": 1, "three": 3}, [1, 3], 1,
     f"{WHERE} splits them into parts of sizes [1, 3] written as numbers and several attributes "
     "of its module hold them (parts[0], parts[1] or one, three), so the parts' sizes would not "
     "follow pruned channels (register a rule for the module)"),
])
def test_splits_whose_sizes_cannot_follow_leave_the_root_out(holds: dict, sizes: list[int],
                                                            multiplier: int, reason: str) -> None:
    model = SplitNet(holds, sizes, multiplier).eval()
    groups = pp.prunable_groups(model, torch.randn(2, 3, 5, 5))
    assert [g.name for g in groups] == []
    assert groups.left_out == [LeftOut("stem", reason), LeftOut("a", f"{OUTPUT} (coupled with 'b')"),
                               LeftOut("b", f"{OUTPUT} (coupled with 'a')")]


def test_composed_plans_over_split_parts_equal_the_plans_applied_in_turn() -> None:
    # slices with units that own no position, and list-element edits, compose like the others
    for build, x, first, second, root in (
            (lambda: randomised_batchnorm(FasterNetLike()), torch.randn(2, 3, 6, 6), [1, 3], [2, 4], "stem"),
            (lambda: CoaTLike().eval(), torch.randn(2, 3, 8, 8), [1], [2, 5], "embed")):
        torch.manual_seed(0)
        model = build()
        a = pp.plan_pruning(model, {root: first}, example_inputs=x)
        once = pp.apply_plan(copy.deepcopy(model), a)
        b = pp.plan_pruning(once, {root: second}, example_inputs=x)
        twice = pp.apply_plan(copy.deepcopy(once), b)
        both = pp.apply_plan(copy.deepcopy(model), pp.compose([a, b]))
        with torch.no_grad():
            assert torch.equal(both(x), twice(x))
    # CoaT: head 1 (part 0), then heads 2 and 5 of the 7 left (originally 3 and 6: parts 1, 2)
    assert both.crpe.channel_splits == [4, 8, 8]
