"""Selection for transformers: query heads of grouped-query attention by ratio (every scope),
and parameter / MAC targets met with the config fit inside the search.

The models are tiny Llamas (hidden 64, MLP 128, 2 layers, 8 query heads of 8, tied embeddings,
vocabulary 96). For the head tests each query head's 8 rows of ``q_proj`` are set to one
constant ``c_h``, so that ``lp_norm`` (the L2 norm of a row: ``8 * |c_h|`` for 64 equal
inputs) scores head ``h`` by ``8 * c_h``: the order of the heads is the order of the ``c``
written below, and which heads go is read off them by hand.
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

import pruneplan as pp
from pruneplan.cli import cli

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

HD = 8
# query head scales per layer. Block k holds the query heads of key/value head k: with 2
# key/value heads, heads 0-3 and 4-7; with 4, pairs (0, 1), (2, 3), (4, 5), (6, 7).
SCALES = {
    # 2 key/value heads: layer 0's two lowest (1, 2) are both in block 0, layer 1's (1, 2) both
    # in block 1, so a plain "lowest two" takes 2 from one block and 0 from the other
    2: ([1, 2, 5, 6, 7, 8, 9, 10], [8, 7, 6, 5, 1, 3, 2, 4]),
    # 4 key/value heads: layer 1's four lowest (1, 2, 3, 4) are heads 1, 0, 4, 5: blocks 0 and 2
    4: ([1, 2, 3, 4, 5, 6, 7, 8], [2, 1, 9, 8, 3, 4, 6, 5]),
}


def llama(kv: int = 2, scaled: bool = True):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=kv, vocab_size=96,
                                   max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    if scaled:
        with torch.no_grad():
            for layer, scales in zip(model.model.layers, SCALES[kv], strict=True):
                for h, c in enumerate(scales):
                    layer.self_attn.q_proj.weight[h * HD:(h + 1) * HD] = 0.01 * c
    return model


def llama_kv4():
    """The CLI's model factory (``--model tests/test_select_transformers.py:llama_kv4``)."""
    return llama(4)


def ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))


def heads(plan: pp.PrunePlan) -> list[list[int]]:
    return [g.removed for g in plan.groups if g.kind == "heads"]


