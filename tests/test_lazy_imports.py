"""Plan review starts without torch or numpy; the package still offers every public name.

Each check runs in a fresh interpreter: the pytest process has torch imported long ago.
`-X importtime` prints one stderr line per module the interpreter imports (``import time: self |
cumulative | name``); the set of those names is what the command pulled in.
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
from timeouts import scaled
from torch import nn

import pruneplan as pp

ROOT = Path(pp.__file__).resolve().parent.parent
HEAVY = ("torch", "numpy")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def imported(args: list[str]) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``python -X importtime *args``; return the process and the top-level modules imported."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True,
                          env=_env(), cwd=ROOT, timeout=scaled(120))
    names = {line.rsplit("|", 1)[1].strip().split(".")[0]
             for line in proc.stderr.splitlines() if line.startswith("import time:") and "|" in line}
    proc.stderr = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("import time:"))
    return proc, names


@pytest.fixture(scope="module")
def plans(tmp_path_factory) -> tuple[pp.PrunePlan, Path, Path]:
    folder = tmp_path_factory.mktemp("plans")
    with_meta = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    a = pp.plan_pruning(with_meta, {"0": [1, 4]}, cascades={"0": ["2"]})
    b = pp.plan_pruning(with_meta, {"0": [1, 5]}, cascades={"0": ["2"]})
    return a, a.save(folder / "a.json"), b.save(folder / "b.json")


def test_the_check_sees_torch_when_it_is_imported() -> None:
    # the detector itself: a command that imports torch is seen doing so
    proc, names = imported(["-c", "import pruneplan; pruneplan.apply_plan"])
    assert proc.returncode == 0, proc.stderr
    assert {"torch", "numpy", "pruneplan"} <= names


def test_import_plan_module_leaves_torch_and_numpy_out() -> None:
    code = ("import sys, pruneplan.plan, pruneplan; "
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'heavy import'; "
            "print(pruneplan.PrunePlan.__module__, pruneplan.__version__)")
    proc, names = imported(["-c", code])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "pruneplan.plan 0.1.0\n"
    assert not names & set(HEAVY), names & set(HEAVY)


def test_plan_review_commands_import_neither_torch_nor_numpy(plans, tmp_path: Path) -> None:
    plan, a, b = plans
    cli = ["-m", "pruneplan.cli"]
    cases = [
        # (arguments, exit status, what stdout holds)
        # group "0" keeps 4 of 6 units; removed: 2 rows of 0.weight (2*4) + 2 of 0.bias + 2
        # columns of 2.weight (2*3) = 16 of the 6*4 + 6 + 3*6 = 48 touched parameters
        (["show", str(a)], 0, "16 of 48 parameters in touched tensors removed (33.3%)"),
        (["diff", str(a), str(a)], 0, "plans are identical in what they prune\n"),
        (["diff", str(a), str(b)], 1, "0: -[4] +[5]\n"),
        (["validate", str(a)], 0, f"ok: 1 groups, digest {plan.digest()}\n"),
        (["schema"], 0, "\"title\": \"PrunePlan v3\""),  # the JSON Schema itself
        (["schema", "-o", str(tmp_path / "s.json")], 0, f"wrote {tmp_path / 's.json'}\n"),
    ]
    for args, status, out in cases:
        proc, names = imported([*cli, *args])
        assert proc.returncode == status, (args, proc.stderr)
        assert out in proc.stdout, (args, proc.stdout)
        assert "click" in names and "pydantic" in names, args  # the detector saw the real imports
        assert not names & set(HEAVY), (args, names & set(HEAVY))
    assert json.loads((tmp_path / "s.json").read_text())["title"] == "PrunePlan v3"


def test_plan_review_errors_stay_light(tmp_path: Path) -> None:
    # a bad plan still gets one error line, exit 1, and no torch import on the way
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "other", "version": 1}')
    proc, names = imported(["-m", "pruneplan.cli", "show", str(bad)])
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert not names & set(HEAVY)


def test_lazy_public_names_resolve_to_their_definitions() -> None:
    code = """
import sys
import pruneplan
assert "torch" not in sys.modules
from pruneplan.apply.model import apply_plan
assert pruneplan.apply_plan is apply_plan and "torch" in sys.modules
import pruneplan.planner, pruneplan.select, pruneplan.graph.discover, pruneplan.loading
assert pruneplan.plan_pruning is pruneplan.planner.plan_pruning
assert pruneplan.select_indices is pruneplan.select.select_indices
assert pruneplan.prunable_groups is pruneplan.graph.discover.prunable_groups
assert pruneplan.plan_from_metric is pruneplan.loading.plan_from_metric
ns = {}
exec("from pruneplan import *", ns)
missing = sorted(set(pruneplan.__all__) - set(ns))
assert not missing, missing
assert set(pruneplan.__all__) <= set(dir(pruneplan))
try:
    pruneplan.no_such_name
