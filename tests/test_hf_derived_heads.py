"""BERT, GPT-2, ViT, DistilBERT: configs that derive the head size as hidden / heads.

These configs have no ``head_dim``: a model built from them has heads of ``hidden / heads``. A
plan that removes heads and keeps the hidden size leaves heads of the old size, which no such
config describes; applying it to a checkpoint folder is refused before anything is written,
with the layers, the sizes and what works instead. Removing heads and hidden channels in the
same proportion keeps ``hidden / heads`` equal to the head size, which the config can say.

References: for heads alone, the original model with the removed heads' input positions of the
output projection zeroed (a head reaches the rest of the network only through them); for the
checkpoint, the model ``from_pretrained`` builds from the rewritten config and the pruned files,
against `apply_plan` on the live model.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import pruneplan as pp
from pruneplan.cli import cli

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

V = 128
HIDDEN = {"bert": "embeddings.word_embeddings", "gpt2": "transformer.wte",
          "vit": "embeddings.patch_embeddings.projection", "distilbert": "embeddings.word_embeddings"}
KEYS = {"bert": ("num_attention_heads", "hidden_size"), "gpt2": ("n_head", "n_embd"),
        "vit": ("num_attention_heads", "hidden_size"), "distilbert": ("n_heads", "dim")}


def build(family: str):
    torch.manual_seed(0)
    x = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))
    if family == "bert":
        cfg = transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, vocab_size=V)
        return transformers.BertModel(cfg, add_pooling_layer=False).eval(), x
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=V, n_positions=32)
        return transformers.GPT2LMHeadModel(cfg).eval(), x
    if family == "distilbert":
        cfg = transformers.DistilBertConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=4, vocab_size=V)
        return transformers.DistilBertModel(cfg).eval(), x
    cfg = transformers.ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, image_size=16, patch_size=8)
    return (transformers.ViTModel(cfg, add_pooling_layer=False).eval(),
            torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)))


def forward(model, x) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def load(model, d: Path):
    kw = {"add_pooling_layer": False} if isinstance(model, transformers.BertModel | transformers.ViTModel) else {}
    loaded, info = type(model).from_pretrained(d, output_loading_info=True, **kw)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set()
    return loaded.eval()


def zeroed(model, groups, removed):
    """The reference: the output projection of each head group ignores the removed heads."""
    ref = copy.deepcopy(model)
    sd = ref.state_dict()
    with torch.no_grad():
        for g in groups:
            (o,) = [s for s in g.slices if not any(s.tensor.startswith(r + ".") for r in g.roots)]
            for h in removed[g.name]:
                sd[o.tensor].narrow(o.axis, o.offset + h * o.repeat, o.repeat).zero_()
    return ref


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("family", ["bert", "gpt2", "vit", "distilbert"])
def test_heads_alone_are_refused_for_a_checkpoint_before_writing(tmp_path: Path, family: str,
                                                                 caplog) -> None:
    model, x = build(family)
    heads_key, hidden_key = KEYS[family]
    src = tmp_path / "ckpt"
    model.save_pretrained(src)
    before = files(src)
    groups = [g for g in pp.prunable_groups(model, x) if g.kind == "heads"]
    assert len(groups) == 2 and all(g.size == 4 for g in groups)
    removed = {g.name: [1] for g in groups}
    plan = pp.plan_pruning(model, removed, example_inputs=x)
    layers = sorted(g.name.rpartition(".")[0] for g in groups)
    (problem,) = plan.config.problems()
    assert problem.startswith(f"{heads_key}/{hidden_key}: the {model.config.model_type} config has no "
                              f"head_dim and derives the head size as {hidden_key} / {heads_key} = 64 / 3, "
                              f"but the pruned attention keeps heads of 16; layers {', '.join(layers)} "
                              "keep 3 of 4 heads. What works: prune only MLP and hidden channels")
    assert f"so that {hidden_key} / {heads_key} stays 16 ({hidden_key} 48 for 3 heads)" in problem
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["apply", str(tmp_path / "plan.json"), str(src), "-o", str(out)])
    assert result.exit_code == 1
    # ViT's checkpoint stores other key names (plan.config.saved_names): read under those, it
    # is refused for its config like the others
    assert result.output == f"error: {src / 'config.json'} cannot express the pruned model: {problem}\n"
    assert not out.exists() and files(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "plan.json"]
    # the live model: its modules keep their own sizes, and it computes the zeroed-heads model
    ref = zeroed(model, groups, removed)
    with caplog.at_level(logging.WARNING, logger="pruneplan.apply.model"):
        pp.apply_plan(model, plan)
    assert "save_pretrained will write a config that from_pretrained cannot load" in caplog.text
    torch.testing.assert_close(forward(model, x), forward(ref, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "gpt2", "vit", "distilbert"])
def test_heads_and_hidden_in_proportion_reach_the_checkpoint(tmp_path: Path, family: str) -> None:
    model, x = build(family)
    heads_key, hidden_key = KEYS[family]
    src = tmp_path / "ckpt"
    model.save_pretrained(src)
    groups = pp.prunable_groups(model, x, include_output=True)
    removed = {g.name: [2] for g in groups if g.kind == "heads"}
    removed[HIDDEN[family]] = list(range(3, 64, 4))  # 16 of 64: 48 = 3 heads of 16
    plan = pp.plan_pruning(model, removed, example_inputs=x, include_output=True)
    assert {c.key: (c.before, c.after) for c in plan.config.changes if c.key in KEYS[family]} == {
        heads_key: (4, 3), hidden_key: (64, 48)}
    assert plan.config.problems() == []
    if family == "gpt2":  # n_inner is null (4 * n_embd): written, since n_embd changes
        assert plan.config.values()["n_inner"] == 256
    out = tmp_path / "out"
    if family == "vit":
        # transformers 5 renames ViT's keys when saving (layers.0.attention.q_proj is stored as
        # encoder.layer.0.attention.attention.query): a checkpoint folder does not hold the
        # names the plan slices, so the round trip goes through save_pretrained
        pp.apply_plan(model, plan)
        model.save_pretrained(out)
        loaded = load(model, out)
    else:
        plan.save(tmp_path / "plan.json")
        result = CliRunner().invoke(cli, ["apply", str(tmp_path / "plan.json"), str(src), "-o", str(out)])
        assert result.exit_code == 0, result.output
        loaded = load(model, out)
        pp.apply_plan(model, plan)
    assert getattr(loaded.config, heads_key) == 3 and getattr(loaded.config, hidden_key) == 48
    torch.testing.assert_close(forward(loaded, x), forward(model, x), rtol=0, atol=0)
