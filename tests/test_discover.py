"""Discovery beyond the zoo: the fallback tracer, refusals, coupling errors and index mappings."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from zoo import ZOO

from pruneplan.apply import apply_plan
from pruneplan.errors import (
    CoupledGroupError,
    PlanningError,
    UnsupportedOperationError,
)
from pruneplan.graph.discover import build_graph, describe_groups, prunable_groups
from pruneplan.graph.spec import EditSpec
from pruneplan.planner import plan_pruning
from pruneplan.select import select_indices


def _prune_and_run(model: nn.Module, removed: dict, x: torch.Tensor) -> tuple[nn.Module, object]:
    plan = plan_pruning(model, removed, example_inputs=x)
    pruned = apply_plan(copy.deepcopy(model), plan)
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape
    return pruned, plan


# ---- fallback tracer -----------------------------------------------------------------------


class ControlFlow(nn.Module):
    """A branch on a tensor value: torch.fx cannot trace this, the recording tracer can."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        if x.mean() > 0:  # data-dependent control flow
            x = x + self.conv2(x)
        for _ in range(int(x.shape[-1]) // 8):  # one 2x2 pool for an 8x8 input
            x = F.max_pool2d(x, 2)
        return self.fc(x.view(x.size(0), -1))


def test_fallback_tracer_handles_python_control_flow() -> None:
    torch.manual_seed(0)
    model, x = ControlFlow().eval(), torch.randn(2, 3, 8, 8)
    with pytest.raises(torch.fx.proxy.TraceError):
        build_graph(model, x, tracer="fx")
    assert build_graph(model, x).source == "record"
    groups = prunable_groups(model, x)
    # conv1 and conv2 are summed (the branch ran: the mean after ReLU is positive); conv1's
    # channels reach fc as 4x4 = 16 features each (channels-first flatten: repeat 16)
    assert [(g.name, g.roots) for g in groups] == [("conv1", ("conv1", "conv2"))]
    fc = next(s for s in groups[0].slices if s.tensor == "fc.weight")
    assert (fc.axis, fc.repeat) == (1, 16)
    pruned, _ = _prune_and_run(model, {"conv1": [1, 5]}, x)
    assert pruned.fc.in_features == 6 * 16 and pruned.conv2.out_channels == 6
    # residual-coupled, but only per-channel ops in between: zeroing channels 1 and 5 of the
    # inputs of conv2 and of fc is equivalent
    def zero(m, args):
        y = args[0].clone()
        if y.dim() == 4:
            y[:, [1, 5]] = 0
        else:
            y.view(y.size(0), 8, 16)[:, [1, 5]] = 0
        return (y,)

    hs = [model.conv2.register_forward_pre_hook(zero), model.fc.register_forward_pre_hook(zero)]
    with torch.no_grad():
        masked = model(x)
    for h in hs:
        h.remove()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked, rtol=1e-4, atol=1e-5)


def test_discovery_leaves_the_model_as_it_was() -> None:
    model = ZOO["resnet"].build().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prunable_groups(model, ZOO["resnet"].example(), tracer="record")
    prunable_groups(model, ZOO["resnet"].example(), tracer="fx")
    assert all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ---- refusals ------------------------------------------------------------------------------


class UnknownOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
        self.mix = CumMix()
        self.head = nn.Conv2d(8, 4, 1)
        self.side = nn.Conv2d(3, 6, 1)
        self.side2 = nn.Conv2d(6, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mix(self.body(x))) + self.side2(self.side(x))