except AttributeError as exc:
    assert "no attribute 'no_such_name'" in str(exc), exc
else:
    raise AssertionError("no AttributeError")
print(len(pruneplan.__all__))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(),
                          cwd=ROOT, timeout=scaled(120))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{len(pp.__all__)}\n"


def test_subpackages_reachable_as_attributes_after_import_pruneplan() -> None:
    # `import pruneplan` used to import these as a side effect; code reaching them as
    # attributes keeps working
    code = ("import pruneplan; "
            "print(pruneplan.attributions.TaylorAttributionMetric.__name__, "
            "pruneplan.apply.sharded.INDEX_SUFFIX, pruneplan.pruner.Pruner.__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(),
                          cwd=ROOT, timeout=scaled(120))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "TaylorAttributionMetric .safetensors.index.json Pruner\n"


def _model_and_plan() -> tuple[nn.Module, pp.PrunePlan]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    return model, pp.plan_pruning(model, {"0": [1, 2, 9]}, cascades={"0": ["2"]})


def test_apply_and_validate_on_files_never_import_torch(tmp_path: Path) -> None:
    # `apply` on a file moves bytes: the command must not pay torch's import (seconds); its
    # output is byte for byte the output of the same applier run in this process (with torch)
    model, plan = _model_and_plan()
    plan_file = plan.save(tmp_path / "plan.json")
    src = tmp_path / "model.safetensors"
    save_file(dict(model.state_dict()), str(src))
    # a sharded copy: the first layer in one shard, the second in another, and the index
    shards = tmp_path / "sharded"
    shards.mkdir()
    state = dict(model.state_dict())
    weight_map = {}
    for i, prefix in enumerate(("0.", "2.")):
        part = {k: v for k, v in state.items() if k.startswith(prefix)}
        save_file(part, str(shards / f"model-{i + 1:05d}-of-00002.safetensors"))
        weight_map.update({k: f"model-{i + 1:05d}-of-00002.safetensors" for k in part})
    (shards / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    reference = pp.apply_to_safetensors(plan, src, tmp_path / "ref.safetensors")
    pp.apply_to_sharded_safetensors(plan, shards, tmp_path / "ref_sharded")
    cases = [
        (["apply", str(plan_file), str(src), "-o", str(tmp_path / "out.safetensors")],
         f"wrote {tmp_path / 'out.safetensors'}"),
        (["apply", str(plan_file), str(shards), "-o", str(tmp_path / "out_sharded")], "wrote"),
        (["validate", str(plan_file), str(src)], f"ok: 1 groups, digest {plan.digest()}; fits {src}"),
        (["validate", str(plan_file), str(shards)], "ok: 1 groups"),
    ]
    for args, out in cases:
        proc, names = imported(["-m", "pruneplan.cli", *args])
        assert proc.returncode == 0, (args, proc.stderr)
        assert out in proc.stdout, (args, proc.stdout)
        assert "safetensors" in names and "pruneplan" in names, args  # the detector saw them
        assert "torch" not in names, args
    assert (tmp_path / "out.safetensors").read_bytes() == Path(reference).read_bytes()
    for f in sorted((tmp_path / "ref_sharded").iterdir()):
        assert (tmp_path / "out_sharded" / f.name).read_bytes() == f.read_bytes(), f.name


def test_apply_to_a_checkpoint_folder_never_imports_torch(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    src = tmp_path / "ckpt"
    model.save_pretrained(src)
    x = torch.randint(0, 64, (1, 5))
    mlp = [g for g in pp.prunable_groups(model, x) if ".mlp." in g.name]
    plan = pp.plan_pruning(model, {g.name: [0, 3, 7] for g in mlp}, example_inputs=x)
    plan_file = plan.save(tmp_path / "plan.json")
    pp.apply_to_checkpoint(plan, src, tmp_path / "ref")
    proc, names = imported(["-m", "pruneplan.cli", "apply", str(plan_file), str(src), "-o",
                            str(tmp_path / "out")])
    assert proc.returncode == 0, proc.stderr
    assert "torch" not in names and "transformers" not in names
    ref = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ref
    for name in ref:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
