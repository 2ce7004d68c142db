"""The seed-compatible Pruner: original unit expectations, optimizers, BatchNorm, history."""

from __future__ import annotations

import copy
import importlib.util
import math

import numpy as np
import pytest
import torch
from torch import nn

import pruneplan as pp
from pruneplan import OptimizerStateError, PlanError, PlanningError, PrunePlan
from pruneplan.apply import apply_plan
from pruneplan.compose import compose
from pruneplan.pruner import Pruner

CPU = torch.device("cpu")


def _simple() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))


# ---- the original TorchPruner's unit expectations ----------------------------------------------


def test_prune_parameter_keeps_identity_and_shapes():
    model = _simple()
    p = Pruner(model, input_size=(3,), device=CPU)
    module = model[0]
    weight, bias = module.weight, module.bias
    assert list(weight.shape) == [2, 3] and list(bias.shape) == [2]
    p.prune_parameter(module, "weight", [0], axis=0)
    p.prune_parameter(module, "bias", [0], axis=0)
    assert list(module.weight.shape) == [1, 3]
    assert list(module.bias.shape) == [1]
    assert module.weight is weight and module.bias is bias
    p.prune_parameter(module, "weight", [0], axis=1)
    assert list(module.weight.shape) == [1, 2]
    assert module.weight is weight
    # three recorded steps; prune_parameter leaves module attributes alone
    assert [g.name for plan in p.history for g in plan.groups] == [
        "0.weight:axis0", "0.bias:axis0", "0.weight:axis1"]
    assert module.out_features == 2


def test_prune_parameter_values_grad_and_none():
    model = _simple()
    model(torch.ones(4, 3)).sum().backward()
    w, g = model[0].weight.detach().clone(), model[0].weight.grad.clone()
    p = Pruner(model, (3,), CPU)
    p.prune_parameter(model[0], "weight", np.array([1]), axis=-1)  # axis -1 is axis 1
    assert torch.equal(model[0].weight.detach(), w[:, [0, 2]])
    assert torch.equal(model[0].weight.grad, g[:, [0, 2]])
    no_bias = nn.Sequential(nn.Linear(3, 2, bias=False))
    assert Pruner(no_bias, (3,), CPU).prune_parameter(no_bias[0], "bias", [0]) is None
    with pytest.raises(PlanningError, match="no parameter 'beta'"):
        p.prune_parameter(model[0], "beta", [0])
    with pytest.raises(PlanningError, match="axis 2 is out of range"):
        p.prune_parameter(model[0], "weight", [0], axis=2)


def test_prune_module_linear_out_then_in():
    model = _simple()
    p = Pruner(model, input_size=(3,), device=CPU)
    module = model[0]
    w = module.weight.detach().clone()
    p.prune_module(module, [0], direction="out")
    assert list(module.weight.shape) == [1, 3] and list(module.bias.shape) == [1]
    assert module.out_features == 1
    p.prune_module(module, [0], direction="in")
    assert list(module.weight.shape) == [1, 2] and module.in_features == 2
    assert torch.equal(module.weight.detach(), w[1:, 1:])
    assert [g.name for plan in p.history for g in plan.groups] == ["0:out", "0:in"]


def test_prune_model_linear_linear():
    model = _simple()
    x = torch.ones(10, 3)
    p = Pruner(model, input_size=(3,), device=CPU)
    plan = p.prune_model(model[0], [0], cascading_modules=[model[2]])
    assert list(model[0].weight.shape) == [1, 3]
    assert list(model[2].weight.shape) == [1, 1]
    assert list(model(x).shape) == [10, 1]
    assert p.history == [plan]
    assert plan.removed_by_axis() == {("0.bias", 0): [0], ("0.weight", 0): [0], ("2.weight", 1): [0]}


def test_conv_flatten_linear_maps_unit_to_features():
    # Conv2d(1, 3, 2) on 1x3x3 gives 3 x 2 x 2; Flatten: channel c owns features 4c .. 4c+3
    model = nn.Sequential(nn.Conv2d(1, 3, 2), nn.ReLU(), nn.Flatten(), nn.Linear(12, 1))
    p = Pruner(model, input_size=(1, 3, 3), device=CPU)
    w = model[3].weight.detach().clone()
    plan = p.prune_model(model[0], [0], cascading_modules=[model[3]])
    assert plan.removed_by_axis()[("3.weight", 1)] == [0, 1, 2, 3]
    assert list(model[3].weight.shape) == [1, 8]
    assert torch.equal(model[3].weight.detach(), w[:, 4:])
    assert list(model(torch.zeros(2, 1, 3, 3)).shape) == [2, 1]


