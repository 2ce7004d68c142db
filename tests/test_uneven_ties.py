"""Concatenated branches coupled to a full-width tensor (issue 11, "tied unevenly"): timm's
inception_resnet_v2 (the stem's four branches concatenated, then residual blocks adding a 1x1
up-projection), cspnext (main and short branches concatenated, then gated by channel
attention), nasnet.

In ``y = cat([c1(x), c2(x)], 1) + c3(x)`` a unit of the coupled group is one channel of ``c3``
and one channel of *either* ``c1`` or ``c2``: ``c1.out_channels`` drops only by the removed
units in its part (`EditSpec.amounts`), and its rows are explicit per-unit positions, empty for
the units of ``c2``. Each construct is a minimal module written like the timm code; pruning
must equal the original with the removed units zeroed at the input of their consumers
(`assert_equals_zeroing`, an independent reference: hooks on the original model), and the
edited sizes are derived by hand from the removed units.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_zoo import assert_equals_zeroing, random_valid_subsets, randomised_batchnorm
from torch import nn

import pruneplan as pp
from pruneplan.compose import compose
from pruneplan.errors import PlanningError
from pruneplan.graph.spec import LeftOut
from pruneplan.planner import build_plan
from pruneplan.select import aggregate_scores

OUTPUT = "its units reach the model output (include_output=True allows pruning it)"




# ---- cat of two convs + a conv ---------------------------------------------------------------


class CatAdd(nn.Module):
    """``bn(cat([c1(z), c2(z)])) + c3(z)``: c3's 5 channels pair with c1's 3, then c2's 2."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 1)
        self.c1 = nn.Conv2d(6, 3, 3, padding=1)
        self.c2 = nn.Conv2d(6, 2, 1)
        self.bn = nn.BatchNorm2d(5)
        self.c3 = nn.Conv2d(6, 5, 1)
        self.head = nn.Conv2d(5, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.relu(self.stem(x))
        y = self.bn(torch.cat([self.c1(z), self.c2(z)], 1)) + self.c3(z)
        return self.head(torch.relu(y)).mean((2, 3))


@pytest.mark.parametrize("tracer", ["fx", "record"])
def test_cat_of_two_convs_plus_a_conv_prunes_each_branch_by_its_own_units(tracer: str) -> None:
    torch.manual_seed(0)
    model, x = randomised_batchnorm(CatAdd()), torch.randn(2, 3, 5, 5)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    # the group is named after c3, the root holding one channel of every unit: unit u is its
    # channel u, paired with c1's channel u (u < 3) or c2's channel u - 3
    assert [(g.name, g.size, g.roots) for g in groups] == [
        ("stem", 6, ("stem",)), ("c3", 5, ("c3", "c1", "c2"))]
    assert groups.left_out == [LeftOut("head", OUTPUT)]
    g = groups[1]
    edits = {(e.module, e.attribute): (e.before, e.amounts) for e in g.edits}
    assert edits == {("c1", "out_channels"): (3, (1, 1, 1, 0, 0)),
                     ("c2", "out_channels"): (2, (0, 0, 0, 1, 1)),
                     ("c3", "out_channels"): (5, None), ("bn", "num_features"): (5, None),
                     ("head", "in_channels"): (5, None)}
    rows = {s.tensor: s.positions for s in g.slices if s.axis == 0}
    assert rows["c1.weight"] == ((0,), (1,), (2,), (), ())
    assert rows["c2.bias"] == ((), (), (), (0,), (1,))
    assert rows["c3.weight"] is None and rows["bn.running_var"] is None  # one row per unit
    for seed in range(6):
        removed = random_valid_subsets(groups, seed)
        plan = build_plan(model, [(gr, removed[gr.name]) for gr in groups])
        pruned = pp.apply_plan(copy.deepcopy(model), plan)
        gone = set(removed["c3"])
        in1, in2 = len(gone & {0, 1, 2}), len(gone & {3, 4})  # hand derivation
        assert pruned.c1.weight.shape == (3 - in1, 6 - len(removed["stem"]), 3, 3)
        assert (pruned.c1.out_channels, pruned.c2.out_channels) == (3 - in1, 2 - in2)
        assert pruned.c2.bias.shape == (2 - in2,)
        assert (pruned.c3.out_channels, pruned.bn.num_features) == (5 - len(gone), 5 - len(gone))
        assert pruned.head.weight.shape == (4, 5 - len(gone), 1, 1)
        assert_equals_zeroing(model, pruned, plan, x)


def test_removing_every_unit_of_a_branch_is_refused_with_the_units_to_keep() -> None:
    torch.manual_seed(0)
    model, x = CatAdd().eval(), torch.randn(2, 3, 5, 5)
    # units 3 and 4 are all of c2's channels
    with pytest.raises(PlanningError, match=re.escape(
            "group 'c3': these indices remove every unit that c2.out_channels (now 2) counts, "
            "leaving it at 0; keep at least one of the units 3, 4")):
        pp.plan_pruning(model, {"c3": [1, 3, 4]}, example_inputs=x)


# ---- cat * gate: cspnext's CSP layer with channel attention ----------------------------------


class CSPGated(nn.Module):
    """timm's ``CSPNeXt`` stage layer: ``cat([blocks(main_conv(x)), short_conv(x)])`` gated by
    ``sigmoid(fc(pool(.)))``, then ``final_conv``; the main branch is a residual block whose
    last conv (``block``) is coupled with ``main``. The gate's 6 channels pair with main's 4
    (and the block's), then short's 2."""

    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Conv2d(3, 4, 1)
        self.short = nn.Conv2d(3, 2, 1)
        self.block = nn.Sequential(nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 1))
        self.fc = nn.Conv2d(6, 6, 1)
        self.final = nn.Conv2d(6, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.main(x)
        m = m + self.block(m)
        h = torch.cat([m, self.short(x)], 1)
        h = h * torch.sigmoid(self.fc(h.mean((2, 3), keepdim=True)))
        return self.final(h).mean((2, 3))


@pytest.mark.parametrize("tracer", ["fx", "record"])
def test_concatenated_branches_times_a_gate_prune_each_branch_by_its_own_units(tracer: str) -> None:
    torch.manual_seed(0)
    model, x = CSPGated().eval(), torch.randn(2, 3, 5, 5)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    assert [(g.name, g.size, g.roots) for g in groups] == [
        ("fc", 6, ("fc", "main", "block.2", "short")), ("block.0", 5, ("block.0",))]
    assert groups.left_out == [LeftOut("final", OUTPUT)]
    edits = {(e.module, e.attribute): (e.before, e.amounts) for e in groups[0].edits}
    main, short = (1, 1, 1, 1, 0, 0), (0, 0, 0, 0, 1, 1)
    assert edits == {("main", "out_channels"): (4, main), ("block.0", "in_channels"): (4, main),
                     ("block.2", "out_channels"): (4, main),
                     ("short", "out_channels"): (2, short),
                     ("fc", "in_channels"): (6, None), ("fc", "out_channels"): (6, None),
                     ("final", "in_channels"): (6, None)}
    for seed in range(6):
        removed = random_valid_subsets(groups, seed)
        plan = build_plan(model, [(gr, removed[gr.name]) for gr in groups])
        pruned = pp.apply_plan(copy.deepcopy(model), plan)
        gone = set(removed["fc"])
        in_main, in_short = len(gone & {0, 1, 2, 3}), len(gone & {4, 5})
        assert pruned.main.weight.shape == (4 - in_main, 3, 1, 1)
        assert pruned.block[0].weight.shape == (5 - len(removed["block.0"]), 4 - in_main, 3, 3)
        assert pruned.block[2].weight.shape == (4 - in_main, 5 - len(removed["block.0"]), 1, 1)
        assert pruned.short.weight.shape == (2 - in_short, 3, 1, 1)
        assert pruned.fc.weight.shape == (6 - len(gone), 6 - len(gone), 1, 1)
        assert_equals_zeroing(model, pruned, plan, x)


# ---- inception-resnet: a three-branch stem concatenated, residual 1x1 up-projections ----------


class Branches(nn.Module):
    """Three branches concatenated (4 + 3 + 2 channels), like timm's ``Mixed_5b``."""

    def __init__(self, cin: int, widths: tuple[int, ...], k3: bool = True) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin, w, 3 if k3 and i else 1, padding=1 if k3 and i else 0,
                                    bias=False), nn.BatchNorm2d(w), nn.ReLU())
            for i, w in enumerate(widths))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(x) for b in self.branches], 1)


