"""Query heads within the groups of grouped-query attention, from discovery.

A GQA layer (8 query heads, 2 key/value heads: query head ``h`` reads key/value head ``h // 4``)
is offered as whole query groups (``"query_groups"``, in the group list) and, in
``GroupList.alternatives``, as its query heads: a ``"heads"`` group ``<attention>.heads`` of 8
units in 2 blocks of 4 (one block per key/value head) that owns ``head_dim`` rows of ``q_proj``
(and its bias) and the same columns of ``o_proj``; ``k_proj``/``v_proj`` are untouched. Every
key/value head must keep the same number of query heads (the config has one
``num_attention_heads`` and ``repeat_kv`` repeats each key/value head ``n_rep`` times), so a
plan removes the same count from every block (positions may differ between blocks).

Reference for removing query heads: the original model with those heads' ``head_dim`` columns
of ``o_proj`` zeroed. A query head reaches the rest of the network only through them, and the
query heads do not interact before it (each has its own softmax; the key/value heads are
unchanged), so the two must agree to float tolerance.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import pruneplan as pp
from pruneplan.cli import cli
from pruneplan.graph.discover import describe_groups

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

V, HD, HQ, HKV = 128, 8, 8, 2


def gqa(family: str = "Llama", impl: str = "sdpa", layers: int = 2):
    cfg = getattr(transformers, f"{family}Config")(
        hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=HQ,
        num_key_value_heads=HKV, vocab_size=V)
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    return getattr(transformers, f"{family}ForCausalLM")(cfg).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def zeroed(model, removed: dict[int, list[int]]):
    """The reference: a copy whose ``o_proj`` ignores the given query heads of each layer."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer, heads in removed.items():
            w = ref.model.layers[layer].self_attn.o_proj.weight
            for h in heads:
                w[:, h * HD:(h + 1) * HD] = 0
    return ref


def attn(i: int) -> str:
    return f"model.layers.{i}.self_attn"


# ---- discovery ----------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_gqa_offers_its_query_heads_as_an_alternative(impl: str) -> None:
    model = gqa("Llama", impl)
    groups = pp.prunable_groups(model, ids())
    # the list itself is unchanged: one query group per key/value head
    qg = {g.name: (g.kind, g.size) for g in groups if "self_attn" in g.name}
    assert qg == {f"{attn(i)}.q_proj": ("query_groups", 2) for i in (0, 1)}
    alts = {g.name: g for g in groups.alternatives}
    assert sorted(alts) == [f"{attn(0)}.heads", f"{attn(1)}.heads"]
    g = alts[f"{attn(0)}.heads"]
    assert (g.kind, g.size, g.blocks, g.roots, g.alternative_to) == (
        "heads", 8, 2, (f"{attn(0)}.q_proj",), f"{attn(0)}.q_proj")
    # a unit: HD rows of q_proj and the same HD columns of o_proj; k_proj and v_proj untouched
    assert sorted((s.tensor, s.axis, s.offset, s.repeat) for s in g.slices) == [
        (f"{attn(0)}.o_proj.weight", 1, 0, HD), (f"{attn(0)}.q_proj.weight", 0, 0, HD)]
    assert sorted((e.module, e.attribute, e.before, e.per_unit) for e in g.edits) == [
        (f"{attn(0)}.o_proj", "in_features", 64, HD), (f"{attn(0)}.q_proj", "out_features", 64, HD)]
    text = describe_groups(groups)
    assert "instead of a group above (2; never both in one plan):" in text
    assert f"  {attn(0)}.heads  heads  8 units in 2 blocks of 4, instead of {attn(0)}.q_proj" in text
    # with_query_heads swaps them in, in place
    swapped = groups.with_query_heads()
    assert [g.name for g in swapped] == [
        g.name.replace("q_proj", "heads") if g.kind == "query_groups" else g.name for g in groups]
    assert [g.name for g in swapped.alternatives] == [f"{attn(0)}.q_proj", f"{attn(1)}.q_proj"]
    assert swapped.left_out == groups.left_out