def test_conv_maxpool_flatten_linear_maps_unit_to_feature():
    # 3 x 2 x 2 -> MaxPool2d(2) -> 3 x 1 x 1: channel c is feature c
    model = nn.Sequential(nn.Conv2d(1, 3, 2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3, 1))
    p = Pruner(model, input_size=(1, 3, 3), device=CPU)
    plan = p.prune_model(model[0], [0], cascading_modules=[model[4]])
    assert plan.removed_by_axis()[("4.weight", 1)] == [0]
    assert list(model[4].weight.shape) == [1, 2]


def test_linear_bn_linear_prunes_the_bn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2), nn.Linear(2, 1))
    p = Pruner(model, input_size=(3,), device=CPU)
    p.prune_model(model[0], [0], [model[1], model[2]])
    assert list(model[0].weight.shape) == [1, 3]
    assert list(model[2].weight.shape) == [1, 1]
    for key in ("weight", "bias", "running_mean", "running_var"):
        assert list(getattr(model[1], key).shape) == [1], key
    assert model[1].num_features == 1
    assert list(model(torch.ones(10, 3)).shape) == [10, 1]


def test_dropout_rate_after_prune_module():
    model = nn.Sequential(nn.Linear(3, 5), nn.Dropout(0.5), nn.Linear(5, 1))
    p = Pruner(model, (3,), CPU)
    # 1 of 5 units removed: 0.5 * (1 - 1/5) = 0.4
    plan = p.prune_module(model[1], [2], direction="in", original_len=5)
    assert math.isclose(model[1].p, 0.4)
    # recorded as a group holding only the rate change, so the history replays it
    assert p.history == [plan] and plan.model.tensors == {}
    assert plan.dropout_changes() == {"1": (0.5, 0.4)}
    replay = nn.Sequential(nn.Linear(3, 5), nn.Dropout(0.5), nn.Linear(5, 1))
    pp.apply_plan(replay, p.composed())
    assert math.isclose(replay[1].p, 0.4)
    with pytest.raises(PlanningError, match="original_len"):
        p.prune_module(model[1], [0], direction="in")
    for drop in (nn.Dropout1d(0.3), nn.Dropout2d(0.3), nn.Dropout3d(0.3), nn.AlphaDropout(0.3)):
        holder = nn.Sequential(drop)
        Pruner(holder, (3,), CPU).prune_module(drop, torch.tensor([0, 1]), original_len=4)
        assert math.isclose(drop.p, 0.15)  # 0.3 * (1 - 2/4)


def test_dropout_in_cascade_is_recorded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Dropout(0.5), nn.Linear(5, 1))
    p = Pruner(model, (3,), CPU)
    plan = p.prune_model("0", [4], ["2", "3"])
    assert math.isclose(model[2].p, 0.4)
    assert plan.dropout_changes() == {"2": (0.5, 0.4)}


