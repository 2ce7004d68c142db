"""Modules the example pass does not execute (issue 11, item 6): training-mode passes, several
example calls, and a warning or an error for whatever stays unreached."""

from __future__ import annotations

import copy
import logging
import random
from typing import NamedTuple

import pytest
import torch
from torch import nn

import pruneplan as pp
from pruneplan.errors import PlanningError, UnexecutedModuleError
from pruneplan.graph.spec import LeftOut

NOT_RUN = "not executed by the example inputs (in eval or training mode)"


class AuxNet(nn.Module):
    """The issue's example: ``aux`` runs only in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Sequential(nn.Conv2d(16, 32, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(32, 10))
        self.aux = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor):
        f = torch.relu(self.stem(x))
        return (self.head(f), self.aux(f)) if self.training else self.head(f)


def _zeroed(model: nn.Module, name: str, idx: list[int]) -> nn.Module:
    """Reference: the root's units zeroed (weight rows and bias), so they leave the ReLU as 0."""
    ref = copy.deepcopy(model)
    root = dict(ref.named_modules())[name]
    with torch.no_grad():
        root.weight[idx] = 0
        root.bias[idx] = 0
    return ref


@pytest.mark.parametrize("tracer", ["fx", "record"])
def test_aux_head_used_only_in_training_is_pruned_too(tracer: str) -> None:
    torch.manual_seed(0)
    model, x = AuxNet().eval(), torch.randn(2, 3, 8, 8)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    stem = next(g for g in groups if g.name == "stem")
    # the training-mode pass found aux reading stem's channels (input axis 1 of aux.weight)
    assert stem.tensors == ["aux.weight", "head.0.weight", "stem.bias", "stem.weight"]
    assert groups.unexecuted == []
    plan = pp.plan_pruning(model, {"stem": [0, 1, 2]}, example_inputs=x)
    pruned = pp.apply_plan(copy.deepcopy(model), plan)
    assert (pruned.aux.in_channels, tuple(pruned.aux.weight.shape)) == (13, (8, 13, 1, 1))
    ref = _zeroed(model, "stem", [0, 1, 2])
    with torch.no_grad():
        got, want = pruned.train()(x), ref.train()(x)
        assert [t.shape for t in got] == [(2, 10), (2, 8, 8, 8)]
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        torch.testing.assert_close(pruned.eval()(x), ref.eval()(x), rtol=0, atol=1e-5)


def test_without_training_pass_the_aux_head_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    model, x = AuxNet().eval(), torch.randn(2, 3, 8, 8)
    with caplog.at_level(logging.WARNING, logger="pruneplan.graph.discover"):
        groups = pp.prunable_groups(model, x, training_pass="never")
    assert groups.unexecuted == ["aux"]
    assert groups.left_out[-1] == LeftOut("aux", NOT_RUN)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(
        "1 modules holding parameters were not executed by the example inputs in eval or "
        "training mode: 'aux'; their input widths are not checked")
    with pytest.raises(UnexecutedModuleError, match="not executed by the example inputs in eval or "
                       "training mode: 'aux'"):
        pp.prunable_groups(model, x, training_pass="never", strict=True)
    assert isinstance(UnexecutedModuleError("x"), PlanningError)


class Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(4, 2, 1)
        self.spare = nn.Linear(4, 4)  # never called, in either mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_a_module_no_mode_runs_warns_by_default_and_fails_strict(
        caplog: pytest.LogCaptureFixture) -> None:
    model, x = Unused().eval(), torch.randn(1, 3, 4, 4)
    with caplog.at_level(logging.WARNING, logger="pruneplan.graph.discover"):
        groups = pp.prunable_groups(model, x)
    assert [g.name for g in groups] == ["a"] and groups.unexecuted == ["spare"]
    assert LeftOut("spare", NOT_RUN) in groups.left_out
    assert "'spare'" in caplog.text
    with pytest.raises(UnexecutedModuleError, match="'spare'"):
        pp.plan_pruning(model, {"a": [0]}, example_inputs=x, strict=True)
    # without strict the plan is made (the warning said what was not checked)
    assert pp.plan_pruning(model, {"a": [0]}, example_inputs=x).groups[0].removed == [0]


