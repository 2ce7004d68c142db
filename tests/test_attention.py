"""Attention heads and grouped-query attention in discovery, on real Hugging Face model code.

Small random configs (hidden 64, 4 query heads of head_dim 16, 2 layers). The expected slices
are derived by hand: with ``num_key_value_heads = kv`` every key/value head serves
``rep = 4 // kv`` query heads, so one unit of the attention group is ``rep * 16`` rows of
q_proj, 16 rows of k_proj and of v_proj, and ``rep * 16`` input columns of o_proj. Removing a
unit must equal zeroing its o_proj input columns in the original model: the heads of a unit
reach the rest of the network only through those columns.
"""

from __future__ import annotations

import copy

import pytest
import torch

import pruneplan
from pruneplan.graph.discover import prunable_groups

transformers = pytest.importorskip("transformers")

D = 16  # head_dim = hidden_size / num_attention_heads = 64 / 4


def _causal_lm(family: str, kv: int, impl: str = "sdpa"):
    config = getattr(transformers, f"{family}Config")(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv, vocab_size=128, attn_implementation=impl)
    torch.manual_seed(0)
    return getattr(transformers, f"{family}ForCausalLM")(config).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))


def _slices(group) -> dict[tuple[str, int], tuple[int, int]]:
    return {(s.tensor, s.axis): (s.offset, s.repeat) for s in group.slices}


@pytest.mark.parametrize("family", ["Llama", "Qwen2", "Mistral"])
@pytest.mark.parametrize("kv", [2, 4])
def test_attention_groups_of_llama_style_models(family: str, kv: int) -> None:
    model = _causal_lm(family, kv)
    groups = {g.name: g for g in prunable_groups(model, (_ids(),))}
    rep = 4 // kv
    for layer in (0, 1):
        p = f"model.layers.{layer}.self_attn."
        g = groups[p + "q_proj"]
        assert g.roots == (p + "q_proj", p + "k_proj", p + "v_proj")
        # GQA: one unit per key/value head (with its rep query heads); MHA: one per head
        assert (g.kind, g.size) == (("query_groups", 2) if kv == 2 else ("heads", 4))
        expected = {
            (p + "q_proj.weight", 0): (0, rep * D),
            (p + "k_proj.weight", 0): (0, D),
            (p + "v_proj.weight", 0): (0, D),
            (p + "o_proj.weight", 1): (0, rep * D),
        }
        if family == "Qwen2":  # q/k/v biases go with their rows
            expected.update({(p + "q_proj.bias", 0): (0, rep * D), (p + "k_proj.bias", 0): (0, D),
                             (p + "v_proj.bias", 0): (0, D)})
        assert _slices(g) == expected
        mlp = groups[f"model.layers.{layer}.mlp.gate_proj"]
        assert (mlp.kind, mlp.size) == ("channels", 128)
    hidden = groups["model.embed_tokens"]
    assert (hidden.kind, hidden.size) == ("channels", 64)
    assert "model.layers.1.self_attn.o_proj" in hidden.roots


@pytest.mark.parametrize("family,kv,impl", [("Llama", 2, "sdpa"), ("Llama", 2, "eager"),
                                            ("Llama", 4, "eager"), ("Qwen2", 2, "sdpa"),
                                            ("Mistral", 2, "sdpa")])
def test_removing_heads_equals_zeroing_their_output_columns(family: str, kv: int, impl: str) -> None:
    model = _causal_lm(family, kv, impl)
    ids = _ids()
    rep = 4 // kv
    removed = {"model.layers.0.self_attn.q_proj": [0], "model.layers.1.self_attn.q_proj": [kv - 1]}
    plan = pruneplan.plan_pruning(model, removed, example_inputs=(ids,))
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, units in removed.items():
            o_proj = reference.get_submodule(name.replace("q_proj", "o_proj"))
            for u in units:
                o_proj.weight[:, u * rep * D:(u + 1) * rep * D] = 0
        expected = reference(ids).logits
    pruneplan.apply_plan(model, plan)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (64 - rep * D, 64)
    assert attn.k_proj.weight.shape == ((kv - 1) * D, 64)
    assert attn.o_proj.weight.shape == (64, 64 - rep * D)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    # replay on saved weights: the pruned state dict from the plan alone loads into the model
    fresh = _causal_lm(family, kv, impl)
    sd = pruneplan.apply_to_state_dict(plan, fresh.state_dict())
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