# ---- prune_module on every layer kind ---------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "direction", "key_axes", "attrs"),
    [
        (lambda: nn.Conv1d(4, 6, 3), "out", {"weight": 0, "bias": 0}, {"out_channels": 4}),
        (lambda: nn.Conv2d(4, 6, 3), "in", {"weight": 1}, {"in_channels": 2}),
        (lambda: nn.Conv3d(4, 6, 1), "out", {"weight": 0, "bias": 0}, {"out_channels": 4}),
        # ConvTranspose weights are (in, out, ...): "out" cuts axis 1, "in" cuts axis 0
        (lambda: nn.ConvTranspose2d(4, 6, 3), "out", {"weight": 1, "bias": 0}, {"out_channels": 4}),
        (lambda: nn.ConvTranspose1d(4, 6, 3), "in", {"weight": 0}, {"in_channels": 2}),
        (lambda: nn.BatchNorm2d(4), "in",
         {"weight": 0, "bias": 0, "running_mean": 0, "running_var": 0}, {"num_features": 2}),
        (lambda: nn.LayerNorm(4), "out", {"weight": 0, "bias": 0}, {"normalized_shape": (2,)}),
        (lambda: nn.GroupNorm(4, 4), "in", {"weight": 0, "bias": 0}, {"num_channels": 2, "num_groups": 2}),
        (lambda: nn.GroupNorm(1, 4), "in", {"weight": 0, "bias": 0}, {"num_channels": 2, "num_groups": 1}),
        # depthwise: channels go in and out together
        (lambda: nn.Conv2d(4, 4, 3, groups=4), "out", {"weight": 0, "bias": 0},
         {"in_channels": 2, "out_channels": 2, "groups": 2}),
    ],
)
def test_prune_module_layer_kinds(make, direction, key_axes, attrs):
    torch.manual_seed(0)
    m = make()
    holder = nn.Sequential(m)
    before = {k: getattr(m, k).detach().clone() for k in key_axes}
    plan = Pruner(holder, (4, 5), CPU).prune_module(holder[0], [0, 2], direction=direction)
    assert plan is not None
    for key, axis in key_axes.items():
        t = getattr(m, key).detach()
        keep = torch.tensor([i for i in range(before[key].shape[axis]) if i not in (0, 2)])
        assert torch.equal(t, before[key].index_select(axis, keep)), key
    for attr, value in attrs.items():
        assert getattr(m, attr) == value, attr


def test_prune_module_grouped_conv_input():
    # 2 groups of 4 input channels: losing channel 1 of each group keeps the blocks equal
    m = nn.Conv2d(8, 4, 1, groups=2)
    holder = nn.Sequential(m)
    w = m.weight.detach().clone()
    Pruner(holder, (8, 2, 2), CPU).prune_module(m, [1, 5], direction="in")
    assert m.in_channels == 6 and list(m.weight.shape) == [4, 3, 1, 1]
    assert torch.equal(m.weight.detach(), w[:, [0, 2, 3]])
    holder(torch.zeros(1, 6, 2, 2))
    with pytest.raises(PlanError, match="grouped convolution"):
        Pruner(holder, (6, 2, 2), CPU).prune_module(m, [0], direction="in")


def test_prune_module_refusals():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    p = Pruner(model, (3,), CPU)
    with pytest.raises(PlanningError, match="direction must be 'out' or 'in'"):
        p.prune_module(model[0], [0], direction="up")
    with pytest.raises(PlanningError, match="ReLU"):
        p.prune_module(model[1], [0], direction="in")
    with pytest.raises(PlanningError, match="no module named 'nope'"):
        p.prune_module("nope", [0])
    with pytest.raises(PlanningError, match="not part of the model"):
        p.prune_module(nn.Linear(3, 4), [0])
    assert p.history == []


# ---- indices --------------------------------------------------------------------------------


@pytest.mark.parametrize("indices", [[3, 1], np.array([1, 3]), torch.tensor([3, 1]), (1, 3)])
def test_index_types(indices):
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 1))
    p = Pruner(model, (3,), CPU)
    plan = p.prune_model(model[0], indices, [model[2]])
    assert plan.group("0").removed == [1, 3]
    assert model[0].out_features == 3 and model[2].in_features == 3


def test_empty_indices_change_nothing():
    model = _simple()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = Pruner(model, (3,), CPU)
    plan = p.prune_model(model[0], [], [model[2]])
    assert isinstance(plan, PrunePlan) and plan.groups == []
    assert p.prune_module(model[0], np.array([], dtype=int)) is None
    assert p.prune_parameter(model[0], "weight", torch.tensor([], dtype=torch.long)) is None
    drop = nn.Sequential(nn.Dropout(0.5))
    assert Pruner(drop, (3,), CPU).prune_module(drop[0], [], original_len=5) is None
    assert drop[0].p == 0.5
    assert p.history == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("indices", "message"),
    [
        ([0, 0], "index 0 is given more than once"),
        ([2], "index 2 is out of range for 2 units"),
        ([-1], "index -1 is out of range"),
        ([0.5], "is not an integer"),
        ([0, 1], "removing all 2 units"),
    ],
)
def test_bad_indices_are_clear_errors(indices, message):
    model = _simple()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = Pruner(model, (3,), CPU)
    with pytest.raises(PlanError, match=message):
        p.prune_model(model[0], indices, [model[2]])
    with pytest.raises(PlanError, match=message):
        p.prune_module(model[0], indices, "out")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert p.history == []


