"""The peers' criteria (Lp norm, BatchNorm scale, FPGM, LAMP), each against a hand derivation,
and each usable from `plan_from_metric` and the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.nn import functional as F

import pruneplan as pp
from pruneplan.attributions import (
    BNScaleAttributionMetric,
    FPGMAttributionMetric,
    LAMPAttributionMetric,
    LpNormAttributionMetric,
)
from pruneplan.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def linear(rows: list[list[float]]) -> nn.Sequential:
    """A Linear whose unit i has the weights rows[i] (no bias), inside a Sequential."""
    w = torch.tensor(rows)
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    return nn.Sequential(layer)


def metric(cls, model, **kw):
    return cls(model, [], F.cross_entropy, "cpu", progress=False, **kw)


def test_lp_norm_by_hand() -> None:
    model = linear([[3.0, -4.0], [1.0, 1.0], [0.0, -2.0]])
    # p = 2: sqrt(9 + 16) = 5, sqrt(2), 2
    np.testing.assert_allclose(metric(LpNormAttributionMetric, model).run("0"), [5.0, math.sqrt(2), 2.0])
    # p = 1: 7, 2, 2 (the seed's WeightNorm); p = 3: (27 + 64)^(1/3), 2^(1/3), 2; p = inf: 4, 1, 2
    np.testing.assert_allclose(metric(LpNormAttributionMetric, model, p=1).run("0"), [7.0, 2.0, 2.0])
    np.testing.assert_allclose(metric(LpNormAttributionMetric, model, p=3).run("0"),
                               [91 ** (1 / 3), 2 ** (1 / 3), 2.0])
    np.testing.assert_allclose(metric(LpNormAttributionMetric, model, p=math.inf).run("0"), [4.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="p must be a number > 0"):
        metric(LpNormAttributionMetric, model, p=0)


def test_lp_norm_of_a_transposed_conv_uses_axis_1() -> None:
    model = nn.Sequential(nn.ConvTranspose2d(2, 3, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0, 0.0], [2.0, 0.0, 3.0]]).reshape(2, 3, 1, 1))
    # unit j (output channel) = column j: (1, 2), (2, 0), (0, 3)
    np.testing.assert_allclose(metric(LpNormAttributionMetric, model).run("0"), [math.sqrt(5), 2.0, 3.0])


def test_fpgm_by_hand() -> None:
    model = linear([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0], [0.0, 1.0]])
    # pairwise distances: d01 = 5, d02 = 10, d03 = 1, d12 = 5, d13 = sqrt(9 + 9) = sqrt(18),
    # d23 = sqrt(36 + 49) = sqrt(85)
    expected = [5 + 10 + 1, 5 + 5 + math.sqrt(18), 10 + 5 + math.sqrt(85), 1 + math.sqrt(18) + math.sqrt(85)]
    np.testing.assert_allclose(metric(FPGMAttributionMetric, model).run("0"), expected)


def test_lamp_by_hand_with_ties() -> None:
    model = linear([[1.0, 0.0], [2.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    # v = ||w||^2 = 1, 4, 4, 9. Denominators sum v_j over v_j >= v_i: 18, 17, 17, 9
    np.testing.assert_allclose(metric(LAMPAttributionMetric, model).run("0"), [1 / 18, 4 / 17, 4 / 17, 1.0])


def test_bn_scale_by_hand_and_modules_without_batchnorm() -> None:
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 2, 1))
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([0.5, -2.0, 0.1]))
    x = torch.randn(1, 1, 5, 5)
    m = metric(BNScaleAttributionMetric, model, example_inputs=x)
    # conv 0 -> ReLU -> BN: |gamma| = 0.5, 2, 0.1; the BN itself scores the same
    np.testing.assert_allclose(m.run("0"), [0.5, 2.0, 0.1])
    np.testing.assert_allclose(m.run("2"), [0.5, 2.0, 0.1])
    with pytest.raises(ValueError, match="no BatchNorm consumes its output"):
        m.run("3")
    # without example_inputs, the first data batch finds the BatchNorm
    data = [(x, torch.zeros(1, dtype=torch.long))]
    np.testing.assert_allclose(BNScaleAttributionMetric(model, data, F.cross_entropy, "cpu").run("0"),
                               [0.5, 2.0, 0.1])


def slim_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, 0.1, -0.2, 3.0]))
    return model


@pytest.mark.parametrize(("name", "params", "expected"), [
    # conv 0's BN scales 1, 0.1, 0.2, 3: the two smallest go; conv 3 has no BatchNorm: left out
    ("bn_scale", None, {"0": [1, 2]}),
    ("lp_norm", {"p": 2}, None),
    ("fpgm", None, None),
    ("lamp", None, None),
])
def test_new_criteria_from_plan_from_metric(name: str, params: dict | None, expected: dict | None) -> None:
    model = slim_cnn()
    x = torch.randn(2, 1, 4, 4)
    plan = pp.plan_from_metric(model, x, name, 0.5, metric_params=params)
    got = {g.name: g.removed for g in plan.groups}
    if expected is None:  # the two lowest scores of the metric itself, per layer
        cls = getattr(pp.attributions, pp.loading.METRICS[name])
        m = cls(model, [], F.cross_entropy, "cpu", progress=False, **(params or {}))
        expected = {k: sorted(np.argsort(m.run(k), kind="stable")[:2].tolist()) for k in ("0", "3")}
    assert got == expected
    assert plan.provenance.metric == name and plan.provenance.metric_params == ({"p": 2} if params else {})


def test_new_criteria_from_the_cli(tmp_path: Path) -> None:
    spec = f"{ROOT / 'examples' / 'digits.py'}:make_cnn"
    for name, extra in (("lp_norm", ["--p", "1"]), ("bn_scale", []), ("fpgm", []), ("lamp", [])):
        out = tmp_path / f"{name}.json"
        result = CliRunner().invoke(cli, ["plan", "--model", spec, "--input-shape", "1,8,8", "--metric", name,
                                          "--ratio", "0.25", *extra, "-o", str(out)])
        assert result.exit_code == 0, result.output
        plan = pp.PrunePlan.load(out)
        if name == "bn_scale":  # only the two convolutions have a BatchNorm: the Linear is left out
            assert [g.name for g in plan.groups] == ["0", "3"]
            assert "warning: leaving '9' out: module '9' (Linear): no BatchNorm consumes its output" in result.stderr
        else:
            assert [(g.name, len(g.removed)) for g in plan.groups] == [("0", 4), ("3", 8), ("9", 16)]
    # lp_norm with p = 1 is the seed's weight_norm, unit for unit
    p1 = pp.PrunePlan.load(tmp_path / "lp_norm.json")
    wn = tmp_path / "wn.json"
    assert CliRunner().invoke(cli, ["plan", "--model", spec, "--input-shape", "1,8,8", "--metric", "weight_norm",
                                    "--ratio", "0.25", "-o", str(wn)]).exit_code == 0
    assert [g.removed for g in p1.groups] == [g.removed for g in pp.PrunePlan.load(wn).groups]
    assert p1.provenance.metric_params == {"p": 1}
