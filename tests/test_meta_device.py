"""Models on the ``meta`` device (shapes, no data): discovery, random plans and applying a plan
work; what needs the weights' numbers (the content check, scoring metrics) says so."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

import pruneplan as pp
from pruneplan.errors import WeightsContentWarning


def cnn(device: str = "cpu") -> nn.Sequential:
    torch.manual_seed(0)
    with torch.device(device):
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).eval()


X = torch.randn(2, 3, 8, 8)
# the model's state dict: 2 conv (weight, bias), BN (weight, bias, running_mean, running_var,
# num_batches_tracked), Linear (weight, bias) = 11 tensors
NO_DATA = "model: 11 of its 11 tensors are on the meta device ('0.weight', '0.bias', '1.weight', ...) and hold no data"


def test_apply_plan_on_meta_skips_the_content_check_with_one_line(caplog: pytest.LogCaptureFixture) -> None:
    plan = pp.plan_from_metric(cnn(), X, "lp_norm", 0.5)
    assert plan.provenance.weights_digest is not None  # so the default "warn" would hash the model
    live = pp.apply_plan(cnn(), plan)
    meta = cnn("meta")
    with caplog.at_level(logging.WARNING, logger="pruneplan"), warnings.catch_warnings():
        warnings.simplefilter("error", WeightsContentWarning)
        pp.apply_plan(meta, plan)
    # the shapes are those of the plan applied to real weights (conv 0: 8 -> 4, conv 3: 6 -> 3)
    assert {k: tuple(v.shape) for k, v in meta.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in live.state_dict().items()}
    assert meta[0].weight.shape == (4, 3, 3, 3) and meta[3].weight.shape == (3, 4, 3, 3)
    assert [r.getMessage() for r in caplog.records] == [
        NO_DATA + ", so their content cannot be compared with the weights the plan was scored on: the "
        "content check is skipped (check_content='off' skips it without this message)"]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pruneplan"):
        pp.apply_plan(cnn("meta"), plan, check_content="off")
    assert caplog.records == []

    untouched = cnn("meta")
    with pytest.raises(pp.PlanMismatchError) as err:
        pp.apply_plan(untouched, plan, check_content="error")
    assert str(err.value) == (NO_DATA + ", so their content cannot be compared with the weights the "
                              "plan was scored on; pass check_content='off' to prune the shapes alone")
    assert untouched[0].weight.shape == (8, 3, 3, 3)  # refused before any change


def test_plan_from_metric_on_meta_names_the_device() -> None:
    for metric, kw in (("lp_norm", {}), ("fpgm", {}), ("taylor", {"data": [(X, torch.zeros(2, dtype=torch.long))]})):
        with pytest.raises(pp.PlanningError) as err:
            pp.plan_from_metric(cnn("meta"), X.to("meta"), metric, 0.5, **kw)
        assert str(err.value) == (
            NO_DATA + f": metric {metric!r} scores the weights or the outputs they compute, so load "
            "the weights first (prunable_groups and the 'random' metric work on the meta device)")


def test_discovery_and_random_plans_work_on_meta() -> None:
    real, meta = cnn(), cnn("meta")
    assert [g.name for g in pp.prunable_groups(meta, X.to("meta"))] == \
        [g.name for g in pp.prunable_groups(real, X)] == ["0", "3"]
    # the random metric reads no weight: the same plan, but no content digest to record
    a = pp.plan_from_metric(real, X, "random", 0.5, seed=3)
    b = pp.plan_from_metric(meta, X.to("meta"), "random", 0.5, seed=3)
    assert [(g.name, g.removed) for g in b.groups] == [(g.name, g.removed) for g in a.groups]
    assert [len(g.removed) for g in b.groups] == [4, 3]
    assert a.provenance.weights_digest is not None and b.provenance.weights_digest is None
    with pytest.raises(ValueError) as err:
        pp.weights_digest(meta)
    assert str(err.value) == "tensor '0.weight' is on the meta device: it holds no data to digest"
