"""Sharded safetensors checkpoints (Hugging Face layout): pruned shard by shard, checked first.

The checkpoint is built by hand from a small Conv->BN->ReLU->Conv->Flatten->Linear model, with
each kind of sliced tensor in a different shard from its partners: the first conv's weight
(output-sliced) in shard 1, its bias and the BatchNorm in shard 2, the second conv's weight
(input- and output-sliced) and the Linear weight (Flatten blocks of input features) in shard 3.
The reference for every pruned tensor is `apply_to_state_dict` on the whole in-memory state dict
(another code path: no files, no streaming); sizes are recomputed here with torch's own
`numel() * element_size()`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import pruneplan as pp
from pruneplan.apply import sharded
from pruneplan.apply.safetensors_io import DIGEST_KEY
from pruneplan.cli import cli

INDEX = "model.safetensors.index.json"
S1, S2, S3 = (f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))
SHARDS = {
    S1: ["0.weight", "5.bias"],
    S2: ["0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked",
         "3.bias"],
    S3: ["3.weight", "5.weight"],
}
REMOVED = {"0": [0, 2, 5], "3": [1, 4]}


def make_model() -> nn.Sequential:
    # 4x4 inputs keep their size through the padded convs: Flatten gives 6 * 16 = 96 features
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 6, 3, padding=1), nn.Flatten(), nn.Linear(96, 10))


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def write_checkpoint(folder: Path, state: dict[str, torch.Tensor]) -> dict:
    """Shards as `save_pretrained` writes them (metadata {"format": "pt"}) and their index."""
    for file, names in SHARDS.items():
        save_file({n: state[n] for n in names}, str(folder / file), metadata={"format": "pt"})
    index = {"metadata": {"total_size": nbytes(state.values()), "note": "kept"},
             "weight_map": {n: file for file, names in SHARDS.items() for n in names}}
    (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


@dataclass
class Ckpt:
    root: Path  # the test's temporary folder
    dir: Path  # the checkpoint folder
    model: nn.Module
    x: torch.Tensor
    plan: pp.PrunePlan
    plan_path: Path
    state: dict[str, torch.Tensor]
    index: dict

    def edit_index(self, change: Callable[[dict], None]) -> None:
        data = copy.deepcopy(self.index)
        change(data)
        (self.dir / INDEX).write_text(json.dumps(data, indent=2))


@pytest.fixture
def ckpt(tmp_path: Path) -> Ckpt:
    torch.manual_seed(0)
    model = make_model()
    x = torch.randn(4, 3, 4, 4)
    model.train()
    model(x)  # non-trivial BatchNorm statistics
    model.eval()
    plan = pp.plan_pruning(model, REMOVED, example_inputs=x)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    index = write_checkpoint(folder, state)
    (folder / "config.json").write_text('{"architectures": ["Net"]}')  # not a weight: not copied
    return Ckpt(tmp_path, folder, model, x, plan, plan.save(tmp_path / "plan.json"), state, index)


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


# --- the output ---------------------------------------------------------------------------------


def test_output_equals_the_state_dict_applier_in_the_same_places(ckpt: Ckpt) -> None:
    out = pp.apply_to_sharded_safetensors(ckpt.plan, ckpt.dir, ckpt.root / "out")
    assert out == ckpt.root / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted([INDEX, S1, S2, S3])  # no config.json
    expected = pp.apply_to_state_dict(ckpt.plan, ckpt.state)
    got: dict[str, torch.Tensor] = {}
    for file, names in SHARDS.items():
        shard = load_file(str(out / file))
        assert sorted(shard) == sorted(names), file  # every tensor stays in its shard
        got.update(shard)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    # by hand: conv0 keeps 5 of 8 filters, conv3 keeps 4 of 6 (inputs 5), Linear 4 channels x 16
    assert tuple(got["0.weight"].shape) == (5, 3, 3, 3) and tuple(got["1.running_var"].shape) == (5,)
    assert tuple(got["3.weight"].shape) == (4, 5, 3, 3)
    assert tuple(got["5.weight"].shape) == (10, 64)
    # the index: same weight_map, total_size of the pruned data, other keys kept, the digest added;
    # written the way transformers writes it (json.dumps(indent=2, sort_keys=True) + "\n")
    index = json.loads((out / INDEX).read_text())
    assert index["weight_map"] == ckpt.index["weight_map"]
    total = nbytes(expected.values())
    assert total == 4 * (5 * 27 + 5 + 4 * 5 + 4 * 45 + 4 + 640 + 10) + 8  # fp32 + one int64 counter
    assert index["metadata"] == {"total_size": total, "note": "kept", DIGEST_KEY: ckpt.plan.digest()}
    assert (out / INDEX).read_text() == json.dumps(index, indent=2, sort_keys=True) + "\n"
    for file in SHARDS:
        with safe_open(str(out / file), framework="pt") as f:
            assert f.metadata() == {"format": "pt", DIGEST_KEY: ckpt.plan.digest()}


def test_shard_bytes_match_save_file(ckpt: Ckpt) -> None:
    # Golden reference: safetensors' own writer on each shard's reference tensors. It writes the
    # metadata map in a random order (a Rust HashMap: seen to change from run to run), so the
    # metadata is compared as a dict; everything else (header length, tensor entries in order,
    # data bytes) must be identical.
    out = pp.apply_to_sharded_safetensors(ckpt.plan, ckpt.dir, ckpt.root / "out")
    expected = pp.apply_to_state_dict(ckpt.plan, ckpt.state)
    for file, names in SHARDS.items():
        ref = ckpt.root / f"ref-{file}"
        save_file({n: expected[n] for n in names}, str(ref),
                  metadata={"format": "pt", DIGEST_KEY: ckpt.plan.digest()})
        ours, theirs = (out / file).read_bytes(), ref.read_bytes()
        (n,) = struct.unpack("<Q", ours[:8])
        assert ours[:8] == theirs[:8] and ours[8 + n:] == theirs[8 + n:], file
        a, b = (json.loads(raw[8 : 8 + n], object_pairs_hook=list) for raw in (ours, theirs))
        assert a[1:] == b[1:] and a[0][0] == b[0][0] == "__metadata__", file
        assert dict(a[0][1]) == dict(b[0][1]) and [k for k, _ in a[0][1]] == ["format", DIGEST_KEY]


def test_two_runs_give_byte_identical_folders(ckpt: Ckpt) -> None:
    a = pp.apply_to_sharded_safetensors(ckpt.plan, ckpt.dir, ckpt.root / "a")
    b = pp.apply_to_sharded_safetensors(ckpt.plan, ckpt.dir / INDEX, ckpt.root / "b")  # via the index
    assert hashes(a) == hashes(b) and len(hashes(a)) == 4


def test_load_pruned_from_the_folder_and_the_index(ckpt: Ckpt) -> None:
    out = pp.apply_to_sharded_safetensors(ckpt.plan, ckpt.dir, ckpt.root / "out")
    live = pp.apply_plan(copy.deepcopy(ckpt.model), ckpt.plan)
    for source in (out, out / INDEX):
        fresh = pp.load_pruned(make_model().eval(), ckpt.plan, source)
        with torch.no_grad():
            torch.testing.assert_close(fresh(ckpt.x), live(ckpt.x), rtol=0, atol=0)
    other = pp.plan_pruning(ckpt.model, {"0": [1]}, example_inputs=ckpt.x)
    with pytest.raises(pp.PlanMismatchError, match=f"pruned by plan {ckpt.plan.digest()[:12]}"):
        pp.load_pruned(make_model(), other, out)


def test_check_sharded_weights(ckpt: Ckpt) -> None:
    assert pp.check_sharded_weights(ckpt.plan, ckpt.dir) is None
    out = pp.apply_to_sharded_safetensors(ckpt.plan, ckpt.dir, ckpt.root / "out")
    # the pruned checkpoint records this plan's digest and has its pruned shapes (conv0 bias 8 -> 5)
    with pytest.raises(pp.AlreadyPrunedError, match=r"already pruned by this plan \(" + ckpt.plan.digest()[:12]):
        pp.check_sharded_weights(ckpt.plan, out)
    # without the recorded digest it is just a shape mismatch
    index = next(out.glob("*.index.json"))
    doc = json.loads(index.read_text())
    del doc["metadata"]["pruneplan.plan_digest"]
    index.write_text(json.dumps(doc))
    with pytest.raises(pp.PlanMismatchError, match=r"tensor '0.bias' has shape \[5\], the plan expects \[8\]"):
        pp.check_sharded_weights(ckpt.plan, out)


def test_a_plan_for_another_model_is_refused_before_writing(ckpt: Ckpt) -> None:
    torch.manual_seed(1)
    other = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3))
    plan = pp.plan_pruning(other, {"0": [1]}, example_inputs=ckpt.x)
    with pytest.raises(pp.PlanMismatchError, match="differ from the model the plan was made for"):
        pp.apply_to_sharded_safetensors(plan, ckpt.dir, ckpt.root / "out")
    assert not (ckpt.root / "out").exists()


# --- the output folder ----------------------------------------------------------------------------


def test_existing_output_is_refused_then_replaced_with_overwrite(ckpt: Ckpt) -> None:
    dst = ckpt.root / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    with pytest.raises(pp.OutputFileError, match="out: output exists"):
        pp.apply_to_sharded_safetensors(ckpt.plan, ckpt.dir, dst)
    assert hashes(dst) == {"old.txt": hashlib.sha256(b"old").hexdigest()}
    fresh = pp.apply_to_sharded_safetensors(ckpt.plan, ckpt.dir, ckpt.root / "fresh")
    pp.apply_to_sharded_safetensors(ckpt.plan, ckpt.dir, dst, overwrite=True)
    assert hashes(dst) == hashes(fresh)  # the old file is gone, the new folder is complete
    assert sorted(p.name for p in ckpt.root.iterdir()) == ["ckpt", "fresh", "out", "plan.json"]


def test_output_that_is_or_holds_the_source_is_refused(ckpt: Ckpt) -> None:
    before = hashes(ckpt.root)
    for dst in (ckpt.dir, ckpt.root):
        with pytest.raises(pp.OutputFileError, match="is the checkpoint folder or contains it"):
            pp.apply_to_sharded_safetensors(ckpt.plan, ckpt.dir, dst, overwrite=True)
    assert hashes(ckpt.root) == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_failure_while_writing_leaves_nothing(ckpt: Ckpt, monkeypatch, overwrite: bool) -> None:
    dst = ckpt.root / "out"
    if overwrite:
        dst.mkdir()
        (dst / "old.txt").write_text("old")
    written: list[str] = []

    def fail_on_third(src, *args, **kwargs):
        written.append(src.name)
        if len(written) == 3:
            raise OSError("disk full")
        return real(src, *args, **kwargs)

    real = sharded.prune_file
    monkeypatch.setattr(sharded, "prune_file", fail_on_third)
    before = hashes(ckpt.root)
    with pytest.raises(OSError, match="disk full"):
        pp.apply_to_sharded_safetensors(ckpt.plan, ckpt.dir, dst, overwrite=overwrite)
    assert written == [S1, S2, S3]  # two shards were written into the temporary folder, then removed
    assert hashes(ckpt.root) == before  # old output intact (or absent), no temporary folder left
    assert sorted(p.name for p in ckpt.root.iterdir()) == sorted(["ckpt", "plan.json"] + ["out"] * overwrite)


# --- the CLI -----------------------------------------------------------------------------------------


def test_cli_apply_and_validate_on_a_folder_and_an_index(ckpt: Ckpt) -> None:
    ok = f"ok: 2 groups, digest {ckpt.plan.digest()}; fits "
    for source in (ckpt.dir, ckpt.dir / INDEX):
        result = run("validate", ckpt.plan_path, source)
        assert result.exit_code == 0 and result.output == f"{ok}{source}\n", result.output
    a = run("apply", ckpt.plan_path, ckpt.dir, "-o", ckpt.root / "a")
    assert a.exit_code == 0 and a.output == f"wrote {ckpt.root / 'a'}\n", a.output
    default = ckpt.root / "ckpt.pruned"  # <folder>.pruned beside the checkpoint folder
    b = run("apply", ckpt.plan_path, ckpt.dir / INDEX)
    assert b.exit_code == 0 and b.output == f"wrote {default}\n", b.output
    assert hashes(ckpt.root / "a") == hashes(default)
    assert run("apply", ckpt.plan_path, ckpt.dir).exit_code == 1  # exists: refused
    assert run("apply", ckpt.plan_path, ckpt.dir, "--force").exit_code == 0
    assert hashes(ckpt.root / "a") == hashes(default)


# --- bad checkpoints: WeightsFileError naming the index, nothing written ---------------------------


def _not_json(c: Ckpt) -> None:
    (c.dir / INDEX).write_text('{"weight_map": {"0.weight": ')


def _a_list(c: Ckpt) -> None:
    (c.dir / INDEX).write_text("[]")


def _no_weight_map(c: Ckpt) -> None:
    c.edit_index(lambda d: d.pop("weight_map"))


def _number_for_a_shard(c: Ckpt) -> None:
    c.edit_index(lambda d: d["weight_map"].__setitem__("0.bias", 2))


def _missing_shard(c: Ckpt) -> None:
    (c.dir / S2).unlink()


def _shard_not_safetensors(c: Ckpt) -> None:
    (c.dir / S3).write_text("not weights")


def _listed_twice(c: Ckpt) -> None:
    # the same key twice in one JSON object: json.loads alone would keep the last silently
    text = (c.dir / INDEX).read_text()
    (c.dir / INDEX).write_text(text.replace('"weight_map": {', f'"weight_map": {{\n    "3.bias": "{S3}",'))


def _in_two_shards(c: Ckpt) -> None:
    save_file({n: c.state[n] for n in [*SHARDS[S3], "3.bias"]}, str(c.dir / S3), metadata={"format": "pt"})


def _listed_in_the_wrong_shard(c: Ckpt) -> None:
    c.edit_index(lambda d: d["weight_map"].__setitem__("3.bias", S3))


def _listed_but_absent(c: Ckpt) -> None:
    c.edit_index(lambda d: d["weight_map"].__setitem__("ghost", S1))


def _not_listed(c: Ckpt) -> None:
    c.edit_index(lambda d: d["weight_map"].pop("5.bias"))


def _wrong_total(c: Ckpt) -> None:
    c.edit_index(lambda d: d["metadata"].__setitem__("total_size", d["metadata"]["total_size"] + 4))


def _parent_path(c: Ckpt) -> None:
    (c.root / S1).write_bytes((c.dir / S1).read_bytes())  # a real file there: the check is by name
    c.edit_index(lambda d: d["weight_map"].update({"0.weight": f"../{S1}", "5.bias": f"../{S1}"}))


def _absolute_path(c: Ckpt) -> None:
    c.edit_index(lambda d: d["weight_map"].update({"0.weight": str(c.dir / S1), "5.bias": str(c.dir / S1)}))


def _no_index(c: Ckpt) -> None:
    (c.dir / INDEX).unlink()


def _two_indexes(c: Ckpt) -> None:
    (c.dir / "other.safetensors.index.json").write_bytes((c.dir / INDEX).read_bytes())


# total bytes of the original tensors: 10 fp32 tensors of 8*27+8+4*8+6*72+6+960+10 = 1664 scalars
# and one int64 counter
TOTAL = 4 * 1664 + 8
BAD = [
    ("not json", _not_json, ["not a valid JSON index"]),
    ("a list", _a_list, ["not a sharded checkpoint index (a JSON list"]),
    ("no weight_map", _no_weight_map, ["no 'weight_map'"]),
    ("number for a shard", _number_for_a_shard, ["weight_map['0.bias'] is 2, not a shard file name"]),
    ("missing shard", _missing_shard, [f"shard '{S2}' (listed for 7 tensors, e.g. '0.bias') does not exist"]),
    ("shard not safetensors", _shard_not_safetensors, [f"shard '{S3}': not a valid safetensors file"]),
    ("listed twice", _listed_twice, ["tensor '3.bias' is listed twice in weight_map"]),
    ("in two shards", _in_two_shards, [f"tensor '3.bias' is present in several shard files ({S2}, {S3})"]),
    ("wrong shard", _listed_in_the_wrong_shard,
     [f"weight_map puts tensor '3.bias' in shard '{S3}', but it is in '{S2}'"]),
    ("listed but absent", _listed_but_absent,
     [f"weight_map puts tensor 'ghost' in shard '{S1}', which does not hold it"]),
    ("not listed", _not_listed, [f"shard '{S1}' holds tensor '5.bias', which weight_map does not list"]),
    ("wrong total_size", _wrong_total,
     [f"metadata.total_size is {TOTAL + 4}, but the shards hold {TOTAL} bytes of tensor data"]),
    ("parent path", _parent_path, [f"shard file name '../{S1}'", "is not a plain file name"]),
    ("absolute path", _absolute_path, ["shard file name '/", "is not a plain file name"]),
    ("no index", _no_index, ["no *.safetensors.index.json file in this folder"]),
    ("two indexes", _two_indexes, [f"several index files ({INDEX}, other.safetensors.index.json)"]),
]
CLI_CASES = {"not json", "missing shard", "wrong total_size", "parent path"}


@pytest.mark.parametrize(("case", "breaks", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_checkpoint(ckpt: Ckpt, case: str, breaks, words: list[str]) -> None:
    assert nbytes(ckpt.state.values()) == TOTAL
    breaks(ckpt)
    before = hashes(ckpt.root)
    names = sorted(p.name for p in ckpt.root.iterdir())
    dst = ckpt.root / "out"
    where = str(ckpt.dir) if case in ("no index", "two indexes") else str(ckpt.dir / INDEX)
    for call in (lambda: pp.apply_to_sharded_safetensors(ckpt.plan, ckpt.dir, dst),
                 lambda: pp.check_sharded_weights(ckpt.plan, ckpt.dir)):
        with pytest.raises(pp.WeightsFileError) as info:
            call()
        message = str(info.value)
        assert message.startswith(f"{where}: "), message
        for w in words:
            assert w in message, message
    assert not dst.exists()
    assert hashes(ckpt.root) == before and sorted(p.name for p in ckpt.root.iterdir()) == names
    if case in CLI_CASES:
        for args in (["apply", ckpt.plan_path, ckpt.dir, "-o", dst], ["validate", ckpt.plan_path, ckpt.dir]):
            result = run(*args)
            assert result.exit_code == 1, result.output
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0] == f"error: {message}", result.stderr
        assert not dst.exists() and hashes(ckpt.root) == before


def test_content_digest_and_check_over_all_shards(ckpt: Ckpt) -> None:
    # the content digest of a sharded checkpoint is that of the model it was saved from
    assert pp.weights_digest(ckpt.dir) == pp.weights_digest(ckpt.model) == pp.weights_digest(ckpt.state)
    scored = ckpt.plan.model_copy(update={"provenance": ckpt.plan.provenance.model_copy(
        update={"weights_digest": pp.weights_digest(ckpt.model)})})
    pp.check_sharded_weights(scored, ckpt.dir)  # same content: silent
    changed = {k: v + 1 if v.is_floating_point() else v for k, v in ckpt.state.items()}
    write_checkpoint(ckpt.dir, changed)
    with pytest.warns(pp.WeightsContentWarning, match="content differs"):
        pp.check_sharded_weights(scored, ckpt.dir)
    with pytest.raises(pp.PlanMismatchError, match="content differs"):
        pp.apply_to_sharded_safetensors(scored, ckpt.dir, ckpt.root / "out", check_content="error")
    assert not (ckpt.root / "out").exists()