def test_modules_by_dotted_name():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("block", nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    model.add_module("head", nn.Sequential(nn.Flatten(), nn.Linear(4 * 3 * 3, 2)))
    p = Pruner(model, (1, 5, 5), "cpu")
    plan = p.prune_model("block.0", [1], ["block.1", "head.1"])
    # 9 features per channel after Flatten: channel 1 owns features 9..17
    assert plan.removed_by_axis()[("head.1.weight", 1)] == list(range(9, 18))
    assert model.head[1].in_features == 27 and model.block[1].num_features == 3


def test_cascading_none_uses_discovery_or_says_it_is_missing():
    model = _simple()
    p = Pruner(model, (3,), CPU)
    if importlib.util.find_spec("pruneplan.graph.discover") is None:
        with pytest.raises(PlanningError, match="automatic cascade discovery is not available"):
            p.prune_model(model[0], [0])
        assert p.history == [] and list(model[0].weight.shape) == [2, 3]
    else:  # discovery has landed: Linear -> ReLU -> Linear is found on its own
        p.prune_model(model[0], [0])
        assert list(model[2].weight.shape) == [1, 1]


# ---- optimizers -------------------------------------------------------------------------------

OPTIMIZERS = {
    "sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "adamw-amsgrad": lambda ps: torch.optim.AdamW(ps, lr=0.01, amsgrad=True),
    "adamax": lambda ps: torch.optim.Adamax(ps, lr=0.01),
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=0.01),
    "radam": lambda ps: torch.optim.RAdam(ps, lr=0.01),
    "rmsprop-centered": lambda ps: torch.optim.RMSprop(ps, lr=0.005, momentum=0.5, centered=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1),
    "adadelta": lambda ps: torch.optim.Adadelta(ps, lr=1.0),
}


def _regression():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 6, generator=g)
    w = torch.randn(6, 3, generator=g)
    y = torch.tanh(x @ w) + 0.05 * torch.randn(128, 3, generator=g)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    return model, x, y


def _loss(model, x, y) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), y)


def _train(model, opt, x, y, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_state_is_sliced_mid_training(name):
    model, x, y = _regression()
    # two param groups: the layer pruned on its output and the layer pruned on its input
    opt = OPTIMIZERS[name]([
        {"params": model[0].parameters()},
        {"params": model[2].parameters(), "lr": OPTIMIZERS[name]([torch.zeros(1)]).defaults["lr"] / 2},
    ])
    _train(model, opt, x, y, 15)
    opt.zero_grad()
    _loss(model, x, y).backward()  # leave gradients in place: they must be sliced too
    params = dict(model.named_parameters())
    state = {k: {s: (v.clone() if torch.is_tensor(v) else v) for s, v in opt.state[p].items()}
             for k, p in params.items()}
    grads = {k: p.grad.clone() for k, p in params.items()}
    ids = {k: id(p) for k, p in params.items()}
    assert any(torch.is_tensor(v) and v.shape == params["0.weight"].shape for v in state["0.weight"].values())

    removed = [2, 5, 9]
    keep = torch.tensor([i for i in range(12) if i not in removed])
    p = Pruner(model, (6,), CPU, optimizer=opt)
    p.prune_model(model[0], removed, [model[2]])

    # how each tensor was cut: rows of 0.weight / 0.bias, columns of 2.weight, 2.bias untouched
    cut = {"0.weight": lambda t: t[keep], "0.bias": lambda t: t[keep],
           "2.weight": lambda t: t[:, keep], "2.bias": lambda t: t}
    for k, param in model.named_parameters():
        assert id(param) == ids[k]
        assert torch.equal(param.grad, cut[k](grads[k])), k
        new = opt.state[param]
        assert set(new) == set(state[k])
        for s, old in state[k].items():
            if torch.is_tensor(old) and old.shape == grads[k].shape:
                assert torch.equal(new[s], cut[k](old)), (k, s)
            elif torch.is_tensor(old):  # scalar state (step, mu_product) is kept as it was
                assert torch.equal(new[s], old), (k, s)
            else:
                assert new[s] == old, (k, s)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]

    # training goes on: the next step runs and the loss keeps going down
    with torch.no_grad():
        after_prune = _loss(model, x, y).item()
    opt.step()
    _train(model, opt, x, y, 40)
    with torch.no_grad():
        final = _loss(model, x, y).item()
    assert final < after_prune, (after_prune, final)


