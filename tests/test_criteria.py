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
    WeightNormAttributionMetric,
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


def test_fpgm_on_a_wide_layer_equals_numpy_pairwise_distances(monkeypatch: pytest.MonkeyPatch) -> None:
    from pruneplan.attributions import fpgm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1100, 260, bias=False))  # 260 x 1100: above the old loop's limit
    with torch.no_grad():
        w = model[0].weight
        w.add_(3.0)  # far from the origin: the Gram form cancels most here
        w[1] = w[0]  # identical rows: distance exactly 0
        w[2] = w[0]
        w[2, 0] += 1e-3  # a close pair: distance 1e-3 (to float32 rounding of w[0, 0] + 1e-3)
        w[5] = w[7] * 1.5
    # small blocks so that the test crosses blocks of rows and chunks of close pairs
    monkeypatch.setattr(fpgm, "_BLOCK", 5000)
    got = metric(FPGMAttributionMetric, model).run("0")
    # independent reference: numpy, exact differences row by row in float64
    a = w.detach().double().numpy()
    dist = np.stack([np.sqrt(((a - a[i]) ** 2).sum(1)) for i in range(len(a))])
    np.testing.assert_allclose(got, dist.sum(1), rtol=1e-12, atol=0)
    assert dist[0, 1] == 0 and 0 < dist[0, 2] < 2e-3
    # the close pair alone: rows 0 and 2 differ only in column 0
    two = linear([a[0].tolist(), a[2].tolist()])
    d02 = abs(a[2, 0] - a[0, 0])
    assert metric(FPGMAttributionMetric, two).run("0").tolist() == [d02, d02]
    # distance_sums directly, three blocks of one row: the same sums
    monkeypatch.setattr(fpgm, "_BLOCK", 3)
    rows = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]], dtype=torch.float64)
    assert fpgm.distance_sums(rows).tolist() == [15.0, 10.0, 15.0]


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


# --- the output axis of every layer kind discovery offers as a root, shared by the data-free
# metrics (pruneplan.attributions._weights.unit_rows) ---

DATA_FREE = (LpNormAttributionMetric, FPGMAttributionMetric, LAMPAttributionMetric)


def _set(module: nn.Module, name: str, values: torch.Tensor) -> None:
    with torch.no_grad():
        getattr(module, name).copy_(values.reshape(getattr(module, name).shape))


def test_conv1d_and_embedding_are_scored_along_their_units() -> None:
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(3, 2)  # weight (in = 2, out = 3): unit j is column j
    _set(conv, "weight", torch.tensor([[3.0, 0.0, 1.0], [4.0, 2.0, 1.0]]))
    emb = nn.Embedding(4, 2)  # weight (vocab = 4, dim = 2): unit j (feature j) is column j
    _set(emb, "weight", torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 2.0], [1.0, 0.0]]))
    model = nn.ModuleDict({"c": conv, "e": emb})
    # columns of conv: (3, 4), (0, 2), (1, 1); of emb: (1, 1, 1, 1), (0, 0, 2, 0)
    np.testing.assert_allclose(metric(LpNormAttributionMetric, model).run("c"), [5.0, 2.0, math.sqrt(2)])
    np.testing.assert_allclose(metric(LpNormAttributionMetric, model).run("e"), [2.0, 2.0])
    np.testing.assert_allclose(metric(WeightNormAttributionMetric, model).run("c"), [7.0, 2.0, 2.0])
    np.testing.assert_allclose(metric(WeightNormAttributionMetric, model).run("e"), [4.0, 2.0])
    # FPGM of conv: d01 = sqrt(9 + 4), d02 = sqrt(4 + 9), d12 = sqrt(1 + 1)
    a, b = math.sqrt(13), math.sqrt(2)
    np.testing.assert_allclose(metric(FPGMAttributionMetric, model).run("c"), [2 * a, a + b, a + b])
    # LAMP of conv: v = 25, 4, 2; denominators 25, 29, 31
    np.testing.assert_allclose(metric(LAMPAttributionMetric, model).run("c"), [1.0, 4 / 29, 2 / 31])


