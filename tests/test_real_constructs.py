"""Constructs of real model code that gave wrong results (issue 11, the timm models whose pruned
model broke or whose plan contradicted itself): each a minimal module reproducing the construct.

Where pruning through the construct is correct, the pruned model equals the original with the
removed units zeroed at the input of their consumers (an independent reference: hooks on the
original model); where it is not possible, the roots are left out with the exact reason.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_zoo import _zeroing_hooks, assert_equals_zeroing
from torch import nn

import pruneplan as pp
from pruneplan.graph._ir import Ref
from pruneplan.graph.spec import LeftOut
from pruneplan.planner import build_plan

OUTPUT = "its units reach the model output (include_output=True allows pruning it)"


# ---- unbind of a labelled axis (timm csatv2's scalar attention) ------------------------------


class ScalarAttention(nn.Module):
    """``q, k, v = self.qkv(h).unbind(-1)``: three scalar channels taken apart by position."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.qkv = nn.Linear(6, 3)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        q, k, v = self.qkv(h).unbind(-1)
        return self.head(h * (q * k * v).unsqueeze(-1))


@pytest.mark.parametrize("tracer", ["fx", "record"])
def test_unbind_of_their_axis_leaves_the_root_out(tracer: str) -> None:
    # removing one of qkv's 3 outputs would leave unbind 2 parts for 3 names: qkv is left out;
    # embed's channels are consumed by qkv and head and only scaled per row: still a group
    groups = pp.prunable_groups(ScalarAttention().eval(), torch.randn(2, 5, 4), tracer=tracer)
    assert [(g.name, g.size) for g in groups] == [("embed", 6)]
    assert groups.left_out == [
        LeftOut("qkv", "operation 'unbind' in module '<top level>' takes their axis apart into one "
                "tensor per position, so the number of parts would change with the units"),
        LeftOut("head", OUTPUT),
    ]


# ---- a width read off a tensor used as a size (convit, crossvit, nest, twins: recorded) -------