class Block35(nn.Module):
    """timm's ``Block35``: branches concatenated into a 1x1 up-projection to the full width,
    scaled and added to the input."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mix = Branches(dim, (2, 3))
        self.up = nn.Conv2d(5, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + 0.17 * self.up(self.mix(x)))


class InceptionResNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.mixed = Branches(6, (4, 3, 2))
        self.blocks = nn.Sequential(Block35(9), Block35(9))
        self.head = nn.Linear(9, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.mixed(torch.relu(self.stem(x)))).mean((2, 3)))


@pytest.mark.parametrize("tracer", ["fx", "record"])
def test_inception_resnet_stream_prunes_each_stem_branch_by_its_own_units(tracer: str) -> None:
    torch.manual_seed(0)
    model, x = randomised_batchnorm(InceptionResNetLike()), torch.randn(2, 3, 5, 5)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    stream = ("blocks.0.up", "mixed.branches.0.0", "mixed.branches.1.0", "mixed.branches.2.0",
              "blocks.1.up")
    assert [(g.name, g.size) for g in groups] == [
        ("stem", 6), ("blocks.0.up", 9), ("blocks.0.mix.branches.0.0", 2),
        ("blocks.0.mix.branches.1.0", 3), ("blocks.1.mix.branches.0.0", 2),
        ("blocks.1.mix.branches.1.0", 3)]
    assert groups[1].roots == stream
    assert groups.left_out == [LeftOut("head", OUTPUT)]
    edits = {(e.module, e.attribute): (e.before, e.amounts) for e in groups[1].edits}
    b0, b1, b2 = (1,) * 4 + (0,) * 5, (0,) * 4 + (1,) * 3 + (0,) * 2, (0,) * 7 + (1,) * 2
    assert edits[("mixed.branches.0.0", "out_channels")] == (4, b0)
    assert edits[("mixed.branches.0.1", "num_features")] == (4, b0)
    assert edits[("mixed.branches.1.0", "out_channels")] == (3, b1)
    assert edits[("mixed.branches.2.1", "num_features")] == (2, b2)
    assert edits[("blocks.1.up", "out_channels")] == (9, None)
    assert edits[("blocks.0.mix.branches.1.0", "in_channels")] == (9, None)
    (bn_rows,) = [s.positions for s in groups[1].slices
                  if (s.tensor, s.axis) == ("mixed.branches.2.1.running_mean", 0)]
    assert bn_rows == ((),) * 7 + ((0,), (1,))
    for seed in range(6):
        removed = random_valid_subsets(groups, seed)
        plan = build_plan(model, [(gr, removed[gr.name]) for gr in groups])
        pruned = pp.apply_plan(copy.deepcopy(model), plan)
        gone = set(removed["blocks.0.up"])
        widths = [w - len(gone & set(range(lo, lo + w))) for lo, w in ((0, 4), (4, 3), (7, 2))]
        for branch, w in zip(pruned.mixed.branches, widths, strict=True):
            assert branch[0].out_channels == w and branch[1].running_mean.shape == (w,)
        for i, blk in enumerate(pruned.blocks):
            assert blk.up.weight.shape == (9 - len(gone), 5 - len(removed[f"blocks.{i}.mix.branches.0.0"])
                                           - len(removed[f"blocks.{i}.mix.branches.1.0"]), 1, 1)
        assert pruned.head.in_features == 9 - len(gone)
        assert_equals_zeroing(model, pruned, plan, x)


# ---- scores, selection, planning by a branch's own indices, compose, replay --------------------


def test_scores_are_aggregated_per_unit_over_the_members_holding_it(caplog) -> None:
    torch.manual_seed(0)
    model, x = CatAdd().eval(), torch.randn(2, 3, 5, 5)
    groups = pp.prunable_groups(model, x)
    g = groups[1]
    assert g.root_units == (("c1", ((0,), (1,), (2,), (), ())), ("c2", ((), (), (), (0,), (1,))))
    scores = {"c3": [1.0, 2.0, 3.0, 4.0, 5.0], "c1": [3.0, 2.0, 1.0], "c2": [0.0, 1.0]}
    # unit u: the mean of c3's channel u and the branch channel it holds (c1's u or c2's u - 3)
    table = aggregate_scores(scores, [g])
    np.testing.assert_array_equal(table["c3"], [2.0, 2.0, 2.0, 2.0, 3.0])
    np.testing.assert_array_equal(aggregate_scores(scores, [g], "max")["c3"], [3, 2, 3, 4, 5])
    # a score count that is not the branch's own unit count is refused, naming both
    with pytest.raises(PlanningError, match=re.escape("group 'c3': 'c2' has 5 scores for its 2 "
                                                      "units")):
        aggregate_scores({**scores, "c2": [0.0] * 5}, [g])
    # units 3 and 4 are held only by c3 and c2: without their scores the group has none
    with caplog.at_level("WARNING", logger="pruneplan.select"):
        assert aggregate_scores({"c1": [3.0, 2.0, 1.0]}, [g]) == {}
    assert "group 'c3' keeps its units: no member with scores holds its unit 3" in caplog.text
    # aggregated: units 0-2 score 2 (c3 alone), unit 3 (2 + 0) / 2 = 1, unit 4 (3 + 0) / 2 =
    # 1.5. 40% of 5 is 2: the two lowest, 3 and 4, are all of c2, so unit 4 is passed over
    # for the next lowest, unit 0 (score 2; ties go to the lower index)
    low = {"c3": [2.0, 2.0, 2.0, 2.0, 3.0], "c2": [0.0, 0.0]}
    assert pp.select_indices(low, 0.4, groups=[g]) == {"c3": [0, 3]}


def test_plan_from_metric_scores_each_branch_on_its_own_channels() -> None:
    torch.manual_seed(0)
    model, x = CatAdd().eval(), torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        # c3's rows 0-2 are equal (c3 alone would next take unit 0, the lower index); c1's
        # row 2 is the weakest of c1's; units 4 and 3 are the weakest on c3 and c2
        model.c3.weight[1:3] = model.c3.weight[0]
        for w, scale in ((model.c3.weight, (1, 1, 1, 1e-3, 1e-4)),
                         (model.c1.weight, (10, 1, 1e-3)), (model.c2.weight, (1e-3, 1e-4))):
            w *= torch.tensor(scale).view(-1, 1, 1, 1)
    plan = pp.plan_from_metric(model, x, "weight_norm", ratio=0.4)
    (g,) = [gr for gr in plan.groups if gr.name == "c3"]
    # the two weakest units are 4 and 3, all of c2: unit 3 is passed over for unit 2, the
    # next weakest by c1's score (c3 alone would have taken unit 0)
    assert g.removed == [2, 4]
    assert plan.edits()[("c2", "out_channels")] == (2, 1)
    assert plan.edits()[("c1", "out_channels")] == (3, 2)


def test_a_branch_named_with_expand_removes_the_units_holding_its_channels() -> None:
    torch.manual_seed(0)
    model, x = CatAdd().eval(), torch.randn(2, 3, 5, 5)
    # c2's channel 1 is unit 4 of group c3; c1's channels 0 and 2 are units 0 and 2
    by_c2 = pp.plan_pruning(model, {"c2": [1]}, example_inputs=x, couple="expand")
    assert [(g.name, g.removed) for g in by_c2.groups] == [("c3", [4])]
    by_c1 = pp.plan_pruning(model, {"c1": [0, 2]}, example_inputs=x, couple="expand")
    assert [(g.name, g.removed) for g in by_c1.groups] == [("c3", [0, 2])]
    with pytest.raises(PlanningError, match=re.escape("module 'c2': index 2 is out of range "
                                                      "for 2 units")):
        pp.plan_pruning(model, {"c2": [2]}, example_inputs=x, couple="expand")
    with pytest.raises(pp.CoupledGroupError, match="give the indices for 'c3'"):
        pp.plan_pruning(model, {"c2": [1]}, example_inputs=x)


def test_uneven_plans_replay_on_a_state_dict_and_files_and_compose(tmp_path) -> None:
    torch.manual_seed(0)
    model, x = randomised_batchnorm(InceptionResNetLike()), torch.randn(2, 3, 5, 5)
    a = pp.plan_pruning(model, {"blocks.0.up": [1, 4, 8], "stem": [2]}, example_inputs=x)
    assert a.version == 3  # explicit positions with units owning none
    once = pp.apply_plan(copy.deepcopy(model), a)
    replayed = pp.apply_to_state_dict(a, model.state_dict())
    assert replayed.keys() == once.state_dict().keys()
    for k, v in once.state_dict().items():
        assert torch.equal(replayed[k], v), k
    # the file applier, then a fresh model loaded into the pruned shape
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.st"))
    pp.apply_to_safetensors(a, tmp_path / "w.st", tmp_path / "p.st")
    on_disk = load_file(str(tmp_path / "p.st"))
    for k, v in once.state_dict().items():
        assert torch.equal(on_disk[k], v), k
    loaded = pp.load_pruned(InceptionResNetLike().eval(), a, tmp_path / "p.st")
    with torch.no_grad():
        assert torch.equal(loaded(x), once(x))
    # 6 units left: branch 0 holds 0, 2, 3 (originally 0, 2, 3), branch 1 holds 5, 6
    # (originally 5, 6), branch 2 holds 7: remove one of each branch
    assert [b[0].out_channels for b in once.mixed.branches] == [3, 2, 1]
    b = pp.plan_pruning(once, {"blocks.0.up": [0, 3]}, example_inputs=x)
    twice = pp.apply_plan(copy.deepcopy(once), b)
    both = pp.apply_plan(copy.deepcopy(model), compose([a, b]))
    assert [br[0].out_channels for br in both.mixed.branches] == [2, 1, 1]
    with torch.no_grad():
        assert torch.equal(both(x), twice(x))
    sd = pp.apply_to_state_dict(compose([a, b]), model.state_dict())
    for k, v in twice.state_dict().items():
        assert torch.equal(sd[k], v), k


class TwoPerUnit(nn.Module):
    """``cat([c1 (4), c2 (2)]) + cat([c3, c3])``: c3's unit 0 meets c1's channels 0 and 3,
    its units 1 and 2 meet c1's 1, 2 and c2's 0, 1."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 2, 1), nn.Conv2d(3, 3, 1)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.c3(x)
        y = torch.cat([self.c1(x), self.c2(x)], 1) + torch.cat([t, t], 1)
        return self.head(torch.relu(y)).mean((2, 3))