def test_grouped_transposed_conv_rows_per_group() -> None:
    # ConvTranspose2d(4, 4, groups=2): weight (in 4, out/groups 2, 1, 1); output o of group g
    # reads inputs 2g, 2g + 1 at column o % 2
    conv = nn.ConvTranspose2d(4, 4, 1, groups=2, bias=False)
    _set(conv, "weight", torch.tensor([[1.0, 0.0], [1.0, 3.0], [0.0, 2.0], [4.0, 0.0]]))
    # unit 0: (1, 1); unit 1: (0, 3); unit 2: (0, 4); unit 3: (2, 0)
    np.testing.assert_allclose(metric(LpNormAttributionMetric, nn.Sequential(conv)).run("0"),
                               [math.sqrt(2), 3.0, 4.0, 2.0])


def test_rnn_hidden_units_score_their_gate_rows() -> None:
    lstm = nn.LSTM(1, 2, num_layers=2)  # gates 4, hidden 2: unit j owns rows j, 2 + j, 4 + j, 6 + j
    with torch.no_grad():
        for p in lstm.parameters():
            p.zero_()
        lstm.weight_ih_l0[:, 0] = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 2.0])
        lstm.weight_hh_l1[6] = torch.tensor([3.0, 0.0])  # gate 3 of unit 0
        lstm.weight_ih_l1[3] = torch.tensor([0.0, 5.0])  # gate 1 of unit 1
    model = nn.Sequential(lstm)
    # unit 0: 1, 1, 1, 1, 3 -> L2 sqrt(13), L1 7; unit 1: 2, 5 -> L2 sqrt(29), L1 7
    np.testing.assert_allclose(metric(LpNormAttributionMetric, model).run("0"), [math.sqrt(13), math.sqrt(29)])
    np.testing.assert_allclose(metric(WeightNormAttributionMetric, model).run("0"), [7.0, 7.0])
    r = metric(pp.attributions.RandomAttributionMetric, model, seed=0).run("0")  # no data needed
    assert r.shape == (2,)


@pytest.mark.parametrize("cls", DATA_FREE)
def test_data_free_metrics_plan_gpt2_heads_and_lstm(cls, caplog) -> None:
    import logging

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=4, vocab_size=32, n_positions=16)).eval()
    name = {v: k for k, v in pp.loading.METRICS.items()}[cls.__name__]
    with caplog.at_level(logging.WARNING):
        plan = pp.plan_from_metric(gpt, torch.randint(0, 32, (1, 8)), name, 0.5)
    assert "ignoring" not in caplog.text  # every root scored along its units (no axis mismatch)
    got = {g.name: g.removed for g in plan.groups}
    # the heads of the fused c_attn: the mean of each head's 3 * 4 column scores (q, k, v blocks)
    rows = metric(cls, gpt).run("transformer.h.0.attn.c_attn")
    assert rows.shape == (48,)
    heads = [np.mean([rows[b * 16 + h * 4 + i] for b in range(3) for i in range(4)]) for h in range(4)]
    assert got["transformer.h.0.attn.c_attn"] == sorted(np.argsort(heads, kind="stable")[:2].tolist())
    assert len(got["transformer.h.0.mlp.c_fc"]) == 32


class _Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.rnn, self.fc = nn.Embedding(50, 16), nn.LSTM(16, 8, batch_first=True), nn.Linear(8, 3)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        o, _ = self.rnn(self.emb(t))
        return self.fc(o[:, -1])


