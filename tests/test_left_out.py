"""Nothing silent: every root discovery leaves out comes back with its reason (issue 11, item 7)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_discover import UnknownOp
from torch import nn

import pruneplan as pp
from pruneplan.cli import cli
from pruneplan.errors import PlanningError, UnsupportedOperationError
from pruneplan.graph.discover import left_out_summary
from pruneplan.graph.spec import GroupList, LeftOut

OUTPUT = "its units reach the model output (include_output=True allows pruning it)"
UNKNOWN = ("operation 'sort' in module 'mix' is not an operation pruneplan knows how to follow "
          "(it does not return one tensor) (channels of 'body.0')")


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()


def test_result_is_a_list_with_the_classifier_left_out_and_why() -> None:
    groups = pp.prunable_groups(_mlp(), torch.randn(2, 4))
    assert isinstance(groups, list) and isinstance(groups, GroupList)
    assert [g.name for g in groups] == ["0"]
    assert groups == [groups[0]]  # still compares as a plain list
    assert groups.left_out == [LeftOut("2", OUTPUT)]
    # include_output=True offers it: nothing is left out
    both = pp.prunable_groups(_mlp(), torch.randn(2, 4), include_output=True)
    assert [g.name for g in both] == ["0", "2"] and both.left_out == []


@pytest.mark.parametrize("tracer", ["fx", "record"])
def test_blocked_and_coupled_roots_each_carry_a_reason(tracer: str) -> None:
    # body.0 feeds sort (no rule; its tuple output cannot be examined); head + side2 are
    # summed into the output
    groups = pp.prunable_groups(UnknownOp().eval(), torch.randn(1, 3, 8, 8), tracer=tracer,
                                on_unsupported="skip")
    assert [g.name for g in groups] == ["side"]
    assert groups.left_out == [
        LeftOut("body.0", UNKNOWN),
        LeftOut("head", f"{OUTPUT} (coupled with 'side2')"),
        LeftOut("side2", f"{OUTPUT} (coupled with 'head')"),
    ]


def test_plan_pruning_takes_on_unsupported_and_names_the_reason() -> None:
    model, x = UnknownOp().eval(), torch.randn(1, 3, 8, 8)
    with pytest.raises(UnsupportedOperationError, match="'sort' in module 'mix'"):
        pp.plan_pruning(model, {"side": [0]}, example_inputs=x)
    plan = pp.plan_pruning(model, {"side": [0, 5]}, example_inputs=x, on_unsupported="skip")
    assert [(g.name, g.removed) for g in plan.groups] == [("side", [0, 5])]
    with pytest.raises(PlanningError) as err:
        pp.plan_pruning(model, {"body.0": [0]}, example_inputs=x, on_unsupported="skip")
    assert str(err.value) == f"'body.0' is not prunable: {UNKNOWN}"
    with pytest.raises(PlanningError, match="on_unsupported must be 'error' or 'skip', got 'x'"):
        pp.plan_pruning(model, {"side": [0]}, example_inputs=x, on_unsupported="x")


def test_groups_command_prints_groups_then_left_out_roots() -> None:
    spec = f"{Path(__file__).resolve().parents[1] / 'examples' / 'digits.py'}:make_cnn"
    result = CliRunner().invoke(cli, ["groups", "--model", spec, "--input-shape", "1,8,8"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    # the table of test_cli_plan, then the 10-way classifier (module 11) with its reason
    assert [line.split()[0] for line in lines[:4]] == ["group", "0", "3", "9"]
    assert lines[4:] == ["left out (1 roots):", f"  11: {OUTPUT}"]


def test_plan_from_metric_logs_one_info_line_with_the_left_out_roots(
        caplog: pytest.LogCaptureFixture) -> None:
    model = UnknownOp().eval()
    model.mix = nn.Identity()  # now everything traces: body.0 and side are groups
    with caplog.at_level(logging.INFO, logger="pruneplan.loading"):
        pp.plan_from_metric(model, torch.randn(1, 3, 8, 8), "weight_norm", 0.5)
    lines = [r.getMessage() for r in caplog.records if r.name == "pruneplan.loading"]
    # roots: body.0, head, side, side2; head and side2 reach the output
    assert lines == [
        "planning from weight_norm: 2 of 4 roots left out: "
        f"'head': {OUTPUT} (coupled with 'side2'); 'side2': {OUTPUT} (coupled with 'head')"
    ]


def test_summary_shows_three_reasons_then_a_count() -> None:
    groups = GroupList([], [LeftOut(str(i), "r") for i in range(5)])
    assert left_out_summary(groups) == (
        "5 of 5 roots left out: '0': r; '1': r; '2': r; and 2 more")
    assert left_out_summary(GroupList()) == "no roots left out (0 roots in 0 groups)"


class _StdConv(nn.Conv2d):
    """Weight standardisation as timm's ScaledStdConv2d does it: the weight goes through
    F.batch_norm over its fan-in, and F.conv2d runs with the result, not with the weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.nn.functional.batch_norm(self.weight.reshape(1, self.out_channels, -1), None,
                                           None, training=True, momentum=0.0, eps=1e-5)
        return torch.nn.functional.conv2d(x, w.reshape_as(self.weight), self.bias)


