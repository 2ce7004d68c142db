"""Discovery on the model zoo: prune 30% of every group at random and check the result.

For every model: the pruned model runs with an unchanged output shape, the number of removed
scalars equals `PrunePlan.scalars_removed`, `apply_to_state_dict` + `load_pruned` into a fresh
model reproduces the live pruned model, and (DESIGN invariant 1) the pruned model equals the
original with the removed channels zeroed where they leave the network.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from zoo import ZOO

from pruneplan.apply import apply_plan, apply_to_state_dict, load_pruned
from pruneplan.graph.discover import prunable_groups
from pruneplan.graph.rules import CONV_TRANSPOSE_TYPES, CONV_TYPES, is_depthwise
from pruneplan.planner import build_plan, plan_pruning

# The groups each zoo model must expose: group name -> its roots (several = coupled group).
# Derived by hand from the architectures in tests/zoo.py; roots whose units reach the output
# (the classifiers) never appear.
EXPECTED: dict[str, dict[str, list[str]]] = {
    "vgg_bn": {
        "features.0": ["features.0"], "features.4": ["features.4"], "features.7": ["features.7"],
        "classifier.0": ["classifier.0"], "classifier.3": ["classifier.3"],
    },
    "resnet": {
        # stem + layer1's residual branch are summed; so are layer2's projection and branch,
        # and layer3's projection with the last conv of both bottlenecks
        "conv1": ["conv1", "layer1.0.conv2"],
        "layer1.0.conv1": ["layer1.0.conv1"],
        "layer2.0.downsample.0": ["layer2.0.downsample.0", "layer2.0.conv2"],
        "layer2.0.conv1": ["layer2.0.conv1"],
        "layer3.0.downsample.0": ["layer3.0.downsample.0", "layer3.0.conv3", "layer3.1.conv3"],
        "layer3.0.conv1": ["layer3.0.conv1"], "layer3.0.conv2": ["layer3.0.conv2"],
        "layer3.1.conv1": ["layer3.1.conv1"], "layer3.1.conv2": ["layer3.1.conv2"],
    },
    "mobilenet_v2": {
        # t=1 block: the stem's channels go through the depthwise conv to the projection,
        # which is added back to the stem output
        "features.0.0": ["features.0.0", "features.1.conv.1"],
        "features.2.conv.0.0": ["features.2.conv.0.0"],
        "features.2.conv.2": ["features.2.conv.2", "features.3.conv.2"],
        "features.3.conv.0.0": ["features.3.conv.0.0"],
        "features.4.0": ["features.4.0"],
    },
    "efficientnet": {
        "stem.0": ["stem.0"],
        # the SE gate's second conv multiplies the expanded channels one to one
        "blocks.0.expand.0": ["blocks.0.expand.0", "blocks.0.se.fc2"],
        "blocks.0.se.fc1": ["blocks.0.se.fc1"],
        "blocks.0.project.0": ["blocks.0.project.0", "blocks.1.project.0"],
        "blocks.1.expand.0": ["blocks.1.expand.0", "blocks.1.se.fc2"],
        "blocks.1.se.fc1": ["blocks.1.se.fc1"],
        "head.0": ["head.0"],
    },
    "densenet": {
        "stem": ["stem"], "transition.2": ["transition.2"],
        **{f"layers.{i}.conv{j}": [f"layers.{i}.conv{j}"] for i in range(3) for j in (1, 2)},
    },
    "inception": {
        "stem.0": ["stem.0"],
        **{f"block{b}.{n}": [f"block{b}.{n}"] for b in (1, 2) for n in
           ("b1.0", "b2.0.0", "b2.1.0", "b3.0.0", "b3.1.0", "b3.2.0", "b4.1.0")},
    },
    "shufflenet_v2": {
        # the stride-1 unit's chunk ties channel j of the previous shuffle's output with
        # channel j + 8, and its shuffle ties its own branch with the identity half: stage 0's
        # roots (8 channels each) form one group of 4 units, each 2 channels of every root
        "stem.0": ["stem.0"],
        "stage.0.branch1.1.0": ["stage.0.branch1.1.0", "stage.0.branch2.2.0", "stage.1.branch2.2.0"],
        "stage.0.branch2.0.0": ["stage.0.branch2.0.0"],
        "stage.1.branch2.0.0": ["stage.1.branch2.0.0"],
        "stage.2.branch1.1.0": ["stage.2.branch1.1.0", "stage.2.branch2.2.0"],
        "stage.2.branch2.0.0": ["stage.2.branch2.0.0"],
        "conv5.0": ["conv5.0"],
    },
    "unet": {
        **{f"{b}.{i}.0": [f"{b}.{i}.0"] for b in ("enc1", "enc2", "mid", "dec2", "dec1")
           for i in (0, 1)},
        "up2": ["up2"], "up1": ["up1"],
    },
    "convnext": {
        "stem.0": ["stem.0", "blocks.0.pwconv2", "blocks.1.pwconv2"],
        "blocks.0.pwconv1": ["blocks.0.pwconv1"], "blocks.1.pwconv1": ["blocks.1.pwconv1"],
    },
    "transformer": {
        # embedding width: every Linear writing the residual stream; q/k/v of a layer are
        # one group of heads (their outputs are split into heads by a view, q @ k^T and
        # att @ v tie them head by head)
        "embed": ["embed", "layers.0.attn.out", "layers.0.mlp.3", "layers.1.attn.out",
                  "layers.1.mlp.3"],
        "layers.0.attn.q": ["layers.0.attn.q", "layers.0.attn.k", "layers.0.attn.v"],
        "layers.1.attn.q": ["layers.1.attn.q", "layers.1.attn.k", "layers.1.attn.v"],
        "layers.0.mlp.0": ["layers.0.mlp.0"], "layers.1.mlp.0": ["layers.1.mlp.0"],
    },
}


def _random_removal(groups, seed: int = 0) -> dict[str, list[int]]:
    rng = np.random.default_rng(seed)
    out = {}
    for g in groups:
        k = min(g.size - 1, max(1, round(0.3 * g.size)))
        out[g.name] = sorted(rng.choice(g.size, size=k, replace=False).tolist())
    return out


def randomised_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with non-trivial BatchNorm2d statistics and scales (seeded), so
    that a channel sliced wrongly shows in the output."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


def random_valid_subsets(groups, seed: int) -> dict[str, list[int]]:
    """A seeded random subset (at least one unit, never all) of every group that leaves every
    attribute the group edits at least 1 (the planner refuses to empty a split part or a
    branch of an uneven tie, so a draw that would is drawn again)."""
    rng = np.random.default_rng(seed)
    out = {}
    for g in groups:
        while True:
            k = int(rng.integers(1, g.size))
            pick = sorted(int(u) for u in rng.choice(g.size, k, replace=False))
            if all(e.before - e.drop(pick) >= 1 for e in g.edits):
                break
        out[g.name] = pick
    return out


def _numel(sd: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in sd.values())


def _mixes_channels(model: nn.Module, group) -> bool:
    """True when the group passes a LayerNorm/GroupNorm, whose statistics span the channels:
    removing a channel then changes the others' values, so zeroing is not equivalent."""
    modules = dict(model.named_modules())
    for s in group.slices:
        m = modules.get(s.tensor.rpartition(".")[0])
        if isinstance(m, nn.LayerNorm) or (isinstance(m, nn.GroupNorm) and m.num_groups < m.num_channels):
            return True
    return False


