"""Checkpoint folders of models that transformers saves under other names than their state dict.

transformers 5 loads ViT checkpoints through a weight conversion mapping and reverts it on
``save_pretrained``: the live key ``vit.layers.0.attention.q_proj.weight`` is stored as
``vit.encoder.layer.0.attention.attention.query.weight``. A plan made on the live model records
those names (``config.saved_names``, plan version 3) and the folder appliers read and write the
folder under them. The reference of every loaded model is `apply_plan` on the live model (an
independent path: it slices the live tensors, not the files).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import pruneplan as pp
from pruneplan.cli import cli
from pruneplan.planner import build_plan, saved_names

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
T = transformers


def vit():
    cfg = T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      image_size=32, patch_size=8, num_labels=3)
    torch.manual_seed(0)
    return T.ViTForImageClassification(cfg).eval()


def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def vit_plan(model, **kw):
    """Heads, MLP and hidden size: one head of four per layer with 8 hidden channels (so that
    hidden / heads stays the head size 8, which ViT's config derives), 21 of 64 MLP units (1, 4, ..., 61 or 2, 5, ..., 62)."""
    by = {g.name: g for g in pp.prunable_groups(model, images())}
    chosen = [(by["vit.embeddings.patch_embeddings.projection"], [0, 3, 5, 9, 14, 20, 27, 31]),
              (by["vit.layers.0.attention.q_proj"], [1]), (by["vit.layers.1.attention.q_proj"], [2]),
              (by["vit.layers.0.mlp.fc1"], list(range(1, 64, 3))),
              (by["vit.layers.1.mlp.fc1"], list(range(2, 64, 3)))]
    return build_plan(model, chosen, **kw)


def stored_keys(folder: Path) -> set[str]:
    keys: set[str] = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            keys |= set(fh.keys())
    return keys


def test_vit_plan_records_the_names_save_pretrained_writes(tmp_path: Path) -> None:
    model = vit()
    plan = vit_plan(model)
    names = plan.config.saved_names
    # per layer: q/k/v/o weight and bias (8), both LayerNorms (4), fc1/fc2 (4); 2 layers
    assert len(names) == 32 and plan.version == 3
    assert names["vit.layers.0.attention.q_proj.weight"] == "vit.encoder.layer.0.attention.attention.query.weight"
    assert names["vit.layers.1.attention.o_proj.bias"] == "vit.encoder.layer.1.attention.output.dense.bias"
    assert names["vit.layers.0.mlp.fc1.weight"] == "vit.encoder.layer.0.intermediate.dense.weight"
    assert names["vit.layers.0.mlp.fc2.weight"] == "vit.encoder.layer.0.output.dense.weight"
    # independent reference: the folder save_pretrained writes holds exactly the renamed keys
    # in place of the state-dict keys
    model.save_pretrained(tmp_path / "src")
    live = set(model.state_dict())
    assert stored_keys(tmp_path / "src") == (live - set(names)) | set(names.values())
    plan.save(tmp_path / "plan.json")
    shown = CliRunner().invoke(cli, ["show", str(tmp_path / "plan.json")])
    assert shown.exit_code == 0 and (
        "checkpoint names: 32 tensors are saved under other names (e.g. vit.layers.0.attention.k_proj.bias "
        "as vit.encoder.layer.0.attention.attention.key.bias)\n") in shown.output
    again = pp.PrunePlan.from_json(plan.to_json())
    assert again == plan and json.loads(plan.to_json())["config"]["saved_names"] == names


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["single", "sharded"])
def test_vit_folder_pruned_by_the_cli_loads_and_gives_the_live_logits(tmp_path: Path, shard: str | None) -> None:
    model = vit()
    plan = vit_plan(model)
    assert [c.describe() for c in plan.config.changes] == [
        "hidden_size: 32 -> 24", "intermediate_size: 64 -> 43", "num_attention_heads: 4 -> 3"]
    model.save_pretrained(tmp_path / "src", **({"max_shard_size": shard} if shard else {}))
    assert (len(list((tmp_path / "src").glob("*.safetensors"))) > 1) == bool(shard)
    plan.save(tmp_path / "plan.json")
    run = CliRunner()
    ok = run.invoke(cli, ["validate", str(tmp_path / "plan.json"), str(tmp_path / "src")])
    assert ok.exit_code == 0 and ok.output.startswith("ok: "), ok.output
    out = tmp_path / "out"
    result = run.invoke(cli, ["apply", str(tmp_path / "plan.json"), str(tmp_path / "src"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    # the pruned folder keeps the saved names (what from_pretrained converts from)
    assert stored_keys(out) == stored_keys(tmp_path / "src")
    loaded, info = T.ViTForImageClassification.from_pretrained(out, output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    fresh = pp.load_pruned(vit(), plan, out)  # the same folder through load_pruned
    pp.apply_plan(model, plan)
    assert model.vit.layers[0].attention.q_proj.weight.shape == (24, 24)
    assert model.vit.layers[1].mlp.fc1.weight.shape == (43, 24)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x).logits, model(x).logits, rtol=0, atol=0)
        torch.testing.assert_close(fresh(x).logits, model(x).logits, rtol=0, atol=0)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_a_folder_saved_under_the_state_dict_names_works_too(tmp_path: Path) -> None:
    model = vit()
    plan = vit_plan(model)
    model.save_pretrained(tmp_path / "src", save_original_format=False)
    assert stored_keys(tmp_path / "src") == set(model.state_dict())
    pp.apply_to_checkpoint(plan, tmp_path / "src", tmp_path / "out")
    assert stored_keys(tmp_path / "out") == set(model.state_dict())
    fresh = pp.load_pruned(vit(), plan, tmp_path / "out")
    pp.apply_plan(model, plan)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, model(x).logits, rtol=0, atol=0)


def test_single_file_and_content_check_use_the_saved_names(tmp_path: Path) -> None:
    """`apply` on the folder's model.safetensors alone, with the content check as an error: the
    digest of the file under the state-dict names is the live model's."""
    model = vit()
    plan = vit_plan(model, provenance={"weights_digest": pp.weights_digest(model)})
    model.save_pretrained(tmp_path / "src")
    pp.check_weights(plan, tmp_path / "src" / "model.safetensors", check_content="error")
    pp.apply_to_safetensors(plan, tmp_path / "src" / "model.safetensors", tmp_path / "p.safetensors",
                            check_content="error")
    pruned = load_file(str(tmp_path / "p.safetensors"))
    assert pruned["vit.encoder.layer.0.attention.attention.query.weight"].shape == (24, 24)
    # the same tensors through apply_to_state_dict (names kept) and load_pruned (a state dict)
    source = load_file(str(tmp_path / "src" / "model.safetensors"))
    sliced = pp.apply_to_state_dict(plan, source)
    assert sorted(sliced) == sorted(pruned)
    for key, value in pruned.items():
        torch.testing.assert_close(sliced[key], value, rtol=0, atol=0, msg=key)
    fresh = pp.load_pruned(vit(), plan, sliced)
    pp.apply_plan(model, plan)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0, msg=key)
    # the content check still sees a changed tensor under its saved name
    sd = load_file(str(tmp_path / "src" / "model.safetensors"))
    sd["vit.encoder.layer.1.output.dense.bias"] += 1
    save_file(sd, str(tmp_path / "changed.safetensors"))
    with pytest.raises(pp.PlanMismatchError, match="content"):
        pp.check_weights(plan, tmp_path / "changed.safetensors", check_content="error")


