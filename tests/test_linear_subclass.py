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


# Falcon's fused q/k/v projection in the two layouts whose rows are all heads:
# "mha" (multi_query=False): (heads, 3, head_dim), one unit per head (q, k and v);
# "gqa" (new_decoder_architecture, Falcon 40B/180B): (kv groups, heads / groups + 2, head_dim),
# one unit per query group (its query heads, its key and its value).
LAYOUTS = {
    "mha": dict(cfg={"multi_query": False}, small={"multi_query": False, "num_attention_heads": 3},
                kind="heads", size=4, removed={0: 1, 1: 2}, rows=24, q_cols=8, hidden=8,
                changes=["num_attention_heads: 4 -> 3", "num_kv_heads: 4 -> 3"],
                edits=[("num_heads", 1), ("num_kv_heads", 1)]),
    "gqa": dict(cfg={"new_decoder_architecture": True, "num_kv_heads": 2},
                small={"new_decoder_architecture": True, "num_kv_heads": 1, "num_attention_heads": 2},
                kind="query_groups", size=2, removed={0: 1, 1: 0}, rows=32, q_cols=16, hidden=16,
                changes=["num_attention_heads: 4 -> 2", "num_kv_heads: 2 -> 1"],
                edits=[("num_heads", 2), ("num_kv_heads", 1)]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_falcon_heads_hidden_and_mlp_equal_a_smaller_falcon_and_reload(tmp_path: Path, layout: str) -> None:
    """One unit of each layer's attention, with as many hidden channels as the heads hold (so
    that hidden / heads stays the head size 8 the config derives), and 32 MLP units per layer.
    Reference: a Falcon built from the smaller config holding the kept weights, cut from the
    original by hand (a norm spans the hidden channels: zeroing is no reference)."""
    lay = LAYOUTS[layout]
    model, x = falcon(**lay["cfg"]), ids()
    by = {g.name: g for g in pp.prunable_groups(model, x)}
    attn = [f"transformer.h.{i}.self_attention.query_key_value" for i in (0, 1)]
    assert [(by[a].kind, by[a].size) for a in attn] == [(lay["kind"], lay["size"])] * 2
    rows, q_cols = lay["rows"], lay["q_cols"]
    edits = sorted((e.module.rsplit(".", 1)[-1], e.attribute, e.per_unit) for e in by[attn[0]].edits)
    assert edits == [("dense", "in_features", q_cols), ("query_key_value", "out_features", rows),
                     *(("self_attention", a, n) for a, n in lay["edits"]),
                     ("self_attention", "split_size", q_cols)]
    units = lay["removed"]
    gone_h = [0, 3, 5, 9, 14, 20, 27, 31] if lay["hidden"] == 8 else list(range(0, 32, 2))
    gone_m = list(range(1, 128, 4))
    chosen = [(by["transformer.word_embeddings"], gone_h), *((by[a], [units[i]]) for i, a in enumerate(attn)),
              *((by[f"transformer.h.{i}.mlp.dense_h_to_4h"], gone_m) for i in (0, 1))]
    plan = build_plan(model, chosen)
    hidden = 32 - lay["hidden"]
    assert [c.describe() for c in plan.config.changes] == [
        "ffn_hidden_size: 128 -> 96", f"hidden_size: 32 -> {hidden}", *lay["changes"]]
    assert plan.config.problems() == []

    sd = model.state_dict()
    kh = torch.tensor([c for c in range(32) if c not in gone_h])
    km = torch.tensor([c for c in range(128) if c not in gone_m])
    n_rows = sd["transformer.h.0.self_attention.query_key_value.weight"].shape[0]
    small = T.FalconForCausalLM(T.FalconConfig(hidden_size=hidden, num_hidden_layers=2, vocab_size=V,
                                               ffn_hidden_size=96, **lay["small"])).eval()
    cut = {"transformer.word_embeddings.weight": sd["transformer.word_embeddings.weight"][:, kh],
           "transformer.ln_f.weight": sd["transformer.ln_f.weight"][kh],
           "transformer.ln_f.bias": sd["transformer.ln_f.bias"][kh]}
    for i in (0, 1):
        p = f"transformer.h.{i}."
        # a unit's rows of the fused projection are one run (its q, k and v), its query heads
        # one run of the dense layer's columns
        keep_rows = torch.tensor([r for r in range(n_rows) if r // rows != units[i]])
        keep_cols = torch.tensor([c for c in range(32) if c // q_cols != units[i]])
        # the block's norms over the hidden size (input_layernorm; Falcon 40B: ln_attn, ln_mlp)
        cut |= {k: sd[k][kh] for k in sd if k.startswith(p) and sd[k].dim() == 1}
        cut |= {p + "self_attention.query_key_value.weight":
                    sd[p + "self_attention.query_key_value.weight"][keep_rows][:, kh],
                p + "self_attention.dense.weight": sd[p + "self_attention.dense.weight"][kh][:, keep_cols],
                p + "mlp.dense_h_to_4h.weight": sd[p + "mlp.dense_h_to_4h.weight"][km][:, kh],
                p + "mlp.dense_4h_to_h.weight": sd[p + "mlp.dense_4h_to_h.weight"][kh][:, km]}
    missing, unexpected = small.load_state_dict(cut, strict=False)
    assert (missing, unexpected) == (["lm_head.weight"], [])  # tied to the embedding
    with torch.no_grad():
        expected = small(x).logits

    model.save_pretrained(tmp_path / "src")
    plan.save(tmp_path / "plan.json")
    result = CliRunner().invoke(cli, ["apply", str(tmp_path / "plan.json"), str(tmp_path / "src"),
                                      "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    pp.apply_plan(model, plan)
    attn0 = model.transformer.h[0].self_attention
    assert (attn0.num_heads, attn0.num_kv_heads) == (small.config.num_attention_heads, small.config.num_kv_heads)
    assert model.config.num_attention_heads == small.config.num_attention_heads
    with torch.no_grad():
        live = model(x).logits
    torch.testing.assert_close(live, expected, rtol=1e-5, atol=1e-5)
    loaded, info = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x).logits, live, rtol=0, atol=0)


@pytest.mark.parametrize(("variant", "reason"), [
    # every query head, then one shared key and one value head in one projection: its rows are
    # not all heads, and discovery has no unit for rows that must stay
    ({}, "operation 'view' in module 'transformer.h.0.self_attention' writes the size 6 of their axis "
         "as a number and no attribute of its module holds it, so it would not follow pruned units"),
    # ALiBi: a slope per head, computed from the head count at run time
    ({"alibi": True, "multi_query": False},
     "operation 'scaled_dot_product_attention' in module 'transformer.h.0.self_attention' adds a "
     "per-head tensor no prunable layer owns"),
], ids=["multi-query", "alibi"])
def test_falcon_heads_left_out_with_their_reason(variant: dict, reason: str) -> None:
    groups = pp.prunable_groups(falcon(**variant), ids())
    assert sorted(g.name for g in groups) == [
        "transformer.h.0.mlp.dense_h_to_4h", "transformer.h.1.mlp.dense_h_to_4h", "transformer.word_embeddings"]
    reasons = {lo.name: lo.reason for lo in groups.left_out}
    assert reasons["transformer.h.0.self_attention.query_key_value"] == reason
