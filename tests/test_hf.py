"""Hugging Face models: cached sizes, ``model.config``, save/from_pretrained, checkpoint folders.

Real `transformers` code from small configs with random weights. Until attention discovery
exists, head groups are written by hand here (`heads_spec`): a unit is one head, i.e. ``head_dim``
consecutive rows of q (and of k, v for a key/value head) and the same columns of the output
projection. The reference for removing heads is the original model with those heads' columns
of the output projection zeroed: a head's output reaches the rest of the network only through
them, and the heads do not interact before it.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import pruneplan as pp
from pruneplan.cli import cli
from pruneplan.graph.spec import EditSpec, SliceSpec
from pruneplan.graph.spec import Group as GroupSpec
from pruneplan.planner import build_plan

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

V = 128


def llama_like(cls_name: str = "Llama", tie: bool = False, **kw):
    cfg = getattr(transformers, f"{cls_name}Config")(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=V, tie_word_embeddings=tie, **kw)
    torch.manual_seed(0)
    return getattr(transformers, f"{cls_name}ForCausalLM")(cfg).eval()


def ids(n: int = 2, t: int = 7) -> torch.Tensor:
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(1))


def logits(model, x, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(x, **kw).logits


def heads_spec(sd: dict, attn: str, q: str, k: str | None, v: str | None, o: str, hd: int, per: int,
               n: int, kind: str, o_axis: int = 1, q_axis: int = 0, q_offsets=(0,)) -> GroupSpec:
    """A group whose unit u is ``per`` query heads (rows u*per*hd... of q) and, with k and v, key/value
    head u; o's input positions follow the query heads."""
    slices = []
    for off in q_offsets:
        slices.append(SliceSpec(f"{attn}.{q}.weight", q_axis, offset=off, repeat=per * hd))
        if f"{attn}.{q}.bias" in sd:
            slices.append(SliceSpec(f"{attn}.{q}.bias", 0, offset=off, repeat=per * hd))
    for name in (k, v):
        if name is not None:
            slices.append(SliceSpec(f"{attn}.{name}.weight", 0, repeat=hd))
            if f"{attn}.{name}.bias" in sd:
                slices.append(SliceSpec(f"{attn}.{name}.bias", 0, repeat=hd))
    slices.append(SliceSpec(f"{attn}.{o}.weight", o_axis, repeat=per * hd))
    return GroupSpec(name=f"{attn}.{kind}", size=n, roots=(f"{attn}.{q}",), slices=tuple(slices), kind=kind)


def llama_heads(model, layer: int, kind: str) -> GroupSpec:
    sd = model.state_dict()
    attn = f"model.layers.{layer}.self_attn"
    edits_q = EditSpec(f"{attn}.q_proj", "out_features", 64, 32 if kind == "query_groups" else 16)
    edits_o = EditSpec(f"{attn}.o_proj", "in_features", 64, edits_q.per_unit)
    if kind == "query_groups":  # unit: one key/value head with its 2 query heads
        g = heads_spec(sd, attn, "q_proj", "k_proj", "v_proj", "o_proj", 16, 2, 2, kind)
        kv = [EditSpec(f"{attn}.{p}", "out_features", 32, 16) for p in ("k_proj", "v_proj")]
        return GroupSpec(**{**g.__dict__, "edits": (edits_q, edits_o, *kv)})
    g = heads_spec(sd, attn, "q_proj", None, None, "o_proj", 16, 1, 4, kind)
    return GroupSpec(**{**g.__dict__, "edits": (edits_q, edits_o)})


def zero_heads(model, o_weight: str, heads: list[int], hd: int, axis: int = 1):
    """The reference: a copy of ``model`` whose output projection ignores ``heads``."""
    ref = copy.deepcopy(model)
    w = ref.state_dict()[o_weight]
    with torch.no_grad():
        for h in heads:
            w.narrow(axis, h * hd, hd).zero_()
    return ref


def mlp_groups(model) -> dict[str, GroupSpec]:
    return {g.name: g for g in pp.prunable_groups(model, ids()) if ".mlp." in g.name}


