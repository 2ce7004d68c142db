"""What the Hugging Face sweep (benchmarks/hf_coverage.py) found, each on the smallest config.

Config changes checked by rebuilding the model.

`pruneplan._hf_verify.verify_config` builds the model the rewritten config describes (on the
``meta`` device) and compares its tensor shapes with the pruned ones. Found by the sweep
(benchmarks/hf_coverage.py): widths that no name of `pruneplan.hf_config`'s table reads (BART's
``encoder_ffn_dim``), widths no key holds (a sequence classifier's hidden layer, sized by
``hidden_size``), and per-stage widths held as a list (``hidden_sizes[i]``). Before, the plan's
config part said nothing of them and ``from_pretrained`` refused the folder (mismatched sizes).

Gemma's scaled word embedding (an ``nn.Embedding`` subclass whose forward calls
``super().forward`` and multiplies by ``sqrt(hidden_size)``, a non-persistent buffer) was left
out ("no call discovery recognises used its weight"); it is now the hidden root, and its factor
follows the pruned hidden size as a model built from the rewritten config has it. The reference
is such a model with the kept weights copied by hand.

`plan_from_metric` with a ratio for ``"heads"`` prunes grouped-query attention by its query
heads, the same count from every key/value head; the selection dropped the groups' blocks and
could take both query heads of one key/value head (a `PlanningError` for a valid request).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import pruneplan as pp
from pruneplan.cli import cli
from pruneplan.planner import build_plan

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

V = 128


def ids(t: int = 7) -> torch.Tensor:
    return torch.randint(3, V, (2, t), generator=torch.Generator().manual_seed(1))


def logits(model, *x) -> torch.Tensor:
    with torch.no_grad():
        return model(*x).logits


def cli_apply(tmp_path: Path, model, plan) -> tuple:
    model.save_pretrained(tmp_path / "ckpt")
    plan.save(tmp_path / "plan.json")
    return CliRunner().invoke(cli, ["apply", str(tmp_path / "plan.json"), str(tmp_path / "ckpt"),
                                    "-o", str(tmp_path / "out")])


def bart():
    cfg = transformers.BartConfig(d_model=64, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=4, decoder_attention_heads=4,
                                  encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=V,
                                  max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BartForConditionalGeneration(cfg).eval()


def test_an_mlp_width_under_a_key_the_table_does_not_know_is_found_by_rebuilding(tmp_path: Path) -> None:
    model = bart()
    x = (ids(), None, ids(5))
    groups = {g.name: g for g in pp.prunable_groups(model, x)}
    fc1 = groups["model.encoder.layers.0.fc1"]
    plan = build_plan(model, [(fc1, list(range(0, 128, 4)))])  # 32 of the encoder's 128
    # BART's MLP width is encoder_ffn_dim (the decoder's decoder_ffn_dim stays 128)
    assert [(c.key, c.before, c.after) for c in plan.config.changes] == [("encoder_ffn_dim", 128, 96)]
    assert plan.config.problems() == []
    ref = copy.deepcopy(model)  # reference: fc2's input columns of the removed units zeroed
    with torch.no_grad():
        ref.model.encoder.layers[0].fc2.weight[:, 0:128:4] = 0
    result = cli_apply(tmp_path, model, plan)
    assert result.exit_code == 0, result.output
    pp.apply_plan(model, plan)
    assert model.config.encoder_ffn_dim == 96 and model.config.decoder_ffn_dim == 128
    torch.testing.assert_close(logits(model, *x), logits(ref, *x), rtol=1e-5, atol=1e-5)
    loaded, info = transformers.BartForConditionalGeneration.from_pretrained(
        tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(logits(loaded.eval(), *x), logits(model, *x), rtol=0, atol=0)


def roberta():
    cfg = transformers.RobertaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=4, vocab_size=V, max_position_embeddings=32,
                                     num_labels=3)
    torch.manual_seed(0)
    return transformers.RobertaForSequenceClassification(cfg).eval()


def test_a_width_no_config_key_holds_is_refused_on_the_folder_before_writing(tmp_path: Path, caplog) -> None:
    model = roberta()
    group = next(g for g in pp.prunable_groups(model, ids()) if g.name == "classifier.dense")
    plan = build_plan(model, [(group, [0, 1, 2, 3])])  # the classifier's hidden layer: 64 -> 60
    # its width is hidden_size, which sizes every layer: no key holds it alone
    assert plan.config.changes == []
    assert plan.config.problems() == [
        "no config key holds the pruned width of 3 tensors (a model built from the rewritten "
        "config differs: classifier.dense.bias pruned to [60], built [64]; classifier.dense.weight "
        "pruned to [60, 64], built [64, 64]; classifier.out_proj.weight pruned to [3, 60], built "
        "[3, 64]); prune them only on the live model, or leave their groups out (exclude)"]
    result = cli_apply(tmp_path, model, plan)
    assert result.exit_code == 1 and result.output.startswith("error: ")
    assert "no config key holds the pruned width of 3 tensors" in result.output
    assert "Traceback" not in result.output and len(result.output.splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "plan.json"]  # no temp left
    with pytest.raises(pp.ConfigError, match="no config key holds the pruned width"):
        pp.apply_to_checkpoint(plan, tmp_path / "ckpt", tmp_path / "out2")
    # the live model is still pruned, with a warning that its config cannot say so
    with caplog.at_level("WARNING", logger="pruneplan"):
        pp.apply_plan(model, plan)
    assert model.classifier.dense.out_features == 60
    assert "model.config cannot express the pruned model" in caplog.text


def test_a_stage_width_held_in_a_list_changes_that_element(tmp_path: Path) -> None:
    # ResNet's basic layer: both convolutions of a stage are hidden_sizes[i] wide; the second
    # one's outputs are coupled with the shortcut's (a residual sum), the first one's are its own
    cfg = transformers.ResNetConfig(embedding_size=32, hidden_sizes=[32, 64], depths=[1, 1],
                                    layer_type="basic", num_labels=3)
    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(cfg).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    groups = {g.name: g for g in pp.prunable_groups(model, x)}
    stage = "resnet.encoder.stages.1.layers.0"
    inner = groups[f"{stage}.layer.0.convolution"]
    outer = next(g for g in groups.values() if f"{stage}.shortcut.convolution" in g.roots)
    assert inner.size == outer.size == 64
    # one of them alone: hidden_sizes[1] cannot say it (the other conv keeps 64)
    alone = build_plan(model, [(inner, list(range(0, 64, 2)))])
    assert alone.config.changes == [] and len(alone.config.problems()) == 1
    assert alone.config.problems()[0].startswith(
        "no config key holds the pruned width of 6 tensors (a model built from the rewritten config "
        "differs: resnet.encoder.stages.1.layers.0.layer.0.convolution.weight pruned to [32, 32, 3, 3], "
        "built [64, 32, 3, 3]")
    plan = build_plan(model, [(inner, list(range(0, 64, 2))), (outer, list(range(1, 64, 2)))])
    assert [(c.key, c.before, c.after) for c in plan.config.changes] == [("hidden_sizes[1]", 64, 32)]
    assert plan.config.problems() == []
    result = cli_apply(tmp_path, model, plan)
    assert result.exit_code == 0, result.output
    pp.apply_plan(model, plan)
    assert model.config.hidden_sizes == [32, 32]
    loaded, info = transformers.ResNetForImageClassification.from_pretrained(
        tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["unexpected_keys"]
    assert loaded.config.hidden_sizes == [32, 32]
    torch.testing.assert_close(logits(loaded.eval(), x), logits(model, x), rtol=0, atol=0)


def gemma(hidden: int = 64):
    # 2 query heads and 1 key/value head of 16, MLP 128: every axis of length 64 is the hidden size
    cfg = transformers.GemmaConfig(hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                   vocab_size=V, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.GemmaForCausalLM(cfg).eval()


def test_gemma_scaled_embedding_is_the_hidden_root_and_its_factor_follows(tmp_path: Path) -> None:
    model = gemma()
    x = ids()
    groups = pp.prunable_groups(model, x)
    assert not [lo for lo in groups.left_out if lo.name == "model.embed_tokens"]
    hidden = next(g for g in groups if g.name == "model.embed_tokens")
    assert hidden.size == 64 and ("model.embed_tokens.weight", 1) in {(s.tensor, s.axis) for s in hidden.slices}
    gone = list(range(0, 64, 4))  # 16 of 64
    keep = [c for c in range(64) if c not in gone]
    plan = build_plan(model, [(hidden, gone)])
    # head_dim is explicit in Gemma's config: only the hidden size changes
    assert [(c.key, c.before, c.after) for c in plan.config.changes] == [("hidden_size", 64, 48)]
    # the reference: a Gemma of hidden 48 (its own embed_scale sqrt(48)) with the kept weights
    ref = gemma(48)
    sd = {}
    for key, t in model.state_dict().items():
        for axis, n in enumerate(t.shape):
            if n == 64:
                t = t.index_select(axis, torch.tensor(keep))
        sd[key] = t
    ref.load_state_dict(sd, strict=True)
    assert float(model.model.embed_tokens.embed_scale) == pytest.approx(64 ** 0.5)
    result = cli_apply(tmp_path, model, plan)
    assert result.exit_code == 0, result.output
    pp.apply_plan(model, plan)
    assert float(model.model.embed_tokens.embed_scale) == pytest.approx(48 ** 0.5)
    torch.testing.assert_close(logits(model, x), logits(ref, x), rtol=1e-5, atol=1e-5)
    loaded = transformers.GemmaForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits(loaded, x), logits(model, x), rtol=0, atol=0)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_a_heads_ratio_takes_the_same_count_from_every_key_value_head(scope: str) -> None:
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=V)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    x = ids()
    # weight_norm scores rank layer 1's query heads 0 and 1 (both of key/value head 0) lowest:
    # half the heads must still be one from each key/value head, the lower-scored of its pair
    plan = pp.plan_from_metric(model, x, "weight_norm", {"heads": 0.5}, scope=scope)
    removed = {g.name: g.removed for g in plan.groups}
    assert sorted(removed) == [f"model.layers.{i}.self_attn.heads" for i in (0, 1)]
    for heads in removed.values():
        assert len(heads) == 2 and heads[0] in (0, 1) and heads[1] in (2, 3)
    assert {c.key: (c.before, c.after) for c in plan.config.changes} == {"num_attention_heads": (4, 2)}
    ref = copy.deepcopy(model)  # the removed heads' columns of o_proj zeroed
    with torch.no_grad():
        for i, heads in enumerate(removed[f"model.layers.{i}.self_attn.heads"] for i in (0, 1)):
            for h in heads:
                ref.model.layers[i].self_attn.o_proj.weight[:, h * 16:(h + 1) * 16] = 0
    pp.apply_plan(model, plan)
    assert [layer.self_attn.num_key_value_groups for layer in model.model.layers] == [1, 1]
    torch.testing.assert_close(logits(model, x), logits(ref, x), rtol=1e-5, atol=1e-5)


def roundtrip_cli(tmp_path: Path, model, plan, x) -> None:
    """``pruneplan apply`` on the saved folder, ``from_pretrained`` of the result: clean, and
    the live pruned model's logits exactly."""
    result = cli_apply(tmp_path, model, plan)
    assert result.exit_code == 0, result.output
    pp.apply_plan(model, plan)
    loaded, info = type(model).from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(logits(loaded.eval(), *x), logits(model, *x), rtol=0, atol=0)