class HeadsFromWidth(nn.Module):
    """``B, N, C = h.shape; q(h).reshape(B, N, heads, C // heads) ... .reshape(B, N, C)``: the
    head width comes from the *input* width ``C`` (timm's convit, crossvit, nest, twins)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads = 2
        self.embed = nn.Linear(4, 8)
        self.q = nn.Linear(8, 8)
        self.fc1 = nn.Linear(8, 6)
        self.fc2 = nn.Linear(6, 8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        B, N, C = h.shape
        q = self.q(h).reshape(B, N, self.num_heads, C // self.num_heads).softmax(-1)
        return self.head(self.fc2(torch.relu(self.fc1(h))) + self.proj(q.reshape(B, N, C)))


@pytest.mark.parametrize("tracer", ["fx", "record"])
def test_a_width_read_off_a_tensor_is_followed_by_both_tracers(tracer: str) -> None:
    # C is embed's width: q's 8 outputs are viewed as 2 heads of C // 2, and the heads are
    # put back as C channels, so a unit is one head of q with C // 2 = 4 channels of embed
    # (the attention rule ties them; num_heads is edited). The recording tracer once saw C as
    # the number 8 and offered embed and q apart, with plans that broke the forward pass.
    # fc1 (consumed by fc2) and fc2 + proj (summed) are unaffected.
    model, x = HeadsFromWidth().eval(), torch.randn(2, 5, 4)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    assert [(g.name, g.size, g.roots) for g in groups] == [
        ("embed", 2, ("embed", "q")), ("fc1", 6, ("fc1",)), ("fc2", 8, ("fc2", "proj"))]
    assert groups.left_out == [LeftOut("head", OUTPUT)]
    embed = groups[0]
    assert sorted((e.module, e.attribute, e.before, e.per_unit) for e in embed.edits
                  if e.module == "") == [("", "num_heads", 2, 1)]
    # every offered group prunes to the zeroed original (head 1: embed channels 4..7, q rows
    # 4..7, proj columns 4..7)
    removed = {"embed": [1], "fc1": [1, 4], "fc2": [0, 3, 7]}
    plan = build_plan(model, [(g, removed[g.name]) for g in groups])
    pruned = pp.apply_plan(copy.deepcopy(model), plan)
    assert (pruned.num_heads, pruned.q.weight.shape, pruned.proj.weight.shape) == (
        1, (4, 4), (5, 4))
    assert_equals_zeroing(model, pruned, plan, x)


def test_recorded_sizes_are_graph_values_and_plain_ints_after_the_pass() -> None:
    from pruneplan.graph._record import SizeInt, trace_record

    seen: list = []

    class Keep(HeadsFromWidth):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(self.embed(x).shape[-1])
            return super().forward(x)

    graph = trace_record(Keep().eval(), (torch.randn(2, 5, 4),))
    # C // num_heads: a floordiv node (num_heads stays the number 2) on item 2 of a size node
    # of embed's second call (h.shape); the reshape refers to it, not to the number 4
    embed = [n.idx for n in graph.nodes if n.target == "embed"][1]
    reshape = next(n for n in graph.nodes if n.target == "reshape")
    assert reshape.args[3] == 2 and isinstance(reshape.args[4], Ref)
    div = graph.nodes[reshape.args[4].node]
    item = graph.nodes[div.args[0].node]
    size = graph.nodes[item.args[0].node]
    assert (div.target, div.args[1], item.target, item.args[1]) == ("floordiv", 2, "getitem", 2)
    assert (size.target, size.args) == ("size", (Ref(embed),))
    # the size kept by the model is still 8, and arithmetic on it after the pass records nothing
    assert isinstance(seen[0], SizeInt) and seen[0] == 8
    n = len(graph.nodes)
    assert seen[0] // 2 == 4 and type(seen[0] // 2) is int and len(graph.nodes) == n
    assert type(copy.deepcopy(seen[0])) is int
    # and what it holds of the recording is empty (the graph is not kept alive by the model)
    assert (seen[0].builder.nodes, seen[0].builder.values) == ([], {})


# ---- a parameter viewed with a fixed size (poolformer's Scale, gcvit/coatnet's bias_shape) ----


class ScaledConv(nn.Module):
    """``y * self.scale.view(shape)``: a per-channel parameter viewed with its size given as
    ``how``: a tuple attribute (timm's ``Scale``: ``self.shape = (dim, 1, 1)``), an int
    attribute, a bare number, or ``-1``."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, 8))
        self.head = nn.Conv2d(8, 4, 1)
        if how == "tuple":
            self.shape = (8, 1, 1)
        if how == "attribute":
            self.dim = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "tuple":
            s = self.scale.view(self.shape)
        elif self.how == "attribute":
            s = self.scale.view(self.dim, 1, 1)
        elif self.how == "number":
            s = self.scale.view(8, 1, 1)
        else:
            s = self.scale.view(-1, 1, 1)
        return self.head(torch.relu(self.conv(x) * s))


VIEW = "operation 'view' in module '<top level>' views parameter 'scale' with the size 8 of its axis 0 "
FAILS = ", so the view would fail once units are removed"


@pytest.mark.parametrize("tracer", ["fx", "record"])
def test_a_parameter_viewed_with_a_bare_number_leaves_its_root_out(tracer: str) -> None:
    # conv's units slice scale; after pruning, scale.view(8, 1, 1) of 5 values would fail,
    # and nothing in the model holds the 8 for a plan to edit
    groups = pp.prunable_groups(ScaledConv("number").eval(), torch.randn(2, 3, 6, 6),
                                tracer=tracer)
    assert list(groups) == []
    assert groups.left_out == [
        LeftOut("conv", VIEW + "written as a number no attribute of its module holds" + FAILS),
        LeftOut("head", OUTPUT)]


@pytest.mark.parametrize("tracer", ["fx", "record"])
@pytest.mark.parametrize(("how", "edit"), [
    ("tuple", [("", "shape[0]", 8, 1)]), ("attribute", [("", "dim", 8, 1)]), ("minus_one", [])])
def test_a_parameter_viewed_with_an_attribute_or_minus_one_prunes(how: str, edit: list,
                                                                  tracer: str) -> None:
    # the one tuple attribute holding the whole shape (element 0: 8 -> 5) or the one int
    # attribute holding 8 under a width name (self.dim) is edited with the units; with -1
    # nothing needs editing. Reference: the original with conv's channels 1, 4, 6 zeroed at
    # head's input (scale and ReLU act per channel, so they stay zero)
    model, x = ScaledConv(how).eval(), torch.randn(2, 3, 6, 6)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    assert [(g.name, g.size) for g in groups] == [("conv", 8)]
    assert [(e.module, e.attribute, e.before, e.per_unit) for e in groups[0].edits
            if e.module == ""] == edit
    plan = build_plan(model, [(groups[0], [1, 4, 6])])
    pruned = pp.apply_plan(copy.deepcopy(model), plan)
    assert pruned.scale.shape == (5,) and getattr(pruned, "dim", 5) == 5
    assert getattr(pruned, "shape", (5, 1, 1)) == (5, 1, 1)
    assert_equals_zeroing(model, pruned, plan, x)


# ---- repeat_interleave along another axis (gcvit's global query, repeated per window) --------


class RepeatedQuery(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(4, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (1, N, 6) -> (B, N, 6): the same query for each of B windows, B read at run time
        # (as gcvit does: the unknown-op examination cannot replay such a call)
        g = torch.relu(self.q(x[:1]))
        return self.head(g.repeat_interleave(x.shape[0] // g.shape[0], dim=0))


@pytest.mark.parametrize("tracer", ["fx", "record"])
def test_repeat_interleave_along_another_axis_follows(tracer: str) -> None:
    model, x = RepeatedQuery().eval(), torch.randn(3, 5, 4)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    assert [(g.name, g.size) for g in groups] == [("q", 6)]
    plan = build_plan(model, [(groups[0], [0, 5])])
    pruned = pp.apply_plan(copy.deepcopy(model), plan)
    handles = _zeroing_hooks(model, plan)
    with torch.no_grad():
        want = model(x)
    for h in handles:
        h.remove()
    with torch.no_grad():
        out = pruned(x)
    assert out.shape == (3, 5, 2)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


# ---- a constant size where labelled channels lie (LeNet's view(-1, 16 * 5 * 5); edgenext) ----


class LeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 5)
        self.c2 = nn.Conv2d(6, 16, 5)
        self.fc = nn.Linear(16 * 5 * 5, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.c1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.c2(x)), 2)
        return self.fc(x.view(-1, 16 * 5 * 5))


@pytest.mark.parametrize("tracer", ["fx", "record"])
def test_a_literal_size_on_their_axis_leaves_the_root_out(tracer: str) -> None:
    # c2's 16 channels x 5 x 5 become the 400 features; without 2 channels the view of 300
    # values per sample as (-1, 400) would fail (or mix samples): c2 is left out; c1 (consumed
    # by c2) is fine and prunes to the zeroed original
    model, x = LeNet().eval(), torch.randn(4, 1, 32, 32)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    assert [(g.name, g.size) for g in groups] == [("c1", 6)]
    assert groups.left_out == [
        LeftOut("c2", "operation 'view' in module '<top level>' gives their axis the fixed size "
                "400 and no attribute of its module holds it, so the view would fail once units "
                "are removed"),
        LeftOut("fc", OUTPUT),
    ]
    plan = build_plan(model, [(groups[0], [2, 3])])
    pruned = pp.apply_plan(copy.deepcopy(model), plan)
    assert_equals_zeroing(model, pruned, plan, x)


class HeadsSizedByABlockedWidth(nn.Module):
    """edgenext's XCA: ``B, N, C = x.shape`` of a tensor whose roots were left out further up
    (here: a constant added to embed's output), then heads put back as ``reshape(B, N, C)``."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads = 2
        self.dim = 8  # holds C's value, but the code reads C off the tensor: no edit can help
        self.offset = torch.linspace(-1.0, 1.0, 8)  # no parameter: embed cannot be pruned
        self.embed = nn.Linear(4, 8)
        self.q = nn.Linear(8, 8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.embed(x) + self.offset)
        B, N, C = h.shape
        q = self.q(h).reshape(B, N, self.num_heads, -1).softmax(-1).reshape(B, N, C)
        return self.head(torch.relu(self.proj(q)))


@pytest.mark.parametrize("tracer", ["fx", "record"])
def test_heads_sized_by_a_width_left_out_are_left_out(tracer: str) -> None:
    # C stays 8 (embed is left out), so q cannot lose a head: the last reshape would get 4
    # values per position for 8; proj (consumed by head) is unaffected
    model, x = HeadsSizedByABlockedWidth().eval(), torch.randn(2, 5, 4)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    assert [(g.name, g.size) for g in groups] == [("proj", 8)]
    assert groups.left_out == [
        LeftOut("embed", "combined with a tensor no prunable layer owns at operation 'add' in "
                "module '<top level>'"),
        LeftOut("q", "their width is used as a fixed size at operation 'reshape' in module "
                "'<top level>'"),
        LeftOut("head", OUTPUT),
    ]


# ---- selective kernel (timm's skresnet): an input split into paths, attention across paths -----


class SelectiveKernel(nn.Module):
    """timm's ``SelectiveKernel``: the input split into ``num_paths`` equal parts (one per
    path, ``split(self.in_channels // self.num_paths)``), one conv path per part, the paths
    stacked and weighted per channel by a softmax across the paths computed from their sum
    (``fc_select``'s output viewed as ``(B, num_paths, C // num_paths, 1, 1)``, ``C`` read off
    it), then summed."""

    def __init__(self, chs: int, rd: int = 4, num_paths: int = 2) -> None:
        super().__init__()
        self.in_channels = self.out_channels = chs
        self.num_paths = num_paths
        self.paths = nn.ModuleList(
            nn.Sequential(nn.Conv2d(chs // num_paths, chs, 3, padding=1 + p, dilation=1 + p,
                                    bias=False), nn.BatchNorm2d(chs), nn.ReLU())
            for p in range(num_paths))
        self.fc_reduce = nn.Conv2d(chs, rd, 1)
        self.fc_select = nn.Conv2d(rd, chs * num_paths, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.in_channels // self.num_paths, 1)
        x = torch.stack([op(parts[i]) for i, op in enumerate(self.paths)], dim=1)
        a = self.fc_select(torch.relu(self.fc_reduce(x.sum(1).mean((2, 3), keepdim=True))))
        B, C, H, W = a.shape
        a = torch.softmax(a.view(B, self.num_paths, C // self.num_paths, H, W), dim=1)
        return torch.sum(x * a, dim=1)


class SKNet(nn.Module):
    """A stem and two residual blocks ``relu(bn(conv(sk(x))) + x)`` (skresnet's BasicBlock,
    the shortcut added second: the second block splits a sum labelled by ``convs.0``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.sks = nn.ModuleList(SelectiveKernel(8) for _ in range(2))
        self.convs = nn.ModuleList(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
                                   for _ in range(2))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for sk, conv in zip(self.sks, self.convs, strict=True):
            x = torch.relu(conv(sk(x)) + x)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("tracer", ["fx", "record"])
def test_selective_kernel_pairs_paths_and_moves_the_input_split(tracer: str) -> None:
    torch.manual_seed(0)
    model, x = SKNet().eval(), torch.randn(2, 3, 6, 6)
    for m in model.modules():  # non-trivial statistics, so that a wrong slice shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    # the residual stream (stem + both blocks' convs) is split in halves by each block: a unit
    # is channel j of both halves (j and j + 4), so 4 units. Each block's paths are summed with
    # per-channel weights: channel c of both paths and rows c and 8 + c of fc_select (its
    # output viewed as (2 paths, 8)) are one unit, 8 units; fc_reduce's 4 channels stand alone.
    got = {g.name: (g.size, g.roots) for g in groups}
    assert got == {
        "stem.0": (4, ("stem.0", "convs.0.0", "convs.1.0")),
        "sks.0.paths.0.0": (8, ("sks.0.paths.0.0", "sks.0.paths.1.0", "sks.0.fc_select")),
        "sks.0.fc_reduce": (4, ("sks.0.fc_reduce",)),
        "sks.1.paths.0.0": (8, ("sks.1.paths.0.0", "sks.1.paths.1.0", "sks.1.fc_select")),
        "sks.1.fc_reduce": (4, ("sks.1.fc_reduce",)),
    }
    assert groups.left_out == [LeftOut("head", OUTPUT)]
    removed = {"stem.0": [1], "sks.0.paths.0.0": [0, 5], "sks.0.fc_reduce": [2],
               "sks.1.paths.0.0": [7], "sks.1.fc_reduce": [0, 3]}
    plan = build_plan(model, [(g, removed[g.name]) for g in groups])
    pruned = pp.apply_plan(copy.deepcopy(model), plan)
    # the split size follows: in_channels 8 -> 6 (two halves of 3); fc_select loses rows
    # {0, 5, 8, 13} in block 0
    assert [sk.in_channels for sk in pruned.sks] == [6, 6]
    assert pruned.sks[0].paths[0][0].weight.shape == (6, 3, 3, 3)
    assert pruned.sks[0].fc_select.weight.shape == (12, 3, 1, 1)
    assert torch.equal(pruned.sks[0].fc_select.bias,
                       model.sks[0].fc_select.bias[[1, 2, 3, 4, 6, 7, 9, 10, 11, 12, 14, 15]])
    assert_equals_zeroing(model, pruned, plan, x)


# ---- learned position tables laid out (1, H, W, C) (timm's naflexvit, qwen3_vit) ----------------


def _replays(model: nn.Module, plan, pruned: nn.Module) -> None:
    """Replaying the plan on the original's state dict gives the pruned model's tensors."""
    sd = pp.apply_to_state_dict(plan, model.state_dict())
    got = pruned.state_dict()
    assert sorted(sd) == sorted(got)
    assert all(torch.equal(sd[k], got[k]) for k in sd)


class GridPositions(nn.Module):
    """A patch embedding plus a learned position table kept as a (1, 4, 4, C) grid: viewed as
    (1, 16, C) when the input has the table's grid (``"view"``), else resized on its grid with
    ``F.interpolate`` (``(1, C, 4, 4)`` -> ``(1, C, 2, 2)``, flattened, ``"resize"``)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.embed = nn.Linear(6, 8)
        self.pos = nn.Parameter(torch.randn(1, 4, 4, 8))
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        if self.how == "view":
            pos = self.pos.reshape(1, 16, -1)
        else:
            pos = torch.nn.functional.interpolate(self.pos.permute(0, 3, 1, 2).float(), size=(2, 2),
                                                  mode="bilinear").flatten(2).transpose(1, 2)
        h = h + pos.to(dtype=h.dtype)
        h = h + self.fc(torch.relu(h))
        return self.head(h.mean(1))


@pytest.mark.parametrize("tracer", ["fx", "record"])
@pytest.mark.parametrize(("how", "tokens"), [("view", 16), ("resize", 4)])
def test_a_position_grid_viewed_or_resized_keeps_its_channel_axis(how: str, tokens: int,
                                                                  tracer: str) -> None:
    # the residual stream (embed + pos + fc) is one group of 8 channels: merging the grid's
    # (4, 4) axes into 16 positions, or resampling them, leaves the channel axis a whole axis
    # of the table, which the units slice (axis 3). It was left out ("combined with a tensor no
    # prunable layer owns") since the merge dropped what the view knew of the table.
    model, x = GridPositions(how).eval(), torch.randn(2, tokens, 6)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    assert [(g.name, g.roots) for g in groups] == [("embed", ("embed", "fc"))]
    assert ("pos", 3) in {(s.tensor, s.axis) for s in groups[0].slices}
    assert groups.left_out == [LeftOut("head", OUTPUT)]
    plan = build_plan(model, [(groups[0], [0, 5, 6])])
    pruned = pp.apply_plan(copy.deepcopy(model), plan)
    assert pruned.pos.shape == (1, 4, 4, 5)
    assert torch.equal(pruned.pos, model.pos[..., [1, 2, 3, 4, 7]])
    assert_equals_zeroing(model, pruned, plan, x)
    _replays(model, plan, pruned)


# ---- position tables read by one-hot rows (timm's gemma4_vit) ------------------------------------


class OneHotPositions(nn.Module):
    """gemma4's patch embedding: positions ``(B, 2, N)`` (row and column of every patch) made
    one-hot and multiplied with a table ``(2, P, C)``, then summed over the two axes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.table = nn.Parameter(torch.randn(2, 3, 8))
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(x.shape[1]) % 3
        pos = torch.stack([rows, rows.flip(0)]).unsqueeze(0).expand(x.shape[0], -1, -1)
        onehot = torch.nn.functional.one_hot(pos, num_classes=3).to(self.table)
        h = self.embed(x) + (onehot @ self.table).sum(dim=1)
        h = h + self.fc(torch.relu(h))
        return self.head(h.mean(1))


@pytest.mark.parametrize("tracer", ["fx", "record"])
def test_a_table_read_by_one_hot_rows_keeps_its_channel_axis(tracer: str) -> None:
    # (one_hot @ table)[..., c] reads column c of the table alone, and summing over the two
    # tables keeps it: the residual stream (embed + fc) slices table axis 2 with its units
    model, x = OneHotPositions().eval(), torch.randn(2, 5, 6)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    assert [(g.name, g.roots) for g in groups] == [("embed", ("embed", "fc"))]
    assert ("table", 2) in {(s.tensor, s.axis) for s in groups[0].slices}
    assert groups.left_out == [LeftOut("head", OUTPUT)]
    plan = build_plan(model, [(groups[0], [2, 3, 7])])
    pruned = pp.apply_plan(copy.deepcopy(model), plan)
    assert torch.equal(pruned.table, model.table[..., [0, 1, 4, 5, 6]])
    assert_equals_zeroing(model, pruned, plan, x)
    _replays(model, plan, pruned)


# ---- head counts under two names (timm's qwen3_vit, gemma4_vit, deepseek_vit: eva attention) ----


class TwoHeadCounts(nn.Module):
    """An attention keeping ``num_heads`` and ``num_kv_heads`` (equal: no grouped queries) and
    writing them into its views (``view(B, N, self.num_heads, self.head_dim)``, likewise for k
    and v with ``self.num_kv_heads``)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = 2, 2, 4
        self.q = nn.Linear(6, 8)
        self.k = nn.Linear(6, 8)
        self.v = nn.Linear(6, 8)
        self.proj = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q = self.q(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, N, -1))


@pytest.mark.parametrize("tracer", ["fx", "record"])
def test_equal_head_counts_under_two_names_are_both_edited(tracer: str) -> None:
    # every view writes the number 2, held by num_heads and num_kv_heads: query head h meets
    # key/value head h, so a unit (one head of q, k and v) takes one from each count. The roots
    # were left out ("several attributes of its module hold it").
    model, x = TwoHeadCounts().eval(), torch.randn(2, 5, 6)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    assert [(g.name, g.size, g.kind, g.roots) for g in groups] == [
        ("q", 2, "heads", ("q", "k", "v"))]
    assert sorted((e.attribute, e.before, e.per_unit) for e in groups[0].edits
                  if e.module == "") == [("num_heads", 2, 1), ("num_kv_heads", 2, 1)]
    plan = build_plan(model, [(groups[0], [0])])
    pruned = pp.apply_plan(copy.deepcopy(model), plan)
    assert (pruned.num_heads, pruned.num_kv_heads, pruned.head_dim) == (1, 1, 4)
    assert pruned.proj.weight.shape == (6, 4)
    # reference: the original with head 0 (proj's input columns 0..3) zeroed
    assert_equals_zeroing(model, pruned, plan, x)
    _replays(model, plan, pruned)


# ---- a functional norm given its width as a number (timm's RmsNorm, RmsNormFp32) -----------------


class OwnRmsNorm(nn.Module):
    """timm's ``RmsNorm``: no torch norm layer, ``F.rms_norm(x, self.normalized_shape,
    self.weight)``; ``how`` says where the width comes from: the tuple attribute, an int
    attribute (``(self.dim,)``), or a bare number."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        if how == "tuple":
            self.normalized_shape = (8,)
        if how == "int":
            self.dim = 8
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = {"tuple": getattr(self, "normalized_shape", None),
                 "int": (getattr(self, "dim", 0),), "number": (8,)}[self.how]
        return torch.nn.functional.rms_norm(x, shape, self.weight, 1e-6)


class NormedMlp(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.norm = OwnRmsNorm(how)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(torch.relu(self.fc1(x))))


@pytest.mark.parametrize("tracer", ["fx", "record"])
@pytest.mark.parametrize(("how", "attribute"), [("tuple", "normalized_shape"), ("int", "dim")])
def test_a_functional_norm_given_its_width_edits_the_attribute(how: str, attribute: str,
                                                              tracer: str) -> None:
    # fc1's units slice the norm's weight and shrink the attribute its width is passed from
    # (the pruned model failed in rms_norm: "Expected weight to be of same shape as
    # normalized_shape"). The norm spans the channels, so the reference is the norm computed
    # by hand over the channels kept (DESIGN: no zeroing equivalence there).
    model, x = NormedMlp(how).eval(), torch.randn(2, 5, 6)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    assert [(g.name, g.size) for g in groups] == [("fc1", 8)]
    assert ("norm", attribute, 8, 1) in {(e.module, e.attribute, e.before, e.per_unit)
                                         for e in groups[0].edits}
    keep = [0, 1, 3, 4, 6]
    plan = build_plan(model, [(groups[0], [2, 5, 7])])
    pruned = pp.apply_plan(copy.deepcopy(model), plan)
    assert getattr(pruned.norm, attribute) in ((5,), 5)
    with torch.no_grad():
        h = torch.relu(model.fc1(x))[..., keep]
        want = model.fc2.weight[:, keep] @ (
            h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * model.norm.weight[keep]
        ).unsqueeze(-1)
        torch.testing.assert_close(pruned(x), want.squeeze(-1) + model.fc2.bias)
    _replays(model, plan, pruned)


@pytest.mark.parametrize("tracer", ["fx", "record"])
def test_a_functional_norm_given_a_bare_number_leaves_its_root_out(tracer: str) -> None:
    groups = pp.prunable_groups(NormedMlp("number").eval(), torch.randn(2, 5, 6), tracer=tracer)
    assert list(groups) == []
    assert groups.left_out == [
        LeftOut("fc1", "operation 'rms_norm' in module 'norm' is given the width 8 as a number "
                "and no attribute of its module holds it, so the norm would refuse the pruned "
                "channels"),
        LeftOut("fc2", OUTPUT)]


# ---- einsum (SAM's and MViTv2's decomposed relative positions) -----------------------------------


class Einsums(nn.Module):
    """``fc``'s channels ``c`` through einsums: kept by the output and met by a parameter
    (``"bnc,c->bnc"``), kept and mixed over the tokens (``"bnc,nk->bkc"``); ``how="sum"``
    sums over them instead (``"bnc,cd->bnd"``)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.fc = nn.Linear(6, 8)
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, 8))
        self.mix = nn.Parameter(torch.randn(5, 3))
        self.table = nn.Parameter(torch.randn(8, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(x))
        if self.how == "sum":
            return self.head(torch.einsum("bnc,cd->bnd", h, self.table))
        h = torch.einsum("bnc,c->bnc", h, self.scale)
        return self.head(torch.einsum("bnc,nk->bkc", h, self.mix))


@pytest.mark.parametrize("tracer", ["fx", "record"])
def test_einsum_keeping_their_index_follows_and_slices_a_parameter_on_it(tracer: str) -> None:
    # output position c of both einsums reads position c of h (and of scale) alone: fc's
    # units slice scale and reach head's columns. They were left out ("they reach einsum").
    model, x = Einsums("keep").eval(), torch.randn(2, 5, 6)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    assert [(g.name, g.size) for g in groups] == [("fc", 8)]
    assert {(s.tensor, s.axis) for s in groups[0].slices} == {
        ("fc.weight", 0), ("fc.bias", 0), ("scale", 0), ("head.weight", 1)}
    plan = build_plan(model, [(groups[0], [1, 2, 6])])
    pruned = pp.apply_plan(copy.deepcopy(model), plan)
    assert torch.equal(pruned.scale, model.scale[[0, 3, 4, 5, 7]])
    assert_equals_zeroing(model, pruned, plan, x)
    _replays(model, plan, pruned)


@pytest.mark.parametrize("tracer", ["fx", "record"])
def test_einsum_summing_over_their_index_leaves_the_root_out(tracer: str) -> None:
    groups = pp.prunable_groups(Einsums("sum").eval(), torch.randn(2, 5, 6), tracer=tracer)
    assert list(groups) == []
    assert groups.left_out == [
        LeftOut("fc", "operation 'einsum' in module '<top level>' sums over them"),
        LeftOut("head", OUTPUT)]


class MergedHeads(nn.Module):
    """SAM's attention: heads merged into the batch axis (``reshape(3, B * self.num_heads, N,
    -1)``), a relative-position bias from an einsum of q with a table, used as the mask of
    ``scaled_dot_product_attention``, the heads put back with ``view(B, self.num_heads, N,
    -1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads = 2
        self.qkv = nn.Linear(6, 24)
        self.rel = nn.Parameter(torch.randn(5, 4))
        self.proj = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * self.num_heads, N, -1).unbind(0)
        bias = torch.einsum("bnc,kc->bnk", q, self.rel)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(o.view(B, self.num_heads, N, -1).transpose(1, 2).reshape(B, N, -1))


@pytest.mark.parametrize("tracer", ["fx", "record"])
def test_heads_merged_into_the_batch_axis_prune_with_their_count(tracer: str) -> None:
    # B * num_heads sizes the merged axis: a fixed B times the literal 2 that num_heads holds,
    # which the heads' group edits, so the size follows the heads (it was left out: "their
    # width is used as a fixed size"); the einsum keeps the merged axis (it sums over head_dim
    # only); the axis holds each head B times, which are not query groups (kind "heads").
    # Reference: head 1 zeroed at proj's input.
    model, x = MergedHeads().eval(), torch.randn(2, 5, 6)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    assert [(g.name, g.size, g.kind) for g in groups] == [("qkv", 2, "heads")]
    assert [(e.module, e.attribute, e.before, e.per_unit) for e in groups[0].edits
            if e.module == ""] == [("", "num_heads", 2, 1)]
    plan = build_plan(model, [(groups[0], [1])])
    pruned = pp.apply_plan(copy.deepcopy(model), plan)
    assert (pruned.num_heads, pruned.qkv.weight.shape, pruned.proj.weight.shape) == (
        1, (12, 6), (6, 4))
    assert_equals_zeroing(model, pruned, plan, x)
    _replays(model, plan, pruned)


# ---- one key/value head laid out (B, 1, N, head_dim) (timm's MultiQueryAttention2d) --------------


class SharedKeyValue2d(nn.Module):
    """timm's ``MultiQueryAttention2d`` (MobileNetV4/V5): 1x1 conv projections, ``num_heads``
    query heads of ``key_dim`` and one key/value head whose channels are the head_dim of
    ``(B, 1, N, key_dim)``; the heads are put back as ``s[-1] * self.num_heads`` channels."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.key_dim = 2, 4
        self.query = nn.Conv2d(6, 8, 1)
        self.key = nn.Conv2d(6, 4, 1)
        self.value = nn.Conv2d(6, 4, 1)
        self.output = nn.Conv2d(8, 6, 1)

    def _one_head(self, t: torch.Tensor) -> torch.Tensor:
        s = t.shape
        return t.reshape(s[0], s[1], -1).transpose(1, 2).unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[2:]
        q = self.query(x)
        s = q.shape
        q = q.reshape(s[0], self.num_heads, self.key_dim, -1).transpose(-1, -2)
        o = torch.nn.functional.scaled_dot_product_attention(
            q, self._one_head(self.key(x)), self._one_head(self.value(x)))
        s = o.shape
        o = o.transpose(1, 2).reshape(s[0], H, W, s[-1] * self.num_heads).permute(0, 3, 1, 2)
        return self.output(o)


@pytest.mark.parametrize("tracer", ["fx", "record"])
def test_query_heads_of_one_shared_key_value_head_on_its_head_dim_prune(tracer: str) -> None:
    # key and value channels are the head_dim of the one key/value head: left out alone (all
    # roots reaching the attention were). The query heads are independent: a unit is one
    # head, num_heads is edited, and s[-1] * num_heads follows it.
    model, x = SharedKeyValue2d().eval(), torch.randn(2, 6, 3, 3)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    assert [(g.name, g.size, g.kind) for g in groups] == [("query", 2, "heads")]
    assert [(e.module, e.attribute, e.before, e.per_unit) for e in groups[0].edits
            if e.module == ""] == [("", "num_heads", 2, 1)]
    reason = ("they reach operation 'scaled_dot_product_attention' in module '<top level>' on "
              "the sequence or head_dim axis")
    assert groups.left_out == [LeftOut("key", reason), LeftOut("value", reason),
                               LeftOut("output", OUTPUT)]
    plan = build_plan(model, [(groups[0], [0])])
    pruned = pp.apply_plan(copy.deepcopy(model), plan)
    assert (pruned.num_heads, pruned.query.weight.shape, pruned.output.weight.shape) == (
        1, (4, 6, 1, 1), (6, 4, 1, 1))
    assert_equals_zeroing(model, pruned, plan, x)
    _replays(model, plan, pruned)


class FlatPositions(nn.Module):
    """qwen3_vit's ``resample_pos_embed_grid``: a flat table ``(1, 16, C)`` with ``C =
    table.shape[-1]`` read before any operation uses the table, viewed as a 4 x 4 grid,
    resized to 2 x 2 and flattened again."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.pos = nn.Parameter(torch.randn(1, 16, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C = self.pos.shape[-1]
        grid = self.pos.reshape(1, 4, 4, C).permute(0, 3, 1, 2)
        pos = torch.nn.functional.interpolate(grid, size=(2, 2), mode="bilinear")
        h = self.embed(x) + pos.permute(0, 2, 3, 1).reshape(1, 4, C)
        return self.head(torch.relu(h).mean(1))


@pytest.mark.parametrize("tracer", ["fx", "record"])
def test_a_table_sized_by_its_own_shape_prunes(tracer: str) -> None:
    # C is the table's own width: it shrinks with the units that slice it. The recording
    # tracer saw C as the number 8 (the table was read before any operation used it) and left
    # embed out ("views parameter 'pos' with the size 8 ... written as a number").
    model, x = FlatPositions().eval(), torch.randn(2, 4, 6)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    assert [(g.name, g.size) for g in groups] == [("embed", 8)]
    assert ("pos", 2) in {(s.tensor, s.axis) for s in groups[0].slices}
    plan = build_plan(model, [(groups[0], [0, 3])])
    pruned = pp.apply_plan(copy.deepcopy(model), plan)
    assert torch.equal(pruned.pos, model.pos[..., [1, 2, 4, 5, 6, 7]])
    assert_equals_zeroing(model, pruned, plan, x)
    _replays(model, plan, pruned)