def roundtrip(model, tmp_path: Path, x, auto="AutoModelForCausalLM", **kw) -> torch.Tensor:
    """save_pretrained + from_pretrained; the loaded model's logits (loading must be clean)."""
    d = tmp_path / "saved"
    model.save_pretrained(d)
    loaded, info = getattr(transformers, auto).from_pretrained(d, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and not info["error_msgs"]
    return logits(loaded.eval(), x, **kw)


# ---- Llama: MLP from discovery, heads and query groups by hand --------------------------------


def test_llama_mlp_from_discovery_updates_config_and_reloads(tmp_path: Path) -> None:
    model = llama_like()
    x = ids()
    groups = mlp_groups(model)
    assert sorted(groups) == ["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj"]
    removed = {name: list(range(0, 128, 4)) for name in groups}  # 32 of 128 in both layers
    plan = pp.plan_pruning(model, removed, example_inputs=x)
    assert plan.version == 2
    assert [c.model_dump() for c in plan.config.changes] == [
        {"key": "intermediate_size", "before": 128, "after": 96, "per_layer": {}}]
    assert plan.config.problems() == [] and plan.config.model_type == "llama"
    pp.apply_plan(model, plan)
    assert model.config.intermediate_size == 96
    assert [layer.mlp.intermediate_size for layer in model.model.layers] == [96, 96]
    assert model.model.layers[0].mlp.hidden_size == 64  # untouched: the hidden size did not change
    torch.testing.assert_close(roundtrip(model, tmp_path, x), logits(model, x), rtol=0, atol=0)


def test_llama_heads_and_query_groups_equal_zeroed_heads_and_reload(tmp_path: Path) -> None:
    model = llama_like("Llama")
    x = ids()
    # layer 0: drop key/value head 1 (query heads 2, 3); layer 1: drop query heads 0 and 2, one of
    # each key/value head's pair. Both layers end with 2 query heads; kv heads 1 and 2 differ.
    plan_l1 = build_plan(model, [(llama_heads(model, 0, "query_groups"), [1]),
                                 (llama_heads(model, 1, "heads"), [0, 2])])
    assert {g.name: g.kind for g in plan_l1.groups} == {
        "model.layers.0.self_attn.query_groups": "query_groups", "model.layers.1.self_attn.heads": "heads"}
    # the config holds one key/value head count: layers 0 (1 kv head) and 1 (2) differ
    assert plan_l1.config.problems() == [
        "num_key_value_heads (one value for all layers, 2 before): 1 in model.layers.0.self_attn; "
        "2 in model.layers.1.self_attn; the config holds one value for all layers"]

    # both layers lose a key/value head with its query heads: the config can say so
    plan = build_plan(model, [(llama_heads(model, 0, "query_groups"), [1]),
                              (llama_heads(model, 1, "query_groups"), [0])])
    assert {c.key: (c.before, c.after) for c in plan.config.changes} == {
        "num_attention_heads": (4, 2), "num_key_value_heads": (2, 1)}
    ref = zero_heads(zero_heads(model, "model.layers.0.self_attn.o_proj.weight", [2, 3], 16),
                     "model.layers.1.self_attn.o_proj.weight", [0, 1], 16)
    pp.apply_plan(model, plan)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (32, 64) and attn.k_proj.weight.shape == (16, 64)
    assert attn.num_key_value_groups == 2 and attn.head_dim == 16
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 1)
    torch.testing.assert_close(logits(model, x), logits(ref, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(roundtrip(model, tmp_path, x), logits(model, x), rtol=0, atol=0)


def test_query_heads_within_groups_change_num_key_value_groups(tmp_path: Path) -> None:
    model = llama_like("Mistral")
    x = ids()
    # one query head of each key/value head in both layers: 2 query heads for 2 kv heads
    plan = build_plan(model, [(llama_heads(model, i, "heads"), [1, 2]) for i in (0, 1)])
    assert {c.key: (c.before, c.after) for c in plan.config.changes} == {"num_attention_heads": (4, 2)}
    ref = model
    for i in (0, 1):
        ref = zero_heads(ref, f"model.layers.{i}.self_attn.o_proj.weight", [1, 2], 16)
    pp.apply_plan(model, plan)
    assert [layer.self_attn.num_key_value_groups for layer in model.model.layers] == [1, 1]
    torch.testing.assert_close(logits(model, x), logits(ref, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(roundtrip(model, tmp_path, x), logits(model, x), rtol=0, atol=0)


def test_uneven_query_heads_per_kv_head_is_refused_naming_the_layer() -> None:
    model = llama_like("Mistral")
    spec = llama_heads(model, 1, "heads")
    # query heads 0 and 1 both belong to key/value head 0: kv head 0 keeps none, kv head 1 keeps 2
    with pytest.raises(pp.ConfigError, match=r"layer 'model\.layers\.1\.self_attn': grouped-query "
                       r"attention needs every key/value head to keep the same number of query "
                       r"heads, this plan leaves 0: 0, 1: 2"):
        build_plan(model, [(spec, [0, 1])])
    # a plan written by hand (no planner) is refused by apply_plan, before any change
    good = build_plan(model, [(spec, [0, 2])])
    data = json.loads(good.to_json())
    data["groups"][0]["removed"] = [0, 1]
    bad = pp.PrunePlan.from_dict(data)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(pp.ConfigError, match=r"model\.layers\.1\.self_attn"):
        pp.apply_plan(model, bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.config.num_attention_heads == 4
    assert model.model.layers[1].self_attn.q_proj.out_features == 64


def test_removing_a_kv_head_but_keeping_its_query_heads_is_refused() -> None:
    model = llama_like()
    spec = llama_heads(model, 0, "query_groups")
    plan = build_plan(model, [(spec, [0])])
    data = json.loads(plan.to_json())
    # keep the key/value slices, drop the query ones: kv head 0 goes, query heads 0, 1 stay
    g = data["groups"][0]
    g["slices"] = [s for s in g["slices"] if "k_proj" in s["tensor"] or "v_proj" in s["tensor"]]
    g["edits"] = [e for e in g["edits"] if e["module"].endswith(("k_proj", "v_proj"))]
    data["config"] = None
    data.pop("config")
    data["model"]["tensors"] = {k: v for k, v in data["model"]["tensors"].items()
                                if "k_proj" in k or "v_proj" in k}
    with pytest.raises(pp.ConfigError, match=r"key/value head 0 is removed but its query heads \[0, 1\] "
                       r"are kept"):
        pp.apply_plan(model, pp.PrunePlan.from_dict(data))


# ---- Qwen2: biases, head_dim written explicitly ----------------------------------------------


def test_qwen2_heads_and_hidden_write_head_dim(tmp_path: Path) -> None:
    model = llama_like("Qwen2")
    x = ids()
    assert "head_dim" not in model.config.to_dict()  # Qwen2 derives it: hidden / heads
    hidden = next(g for g in pp.prunable_groups(model, x) if g.name == "model.embed_tokens")
    chosen = [(llama_heads(model, i, "query_groups"), [0]) for i in (0, 1)]
    plan = build_plan(model, [*chosen, (hidden, list(range(0, 64, 4)))])
    # 2 query heads of 16 with a hidden size of 48: 48 / 2 = 24 is not 16, so head_dim is written
    assert {c.key: (c.before, c.after) for c in plan.config.changes} == {
        "head_dim": (None, 16), "hidden_size": (64, 48), "num_attention_heads": (4, 2),
        "num_key_value_heads": (2, 1)}
    assert any(s.tensor.endswith("q_proj.bias") for g in plan.groups for s in g.slices)
    pp.apply_plan(model, plan)
    assert model.config.head_dim == 16 and model.config.hidden_size == 48
    torch.testing.assert_close(roundtrip(model, tmp_path, x), logits(model, x), rtol=0, atol=0)


# ---- configs that cannot express a plan --------------------------------------------------------


def test_per_layer_widths_warn_on_apply_and_are_refused_for_a_checkpoint(tmp_path: Path, caplog) -> None:
    model = llama_like()
    x = ids()
    src = tmp_path / "ckpt"
    model.save_pretrained(src)
    (src / "tokenizer.json").write_text("{}")
    plan = pp.plan_pruning(model, {"model.layers.0.mlp.gate_proj": range(32),
                                   "model.layers.1.mlp.gate_proj": range(64)}, example_inputs=x)
    (change,) = plan.config.changes
    assert change.per_layer == {"model.layers.0.mlp": 96, "model.layers.1.mlp": 64}
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["apply", str(tmp_path / "plan.json"), str(src), "-o", str(out)])
    assert result.exit_code == 1
    assert result.output == (
        f"error: {src / 'config.json'} cannot express the pruned model: intermediate_size (one value "
        "for all layers, 128 before): 64 in model.layers.1.mlp; 96 in model.layers.0.mlp; the config "
        "holds one value for all layers\n")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "plan.json"]
    # the live model is pruned (its modules hold their own sizes); the config key stays, with a warning
    with caplog.at_level(logging.WARNING, logger="pruneplan.apply.model"):
        pp.apply_plan(model, plan)
    assert model.config.intermediate_size == 128
    assert [layer.mlp.intermediate_size for layer in model.model.layers] == [96, 64]
    assert "save_pretrained will write a config that from_pretrained cannot load" in caplog.text


# ---- the checkpoint folder --------------------------------------------------------------------


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["single-file", "sharded"])
def test_checkpoint_folder_round_trip_with_the_cli(tmp_path: Path, shard: str | None) -> None:
    model = llama_like(tie=True)
    x = ids()
    src = tmp_path / "ckpt"
    model.save_pretrained(src, **({"max_shard_size": shard} if shard else {}))
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    (src / "pytorch_model.bin").write_bytes(b"stale")  # another format: left out
    groups = pp.prunable_groups(model, x)
    chosen = [(g, list(range(1, g.size, 3))) for g in groups if ".mlp." in g.name]
    chosen += [(llama_heads(model, i, "query_groups"), [i]) for i in (0, 1)]
    plan = build_plan(model, chosen)
    assert plan.config.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["apply", str(tmp_path / "plan.json"), str(src), "-o", str(out)])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert "tokenizer.json" in names and "generation_config.json" in names
    assert "pytorch_model.bin" not in names
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}'
    config = json.loads((out / "config.json").read_text())
    source = json.loads((src / "config.json").read_text())
    # exactly the plan's keys change: 128 - 43 MLP units (1, 4, ..., 127), 2 query heads, 1 kv head
    assert {k: v for k, v in config.items() if source.get(k) != v} == {
        "intermediate_size": 85, "num_attention_heads": 2, "num_key_value_heads": 1}
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set()
    pp.apply_plan(model, plan)
    torch.testing.assert_close(logits(loaded.eval(), x), logits(model, x), rtol=0, atol=0)
    if shard:
        assert len(list(out.glob("model-*.safetensors"))) > 1


