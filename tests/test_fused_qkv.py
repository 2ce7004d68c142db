"""A fused q/k/v projection viewed with the head count as ``-1``: GPT-NeoX's
``qkv.view(B, T, -1, 3 * head_size)`` (the rows of a head are its q, k and v, one run), chunked
into q, k and v along the last axis. One unit is one head.

Reference: the pruned model equals the original with the removed heads' columns of the output
projection (``dense``) zeroed, the DESIGN invariant.
"""

from __future__ import annotations

import pytest
import torch

import pruneplan as pp
from pruneplan.planner import build_plan

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
T = transformers


def neox():
    cfg = T.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                          vocab_size=64)
    torch.manual_seed(0)
    return T.GPTNeoXForCausalLM(cfg).eval()


def test_gpt_neox_heads_equal_zeroed_heads() -> None:
    model, x = neox(), torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    by = {g.name: g for g in pp.prunable_groups(model, x)}
    attn = [f"gpt_neox.layers.{i}.attention.query_key_value" for i in (0, 1)]
    assert [(by[a].kind, by[a].size) for a in attn] == [("heads", 4)] * 2
    # a head: 24 consecutive rows (its q, k, v of 8) and 8 columns of dense
    assert sorted((s.tensor.rsplit(".", 2)[-2], s.axis, s.map_fields().get("repeat")) for s in by[attn[0]].slices
                  if s.tensor.endswith("weight")) == [("dense", 1, 8), ("query_key_value", 0, 24)]
    removed = {0: [1], 1: [0, 3]}
    ref = neox()
    with torch.no_grad():
        for i, heads in removed.items():
            for h in heads:
                ref.gpt_neox.layers[i].attention.dense.weight[:, h * 8:(h + 1) * 8] = 0
        expected = ref(x).logits
    plan = build_plan(model, [(by[a], removed[i]) for i, a in enumerate(attn)])
    # the layers keep 3 and 2 heads: one config value cannot hold both
    assert [c.describe() for c in plan.config.changes] == [
        "num_attention_heads (one value for all layers, 4 before): 2 in gpt_neox.layers.1.attention; "
        "3 in gpt_neox.layers.0.attention"]
    pp.apply_plan(model, plan)
    assert model.gpt_neox.layers[1].attention.query_key_value.weight.shape == (48, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-5, atol=1e-5)
