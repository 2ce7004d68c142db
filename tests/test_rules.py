"""The rule registry used from outside the package (tests/custom_rules_example.py).

Reference values: the example net has two roots feeding the gate (``stem`` through the norm,
``gate_conv`` directly), so the gate couples them into one group of 8 units; ``head`` is a group
of its own; ``fc`` reaches the output. Removing units must equal zeroing those channels at the
input of ``head`` (the only consumer), since the norm and the gate act on each channel alone.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from custom_rules_example import FrozenChannelNorm, GatedNet, gate, register
from torch import nn

import pruneplan as pp
from pruneplan.graph import _ir
from pruneplan.graph._labels import Lab
from pruneplan.graph.discover import prunable_groups
from pruneplan.graph.rules import Call, ChannelRule, ElementwiseRule, Rule, base
from pruneplan.graph.spec import EditSpec, SliceSpec


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch):
    """Registrations made in a test vanish after it."""
    monkeypatch.setattr(base, "_MODULE", dict(base._MODULE))
    monkeypatch.setattr(base, "_FUNCTION", dict(base._FUNCTION))
    monkeypatch.setattr(base, "_module_cache", {})
    monkeypatch.setattr(_ir, "_LEAF_TYPES", set(_ir._LEAF_TYPES))


def _net() -> tuple[GatedNet, torch.Tensor]:
    torch.manual_seed(0)
    m = GatedNet().eval()
    with torch.no_grad():  # statistics that make slicing the wrong entries visible
        m.norm.running_mean.uniform_(-1, 1)
        m.norm.running_var.uniform_(0.5, 2)
        m.norm.weight.uniform_(0.5, 1.5)
        m.norm.bias.uniform_(-0.5, 0.5)
    return m, torch.randn(2, 3, 9, 9)


@pytest.mark.parametrize("tracer", ["fx", "record"])
def test_without_rules_the_stem_is_left_out_with_reasons(registry, tracer: str) -> None:
    m, x = _net()
    # the norm without its rule is traced through: its parameter arithmetic blocks the stem;
    # the gate, an operator nobody knows, is examined on its example (per channel: followed),
    # so gate_conv meets the stem's dropped channels there and is left out too
    groups = prunable_groups(m, x, tracer=tracer)
    assert [g.name for g in groups] == ["head"]
    assert [(lo.name, lo.reason) for lo in groups.left_out] == [
        ("stem", "combined with a tensor no prunable layer owns at operation 'mul' in module 'norm'"),
        ("gate_conv", "combined with a tensor no prunable layer owns at operation "
                      "'pruneplan_example::gate' in module '<top level>'"),
        ("fc", "its units reach the model output (include_output=True allows pruning it)")]


@pytest.mark.parametrize("tracer", ["fx", "record"])
def test_registered_rules_group_and_own(registry, tracer: str) -> None:
    register()
    m, x = _net()
    groups = {g.name: g for g in prunable_groups(m, x, tracer=tracer)}
    assert sorted(groups) == ["head", "stem"]
    g = groups["stem"]
    assert g.roots == ("stem", "gate_conv") and g.size == 8
    assert g.tensors == ["gate_conv.bias", "gate_conv.weight", "head.weight", "norm.bias",
                         "norm.running_mean", "norm.running_var", "norm.weight", "stem.bias",
                         "stem.weight"]
    assert [(e.module, e.attribute, e.before) for e in g.edits] == [
        ("gate_conv", "out_channels", 8), ("head", "in_channels", 8),
        ("norm", "num_channels", 8), ("stem", "out_channels", 8)]
    assert g.notes == ("coupled by pruneplan_example::gate in <top level>",)


def test_pruning_through_registered_rules_equals_zeroing(registry, tmp_path) -> None:
    register()
    m, x = _net()
    removed = [1, 4, 6]
    plan = pp.plan_pruning(m, {"stem": removed}, example_inputs=x)
    reference = copy.deepcopy(m)

    def zero(_mod, args):
        h = args[0].clone()
        h[:, removed] = 0
        return (h,)

    reference.head.register_forward_pre_hook(zero)
    pruned = pp.apply_plan(copy.deepcopy(m), plan)
    with torch.no_grad():
        got, want, original = pruned(x), reference(x), m(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, original, atol=1e-4)
    keep = [0, 2, 3, 5, 7]
    assert pruned.norm.num_channels == 5
    torch.testing.assert_close(pruned.norm.running_var, m.norm.running_var[keep], rtol=0, atol=0)
    assert tuple(pruned.gate_conv.weight.shape) == (5, 3, 1, 1)
    assert tuple(pruned.head.weight.shape) == (6, 5, 3, 3)
    # replay on saved weights: same output, bit for bit
    pp.apply_to_safetensors(plan, _save(m, tmp_path / "m.safetensors"), tmp_path / "p.safetensors")
    fresh = pp.load_pruned(GatedNet(), plan, tmp_path / "p.safetensors").eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), got, rtol=0, atol=0)


def _save(m: torch.nn.Module, path) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return str(path)


def test_channel_rule_refuses_a_tensor_of_another_length(registry) -> None:
    pp.register_module_rule(FrozenChannelNorm, ChannelRule(tensors=("weight",),
                                                           attributes=("eps",)))
    pp.register_function_rule(gate, ElementwiseRule())
    m, x = _net()
    # eps (1e-5) is not the channel count: the stem's group is left out, the head stays
    assert [g.name for g in prunable_groups(m, x)] == ["head"]


def test_registration_checks_its_arguments(registry) -> None:
    with pytest.raises(pp.PlanningError, match=re.escape("needs an nn.Module subclass, got <class 'int'>")):
        pp.register_module_rule(int, ElementwiseRule())
    with pytest.raises(pp.PlanningError, match=re.escape("must be a pruneplan.graph.rules.Rule, got str")):
        pp.register_function_rule("my_gate", "follow")


def test_readme_rules_example_runs(registry) -> None:
    # the README's "Your own layers and operations" block asserts its own groups

    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S)
                 if "register_module_rule" in b)
    namespace: dict = {}
    exec(compile(block, "README rules example", "exec"), namespace)
    assert [g.size for g in namespace["groups"]] == [8]


class TwoGate(nn.Module):
    """A packed gated unit: ``a, b = (x @ w.T).chunk(2, -1); y = a * sigmoid(b)`` (``w``: 2H x C).

    Unit u of its output owns two rows of ``w``: u (value) and H + u (gate).
    """

    def __init__(self, c: int, h: int) -> None:
        super().__init__()
        self.h = h
        self.w = nn.Parameter(torch.randn(2 * h, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = (x @ self.w.T).chunk(2, -1)
        return a * torch.sigmoid(b)


class TwoGateRule(Rule):
    """Root of H units (rows u and H + u of ``w``); consumer of its input's last axis."""

    def propagate(self, call: Call):
        m, name = call.module, call.name
        out = call.root(-1, lambda: (m.h, [SliceSpec(f"{name}.w", 0, tiles=2, tile_stride=m.h)],
                                     [EditSpec(name, "h", m.h)]))
        x = call.x
        if isinstance(x, Lab):
            if x.axes != (len(call.xmeta) - 1,):
                call.block(x, f"{call.where} reads them on another axis")
            else:
                call.own(f"{name}.w", 1, x.arr)  # columns of w: one per input feature
        return out


