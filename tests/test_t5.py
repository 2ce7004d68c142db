"""T5 from discovery: self- and cross-attention heads, d_ff and d_model, against a smaller T5.

T5 shares one relative position bias per stack (a per-head table in block 0, passed on to the
later blocks as ``position_bias``) and one cross-attention bias per decoder (zeros of shape
``(1, n_heads, L, S)`` made by block 0 plus the padding mask, passed on the same way). So the
self-attention heads of a stack are one group across its blocks (the table is sliced with
them), and so are the cross-attention heads of the decoder. The embedding is one tensor under
four keys (``shared``, ``encoder.embed_tokens``, ``decoder.embed_tokens``, ``lm_head``): the
hidden size of encoder and decoder is one group, which reaches the model output (the encoder's
last hidden state), hence ``include_output=True``.

Removing hidden channels is not zeroing them (T5's RMS norm divides by the mean over the
channels that remain, and the decoder output is scaled by ``d_model ** -0.5`` before the tied
``lm_head``), so the reference is a second T5 built from a config with the smaller sizes, into
which the kept weights are copied by hand, tensor by tensor.
"""

from __future__ import annotations

import json
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
HD = 16  # d_kv


def t5(d_model: int = 64, d_ff: int = 128, heads: int = 4, impl: str = "sdpa"):
    torch.manual_seed(0)
    cfg = transformers.T5Config(d_model=d_model, d_ff=d_ff, d_kv=HD, num_layers=2, num_heads=heads,
                                vocab_size=V)
    cfg._attn_implementation = impl  # "sdpa" (the default) or "eager" (matmul-softmax-matmul)
    return transformers.T5ForConditionalGeneration(cfg).eval()