def test_checkpoint_apply_checks_the_config_values(tmp_path: Path) -> None:
    model = llama_like()
    src = tmp_path / "ckpt"
    model.save_pretrained(src)
    plan = pp.plan_pruning(model, {g: range(8) for g in mlp_groups(model)}, example_inputs=ids())
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 100
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(pp.PlanMismatchError, match=r"config\.json: intermediate_size is 100, the plan "
                       r"expects 128"):
        pp.apply_to_checkpoint(plan, src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_version_1_plan_on_a_checkpoint_measures_the_config(tmp_path: Path) -> None:
    model = llama_like()
    src = tmp_path / "ckpt"
    model.save_pretrained(src)
    plan = pp.plan_pruning(model, {g: range(16) for g in mlp_groups(model)}, example_inputs=ids())
    data = json.loads(plan.to_json())
    del data["config"]
    data["version"] = 1
    v1 = pp.PrunePlan.from_dict(data)
    pp.apply_to_checkpoint(v1, src, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["intermediate_size"] == 112


# ---- GPT-2 (Conv1D), BERT, T5 -----------------------------------------------------------------


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=V, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval()


def gpt2_mlp(model, layer: int) -> GroupSpec:
    p = f"transformer.h.{layer}.mlp"
    return GroupSpec(name=f"{p}.c_fc", size=256, roots=(f"{p}.c_fc",), slices=(
        SliceSpec(f"{p}.c_fc.weight", 1), SliceSpec(f"{p}.c_fc.bias", 0), SliceSpec(f"{p}.c_proj.weight", 0)))


def test_gpt2_mlp_writes_n_inner_and_syncs_conv1d(tmp_path: Path) -> None:
    model = gpt2()
    x = ids()
    plan = build_plan(model, [(gpt2_mlp(model, i), list(range(0, 256, 4))) for i in (0, 1)])
    # n_inner is null in GPT-2's config (4 * n_embd): it becomes explicit
    assert [c.model_dump() for c in plan.config.changes] == [
        {"key": "n_inner", "before": None, "after": 192, "per_layer": {}}]
    pp.apply_plan(model, plan)
    assert model.transformer.h[0].mlp.c_fc.nf == 192 and model.config.n_inner == 192
    torch.testing.assert_close(roundtrip(model, tmp_path, x), logits(model, x), rtol=0, atol=0)


def test_gpt2_heads_prune_the_live_model_but_its_config_cannot_say_so(tmp_path: Path) -> None:
    model = gpt2()
    x = ids()
    sd = model.state_dict()
    specs = [heads_spec(sd, f"transformer.h.{i}.attn", "c_attn", None, None, "c_proj", 16, 1, 4, "heads",
                        o_axis=0, q_axis=1, q_offsets=(0, 64, 128)) for i in (0, 1)]
    plan = build_plan(model, [(spec, [1]) for spec in specs])
    assert plan.config.problems() == [
        "n_head/n_embd: the gpt2 config has no head_dim and derives the head size as n_embd / n_head "
        "= 64 / 3, but the pruned attention keeps heads of 16; layers transformer.h.0.attn, "
        "transformer.h.1.attn keep 3 of 4 heads. What works: prune only MLP and hidden channels for "
        "a checkpoint, or prune the hidden size with the heads so that n_embd / n_head stays 16 "
        "(n_embd 48 for 3 heads), or use apply_plan on the live model (its modules keep their own "
        "sizes; save_pretrained cannot reload it)"]
    ref = zero_heads(zero_heads(model, "transformer.h.0.attn.c_proj.weight", [1], 16, axis=0),
                     "transformer.h.1.attn.c_proj.weight", [1], 16, axis=0)
    pp.apply_plan(model, plan)
    attn = model.transformer.h[0].attn
    assert (attn.num_heads, attn.split_size, attn.c_attn.nf, attn.head_dim) == (3, 48, 144, 16)
    torch.testing.assert_close(logits(model, x), logits(ref, x), rtol=1e-5, atol=1e-5)
    src = tmp_path / "ckpt"
    ref.save_pretrained(src)  # same names and shapes as the unpruned model
    with pytest.raises(pp.ConfigError, match=r"cannot express the pruned model: n_head/n_embd"):
        pp.apply_to_checkpoint(plan, src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bert_mlp_reloads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, vocab_size=V)
    model = transformers.BertModel(cfg).eval()
    x = ids()
    specs = []
    for i in (0, 1):
        p = f"encoder.layer.{i}"
        specs.append((GroupSpec(name=f"{p}.intermediate.dense", size=128, roots=(f"{p}.intermediate.dense",),
                                slices=(SliceSpec(f"{p}.intermediate.dense.weight", 0),
                                        SliceSpec(f"{p}.intermediate.dense.bias", 0),
                                        SliceSpec(f"{p}.output.dense.weight", 1))), range(0, 128, 2)))
    plan = build_plan(model, specs)
    assert [(c.key, c.before, c.after) for c in plan.config.changes] == [("intermediate_size", 128, 64)]
    pp.apply_plan(model, plan)
    d = tmp_path / "bert"
    model.save_pretrained(d)
    loaded = transformers.BertModel.from_pretrained(d).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).last_hidden_state, model(x).last_hidden_state, rtol=0, atol=0)