@pytest.mark.parametrize("kind", ["step", "onecycle"])
def test_lr_scheduler_keeps_working(kind):
    model, x, y = _regression()
    if kind == "step":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=12)
    reference = copy.deepcopy(sched.state_dict())
    lrs = []
    for step in range(12):
        if step == 5:
            Pruner(model, (6,), CPU, opt).prune_model(model[0], [0, 1, 2], [model[2]])
        _train(model, opt, x, y, 1)
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    if kind == "step":
        # lr = 0.1 * 0.5 ** (steps // 4) after each of the 12 steps
        assert lrs == pytest.approx([0.1 * 0.5 ** ((i + 1) // 4) for i in range(12)])
    else:
        # the same schedule as an unpruned twin's
        twin_opt = torch.optim.Adam(_regression()[0].parameters(), lr=0.01)
        twin = torch.optim.lr_scheduler.OneCycleLR(twin_opt, max_lr=0.01, total_steps=12)
        twin.load_state_dict(reference)
        expected = []
        for _ in range(12):
            twin_opt.step()
            twin.step()
            expected.append(twin.get_last_lr()[0])
        assert lrs == pytest.approx(expected)
    assert opt.param_groups[0]["params"][0] is model[0].weight


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    st = {id(p): {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in s.items()}
          for p, s in opt.state.items()}
    return sd, st


def _unchanged(model, opt, snap) -> bool:
    sd, st = snap
    now = model.state_dict()
    if set(now) != set(sd) or any(not torch.equal(now[k], sd[k]) for k in sd):
        return False
    return all(_same(v, st[id(p)][k]) for p, s in opt.state.items() for k, v in s.items())


def _same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("root", ["0", "2"])
def test_lbfgs_state_cannot_be_mapped_and_nothing_changes(root):
    model, x, y = _regression()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)

    def closure():
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        return loss

    opt.step(closure)
    snap = _snapshot(model, opt)
    p = Pruner(model, (6,), CPU, opt)
    # LBFGS keeps flat vectors over all 123 parameters ('d' has shape [123]) under the first one
    assert opt.state[model[0].weight]["d"].shape == (6 * 12 + 12 + 12 * 3 + 3,)
    with pytest.raises(OptimizerStateError, match=r"'d'|LBFGS"):
        if root == "0":
            p.prune_model("0", [1], ["2"])
        else:  # the last layer's units: not the parameter LBFGS keeps its state under
            p.prune_module("2", [1], "out")
    assert _unchanged(model, opt, snap)
    assert p.history == []
    opt.step(closure)  # still usable


def test_foreign_optimizer_state_errors_before_any_change():
    model, x, y = _regression()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    _train(model, opt, x, y, 3)
    # a state entry of a shape the library does not recognise, on the *consumer* layer, which
    # is staged after the root: a non-atomic applier would already have cut the root
    opt.state[model[2].weight]["foreign"] = torch.zeros(5)
    snap = _snapshot(model, opt)
    p = Pruner(model, (6,), CPU, opt)
    with pytest.raises(OptimizerStateError, match=r"'foreign' of parameter '2\.weight' has shape \[5\]"):
        p.prune_model(model[0], [1, 4], [model[2]])
    assert _unchanged(model, opt, snap)
    assert list(model[0].weight.shape) == [12, 6] and model[0].out_features == 12
    assert p.history == []


# ---- BatchNorm statistics and training flags --------------------------------------------------


def test_prune_model_in_train_mode_keeps_batchnorm_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 2 * 2, 4),
    )
    model.train()
    for _ in range(3):
        model(torch.randn(8, 3, 6, 6))  # non-trivial running statistics
    model[4].eval()  # a mixed set of training flags must come back as it was
    flags = [m.training for m in model.modules()]
    bn1 = {k: v.clone() for k, v in model[1].state_dict().items()}
    bn4 = {k: v.clone() for k, v in model[4].state_dict().items()}
    # sanity: a train-mode forward on the probe batch would move the statistics
    probe = copy.deepcopy(model)
    probe(torch.zeros(2, 3, 6, 6))
    assert not torch.equal(probe[1].running_mean, bn1["running_mean"])

    p = Pruner(model, (3, 6, 6), CPU)
    plan = p.prune_model(model[3], [0, 4], [model[4], model[7]])  # needs the probe (Flatten -> Linear)
    assert plan.removed_by_axis()[("7.weight", 1)] == [0, 1, 2, 3, 16, 17, 18, 19]
    assert [m.training for m in model.modules()] == flags
    for k, v in model[1].state_dict().items():  # untouched BN: bit for bit
        assert torch.equal(v, bn1[k]), k
    keep = torch.tensor([1, 2, 3, 5])
    for k in ("running_mean", "running_var", "weight", "bias"):
        assert torch.equal(model[4].state_dict()[k], bn4[k][keep]), k
    assert model[4].num_batches_tracked.item() == bn4["num_batches_tracked"].item() == 3
    assert model[1].num_batches_tracked.item() == 3