def inputs():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, V, (2, 7), generator=g), torch.randint(0, V, (2, 5), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0  # padding in the second sentence: the cross-attention bias gets a mask too
    return x, mask, y


def logits(model, x, mask, y) -> torch.Tensor:
    with torch.no_grad():
        return model(x, attention_mask=mask, decoder_input_ids=y).logits


SELF_ENC = "encoder.block.0.layer.0.SelfAttention.q"
SELF_DEC = "decoder.block.0.layer.0.SelfAttention.q"
CROSS = "decoder.block.0.layer.1.EncDecAttention.q"
HIDDEN = "encoder.embed_tokens"


def _heads_rows(gone: int) -> list[int]:
    return [p for p in range(4 * HD) if p // HD != gone]


def reference(model, removed_heads: dict[str, int], ff_keep: dict[str, list[int]], keep: list[int]):
    """A T5 of d_model len(keep), 3 heads, d_ff 96 holding the kept weights of ``model``."""
    small = t5(len(keep), 96, 3, model.config._attn_implementation)
    sd = model.state_dict()
    out = {}
    for key, t in sd.items():
        parts = key.split(".")
        if key in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                   "lm_head.weight"):
            out[key] = t[:, keep]
        elif key.endswith("layer_norm.weight"):
            out[key] = t[keep]
        elif "Attention" in key:
            which = "SelfAttention" if "SelfAttention" in key else "EncDecAttention"
            gone = removed_heads[f"{parts[0]}.{which}"]
            rows = _heads_rows(gone)
            if parts[-2] in ("q", "k", "v"):
                out[key] = t[rows][:, keep]
            elif parts[-2] == "o":
                out[key] = t[keep][:, rows]
            else:  # relative_attention_bias: (buckets, heads)
                out[key] = t[:, [h for h in range(4) if h != gone]]
        elif "DenseReluDense" in key:
            ff = ff_keep[".".join(parts[:6])]
            out[key] = t[ff][:, keep] if parts[-2] == "wi" else t[keep][:, ff]
        else:
            raise AssertionError(f"unexpected tensor {key}")
    small.load_state_dict(out, strict=True)
    return small


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_t5_groups_tie_the_shared_biases_and_embeddings(impl: str) -> None:
    model = t5(impl=impl)
    x, mask, y = inputs()
    groups = {g.name: g for g in pp.prunable_groups(model, (x, mask, y), include_output=True)}
    assert {n: (g.kind, g.size) for n, g in groups.items() if g.kind == "heads"} == {
        SELF_ENC: ("heads", 4), SELF_DEC: ("heads", 4), CROSS: ("heads", 4)}
    # the cross-attention of both decoder blocks reads block 0's bias: one group
    assert groups[CROSS].roots == tuple(f"decoder.block.{i}.layer.1.EncDecAttention.{p}"
                                        for i in (0, 1) for p in "qkv")
    assert {s.tensor for s in groups[SELF_ENC].slices} == {
        f"encoder.block.{i}.layer.0.SelfAttention.{p}.weight" for i in (0, 1) for p in "qkvo"} | {
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"}
    # one hidden group for encoder and decoder, slicing all four keys of the embedding
    hidden = groups[HIDDEN]
    emb = {(s.tensor, s.axis) for s in hidden.slices if "embed" in s.tensor or s.tensor in (
        "shared.weight", "lm_head.weight")}
    assert emb == {(k, 1) for k in ("shared.weight", "encoder.embed_tokens.weight",
                                    "decoder.embed_tokens.weight", "lm_head.weight")}
    assert {(e.module, e.attribute) for e in hidden.edits if e.attribute == "embedding_dim"} == {
        ("shared", "embedding_dim"), ("encoder.embed_tokens", "embedding_dim"),
        ("decoder.embed_tokens", "embedding_dim")}
    assert "decoder.embed_tokens" in hidden.roots
    # without include_output the hidden group is left out, with the reason
    plain = pp.prunable_groups(model, (x, mask, y))
    assert HIDDEN not in {g.name for g in plain}
    why = {lo.name: lo.reason for lo in plain.left_out}
    assert why["decoder.embed_tokens"].startswith("its units reach the model output")


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_t5_heads_mlp_and_hidden_equal_a_smaller_t5_replay_and_checkpoint(tmp_path: Path, impl: str) -> None:
    model = t5(impl=impl)
    x, mask, y = inputs()
    src = tmp_path / "ckpt"
    model.save_pretrained(src)
    (src / "spiece.model").write_bytes(b"tokenizer")
    groups = pp.prunable_groups(model, (x, mask, y), include_output=True)
    heads = {SELF_ENC: 1, SELF_DEC: 2, CROSS: 0}
    removed: dict[str, list[int]] = {n: [h] for n, h in heads.items()}
    ff_keep = {}
    for k, g in enumerate(g for g in groups if "DenseReluDense" in g.name):
        gone = list(range(k, 128, 4))  # 32 of 128, other positions per layer
        removed[g.name] = gone
        ff_keep[g.name.rpartition(".")[0]] = [i for i in range(128) if i not in gone]
    removed[HIDDEN] = [0, 5, 9, 63]
    keep = [i for i in range(64) if i not in removed[HIDDEN]]
    plan = pp.plan_pruning(model, removed, example_inputs=(x, mask, y), include_output=True)
    assert {c.key: (c.before, c.after) for c in plan.config.changes} == {
        "d_ff": (128, 96), "d_model": (64, 60), "num_heads": (4, 3)}
    assert plan.config.problems() == []

    ref = reference(model, {"encoder.SelfAttention": 1, "decoder.SelfAttention": 2,
                            "decoder.EncDecAttention": 0}, ff_keep, keep)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    pp.apply_plan(model, plan)
    cross = model.decoder.block[1].layer[1].EncDecAttention
    assert (cross.n_heads, cross.inner_dim, cross.q.weight.shape) == (3, 48, (48, 60))
    assert model.model_dim == 60 and model.config.d_model == 60 and model.config.num_heads == 3
    assert model.lm_head.weight is model.shared.weight is model.encoder.embed_tokens.weight
    torch.testing.assert_close(logits(model, x, mask, y), logits(ref, x, mask, y), rtol=1e-5, atol=1e-5)

    # replay on the saved weights: the same tensors, every key of the tied embedding included
    replayed = pp.apply_to_state_dict(plan, sd)
    pruned = model.state_dict()
    assert sorted(replayed) == sorted(pruned)
    assert all(torch.equal(replayed[k], pruned[k]) for k in pruned)

    # the checkpoint folder, by the CLI: loads cleanly and gives the live model's logits
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["apply", str(tmp_path / "plan.json"), str(src), "-o", str(out)])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert (config["d_model"], config["d_ff"], config["num_heads"], config["d_kv"]) == (60, 96, 3, 16)
    assert (out / "spiece.model").read_bytes() == b"tokenizer"
    loaded, info = transformers.T5ForConditionalGeneration.from_pretrained(
        out, output_loading_info=True, attn_implementation=impl)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set()
    torch.testing.assert_close(logits(loaded.eval(), x, mask, y), logits(model, x, mask, y), rtol=0, atol=0)


def test_t5_heads_in_one_stack_only_are_refused_for_the_checkpoint(tmp_path: Path) -> None:
    model = t5()
    x, mask, y = inputs()
    src = tmp_path / "ckpt"
    model.save_pretrained(src)
    plan = pp.plan_pruning(model, {SELF_ENC: [0, 3]}, example_inputs=(x, mask, y))
    # T5's num_heads holds every attention of both stacks: 2 in the encoder, 4 elsewhere
    (change,) = plan.config.changes
    assert change.key == "num_heads" and change.per_layer == {
        "decoder.block.0.layer.0.SelfAttention": 4, "decoder.block.0.layer.1.EncDecAttention": 4,
        "decoder.block.1.layer.0.SelfAttention": 4, "decoder.block.1.layer.1.EncDecAttention": 4,
        "encoder.block.0.layer.0.SelfAttention": 2, "encoder.block.1.layer.0.SelfAttention": 2}
    with pytest.raises(pp.ConfigError, match=r"num_heads \(one value for all layers, 4 before\): 2 in "
                       r"encoder\.block\.0\.layer\.0\.SelfAttention, encoder\.block\.1\.layer\.0\."
                       r"SelfAttention; 4 in decoder\.block\.0"):
        pp.apply_to_checkpoint(plan, src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # the live model is pruned all the same (each module keeps its own head count); the
    # reference: heads 0 and 3 of both encoder blocks silenced in their output projection (a
    # head reaches the rest of the network only through its columns of o)
    ref = t5()
    with torch.no_grad():
        for block in ref.encoder.block:
            for h in (0, 3):
                block.layer[0].SelfAttention.o.weight[:, h * HD:(h + 1) * HD] = 0
    pp.apply_plan(model, plan)
    assert model.encoder.block[1].layer[0].SelfAttention.n_heads == 2
    assert model.decoder.block[0].layer[1].EncDecAttention.n_heads == 4
    torch.testing.assert_close(logits(model, x, mask, y), logits(ref, x, mask, y), rtol=1e-5, atol=1e-5)


def test_t5_plan_from_metric_equal_counts_reach_the_checkpoint(tmp_path: Path) -> None:
    model = t5()
    x, mask, y = inputs()
    plan = pp.plan_from_metric(model, (x, mask, y), "weight_norm", 0.3)
    # one num_heads and one d_ff for the whole model: the three head groups (encoder, decoder
    # self-attention, cross-attention) lose 1 of 4 each, the four MLPs floor(0.3 * 128) = 38
    assert {g.name: len(g.removed) for g in plan.groups} == {
        SELF_ENC: 1, SELF_DEC: 1, CROSS: 1, **{f"{s}.block.{i}.layer.{n}.DenseReluDense.wi": 38
                                                for s, n in (("encoder", 1), ("decoder", 2)) for i in (0, 1)}}
    assert {c.key: (c.before, c.after) for c in plan.config.changes} == {"d_ff": (128, 90), "num_heads": (4, 3)}
    src = tmp_path / "ckpt"
    model.save_pretrained(src)
    out = pp.apply_to_checkpoint(plan, src, tmp_path / "out")
    loaded = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
    pp.apply_plan(model, plan)
    torch.testing.assert_close(logits(loaded, x, mask, y), logits(model, x, mask, y), rtol=0, atol=0)


def test_a_tied_vocabulary_is_left_out_with_its_reason() -> None:
    # lm_head holds the embedding tensor (T5: shared/encoder/decoder embed_tokens): its output
    # units are the rows token ids index. Offering it used to give a plan apply_plan refused
    # ("decoder.embed_tokens weight would have shape [126, 64] but its attributes say [128, 64]")
    reason = ("its units are the vocabulary rows of the tied embedding {!r}, which token ids index: "
              "removing some would renumber the vocabulary (untie the weights to prune the output "
              "vocabulary)")
    model, x = t5(), inputs()
    groups = pp.prunable_groups(model, x, include_output=True)
    assert "lm_head" not in {r for g in groups for r in g.roots}
    assert [(lo.name, lo.reason) for lo in groups.left_out] == [("lm_head", reason.format("shared"))]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(pp.PlanningError, match=r"^'lm_head' is not prunable: its units are the vocabulary"):
        pp.plan_pruning(model, {"lm_head": [0, 5]}, example_inputs=x, include_output=True)
    # the same with an explicit cascade
    with pytest.raises(pp.PlanningError, match=r"^'lm_head' is not prunable: its units are the vocabulary "
                       r"rows of the tied embedding 'shared'"):
        pp.plan_pruning(model, {"lm_head": [0, 5]}, example_inputs=x, cascades={"lm_head": []})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the hidden size (the embedding's other axis) is still offered
    assert HIDDEN in [g.name for g in groups]

    def llama(tied: bool):
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
                                       tie_word_embeddings=tied)
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(cfg).eval()

    ids = x[0]
    tied = pp.prunable_groups(llama(True), ids, include_output=True)
    assert [(lo.name, lo.reason) for lo in tied.left_out] == [("lm_head", reason.format("model.embed_tokens"))]
    # untied, the output vocabulary is an ordinary output group: pruning it drops logits columns
    untied = llama(False)
    assert "lm_head" in [g.name for g in pp.prunable_groups(untied, ids, include_output=True)]
    with torch.no_grad():
        full = untied(ids).logits
    pp.apply_plan(untied, pp.plan_pruning(untied, {"lm_head": [0, 5]}, example_inputs=ids, include_output=True))
    with torch.no_grad():
        torch.testing.assert_close(untied(ids).logits, full[..., [i for i in range(V) if i not in (0, 5)]])