def test_t5_heads_and_mlp_reload(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = transformers.T5Config(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, vocab_size=V)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    sd = model.state_dict()
    x, y = ids(), ids(t=5)
    chosen = []
    attns = [f"{stack}.block.{i}.layer.0.SelfAttention" for stack in ("encoder", "decoder") for i in (0, 1)]
    attns += [f"decoder.block.{i}.layer.1.EncDecAttention" for i in (0, 1)]
    for a in attns:
        g = heads_spec(sd, a, "q", "k", "v", "o", 16, 1, 4, "heads")
        if f"{a}.relative_attention_bias.weight" in sd:  # the per-head bias table of block 0
            g = GroupSpec(**{**g.__dict__, "slices": (*g.slices, SliceSpec(f"{a}.relative_attention_bias.weight", 1))})
        chosen.append((g, [2]))  # T5 shares block 0's position bias with every block: same heads
    for stack in ("encoder", "decoder"):
        for i in (0, 1):
            ff = f"{stack}.block.{i}.layer.{1 if stack == 'encoder' else 2}.DenseReluDense"
            chosen.append((GroupSpec(name=ff, size=128, roots=(f"{ff}.wi",), slices=(
                SliceSpec(f"{ff}.wi.weight", 0), SliceSpec(f"{ff}.wo.weight", 1))), range(100, 128)))
    plan = build_plan(model, chosen)
    assert {c.key: (c.before, c.after) for c in plan.config.changes} == {"d_ff": (128, 100), "num_heads": (4, 3)}
    assert plan.config.tied == {"decoder.embed_tokens.weight": "shared.weight",
                                "encoder.embed_tokens.weight": "shared.weight", "lm_head.weight": "shared.weight"}
    ref = model
    for a in attns:
        ref = zero_heads(ref, f"{a}.o.weight", [2], 16)
    pp.apply_plan(model, plan)
    assert model.encoder.block[0].layer[0].SelfAttention.n_heads == 3
    assert model.encoder.block[0].layer[0].SelfAttention.inner_dim == 48
    # the reference also drops MLP units 100..127: zero them in wo's input
    with torch.no_grad():
        for stack in (ref.encoder, ref.decoder):
            for block in stack.block:
                block.layer[-1].DenseReluDense.wo.weight[:, 100:] = 0
    torch.testing.assert_close(logits(model, x, decoder_input_ids=y), logits(ref, x, decoder_input_ids=y),
                               rtol=1e-5, atol=1e-5)
    got = roundtrip(model, tmp_path, x, auto="T5ForConditionalGeneration", decoder_input_ids=y)
    torch.testing.assert_close(got, logits(model, x, decoder_input_ids=y), rtol=0, atol=0)


def test_show_and_compose_carry_kinds_and_config(tmp_path: Path) -> None:
    model = llama_like()
    x = ids()
    first = build_plan(model, [(llama_heads(model, i, "query_groups"), [0]) for i in (0, 1)])
    first.save(tmp_path / "a.json")
    shown = CliRunner().invoke(cli, ["show", str(tmp_path / "a.json")])
    assert shown.exit_code == 0
    assert "model.layers.0.self_attn.query_groups  query_groups          1/2" in shown.output
    assert "config num_attention_heads: 4 -> 2\nconfig num_key_value_heads: 2 -> 1\n" in shown.output
    pp.apply_plan(model, first)
    # a second step on the pruned model: MLP 128 -> 96 in both layers
    second = pp.plan_pruning(model, {g: range(32) for g in mlp_groups(model)}, example_inputs=x)
    composed = pp.compose([first, second])
    assert composed.version == 2
    assert {g.name: g.kind for g in composed.groups}["model.layers.1.self_attn.query_groups"] == "query_groups"
    assert {c.key: (c.before, c.after) for c in composed.config.changes} == {
        "intermediate_size": (128, 96), "num_attention_heads": (4, 2), "num_key_value_heads": (2, 1)}
    # the composed plan on a fresh copy gives the two steps' model
    fresh = llama_like()
    pp.apply_plan(fresh, composed)
    pp.apply_plan(model, second)
    assert fresh.config.intermediate_size == 96 and fresh.config.num_key_value_heads == 1
    torch.testing.assert_close(logits(fresh, x), logits(model, x), rtol=0, atol=0)


# ---- the config measurements on plain data (no model code) -------------------------------------


def _plan_removing(shapes: dict, slices: list[tuple[str, int, int]], removed: list[int], size: int):
    """A plan over ``shapes`` whose one group removes ``removed`` of ``size`` units, each unit
    covering ``repeat`` positions of every (tensor, axis, repeat) in ``slices``."""
    from pruneplan.plan import state_dict_digest

    return pp.PrunePlan.from_dict({
        "format": "pruneplan", "version": 1,
        "model": {"tensors": {t: shapes[t] for t, _, _ in slices}, "digest": state_dict_digest(shapes)},
        "groups": [{"name": "g", "size": size, "removed": removed,
                    "slices": [{"tensor": t, "axis": a, "map": {"repeat": r}} for t, a, r in slices]}],
    })


LLAMA_SHAPES = {
    "model.embed_tokens.weight": [128, 64], "lm_head.weight": [128, 64],
    **{f"model.layers.{i}.{k}": s for i in (0, 1) for k, s in {
        "self_attn.q_proj.weight": [64, 64], "self_attn.k_proj.weight": [32, 64],
        "self_attn.v_proj.weight": [32, 64], "self_attn.o_proj.weight": [64, 64],
        "mlp.up_proj.weight": [128, 64], "mlp.gate_proj.weight": [128, 64],
        "mlp.down_proj.weight": [64, 128]}.items()},
}
LLAMA_CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 16}