def zeroed_logits(model, removed: list[list[int]], x: torch.Tensor) -> torch.Tensor:
    """The original model with the removed heads' ``o_proj`` columns zeroed."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer, hs in zip(ref.model.layers, removed, strict=True):
            for h in hs:
                layer.self_attn.o_proj.weight[:, h * HD:(h + 1) * HD] = 0
        return ref(x).logits


# ---- F-gqa-heads: the same count from every key/value head -----------------------------------


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("ratio", [0.25, 0.3])
def test_a_quarter_of_8_heads_over_2_kv_heads_is_one_per_kv_head(scope: str, ratio: float, caplog) -> None:
    # 0.25 (and 0.3) of 8 asks 2 per layer: one round, the lowest of each block of 4.
    # layer 0, c = 1 2 5 6 | 7 8 9 10: heads 0 and 4; layer 1, c = 8 7 6 5 | 1 3 2 4: heads 3 and 4.
    # Globally the 16 heads ask for 4 (floor(0.3 * 16) = 4 too): the two layers are one set
    # (the config holds one head count), whose step is a round in both layers, 4 units: one step.
    model, x = llama(2), ids()
    with caplog.at_level(logging.WARNING, logger="pruneplan"):
        plan = pp.plan_from_metric(model, x, "lp_norm", kind_ratios={"heads": ratio}, scope=scope)
    assert heads(plan) == [[0, 4], [3, 4]]
    assert [g.kind for g in plan.groups] == ["heads", "heads"]
    # 6 heads remain, which Llama's config cannot hold with hidden 64 (not a multiple of 6), and
    # no smaller whole round (0) is a removal: the selection stays, the config part says why
    assert {c.key: (c.before, c.after) for c in plan.config.changes} == {"num_attention_heads": (8, 6)}
    assert plan.config.problems() == ["hidden_size 64 is not a multiple of num_attention_heads 6: "
                                      "transformers refuses such a config (it validates hidden size % "
                                      "heads == 0)"]
    with torch.no_grad():
        expected = zeroed_logits(model, heads(plan), x)
        torch.testing.assert_close(pp.apply_plan(model, plan)(x).logits, expected, rtol=1e-5, atol=1e-5)


def test_gqa_8_over_4_by_ratio_round_to_and_min_keep() -> None:
    # blocks of 2: 0.5 of 8 = 4 is one round of 4, the lower of each pair.
    # layer 0, c = 1 2 | 3 4 | 5 6 | 7 8: 0, 2, 4, 6; layer 1, c = 2 1 | 9 8 | 3 4 | 6 5: 1, 3, 4, 7
    x = ids()
    for scope in ("layer", "global"):
        plan = pp.plan_from_metric(llama(4), x, "lp_norm", kind_ratios={"heads": 0.5}, scope=scope)
        assert heads(plan) == [[0, 2, 4, 6], [1, 3, 4, 7]], scope
        assert {c.key: (c.before, c.after) for c in plan.config.changes} == {"num_attention_heads": (8, 4)}
        assert plan.config.problems() == []
    # round_to=4 counts heads: 4 kept is a multiple of 4, the same plan; 0.25 asks 2, less than a
    # round of 4: nothing (and no error)
    assert heads(pp.plan_from_metric(llama(4), x, "lp_norm", kind_ratios={"heads": 0.5}, round_to=4)) == [
        [0, 2, 4, 6], [1, 3, 4, 7]]
    assert pp.plan_from_metric(llama(4), x, "lp_norm", kind_ratios={"heads": 0.25}, round_to=4).groups == []
    # min_keep=5: at most 3 may go, less than a round: nothing
    assert pp.plan_from_metric(llama(4), x, "lp_norm", kind_ratios={"heads": 0.5}, min_keep=5).groups == []


def test_global_heads_without_equal_counts_rank_rounds_per_layer() -> None:
    # same_count=None: each layer is ranked on its own, in rounds of 2 units (one per block),
    # normalised by the layer's mean. Layer 0 (mean 6): rounds (1+7)/2, (2+8)/2, (5+9)/2 -> 0.67,
    # 0.83, 1.17; layer 1 (mean 4.5): blocks sorted 5 6 7 8 | 1 2 3 4, rounds 3, 4, 5 -> 0.67,
    # 0.89, 1.11. 0.25 of 16 = 4 units: layer 0's first round (tie at 0.67: layer 0 ranks first)
    # and layer 1's first round
    plan = pp.plan_from_metric(llama(2), ids(), "lp_norm", kind_ratios={"heads": 0.25}, scope="global",
                               same_count=None)
    assert heads(plan) == [[0, 4], [3, 4]]
    # 0.375 of 16 = 6: the next round is layer 0's second (0.83 < 0.89): heads 1 and 5
    plan = pp.plan_from_metric(llama(2), ids(), "lp_norm", kind_ratios={"heads": 0.375}, scope="global",
                               same_count=None)
    assert heads(plan) == [[0, 1, 4, 5], [3, 4]]


def test_select_indices_ranks_rounds_and_sets_globally() -> None:
    # two layers of 8 heads in 2 blocks of 4
    g = [SimpleNamespace(name=n, roots=(n,), kind="heads", size=8, blocks=2) for n in ("a", "b")]
    scores = {"a": [1.0, 2, 5, 6, 7, 8, 9, 10], "b": [8.0, 7, 6, 5, 1, 3, 2, 4]}
    # without normalisation, rounds: a 4, 5, 7; b 3, 4.5, 5.5 (blocks sorted 5678 | 1234).
    # 0.25 of 16 = 4: b's first round (3), then a's (4)
    assert pp.select_indices(scores, 0.25, scope="global", normalize=None, groups=g) == {
        "a": [0, 4], "b": [3, 4]}
    # 0.375 = 6: b's second round (4.5) next: b loses 3, 2 and 4, 6
    assert pp.select_indices(scores, 0.375, scope="global", normalize=None, groups=g) == {
        "a": [0, 4], "b": [2, 3, 4, 6]}
    # as one set: a step is a round in both (4 units), scored (4 + 3) / 2, (5 + 4.5) / 2, ...;
    # 0.375 asks 6: one step fits, the second (4 more) does not
    assert pp.select_indices(scores, 0.375, scope="global", normalize=None, groups=g,
                             same_count=[["a", "b"]]) == {"a": [0, 4], "b": [3, 4]}
    # per layer with a set: each loses one round
    assert pp.select_indices(scores, 0.25, groups=g, same_count=[["a", "b"]]) == {"a": [0, 4], "b": [3, 4]}


def test_cli_kind_ratio_on_gqa_8_over_4(tmp_path: Path) -> None:
    spec = f"{Path(__file__).resolve()}:llama_kv4"
    out = tmp_path / "plan.json"
    made = CliRunner().invoke(cli, ["plan", "--model", spec, "--input-shape", "16", "--input-dtype", "long",
                                    "--metric", "lp_norm", "--kind-ratio", "heads=0.5", "-o", str(out)])
    assert made.exit_code == 0, made.output
    plan = pp.PrunePlan.load(out)
    # the same heads as derived above (test_gqa_8_over_4_by_ratio_round_to_and_min_keep)
    assert [(g.name, g.removed) for g in plan.groups] == [
        ("model.layers.0.self_attn.heads", [0, 2, 4, 6]), ("model.layers.1.self_attn.heads", [1, 3, 4, 7])]
    assert {c.key: (c.before, c.after) for c in plan.config.changes} == {"num_attention_heads": (8, 4)}


# ---- F-target-hf: targets met with the config fit inside the search ---------------------------

# Parameters of the tiny Llama (kv=2), by hand: embedding 96 * 64 = 6144 (lm_head tied);
# per layer q 64*64, k and v 64*16 each, o 64*64, gate/up/down 64*128 each, two norms of 64:
# 4096 + 2048 + 4096 + 24576 + 128 = 34944; final norm 64. Total 6144 + 2 * 34944 + 64 = 76096.
TOTAL = 76096
# One hidden channel holds 96 (embedding column) + per layer 64 + 16 + 16 (q, k, v columns)
# + 64 (o row) + 128 + 128 (gate, up columns) + 128 (down row) + 2 (norms) = 546, + 1 (final
# norm): 1189. The search stops at the first step of the ranking whose plan meets the target,
# so it overshoots by less than what that step removes. The largest step: a query group in
# both layers (one step: the config holds one head count), 4 query heads and a key/value head,
# 2 * (32 + 8 + 8 + 32) * 64 = 10240 parameters, which also lets the hidden size, fitted up to a
# multiple of the heads left, drop from a multiple of 8 to one of 4: at most 7 more channels,
# 7 * 1189. (A hidden step moves the fitted size by at most 8 channels, 9512; an MLP step,
# one unit in both layers, is 2 * 3 * 64 = 384.)
STEP = 10240 + 7 * 1189


def _params(model, x) -> int:
    return pp.count(model, x, macs=False).params


@pytest.mark.parametrize("metric", ["lp_norm", "activation"])
def test_params_target_is_met_with_the_config_fit(metric: str, caplog) -> None:
    model, x = llama(2, scaled=False), ids()
    assert _params(model, x) == TOTAL
    extra = {"data": [(x, x)], "criterion": "causal_lm"} if metric == "activation" else {}
    with caplog.at_level(logging.INFO, logger="pruneplan"):
        plan = pp.plan_from_metric(model, x, metric, target={"params": 0.3}, **extra)
    left = _params(pp.apply_plan(copy.deepcopy(model), plan), x)
    assert left <= 0.7 * TOTAL  # met (was 0.275 with lp_norm, 0.204 with activation)
    assert 0.7 * TOTAL - left < STEP  # by less than one step of the ranking
    # by hand, a Llama of hidden h and MLP m with 8 query / 2 key-value heads of 8 keeps
    # 96h (embedding) + 2 * (64h + 2 * 16h + 64h + 3mh + 2h) + h = 421h + 6mh parameters
    # (h = 64, m = 128: 76096). The plan keeps the MLP one unit narrower than it could: one MLP
    # step fewer (m + 1 in both layers) misses the target, the overshoot is below 6h
    h = 64 - len(plan.group("model.embed_tokens").removed)
    m = 128 - len(plan.group("model.layers.0.mlp.gate_proj").removed)
    assert h % 8 == 0 and left == 421 * h + 6 * m * h
    # the search counts a candidate's parameters from the plan's shapes: the same number
    from pruneplan.loading import params_after

    assert params_after(model, plan) == left
    assert 421 * h + 6 * (m + 1) * h > 0.7 * TOTAL
    assert plan.provenance.selection["achieved"] == {"params": round(1 - left / TOTAL, 6)}
    # the config holds the result: equal MLP widths, hidden a multiple of the heads
    assert plan.config.problems() == []
    mlp = [len(g.removed) for g in plan.groups if ".mlp." in g.name]
    assert len(mlp) == 2 and mlp[0] == mlp[1]
    # no warning at all: the candidates of the search are silent, the plan is expressible
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert re.search(r"target: \d+ of \d+ steps of the ranking", caplog.text)


def test_the_returned_plans_warnings_are_logged_once(caplog) -> None:
    # without the config fit the plan keeps a hidden size the heads do not divide: its one
    # warning is logged once; the ~40 candidates' warnings (and the counting copy's) are not
    model, x = llama(2, scaled=False), ids()
    with caplog.at_level(logging.WARNING, logger="pruneplan"):
        plan = pp.plan_from_metric(model, x, "lp_norm", target={"params": 0.3}, same_count=None)
    warnings = [(r.name, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0][0] == "pruneplan.planner"
    assert warnings[0][1].startswith("the model's config cannot express this plan")
    assert plan.config.problems()[0] in warnings[0][1]
    assert plan.provenance.selection["achieved"]["params"] >= 0.3


def test_an_unreachable_target_names_its_cause(caplog) -> None:
    # the most the selection may take: each MLP keeps 1 unit, each layer 1 query group (4 query
    # heads), the hidden size 4 (a multiple of the 4 heads left): 1 + 1 + 1 + 1 + 4 = 8 of the
    # 64 + 2 * 128 + 2 * 2 = 324 units
    model, x = llama(2, scaled=False), ids()
    with caplog.at_level(logging.WARNING, logger="pruneplan"):
        plan = pp.plan_from_metric(model, x, "lp_norm", target={"params": 0.99})
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    achieved = plan.provenance.selection["achieved"]["params"]
    assert warnings == [
        f"target not met: removes {100 * achieved:.2f}% of the parameters, 99.00% asked: even removing "
        "every unit the selection may take (each group keeps at least min_keep=1 unit(s), a multiple "
        "of round_to=1, and the config fit keeps equal counts per layer and a hidden size the heads "
        "divide: 8 of 324 units kept) misses it; lower min_keep/round_to, exclude fewer groups or set "
        "a smaller target"]
    assert [g.size - len(g.removed) for g in plan.groups] == [4, 1, 1, 1, 1]
    assert plan.config.problems() == []


def test_quiet_logs_silences_every_library_logger_and_restores_them(caplog) -> None:
    from pruneplan.loading import quiet_logs

    child = logging.getLogger("pruneplan.planner")
    child.setLevel(logging.DEBUG)  # a level of its own: a parent's level would not silence it
    try:
        with caplog.at_level(logging.DEBUG, logger="pruneplan"), quiet_logs():
            child.warning("candidate")
            logging.getLogger("pruneplan").info("candidate")
            child.error("kept")
        with caplog.at_level(logging.DEBUG, logger="pruneplan"):
            child.warning("after")
    finally:
        child.setLevel(logging.NOTSET)
    assert [r.getMessage() for r in caplog.records] == ["kept", "after"]
    assert child.filters == [] and logging.getLogger("pruneplan").filters == []


def test_a_plan_in_steps_tells_the_composed_plans_config_problems_once(caplog) -> None:
    # without the config fit, in 2 steps: the step plans' problems (about an intermediate model
    # whose config could not say its widths) used to be logged and kept in the composed plan's
    # config part ("the config says 128 but layer ... has MLP width 103 before pruning"); now
    # the config part is the one the same removals planned at once have, and only its problems
    # are logged, once each
    model, x = llama(2, scaled=False), ids()
    with caplog.at_level(logging.WARNING, logger="pruneplan"):
        plan = pp.plan_from_metric(model, x, "lp_norm", target={"params": 0.3}, n_steps=2, same_count=None)
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    at_once = pp.plan_pruning(model, {g.name: g.removed for g in plan.groups}, example_inputs=x)
    assert plan.config == at_once.config
    problems = at_once.config.problems()
    assert problems and not any("before pruning" in p for p in problems)
    assert logged == ["the model's config cannot express this plan (applying it to a checkpoint folder "
                      f"will be refused): {p}" for p in problems]
