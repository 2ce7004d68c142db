"""On-the-fly pruning during training on a real dataset (scikit-learn's bundled 8x8 digits).

A small CNN is trained with Adam; during epochs 3, 4 and 5, in the middle of the epoch, 25% of
the remaining units of conv1, conv2 and fc1 are removed by Taylor score (|sum z * dL/dz|,
accumulated since the start of the epoch) while training goes on; epoch 6 trains the pruned
model. The final accuracy is compared with an unpruned twin trained on the same batches, and
the recorded history is replayed: composed into one plan on the initial model, it gives exactly
the final architecture, and applied to the weights it gives exactly the same tensors.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from pruneplan.apply import apply_plan, apply_to_state_dict, load_pruned
from pruneplan.compose import compose
from pruneplan.pruner import Pruner

datasets = pytest.importorskip("sklearn.datasets")

EPOCHS = 6
PRUNE_EPOCHS = (2, 3, 4)  # zero-based: the 3rd, 4th and 5th epochs
BATCH = 32
# root -> (cascade, the activation whose Taylor score ranks the root's units)
LAYERS = {
    "conv1": (["bn1", "conv2"], "relu1"),
    "conv2": (["bn2", "fc1"], "relu2"),  # fc1 reads 16 features per channel (4x4 after the pool)
    "fc1": (["drop", "fc2"], "relu3"),
}


def _net() -> nn.Sequential:
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 16, 3, padding=1)),
        ("bn1", nn.BatchNorm2d(16)),
        ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(16, 32, 3, padding=1)),
        ("bn2", nn.BatchNorm2d(32)),
        ("relu2", nn.ReLU()),
        ("pool", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(32 * 4 * 4, 64)),
        ("relu3", nn.ReLU()),
        ("drop", nn.Dropout(0.25)),
        ("fc2", nn.Linear(64, 10)),
    ]))


def _digits():
    x, y = datasets.load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    return (x[train], y[train]), (x[test], y[test])


class _Taylor:
    """Accumulates |sum over space of z * dL/dz| per unit of the watched activations."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.scores: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def forward(_m: nn.Module, _args: tuple, z: torch.Tensor) -> None:
            if not z.requires_grad:
                return

            def backward(g: torch.Tensor) -> None:
                s = (z.detach() * g).flatten(2).sum(-1) if z.dim() > 2 else z.detach() * g
                s = s.abs().sum(0)
                self.scores[name] = self.scores.get(name, torch.zeros_like(s)) + s

            z.register_hook(backward)

        return forward

    def reset(self) -> None:
        self.scores.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was)
    return acc


def _run(prune: bool) -> dict:
    (xtr, ytr), (xte, yte) = _digits()
    torch.manual_seed(0)
    model = _net()
    initial = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    pruner = Pruner(model, input_size=(1, 8, 8), device="cpu", optimizer=opt)
    taylor = _Taylor(model, [act for _, act in LAYERS.values()])
    before, after, steps = [], [], 0
    model.train()
    for epoch in range(EPOCHS):
        order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(100 + epoch))
        batches = order.split(BATCH)
        taylor.reset()
        for b, idx in enumerate(batches):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
            steps += 1
            del loss
            if prune and epoch in PRUNE_EPOCHS and b == len(batches) // 2:
                for root, (cascade, act) in LAYERS.items():
                    scores = taylor.scores[act]
                    k = len(scores) // 4  # 25% of the units left
                    lowest = torch.argsort(scores)[:k]
                    before.append({n: t.clone() for n, t in model.state_dict().items()})
                    pruner.prune_model(root, lowest, cascade)
                    after.append({n: t.clone() for n, t in model.state_dict().items()})
                taylor.reset()  # the scores' unit numbering is gone
    taylor.remove()
    return {
        "model": model,
        "initial": initial,
        "optimizer": opt,
        "pruner": pruner,
        "accuracy": _accuracy(model, xte, yte),
        "before": before,
        "after": after,
        "steps": steps,
        "x": xte,
    }


@pytest.fixture(scope="module")
def runs():
    return _run(prune=False), _run(prune=True)


def test_pruned_accuracy_close_to_unpruned(runs):
    ref, pruned = runs
    assert ref["accuracy"] > 0.9  # the task is learned at all
    # within 5 points of the unpruned twin after the last (unpruned) epoch
    assert pruned["accuracy"] >= ref["accuracy"] - 0.05, (ref["accuracy"], pruned["accuracy"])


def test_architecture_after_three_rounds(runs):
    _, pruned = runs
    m = pruned["model"]
    # 25% of what is left, three times: 16 -4 -3 -2 = 7; 32 -8 -6 -4 = 14; 64 -16 -12 -9 = 27
    assert (m.conv1.out_channels, m.bn1.num_features, m.conv2.in_channels) == (7, 7, 7)
    assert (m.conv2.out_channels, m.bn2.num_features) == (14, 14)
    assert m.fc1.in_features == 14 * 16 and m.fc1.out_features == 27 and m.fc2.in_features == 27
    assert list(m.fc1.weight.shape) == [27, 224]
    # dropout 0.25 scaled by the units kept: 0.25 * 27/64
    assert math.isclose(m.drop.p, 0.25 * 27 / 64)
    assert len(pruned["pruner"].history) == 9
    # the probe passes did not count as BatchNorm batches: one per training step
    assert m.bn1.num_batches_tracked.item() == m.bn2.num_batches_tracked.item() == pruned["steps"] == 264
    # Adam's moments follow the parameters
    for p in m.parameters():
        assert pruned["optimizer"].state[p]["exp_avg"].shape == p.shape


def test_each_recorded_plan_replays_exactly(runs):
    _, pruned = runs
    history = pruned["pruner"].history
    # every step: the plan applied to the weights right before it gives the weights right after
    for plan, sd_before, sd_after in zip(history, pruned["before"], pruned["after"], strict=True):
        replay = apply_to_state_dict(plan, sd_before)
        assert replay.keys() == sd_after.keys()
        for k, v in sd_after.items():
            assert torch.equal(replay[k], v), k


def test_composed_history_gives_final_architecture(runs):
    _, pruned = runs
    final, initial = pruned["model"], pruned["initial"]
    composed = compose(pruned["pruner"].history)
    assert sorted(g.name for g in composed.groups) == ["conv1", "conv2", "fc1"]
    assert [len(composed.group(n).removed) for n in ("conv1", "conv2", "fc1")] == [9, 18, 37]
    # on the initial model: exactly the final architecture
    replay = apply_plan(copy.deepcopy(initial), composed)
    assert [repr(m) for m in replay.modules()] == [repr(m) for m in final.modules()]
    assert {k: v.shape for k, v in replay.state_dict().items()} == {
        k: v.shape for k, v in final.state_dict().items()}
    # composed once == the nine plans one after the other, on the initial weights
    sd0 = initial.state_dict()
    seq = sd0
    for plan in pruned["pruner"].history:
        seq = apply_to_state_dict(plan, seq)
    once = apply_to_state_dict(composed, sd0)
    for k in seq:
        assert torch.equal(once[k], seq[k]), k
    # a freshly built model + the composed plan + the final weights predicts exactly as the final model
    fresh = load_pruned(_net(), composed, final.state_dict())
    fresh.eval()
    final.eval()
    with torch.no_grad():
        assert torch.equal(fresh(pruned["x"]), final(pruned["x"]))