def test_mixed_naming_is_refused_naming_the_tensor(tmp_path: Path) -> None:
    model = vit()
    plan = vit_plan(model)
    model.save_pretrained(tmp_path / "src")
    path = tmp_path / "src" / "model.safetensors"
    sd = load_file(str(path))
    sd["vit.layers.0.mlp.fc1.weight"] = sd.pop("vit.encoder.layer.0.intermediate.dense.weight")
    save_file(sd, str(path), metadata={"format": "pt"})
    before = path.read_bytes()
    result = CliRunner().invoke(cli, ["apply", str(_save(plan, tmp_path)), str(tmp_path / "src"),
                                      "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and len(result.output.splitlines()) == 1
    assert result.output == (
        f"error: {tmp_path / 'src'}: holds 'vit.layers.0.mlp.fc1.weight' under its state-dict name but "
        "other tensors under the names save_pretrained gives them (e.g. "
        "'vit.encoder.layer.0.intermediate.dense.weight'); the plan reads one naming or the other, "
        "not both\n")
    assert path.read_bytes() == before and not (tmp_path / "out").exists()


def _save(plan: pp.PrunePlan, tmp_path: Path) -> Path:
    plan.save(tmp_path / "plan.json")
    return tmp_path / "plan.json"


def test_version_rules_of_saved_names() -> None:
    plan = vit_plan(vit())
    data = json.loads(plan.to_json())
    data["version"] = 2
    with pytest.raises(pp.PlanValidationError, match=r"config\.saved_names needs plan version 3, this plan says 2"):
        pp.PrunePlan.from_dict(data)
    data["version"] = 3
    data["config"]["saved_names"]["vit.layers.0.mlp.fc2.weight"] = data["config"]["saved_names"][
        "vit.layers.0.mlp.fc1.weight"]
    with pytest.raises(pp.PlanValidationError, match="have the same saved name"):
        pp.PrunePlan.from_dict(data)


# Which of the Hugging Face models of the tests transformers 5 saves under other names: only ViT
# (its modelling code was rewritten; the mapping keeps the hub's checkpoints loading). A
# plan of the others stays a version-2 document with no saved names.
OTHERS = {
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=50)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=50)),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(hidden_size=32, intermediate_size=64,
                                                            num_hidden_layers=1, num_attention_heads=4,
                                                            num_key_value_heads=2, vocab_size=50)),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=50)),
    "bert": lambda: T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                             intermediate_size=64, vocab_size=50)),
    "distilbert": lambda: T.DistilBertModel(T.DistilBertConfig(dim=32, n_layers=1, n_heads=4, hidden_dim=64,
                                                               vocab_size=50)),
    "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=4,
                                                          d_kv=8, vocab_size=50)),
}