def test_config_edits_from_plain_data_hidden_not_a_multiple_of_heads() -> None:
    from pruneplan.hf_config import apply_config_edits, config_edits

    emb = [("model.embed_tokens.weight", 1, 1), ("lm_head.weight", 1, 1)]
    plan = _plan_removing(LLAMA_SHAPES, emb, list(range(9)), 64)  # 55 channels stay
    edits = config_edits(LLAMA_CONFIG, LLAMA_SHAPES, plan)
    assert [(c.key, c.before, c.after) for c in edits.changes] == [("hidden_size", 64, 55)]
    assert edits.problems() == ["hidden_size 55 is not a multiple of num_attention_heads 4: transformers "
                                "refuses such a config (it validates hidden size % heads == 0)"]
    with pytest.raises(pp.ConfigError, match=r"config\.json cannot express the pruned model: hidden_size 55"):
        apply_config_edits(LLAMA_CONFIG, edits, "config.json")
    # 8 removed: 56 = 4 * 14 stays expressible (head_dim is explicit in this config)
    ok = config_edits(LLAMA_CONFIG, LLAMA_SHAPES, _plan_removing(LLAMA_SHAPES, emb, list(range(8)), 64))
    assert apply_config_edits(LLAMA_CONFIG, ok) == {**LLAMA_CONFIG, "hidden_size": 56}
    assert LLAMA_CONFIG["hidden_size"] == 64  # the input is not modified


