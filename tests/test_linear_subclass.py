"""Subclasses of ``nn.Linear`` with their own ``forward`` (``input @ self.weight.T`` + bias, as
Falcon's ``FalconLinear``), traced through: the matmul with the layer's own transposed weight is
its linear map, and the bias added after it is sliced with its outputs.

References: a pruned model computes what the original computes with the removed units zeroed
where they leave the network (zeroed columns of the consuming layer), the DESIGN invariant.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import pruneplan as pp
from pruneplan.cli import cli
from pruneplan.planner import build_plan


class MyLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.weight.T
        return h if self.bias is None else h + self.bias


class Net(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.a = MyLinear(6, 8, bias=bias)
        self.b = MyLinear(8, 5, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("tracer", ["fx", "record"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_own_forward_subclass_is_its_linear_map(tracer: str, bias: bool) -> None:
    torch.manual_seed(0)
    model, x = Net(bias).eval(), torch.randn(3, 6)
    groups = pp.prunable_groups(model, x, tracer=tracer)
    (g,) = groups
    # a's outputs: its weight rows and bias, b's weight columns; out_features / in_features
    want = [("a.bias", 0), ("a.weight", 0), ("b.weight", 1)] if bias else [("a.weight", 0), ("b.weight", 1)]
    assert (g.name, g.size, sorted((s.tensor, s.axis) for s in g.slices)) == ("a", 8, want)
    assert sorted((e.module, e.attribute) for e in g.edits) == [("a", "out_features"), ("b", "in_features")]
    assert [lo.name for lo in groups.left_out] == ["b"]  # the output layer, with its usual reason
    removed = [1, 4, 6]
    ref = Net(bias).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref.b.weight[:, removed] = 0
        expected = ref(x)
    plan = build_plan(model, [(g, removed)])
    pp.apply_plan(model, plan)
    assert model.a.weight.shape == (5, 6) and model.b.weight.shape == (5, 5)
    assert (model.a.out_features, model.b.in_features) == (5, 5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)


class Untransposed(nn.Linear):
    """Multiplies by the weight itself (not its transpose): not a linear map of this layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def test_a_matmul_with_the_untransposed_weight_is_left_out_by_name() -> None:
    model = nn.Sequential(Untransposed(6, 6), nn.ReLU(), nn.Linear(6, 2))
    groups = pp.prunable_groups(model, torch.randn(3, 6))
    assert [g.name for g in groups] == []
    reasons = {lo.name: lo.reason for lo in groups.left_out}
    assert reasons["0"].startswith("this Untransposed ran, but no call discovery recognises used its weight")


transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
T = transformers
V = 64


def falcon(**kw):
    cfg = T.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=V, **kw)
    torch.manual_seed(0)
    return T.FalconForCausalLM(cfg).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))


def test_falcon_mlp_equals_zeroed_units_updates_config_and_reloads(tmp_path: Path) -> None:
    model = falcon()
    groups = pp.prunable_groups(model, ids())
    by = {g.name: g for g in groups}
    # FalconLinear everywhere: the MLPs and the hidden size (embedding) are found now
    assert sorted(by) == ["transformer.h.0.mlp.dense_h_to_4h", "transformer.h.1.mlp.dense_h_to_4h",
                          "transformer.word_embeddings"]
    assert by["transformer.word_embeddings"].size == 32
    removed = list(range(1, 128, 4))  # 32 of 128 units in each layer
    ref = falcon()
    with torch.no_grad():
        for layer in ref.transformer.h:
            layer.mlp.dense_4h_to_h.weight[:, removed] = 0
        expected = ref(ids()).logits
    plan = build_plan(model, [(by[f"transformer.h.{i}.mlp.dense_h_to_4h"], removed) for i in (0, 1)])
    assert [c.describe() for c in plan.config.changes] == ["ffn_hidden_size: 128 -> 96"]
    model.save_pretrained(tmp_path / "src")
    plan.save(tmp_path / "plan.json")
    result = CliRunner().invoke(cli, ["apply", str(tmp_path / "plan.json"), str(tmp_path / "src"),
                                      "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    pp.apply_plan(model, plan)
    assert model.config.ffn_hidden_size == 96
    assert model.transformer.h[1].mlp.dense_h_to_4h.weight.shape == (96, 32)
    with torch.no_grad():
        live = model(ids()).logits
    torch.testing.assert_close(live, expected, rtol=1e-5, atol=1e-5)
    loaded, info = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids()).logits, live, rtol=0, atol=0)


def test_falcon_hidden_size_alone_is_refused_for_a_checkpoint(caplog) -> None:
    """Falcon's config derives the head size (hidden_size / num_attention_heads): a smaller
    hidden size with every head kept cannot be written, and the plan says so."""
    model = falcon()
    by = {g.name: g for g in pp.prunable_groups(model, ids())}
    with caplog.at_level(logging.WARNING, logger="pruneplan.planner"):
        plan = build_plan(model, [(by["transformer.word_embeddings"], list(range(0, 32, 4)))])
    (problem,) = plan.config.problems()
    assert problem.startswith("num_attention_heads/hidden_size: the falcon config has no head_dim and "
                              "derives the head size as hidden_size / num_attention_heads = 24 / 4, but "
                              "the pruned attention keeps heads of 8")
    assert "the model's config cannot express this plan" in caplog.text