def test_lstm_roots_scored_data_free_and_left_out_by_data_metrics(caplog) -> None:
    import logging

    torch.manual_seed(0)
    model = _Tagger().eval()
    t = torch.randint(0, 50, (2, 5))
    for name in ("lp_norm", "weight_norm", "fpgm", "lamp", "random"):  # random: no data needed
        plan = pp.plan_from_metric(model, t, name, 0.25, **({"seed": 0} if name == "random" else {}))
        got = {g.name: len(g.removed) for g in plan.groups}
        assert got == {"emb": 4, "rnn": 2}, name
    # lp_norm's pick: the 2 hidden units of the smallest L2 norm of their 4 gate rows (ih and hh)
    w = torch.cat([model.rnn.weight_ih_l0, model.rnn.weight_hh_l0], 1).detach().double()
    norms = w.reshape(4, 8, -1).pow(2).sum((0, 2)).sqrt().numpy()
    plan = pp.plan_from_metric(model, t, "lp_norm", 0.25)
    assert plan.group("rnn").removed == sorted(np.argsort(norms, kind="stable")[:2].tolist())
    # data metrics read the hidden units at the features of the output sequence
    data = [(torch.randint(0, 50, (4, 5)), torch.randint(0, 3, (4,)))]
    groups = pp.prunable_groups(model, t)
    got = pp.loading.score_groups(model, groups, "activation", data=data)
    with torch.no_grad():  # reference: mean over tokens, then over examples, of |o| (N, T, 8)
        ref = model.rnn(model.emb(data[0][0]))[0].abs().mean(1).mean(0).double().numpy()
    np.testing.assert_allclose(got["rnn"], ref, rtol=1e-6)
    assert type(model.rnn) is nn.LSTM and "hidden_output" not in model.rnn._modules  # restored
    plan = pp.plan_from_metric(model, t, "taylor", 0.25, data=data, criterion="cross_entropy")
    assert {g.name: len(g.removed) for g in plan.groups} == {"emb": 4, "rnn": 2}
    # bidirectional: unit j is the mean of feature j of both directions
    bi = _Tagger()
    bi.rnn, bi.fc = nn.LSTM(16, 8, batch_first=True, bidirectional=True), nn.Linear(16, 3)
    got = pp.loading.score_groups(bi, pp.prunable_groups(bi, t), "activation", data=data)
    with torch.no_grad():
        a = bi.rnn(bi.emb(data[0][0]))[0].abs().mean(1).mean(0).double().numpy()
    np.testing.assert_allclose(got["rnn"], (a[:8] + a[8:]) / 2, rtol=1e-6)
    # batch_first=False: the examples are not on axis 0, left out with a warning naming it
    seq = _Tagger()
    seq.rnn = nn.LSTM(16, 8)
    with caplog.at_level(logging.WARNING):
        got = pp.loading.score_groups(seq, pp.prunable_groups(seq, t.T), "activation", data=[(t.T, None)])
    assert sorted(got) == ["emb"]
    assert "leaving 1 recurrent roots out of activation scoring (batch_first=False" in caplog.text
    assert "'rnn'" in caplog.text


