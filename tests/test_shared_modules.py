"""Modules called more than once (a new-user trial found plans that applied and broke the model).

A tensor axis read by several calls (a module shared by two branches, a layer applied again in
depth, a block reused in a loop as ALBERT does, a layer's weight given to a functional call too,
a weight tied between two modules) keeps one width for every call: the units each call brings
there are coupled position by position, so one group owns each position. Where the calls bring
different channels (one brings units, another channels no prunable layer owns), the roots are
left out with a reason naming the module and its calls.

Expected tensors, axes and edits per group are derived by hand in the comments. Equivalence:
the pruned model equals the original with the removed units zeroed at the input of every
consumer, *at every call* (`test_zoo._zeroing_hooks` registers a pre-hook on the module, which
runs at each of its calls): removing input channel i of a shared layer removes it for each call.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_unexecuted import AuxNet
from test_zoo import _zeroing_hooks, assert_equals_zeroing
from torch import nn

import pruneplan as pp
from pruneplan.errors import PlanningError
from pruneplan.graph.spec import LeftOut
from pruneplan.planner import build_plan

TRACERS = ["fx", "record"]
OUTPUT = "its units reach the model output (include_output=True allows pruning it)"


def _layout(g) -> tuple[set, set]:
    """A group's ``{(tensor, axis)}`` and ``{(module, attribute, before, per unit)}``."""
    return ({(s.tensor, s.axis) for s in g.slices},
            {(e.module, e.attribute, e.before, e.per_unit) for e in g.edits})


def _random_subsets_apply(model: nn.Module, x, groups, seeds=range(4)) -> None:
    """Random subsets of every group plan, apply, run, equal zeroing and replay on the state
    dict; the original is untouched."""
    for seed in seeds:
        rng = np.random.default_rng(seed)
        removed = {g.name: sorted(rng.choice(g.size, int(rng.integers(1, g.size)), replace=False)
                                  .tolist()) for g in groups}
        plan = pp.plan_pruning(model, removed, example_inputs=x)
        pruned = pp.apply_plan(copy.deepcopy(model), plan)
        args = x if isinstance(x, tuple) else (x,)
        handles = _zeroing_hooks(model, plan)
        try:
            with torch.no_grad():
                want = model(*args)
        finally:
            for h in handles:
                h.remove()
        with torch.no_grad():
            torch.testing.assert_close(pruned(*args), want)
        sd = pp.apply_to_state_dict(plan, model.state_dict())
        got = pruned.state_dict()
        assert all(torch.equal(sd[k], got[k]) for k in sd)


# ---- a Siamese / shared head: one conv applied to two branches --------------------------------


class Siamese(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.a(x)) + self.c(self.b(x))


@pytest.mark.parametrize("tracer", TRACERS)
def test_a_conv_shared_by_two_branches_couples_them(tracer: str) -> None:
    # c reads a's channel i at its first call and b's channel i at its second, through one
    # weight column c.weight[:, i]: removing it removes a's output i and b's output i together
    model, x = Siamese().eval(), torch.randn(2, 3, 10, 10)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    assert [(g.name, g.roots, g.size) for g in groups] == [("a", ("a", "b"), 8)]
    assert _layout(groups[0]) == (
        {("a.weight", 0), ("a.bias", 0), ("b.weight", 0), ("b.bias", 0), ("c.weight", 1)},
        {("a", "out_channels", 8, 1), ("b", "out_channels", 8, 1), ("c", "in_channels", 8, 1)})
    assert groups.left_out == [LeftOut("c", OUTPUT)]
    # the trial's plan: runs now, and b lost the same channels as a
    plan = pp.plan_pruning(model, {"a": [1, 4]}, example_inputs=x)
    pruned = pp.apply_plan(copy.deepcopy(model), plan)
    assert pruned.b.weight.shape == (6, 3, 3, 3) and pruned.c.weight.shape == (4, 6, 1, 1)
    assert torch.equal(pruned.b.weight, model.b.weight[[0, 2, 3, 5, 6, 7]])
    assert_equals_zeroing(model, pruned, plan, x)
    _random_subsets_apply(model, x, groups)


def test_planning_from_a_metric_on_the_shared_conv() -> None:
    # the trial's second failure: the validator saw groups 'a' and 'b' both slicing c.weight
    model, x = Siamese().eval(), torch.randn(2, 3, 10, 10)
    plan = pp.plan_from_metric(model, x, "lp_norm", 0.25)
    assert [(g.name, len(g.removed)) for g in plan.groups] == [("a", 2)]
    pruned = pp.apply_plan(copy.deepcopy(model), plan)
    assert_equals_zeroing(model, pruned, plan, x)


