"""The plan document: validation rules, canonical JSON, digest, schema drift, diff."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest

from pruneplan import PlanValidationError, PrunePlan, diff_plans
from pruneplan.plan import canonical_json, json_schema, removed_positions, state_dict_digest

ROOT = Path(__file__).resolve().parents[1]


def base_dict() -> dict:
    """A small valid plan: Linear "a" (4 units) feeding Linear "b" (reads 8 features: 2 per unit)."""
    return {
        "format": "pruneplan",
        "version": 1,
        "model": {
            "tensors": {"a.weight": [4, 3], "a.bias": [4], "b.weight": [2, 8]},
            "digest": "0" * 64,
        },
        "groups": [
            {
                "name": "a",
                "size": 4,
                "removed": [1, 3],
                "slices": [
                    {"tensor": "a.weight", "axis": 0},
                    {"tensor": "a.bias", "axis": 0},
                    {"tensor": "b.weight", "axis": 1, "map": {"repeat": 2}},
                ],
                "edits": [{"module": "a", "attribute": "out_features", "before": 4, "after": 2}],
            }
        ],
    }


def test_round_trip_is_byte_identical(tmp_path: Path) -> None:
    plan = PrunePlan.from_dict(base_dict())
    path = plan.save(tmp_path / "p.json")
    again = PrunePlan.load(path)
    assert path.read_text() == plan.to_json() == again.to_json()
    # the digest is the sha256 of exactly the canonical bytes
    assert plan.digest() == hashlib.sha256(path.read_bytes()).hexdigest()


def test_canonical_form_ignores_input_order() -> None:
    d = base_dict()
    shuffled = copy.deepcopy(d)
    shuffled["groups"][0]["slices"].reverse()
    shuffled["model"]["tensors"] = dict(reversed(list(d["model"]["tensors"].items())))
    shuffled = dict(reversed(list(shuffled.items())))
    assert PrunePlan.from_dict(shuffled).to_json() == PrunePlan.from_dict(d).to_json()


def test_canonical_json_golden() -> None:
    # Hand-written expectation of the format: sorted keys, 2-space indent, flat lists and small
    # flat objects on one line.
    text = canonical_json({"b": [3, 1], "a": {"y": 1, "x": "s"}, "c": [{"k": [1]}, 2]})
    assert text == (
        "{\n"
        '  "a": {"x": "s", "y": 1},\n'
        '  "b": [3, 1],\n'
        '  "c": [\n'
        '    {"k": [1]},\n'
        "    2\n"
        "  ]\n"
        "}\n"
    )


def test_defaults_are_omitted_and_format_kept() -> None:
    data = json.loads(PrunePlan.from_dict(base_dict()).to_json())
    assert data["format"] == "pruneplan" and data["version"] == 1
    assert data["groups"][0]["slices"][0] == {"axis": 0, "tensor": "a.bias"}  # no default map
    assert data["groups"][0]["slices"][2]["map"] == {"repeat": 2}


def test_removed_positions_affine_and_explicit() -> None:
    plan = PrunePlan.from_dict(base_dict())
    b = next(s for s in plan.groups[0].slices if s.tensor == "b.weight")
    # repeat 2: unit 1 owns features 2,3 and unit 3 owns 6,7
    assert removed_positions(b, [1, 3]) == [2, 3, 6, 7]
    assert plan.pruned_shapes() == {"a.bias": [2], "a.weight": [2, 3], "b.weight": [2, 4]}
    # 2*3 weights + 2 biases of "a", 2*4 weights of "b"
    assert plan.parameters_removed() == 6 + 2 + 8


def test_totals_and_summary_split_parameters_and_buffers() -> None:
    d = base_dict()
    # a running-statistics buffer of "a" (4 values, one per unit) recorded as a buffer
    d["model"]["tensors"]["a.running_mean"] = [4]
    d["model"]["buffers"] = ["a.running_mean"]
    d["groups"][0]["slices"].append({"tensor": "a.running_mean", "axis": 0})
    plan = PrunePlan.from_dict(d)
    # touched parameters: 4*3 + 4 + 2*8 = 32; removed 6 + 2 + 8 = 16 (as above); the buffer has
    # 4 values and loses units 1 and 3
    assert plan.totals() == {"parameters_touched": 32, "parameters_removed": 16,
                             "buffers_touched": 4, "buffers_removed": 2}
    assert (plan.parameters_removed(), plan.buffers_removed(), plan.scalars_removed(),
            plan.parameters_touched()) == (16, 2, 18, 32)
    [row] = plan.summary()
    assert (row["parameters"], row["buffers"], row["kept"], row["fraction"]) == (16, 2, 2, 0.5)
    assert plan.group_parameters_removed("a", buffers=True) == 2
    # without the buffer list every tensor counts as a parameter, and buffers are unknown
    del d["model"]["buffers"]
    plan = PrunePlan.from_dict(d)
    assert plan.totals()["parameters_removed"] == 18 and plan.buffers_removed() == 0
    assert plan.summary()[0]["buffers"] is None


def test_tiles_for_channels_last_flatten() -> None:
    d = base_dict()
    # channels-last flatten of 4 channels x 2 positions: unit u owns u and u + 4
    d["groups"][0]["slices"][2]["map"] = {"tiles": 2, "tile_stride": 4}
    plan = PrunePlan.from_dict(d)
    b = next(s for s in plan.groups[0].slices if s.tensor == "b.weight")
    assert removed_positions(b, [1, 3]) == [1, 3, 5, 7]


def test_concat_groups_on_one_axis_are_allowed_when_disjoint() -> None:
    d = base_dict()
    d["model"]["tensors"].update({"c.weight": [2, 3], "b.weight": [2, 6]})
    d["groups"][0]["slices"][2]["map"] = {}
    d["groups"].append({
        "name": "c", "size": 2, "removed": [0],
        "slices": [{"tensor": "c.weight", "axis": 0},
                   {"tensor": "b.weight", "axis": 1, "map": {"offset": 4}}],
    })
    plan = PrunePlan.from_dict(d)
    # "a" removes features 1,3 of b; "c" (at offset 4) removes feature 4
    assert plan.removed_by_axis()[("b.weight", 1)] == [1, 3, 4]


def test_grouped_conv_modulo_requires_same_local_positions() -> None:
    d = base_dict()
    # b is a grouped conv with 2 groups over a's 4 channels: local positions 0..1
    d["model"]["tensors"]["b.weight"] = [2, 2, 3, 3]
    d["groups"][0]["slices"][2]["map"] = {"modulo": 2}
    d["groups"][0]["removed"] = [1, 3]  # local 1 in both blocks: fine
    assert PrunePlan.from_dict(d).pruned_shapes()["b.weight"] == [2, 1, 3, 3]
    d["groups"][0]["removed"] = [1, 2]  # local 1 in block 0, local 0 in block 1
    with pytest.raises(PlanValidationError, match="every block must lose the same"):
        PrunePlan.from_dict(d)


def _mutate(path: str, value):
    def f(d: dict) -> None:
        keys = path.split("/")
        target = d
        for k in keys[:-1]:
            target = target[int(k)] if k.isdigit() else target[k]
        last = keys[-1]
        if value is KeyError:
            del target[last]
        else:
            target[int(last) if last.isdigit() else last] = value

    return f


def _overlap(d: dict) -> None:
    d["groups"].append({"name": "z", "size": 4, "removed": [0],
                        "slices": [{"tensor": "b.weight", "axis": 1}]})


INVALID = [
    ("unknown version", _mutate("version", 4), "unsupported plan version 4: this pruneplan reads versions 1, 2, 3"),
    ("wrong format", _mutate("format", "torchpruner"), "format is 'torchpruner', expected 'pruneplan'"),
    ("unknown field", _mutate("extra", 1), "extra: Extra inputs are not permitted"),
    ("unknown group field", _mutate("groups/0/colour", "red"), "groups[0].colour"),
    ("missing model", _mutate("model", KeyError), "model: Field required"),
    ("unsorted", _mutate("groups/0/removed", [3, 1]), "removed[1] = 1 is not sorted"),
    ("duplicate", _mutate("groups/0/removed", [1, 1]), "removed[1] = 1 is a duplicate"),
    ("negative", _mutate("groups/0/removed", [-1, 2]), "removed[0] = -1 is negative"),
    ("out of range", _mutate("groups/0/removed", [1, 4]), "removed[1] = 4 is out of range for size 4"),
    ("all removed", _mutate("groups/0/removed", [0, 1, 2, 3]), "removes all 4 units"),
    ("not an int", _mutate("groups/0/removed", [1, "x"]), "groups[0].removed[1]"),
    # strict types: one form per value, so a numeric string or a bool is not an index
    ("numeric string", _mutate("groups/0/removed", [1, "3"]), "groups[0].removed[1]: Input should be a valid integer"),
    ("bool index", _mutate("groups/0/removed", [True, 3]), "groups[0].removed[0]: Input should be a valid integer"),
    ("float size", _mutate("groups/0/size", 4.0), "groups[0].size: Input should be a valid integer"),
    ("dropout 1.0", _mutate("groups/0/dropout", [{"module": "d", "p_before": 1.0, "p_after": 0.5}]),
     "dropout rate 1.0 is outside [0, 1)"),
    ("dropout < 0", _mutate("groups/0/dropout", [{"module": "d", "p_before": 0.5, "p_after": -0.1}]),
     "dropout rate -0.1 is outside [0, 1)"),
    ("overlapping groups", _overlap, "groups 'a' and 'z' both slice tensor 'b.weight' axis 1"),
    ("tensor not in fingerprint", _mutate("groups/0/slices/0/tensor", "q.weight"),
     "tensor 'q.weight': not listed in model.tensors"),
    ("axis out of range", _mutate("groups/0/slices/1/axis", 1), "axis 1 out of range for shape [4]"),
    ("positions past axis", _mutate("groups/0/slices/2/map", {"repeat": 3}),
     "units reach position 11 but axis 1 has length 8"),
    ("bad digest", _mutate("model/digest", "xyz"), "model.digest"),
    ("edit to zero", _mutate("groups/0/edits/0/after", 0), "groups[0].edits[0].after"),
]


@pytest.mark.parametrize(("case", "mutate", "message"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_plans_are_rejected_with_the_field_named(case, mutate, message) -> None:
    d = base_dict()
    mutate(d)
    with pytest.raises(PlanValidationError) as info:
        PrunePlan.from_json(json.dumps(d))
    assert message in str(info.value)


def test_malformed_json_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PlanValidationError, match=r"plan is not valid JSON: .*line 1 column 2"):
        PrunePlan.from_json("{oops")
    with pytest.raises(PlanValidationError, match=r"cannot read plan file .*nope\.json"):
        PrunePlan.load(tmp_path / "nope.json")


def test_schema_file_has_not_drifted() -> None:
    committed = (ROOT / "schemas" / "pruneplan.v3.schema.json").read_text()
    assert committed == json_schema(), "regenerate with `pruneplan schema -o schemas/...`"
    schema = json.loads(committed)
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"format", "version", "model", "groups"}


def test_state_dict_digest_depends_on_names_and_shapes_only() -> None:
    a = state_dict_digest({"x": [2, 3], "y": [4]})
    assert a == state_dict_digest({"y": (4,), "x": (2, 3)})  # order-invariant
    assert a != state_dict_digest({"x": [3, 2], "y": [4]})
    # independent reference: the documented text form hashed by hand
    assert a == hashlib.sha256(b"x:2,3\ny:4").hexdigest()


def test_diff_plans_reports_indices_per_group() -> None:
    a = PrunePlan.from_dict(base_dict())
    d = base_dict()
    d["groups"][0]["removed"] = [0, 1]
    b = PrunePlan.from_dict(d)
    diff = diff_plans(a, b)
    assert bool(diff) is True
    (g,) = diff.groups
    assert (g.name, g.only_in_a, g.only_in_b) == ("a", [3], [0])
    assert not diff_plans(a, a)


# ---- version 2: group kinds and the Hugging Face config part ----------------------------------


def v2_dict() -> dict:
    d = base_dict()
    d["version"] = 2
    d["groups"][0]["kind"] = "heads"
    d["config"] = {
        "model_type": "llama",
        "changes": [
            {"key": "num_attention_heads", "before": 4, "after": 2},
            {"key": "intermediate_size", "before": 128, "per_layer": {"l.1": 64, "l.0": 96}},
        ],
        "tied": {"lm_head.weight": "embed.weight"},
    }
    return d


def test_version_2_round_trip_and_canonical_order() -> None:
    plan = PrunePlan.from_dict(v2_dict())
    again = PrunePlan.from_json(plan.to_json())
    assert again == plan and again.digest() == plan.digest()
    data = json.loads(plan.to_json())
    assert data["version"] == 2 and data["groups"][0]["kind"] == "heads"
    # changes sorted by key, per-layer widths by layer; absent defaults omitted
    assert data["config"]["changes"] == [
        {"before": 128, "key": "intermediate_size", "per_layer": {"l.0": 96, "l.1": 64}},
        {"after": 2, "before": 4, "key": "num_attention_heads"},
    ]
    assert plan.config.values() == {"num_attention_heads": 2}
    assert plan.config.problems() == [
        "intermediate_size (one value for all layers, 128 before): 64 in l.1; 96 in l.0; the config "
        "holds one value for all layers"]
    assert plan.summary()[0]["kind"] == "heads"


def test_version_1_documents_still_load_and_keep_their_bytes() -> None:
    plan = PrunePlan.from_dict(base_dict())
    assert plan.version == 1 and plan.groups[0].kind == "channels" and plan.config is None
    # the default kind is not written: a version-1 plan's canonical text (and digest) is unchanged
    assert '"kind"' not in plan.to_json() and '"config"' not in plan.to_json()


V2_INVALID = [
    ("kind in a v1 plan", lambda d: d.update(version=1, config=None) or d.pop("config"),
     "groups of kind 'heads' need plan version 2, this plan says 1"),
    ("config in a v1 plan", lambda d: d.update(version=1) or d["groups"][0].pop("kind"),
     "a config part needs plan version 2, this plan says 1"),
    ("unknown kind", lambda d: d["groups"][0].update(kind="experts"), "groups[0].kind"),
    ("both after and per layer", lambda d: d["config"]["changes"][0].update(per_layer={"a": 1, "b": 2}),
     "config key 'num_attention_heads': give exactly one of after and per_layer"),
    ("uniform per layer", lambda d: d["config"]["changes"][1].update(per_layer={"a": 3, "b": 3}),
     "config key 'intermediate_size': every layer has the same width; record it as after"),
    ("zero width", lambda d: d["config"]["changes"][1].update(per_layer={"a": 0, "b": 3}),
     "layer 'a' has width 0; every layer keeps a unit"),
    ("key twice", lambda d: d["config"]["changes"].append({"key": "num_attention_heads", "before": 4, "after": 3}),
     "config key 'num_attention_heads' is changed twice"),
    ("tied chain", lambda d: d["config"].update(tied={"a": "b", "b": "c"}),
     "tied key 'a' -> 'b': the source must be a stored key"),
]


@pytest.mark.parametrize(("case", "mutate", "message"), V2_INVALID, ids=[c[0] for c in V2_INVALID])
def test_invalid_version_2_plans_are_rejected(case, mutate, message) -> None:
    d = v2_dict()
    mutate(d)
    with pytest.raises(PlanValidationError) as info:
        PrunePlan.from_json(json.dumps(d))
    assert message in str(info.value)


def test_diff_reports_config_and_kind_changes() -> None:
    a = PrunePlan.from_dict(v2_dict())
    d = v2_dict()
    d["config"]["changes"][0]["after"] = 3
    d["groups"][0]["kind"] = "query_groups"
    result = diff_plans(a, PrunePlan.from_dict(d))
    assert result.config_differs and [g.structure_differs for g in result] == [True]