def test_a_classifier_width_sized_by_the_hidden_size_follows_it(tmp_path: Path) -> None:
    model = roberta()
    x = (ids(),)
    plan = pp.plan_from_metric(model, x[0], "weight_norm", {"channels": 0.3, "heads": 0.5})
    removed = {g.name: len(g.removed) for g in plan.groups}
    # 2 heads remain, so the hidden size is 2 * 16 (the config derives the head size); the
    # classifier's hidden layer, 30% selected (19), loses 32 as well: its width is hidden_size
    assert removed == {"roberta.embeddings.word_embeddings": 32,
                       "roberta.encoder.layer.0.attention.self.query": 2,
                       "roberta.encoder.layer.0.intermediate.dense": 38, "classifier.dense": 32}
    assert [(c.key, c.before, c.after) for c in plan.config.changes] == [
        ("hidden_size", 64, 32), ("intermediate_size", 128, 90), ("num_attention_heads", 4, 2)]
    assert plan.config.problems() == []
    roundtrip_cli(tmp_path, model, plan, x)


def test_heads_under_a_name_the_table_does_not_read_are_counted_by_their_kind(tmp_path: Path) -> None:
    cfg = transformers.DebertaV2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                       num_attention_heads=4, vocab_size=V, max_position_embeddings=32,
                                       num_labels=3)
    torch.manual_seed(0)
    model = transformers.DebertaV2ForSequenceClassification(cfg).eval()
    x = (ids(),)
    groups = {g.name: g for g in pp.prunable_groups(model, x[0])}
    heads = groups["deberta.encoder.layer.0.attention.self.query_proj"]
    assert heads.kind == "heads" and heads.size == 4
    # heads alone: the config derives the head size as hidden / heads, refused with the reason
    alone = build_plan(model, [(heads, [0, 1])])
    assert [(c.key, c.before, c.after) for c in alone.config.changes] == [("num_attention_heads", 4, 2)]
    assert alone.config.problems()[0].startswith(
        "num_attention_heads/hidden_size: the deberta-v2 config has no head_dim and derives the "
        "head size as hidden_size / num_attention_heads = 64 / 2, but the pruned attention keeps "
        "heads of 16")
    # with the hidden size: 2 heads of 16 (the shapes alone would also fit 4 heads of 8, which
    # from_pretrained would build, computing something else)
    plan = pp.plan_from_metric(model, x[0], "weight_norm", {"channels": 0.3, "heads": 0.5})
    assert [(c.key, c.before, c.after) for c in plan.config.changes] == [
        ("hidden_size", 64, 32), ("intermediate_size", 128, 90), ("num_attention_heads", 4, 2),
        ("pooler_hidden_size", 64, 32)]
    roundtrip_cli(tmp_path, model, plan, x)