def test_qwen2_query_heads_own_the_query_bias() -> None:
    model = gqa("Qwen2")
    g = {a.name: a for a in pp.prunable_groups(model, ids()).alternatives}[f"{attn(0)}.heads"]
    assert sorted((s.tensor, s.axis, s.repeat) for s in g.slices) == [
        (f"{attn(0)}.o_proj.weight", 1, HD), (f"{attn(0)}.q_proj.bias", 0, HD),
        (f"{attn(0)}.q_proj.weight", 0, HD)]


# ---- removing the same count of query heads from every key/value head -------------------------


# layer 0: heads 1, 2 of kv head 0 and 5, 7 of kv head 1; layer 1: 0, 3 and 4, 6 (positions differ
# per group and per layer; the count, 2 per key/value head, is the same)
REMOVED = {0: [1, 2, 5, 7], 1: [0, 3, 4, 6]}


@pytest.mark.parametrize(("family", "impl"), [("Llama", "sdpa"), ("Llama", "eager"), ("Mistral", "sdpa"),
                                              ("Qwen2", "eager")])
def test_query_heads_equal_zeroed_heads_and_reload(tmp_path: Path, family: str, impl: str) -> None:
    model = gqa(family, impl)
    x = ids()
    plan = pp.plan_pruning(model, {f"{attn(i)}.heads": h for i, h in REMOVED.items()}, example_inputs=x)
    assert [(g.name, g.kind, g.removed) for g in plan.groups] == [
        (f"{attn(i)}.heads", "heads", h) for i, h in REMOVED.items()]
    # 4 query heads left, 2 per key/value head; the key/value heads stay. Qwen2's config holds
    # no head_dim (it would derive 64 / 4 = 16): it is written explicitly as the kept 8
    derived = {"head_dim": (None, HD)} if family == "Qwen2" else {}
    assert {c.key: (c.before, c.after) for c in plan.config.changes} == {
        "num_attention_heads": (HQ, 4), **derived}
    assert plan.config.problems() == []
    ref = zeroed(model, REMOVED)
    pp.apply_plan(model, plan)
    for layer in model.model.layers:
        a = layer.self_attn
        assert a.q_proj.weight.shape == (4 * HD, 64) and a.k_proj.weight.shape == (HKV * HD, 64)
        assert a.o_proj.weight.shape == (64, 4 * HD)
        assert (a.num_key_value_groups, a.head_dim) == (2, HD)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    torch.testing.assert_close(logits(model, x), logits(ref, x), rtol=1e-5, atol=1e-5)
    d = tmp_path / "saved"
    model.save_pretrained(d)
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        d, output_loading_info=True, attn_implementation=impl)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set()
    torch.testing.assert_close(logits(loaded.eval(), x), logits(model, x), rtol=0, atol=0)


def test_checkpoint_folder_round_trip_with_the_cli(tmp_path: Path) -> None:
    model = gqa("Mistral")
    x = ids()
    src, out = tmp_path / "ckpt", tmp_path / "out"
    model.save_pretrained(src)
    plan = pp.plan_pruning(model, {f"{attn(i)}.heads": h for i, h in REMOVED.items()}, example_inputs=x)
    plan.save(tmp_path / "plan.json")
    result = CliRunner().invoke(cli, ["apply", str(tmp_path / "plan.json"), str(src), "-o", str(out)])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    source = json.loads((src / "config.json").read_text())
    # Mistral's config holds head_dim (8) already: only the query head count changes
    assert source["head_dim"] == HD
    assert {k: v for k, v in config.items() if source.get(k) != v} == {"num_attention_heads": 4}
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set()
    pp.apply_plan(model, plan)
    torch.testing.assert_close(logits(loaded.eval(), x), logits(model, x), rtol=0, atol=0)


# ---- refused ---------------------------------------------------------------------------------


