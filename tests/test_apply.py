"""Appliers agree with each other, keep parameters and optimizer state right, and are deterministic."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import pruneplan as pp
from pruneplan.apply.safetensors_io import DIGEST_KEY, write_safetensors


def make_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.3), nn.Linear(6 * 4 * 4, 10),
    )


CASCADES = {"0": ["1", "3"], "3": ["4", "8", "9"]}
REMOVED = {"0": [0, 2, 5], "3": [1, 4]}


@pytest.fixture
def setup(tmp_path: Path):
    torch.manual_seed(0)
    model = make_cnn()
    x = torch.randn(4, 3, 8, 8)
    model.train()
    model(x).sum().backward()  # non-trivial BN stats
    model.eval()
    plan = pp.plan_pruning(model, REMOVED, example_inputs=x, cascades=CASCADES)
    weights = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(weights), metadata={"origin": "test"})
    return model, x, plan, weights


def test_live_state_dict_and_safetensors_agree(setup, tmp_path: Path) -> None:
    model, x, plan, weights = setup
    original_sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd = pp.apply_to_state_dict(plan, original_sd)
    out = pp.apply_to_safetensors(plan, weights, tmp_path / "pruned.safetensors")
    live = pp.apply_plan(copy.deepcopy(model), plan)
    from_file = load_file(str(out))
    live_sd = live.state_dict()
    assert sd.keys() == from_file.keys() == live_sd.keys()
    for k in sd:
        assert torch.equal(sd[k], from_file[k]), k
        assert torch.equal(sd[k], live_sd[k]), k
    # expected shapes by hand: conv0 keeps 5 of 8, conv3 keeps 4 of 6 (in 5), linear in 4*16
    assert tuple(sd["0.weight"].shape) == (5, 3, 3, 3)
    assert tuple(sd["3.weight"].shape) == (4, 5, 3, 3)
    assert tuple(sd["9.weight"].shape) == (10, 64)
    # a fresh model loaded from the pruned file computes what the live pruned model computes
    fresh = pp.load_pruned(make_cnn().eval(), plan, out)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), live(x), rtol=0, atol=0)
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"origin": "test", DIGEST_KEY: plan.digest()}
    # the input state dict is not modified
    assert original_sd["0.weight"].shape == (8, 3, 3, 3)


def test_apply_to_state_dict_keeps_exact_rows(setup) -> None:
    model, _, plan, _ = setup
    sd = model.state_dict()
    out = pp.apply_to_state_dict(plan, sd)
    kept0 = [1, 3, 4, 6, 7]  # 8 channels minus 0, 2, 5
    kept3 = [0, 2, 3, 5]  # 6 channels minus 1, 4
    assert torch.equal(out["0.weight"], sd["0.weight"][kept0])
    assert torch.equal(out["1.running_mean"], sd["1.running_mean"][kept0])
    assert torch.equal(out["3.weight"], sd["3.weight"][kept3][:, kept0])
    # flatten: channel c owns the 16 features 16c .. 16c+15
    cols = [16 * c + j for c in kept3 for j in range(16)]
    assert torch.equal(out["9.weight"], sd["9.weight"][:, cols])
    assert out["1.num_batches_tracked"] is sd["1.num_batches_tracked"]  # untouched: same object


def test_same_plan_twice_gives_byte_identical_files(setup, tmp_path: Path) -> None:
    _, _, plan, weights = setup
    a = pp.apply_to_safetensors(plan, weights, tmp_path / "a.safetensors")
    b = pp.apply_to_safetensors(plan, weights, tmp_path / "b.safetensors")
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()


def test_same_inputs_give_byte_identical_plans(setup) -> None:
    model, x, plan, _ = setup
    again = pp.plan_pruning(model, REMOVED, example_inputs=x, cascades=CASCADES)
    assert again.to_json() == plan.to_json() and again.digest() == plan.digest()


def test_writer_matches_safetensors_bytes(tmp_path: Path) -> None:
    # Golden reference: safetensors' own writer. Same tensors -> same bytes (dtype order,
    # header layout, padding).
    torch.manual_seed(0)
    tensors = {
        "b": torch.randn(3, 2), "a": torch.randn(4).half(), "c": torch.arange(3),
        "d": torch.randn(2, 2).to(torch.bfloat16), "e": torch.tensor([True, False]),
    }
    save_file(tensors, str(tmp_path / "ref.safetensors"))
    names = {torch.float32: "F32", torch.float16: "F16", torch.int64: "I64",
             torch.bfloat16: "BF16", torch.bool: "BOOL"}
    entries = {k: (names[v.dtype], list(v.shape)) for k, v in tensors.items()}
    write_safetensors(tmp_path / "ours.safetensors", entries, tensors.__getitem__)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_output_header_is_valid_safetensors(setup, tmp_path: Path) -> None:
    _, _, plan, weights = setup
    out = pp.apply_to_safetensors(plan, weights, tmp_path / "p.safetensors")
    raw = out.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert n % 8 == 0
    ends = sorted(e["data_offsets"] for k, e in header.items() if k != "__metadata__")
    assert ends[0][0] == 0 and ends[-1][1] == len(raw) - 8 - n  # contiguous to the end
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ends))


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        lambda p: torch.optim.Adam(p, lr=1e-2),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    ],
    ids=["sgd-momentum", "adam", "adamw"],
)
def test_training_continues_after_pruning(make_opt) -> None:
    torch.manual_seed(0)
    model = make_cnn()
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    # two parameter groups, to check every group is handled
    params = list(model.parameters())
    opt = make_opt([{"params": params[:4]}, {"params": params[4:], "lr": 1e-3}])
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    plan = pp.plan_pruning(model, REMOVED, example_inputs=x, cascades=CASCADES)
    w = model[3].weight
    before_state = {k: v.clone() for k, v in opt.state[w].items()}
    before_grad = w.grad.clone()
    pp.apply_plan(model, plan, optimizer=opt)
    assert model[3].weight is w  # identity kept: the optimizer still holds the same object
    kept0, kept3 = [1, 3, 4, 6, 7], [0, 2, 3, 5]
    for k, v in opt.state[w].items():
        if before_state[k].shape == before_grad.shape:
            assert torch.equal(v, before_state[k][kept3][:, kept0]), k
        else:  # scalar `step` kept as is
            assert torch.equal(v, before_state[k]), k
    assert torch.equal(w.grad, before_grad[kept3][:, kept0])
    for group in opt.param_groups:
        for p in group["params"]:
            for v in opt.state[p].values():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    assert v.shape == p.shape
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_pruning_keeps_a_graph_built_before_harmless() -> None:
    # a loss computed before pruning and still referenced must not pin the old shape
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(3, 4)
    old_loss = model(x).sum()
    old_loss.backward()
    plan = pp.plan_pruning(model, {"0": [1]}, cascades={"0": ["2"]})
    pp.apply_plan(model, plan)
    model(x).sum().backward()
    assert model[2].weight.grad.shape == (2, 5)