# ---- a layer applied twice in depth ------------------------------------------------------------


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.c = nn.Linear(8, 8)
        self.h = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(self.c(F.relu(self.c(self.a(x)))))


@pytest.mark.parametrize("tracer", TRACERS)
def test_a_linear_applied_twice_in_depth_couples_its_input_and_output(tracer: str) -> None:
    # the first call reads a's units on c.weight axis 1, the second reads c's own outputs
    # there: c's input and output keep one set, so a's unit i goes with c's output unit i
    model, x = Twice().eval(), torch.randn(5, 4)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    assert [(g.name, g.roots, g.size) for g in groups] == [("a", ("a", "c"), 8)]
    assert _layout(groups[0]) == (
        {("a.weight", 0), ("a.bias", 0), ("c.weight", 0), ("c.weight", 1), ("c.bias", 0),
         ("h.weight", 1)},
        {("a", "out_features", 8, 1), ("c", "in_features", 8, 1), ("c", "out_features", 8, 1),
         ("h", "in_features", 8, 1)})
    plan = pp.plan_pruning(model, {"a": [0, 6]}, example_inputs=x)
    pruned = pp.apply_plan(copy.deepcopy(model), plan)
    keep = [1, 2, 3, 4, 5, 7]
    assert torch.equal(pruned.c.weight, model.c.weight[keep][:, keep])
    # zeroing written out: a's outputs 0 and 6 and c's outputs 0 and 6 at both calls
    with torch.no_grad():
        mask = torch.ones(8)
        mask[[0, 6]] = 0
        h = model.c(model.a(x) * mask) * mask
        want = model.h(model.c(F.relu(h)) * mask)
        torch.testing.assert_close(pruned(x), want)
    _random_subsets_apply(model, x, groups)


# ---- a block reused in a loop (ALBERT) ----------------------------------------------------------


class SharedLoop(nn.Module):
    """``for _ in range(3): h = h + ff2(relu(ff1(h)))``: one feed-forward block, three times."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.ff1 = nn.Linear(8, 16)
        self.ff2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for _ in range(3):
            h = h + self.ff2(F.relu(self.ff1(h)))
        return self.head(h)


@pytest.mark.parametrize("tracer", TRACERS)
def test_a_block_reused_in_a_loop_prunes_alike_at_every_pass(tracer: str) -> None:
    # hidden stream: embed + ff2 (the residual sum), read by ff1 at each of the three calls
    # (the same units each time) and by head; ff1's 16 units are read by ff2 at every call
    model, x = SharedLoop().eval(), torch.randn(2, 5, 4)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    assert [(g.name, g.roots, g.size) for g in groups] == [
        ("embed", ("embed", "ff2"), 8), ("ff1", ("ff1",), 16)]
    assert _layout(groups[0]) == (
        {("embed.weight", 0), ("embed.bias", 0), ("ff2.weight", 0), ("ff2.bias", 0),
         ("ff1.weight", 1), ("head.weight", 1)},
        {("embed", "out_features", 8, 1), ("ff2", "out_features", 8, 1),
         ("ff1", "in_features", 8, 1), ("head", "in_features", 8, 1)})
    assert _layout(groups[1]) == ({("ff1.weight", 0), ("ff1.bias", 0), ("ff2.weight", 1)},
                                  {("ff1", "out_features", 16, 1), ("ff2", "in_features", 16, 1)})
    _random_subsets_apply(model, x, groups)


class LoopInDepth(nn.Module):
    """``for _ in range(3): h = relu(layer(h))``: the layer's output is its next input."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.layer = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for _ in range(3):
            h = F.relu(self.layer(h))
        return self.head(h)


@pytest.mark.parametrize("tracer", TRACERS)
def test_a_layer_looped_in_depth_couples_with_what_feeds_it(tracer: str) -> None:
    model, x = LoopInDepth().eval(), torch.randn(3, 4)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    assert [(g.name, g.roots, g.size) for g in groups] == [("embed", ("embed", "layer"), 8)]
    assert _layout(groups[0])[0] == {("embed.weight", 0), ("embed.bias", 0), ("layer.weight", 0),
                                     ("layer.weight", 1), ("layer.bias", 0), ("head.weight", 1)}
    _random_subsets_apply(model, x, groups)