def assert_equals_zeroing(model: nn.Module, pruned: nn.Module, plan, x, rtol: float = 1e-5,
                          atol: float = 1e-5) -> None:
    """``pruned(x)`` equals ``model(x)`` with the plan's units zeroed where they leave their
    group (`_zeroing_hooks`, removed again afterwards): DESIGN invariant 1."""
    handles = _zeroing_hooks(model, plan)
    try:
        with torch.no_grad():
            want = model(x)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), want, rtol=rtol, atol=atol)


def _zeroing_hooks(model: nn.Module, plan) -> list:
    """Zero the removed channels where they leave the group: at the input of every consumer.

    Every path a unit takes through the network ends at a layer that reads it on its input
    axis (a Linear/Conv input channel, a ConvTranspose input channel); before that it only goes
    through per-channel operations (BatchNorm, activations, pooling, depthwise convs, residual
    sums, SE gates, concatenations, shuffles). Zeroing at the consumer input is therefore the
    DESIGN's "zeroed after the ReLU" point for chains, and it is the right point for BatchNorm
    after the root too (zeroing the root's output would not stay zero after the BN's shift).
    """
    modules = dict(model.named_modules(remove_duplicate=False))  # a shared module: any name
    positions: dict[str, set[int]] = {}
    for g in plan.groups:
        for s in g.slices:
            name, _, leaf = s.tensor.rpartition(".")
            m = modules[name]
            reads = (leaf == "weight" and (
                (isinstance(m, nn.Linear) and s.axis == 1)
                or (isinstance(m, CONV_TYPES) and not is_depthwise(m) and s.axis == 1)
                or (isinstance(m, CONV_TRANSPOSE_TYPES) and s.axis == 0)))
            if reads:
                pos = positions.setdefault(name, set())
                for u in g.removed:
                    pos.update(s.map.unit(u))
    handles = []
    for name, pos in positions.items():
        m = modules[name]
        idx = torch.tensor(sorted(pos), dtype=torch.long)  # maybe none (a part of a split)
        linear = isinstance(m, nn.Linear)

        def hook(mod, args, idx=idx, last=linear):
            x = args[0].clone()
            if last:
                x[..., idx] = 0
            else:
                x[:, idx] = 0
            return (x, *args[1:])

        handles.append(m.register_forward_pre_hook(hook))
    return handles


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_groups(name: str) -> None:
    entry = ZOO[name]
    model, x = entry.build(), entry.example()
    groups = prunable_groups(model, x)
    assert {g.name: list(g.roots) for g in groups} == EXPECTED[name]
    # the recording tracer (the fallback) finds exactly the same groups
    assert prunable_groups(model, x, tracer="record") == groups


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_prune_30_percent(name: str) -> None:
    entry = ZOO[name]
    model, x = entry.build(), entry.example()
    with torch.no_grad():
        y0 = model(x)
    groups = prunable_groups(model, x)
    removed = _random_removal(groups)
    plan = plan_pruning(model, removed, example_inputs=x)
    assert sorted(g.name for g in plan.groups) == sorted(removed)

    pruned = apply_plan(copy.deepcopy(model), plan)
    with torch.no_grad():
        y1 = pruned(x)
    assert y1.shape == y0.shape

    # scalars removed from the state dict (parameters and running statistics) are what the plan says
    before, after = _numel(model.state_dict()), _numel(pruned.state_dict())
    assert before - after == plan.scalars_removed() > 0
    # the plan knows which of them are parameters and which are buffers (running statistics)
    params = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in pruned.parameters())
    assert plan.parameters_removed() == params
    assert plan.buffers_removed() == plan.scalars_removed() - params == sum(
        math.prod(shape) - math.prod(plan.pruned_shapes()[k])
        for k, shape in plan.model.tensors.items() if k.endswith(("running_mean", "running_var"))
    )

    # offline path: slice the state dict, build a fresh model, load: same outputs
    sd = apply_to_state_dict(plan, model.state_dict())
    fresh = load_pruned(entry.build(), plan, sd).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y1, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_pruning_equals_zeroing(name: str) -> None:
    entry = ZOO[name]
    model, x = entry.build(), entry.example()
    groups = prunable_groups(model, x)
    # LayerNorm-coupled groups (ConvNeXt and transformer residual streams) are excluded: a
    # LayerNorm's mean and variance depend on which channels exist
    chosen = [g for g in groups if not _mixes_channels(model, g)]
    if name in ("convnext", "transformer"):
        assert [g.name for g in groups if g not in chosen] == [groups[0].name]
    removed = _random_removal(chosen, seed=1)
    plan = build_plan(model, [(g, removed[g.name]) for g in chosen])
    pruned = apply_plan(copy.deepcopy(model), plan)
    handles = _zeroing_hooks(model, plan)
    try:
        with torch.no_grad():
            masked = model(x)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        out = pruned(x)
        original = model(x)
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-5)
    # and the removal mattered: the masked output differs from the unpruned one
    assert not torch.allclose(masked, original, atol=1e-5)
