"""Target-driven pruning, steps, per-kind and per-layer ratios, exclusion (API and CLI)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

import pruneplan as pp
from pruneplan.cli import _requested_line, cli

ROOT = Path(__file__).resolve().parents[1]
MODEL = f"{ROOT / 'examples' / 'digits.py'}:make_cnn"


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                         nn.Flatten(), nn.Linear(12 * 16, 6), nn.ReLU(), nn.Linear(6, 3))


def one_unit_worth(model: nn.Module, x: torch.Tensor) -> int:
    """The most MACs removing one more unit of any group of ``model`` saves."""
    base = pp.count(model, x).macs
    worth = 0
    for g in pp.prunable_groups(model, x):
        one = pp.plan_pruning(model, {g.name: [0]}, example_inputs=x)
        worth = max(worth, base - pp.count(pp.apply_plan(copy.deepcopy(model), one), x).macs)
    return worth


def test_mac_target_is_met_within_one_unit() -> None:
    model, x = cnn(), torch.randn(1, 3, 4, 4)
    base = pp.count(model, x).macs
    plan = pp.plan_from_metric(model, x, "weight_norm", target={"macs": 0.5})
    pruned = pp.apply_plan(copy.deepcopy(model), plan)
    left = pp.count(pruned, x).macs
    goal = base * 0.5
    assert left <= goal  # met
    assert goal - left < one_unit_worth(pruned, x)  # not by more than one unit's worth
    sel = plan.provenance.selection
    assert sel["target"] == {"macs": 0.5} and sel["achieved"] == {"macs": round(1 - left / base, 6)}
    assert sel["scope"] == "global"


def test_params_target_in_two_steps_composes_the_step_plans() -> None:
    model, x = cnn(), torch.randn(1, 3, 4, 4)
    base = pp.count(model, x, macs=False).params
    plan = pp.plan_from_metric(model, x, "lp_norm", target={"params": 0.4}, n_steps=2)
    pruned = pp.apply_plan(copy.deepcopy(model), plan)  # one composed plan, relative to the original
    left = pp.count(pruned, x, macs=False).params
    assert left <= 0.6 * base
    assert plan.provenance.selection["n_steps"] == 2
    assert plan.provenance.weights_digest == pp.weights_digest(model)
    assert [g.order for g in plan.groups] == sorted(g.order for g in plan.groups)


def test_a_target_that_cannot_be_met_warns(caplog: pytest.LogCaptureFixture) -> None:
    model, x = cnn(), torch.randn(1, 3, 4, 4)
    plan = pp.plan_from_metric(model, x, "weight_norm", target={"macs": 0.99})
    # every group keeps one unit: 1 + 1 + 1 units left
    assert [g.size - len(g.removed) for g in plan.groups] == [1, 1, 1]
    assert "target not met" in caplog.text


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"target": {"flops": 0.5}}, "target 'flops' is not one of"),
    ({"target": {"macs": 1.0}}, r"must be a fraction in \(0, 1\)"),
    ({"target": {"macs": 0.5}, "scope": "layer"}, "scope must be 'global'"),
    ({"ratio": 0.5, "target": {"macs": 0.5}}, "either a target or ratios"),
    ({"ratio": 0.5, "n_steps": 0}, "n_steps must be a positive integer"),
    ({"ratio": 0.5, "scope": "global", "layer_ratios": {"0": 0.1}}, "layer_ratios need scope='layer'"),
    ({"ratio": 0.5, "layer_ratios": {"nope*": 0.1}}, "pattern 'nope\\*' matches no prunable group"),
    ({"ratio": 0.5, "exclude": ["*"]}, "leaves no group to prune"),
    # a typo'd exclude used to warn and prune the group anyway; now refused like layer_ratios
    ({"ratio": 0.5, "exclude": ["conv_1"]}, r"^exclude pattern 'conv_1' matches no prunable group$"),
    ({"ratio": 0.5, "exclude": ["7", "3x"]},
     r"^exclude pattern '3x' matches no prunable group; did you mean '3'\?$"),
    ({"ratio": 0.5, "layer_ratios": {"07": 0.1}},
     r"^layer_ratios pattern '07' matches no prunable group; did you mean '7', '0'\?$"),  # difflib: equal scores, larger name first
])
def test_bad_target_and_ratio_combinations(kwargs: dict, message: str) -> None:
    ratio = kwargs.pop("ratio", None)
    with pytest.raises(pp.PlanningError, match=message):
        pp.plan_from_metric(cnn(), torch.randn(1, 3, 4, 4), "weight_norm", ratio, **kwargs)


def test_per_layer_and_per_kind_ratios_and_exclusion() -> None:
    model, x = cnn(), torch.randn(1, 3, 4, 4)
    plan = pp.plan_from_metric(model, x, "weight_norm", 0.5, layer_ratios={"3": 0.25}, exclude=["7"])
    # group 0: floor(0.5 * 8) = 4; group 3: floor(0.25 * 12) = 3; group 7 excluded
    assert [(g.name, len(g.removed)) for g in plan.groups] == [("0", 4), ("3", 3)]
    # "9" (the classifier) is a root discovery leaves out: excluding it is allowed, changes nothing
    same = pp.plan_from_metric(model, x, "weight_norm", 0.5, layer_ratios={"3": 0.25}, exclude=["7", "9"])
    assert [(g.name, g.removed) for g in same.groups] == [(g.name, g.removed) for g in plan.groups]
    # a kind ratio applies to every group of that kind (all are "channels" here)
    by_kind = pp.plan_from_metric(model, x, "weight_norm", 0.1, kind_ratios={"channels": 0.5})
    assert [(g.name, len(g.removed)) for g in by_kind.groups] == [("0", 4), ("3", 6), ("7", 3)]


def test_cli_target_exclude_and_ratios(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    save_file(pp.loading.load_model(MODEL).state_dict(), str(weights))
    base = ["plan", "--model", MODEL, "--weights", str(weights), "--input-shape", "1,8,8", "--metric", "weight_norm"]
    out = tmp_path / "t.json"
    result = CliRunner().invoke(cli, [*base, "--target-macs", "0.5", "-o", str(out)])
    assert result.exit_code == 0, result.output
    plan = pp.PrunePlan.load(out)
    achieved = plan.provenance.selection["achieved"]["macs"]
    assert achieved >= 0.5
    assert f"target: remove 50.0% of the macs; achieved {achieved:.2%}" in result.output
    # make_cnn on one 8x8 image: conv0 64*16*9 = 9216, conv3 64*32*144 = 294912,
    # fc 512*64 = 32768, out 64*10 = 640 -> 337,536 MACs before
    assert "MACs: 337,536 -> " in result.output
    # the CLI's target plan is the library's
    model = pp.loading.load_model(MODEL, weights)
    lib = pp.plan_from_metric(model, pp.loading.example_input((1, 8, 8), batch_size=2), "weight_norm",
                              target={"macs": 0.5})
    assert lib.to_json() == out.read_text()

    out2 = tmp_path / "r.json"
    result = CliRunner().invoke(cli, [*base, "--ratio", "0.5", "--exclude", "0*", "--layer-ratio", "3=0.25",
                                      "-o", str(out2)])
    assert result.exit_code == 0, result.output
    # group 0 excluded; 3: floor(0.25 * 32) = 8; 9: floor(0.5 * 64) = 32
    assert [(g.name, len(g.removed)) for g in pp.PrunePlan.load(out2).groups] == [("3", 8), ("9", 32)]
    typo = CliRunner().invoke(cli, [*base, "--ratio", "0.5", "--exclude", "conv_1", "-o", str(tmp_path / "x.json")])
    assert typo.exit_code == 1 and typo.output == "error: exclude pattern 'conv_1' matches no prunable group\n"
    assert not (tmp_path / "x.json").exists()
    bad = CliRunner().invoke(cli, [*base, "--ratio", "0.5", "--layer-ratio", "3", "-o", str(out2)])
    assert bad.exit_code == 2 and "expected NAME=FRACTION" in bad.output
    both = CliRunner().invoke(cli, [*base, "--ratio", "0.5", "--target-macs", "0.5", "-o", str(out2)])
    assert both.exit_code == 2


def test_cli_device_and_progress_bar(tmp_path: Path) -> None:
    data = f"{ROOT / 'examples' / 'digits.py'}:attribution_batches"
    args = ["plan", "--model", MODEL, "--input-shape", "1,8,8", "--metric", "taylor", "--data", data,
            "--ratio", "0.5", "--device", "cpu", "--max-batches", "2"]
    quiet = CliRunner().invoke(cli, [*args, "--no-progress", "-o", str(tmp_path / "a.json")])
    loud = CliRunner().invoke(cli, [*args, "--progress", "-o", str(tmp_path / "b.json")])
    assert quiet.exit_code == loud.exit_code == 0, loud.output
    assert "TaylorAttributionMetric" not in quiet.stderr and "TaylorAttributionMetric" in loud.stderr
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_kind_ratio_on_attention_heads_of_a_real_transformer() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    plan = pp.plan_from_metric(model, (ids,), "lp_norm", 0.25, kind_ratios={"heads": 0.5})
    kinds = {g.name: g.kind for g in pp.prunable_groups(model, (ids,))}
    for layer in (0, 1):
        p = f"model.layers.{layer}.self_attn."
        assert kinds[p + "q_proj"] == "heads"
        # a head is 16 rows of q, k and v: its score is the mean L2 norm of its rows in each
        # projection, averaged over the three; the two lowest of the four heads go (0.5 * 4)
        norms = [model.get_submodule(p + n).weight.detach().norm(dim=1).reshape(4, 16).mean(1)
                 for n in ("q_proj", "k_proj", "v_proj")]
        head_scores = torch.stack(norms).double().mean(0)
        assert plan.group(p + "q_proj").removed == sorted(torch.argsort(head_scores)[:2].tolist())
    # channel groups keep the plain ratio: the MLP (128 units) loses floor(0.25 * 128) = 32
    mlp = [g for g in plan.groups if kinds[g.name] == "channels" and g.size == 128]
    assert mlp and all(len(g.removed) == 32 for g in mlp)
    pruned = pp.apply_plan(copy.deepcopy(model), plan)
    with torch.no_grad():
        assert pruned(ids).logits.shape == (2, 8, 128)


def test_a_ratio_in_steps_ends_at_the_asked_counts() -> None:
    model, x = cnn(), torch.randn(1, 3, 4, 4)
    plan = pp.plan_from_metric(model, x, "weight_norm", 0.5, n_steps=2)
    # step 1 removes floor(0.5 * n / 2) of each group, step 2 the rest of floor(0.5 * n):
    # 8 -> 2 then 4 in all; 12 -> 3 then 6; 6 -> 1 then 3 (the same counts as in one step)
    assert [(g.name, len(g.removed)) for g in plan.groups] == [("0", 4), ("3", 6), ("7", 3)]
    assert plan.provenance.selection["n_steps"] == 2
    assert plan.provenance.selection["achieved_fraction"] == plan.provenance.selection["requested_fraction"]
    pruned = pp.apply_plan(copy.deepcopy(model), plan)
    assert pruned(x).shape == (1, 3)
    # globally: floor(0.5 * 26) = 13 units in all
    glob = pp.plan_from_metric(model, x, "weight_norm", 0.5, n_steps=3, scope="global")
    assert sum(len(g.removed) for g in glob.groups) == 13


def test_groups_without_scores_are_named_and_the_request_says_of_what(caplog) -> None:
    class Rnn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.rnn, self.fc = nn.Embedding(50, 16), nn.LSTM(16, 32), nn.Linear(32, 3)

        def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B, T) ids -> (T, B, 16) -> last step
            return self.fc(self.rnn(self.emb(t).transpose(0, 1))[0][-1])

    torch.manual_seed(0)
    model, x = Rnn().eval(), torch.randint(0, 50, (4, 6))
    data = [(x, torch.randint(0, 3, (4,)))]
    with caplog.at_level(logging.WARNING, logger="pruneplan.loading"):
        plan = pp.plan_from_metric(model, x, "taylor", 0.5, data=data)
    # taylor cannot score a batch_first=False LSTM: only emb's 16 units are scored, floor(0.5 * 16)
    # = 8 asked and removed, of the 16 + 32 = 48 units of the groups considered
    sel = plan.provenance.selection
    assert (sel["ratio"], sel["units"], sel["requested_units"], sel["unscored_groups"]) == (0.5, 48, 8, ["rnn"])
    assert [(g.name, len(g.removed)) for g in plan.groups] == [("emb", 8)]
    assert "1 groups have no scores from taylor and keep their units: rnn" in caplog.text
    assert _requested_line(sel) == (
        "requested ratio 0.5 (scope layer): 8 units after flooring per group (16.7% of the 48 units of "
        "the groups considered); removed 8 (16.7%; round_to=1, min_keep=1); 1 groups have no scores "
        "and keep their units: rnn")


def test_requested_line_of_a_plan_without_unit_counts() -> None:
    # plans made before "units" was recorded keep a line that says what the fractions are of
    sel = {"ratio": 0.3, "scope": "global", "requested_fraction": 0.295, "achieved_fraction": 0.25}
    assert _requested_line(sel) == ("requested ratio 0.3 (scope global): 29.5% of the units of the groups "
                                    "considered, achieved 25.0%")
    kinds = {"ratio": 0.0, "kind_ratios": {"channels": 0.3, "heads": 0.25}, "scope": "layer", "units": 200,
             "requested_units": 58, "requested_fraction": 0.29, "achieved_fraction": 0.2}
    assert _requested_line(kinds) == (
        "requested channels=0.3, heads=0.25 (scope layer): 58 units after flooring per group (29.0% of the "
        "200 units of the groups considered); removed 40 (20.0%; round_to=1, min_keep=1)")


def test_an_unreachable_params_target_names_the_floors_and_what_no_group_slices(caplog) -> None:
    model, x = cnn(), torch.randn(1, 3, 4, 4)
    with caplog.at_level(logging.WARNING, logger="pruneplan"):
        plan = pp.plan_from_metric(model, x, "weight_norm", target={"params": 0.99}, exclude=["7"])
    # groups 0 (8 units) and 3 (12) keep one unit each. Parameters by hand: conv 0: 8*3*9 + 8,
    # BN 16, conv 3: 12*8*9 + 12, BN 24, fc 7: 6*192 + 6, fc 9: 3*6 + 3: 224 + 16 + 876 + 24
    # + 1158 + 21 = 2319. With group 7
    # excluded, no group slices 7.bias (6), 9.weight (18) or 9.bias (3): 27
    assert [g.size - len(g.removed) for g in plan.groups] == [1, 1]
    achieved = plan.provenance.selection["achieved"]["params"]
    assert [r.getMessage() for r in caplog.records] == [
        f"target not met: removes {100 * achieved:.2f}% of the parameters, 99.00% asked: even removing "
        "every unit the selection may take (each group keeps at least min_keep=1 unit(s), a multiple "
        "of round_to=1: 2 of 20 units kept) misses it; 27 of the 2319 parameters (1.2%) are in "
        "tensors that no prunable group slices; lower min_keep/round_to, exclude fewer groups or set "
        "a smaller target"]


def test_params_after_counts_the_pruned_shapes_as_count_does() -> None:
    from pruneplan.loading import params_after

    model, x = cnn(), torch.randn(1, 3, 4, 4)
    plan = pp.plan_pruning(model, {"0": [1, 5], "3": [0, 2, 11], "7": [4]}, example_inputs=x)
    # by hand: conv 0 6*3*9 + 6, BN 12, conv 3 9*6*9 + 9, BN 18, fc 7 5*(9*16) + 5, fc 9 3*5 + 3
    expected = 168 + 12 + 495 + 18 + 725 + 18
    assert params_after(model, plan) == expected == pp.count(pp.apply_plan(copy.deepcopy(model), plan), x).params