def test_bart_encoder_and_decoder_heads_and_hidden_size_through_plan_from_metric(tmp_path: Path) -> None:
    model = bart()
    x = (ids(), None, ids(5))
    groups = pp.prunable_groups(model, x, include_output=True)
    # the encoder's embedding is the hidden root: the getitem of inputs_embeds[:, :, -1] read
    # only for its size does not block it, and `shared` (the same weight) is not reported as
    # an unrecognised layer
    assert [(lo.name, lo.reason.split(":")[0]) for lo in groups.left_out] == [
        ("lm_head", "its units are the vocabulary rows of the tied embedding 'model.shared', which "
                    "token ids index")]
    hidden = next(g for g in groups if g.name == "model.encoder.embed_tokens")
    assert hidden.size == 64 and {"model.shared.weight", "lm_head.weight"} <= {s.tensor for s in hidden.slices}
    plan = pp.plan_from_metric(model, x, "weight_norm", {"channels": 0.3, "heads": 0.5},
                               include_output=True)
    # 2 heads of 16 remain in every attention: d_model 32 (the config derives the head size);
    # both head counts change, or the decoder would be rebuilt with 4 heads of 8
    assert sorted((c.key, c.before, c.after) for c in plan.config.changes) == [
        ("d_model", 64, 32), ("decoder_attention_heads", 4, 2), ("decoder_ffn_dim", 128, 90),
        ("encoder_attention_heads", 4, 2), ("encoder_ffn_dim", 128, 90)]
    assert plan.config.problems() == []
    roundtrip_cli(tmp_path, model, plan, x)


