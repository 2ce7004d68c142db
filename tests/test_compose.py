"""compose(): a sequence of plans becomes one plan on the original model."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from pruneplan import PlanMismatchError, PlanValidationError, PrunePlan, plan_pruning
from pruneplan.apply import apply_plan, apply_to_state_dict
from pruneplan.compose import compose
from pruneplan.plan import state_dict_digest

# ---- on a real model: three plans, each made on the model the previous one left ----------------


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3),  # 0: 8 x 6 x 6
        nn.BatchNorm2d(8),  # 1
        nn.ReLU(),  # 2
        nn.Conv2d(8, 6, 3),  # 3: 6 x 4 x 4
        nn.ReLU(),  # 4
        nn.Flatten(),  # 5: 96 features, 16 per channel of conv 3
        nn.Linear(96, 10),  # 6
        nn.Dropout(0.5),  # 7
        nn.Linear(10, 3),  # 8
    )


def _randomise_bn(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)


@pytest.fixture()
def three():
    """(original model, its state dict, [plan1, plan2, plan3], model after the three plans)."""
    model = _net()
    _randomise_bn(model)
    x = torch.randn(2, 1, 8, 8)
    original = copy.deepcopy(model)
    sd0 = {k: v.clone() for k, v in model.state_dict().items()}
    p1 = plan_pruning(model, {"0": [1, 4]}, x, cascades={"0": ["1", "3"]})
    apply_plan(model, p1)
    p2 = plan_pruning(model, {"3": [0, 2]}, x, cascades={"3": ["6"]})
    apply_plan(model, p2)
    # conv 0 again (local numbering: units 0 and 3 of the 6 left are original 0 and 5),
    # and fc 6, whose input axis plan 2 already cut
    p3 = plan_pruning(model, {"0": [0, 3], "6": [5]}, x, cascades={"0": ["1", "3"], "6": ["7", "8"]})
    apply_plan(model, p3)
    return original, sd0, [p1, p2, p3], model


def test_compose_three_plans_equals_sequential_state_dict(three):
    _, sd0, plans, _ = three
    composed = compose(plans)
    seq = sd0
    for p in plans:
        seq = apply_to_state_dict(p, seq)
    once = apply_to_state_dict(composed, sd0)
    assert set(once) == set(seq)
    for k in seq:
        assert once[k].shape == seq[k].shape, k
        assert torch.equal(once[k], seq[k]), k
    # the shapes it leaves: conv 0 keeps 8 - 2 - 2 = 4, conv 3 keeps 6 - 2 = 4,
    # fc 6 reads 4 channels x 16 = 64 features and keeps 10 - 1 = 9 units
    assert list(once["0.weight"].shape) == [4, 1, 3, 3]
    assert list(once["1.running_var"].shape) == [4]
    assert list(once["3.weight"].shape) == [4, 4, 3, 3]
    assert list(once["6.weight"].shape) == [9, 64]
    assert list(once["8.weight"].shape) == [3, 9]


def test_compose_maps_units_back_to_original_numbering(three):
    _, sd0, plans, _ = three
    composed = compose(plans)
    # plan 1 removes [1, 4] of 8 -> kept [0, 2, 3, 5, 6, 7]; plan 3 removes local [0, 3] = [0, 5]
    g0 = composed.group("0")
    assert (g0.size, g0.removed) == (8, [0, 1, 4, 5])
    # the maps stayed affine (one channel per unit; 16 features per channel for conv 3 -> fc 6)
    assert all(s.map.positions is None for g in composed.groups for s in g.slices)
    assert next(s for s in composed.group("3").slices if s.tensor == "6.weight").map.repeat == 16
    # the fingerprint is the original model's: its digest, and every touched tensor's shape
    assert composed.model.digest == state_dict_digest({k: v.shape for k, v in sd0.items()})
    assert composed.model.digest == plans[0].model.digest
    assert composed.model.tensors["6.weight"] == [10, 96]  # first touched by plan 2
    assert composed.model.tensors["8.weight"] == [3, 10]  # first touched by plan 3
    # edits: before from the original, deltas summed (8 - 2 - 2 = 4)
    assert composed.edits()[("0", "out_channels")] == (8, 4)
    assert composed.edits()[("3", "in_channels")] == (8, 4)
    assert composed.edits()[("6", "in_features")] == (96, 64)
    assert composed.edits()[("6", "out_features")] == (10, 9)
    # dropout 0.5 with 1 of 10 units gone: 0.5 * (1 - 1/10) = 0.45
    before, after = composed.dropout_changes()["7"]
    assert before == 0.5 and math.isclose(after, 0.45)


def test_composed_plan_applied_to_model_gives_same_model(three):
    original, _, plans, model = three
    composed = compose(plans)
    replay = apply_plan(copy.deepcopy(original), composed)
    for (k, a), b in zip(replay.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    for name in ("0", "3", "6", "8"):
        r, m = dict(replay.named_modules())[name], dict(model.named_modules())[name]
        assert repr(r) == repr(m)
    assert math.isclose(replay[7].p, model[7].p)
    x = torch.randn(4, 1, 8, 8)
    replay.eval()
    model.eval()
    assert torch.allclose(replay(x), model(x))


def test_compose_round_trips_json_and_single_plan(three):
    _, _, plans, _ = three
    composed = compose(plans)
    assert PrunePlan.from_json(composed.to_json()) == composed
    # a single plan composes to itself, byte for byte (provenance included)
    alone = compose(plans[:1])
    assert alone.to_json() == plans[0].to_json() and alone.digest() == plans[0].digest()
    assert alone is not plans[0]  # a copy: changing it leaves the caller's plan alone
    # composing is deterministic
    assert compose(plans).to_json() == composed.to_json()


def test_compose_is_associative_on_prefixes(three):
    _, sd0, plans, _ = three
    # compose([compose(p1, p2), p3]) gives the same tensors as compose(p1, p2, p3)
    nested = compose([compose(plans[:2]), plans[2]])
    flat = compose(plans)
    assert nested.groups == flat.groups
    a, b = apply_to_state_dict(nested, sd0), apply_to_state_dict(flat, sd0)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- hand-made plans: explicit positions, errors -------------------------------------------------


def _plan(tensors: dict[str, list[int]], groups: list[dict]) -> PrunePlan:
    return PrunePlan.from_dict({
        "format": "pruneplan",
        "version": 1,
        "model": {"tensors": tensors, "digest": "0" * 64},
        "groups": groups,
    })


def test_compose_explicit_positions_when_affine_cannot_express():
    # t has 6 positions; group "even" owns 0, 2, 4 (a shuffled layout), group "odd" 1, 3, 5
    shuffled = {"positions": [[0], [2], [4]]}
    p1 = _plan({"t": [6]}, [
        {"name": "even", "size": 3, "removed": [1], "slices": [{"tensor": "t", "axis": 0, "map": shuffled}]},
    ])
    # after p1, t = original [0, 1, 3, 4, 5]: even units at local 0, 3; odd units at 1, 2, 4
    p2 = _plan({"t": [5]}, [
        {"name": "even", "size": 2, "removed": [0],
         "slices": [{"tensor": "t", "axis": 0, "map": {"positions": [[0], [3]]}}]},
        {"name": "odd", "size": 3, "removed": [1],
         "slices": [{"tensor": "t", "axis": 0, "map": {"positions": [[1], [2], [4]]}}]},
    ])
    c = compose([p1, p2])
    # even: unit 1 (p1) and local unit 0 of the kept [0, 2] = original 0 -> removed [0, 1]
    assert c.group("even").removed == [0, 1]
    assert c.group("even").slices[0].map.positions == [[0], [2], [4]]  # unchanged map kept
    # odd: units at original 1, 3, 5: stride 2 with one position each is not affine
    odd = c.group("odd")
    assert odd.removed == [1] and odd.slices[0].map.positions == [[1], [3], [5]]
    assert c.removed_by_axis() == {("t", 0): [0, 2, 3]}
    t = torch.arange(6)
    seq = apply_to_state_dict(p2, apply_to_state_dict(p1, {"t": t}, check_digest=False),
                              check_digest=False)
    once = apply_to_state_dict(c, {"t": t}, check_digest=False)
    assert once["t"].tolist() == seq["t"].tolist() == [1, 4, 5]


def test_compose_refits_affine_maps_after_an_earlier_cut():
    # concat: group a owns t[0:4], group b owns t[4:8] (offset 4)
    p1 = _plan({"t": [8]}, [
        {"name": "a", "size": 4, "removed": [1], "slices": [{"tensor": "t", "axis": 0}]},
    ])
    # b first appears later, at offset 3 of the 7 positions left: original 4 + u again
    p2 = _plan({"t": [7]}, [
        {"name": "b", "size": 4, "removed": [0, 2],
         "slices": [{"tensor": "t", "axis": 0, "map": {"offset": 3}}]},
    ])
    c = compose([p1, p2])
    assert c.group("b").slices[0].map.model_dump(exclude_defaults=True) == {"offset": 4}
    assert c.removed_by_axis() == {("t", 0): [1, 4, 6]}


def test_compose_grouped_conv_modulo_axis():
    # a grouped conv with 2 groups reads 8 channels, 4 per group: its weight axis 1 has length 4
    def grouped(size: int, local: int, removed: list[int]) -> dict:
        return {"name": "c", "size": size, "removed": removed,
                "slices": [{"tensor": "w", "axis": 1, "map": {"modulo": local}},
                           {"tensor": "b", "axis": 0}]}

    # remove channel 1 of each group (stream units 1 and 5), then local unit 0 of each
    p1 = _plan({"w": [6, 4, 3, 3], "b": [8]}, [grouped(8, 4, [1, 5])])
    p2 = _plan({"w": [6, 3, 3, 3], "b": [6]}, [grouped(6, 3, [0, 3])])
    c = compose([p1, p2])
    # kept after p1: [0, 2, 3, 4, 6, 7]; local [0, 3] -> original [0, 4]
    assert c.group("c").removed == [0, 1, 4, 5]
    assert c.removed_by_axis()[("w", 1)] == [0, 1]
    w = torch.randn(6, 4, 3, 3)
    b = torch.randn(8)
    sd = {"w": w, "b": b}
    seq = apply_to_state_dict(p2, apply_to_state_dict(p1, sd, check_digest=False), check_digest=False)
    once = apply_to_state_dict(c, sd, check_digest=False)
    assert torch.equal(seq["w"], once["w"]) and torch.equal(seq["b"], once["b"])
    assert torch.equal(once["w"], w[:, 2:])


def test_compose_rejects_shape_mismatch_naming_the_tensor(three):
    _, _, plans, _ = three
    # plan 2 was made after plan 1; giving it first, 3.weight has 8 input channels, not 6
    with pytest.raises(PlanMismatchError, match=r"'3\.(weight|bias)'.*shape"):
        compose([plans[1], plans[1]])
    with pytest.raises(PlanMismatchError, match=r"'0\.bias'"):
        compose([plans[0], plans[0]])


def test_compose_rejects_unit_count_and_structure_mismatch():
    p1 = _plan({"t": [4], "u": [4]}, [
        {"name": "g", "size": 4, "removed": [0], "slices": [{"tensor": "t", "axis": 0}]},
    ])
    bad_size = _plan({"t": [3]}, [
        {"name": "g", "size": 2, "removed": [0], "slices": [{"tensor": "t", "axis": 0}]},
    ])
    with pytest.raises(PlanMismatchError, match="group 'g': has 2 units, but the plans before it leave 3"):
        compose([p1, bad_size])
    other_slices = _plan({"t": [3], "u": [4]}, [
        {"name": "g", "size": 3, "removed": [0],
         "slices": [{"tensor": "t", "axis": 0}, {"tensor": "u", "axis": 0}]},
    ])
    with pytest.raises(PlanMismatchError, match="tensor 'u' axis 0 in one plan but not in another"):
        compose([p1, other_slices])


def test_compose_rejects_attribute_mismatch_and_empty():
    def edit(before: int, after: int) -> dict:
        return {"name": "g", "size": before, "removed": list(range(before - after)),
                "slices": [{"tensor": "t", "axis": 0}],
                "edits": [{"module": "m", "attribute": "out_features", "before": before, "after": after}]}

    p1 = _plan({"t": [4]}, [edit(4, 3)])
    with pytest.raises(PlanMismatchError, match=r"m\.out_features = 4, but the plans before it leave 3"):
        compose([p1, _plan({"t": [3]}, [{**edit(4, 3), "size": 3}])])
    assert compose([p1, _plan({"t": [3]}, [edit(3, 2)])]).edits() == {("m", "out_features"): (4, 2)}
    with pytest.raises(PlanValidationError, match="at least one plan"):
        compose([])


def test_compose_differently_named_groups_on_same_positions_is_refused():
    p1 = _plan({"t": [4]}, [{"name": "a", "size": 4, "removed": [0], "slices": [{"tensor": "t", "axis": 0}]}])
    p2 = _plan({"t": [3]}, [{"name": "b", "size": 3, "removed": [0], "slices": [{"tensor": "t", "axis": 0}]}])
    with pytest.raises(PlanValidationError, match=r"composed plan is invalid.*'a' and 'b'"):
        compose([p1, p2])


def test_compose_keeps_the_first_plans_weights_digest_so_other_weights_warn() -> None:
    # trial finding F-compose-provenance: the composed plan starts from plan 1's weights; it
    # used to drop their content digest, so applying it to other weights was silent
    from pruneplan import WeightsContentWarning, plan_from_metric, weights_digest

    model, x = _net().eval(), torch.randn(2, 1, 8, 8)
    original = copy.deepcopy(model)
    p1 = plan_from_metric(model, x, "lp_norm", 0.25)
    apply_plan(model, p1)
    p2 = plan_from_metric(model, x, "random", 0.25, seed=3)
    composed = compose([p1, p2])
    assert p1.provenance.weights_digest == weights_digest(original)
    assert composed.provenance.weights_digest == p1.provenance.weights_digest
    assert composed.provenance.notes == f"composed of 2 plans: {p1.digest()[:12]}, {p2.digest()[:12]}"
    assert composed.provenance.metric is None  # a step's metric is not the composed plan's
    other = _net()
    with torch.no_grad():
        other[0].weight.add_(1.0)  # same names and shapes, other content
    with pytest.warns(WeightsContentWarning):
        apply_plan(copy.deepcopy(other), composed)
    with pytest.raises(PlanMismatchError):
        apply_plan(copy.deepcopy(other), composed, check_content="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the weights it was made from: no warning
        apply_plan(copy.deepcopy(original), composed)