class CumMix(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # no rule for sort, and it returns a tuple, so it cannot be examined on its example
        # (a single-tensor op like cumsum is: see tests/test_unlisted_ops.py)
        return torch.sort(x, dim=1)[0]


@pytest.mark.parametrize("tracer", ["fx", "record"])
def test_unknown_op_on_a_pruned_path_is_an_error_naming_op_and_module(tracer: str) -> None:
    model, x = UnknownOp().eval(), torch.randn(1, 3, 8, 8)
    with pytest.raises(UnsupportedOperationError) as err:
        prunable_groups(model, x, tracer=tracer)
    msg = str(err.value)
    assert "operation 'sort' in module 'mix'" in msg and "'body.0'" in msg
    assert "register_function_rule" in msg
    with pytest.raises(UnsupportedOperationError, match="sort"):
        plan_pruning(model, {"side": [0]}, example_inputs=x)
    # on_unsupported="skip" lists the other groups and leaves body.0 out
    groups = prunable_groups(model, x, tracer=tracer, on_unsupported="skip")
    assert [g.name for g in groups] == ["side"]


def test_coupled_roots_of_different_sizes_tied_unevenly_form_one_group_of_the_widest() -> None:
    class Unequal(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(3, 4, 1)
            self.c = nn.Conv2d(3, 8, 1)
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # positions 0..3 hold unit u of both a (4 units) and c (8 units), positions 4..7
            # unit u of b and u + 4 of c: a unit of c goes with one of a or one of b, so a
            # loses only the removed units among 0..3 (more in tests/test_uneven_ties.py)
            return self.head(torch.cat([self.a(x), self.b(x)], 1) + self.c(x))

    groups = prunable_groups(Unequal(), torch.randn(1, 3, 4, 4))
    assert [(g.name, g.size, g.roots) for g in groups] == [("c", 8, ("c", "a", "b"))]
    edits = {(e.module, e.attribute): e.amounts for e in groups[0].edits}
    assert edits[("a", "out_channels")] == (1,) * 4 + (0,) * 4
    assert edits[("b", "out_channels")] == (0,) * 4 + (1,) * 4
    assert edits[("c", "out_channels")] is None
    assert [lo.name for lo in groups.left_out] == ["head"]


def test_member_of_coupled_group_needs_the_group_name_or_expand() -> None:
    entry = ZOO["resnet"]
    model, x = entry.build(), entry.example()
    with pytest.raises(CoupledGroupError) as err:
        plan_pruning(model, {"layer1.0.conv2": [0, 3]}, example_inputs=x)
    assert "'layer1.0.conv2' is coupled with ['conv1', 'layer1.0.conv2'] in group 'conv1'" in str(err.value)
    plan = plan_pruning(model, {"layer1.0.conv2": [0, 3]}, example_inputs=x, couple="expand")
    (g,) = plan.groups
    assert g.name == "conv1" and g.removed == [0, 3]
    # both roots lose the same output channels
    assert plan.pruned_shapes()["conv1.weight"][0] == plan.pruned_shapes()["layer1.0.conv2.weight"][0] == 6


def test_output_roots_only_with_include_output() -> None:
    entry = ZOO["vgg_bn"]
    model, x = entry.build(), entry.example()
    names = [g.name for g in prunable_groups(model, x)]
    assert "classifier.6" not in names
    with_out = [g.name for g in prunable_groups(model, x, include_output=True)]
    assert with_out == [*names, "classifier.6"]
    with pytest.raises(PlanningError, match=r"'classifier\.6' is not prunable: its units reach the model output"):
        plan_pruning(model, {"classifier.6": [0]}, example_inputs=x)


def test_multihead_attention_heads_and_the_width_it_reads() -> None:
    class WithMHA(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 8)
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 16)
            self.out = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.proj(x)
            h = self.mha(h, h, h, need_weights=False)[0]
            return self.out(F.relu(self.fc(h)))

    # proj's width is read by MHA's packed in_proj (columns) and written by its out_proj
    # (rows); the heads are a group of their own (tests/test_mha.py checks the values)
    groups = prunable_groups(WithMHA(), torch.randn(2, 5, 4))
    assert [(g.name, g.kind, g.size) for g in groups] == [
        ("proj", "channels", 8), ("mha", "heads", 2), ("fc", "channels", 16)]


# ---- index mappings ------------------------------------------------------------------------


class ChannelsLast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 3 * 3, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x)).permute(0, 2, 3, 1)  # NHWC
        return self.out(F.relu(self.fc(x.flatten(1))))


def test_channels_last_flatten_maps_to_tiles() -> None:
    model, x = ChannelsLast().eval(), torch.randn(2, 3, 3, 3)
    g = prunable_groups(model, x)[0]
    fc = next(s for s in g.slices if s.tensor == "fc.weight")
    # channel c of a 3x3 NHWC map sits at features c, c + 4, ..., c + 8 * 4
    assert (fc.axis, fc.offset, fc.repeat, fc.tiles, fc.tile_stride) == (1, 0, 1, 9, 4)
    edit = next(e for e in g.edits if e.module == "fc")
    assert (edit.attribute, edit.per_unit) == ("in_features", 9)
    pruned, _ = _prune_and_run(model, {"conv": [2]}, x)
    keep = [f for f in range(36) if f % 4 != 2]
    torch.testing.assert_close(pruned.fc.weight, model.fc.weight[:, keep])