def test_bart_heads_equal_zeroing_their_output_columns() -> None:
    model = bart()
    x = (ids(), None, ids(5))
    heads = [g for g in pp.prunable_groups(model, x) if g.kind == "heads"]
    assert sorted(g.name for g in heads) == ["model.decoder.layers.0.encoder_attn.q_proj",
                                             "model.decoder.layers.0.self_attn.q_proj",
                                             "model.encoder.layers.0.self_attn.q_proj"]
    plan = build_plan(model, [(g, [1, 2]) for g in heads])
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for g in heads:
            o = ref.get_submodule(g.name.rsplit(".", 1)[0] + ".out_proj")
            o.weight[:, 16:48] = 0  # heads 1 and 2 of 16
    pp.apply_plan(model, plan)
    assert model.model.encoder.layers[0].self_attn.num_heads == 2
    torch.testing.assert_close(logits(model, *x), logits(ref, *x), rtol=1e-5, atol=1e-5)


def test_an_embedding_that_indexes_its_own_weight_is_a_root() -> None:
    # Whisper's decoder positions: WhisperPositionalEmbedding.forward returns weight[position_ids]
    cfg = transformers.WhisperConfig(d_model=64, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=4, decoder_attention_heads=4,
                                     encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=V,
                                     num_mel_bins=16, max_source_positions=8, max_target_positions=16,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                     decoder_start_token_id=1)
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(cfg).eval()
    x = (torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(1)), None, ids(5))
    groups = pp.prunable_groups(model, x, include_output=True)
    hidden = next(g for g in groups if "model.decoder.embed_positions" in g.roots)
    assert ("model.decoder.embed_positions", "embedding_dim") in {(e.module, e.attribute) for e in hidden.edits}
    plan = build_plan(model, [(hidden, list(range(0, 64, 2)))])
    pp.apply_plan(model, plan)  # was refused: embed_positions sliced with no embedding_dim edit
    assert model.model.decoder.embed_positions.weight.shape == (16, 32)
    assert model.model.decoder.embed_positions.embedding_dim == 32
    assert logits(model, *x).shape == (2, 5, V)