# ---- one weight reached through a module and a functional call; weights tied ------------------


class FunctionalReuse(nn.Module):
    """``fc(a(x)) + F.linear(b(x), fc.weight, fc.bias)``: fc's weight used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(4, 8)
        self.fc = nn.Linear(8, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc(self.a(x)) + F.linear(self.b(x), self.fc.weight, self.fc.bias)))


@pytest.mark.parametrize("tracer", TRACERS)
def test_a_weight_reused_by_a_functional_call_couples_both_inputs(tracer: str) -> None:
    # fc.weight axis 1 reads a's units (module call) and b's (functional call): a with b;
    # fc is a root at both calls (its rows: fc.weight axis 0, fc.bias), read by head
    model, x = FunctionalReuse().eval(), torch.randn(5, 4)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    assert [(g.name, g.roots, g.size) for g in groups] == [("a", ("a", "b"), 8), ("fc", ("fc",), 6)]
    assert _layout(groups[0])[0] == {("a.weight", 0), ("a.bias", 0), ("b.weight", 0),
                                     ("b.bias", 0), ("fc.weight", 1)}
    assert _layout(groups[1])[0] == {("fc.weight", 0), ("fc.bias", 0), ("head.weight", 1)}
    # the zeroing hooks see fc's module call only: write the functional call's zeroing out
    rng = np.random.default_rng(3)
    for seed in range(3):
        ra = sorted(rng.choice(8, 1 + seed, replace=False).tolist())
        rf = sorted(rng.choice(6, 1 + seed, replace=False).tolist())
        plan = pp.plan_pruning(model, {"a": ra, "fc": rf}, example_inputs=x)
        pruned = pp.apply_plan(copy.deepcopy(model), plan)
        ma, mf = torch.ones(8), torch.ones(6)
        ma[ra], mf[rf] = 0, 0
        with torch.no_grad():
            m = model
            h = m.fc(m.a(x) * ma) + F.linear(m.b(x) * ma, m.fc.weight, m.fc.bias)
            want = m.head(F.relu(h) * mf)
            torch.testing.assert_close(pruned(x), want)


class TiedPair(nn.Module):
    """Two Linear layers holding one weight (``c2.weight = c1.weight``), own biases."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(4, 8)
        self.c1 = nn.Linear(8, 6)
        self.c2 = nn.Linear(8, 6)
        self.c2.weight = self.c1.weight
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.c1(self.a(x))) * F.relu(self.c2(self.b(x))))


@pytest.mark.parametrize("tracer", TRACERS)
def test_a_weight_tied_between_two_modules_couples_what_they_read(tracer: str) -> None:
    # columns of the one weight: a's units (c1's call) with b's (c2's call); its rows: c1's
    # units with c2's (both roots), and the product couples them again; every key is sliced
    model, x = TiedPair().eval(), torch.randn(5, 4)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    assert [(g.name, g.roots) for g in groups] == [("a", ("a", "b")), ("c1", ("c1", "c2"))]
    assert _layout(groups[0])[0] == {("a.weight", 0), ("a.bias", 0), ("b.weight", 0),
                                     ("b.bias", 0), ("c1.weight", 1), ("c2.weight", 1)}
    _random_subsets_apply(model, x, groups)
    plan = pp.plan_pruning(model, {"a": [2], "c1": [0, 5]}, example_inputs=x)
    pruned = pp.apply_plan(copy.deepcopy(model), plan)
    assert pruned.c1.weight is pruned.c2.weight and pruned.c1.weight.shape == (4, 7)


# ---- calls that bring different channels: left out, with the calls named ----------------------


class SharedWithInput(nn.Module):
    """c reads a's channels at one call and the model's second input at the other."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(8, 4, 1)
        self.h = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.h(self.c(self.a(x)) * self.c(z))


class SharedPartly(nn.Module):
    """c reads a's 8 channels at one call; b's 5 then 3 input channels at the other."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 5, 1)
        self.c = nn.Conv2d(8, 4, 1)
        self.h = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(self.c(self.a(x)) + self.c(torch.cat([self.b(x), x], 1)))


