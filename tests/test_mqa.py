"""Multi-query attention (one key/value head shared by every query head), from discovery.

With one key/value head there is one query group: removing it would remove the attention, so
no ``query_groups`` group is offered (and the key/value projections are left out with a
reason). The query heads are independent of each other (every one of them reads the same key
and value), so they are offered as a ``heads`` group; every head count leaves one group, so the
grouped-query condition (the same number of query heads per key/value head) always holds.
Reference for removing heads: the original model with those heads' columns of ``o_proj`` zeroed
(a head reaches the rest of the network only through them).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import pruneplan as pp

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

V, HD = 128, 16


def mqa(impl: str = "sdpa"):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, vocab_size=V)
    cfg._attn_implementation = impl
    return transformers.LlamaForCausalLM(cfg).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))


def run(model, x, mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(x, attention_mask=mask).logits


# sdpa without a mask passes enable_gqa (key/value with one head); with a padding mask, and in
# eager attention, the key/value head is copied for every query head (repeat_kv)
CASES = [("sdpa", False), ("sdpa", True), ("eager", False)]


@pytest.mark.parametrize(("impl", "padded"), CASES, ids=["sdpa-gqa", "sdpa-repeat_kv", "eager"])
def test_mqa_offers_query_heads_and_never_the_last_group(tmp_path: Path, impl: str, padded: bool) -> None:
    model = mqa(impl)
    x = ids()
    mask = None
    if padded:
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[1, :2] = 0
    example = (x, mask) if padded else x
    groups = pp.prunable_groups(model, example)
    attn = {g.name: g for g in groups if "self_attn" in g.name}
    assert {n: (g.kind, g.size) for n, g in attn.items()} == {
        f"model.layers.{i}.self_attn.q_proj": ("heads", 4) for i in (0, 1)}
    # a unit: 16 rows of q_proj and the same 16 columns of o_proj; k and v are not touched
    g0 = attn["model.layers.0.self_attn.q_proj"]
    assert sorted((s.tensor, s.axis, s.repeat) for s in g0.slices) == [
        ("model.layers.0.self_attn.o_proj.weight", 1, HD), ("model.layers.0.self_attn.q_proj.weight", 0, HD)]
    left = {lo.name for lo in groups.left_out}
    assert {"model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"} <= left

    removed = {"model.layers.0.self_attn.q_proj": [1, 2], "model.layers.1.self_attn.q_proj": [0, 3]}
    plan = pp.plan_pruning(model, removed, example_inputs=example)
    assert {c.key: (c.before, c.after) for c in plan.config.changes} == {"num_attention_heads": (4, 2)}
    assert plan.config.problems() == []
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer, heads in zip(ref.model.layers, removed.values(), strict=True):
            for h in heads:
                layer.self_attn.o_proj.weight[:, h * HD:(h + 1) * HD] = 0
    pp.apply_plan(model, plan)
    a = model.model.layers[1].self_attn
    assert a.q_proj.weight.shape == (2 * HD, 64) and a.k_proj.weight.shape == (HD, 64)
    assert a.num_key_value_groups == 2 and model.config.num_key_value_heads == 1
    torch.testing.assert_close(run(model, x, mask), run(ref, x, mask), rtol=1e-5, atol=1e-5)
    d = tmp_path / "saved"
    model.save_pretrained(d)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation=impl).eval()
    torch.testing.assert_close(run(loaded, x, mask), run(model, x, mask), rtol=0, atol=0)


def test_mqa_all_query_heads_cannot_go() -> None:
    model = mqa()
    with pytest.raises(pp.PlanningError, match=r"removing all 4 units; at least one must stay"):
        pp.plan_pruning(model, {"model.layers.0.self_attn.q_proj": [0, 1, 2, 3]}, example_inputs=ids())