@pytest.mark.parametrize("tracer", ["fx", "record"])
def test_a_unit_may_hold_several_channels_of_a_branch(tracer: str) -> None:
    torch.manual_seed(0)
    model, x = TwoPerUnit().eval(), torch.randn(2, 3, 4, 4)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    (g,) = groups
    assert (g.name, g.size, g.roots) == ("c3", 3, ("c3", "c1", "c2"))
    assert g.root_units == (("c1", ((0, 3), (1,), (2,))), ("c2", ((), (0,), (1,))))
    edits = {(e.module, e.attribute): (e.before, e.per_unit, e.amounts) for e in g.edits}
    assert edits == {("c1", "out_channels"): (4, 2, (2, 1, 1)), ("c2", "out_channels"): (2, 1, (0, 1, 1)),
                     ("c3", "out_channels"): (3, 1, None), ("head", "in_channels"): (6, 2, None)}
    # (c1, c2, c3, head input) channels left, by hand from the sets above
    for removed, widths in (([0], (2, 2, 2, 4)), ([1], (3, 1, 2, 4)), ([2], (3, 1, 2, 4))):
        plan = build_plan(model, [(g, removed)])
        pruned = pp.apply_plan(copy.deepcopy(model), plan)
        assert (pruned.c1.weight.shape[0], pruned.c2.weight.shape[0], pruned.c3.weight.shape[0],
                pruned.head.weight.shape[1]) == widths
        assert_equals_zeroing(model, pruned, plan, x)
    # unit 0's c1 score is the mean of c1's channels 0 and 3: (1 + 3) / 2, with c3's 4: 3
    table = aggregate_scores({"c3": [4.0, 0.0, 0.0], "c1": [1.0, 2.0, 2.0, 3.0],
                              "c2": [4.0, 6.0]}, [g])
    np.testing.assert_array_equal(table["c3"], [3.0, 2.0, 8 / 3])