def test_uneven_counts_are_refused_naming_the_layer_and_the_counts() -> None:
    model = gqa("Llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # heads 0, 1 belong to key/value head 0, head 4 to key/value head 1: 2 and 1 removed
    with pytest.raises(pp.PlanningError, match=(
            r"group 'model\.layers\.0\.self_attn\.heads' \(model\.layers\.0\.self_attn\.q_proj\): "
            r"grouped-query attention needs every key/value head to keep the same number of query "
            r"heads, these indices remove 0: 2, 1: 1 \(key/value head: query heads removed; units "
            r"4k to 4k\+3 belong to key/value head k\)")):
        pp.plan_pruning(model, {f"{attn(0)}.heads": [0, 1, 4]}, example_inputs=ids())
    # a plan edited by hand past the planner is refused by apply_plan, before any change
    good = pp.plan_pruning(model, {f"{attn(0)}.heads": [0, 4]}, example_inputs=ids())
    data = json.loads(good.to_json())
    data["groups"][0]["removed"] = [0, 1]
    with pytest.raises(pp.ConfigError, match=(
            r"layer 'model\.layers\.0\.self_attn': grouped-query attention needs every key/value "
            r"head to keep the same number of query heads, this plan leaves 0: 2, 1: 4")):
        pp.apply_plan(model, pp.PrunePlan.from_dict(data))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.config.num_attention_heads == 8
    assert model.model.layers[0].self_attn.q_proj.out_features == 64


def test_query_heads_and_query_groups_of_one_layer_are_refused_together() -> None:
    model = gqa("Llama", layers=1)
    x = ids()
    with pytest.raises(pp.PlanningError, match=(
            r"'model\.layers\.0\.self_attn\.heads' \(query heads\) and 'model\.layers\.0\.self_attn"
            r"\.q_proj' \(query groups\) divide the same attention: give indices for one of them")):
        pp.plan_pruning(model, {f"{attn(0)}.heads": [0, 4], f"{attn(0)}.q_proj": [1]}, example_inputs=x)
    # both, in two steps: query heads 1, 2 and 5, 7 first (4 left: 0, 3 | 4, 6), then the second
    # query group (key/value head 1 with its query heads 4 and 6) of the pruned model
    ref = zeroed(model, {0: [1, 2, 4, 5, 6, 7]})
    pp.apply_plan(model, pp.plan_pruning(model, {f"{attn(0)}.heads": [1, 2, 5, 7]}, example_inputs=x))
    groups = pp.prunable_groups(model, x)
    assert [(g.name, g.size) for g in groups.alternatives] == [(f"{attn(0)}.heads", 4)]
    pp.apply_plan(model, pp.plan_pruning(model, {f"{attn(0)}.q_proj": [1]}, example_inputs=x))
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 1)
    torch.testing.assert_close(logits(model, x), logits(ref, x), rtol=1e-5, atol=1e-5)


# ---- selection -------------------------------------------------------------------------------