@pytest.mark.parametrize("tracer", TRACERS)
def test_a_call_bringing_no_units_leaves_the_others_out(tracer: str) -> None:
    model = SharedWithInput().eval()
    x, z = torch.randn(2, 3, 6, 6), torch.randn(2, 8, 6, 6)
    groups = pp.prunable_groups(model, (x, z), tracer=tracer)
    why = ("module 'c' (Conv2d) is called 2 times, bringing different channels to 'c.weight' "
           "axis 1 (call 1: units of 'a'; call 2: channels no prunable layer owns), so no "
           "position can be removed for every call alike")
    assert [(g.name, g.roots) for g in groups] == [("c", ("c",))]
    assert groups.left_out == [LeftOut("a", why), LeftOut("h", OUTPUT)]
    with pytest.raises(PlanningError, match=r"^'a' is not prunable: module 'c' \(Conv2d\) is "
                       r"called 2 times"):
        pp.plan_pruning(model, {"a": [1]}, example_inputs=(x, z))
    _random_subsets_apply(model, (x, z), groups)


@pytest.mark.parametrize("tracer", TRACERS)
def test_calls_bringing_units_at_different_positions_leave_both_out(tracer: str) -> None:
    model, x = SharedPartly().eval(), torch.randn(2, 3, 6, 6)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    why = ("module 'c' (Conv2d) is called 2 times, bringing different channels to 'c.weight' "
           "axis 1 (call 1: units of 'a'; call 2: units of 'b' on 5 of its 8 positions), so no "
           "position can be removed for every call alike")
    assert [(g.name, g.roots) for g in groups] == [("c", ("c",))]
    assert groups.left_out == [LeftOut("a", why), LeftOut("b", why), LeftOut("h", OUTPUT)]


# ---- groups that would still overlap are never offered ------------------------------------------


def test_groups_sharing_a_position_are_left_out_not_offered(monkeypatch) -> None:
    # without the coupling of shared calls, a and b would both own c.weight's columns: the
    # assembled groups are checked for disjointness, and both are left out with the position
    from pruneplan.graph._analysis import Engine

    monkeypatch.setattr(Engine, "couple_shared", lambda self: None)
    model, x = Siamese().eval(), torch.randn(2, 3, 10, 10)
    groups = pp.prunable_groups(model, x)
    assert list(groups) == []
    assert groups.left_out == [
        LeftOut("a", "its units and those of group 'b' both own position 0 of tensor 'c.weight' "
                "axis 1, so removing either would cut the other's channels"),
        LeftOut("c", OUTPUT),  # (in the order the roots are first called: a, c, b)
        LeftOut("b", "its units and those of group 'a' both own position 0 of tensor 'c.weight' "
                "axis 1, so removing either would cut the other's channels")]
    with pytest.raises(PlanningError, match=r"^'a' is not prunable: its units and those of group 'b'"):
        pp.plan_pruning(model, {"a": [1]}, example_inputs=x)
    # and should such groups reach the planner, one plan holding both is refused by validation
    monkeypatch.setattr(Engine, "_overlapping", lambda self, groups: {})
    ga, gb = pp.prunable_groups(model, x)
    with pytest.raises(pp.PlanValidationError, match=r"^invalid plan: groups 'a' and 'b' both "
                       r"slice tensor 'c.weight' axis 1 at position 0$"):
        build_plan(model, [(ga, [1]), (gb, [2])])


# ---- explicit cascades: the probe pass sees every call ---------------------------------------


@pytest.mark.parametrize(("model", "root", "reading"), [
    (Siamese(), "a", "1"),  # c's second call reads b's channels
    (Twice(), "a", "1"),  # c's second call reads c's own outputs
])
def test_a_cascade_through_a_module_called_again_is_refused(model, root: str, reading: str) -> None:
    x = torch.randn(2, 3, 6, 6) if isinstance(model, Siamese) else torch.randn(5, 4)
    model = model.eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PlanningError) as e:
        pp.plan_pruning(model, {root: [1]}, example_inputs=x, cascades={root: ["c"]})
    kind = type(model.c).__name__
    assert str(e.value) == (
        f"cascade of 'a' lists module 'c' ({kind}), which the probe pass sees called 2 times but "
        f"reading the channels of 'a' only at call {reading}: cutting its tensors for them would "
        "break the other calls (plan without cascades: discovery couples the roots of every call)")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---- one parameter broadcast over two streams -------------------------------------------------


