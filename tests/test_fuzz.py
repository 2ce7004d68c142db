"""Property-based fuzzing (hypothesis), bounded so the suite stays quick.

* Plan JSON: mutations of a valid plan (a value replaced anywhere by any JSON value, a key
  dropped, the text cut or a byte changed) either load as a plan that serialises and
  round-trips, or raise one short `PlanValidationError`; a plan that loads either applies to the
  model or raises a `PlanError` with the model and its optimizer untouched.
* Weight files: truncations and lying headers (length prefix, dtype, shape, offsets) raise a
  `PlanError` (never another exception) and leave no output or temporary file.
* Checkpoint folders: broken indexes and shards raise a `PlanError` and leave nothing behind.
"""

from __future__ import annotations

import copy
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import pruneplan as pp

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                      HealthCheck.too_slow])


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.2),
                         nn.Conv2d(6, 4, 1, groups=2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


MODEL = _model()
# the grouped conv (2 groups of 3 inputs) makes unit 1 of "0" its channels 1 and 4
PLAN = pp.plan_pruning(MODEL, {"0": [1]}, example_inputs=torch.randn(1, 2, 6, 6))
PLAN_DATA = json.loads(PLAN.to_json())

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=8) | st.sampled_from(["\ud800", "x" * 300, "0.weight", "pruneplan"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


def _paths(value, prefix=()):
    """Every path (tuple of keys/indices) to a node of a JSON document."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


PATHS = [p for p in _paths(PLAN_DATA) if p]


@st.composite
def mutated_plans(draw) -> str | bytes:
    data = copy.deepcopy(PLAN_DATA)
    kind = draw(st.sampled_from(["replace", "drop", "cut", "byte", "replace"]))
    if kind in ("replace", "drop"):
        path = draw(st.sampled_from(PATHS))
        parent = data
        for k in path[:-1]:
            parent = parent[k]
        if kind == "drop" and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_values)
        return json.dumps(data, ensure_ascii=draw(st.booleans()))
    text = PLAN.to_json().encode()
    at = draw(st.integers(0, len(text) - 1))
    if kind == "cut":
        return text[:at]
    return text[:at] + bytes([draw(st.integers(0, 255))]) + text[at + 1:]


@FUZZ
@given(mutated_plans())
def test_mutated_plans_load_or_raise_one_plan_validation_error(text) -> None:
    try:
        plan = pp.PrunePlan.from_json(text)
    except pp.PlanValidationError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg and len(msg) < 2000, msg
        return
    # a plan that loads serialises, round-trips and has a digest
    again = pp.PrunePlan.from_json(plan.to_json())
    assert again.to_json() == plan.to_json() and again.digest() == plan.digest()
    plan.summary()
    # ... and applies, or is refused with a PlanError that changes nothing
    model = copy.deepcopy(MODEL)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 2, 6, 6)).sum().backward()
    opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    structure = repr(model)
    momentum = {id(p): opt.state[p]["momentum_buffer"].clone() for p in model.parameters()}
    try:
        pp.apply_plan(model, plan, opt, check_digest=False)
    except pp.PlanError as exc:
        assert "\n" not in str(exc)
        assert repr(model) == structure
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert all(torch.equal(momentum[id(p)], opt.state[p]["momentum_buffer"]) for p in model.parameters())
        return
    model(torch.randn(2, 2, 6, 6))  # what applied runs


def _weights(tmp: Path) -> Path:
    path = tmp / "w.safetensors"
    if not path.exists():
        save_file(MODEL.state_dict(), str(path))
    return path


@st.composite
def lying_files(draw) -> bytes:
    raw = RAW
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    kind = draw(st.sampled_from(["truncate", "length", "dtype", "shape", "offsets", "drop", "garbage"]))
    if kind == "truncate":
        return raw[:draw(st.integers(0, len(raw) - 1))]
    if kind == "length":
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + raw[8:]
    if kind == "garbage":
        return draw(st.binary(max_size=64))
    name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    entry = header[name]
    if kind == "dtype":
        entry["dtype"] = draw(st.sampled_from(["F16", "I64", "BOOL", "F64", "Q4", "", "F32"]))
    elif kind == "shape":
        entry["shape"] = draw(st.lists(st.integers(0, 40), max_size=4))
    elif kind == "offsets":
        entry["data_offsets"] = draw(st.lists(st.integers(-5, 2 * len(raw)), min_size=2, max_size=2))
    else:
        del header[name]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n:]


def _raw() -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return _weights(Path(d)).read_bytes()


RAW = _raw()


@FUZZ
@given(lying_files())
def test_truncated_and_lying_weight_files_raise_a_plan_error(tmp_path_factory, blob: bytes) -> None:
    d = tmp_path_factory.mktemp("w")
    src = d / "w.safetensors"
    src.write_bytes(blob)
    out = d / "out.safetensors"
    try:
        pp.check_weights(PLAN, src)
        pp.apply_to_safetensors(PLAN, src, out)
    except pp.PlanError as exc:
        assert "\n" not in str(exc)
        assert sorted(p.name for p in d.iterdir()) == ["w.safetensors"]  # nothing left behind
    else:  # a lie that changes nothing the plan reads: the output is complete and loads
        state = pp.load_pruned(_model(), PLAN, out).state_dict()
        assert state["0.weight"].shape == (4, 2, 3, 3)
    assert src.read_bytes() == blob


CKPT_MUTATIONS = ["drop_shard", "rename", "dotdot", "absolute", "total_size", "not_json", "nan", "dup_tensor",
                  "extra_tensor", "link_out", "index_list", "map_number", "empty_map", "truncate_shard"]


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(CKPT_MUTATIONS), st.integers(0, 10**6))
def test_broken_checkpoint_folders_raise_a_plan_error_and_leave_nothing(tmp_path_factory, kind, seed) -> None:
    root = tmp_path_factory.mktemp("ck")
    ckpt = root / "ckpt"
    ckpt.mkdir()
    sd = MODEL.state_dict()
    names = sorted(sd)
    files = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    for f, keys in files.items():
        save_file({k: sd[k] for k in keys}, str(ckpt / f))
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
             "weight_map": {k: f for f, keys in files.items() for k in keys}}
    victim = names[seed % len(names)]
    text = None
    if kind == "drop_shard":
        os.remove(ckpt / "b.safetensors")
    elif kind == "rename":
        index["weight_map"][victim] = "c.safetensors"
    elif kind == "dotdot":
        index["weight_map"][victim] = "../a.safetensors"
    elif kind == "absolute":
        index["weight_map"][victim] = str(ckpt / "a.safetensors")
    elif kind == "total_size":
        index["metadata"]["total_size"] += 1 + seed % 7
    elif kind == "not_json":
        text = json.dumps(index)[: seed % 40]
    elif kind == "nan":
        text = json.dumps(index).replace('"metadata": {', '"metadata": {"x": NaN, ')
    elif kind == "dup_tensor":
        text = json.dumps(index).replace('"weight_map": {', f'"weight_map": {{"{victim}": "a.safetensors", ')
    elif kind == "extra_tensor":
        index["weight_map"]["ghost.weight"] = "a.safetensors"
    elif kind == "link_out":
        (root / "elsewhere").mkdir()
        os.replace(ckpt / "b.safetensors", root / "elsewhere" / "b.safetensors")
        (ckpt / "b.safetensors").symlink_to(root / "elsewhere" / "b.safetensors")
    elif kind == "index_list":
        text = "[]"
    elif kind == "map_number":
        index["weight_map"][victim] = 7
    elif kind == "empty_map":
        index["weight_map"] = {}
    elif kind == "truncate_shard":
        blob = (ckpt / "a.safetensors").read_bytes()
        (ckpt / "a.safetensors").write_bytes(blob[: seed % len(blob)])
    (ckpt / "model.safetensors.index.json").write_text(text if text is not None else json.dumps(index))
    before = {p.name: (p.read_bytes() if p.is_file() else None) for p in ckpt.iterdir()}
    with pytest.raises(pp.PlanError) as info:
        pp.apply_to_sharded_safetensors(PLAN, ckpt, root / "out")
    assert "\n" not in str(info.value)
    assert not (root / "out").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".out.")]  # no temporary folder
    assert {p.name: (p.read_bytes() if p.is_file() else None) for p in ckpt.iterdir()} == before