def test_a_layer_whose_weight_is_transformed_before_use_is_left_out_by_name() -> None:
    # '2' runs, but no conv2d call uses its weight as its own: it is neither a group's root nor
    # silently dropped; '0' feeds it and is blocked at that conv2d; '4' reaches the output
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), _StdConv(8, 8, 3), nn.ReLU(),
                          nn.Conv2d(8, 4, 3)).eval()
    groups = pp.prunable_groups(model, torch.randn(1, 3, 16, 16))
    assert list(groups) == []
    reasons = {lo.name: lo.reason for lo in groups.left_out}
    assert sorted(reasons) == ["0", "2", "4"]
    assert reasons["2"] == (
        "this _StdConv ran, but no call discovery recognises used its weight as the layer's own "
        "(it is transformed first, e.g. by weight standardisation, or read by code no rule "
        "describes); register a rule for _StdConv (pruneplan.register_module_rule) to prune it")
    assert reasons["0"] == "they reach operation 'conv2d' in module '2'"


# ---- a plan that removes nothing because every root is left out (trial finding F-empty-plan) ----

STD = ("this _StdConv ran, but no call discovery recognises used its weight as the layer's own "
       "(it is transformed first, e.g. by weight standardisation, or read by code no rule "
       "describes); register a rule for _StdConv (pruneplan.register_module_rule) to prune it")
# roots '2' and '4' (weight standardised: the most frequent reason, first), '0' (blocked at the
# conv2d of '2'), '6' (the output): 4 roots, 3 reasons; the first 2 reasons are shown
NOTHING = ("the plan removes nothing: no prunable group: discovery left out all 4 roots: "
           f"2 roots ('2', ...): {STD}; 1 root ('0'): they reach operation 'conv2d' in module '2'; "
           "1 more for 1 other reason (prunable_groups(...).left_out, or `pruneplan groups`, lists "
           "every root with its reason)")


