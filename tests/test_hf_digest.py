"""The content digest of a model equals that of the checkpoint folder save_pretrained writes.

Why they differed: ``save_pretrained`` stores a tensor tied under several keys once, under its
first key (``model.embed_tokens.weight``, not ``lm_head.weight``; T5's ``shared.weight``, not
its three aliases), while ``model.state_dict()`` lists every key. The digest now counts a tensor
held under several keys (the same memory) once, under its first key; the check still sees any
changed number.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pruneplan as pp
from pruneplan.apply.content import file_digest

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

V = 128


def build(family: str):
    torch.manual_seed(0)
    if family == "llama-tied":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=V, tie_word_embeddings=True)).eval()
    if family == "bert-mlm":
        return transformers.BertForMaskedLM(transformers.BertConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=V)).eval()
    if family == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, vocab_size=V, n_positions=32)).eval()
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, vocab_size=V)).eval()


ALIASES = {"llama-tied": ["lm_head.weight"],
           "bert-mlm": ["cls.predictions.decoder.weight", "cls.predictions.decoder.bias"],
           "gpt2": ["lm_head.weight"],
           "t5": ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"]}


@pytest.mark.parametrize("family", ["llama-tied", "bert-mlm", "gpt2", "t5"])
def test_model_and_saved_folder_have_one_digest(tmp_path: Path, family: str) -> None:
    model = build(family)
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    stored = load_file(tmp_path / "one" / "model.safetensors")
    # what save_pretrained leaves out: exactly the later keys of the tied tensors
    assert sorted(set(model.state_dict()) - set(stored)) == sorted(ALIASES[family])
    digest = pp.weights_digest(model)
    assert file_digest(tmp_path / "one" / "model.safetensors") == digest
    assert pp.weights_digest(tmp_path / "sharded") == digest
    assert pp.weights_digest(model.state_dict()) == digest
    # the definition without tied keys: the same as a plain file holding the stored tensors only
    save_file(stored, str(tmp_path / "plain.safetensors"))
    assert pp.weights_digest(tmp_path / "plain.safetensors") == digest
    # copies under the alias keys (not the same memory) are content of their own
    copies = {k: v.clone() for k, v in model.state_dict().items()}
    assert pp.weights_digest(copies) != digest


def test_checkpoint_apply_warns_only_when_a_number_differs(tmp_path: Path) -> None:
    model = build("llama-tied")
    x = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))
    plan = pp.plan_from_metric(model, x, "weight_norm", 0.25)
    assert plan.provenance.weights_digest == pp.weights_digest(model)
    src = tmp_path / "ckpt"
    model.save_pretrained(src)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pp.WeightsContentWarning)
        pp.apply_to_checkpoint(plan, src, tmp_path / "out")
    # one number of the stored (tied) embedding changed: the warning names the file
    weights = load_file(src / "model.safetensors")
    weights["model.embed_tokens.weight"][3, 5] += 1.0
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(pp.WeightsContentWarning, match=r"model\.safetensors: the weights' content differs"):
        pp.apply_to_checkpoint(plan, src, tmp_path / "out2")