def test_config_edits_gate_and_up_must_agree() -> None:
    from pruneplan.hf_config import config_edits

    plan = _plan_removing(LLAMA_SHAPES, [("model.layers.0.mlp.up_proj.weight", 0, 1)], [0], 128)
    with pytest.raises(pp.ConfigError, match=r"layer 'model\.layers\.0\.mlp': 'model\.layers\.0\.mlp\.gate_proj"
                       r"\.weight' is 128 wide but 'model\.layers\.0\.mlp\.up_proj\.weight' is 127"):
        config_edits(LLAMA_CONFIG, LLAMA_SHAPES, plan)


def _mlp_spec(p: str, up: str, down: str) -> GroupSpec:
    return GroupSpec(name=f"{p}.{up}", size=128, roots=(f"{p}.{up}",), slices=(
        SliceSpec(f"{p}.{up}.weight", 0), SliceSpec(f"{p}.{up}.bias", 0), SliceSpec(f"{p}.{down}.weight", 1)))


@pytest.mark.parametrize("family", ["distilbert", "vit"])
def test_distilbert_and_vit_mlp_reload(tmp_path: Path, family: str) -> None:
    torch.manual_seed(0)
    if family == "distilbert":
        cfg = transformers.DistilBertConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=4, vocab_size=V)
        model, x = transformers.DistilBertModel(cfg).eval(), ids()
        specs = [_mlp_spec(f"transformer.layer.{i}.ffn", "lin1", "lin2") for i in (0, 1)]
        key = "hidden_dim"
    else:
        cfg = transformers.ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, image_size=16, patch_size=8)
        model = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
        x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        specs = [_mlp_spec(f"layers.{i}.mlp", "fc1", "fc2") for i in (0, 1)]  # transformers 5 layout
        key = "intermediate_size"
    plan = build_plan(model, [(s, range(0, 128, 4)) for s in specs])
    assert [(c.key, c.before, c.after) for c in plan.config.changes] == [(key, 128, 96)]
    pp.apply_plan(model, plan)
    d = tmp_path / family
    model.save_pretrained(d)
    loaded = type(model).from_pretrained(d).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).last_hidden_state, model(x).last_hidden_state, rtol=0, atol=0)


def test_discovered_query_groups_reach_the_config_and_the_checkpoint(tmp_path: Path) -> None:
    model = llama_like()
    x = ids()
    src = tmp_path / "ckpt"
    model.save_pretrained(src)
    groups = {g.name: g for g in pp.prunable_groups(model, x)}
    attn = [n for n in groups if n.endswith("self_attn.q_proj")]
    assert [groups[n].kind for n in attn] == ["query_groups", "query_groups"]
    plan = pp.plan_pruning(model, {attn[0]: [1], attn[1]: [0]}, example_inputs=x)
    assert {c.key: (c.before, c.after) for c in plan.config.changes} == {
        "num_attention_heads": (4, 2), "num_key_value_heads": (2, 1)}
    out = pp.apply_to_checkpoint(plan, src, tmp_path / "out")
    pp.apply_plan(model, plan)
    assert [layer.self_attn.num_key_value_groups for layer in model.model.layers] == [2, 2]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(loaded, x), logits(model, x), rtol=0, atol=0)
