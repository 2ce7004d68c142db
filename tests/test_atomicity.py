"""Plan semantics are checked before anything changes; output paths and temporary files.

Each refusal asserts the error type, that the message names the place, and that the model,
its optimizer and every file of the folder are exactly as before (the snapshot of
tests/test_bad_input.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import pruneplan as pp
from pruneplan._io import clear_stale
from pruneplan.apply import sharded
from tests.test_bad_input import Env, assert_same, build_env, make_model, snapshot


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return build_env(tmp_path)

ROOT = Path(__file__).resolve().parents[1]


def _plan_with(env: Env, change) -> pp.PrunePlan:
    data = json.loads(env.plan.to_json())
    change(data)
    return pp.PrunePlan.from_dict(data)


def _refused(env: Env, call, exc, message: str) -> pp.PlanError:
    before = snapshot(env)
    with pytest.raises(exc) as info:
        call()
    assert message in str(info.value), str(info.value)
    assert "\n" not in str(info.value)
    assert_same(before, snapshot(env))
    return info.value


def _add_edit(attribute: str, module: str = "1", before: int = 6, after: int = 4):
    def change(d: dict) -> None:
        d["groups"][0]["edits"].append(
            {"module": module, "attribute": attribute, "before": before, "after": after})

    return change


# ---- edits only change integer hyper-parameters -------------------------------------------


@pytest.mark.parametrize(("attribute", "module", "message"), [
    ("weight", "1", "model: '1.weight' (BatchNorm1d) is a parameter; a plan may only edit integer"),
    ("num_batches_tracked", "1", "'1.num_batches_tracked' (BatchNorm1d) is a buffer"),
    ("eps", "1", "'1.eps' (BatchNorm1d) is 1e-05 (a float), not an integer hyper-parameter"),
    ("affine", "1", "'1.affine' (BatchNorm1d) is True (a bool), not an integer"),
    ("training", "1", "is True (a bool), not an integer"),
    ("T_destination", "1", "not an integer hyper-parameter"),
    ("missing_attr", "1", "module '1' (BatchNorm1d) has no attribute 'missing_attr'"),
])
def test_edits_of_anything_but_integer_hyper_parameters_are_refused(env: Env, attribute, module,
                                                                    message) -> None:
    plan = _plan_with(env, _add_edit(attribute, module))
    _refused(env, lambda: pp.apply_plan(env.model, plan, env.opt), pp.PlanMismatchError, message)


def test_an_edit_of_a_submodule_is_refused(env: Env) -> None:
    wrapper = torch.nn.Sequential(env.model)
    env.model = wrapper
    data = json.loads(env.plan.to_json())
    # rename every key under the wrapper "0."
    data["model"]["tensors"] = {f"0.{k}": v for k, v in data["model"]["tensors"].items()}
    data["model"]["buffers"] = [f"0.{k}" for k in data["model"].get("buffers", [])]
    data["model"]["digest"] = pp.plan.state_dict_digest({k: v.shape for k, v in wrapper.state_dict().items()})
    for g in data["groups"]:
        for s in g["slices"]:
            s["tensor"] = f"0.{s['tensor']}"
        for e in g["edits"]:
            e["module"] = f"0.{e['module']}"
        for dr in g["dropout"]:
            dr["module"] = f"0.{dr['module']}"
        g["edits"].append({"module": "0", "attribute": "1", "before": 6, "after": 4})
    plan = pp.PrunePlan.from_dict(data)
    _refused(env, lambda: pp.apply_plan(wrapper, plan, env.opt), pp.PlanMismatchError,
             "'0.1' (Sequential) is a submodule")


# ---- dropout changes combine to a rate in [0, 1) -------------------------------------------


def test_dropout_changes_of_several_groups_must_combine_to_a_valid_rate(env: Env) -> None:
    # two groups share dropout "3" (p = 0.5): one brings it to 0.0, the other to 0.5 * (1 - 1/6);
    # the deltas add up: 0.5 - 0.5 - 0.5/6 = -0.0833..., which is not a rate
    def change(d: dict) -> None:
        d["groups"][0]["dropout"] = [{"module": "3", "p_before": 0.5, "p_after": 0.0}]
        d["groups"].append({"name": "other", "size": 3, "removed": [0],
                            "edits": [], "slices": [],
                            "dropout": [{"module": "3", "p_before": 0.5, "p_after": 0.5 * 5 / 6}]})

    with pytest.raises(pp.PlanValidationError, match=r"the dropout changes of dropout '3' combine to "
                                                     r"rate -0.0833\d+ \(from 0.5\), outside \[0, 1\)"):
        _plan_with(env, change)
    # the same through a file: refused by the loader with the path
    path = env.write_plan("drop.json", change)
    with pytest.raises(pp.PlanValidationError, match=r"drop.json: invalid plan: .*combine to rate -0.08"):
        pp.PrunePlan.load(path)


def test_groups_must_agree_on_a_dropout_rate_before_pruning(env: Env) -> None:
    def change(d: dict) -> None:
        d["groups"].append({"name": "other", "size": 3, "removed": [0], "slices": [],
                            "dropout": [{"module": "3", "p_before": 0.4, "p_after": 0.3}]})

    with pytest.raises(pp.PlanValidationError, match="groups disagree on the rate of dropout '3' before "
                                                     r"pruning \(0.5 vs 0.4, group 'other'\)"):
        _plan_with(env, change)


# ---- the final shapes of every touched module agree with its attributes --------------------


def test_a_slice_removed_by_hand_is_refused_before_the_first_change(env: Env) -> None:
    def drop_bias(d: dict) -> None:
        d["groups"][0]["slices"] = [s for s in d["groups"][0]["slices"] if s["tensor"] != "0.bias"]

    plan = _plan_with(env, drop_bias)
    _refused(env, lambda: pp.apply_plan(env.model, plan, env.opt), pp.PlanMismatchError,
             "model: the plan would leave module '0' (Linear) inconsistent: bias would have shape [6] "
             "but its attributes say [4] (a slice or an edit is missing from the plan)")


def test_an_edit_removed_by_hand_is_refused(env: Env) -> None:
    def drop_edit(d: dict) -> None:
        d["groups"][0]["edits"] = [e for e in d["groups"][0]["edits"] if e["module"] != "4"]

    plan = _plan_with(env, drop_edit)
    _refused(env, lambda: pp.apply_plan(env.model, plan, env.opt), pp.PlanMismatchError,
             "module '4' (Linear) inconsistent: weight would have shape [3, 4] but its attributes say [3, 6]")


def test_a_conv_whose_groups_no_longer_divide_is_refused(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2))
    sd = {k: list(v.shape) for k, v in model.state_dict().items()}
    plan = pp.PrunePlan.from_dict({
        "format": "pruneplan", "version": 1,
        "model": {"tensors": {"0.bias": sd["0.bias"]}, "digest": pp.plan.state_dict_digest(sd)},
        "groups": [{"name": "g", "size": 4, "removed": [3], "slices": [{"tensor": "0.bias", "axis": 0}],
                    "edits": [{"module": "0", "attribute": "out_channels", "before": 4, "after": 3}]}],
    })
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(pp.PlanMismatchError, match="module '0' \\(Conv2d\\) inconsistent: in_channels 4 "
                                                   "and out_channels 3 are not multiples of groups 2"):
        pp.apply_plan(model, plan)
    assert model[0].out_channels == 4 and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_digest_is_computed_before_the_first_change(env: Env, monkeypatch) -> None:
    # if the digest (for the log line) fails, it must fail before anything is changed
    def boom(self) -> str:
        raise pp.PlanValidationError("digest failed")

    monkeypatch.setattr(pp.PrunePlan, "digest", boom)
    _refused(env, lambda: pp.apply_plan(env.model, env.plan, env.opt), pp.PlanValidationError,
             "digest failed")


# ---- load_pruned checks every tensor first --------------------------------------------------


def test_load_pruned_checks_untouched_tensors_before_touching_the_model(env: Env) -> None:
    pruned = pp.apply_to_state_dict(env.plan, env.model.state_dict())
    pruned["4.bias"] = torch.zeros(5)  # the plan does not touch 4.bias: [3] in the model
    path = env.dir / "pruned.safetensors"
    save_file(pruned, str(path))
    fresh = make_model()
    env.model, env.opt = fresh, torch.optim.SGD(fresh.parameters(), lr=0.1)
    _refused(env, lambda: pp.load_pruned(fresh, env.plan, path), pp.PlanMismatchError,
             "weights: tensor '4.bias' has shape [5], the pruned model needs [3]")
    del pruned["4.bias"]
    pruned["extra"] = torch.zeros(1)
    _refused(env, lambda: pp.load_pruned(fresh, env.plan, pruned), pp.PlanMismatchError,
             "weights do not fit the model: tensors 1 missing (e.g. '4.bias'), 1 not in the model "
             "(e.g. 'extra')")


# ---- output paths ---------------------------------------------------------------------------


def test_a_dangling_symlink_at_the_output_counts_as_existing(env: Env) -> None:
    out = env.dir / "out.safetensors"
    out.symlink_to(env.dir / "nowhere")
    before = os.readlink(out)
    with pytest.raises(pp.OutputFileError, match=r"out.safetensors: output exists \(a dangling symbolic "
                                                 r"link\) \(pass overwrite=True to replace it\)") as info:
        pp.apply_to_safetensors(env.plan, env.weights, out)
    assert info.value.cli_message.endswith("(use --force to replace it)")
    assert out.is_symlink() and os.readlink(out) == before
    pp.apply_to_safetensors(env.plan, env.weights, out, overwrite=True)  # the link itself is replaced
    assert not out.is_symlink() and out.stat().st_size > 0 and not (env.dir / "nowhere").exists()


def test_an_existing_folder_is_never_replaced_by_a_file(env: Env) -> None:
    out = env.dir / "folder"
    out.mkdir()
    (out / "keep").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(pp.OutputFileError, match="folder: is a folder; the output of a single weights "
                                                     "file is a file"):
            pp.apply_to_safetensors(env.plan, env.weights, out, overwrite=overwrite)
    assert (out / "keep").read_text() == "x"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_weights_that_are_not_regular_files_are_refused(env: Env) -> None:
    fifo = env.dir / "w.safetensors"
    os.mkfifo(fifo)
    out = env.dir / "out.safetensors"
    with pytest.raises(pp.WeightsFileError, match=r"w\.safetensors' is a FIFO, not a regular file"):
        pp.apply_to_safetensors(env.plan, fifo, out)
    with pytest.raises(pp.WeightsFileError, match="'/dev/zero' is a character device"):
        pp.check_weights(env.plan, "/dev/zero")
    assert not out.exists()


# ---- sharded checkpoints --------------------------------------------------------------------


def _checkpoint(env: Env, folder: Path) -> Path:
    folder.mkdir()
    sd = env.model.state_dict()
    names = sorted(sd)
    half = len(names) // 2
    files = {"a.safetensors": names[:half], "b.safetensors": names[half:]}
    for file, keys in files.items():
        save_file({k: sd[k] for k in keys}, str(folder / file))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in files.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_a_shard_that_links_out_of_the_folder_is_refused(env: Env, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    ckpt = _checkpoint(env, outside)
    inner = _checkpoint(env, tmp_path / "ckpt")
    (inner / "b.safetensors").unlink()
    (inner / "b.safetensors").symlink_to(outside / "b.safetensors")
    with pytest.raises(pp.WeightsFileError, match=r"shard file 'b\.safetensors' \(tensor '.*'\) is a "
                                                  r"symbolic link out of the checkpoint folder"):
        pp.check_sharded_weights(env.plan, inner)
    # a link inside the folder is fine
    (inner / "b.safetensors").unlink()
    os.replace(inner / "a.safetensors", inner / "a2.safetensors")
    (inner / "a.safetensors").symlink_to("a2.safetensors")
    (inner / "b.safetensors").write_bytes((ckpt / "b.safetensors").read_bytes())
    pp.check_sharded_weights(env.plan, inner)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_nan_in_index_metadata_is_refused(env: Env, tmp_path: Path, value: str) -> None:
    ckpt = _checkpoint(env, tmp_path / "ckpt")
    index = ckpt / "model.safetensors.index.json"
    index.write_text(index.read_text().replace('"metadata": {}', f'"metadata": {{"score": {value}}}'))
    with pytest.raises(pp.WeightsFileError, match="not a valid JSON index"):
        pp.apply_to_sharded_safetensors(env.plan, ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- temporary files of a killed apply ------------------------------------------------------


def test_stale_temporaries_are_cleared_by_the_next_write_to_the_same_output(env: Env) -> None:
    out = env.dir / "out.safetensors"
    stale_file = env.dir / ".out.safetensors.k1ll3d_.tmp"
    stale_file.write_bytes(b"half a file")
    stale_dir = env.dir / ".out.safetensors.abc.tmp"  # a folder of the same pattern
    stale_dir.mkdir()
    (stale_dir / "x").write_text("y")
    other = env.dir / ".other.safetensors.abc.tmp"  # another output's: not ours to clear
    other.write_text("z")
    near = env.dir / ".out.safetensors.tmp"  # not the pattern
    near.write_text("z")
    live = env.dir / ".out.safetensors.live.tmp"  # a live writer holds it locked
    live.write_text("busy")
    import fcntl

    with open(live, "rb") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        pp.apply_to_safetensors(env.plan, env.weights, out)
    names = sorted(p.name for p in env.dir.iterdir())
    assert names == sorted([".other.safetensors.abc.tmp", ".out.safetensors.live.tmp", ".out.safetensors.tmp",
                            "model.safetensors", "out.safetensors", "plan.json"])
    assert clear_stale(out) == [live]  # the lock is gone now


def test_a_killed_apply_leaves_a_temporary_that_the_next_apply_clears(env: Env) -> None:
    out = env.dir / "out.safetensors"
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from pruneplan._io import atomic_writer\n"
        "with atomic_writer(Path(sys.argv[1])) as fh:\n"
        "    fh.write(b'partial'); fh.flush()\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(3600)\n"  # until the test kills it (60 s could run out on a busy machine)
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline() == b"writing\n"
        tmp = [p for p in env.dir.iterdir() if p.name.startswith(".out.safetensors.")]
        assert len(tmp) == 1 and tmp[0].read_bytes() == b"partial"
        assert clear_stale(out) == []  # alive: left alone
    finally:
        proc.kill()
        proc.wait()
    assert tmp[0].exists() and not out.exists()  # what a kill leaves behind
    pp.apply_to_safetensors(env.plan, env.weights, out)
    assert not tmp[0].exists() and out.exists()


def test_a_killed_sharded_apply_leaves_a_folder_that_the_next_apply_clears(env: Env, tmp_path: Path,
                                                                           monkeypatch) -> None:
    ckpt = _checkpoint(env, tmp_path / "ckpt")
    out = tmp_path / "pruned"
    # a folder as a killed run leaves it (its lock died with the process)
    stale = tmp_path / ".pruned.x9x9x9.tmp"
    stale.mkdir()
    (stale / "a.safetensors").write_bytes(b"partial")
    # it never waits on a lock (a wall-clock bound here failed on busy machines): every flock
    # call is non-blocking
    from pruneplan import _io

    flags: list[int] = []
    flock = _io.fcntl.flock

    def recording(fd: int, op: int) -> None:
        flags.append(op)
        flock(fd, op)

    monkeypatch.setattr(_io.fcntl, "flock", recording)
    pp.apply_to_sharded_safetensors(env.plan, ckpt, out)
    assert flags and all(op & _io.fcntl.LOCK_NB or op == _io.fcntl.LOCK_UN for op in flags), flags
    assert not stale.exists()
    assert sorted(p.name for p in out.iterdir()) == ["a.safetensors", "b.safetensors",
                                                     "model.safetensors.index.json"]
    assert sharded.read_sharded(out).weight_map.keys() == json.loads(
        (ckpt / "model.safetensors.index.json").read_text())["weight_map"].keys()
