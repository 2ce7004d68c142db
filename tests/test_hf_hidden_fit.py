"""plan_from_metric keeps a hidden size the config can hold with the heads that remain.

Which configs need what (measured on transformers 5.24): Llama's config validates
``hidden_size % num_attention_heads == 0`` (even with ``head_dim`` written); BERT, GPT-2, ViT
and DistilBERT derive the head size as hidden / heads, so the hidden size must be exactly
heads * head size; T5 (``d_kv``) and Qwen2/Mistral validate nothing of the kind, but pruneplan's
config check asks for a multiple of the heads in every config that is not T5-style.
"""

from __future__ import annotations

import logging

import pytest
import torch

import pruneplan as pp
from pruneplan.hf_config import hidden_fits

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

V = 128


def ids() -> torch.Tensor:
    return torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))


def test_hidden_fits_per_config_style() -> None:
    llama = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    bert = {"hidden_size": 64, "num_attention_heads": 4}
    t5 = {"d_model": 64, "num_heads": 4, "d_kv": 16}
    assert [k for k in range(40, 64) if hidden_fits(llama, k, 3)] == [42, 45, 48, 51, 54, 57, 60, 63]
    assert [k for k in range(1, 65) if hidden_fits(bert, k, 3)] == [48]  # 3 heads of 64 / 4
    assert all(hidden_fits(t5, k, 3) for k in range(1, 65))
    # transformers agrees where it validates: Llama refuses 62 for 4 heads
    with pytest.raises(Exception, match=r"hidden size \(62\) is not a multiple"):
        transformers.LlamaConfig(hidden_size=62, num_attention_heads=4, head_dim=16).validate()


def test_llama_hidden_keeps_a_multiple_of_the_remaining_heads(caplog) -> None:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=V)
    model = transformers.LlamaForCausalLM(cfg).eval()
    # query groups 2 -> 1 (4 -> 2 query heads); hidden 30%: 19 of 64 go, 45 kept, which is not a
    # multiple of the 2 heads left: 46 (a multiple of the original 4 would have been 48)
    with caplog.at_level(logging.INFO, logger="pruneplan.loading"):
        plan = pp.plan_from_metric(model, ids(), "weight_norm", 0.0,
                                   kind_ratios={"query_groups": 0.5}, layer_ratios={"model.embed_tokens": 0.3})
    assert {c.key: (c.before, c.after) for c in plan.config.changes} == {
        "hidden_size": (64, 46), "num_attention_heads": (4, 2), "num_key_value_heads": (2, 1)}
    assert plan.config.problems() == []
    assert "group 'model.embed_tokens' keeps 46 hidden channels (selected: 45)" in caplog.text


def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, vocab_size=V)
    # the masked-LM head reads the hidden size (its decoder is the tied word embedding), so the
    # hidden group does not reach the model output
    return transformers.BertForMaskedLM(cfg).eval()


def test_bert_hidden_is_heads_times_head_size(caplog, tmp_path) -> None:
    model = bert()
    # one head of 4 per layer; hidden 10%: 6 of 64 go, 58 kept; the config derives the head
    # size from hidden / heads, so 3 heads of 16 need exactly 48: 10 more channels go
    with caplog.at_level(logging.INFO, logger="pruneplan.loading"):
        plan = pp.plan_from_metric(model, ids(), "weight_norm", 0.0, kind_ratios={"heads": 0.25},
                                   layer_ratios={"bert.embeddings.word_embeddings": 0.1})
    assert {c.key: (c.before, c.after) for c in plan.config.changes} == {
        "hidden_size": (64, 48), "num_attention_heads": (4, 3)}
    assert plan.config.problems() == []
    assert ("group 'bert.embeddings.word_embeddings' keeps 48 hidden channels instead of the 58 selected: "
            "the config derives the head size from hidden / heads, and 3 heads remain") in caplog.text
    src = tmp_path / "ckpt"
    model.save_pretrained(src)
    out = pp.apply_to_checkpoint(plan, src, tmp_path / "out")
    loaded = transformers.BertForMaskedLM.from_pretrained(out).eval()
    pp.apply_plan(model, plan)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)


def test_bert_hidden_alone_cannot_shrink(caplog) -> None:
    model = bert()
    with caplog.at_level(logging.WARNING, logger="pruneplan.loading"):
        plan = pp.plan_from_metric(model, ids(), "weight_norm", 0.0,
                                   layer_ratios={"bert.embeddings.word_embeddings": 0.25})
    # 4 heads of 16 remain: only a hidden size of 64 fits, so the hidden group keeps all
    assert plan.groups == [] and plan.config.changes == []
    assert ("group 'bert.embeddings.word_embeddings' keeps 64 hidden channels instead of the 48 selected: "
            "the config derives the head size from hidden / heads, and 4 heads remain") in caplog.text