class SharedScale(nn.Module):
    """``h(a(x) * g) + k(b(x) * g)``: one per-channel scale ``g`` applied to two streams."""

    def __init__(self, second_from_input: bool = False) -> None:
        super().__init__()
        self.second_from_input = second_from_input
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(4, 8)
        self.g = nn.Parameter(torch.randn(8))
        self.h = nn.Linear(8, 2)
        self.k = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.h(self.a(x) * self.g)
        other = x.repeat(1, 2) if self.second_from_input else self.b(x)
        return first + self.k(other * self.g)


@pytest.mark.parametrize("tracer", TRACERS)
def test_a_scale_shared_by_two_streams_couples_them(tracer: str) -> None:
    # g[i] scales a's channel i and b's channel i: removing g[i] removes both (was: groups a
    # and b each slicing g, a plan of either cut the other's scale)
    model, x = SharedScale().eval(), torch.randn(3, 4)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    assert [(g.name, g.roots) for g in groups] == [("a", ("a", "b"))]
    assert _layout(groups[0])[0] == {("a.weight", 0), ("a.bias", 0), ("b.weight", 0),
                                     ("b.bias", 0), ("g", 0), ("h.weight", 1), ("k.weight", 1)}
    _random_subsets_apply(model, x, groups)


@pytest.mark.parametrize("tracer", TRACERS)
def test_a_scale_also_applied_to_channels_no_layer_owns_leaves_the_root_out(tracer: str) -> None:
    model, x = SharedScale(second_from_input=True).eval(), torch.randn(3, 4)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    assert list(groups) == []
    assert groups.left_out[0] == LeftOut(
        "a", "'g' is read by 2 calls (operation 'mul' in module '<top level>'), bringing different "
        "channels to 'g' axis 0 (call 1: units of 'a'; call 2: channels no prunable layer owns), so "
        "no position can be removed for every call alike")


class TwoNames(nn.Module):
    """One conv held as ``c`` and ``d``, called once under each name on two branches."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(8, 6, 1)
        self.d = self.c
        self.h = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(torch.relu(self.c(self.a(x))) * self.d(self.b(x)))


@pytest.mark.parametrize("tracer", TRACERS)
def test_a_module_held_under_two_names_couples_its_calls(tracer: str) -> None:
    # its columns: a's units (call as c) with b's (call as d), under both state-dict keys;
    # its rows (one root, both calls) with both keys and h's columns
    model, x = TwoNames().eval(), torch.randn(2, 3, 5, 5)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    assert [(g.name, g.roots) for g in groups] == [("a", ("a", "b")), ("c", ("c",))]
    assert _layout(groups[0])[0] == {("a.weight", 0), ("a.bias", 0), ("b.weight", 0),
                                     ("b.bias", 0), ("c.weight", 1), ("d.weight", 1)}
    assert _layout(groups[1])[0] == {("c.weight", 0), ("c.bias", 0), ("d.weight", 0),
                                     ("d.bias", 0), ("h.weight", 1)}
    _random_subsets_apply(model, x, groups)
    plan = pp.plan_pruning(model, {"a": [1, 3], "c": [0]}, example_inputs=x)
    pruned = pp.apply_plan(copy.deepcopy(model), plan)
    assert pruned.d is pruned.c and pruned.c.weight.shape == (5, 6, 1, 1)


# ---- a follower (BatchNorm) shared by two branches ----------------------------------------------


class SharedNorm(nn.Module):
    """``c(cat([bn(a(x)), bn(b(x))]))``: one BatchNorm normalising two branches."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c = nn.Conv2d(16, 4, 1)
        self.h = nn.Conv2d(4, 2, 1)
        with torch.no_grad():  # statistics that are not the identity
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(F.relu(self.c(torch.cat([self.bn(self.a(x)), self.bn(self.b(x))], 1))))


@pytest.mark.parametrize("tracer", TRACERS)
def test_a_norm_shared_by_two_branches_couples_them(tracer: str) -> None:
    # bn's channel i (weight, bias, statistics) normalises a's channel i and b's channel i; c
    # reads a's at columns 0-7 and b's at 8-15: a's unit i goes with b's unit i
    model, x = SharedNorm().eval(), torch.randn(2, 3, 6, 6)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    assert [(g.name, g.roots) for g in groups] == [("a", ("a", "b")), ("c", ("c",))]
    assert _layout(groups[0]) == (
        {("a.weight", 0), ("a.bias", 0), ("b.weight", 0), ("b.bias", 0), ("bn.weight", 0),
         ("bn.bias", 0), ("bn.running_mean", 0), ("bn.running_var", 0), ("c.weight", 1)},
        {("a", "out_channels", 8, 1), ("b", "out_channels", 8, 1), ("bn", "num_features", 8, 1),
         ("c", "in_channels", 16, 2)})
    c_cols = {(s.offset, s.repeat, s.tiles, s.tile_stride) for s in groups[0].slices
              if s.tensor == "c.weight"}
    assert c_cols == {(0, 1, 2, 8)}  # unit i: columns i and 8 + i
    _random_subsets_apply(model, x, groups)