def test_stablelm_reads_no_head_dim_so_the_hidden_size_is_heads_times_head_size(tmp_path: Path) -> None:
    # StableLM has num_key_value_heads (Llama-like) but computes head_dim = hidden / heads:
    # 2 heads of 16 need hidden 32 exactly (46, a multiple of 2, was planned and refused)
    cfg = transformers.StableLmConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
                                      max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.StableLmForCausalLM(cfg).eval()
    x = (ids(),)
    plan = pp.plan_from_metric(model, x[0], "weight_norm", {"channels": 0.3, "heads": 0.5})
    changes = {c.key: (c.before, c.after) for c in plan.config.changes}
    assert changes["hidden_size"] == (64, 32) and changes["num_attention_heads"] == (4, 2)
    assert plan.config.problems() == []
    roundtrip_cli(tmp_path, model, plan, x)


class Pooled(torch.nn.Module):
    """CLIP's text pooling: the features at one position per sequence, h[arange(B), pos]."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.b(h[torch.arange(h.shape[0]), pos])


@pytest.mark.parametrize("tracer", ["fx", "record"])
def test_advanced_indexing_on_other_axes_keeps_the_channels(tracer: str) -> None:
    torch.manual_seed(0)
    model = Pooled().eval()
    x = (torch.randn(3, 5, 8), torch.tensor([4, 0, 2]))
    groups = pp.prunable_groups(model, x, tracer=tracer)  # was UnsupportedOperationError
    assert [(g.name, g.size) for g in groups] == [("a", 16)]
    plan = build_plan(model, [(groups[0], [1, 5, 6, 11])])
    pruned = pp.apply_plan(copy.deepcopy(model), plan)
    assert pruned.b.weight.shape == (4, 12)
    # the reference: the removed channels zeroed where b reads them
    handle = model.b.register_forward_pre_hook(
        lambda m, a: (a[0].index_fill(-1, torch.tensor([1, 5, 6, 11]), 0.0),))
    with torch.no_grad():
        want = model(*x)
    handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(pruned(*x), want, rtol=1e-6, atol=1e-6)


def test_clip_text_and_vision_towers_through_nested_config_keys(tmp_path: Path) -> None:
    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, vocab_size=V, max_position_embeddings=16),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=4, image_size=32, patch_size=8),
        projection_dim=32)
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval()
    x = (ids(), torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    plan = pp.plan_from_metric(model, x, "weight_norm", {"channels": 0.3, "heads": 0.5},
                               include_output=True)
    # both towers: 2 heads of 16 (hidden 32, the head size derived), MLP 90; the head counts
    # are nested keys (with 32 rows a model built with 4 heads would have heads of 8)
    assert sorted((c.key, c.before, c.after) for c in plan.config.changes) == [
        (f"{t}_config.{k}", b, a) for t in ("text", "vision")
        for k, b, a in (("hidden_size", 64, 32), ("intermediate_size", 128, 90),
                        ("num_attention_heads", 4, 2))]
    assert plan.config.problems() == []
    result = cli_apply(tmp_path, model, plan)
    assert result.exit_code == 0, result.output
    pp.apply_plan(model, plan)
    assert model.config.text_config.num_attention_heads == 2
    loaded, info = transformers.CLIPModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(*x).logits_per_image, model(*x).logits_per_image,
                                   rtol=0, atol=0)


def test_albert_hidden_size_is_the_width_the_heads_meet_not_the_embedding_width(tmp_path: Path) -> None:
    # ALBERT embeds in embedding_size (32) and maps to hidden_size (64) for its shared layer:
    # the hidden group fitted to the heads is the encoder's (it slices the rows of the output
    # projection whose columns the heads slice), not the word embeddings' (named like a hidden
    # size in the config table)
    cfg = transformers.AlbertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, embedding_size=32, vocab_size=V,
                                    max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    model = transformers.AlbertForSequenceClassification(cfg).eval()
    x = (ids(),)
    plan = pp.plan_from_metric(model, x[0], "weight_norm", {"channels": 0.3, "heads": 0.5})
    changes = {c.key: (c.before, c.after) for c in plan.config.changes}
    assert changes["hidden_size"] == (64, 32) and changes["num_attention_heads"] == (4, 2)
    assert changes["embedding_size"] == (32, 23)  # 30% of the embedding width, its own key
    assert plan.config.problems() == []
    roundtrip_cli(tmp_path, model, plan, x)


def test_bloom_heads_are_left_out_with_the_alibi_reason() -> None:
    cfg = transformers.BloomConfig(hidden_size=64, n_layer=1, n_head=4, vocab_size=V)
    torch.manual_seed(0)
    model = transformers.BloomForCausalLM(cfg).eval()
    groups = pp.prunable_groups(model, ids())
    reasons = {lo.name: lo.reason for lo in groups.left_out}
    assert reasons["transformer.h.0.self_attention.query_key_value"] == (
        "they reach operation 'baddbmm' in module 'transformer.h.0.self_attention': a batched "
        "product added to a bias in one call; attention scores computed this way with ALiBi "
        "biases (BLOOM) get biases built from the head count, so removing heads would change "
        "those of the heads that remain")
    assert not [g for g in groups if g.kind != "channels"]
