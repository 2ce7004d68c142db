"""Hidden size (the residual stream) of a Llama model against an independent reference.

Removing hidden channels is not the same as zeroing them: RMSNorm divides by the root mean
square over the channels that remain. The reference is therefore a second, smaller model built
from a config (``hidden_size = 64 - k``, ``head_dim = 16`` written explicitly so the heads keep
their size), into which the kept weights are copied by hand: embedding columns, norm weights,
q/k/v and gate/up input columns, o_proj and down_proj output rows, lm_head input columns.
"""

from __future__ import annotations

import pytest
import torch

import pruneplan
from pruneplan.graph.discover import prunable_groups

transformers = pytest.importorskip("transformers")


def _config(hidden: int, tied: bool):
    return transformers.LlamaConfig(
        hidden_size=hidden, head_dim=16, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=128, tie_word_embeddings=tied)


@pytest.mark.parametrize("tied", [False, True])
def test_llama_hidden_size_matches_a_smaller_model_with_the_kept_weights(tied: bool, tmp_path) -> None:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_config(64, tied)).eval()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    groups = {g.name: g for g in prunable_groups(model, (ids,))}
    hidden = groups["model.embed_tokens"]
    assert (hidden.kind, hidden.size) == ("channels", 64)
    norms = {s.tensor for s in hidden.slices if "norm" in s.tensor}
    assert norms == {"model.norm.weight"} | {f"model.layers.{i}.{n}.weight" for i in (0, 1)
                                             for n in ("input_layernorm", "post_attention_layernorm")}
    removed = [0, 17, 33, 63]  # transformers wants hidden_size % num_attention_heads == 0
    keep = [i for i in range(64) if i not in removed]
    plan = pruneplan.plan_pruning(model, {"model.embed_tokens": removed}, example_inputs=(ids,))

    sd = model.state_dict()
    reference = transformers.LlamaForCausalLM(_config(len(keep), tied)).eval()
    ref = {}
    for key, t in sd.items():
        if key.endswith(("embed_tokens.weight", "lm_head.weight", "q_proj.weight", "k_proj.weight",
                         "v_proj.weight", "gate_proj.weight", "up_proj.weight")):
            ref[key] = t[:, keep]
        elif key.endswith(("o_proj.weight", "down_proj.weight", "norm.weight", "layernorm.weight")):
            ref[key] = t[keep]
        else:
            ref[key] = t
    reference.load_state_dict(ref, strict=True)

    pruneplan.apply_plan(model, plan)
    assert model.model.embed_tokens.weight.shape == (128, 60)
    assert model.model.layers[1].mlp.down_proj.weight.shape == (60, 128)
    if tied:  # the tie survives: one tensor, sliced once
        assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    # replay on the saved weights gives the same tensors
    fresh = transformers.LlamaForCausalLM(_config(64, tied)).eval()
    fresh.load_state_dict(sd)
    replayed = pruneplan.apply_to_state_dict(plan, fresh.state_dict())
    for key, t in model.state_dict().items():
        assert torch.equal(replayed[key], t), key