def test_channel_shuffle_gives_interleaved_positions() -> None:
    entry = ZOO["shufflenet_v2"]
    groups = {g.name: g for g in prunable_groups(entry.build(), entry.example())}
    g = groups["stage.2.branch1.1.0"]
    conv5 = next(s for s in g.slices if s.tensor == "conv5.0.weight")
    # cat(branch1, branch2) then shuffle(2): unit u of both branches lands at 2u and 2u + 1
    assert (conv5.axis, conv5.repeat) == (1, 2)


def test_grouped_conv_units_are_local_positions_of_every_conv_group() -> None:
    class Grouped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.g = nn.Conv2d(8, 6, 3, groups=2)
            self.head = nn.Conv2d(6, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(F.relu(self.g(F.relu(self.a(x)))))

    model, x = Grouped().eval(), torch.randn(1, 3, 6, 6)
    groups = {g.name: g for g in prunable_groups(model, x)}
    # g reads 2 blocks of 4 channels: a's unit j is channels {j, j + 4} (4 units); g's own
    # outputs are 2 blocks of 3: its unit j is output channels {j, j + 3} (3 units)
    assert {n: g.size for n, g in groups.items()} == {"a": 4, "g": 3}
    s = next(s for s in groups["a"].slices if s.tensor == "g.weight")
    assert (s.axis, s.modulo, s.tiles, s.tile_stride) == (1, 4, 2, 4)
    s = next(s for s in groups["g"].slices if s.tensor == "g.weight")
    assert (s.axis, s.modulo, s.tiles, s.tile_stride) == (0, None, 2, 3)
    assert EditSpec("a", "out_channels", 8, 2) in groups["a"].edits
    pruned, plan = _prune_and_run(model, {"a": [1], "g": [0, 2]}, x)
    # a loses channels 1 and 5; g keeps groups=2 with 3 inputs and 1 output per group
    assert plan.group("a").slices[0].map.unit(1) == [1, 5]
    assert pruned.a.out_channels == 6 and pruned.g.in_channels == 6 and pruned.g.groups == 2
    assert tuple(pruned.g.weight.shape) == (2, 3, 3, 3) and pruned.head.in_channels == 2
    torch.testing.assert_close(pruned.g.weight[1, :, 0, 0],
                               model.g.weight[4, [0, 2, 3], 0, 0].detach())


def test_layer_scale_and_position_parameters_are_sliced() -> None:
    for name, key, axis in (("convnext", "blocks.0.gamma", 0), ("transformer", "pos", 2)):
        entry = ZOO[name]
        g = prunable_groups(entry.build(), entry.example())[0]
        assert any(s.tensor == key and s.axis == axis for s in g.slices), name


def test_scores_to_plan_end_to_end() -> None:
    entry = ZOO["resnet"]
    model, x = entry.build(), entry.example()
    groups = prunable_groups(model, x)
    modules = dict(model.named_modules())
    # L1 norm of each root's output filters, per member module; coupled members are averaged
    scores = {r: modules[r].weight.detach().abs().flatten(1).sum(1).numpy()
              for g in groups for r in g.roots}
    removed = select_indices(scores, 0.5, scope="global", round_to=2, groups=groups)
    assert set(removed) <= {g.name for g in groups}
    _, plan = _prune_and_run(model, removed, x)
    sizes = {g.name: g.size for g in groups}
    assert all((sizes[g.name] - len(g.removed)) % 2 == 0 for g in plan.groups)
    assert sum(len(v) for v in removed.values()) > 0


def test_describe_groups_lists_names_sizes_roots() -> None:
    entry = ZOO["resnet"]
    text = describe_groups(prunable_groups(entry.build(), entry.example()))
    lines = text.splitlines()
    assert lines[0].split() == ["group", "size", "tensors", "roots"]
    assert lines[1].split()[:2] == ["conv1", "8"] and lines[1].endswith("conv1, layer1.0.conv2")
    # header, 9 groups, then the classifier with its reason
    assert len(lines) == 1 + 9 + 2
    assert lines[-2:] == ["left out (1 roots):", "  fc: its units reach the model output "
                          "(include_output=True allows pruning it)"]


def test_groups_are_deterministic_across_tracers_and_runs() -> None:
    for name in ("densenet", "efficientnet"):
        entry = ZOO[name]
        model, x = entry.build(), entry.example()
        a = prunable_groups(model, x)
        assert prunable_groups(model, x) == a == prunable_groups(model, x, tracer="record")
        assert np.all([g.size > 0 for g in a])


def test_width_used_as_a_fixed_size_blocks_the_group_in_fx_graphs() -> None:
    class FixedWidth(nn.Module):
        """Attention-style code reading the residual width with ``x.shape`` and reusing it
        for a tensor that does not carry those channels (``reshape(b, t, d)``)."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(4, 8)
            self.v = nn.Linear(8, 8)
            self.out = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.embed(x)
            b, t, d = x.shape
            y = self.v(x).view(b, t, 2, -1).transpose(1, 2)  # heads: v is not prunable
            y = y.transpose(1, 2).reshape(b, t, d)  # d: the *residual* width, fixed
            return self.head(x + self.out(y))

    model, x = FixedWidth().eval(), torch.randn(2, 5, 4)
    # fx sees that d comes from embed's channels: the residual group (embed, out) is refused
    assert prunable_groups(model, x, tracer="fx") == []
    # a width that lands on the axis holding those channels is fine (channel shuffle's
    # view(b, groups, c // groups, h, w), the VGG flatten view(b, c * h * w))
    entry = ZOO["shufflenet_v2"]
    names = [g.name for g in prunable_groups(entry.build(), entry.example(), tracer="fx")]
    assert "stage.2.branch1.1.0" in names


# ---- helpers behind `pruneplan plan` / `pruneplan groups` ------------------------------------


def test_load_factory_and_model(tmp_path) -> None:
    from safetensors.torch import save_file

    from pruneplan.loading import load_factory, load_model, parse_input_shape

    assert load_factory("zoo:ResNet") is ZOO["resnet"].build().__class__
    model = ZOO["resnet"].build()
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    loaded = load_model("zoo:ResNet", weights)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert not loaded.training
    assert parse_input_shape("3,224,224") == (3, 224, 224)
    for spec, msg in (("zoo", "expected 'pkg.module:factory'"), ("nope_mod:f", "cannot import"),
                      ("zoo:Missing", "has no attribute 'Missing'")):
        with pytest.raises(PlanningError, match=msg):
            load_factory(spec)
    with pytest.raises(PlanningError, match="comma-separated integers"):
        parse_input_shape("3,a")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(PlanningError, match="weights do not fit"):
        load_model("zoo:ResNet", tmp_path / "bad.safetensors")


def test_plan_from_metric_global_round_to() -> None:
    from pruneplan.loading import example_input, metric_needs_data, plan_from_metric

    model = ZOO["resnet"].build()
    x = example_input((3, 16, 16), batch_size=2)
    plan = plan_from_metric(model, x, "weight_norm", 0.5, scope="global", round_to=2)
    groups = {g.name: g for g in prunable_groups(model, x)}
    assert plan.groups and all((groups[g.name].size - len(g.removed)) % 2 == 0 for g in plan.groups)
    assert plan.provenance.metric == "weight_norm"
    assert plan.provenance.selection["scope"] == "global" and plan.provenance.selection["round_to"] == 2
    # same inputs, same plan (weight norms are deterministic, so is the selection)
    assert plan_from_metric(model, x, "weight_norm", 0.5, scope="global", round_to=2).digest() == plan.digest()
    assert not metric_needs_data("random") and metric_needs_data("taylor")
    with pytest.raises(PlanningError, match="metric 'taylor' needs data"):
        plan_from_metric(model, x, "taylor", 0.5)
    with pytest.raises(PlanningError, match="unknown metric"):
        plan_from_metric(model, x, "magic", 0.5)


class LinearSE(nn.Module):
    """SE gate with Linear layers: pool -> flatten -> fc -> relu -> fc -> sigmoid -> view."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 2)
        self.fc2 = nn.Linear(2, 8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        b, c, _, _ = x.size()
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
        return self.head(x * s.view(b, c, 1, 1))


@pytest.mark.parametrize("tracer", ["fx", "record"])
def test_linear_se_gate_with_a_width_reshape_is_coupled(tracer: str) -> None:
    torch.manual_seed(0)
    model, x = LinearSE().eval(), torch.randn(2, 3, 6, 6)
    groups = prunable_groups(model, x, tracer=tracer)
    # c = x.size(1) reshapes fc2's output: fine, fc2 is coupled to conv by the product
    assert [(g.name, g.roots) for g in groups] == [("conv", ("conv", "fc2")), ("fc1", ("fc1",))]
    pruned, _ = _prune_and_run(model, {"conv": [0, 7], "fc1": [1]}, x)
    assert pruned.fc2.out_features == 6 and pruned.fc1.in_features == 6


def test_indexing_other_axes_keeps_labels_and_slicing_the_channels_blocks() -> None:
    class Index(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(4, 8)
            self.mid = nn.Linear(8, 6)
            self.head = nn.Linear(6, 2)
            self.conv = nn.Conv2d(3, 6, 1)
            self.conv_head = nn.Conv2d(3, 2, 1)

        def forward(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
            h = self.mid(self.embed(x))[..., 0, :]  # first token: the channel axis stays
            c = self.conv(img)
            half = c.shape[1] // 2
            c = self.conv_head(c[:, :half])  # a hard slice of conv's channels
            return self.head(h) + c.mean((1, 2, 3))[:, None]

    model = Index().eval()
    x, img = torch.randn(2, 5, 4), torch.randn(2, 3, 4, 4)
    for tracer in ("fx", "record"):
        names = [g.name for g in prunable_groups(model, (x, img), tracer=tracer)]
        # conv is sliced by a hard-coded half: blocked; conv_head's channels are averaged away
        assert names == ["embed", "mid", "conv_head"], tracer


def test_stack_couples_branches_after_a_recurrent_layer() -> None:
    class Stacked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.e = nn.Embedding(10, 6)
            self.rnn = nn.LSTM(6, 5, batch_first=True)
            self.a = nn.Linear(5, 4)
            self.b = nn.Linear(5, 4)
            self.o = nn.Linear(4, 2)

        def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
            h, _ = self.rnn(self.e(ids))
            return {"out": self.o(torch.stack([self.a(h), self.b(h)], 0).sum(0))}

    model, ids = Stacked().eval(), torch.randint(0, 10, (2, 5))
    for tracer in ("fx", "record"):
        # the embedding width feeds the LSTM's input, its hidden units feed a and b, which
        # are summed position-wise
        assert [(g.name, g.roots) for g in prunable_groups(model, ids, tracer=tracer)] == [
            ("e", ("e",)), ("rnn", ("rnn",)), ("a", ("a", "b"))]
    plan = plan_pruning(model, {"a": [1]}, example_inputs=ids)
    pruned = apply_plan(copy.deepcopy(model), plan)
    assert pruned.a.out_features == pruned.b.out_features == pruned.o.in_features == 3
    with torch.no_grad():
        assert pruned(ids)["out"].shape == (2, 5, 2)


def test_builtin_transformer_encoder_layers_are_traced_through() -> None:
    # nn.TransformerEncoder is a built-in module made of other modules: discovery looks inside
    # it, so each layer's MLP hidden units (linear1 -> activation -> dropout -> linear2) are
    # prunable (and so are the heads of its MultiheadAttention, tests/test_mha.py)
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Linear(8, 16)
            layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.enc(self.emb(x)).mean(1))

    model, x = Net().eval(), torch.randn(3, 5, 8)
    groups = prunable_groups(model, x)
    assert [(g.name, g.size) for g in groups] == [
        ("emb", 16), ("enc.layers.0.self_attn", 2), ("enc.layers.0.linear1", 32),
        ("enc.layers.1.self_attn", 2), ("enc.layers.1.linear1", 32)]
    removed = {"enc.layers.0.linear1": [0, 5, 31], "enc.layers.1.linear1": [2]}
    # reference: the original with those hidden units zeroed where they enter linear2
    handles = []
    for name, idx in removed.items():
        consumer = model.get_submodule(name.replace("linear1", "linear2"))

        def zero(_m, args, idx=idx):
            h = args[0].clone()
            h[..., idx] = 0
            return (h,)

        handles.append(consumer.register_forward_pre_hook(zero))
    with torch.no_grad():
        expected = model(x)
    for h in handles:
        h.remove()
    pruned = apply_plan(copy.deepcopy(model), plan_pruning(model, removed, example_inputs=x))
    assert pruned.enc.layers[0].linear1.out_features == 29 and pruned.enc.layers[1].linear2.in_features == 31
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), expected, rtol=1e-5, atol=1e-5)