# ---- plan_pruning runs the plan on a meta copy before returning it --------------------------------


def test_plan_pruning_refuses_a_plan_after_which_the_model_no_longer_runs(monkeypatch) -> None:
    # with discovery's coupling and disjointness check switched off, group 'a' alone slices
    # c.weight's columns that b's call still needs: planning applies the plan to a copy on the
    # meta device, runs the example inputs, and refuses; the model is untouched
    from pruneplan.graph._analysis import Engine

    monkeypatch.setattr(Engine, "couple_shared", lambda self: None)
    monkeypatch.setattr(Engine, "_overlapping", lambda self, groups: {})
    model, x = Siamese().eval(), torch.randn(2, 3, 10, 10)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PlanningError) as e:
        pp.plan_pruning(model, {"a": [1, 4]}, example_inputs=x)
    assert str(e.value).startswith(
        "the plan of groups 'a' would break the model: with it applied (to a copy on the meta "
        "device), the example inputs fail with RuntimeError: ")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.device.type == "cpu" for p in model.parameters())


class NeedsData(nn.Module):
    """Code that reads a value (``.item()``): it cannot run on the meta device."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.h = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x))
        return self.h(h) * (2.0 if h.sum().item() > -1e9 else 1.0)


def test_a_model_that_cannot_run_on_meta_still_plans() -> None:
    from pruneplan.graph.probe import dry_run

    model, x = NeedsData().eval(), torch.randn(3, 4)
    assert dry_run(model, x, lambda twin: None) is None  # the unchanged copy fails: no verdict
    plan = pp.plan_pruning(model, {"a": [0, 3]}, example_inputs=x)
    pruned = pp.apply_plan(copy.deepcopy(model), plan)
    assert_equals_zeroing(model, pruned, plan, x)


def test_plan_from_metric_refuses_a_plan_after_which_the_model_no_longer_runs(monkeypatch) -> None:
    from pruneplan.graph._analysis import Engine

    monkeypatch.setattr(Engine, "couple_shared", lambda self: None)
    monkeypatch.setattr(Engine, "_overlapping", lambda self, groups: {})
    model, x = Siamese().eval(), torch.randn(2, 3, 10, 10)
    # a and b each slice c.weight's columns: the validator refuses two overlapping groups, so
    # give b's roots nothing to remove; a's plan alone breaks c's call on b
    with pytest.raises(PlanningError, match=r"^the plan of groups 'a' would break the model"):
        pp.plan_from_metric(model, x, "lp_norm", 0.25, exclude=["b"])


def test_the_dry_run_also_runs_the_branches_of_training_mode(monkeypatch) -> None:
    # discovery traced in eval mode only (its training pass switched off) misses aux, which
    # reads stem's channels: the plan breaks the model in training mode, and the dry run's
    # training-mode pass refuses it
    import pruneplan.graph.discover as discover

    build = discover.build_graphs
    monkeypatch.setattr(discover, "build_graphs", lambda m, x, tracer="auto", training_pass="auto":
                        build(m, x, tracer, "never"))
    model, x = AuxNet().eval(), torch.randn(2, 3, 8, 8)
    with pytest.raises(PlanningError) as e:
        pp.plan_pruning(model, {"stem": [0, 1, 2]}, example_inputs=x)
    assert str(e.value).startswith("the plan of groups 'stem' would break the model: with it "
                                   "applied (to a copy on the meta device), the example inputs "
                                   "fail with RuntimeError in training mode: ")
    assert not model.training
    monkeypatch.undo()  # discovery's own training pass finds aux: the plan runs in both modes
    plan = pp.plan_pruning(model, {"stem": [0, 1, 2]}, example_inputs=x)
    pruned = pp.apply_plan(copy.deepcopy(model), plan)
    assert pruned.aux.weight.shape == (8, 13, 1, 1)
    pruned.train()(x)