def _all_left_out() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), _StdConv(8, 8, 3), nn.ReLU(),
                         _StdConv(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_plan_with_every_root_left_out_warns_with_the_count_and_the_top_reasons(
        caplog: pytest.LogCaptureFixture) -> None:
    x = torch.randn(1, 3, 16, 16)
    with caplog.at_level(logging.INFO, logger="pruneplan"):
        plan = pp.plan_from_metric(_all_left_out(), x, "lp_norm", 0.3)
    assert plan.groups == [] and _warnings(caplog) == [NOTHING]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pruneplan"):
        plan = pp.plan_from_metric(_all_left_out(), x, "lp_norm", target={"params": 0.2})
    assert plan.groups == [] and plan.provenance.selection["achieved"] == {"params": 0.0}
    assert _warnings(caplog) == [
        NOTHING, "target not met: removes 0.00% of the parameters, 20.00% asked: no prunable group"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pruneplan"):  # nothing asked: nothing to tell
        pp.plan_from_metric(_all_left_out(), x, "lp_norm", 0.0)
    assert _warnings(caplog) == []


MODEL_FILE = '''
import torch
from torch import nn


class _StdConv(nn.Conv2d):
    def forward(self, x):
        w = torch.nn.functional.batch_norm(self.weight.reshape(1, self.out_channels, -1), None,
                                           None, training=True, momentum=0.0, eps=1e-5)
        return torch.nn.functional.conv2d(x, w.reshape_as(self.weight), self.bias)


def make():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), _StdConv(8, 8, 3), nn.ReLU(),
                         _StdConv(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
'''


def test_cli_plan_with_every_root_left_out_warns_and_says_nothing_is_removed(tmp_path: Path) -> None:
    (tmp_path / "stdnet.py").write_text(MODEL_FILE)
    out = tmp_path / "p.json"
    result = CliRunner().invoke(cli, ["plan", "--model", f"{tmp_path / 'stdnet.py'}:make",
                                      "--input-shape", "3,16,16", "--metric", "lp_norm",
                                      "--ratio", "0.3", "-o", str(out)])
    # a warning, not an error (README "Reliability"): the plan is written, exit 0
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [f"warning: {NOTHING}"]
    lines = result.stdout.splitlines()
    assert lines[0] == f"wrote {out}: 0 groups, 0 units removed, digest {pp.PrunePlan.load(out).digest()[:12]}"
    assert lines[1] == ("requested ratio 0.3 (scope layer): no prunable group was considered, so "
                        "nothing is removed (the warning says why; `pruneplan groups` lists every "
                        "root left out with its reason)")


def test_a_ratio_too_small_for_any_group_warns_that_it_floors_to_nothing(
        caplog: pytest.LogCaptureFixture) -> None:
    # groups '0' (8 units) and '2' (4 units); '5' is the output. floor(0.05 * 8) = floor(0.05 * 4) = 0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    with caplog.at_level(logging.INFO, logger="pruneplan"):
        plan = pp.plan_from_metric(model, x, "lp_norm", 0.05)
    assert plan.groups == [] and _warnings(caplog) == [
        "the plan removes nothing: the ratios asked floor to 0 units in each of the 2 groups "
        "considered (the largest has 8 units: a ratio below 1/8 removes none of it)"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pruneplan"):  # globally: floor(0.05 * 12) = 0
        pp.plan_from_metric(model, x, "lp_norm", 0.05, scope="global")
    assert _warnings(caplog) == [
        "the plan removes nothing: the ratios asked floor to 0 units of each kind's units (scope "
        "'global': 12 units in 2 groups)"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pruneplan"):  # floor(0.125 * 8) = 1: no warning
        assert [len(g.removed) for g in pp.plan_from_metric(model, x, "lp_norm", 0.125).groups] == [1]
    assert _warnings(caplog) == []


class StackedExperts(nn.Module):
    """A mixture-of-experts MLP stored as transformers 5 stores one: a ``[experts, out, in]``
    tensor per projection, applied with a batched matmul (every token through every expert,
    averaged: the routing does not matter here)."""

    def __init__(self, experts: int = 3, hidden: int = 4, width: int = 5) -> None:
        super().__init__()
        self.up = nn.Parameter(torch.randn(experts, width, hidden))
        self.down = nn.Parameter(torch.randn(experts, hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(torch.einsum("ewh,bh->ebw", self.up, x))
        return torch.einsum("ehw,ebw->bh", self.down, h) / self.up.shape[0]


class WithExperts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.experts, self.out = nn.Linear(3, 4), StackedExperts(), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.experts(self.inp(x)))


def test_stacked_expert_weights_no_rule_describes_are_named_with_the_remedy() -> None:
    groups = pp.prunable_groups(WithExperts().eval(), torch.randn(2, 3), on_unsupported="skip")
    # the experts' width (5) is no root, and they read inp's 4 channels on an einsum index it
    # sums over, so inp is left out too; the experts themselves are named, not passed over
    reasons = {lo.name: lo.reason for lo in groups.left_out}
    assert reasons["experts"] == (
        "this StackedExperts holds stacked weights (up [3, 5, 4], down [3, 4, 5]) that no rule "
        "describes, so their widths are not offered; register a rule for StackedExperts "
        "(pruneplan.register_module_rule) to prune them")
    assert list(groups) == []


def test_tables_and_per_head_scales_are_no_stacked_weights() -> None:
    # a per-head (heads, 1, 1) temperature (edgenext's cross-covariance attention) is no stack:
    # fewer than three axes longer than 1; no group slices it here, yet it is not named
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.temperature = nn.Parameter(torch.tensor([1.0, 2.0]).reshape(2, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (torch.stack([x, -x]) * self.temperature).sum(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.scale, self.out = nn.Linear(4, 4), Scale(), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.scale(self.fc(x)))

    groups = pp.prunable_groups(Net().eval(), torch.randn(3, 4), on_unsupported="skip")
    assert not any(s.tensor == "scale.temperature" for g in groups for s in g.slices)
    assert "scale" not in {lo.name for lo in groups.left_out}
