"""Hugging Face checkpoint folders through `validate`, `load_pruned` and `apply -o` inside them.

`apply` reads a folder holding ``config.json`` beside one ``model.safetensors`` or shards and an
index, where ``save_pretrained`` stores a tied tensor once (``lm_head.weight`` is the embedding).
`validate` and `load_pruned` must take exactly those folders (the shared reading of
`pruneplan.apply.checkpoint`). The reference of a loaded model is the live model pruned by
`apply_plan` (an independent path: it slices the live tensors, not the files).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import pruneplan as pp
from pruneplan.cli import cli
from pruneplan.planner import build_plan

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

V = 128


def llama(tie: bool):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
                                   tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))


def make(tmp_path: Path, tie: bool, shard: str | None):
    """A saved checkpoint folder, the MLP plan (every third unit of both layers) and its file."""
    model = llama(tie)
    src = tmp_path / "ckpt"
    model.save_pretrained(src, **({"max_shard_size": shard} if shard else {}))
    groups = [g for g in pp.prunable_groups(model, ids()) if ".mlp." in g.name]
    plan = build_plan(model, [(g, list(range(1, g.size, 3))) for g in groups])
    plan.save(tmp_path / "plan.json")
    return model, src, plan


CASES = [(False, None), (True, None), (False, "20KB"), (True, "20KB")]
IDS = ["single", "single-tied", "sharded", "sharded-tied"]


@pytest.mark.parametrize(("tie", "shard"), CASES, ids=IDS)
def test_validate_and_load_pruned_take_what_apply_takes(tmp_path: Path, tie: bool, shard: str | None) -> None:
    model, src, plan = make(tmp_path, tie, shard)
    stored = sorted(p.name for p in src.glob("*.safetensors"))
    assert (len(stored) > 1) == bool(shard)
    if tie:  # save_pretrained stores the tied tensor once: the plan names a key the folder lacks
        assert plan.config.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    run = CliRunner()
    result = run.invoke(cli, ["validate", str(tmp_path / "plan.json"), str(src)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"ok: 2 groups, digest {plan.digest()}; fits {src}")
    pp.check_checkpoint(plan, src)  # the API says the same
    out = tmp_path / "out"
    assert run.invoke(cli, ["apply", str(tmp_path / "plan.json"), str(src), "-o", str(out)]).exit_code == 0
    # validate on the pruned folder: already pruned by this plan (exit 1, one line)
    again = run.invoke(cli, ["validate", str(tmp_path / "plan.json"), str(out)])
    assert again.exit_code == 1 and "already pruned" in again.output and len(again.output.splitlines()) == 1

    fresh = llama(tie)
    pp.load_pruned(fresh, plan, out)  # the folder itself, sharded or not, tied or not
    pp.apply_plan(model, plan)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0, msg=key)
    # 128 - 43 units (1, 4, ..., 127) of each MLP remain
    assert fresh.model.layers[0].mlp.down_proj.weight.shape == (64, 85)
    if tie:  # still one tensor: the head is the embedding
        assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, model(x).logits, rtol=0, atol=0)


def test_validate_hf_folder_reports_a_plan_that_does_not_fit(tmp_path: Path) -> None:
    _, _, plan = make(tmp_path, True, "20KB")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=V)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "narrow")
    result = CliRunner().invoke(cli, ["validate", str(tmp_path / "plan.json"), str(tmp_path / "narrow")])
    assert result.exit_code == 1 and result.output.startswith("error: ")
    assert "Traceback" not in result.output and len(result.output.splitlines()) == 1
    with pytest.raises(pp.PlanMismatchError):
        pp.check_checkpoint(plan, tmp_path / "narrow")


@pytest.mark.parametrize("hf", [True, False], ids=["hf-folder", "sharded-folder"])
@pytest.mark.parametrize("inside", ["sub", "sub/deeper"])
def test_apply_output_inside_the_source_folder_is_refused_before_writing(
        tmp_path: Path, hf: bool, inside: str) -> None:
    _, src, _ = make(tmp_path, True, "20KB")
    if not hf:
        os.remove(src / "config.json")
        os.remove(src / "generation_config.json")
    if "/" in inside:
        (src / "sub").mkdir()
    before = sorted(p.relative_to(src).as_posix() for p in src.rglob("*"))
    result = CliRunner().invoke(cli, ["apply", str(tmp_path / "plan.json"), str(src), "-o", str(src / inside)])
    assert result.exit_code == 1, result.output
    assert result.output == (f"error: {src / inside}: the output folder is inside the input folder "
                             f"{str(src)!r}; choose an output outside it\n")
    assert sorted(p.relative_to(src).as_posix() for p in src.rglob("*")) == before  # nothing left
    assert not list(tmp_path.glob(".*.tmp"))


def test_apply_to_checkpoint_leaves_no_temporary_folder_on_failure(tmp_path: Path, monkeypatch) -> None:
    _, src, plan = make(tmp_path, False, None)
    from pruneplan.apply import checkpoint

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "_fsync", boom)
    with pytest.raises(OSError, match="No space left"):
        pp.apply_to_checkpoint(plan, src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "plan.json"]