class Stateful(nn.Module):
    """Running statistics, a counter updated in place, a buffer replaced, dropout, and a branch
    (``extra``) that runs only in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.5)
        self.extra = nn.Conv2d(6, 6, 1)
        self.out = nn.Conv2d(6, 2, 1)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        if self.training:
            self.count += 1
            self.ema = 0.9 * self.ema + 0.1 * h.mean()  # a new tensor: the buffer is replaced
            h = self.drop(h) + self.extra(h)
        return self.out(h)


def _state_bytes(model: nn.Module) -> list[tuple[str, bytes]]:
    return [(k, v.detach().numpy().tobytes()) for k, v in model.state_dict().items()]


def test_training_pass_restores_buffers_flags_and_rng_exactly() -> None:
    torch.manual_seed(1)
    model = Stateful()
    model.train()
    model.bn.eval()  # a mix of flags, to see each one restored
    with torch.no_grad():
        model(torch.randn(4, 3, 6, 6))  # non-trivial running stats, count = 1, ema set
    model.train()
    model.drop.eval()
    before = _state_bytes(model)
    flags = [m.training for m in model.modules()]
    ids = {k: id(v) for k, v in model.state_dict(keep_vars=True).items()}
    x = torch.randn(1, 3, 6, 6)  # a batch of one: BN stays in eval mode during the pass
    rng, py = torch.get_rng_state(), random.getstate()
    groups = pp.prunable_groups(model, x, training_pass="always")
    assert _state_bytes(model) == before
    assert [m.training for m in model.modules()] == flags
    assert {k: id(v) for k, v in model.state_dict(keep_vars=True).items()} == ids
    assert torch.equal(torch.get_rng_state(), rng) and random.getstate() == py
    assert int(model.count) == 1
    # the training-only branch couples extra's output with conv's (the sum h + extra(h))
    assert [(g.name, g.roots) for g in groups] == [("conv", ("conv", "extra"))]


def test_a_failing_training_pass_falls_back_to_eval_and_says_so(
        caplog: pytest.LogCaptureFixture) -> None:
    class NeedsTargets(Unused):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:
                raise RuntimeError("targets are required in training mode")
            return super().forward(x)

    with caplog.at_level(logging.WARNING, logger="pruneplan.graph.discover"):
        groups = pp.prunable_groups(NeedsTargets().eval(), torch.randn(1, 3, 4, 4))
    assert [g.name for g in groups] == ["a"] and groups.unexecuted == ["spare"]
    assert ("the training-mode pass of NeedsTargets failed (RuntimeError: targets are required "
            "in training mode); only the eval-mode passes are used") in caplog.text


class TwoSizes(nn.Module):
    """Large inputs take a branch (``big``) that small ones never reach."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.small = nn.Conv2d(8, 4, 1)
        self.big = nn.Conv2d(8, 4, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.stem(x))
        if x.shape[-1] > 8:  # fx cannot trace this: the recording tracer runs it
            return self.big(f).mean((2, 3))
        return self.small(f).mean((2, 3))


def test_several_example_calls_are_traced_together() -> None:
    torch.manual_seed(0)
    model = TwoSizes().eval()
    small, big = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 16, 16)
    one = pp.prunable_groups(model, small)
    assert one.unexecuted == ["big"] and [g.tensors for g in one] == [
        ["small.weight", "stem.bias", "stem.weight"]]
    both = pp.prunable_groups(model, pp.ExampleInputs(small, (big,)))
    assert both.unexecuted == [] and [g.tensors for g in both] == [
        ["big.weight", "small.weight", "stem.bias", "stem.weight"]]
    plan = pp.plan_pruning(model, {"stem": [1, 6]}, example_inputs=pp.ExampleInputs(small, big))
    pruned = pp.apply_plan(copy.deepcopy(model), plan)
    ref = _zeroed(model, "stem", [1, 6])
    with torch.no_grad():
        for x in (small, big):
            torch.testing.assert_close(pruned(x), ref(x), rtol=0, atol=1e-5)


def test_example_inputs_arguments_are_checked() -> None:
    with pytest.raises(PlanningError, match="ExampleInputs needs at least one example call"):
        pp.ExampleInputs()
    calls = pp.ExampleInputs(torch.zeros(1), (torch.zeros(2), torch.zeros(3)))
    assert [len(c) for c in calls.calls] == [1, 2]
    with pytest.raises(PlanningError, match=r"training_pass must be one of \('auto', 'always', "
                       r"'never'\), got 'sometimes'"):
        pp.prunable_groups(Unused(), torch.randn(1, 3, 4, 4), training_pass="sometimes")


class Outputs(NamedTuple):
    logits: torch.Tensor
    aux: torch.Tensor | None


class NamedAux(AuxNet):
    """Like torchvision's Inception3/GoogLeNet: training mode packs both heads in a namedtuple."""

    def forward(self, x: torch.Tensor):
        f = torch.relu(self.stem(x))
        return Outputs(self.head(f), self.aux(f) if self.training else None)


@pytest.mark.parametrize("tracer", ["fx", "record"])
def test_heads_packed_in_a_namedtuple_reach_the_output(tracer: str) -> None:
    torch.manual_seed(0)
    model, x = NamedAux().eval(), torch.randn(2, 3, 8, 8)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    assert next(g for g in groups if g.name == "stem").tensors == [
        "aux.weight", "head.0.weight", "stem.bias", "stem.weight"]
    # the fields of the namedtuple are the model's output: aux and the classifier are left out
    assert [lo.name for lo in groups.left_out] == ["head.3", "aux"]
    plan = pp.plan_pruning(model, {"stem": [4, 9]}, example_inputs=x)
    pruned = pp.apply_plan(copy.deepcopy(model), plan)
    with torch.no_grad():
        got, want = pruned.train()(x), _zeroed(model, "stem", [4, 9]).train()(x)
    torch.testing.assert_close(got.aux, want.aux, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