def test_a_rule_with_several_positions_per_unit(registry) -> None:
    pp.register_module_rule(TwoGate, TwoGateRule())
    torch.manual_seed(4)
    m = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), TwoGate(6, 4), nn.Linear(4, 3)).eval()
    x = torch.randn(7, 5)
    groups = {g.name: g for g in prunable_groups(m, x)}
    assert sorted(groups) == ["0", "2"]
    w_slice = next(s for s in groups["2"].slices if s.tensor == "2.w")
    assert (w_slice.axis, w_slice.tiles, w_slice.tile_stride) == (0, 2, 4)
    plan = pp.plan_pruning(m, {"0": [1, 4], "2": [2]}, example_inputs=x)
    pruned = pp.apply_plan(copy.deepcopy(m), plan)
    # rows 2 and 6 (unit 2's value and gate) and columns 1, 4 (group 0's units) are gone
    torch.testing.assert_close(pruned[2].w, m[2].w[[0, 1, 3, 4, 5, 7]][:, [0, 2, 3, 5]], rtol=0, atol=0)
    assert pruned[2].h == 3
    ref = copy.deepcopy(m)
    ref[2].register_forward_pre_hook(lambda _m, a: (a[0].index_fill(1, torch.tensor([1, 4]), 0),))
    ref[3].register_forward_pre_hook(lambda _m, a: (a[0].index_fill(1, torch.tensor([2]), 0),))
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), ref(x), rtol=1e-5, atol=1e-6)