# ---- history ------------------------------------------------------------------------------------


def test_history_composes_and_replays(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 3 * 3, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 2),
    )
    original = copy.deepcopy(model)
    p = Pruner(model, (1, 7, 7), CPU)
    p.prune_model(model[0], [1], [model[1], model[3]])
    p.prune_model(model[3], [0, 3], [model[6]])
    p.prune_model(model[0], [0, 4], [model[1], model[3]])  # units 0 and 5 of the original
    p.prune_model("6", [7], ["8", "9"])
    p.prune_parameter(model[9], "bias", [1])  # a recorded low-level step on another tensor
    assert len(p.history) == 5
    composed = p.composed()
    assert composed.group("0").removed == [0, 1, 5]
    assert composed.group("3").removed == [0, 3]
    assert math.isclose(composed.dropout_changes()["8"][1], 0.3 * (1 - 1 / 8))

    path = p.save_history(tmp_path / "history.json")
    loaded = PrunePlan.load(path)
    assert loaded == composed == compose(p.history)
    replay = apply_plan(copy.deepcopy(original), loaded)
    for k, v in model.state_dict().items():
        assert torch.equal(replay.state_dict()[k], v), k
    assert [repr(m) for m in replay.modules()] == [repr(m) for m in model.modules()]


def test_save_empty_history(tmp_path):
    model = _simple()
    p = Pruner(model, (3,), CPU)
    plan = PrunePlan.load(p.save_history(tmp_path / "h.json"))
    assert plan.groups == []
    apply_plan(model, plan)  # fits the model


def test_example_inputs_instead_of_input_size():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))
    p = Pruner(model, None, CPU, example_inputs=torch.randn(1, 2, 4, 4))
    plan = p.prune_model("0", [3], ["3"])
    assert plan.removed_by_axis()[("3.weight", 1)] == [12, 13, 14, 15]  # 4 features per channel
    no_probe = Pruner(model, None, CPU)
    with pytest.raises(PlanningError, match="pass example_inputs"):
        no_probe.prune_model("0", [0], ["3"])
    no_probe.prune_model("0", [0], [])  # a cascade without Linear needs no probe
    assert model[0].out_channels == 2


@pytest.mark.skipif(importlib.util.find_spec("pruneplan.graph.discover") is None,
                    reason="automatic discovery not available")
def test_discovered_cascades_match_explicit_ones():
    def net() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(6 * 3 * 3, 8), nn.ReLU(), nn.Dropout(0.5),
                             nn.Linear(8, 2))

    explicit, found = net(), net()
    pe, pf = Pruner(explicit, (1, 8, 8), CPU), Pruner(found, (1, 8, 8), CPU)
    for root, idx, cascade in (("0", [1, 4], ["1", "5"]), ("5", [0, 7], ["7", "8"]), ("0", [0], ["1", "5"])):
        a = pe.prune_model(root, idx, cascade)
        b = pf.prune_model(root, idx, None)
        assert a.groups == b.groups
    for (k, v), w in zip(explicit.state_dict().items(), found.state_dict().values()):
        assert torch.equal(v, w), k
    assert compose(pe.history).groups == compose(pf.history).groups