@pytest.mark.parametrize("family", sorted(OTHERS))
def test_other_models_save_under_their_state_dict_names(tmp_path: Path, family: str) -> None:
    model = OTHERS[family]()
    assert saved_names(model) == {}
    # independent reference: what save_pretrained writes (tied keys are stored once)
    model.save_pretrained(tmp_path)
    assert stored_keys(tmp_path) <= set(model.state_dict())


def test_converted_tensors_are_logged_not_recorded(caplog) -> None:
    """Mixtral's experts are one merged tensor live and one per expert on disk: a conversion,
    not a renaming; its router is renamed (``mlp.gate`` saved as ``block_sparse_moe.gate``)."""
    cfg = T.MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=50, num_local_experts=2)
    model = T.MixtralForCausalLM(cfg)
    with caplog.at_level(logging.WARNING, logger="pruneplan.planner"):
        names = saved_names(model)
    assert names == {"model.layers.0.mlp.gate.weight": "model.layers.0.block_sparse_moe.gate.weight"}
    assert "transformers saves 2 tensors of this model converted, not renamed (e.g. " \
           "'model.layers.0.mlp.experts.down_proj')" in caplog.text


def test_plain_models_have_no_saved_names() -> None:
    assert saved_names(torch.nn.Linear(2, 3)) == {}


def test_compose_keeps_the_saved_names(tmp_path: Path) -> None:
    """An MLP plan, then a plan of the pruned model's heads and hidden size: the composed plan
    (relative to the original) carries the saved names and applies to the original folder as
    the two plans do one after the other on the live model."""
    model = vit()
    by = {g.name: g for g in pp.prunable_groups(model, images())}
    mlp = build_plan(model, [(by[f"vit.layers.{i}.mlp.fc1"], list(range(i, 64, 4))) for i in (0, 1)])
    reference = vit()
    model.save_pretrained(tmp_path / "src")
    pp.apply_plan(reference, mlp)
    by = {g.name: g for g in pp.prunable_groups(reference, images())}
    rest = build_plan(reference, [(by["vit.embeddings.patch_embeddings.projection"], [1, 2, 3, 4, 5, 6, 7, 8]),
                                  (by["vit.layers.0.attention.q_proj"], [0]),
                                  (by["vit.layers.1.attention.q_proj"], [3])])
    pp.apply_plan(reference, rest)
    both = pp.compose([mlp, rest])
    assert both.config.saved_names == mlp.config.saved_names == rest.config.saved_names
    assert len(both.config.saved_names) == 32 and both.version == 3
    pp.apply_to_checkpoint(both, tmp_path / "src", tmp_path / "out")
    loaded = T.ViTForImageClassification.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images()).logits, reference(images()).logits, rtol=1e-6, atol=1e-6)