class _BNAct(nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: a BatchNorm2d subclass with children, calling F.batch_norm."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(y)


class _FunctionalNorm(nn.Module):
    """Not a BatchNorm: normalises with F.batch_norm and its own scale ``gain``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(c))
        self.register_buffer("mean", torch.zeros(c))
        self.register_buffer("var", torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.mean, self.var, weight=self.gain)


def test_bn_scale_finds_batchnorm_subclasses_and_functional_batch_norm() -> None:
    model = nn.Sequential(nn.Conv2d(1, 3, 1), _BNAct(3), nn.Conv2d(3, 2, 1), nn.SiLU(), _FunctionalNorm(2),
                          nn.Conv2d(2, 2, 1))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, -2.0, 0.1]))
        model[4].gain.copy_(torch.tensor([-3.0, 0.25]))
    m = metric(BNScaleAttributionMetric, model, example_inputs=torch.randn(1, 1, 4, 4))
    np.testing.assert_allclose(m.run("0"), [0.5, 2.0, 0.1])  # |gamma| of the subclass
    np.testing.assert_allclose(m.run("2"), [3.0, 0.25])  # through SiLU to F.batch_norm's weight
    with pytest.raises(ValueError, match="no BatchNorm consumes its output"):
        m.run("5")
    assert F.batch_norm is torch.nn.functional.batch_norm and F.batch_norm.__name__ == "batch_norm"
    # the plan: conv 0 loses its unit of the smallest |gamma| (2: 0.1), conv 2 its unit 1 (0.25)
    plan = pp.plan_from_metric(model, torch.randn(1, 1, 4, 4), "bn_scale", 0.5)  # 1 unit each
    assert {g.name: g.removed for g in plan.groups} == {"0": [2], "2": [1]}


def test_bn_scale_on_timm_batchnormact() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", num_classes=10).eval()
    with torch.no_grad():
        model.bn1.weight.copy_(torch.linspace(-1.0, 1.0, model.bn1.weight.numel()))
    m = metric(BNScaleAttributionMetric, model, example_inputs=torch.randn(1, 3, 32, 32))
    # conv_stem feeds bn1 (timm's BatchNormAct2d): its scores are |bn1.weight|
    np.testing.assert_allclose(m.run("conv_stem"), torch.linspace(-1.0, 1.0, 16).abs().double().numpy())


def test_cli_plans_an_lstm_with_data_free_metrics(tmp_path: Path) -> None:
    src = tmp_path / "tagger.py"
    src.write_text("import torch\nfrom torch import nn\n"
                   "class T(nn.Module):\n"
                   "    def __init__(self):\n"
                   "        super().__init__(); torch.manual_seed(0)\n"
                   "        self.emb, self.rnn, self.fc = nn.Embedding(50, 16), nn.GRU(16, 8, batch_first=True), "
                   "nn.Linear(8, 3)\n"
                   "    def forward(self, t):\n"
                   "        return self.fc(self.rnn(self.emb(t))[0][:, -1])\n"
                   "def make():\n    return T()\n")
    for name in ("random", "lp_norm"):  # random: no data needed for the GRU's hidden units
        out = tmp_path / f"{name}.json"
        result = CliRunner().invoke(cli, ["plan", "--model", f"{src}:make", "--input-shape", "5", "--input-dtype",
                                          "long", "--metric", name, "--ratio", "0.25", "-o", str(out)])
        assert result.exit_code == 0, result.output
        assert "error" not in result.stderr and "ignoring" not in result.stderr
        # 16 embedding features and 8 hidden units, a quarter of each
        assert [(g.name, len(g.removed)) for g in pp.PrunePlan.load(out).groups] == [("emb", 4), ("rnn", 2)]


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


def test_mha_heads_score_the_mean_of_their_out_proj_columns() -> None:
    model = _Attn().eval()
    with torch.no_grad():  # out_proj columns 0..3: head 0 owns columns 0, 1; head 1 columns 2, 3
        model.mha.out_proj.weight.copy_(torch.tensor([[3.0, 1.0, 0.0, 2.0], [4.0, 0.0, 1.0, 0.0],
                                                      [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    x = torch.randn(1, 3, 4)
    groups = [g for g in pp.prunable_groups(model, x) if g.kind == "heads"]
    got = pp.loading.score_groups(model, groups, "lp_norm")
    # column L2 norms 5, 1, 1, 2: head 0 (5 + 1) / 2 = 3, head 1 (1 + 2) / 2 = 1.5
    np.testing.assert_allclose(got["mha"], [3.0, 1.5])


class _Packed(_Tagger):
    def forward(self, t: torch.Tensor) -> torch.Tensor:
        from torch.nn.utils.rnn import pack_padded_sequence

        packed = pack_padded_sequence(self.emb(t), torch.full((t.shape[0],), t.shape[1]), batch_first=True)
        return self.fc(self.rnn(packed)[1][0][-1])


def test_lstm_fed_a_packed_sequence_is_left_out_of_data_scoring(caplog) -> None:
    import logging

    model = _Packed().eval()
    t = torch.randint(0, 50, (2, 5))
    groups = pp.prunable_groups(model, t, on_unsupported="skip")  # packing: only the LSTM's group
    assert [g.name for g in groups] == ["rnn"]
    data = [(torch.randint(0, 50, (4, 5)), torch.randint(0, 3, (4,)))]
    with caplog.at_level(logging.WARNING):
        assert pp.loading.score_groups(model, groups, "activation", data=data) == {}
    assert "leaving 1 recurrent roots out of activation scoring (their output sequence was not" in caplog.text
    assert type(model.rnn) is nn.LSTM and "hidden_output" not in model.rnn._modules  # restored
    assert sorted(pp.loading.score_groups(model, groups, "lp_norm")) == ["rnn"]  # data-free: scored