def test_plan_from_metric_with_a_heads_ratio_keeps_counts_uniform(caplog) -> None:
    model = gqa("Llama")
    x = ids()
    plan = pp.plan_from_metric(model, x, "weight_norm", kind_ratios={"heads": 0.5})
    heads = [g for g in plan.groups if g.kind == "heads"]
    assert [g.name for g in heads] == [f"{attn(0)}.heads", f"{attn(1)}.heads"]
    assert not [g for g in plan.groups if g.kind != "heads"]  # nothing else has a ratio
    # independent: weight_norm scores a q row by its L1 norm; a head by the mean over its HD
    # rows; each key/value head loses its 2 lowest-scored query heads
    for g, layer in zip(heads, model.model.layers, strict=True):
        s = layer.self_attn.q_proj.weight.detach().double().abs().sum(1).reshape(HQ, HD).mean(1).numpy()
        expected = sorted(b * 4 + int(j) for b in range(HKV) for j in np.argsort(s[b * 4:(b + 1) * 4])[:2])
        assert g.removed == expected
    assert {c.key: (c.before, c.after) for c in plan.config.changes} == {"num_attention_heads": (8, 4)}
    ref = zeroed(model, {i: g.removed for i, g in enumerate(heads)})
    pp.apply_plan(model, plan)
    torch.testing.assert_close(logits(model, x), logits(ref, x), rtol=1e-5, atol=1e-5)
    # a quarter of 8 is 2: one per key/value head ...
    with caplog.at_level(logging.WARNING, logger="pruneplan.loading"):
        quarter = pp.plan_from_metric(gqa("Llama"), x, "weight_norm", kind_ratios={"heads": 0.25})
    assert [len(g.removed) for g in quarter.groups] == [2, 2]
    assert all(len({u // 4 for u in g.removed}) == 2 for g in quarter.groups)
    # ... which Llama's config refuses (hidden size 64 is not a multiple of 6 heads); no smaller
    # count fits (7 does not divide 64, and 1 is not a whole round over 2 key/value heads), so
    # the selection stays, with a warning, and the plan's config part says why
    assert ("no smaller head count than the 2 selected per layer fits the config's hidden size 64; "
            "kept as selected") in caplog.text
    assert quarter.config.problems() == [
        "hidden_size 64 is not a multiple of num_attention_heads 6: transformers refuses such a "
        "config (it validates hidden size % heads == 0)"]
    # round_to counts query heads: with round_to=4, 6 kept rounds up to 8
    assert pp.plan_from_metric(gqa("Llama"), x, "weight_norm", kind_ratios={"heads": 0.25},
                               round_to=4, same_count=None).groups == []
    # naming query groups too keeps the query groups (one of 2 per layer at 0.5)
    both = pp.plan_from_metric(gqa("Llama"), x, "weight_norm", kind_ratios={"heads": 0.5, "query_groups": 0.5})
    assert [(g.kind, len(g.removed)) for g in both.groups] == [("query_groups", 1), ("query_groups", 1)]


def test_select_indices_takes_whole_rounds_that_honour_round_to() -> None:
    # 12 query heads in 3 key/value groups of 4; scores rise with the index inside each block
    g = SimpleNamespace(name="h", roots=("q",), kind="heads", size=12, blocks=3)
    scores = {"h": [1.0, 2.0, 3.0, 4.0] * 3}
    # 0.5 of 12 = 6: 2 from every block (the lowest two of each)
    assert pp.select_indices(scores, {"heads": 0.5}, groups=[g]) == {"h": [0, 1, 4, 5, 8, 9]}
    # 0.34 of 12 = 4, rounded down to a whole round of 3 (one from each block) keeping 9
    assert pp.select_indices(scores, {"heads": 0.34}, groups=[g]) == {"h": [0, 4, 8]}
    # with round_to=2, one round keeps 9 (odd) and two rounds are more than the 4 asked: nothing
    assert pp.select_indices(scores, {"heads": 0.34}, groups=[g], round_to=2) == {}
    # 0.5 with round_to=2: 6 removed in 2 rounds keeps 6, even
    assert pp.select_indices(scores, {"heads": 0.5}, groups=[g], round_to=2) == {"h": [0, 1, 4, 5, 8, 9]}


# ---- attention written by hand (no config): the planner's check is the only one -------------


class _GQA(torch.nn.Module):
    """6 query heads, 2 key/value heads of 4, with ``enable_gqa`` or ``repeat_kv``'s expand +
    reshape written out; the head counts are attributes, which the plan edits."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.mode = 6, 2, 4, mode
        self.q, self.k, self.v = (torch.nn.Linear(32, n * 4) for n in (6, 2, 2))
        self.o = torch.nn.Linear(24, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.mode == "enable_gqa":
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:
            n = self.num_heads // self.num_kv_heads
            shape = (b, self.num_heads, t, self.head_dim)
            k = k[:, :, None].expand(b, self.num_kv_heads, n, t, self.head_dim).reshape(shape)
            v = v[:, :, None].expand(b, self.num_kv_heads, n, t, self.head_dim).reshape(shape)
            y = (q @ k.transpose(-2, -1) / 2).softmax(-1) @ v
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("mode", ["enable_gqa", "repeat_kv"])
def test_hand_written_gqa_query_heads(mode: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), _GQA(mode), torch.nn.Linear(32, 3)).eval()
    x = torch.randn(2, 5, 8)
    alt = {g.name: g for g in pp.prunable_groups(model, x).alternatives}
    assert [(n, g.size, g.blocks) for n, g in alt.items()] == [("1.heads", 6, 2)]
    # the module's query head count drops by one per unit; its key/value head count is not touched
    assert sorted((e.module, e.attribute, e.per_unit) for e in alt["1.heads"].edits) == [
        ("1", "num_heads", 1), ("1.o", "in_features", 4), ("1.q", "out_features", 4)]
    # query heads 0-2 read key/value head 0, 3-5 key/value head 1: 1, 3, 5 is 1 and 2
    with pytest.raises(pp.PlanningError, match=r"these indices remove 0: 1, 1: 2 \(key/value head: "
                       r"query heads removed; units 3k to 3k\+2 belong to key/value head k\)"):
        pp.plan_pruning(model, {"1.heads": [1, 3, 5]}, example_inputs=x)
    plan = pp.plan_pruning(model, {"1.heads": [1, 4]}, example_inputs=x)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for h in (1, 4):
            ref[1].o.weight[:, h * 4:(h + 1) * 4] = 0
        original = model(x)
    pp.apply_plan(model, plan)
    assert (model[1].num_heads, model[1].num_kv_heads, model[1].q.out_features) == (4, 2, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)
        assert (model(x) - original).abs().max() > 1e-3  # the removed heads mattered


def llama_factory():
    """The CLI's model factory (``--model tests/test_gqa_query_heads.py:llama_factory``)."""
    return gqa("Llama")


def test_cli_groups_lists_the_alternatives_and_plan_takes_a_heads_ratio(tmp_path: Path) -> None:
    spec = f"{Path(__file__).resolve()}:llama_factory"
    shown = CliRunner().invoke(cli, ["groups", "--model", spec, "--input-shape", "7", "--input-dtype", "long"])
    assert shown.exit_code == 0, shown.output
    assert f"  {attn(1)}.heads  heads  8 units in 2 blocks of 4, instead of {attn(1)}.q_proj" in shown.output
    out = tmp_path / "plan.json"
    made = CliRunner().invoke(cli, ["plan", "--model", spec, "--input-shape", "7", "--input-dtype", "long",
                                    "--metric", "weight_norm", "--kind-ratio", "heads=0.5", "-o", str(out)])
    assert made.exit_code == 0, made.output
    # the same plan as the library's (zeros as token ids: example_input of a long dtype)
    expected = pp.plan_from_metric(gqa("Llama"), torch.zeros(1, 7, dtype=torch.long), "weight_norm",
                                   kind_ratios={"heads": 0.5})
    assert pp.PrunePlan.load(out).to_json() == expected.to_json()
    assert [(g.name, len(g.removed)) for g in expected.groups] == [(f"{attn(i)}.heads", 4) for i in (0, 1)]


def test_plan_from_metric_lowers_the_heads_to_a_count_the_hidden_size_holds(caplog) -> None:
    # 10 query heads of 8 in 2 key/value groups of 5, hidden size 80: 0.4 asks for 4 per layer
    # (2 per key/value head), leaving 6, which 80 is not a multiple of; the largest whole round
    # below that fits removes 2 (one per key/value head): 8 heads remain, 80 = 8 * 10
    cfg = transformers.LlamaConfig(hidden_size=80, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=10, num_key_value_heads=2, head_dim=8, vocab_size=V)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with caplog.at_level(logging.WARNING, logger="pruneplan.loading"):
        plan = pp.plan_from_metric(model, ids(), "weight_norm", kind_ratios={"heads": 0.4})
    assert ("the query heads lose 2 per layer instead of the 4 selected: the config's hidden size 80 "
            "must stay a multiple of the heads that remain (8, not 6)") in caplog.text
    # the shortfall is blamed on the config fit (8 asked, 4 given back), not on round_to/min_keep
    assert ("8 (" in caplog.text and "were asked: the config fit (same_count: equal counts per layer, "
            "whole rounds, a hidden size the heads divide) gives back 4") in caplog.text
    assert "round_to=1 and min_keep=1 keep" not in caplog.text
    for g, layer in zip(plan.groups, model.model.layers, strict=True):
        s = layer.self_attn.q_proj.weight.detach().double().abs().sum(1).reshape(10, 8).mean(1).numpy()
        assert g.removed == [int(np.argmin(s[:5])), 5 + int(np.argmin(s[5:]))]
    assert {c.key: (c.before, c.after) for c in plan.config.changes} == {"num_attention_heads": (10, 8)}
    assert plan.config.problems() == []


def test_layer_ratios_naming_the_query_heads_swap_them_in() -> None:
    x = ids()
    plan = pp.plan_from_metric(gqa("Llama"), x, "weight_norm", layer_ratios={"*.self_attn.heads": 0.5})
    assert [(g.name, g.kind, len(g.removed)) for g in plan.groups] == [
        (f"{attn(i)}.heads", "heads", 4) for i in (0, 1)]
    assert all(len({u // 4 for u in g.removed}) == 2 for g in plan.groups)  # 2 per key/value head
    # a pattern that also matches the query group's own names keeps the query groups
    groups = pp.plan_from_metric(gqa("Llama"), x, "weight_norm", layer_ratios={"*.self_attn.[hq]*": 0.5})
    assert [(g.name, g.kind, len(g.removed)) for g in groups.groups] == [
        (f"{attn(i)}.q_proj", "query_groups", 1) for i in (0, 1)]
    # with_query_heads by name: only that layer is swapped
    found = pp.prunable_groups(gqa("Llama"), x).with_query_heads([f"{attn(1)}.heads"])
    assert [g.name for g in found if "self_attn" in g.name] == [f"{attn(0)}.q_proj", f"{attn(1)}.heads"]
    assert sorted(g.name for g in found.alternatives) == [f"{attn(0)}.heads", f"{attn(1)}.q_proj"]


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_ratio_may_map_kinds_as_the_readme_says(scope: str) -> None:
    # README: "ratio may map kinds"; it used to fail ("ratio given for 'channels', which has no
    # scores" globally, "ratio for group 'model.embed_tokens' must be a number" per layer)
    x = ids()
    kinds = {"channels": 0.3, "query_groups": 0.5}
    mapped = pp.plan_from_metric(gqa("Llama"), x, "weight_norm", kinds, scope=scope, same_count=None)
    same = pp.plan_from_metric(gqa("Llama"), x, "weight_norm", kind_ratios=kinds, scope=scope, same_count=None)
    assert mapped.to_json() == same.to_json()
    by_kind: dict[str, list[int]] = {}
    for g in mapped.groups:
        by_kind.setdefault(g.kind, []).append(len(g.removed))
    # query groups: 2 key/value heads per layer; half of them, one per layer (by layer) or 2 of 4
    # (global, normalised per group)
    assert sum(by_kind["query_groups"]) == 2
    assert mapped.provenance.selection["kind_ratios"] == kinds
    assert mapped.provenance.selection["ratio"] == 0.0
    assert by_kind["channels"]  # channel groups (MLP, hidden) lose units too
    if scope == "layer":
        # each channel group loses floor(0.3 * size): MLP 96 -> 28, hidden 64 -> 19
        sizes = {g.name: g.size for g in pp.prunable_groups(gqa("Llama"), x)}
        assert all(len(g.removed) == int(0.3 * sizes[g.name]) for g in mapped.groups if g.kind == "channels")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ratio": {"chanels": 0.3}}, r"^ratio given for kind 'chanels', which is not one of \('channels', "
                                  r"'heads', 'query_groups'\)$"),
    ({"ratio": {"heads": 1.5}}, r"^ratio for kind 'heads' must be a number in \[0, 1\), got 1.5$"),
    ({"ratio": {"heads": 0.5}, "kind_ratios": {"channels": 0.1}}, "either as ratio=.* or as kind_ratios"),
    ({"kind_ratios": {"head": 0.5}}, r"^ratio given for kind 'head', which is not one of"),
])
def test_bad_kind_ratios_are_refused(kwargs: dict, message: str) -> None:
    ratio = kwargs.pop("ratio", None)
    with pytest.raises(pp.PlanningError, match=message):
        pp.plan_from_metric(gqa("Llama", layers=1), ids(), "weight_norm", ratio, **kwargs)
