"""Plan loading is bounded and total: every malformed input is one `PlanValidationError`.

Also: validation works on ranges of positions, so its time follows the plan's bytes and not
the sizes it declares; a property test compares it with a brute-force reference that
enumerates every position (the definition of the rules).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pruneplan import PlanValidationError, PrunePlan
from pruneplan.plan import MAX_DEPTH, MAX_PLAN_BYTES, IndexMap, TensorSlice, removed_positions
from tests.test_plan import base_dict


def _load_text(text: str | bytes, tmp_path: Path) -> PlanValidationError:
    path = tmp_path / "p.json"
    path.write_bytes(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    with pytest.raises(PlanValidationError) as info:
        PrunePlan.load(path)
    assert str(info.value).startswith(f"{path}: ")
    return info.value


MALFORMED = [
    ("deep nesting", "[" * 100_000, f"nested deeper than {MAX_DEPTH} levels"),
    ("deep under a key", '{"provenance": {"notes": ' + "[" * 70 + "]" * 70 + "}}",
     f"nested deeper than {MAX_DEPTH} levels"),
    ("huge integer", '{"version": ' + "7" * 5000 + "}", "an integer is beyond 64 bits"),
    ("integer just past 64 bits", '{"version": 9223372036854775808}', "an integer is beyond 64 bits"),
    ("float overflow", '{"version": 1e999}', "too large for a float"),
    ("NaN", '{"version": NaN}', "NaN is not a JSON number"),
    ("Infinity", '{"version": -Infinity}', "-Infinity is not a JSON number"),
    ("duplicate key", '{"format": "pruneplan", "format": "pruneplan"}', "key 'format' appears twice"),
    ("nested duplicate key", '{"model": {"digest": "a", "digest": "b"}}', "key 'digest' appears twice"),
    ("lone surrogate", '{"format": "\\udc80x"}', "lone surrogate at character 0"),
    ("surrogate in a key", '{"\\ud800": 1}', "lone surrogate"),
    ("not UTF-8", b'{"format": "\xff"}', "not UTF-8"),
    ("truncated", '{"format": "pruneplan", ', "not valid JSON"),
    ("empty", "", "not valid JSON"),
    ("an array", "[1, 2]", "plan must be a JSON object, got an array"),
    ("a string", '"pruneplan"', "plan must be a JSON object, got a string"),
]


@pytest.mark.parametrize(("case", "text", "message"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_text_is_one_plan_validation_error(tmp_path: Path, case, text, message) -> None:
    err = _load_text(text, tmp_path)
    assert message in str(err)
    assert len(str(err)) < 400  # one short line
    assert "\n" not in str(err)


def test_surrogates_in_a_python_dict_are_refused_too() -> None:
    # from_dict takes Python data: a lone surrogate would make to_json()/digest() raise later
    for path, value in (("name", "g\ud800"), ("tensor", "a.weight\udfff")):
        d = base_dict()
        if path == "name":
            d["groups"][0]["name"] = value
        else:
            d["model"]["tensors"][value] = [4, 3]
        with pytest.raises(PlanValidationError, match=r"unable to parse raw data as a unicode string|"
                                                      r"lone surrogate at character 8"):
            PrunePlan.from_dict(d)
    d = base_dict()
    d["provenance"] = {"metric_params": {"k": "\udc80"}}  # free-form values too
    with pytest.raises(PlanValidationError, match="lone surrogate at character 0"):
        PrunePlan.from_dict(d)
    d = base_dict()
    d["provenance"] = {"metric_params": {"k": [float("nan")]}}
    with pytest.raises(PlanValidationError, match="nan is not a finite number"):
        PrunePlan.from_dict(d)
    d["provenance"] = {"selection": {"k": {1, 2}}}
    with pytest.raises(PlanValidationError, match="a set is not JSON data"):
        PrunePlan.from_dict(d)


def test_long_bad_values_are_quoted_as_a_short_prefix() -> None:
    d = base_dict()
    d["format"] = "x" * 10_000_000
    with pytest.raises(PlanValidationError) as info:
        PrunePlan.from_json(json.dumps(d))
    msg = str(info.value)
    # 80 characters of the value, then its length; the rest of the message is short
    assert "'" + "x" * 80 + "'... (10000000 characters), expected 'pruneplan'" in msg
    assert len(msg) < 300
    d = base_dict()
    d["y" * 100_000] = 1  # an unknown key is named by a prefix too
    with pytest.raises(PlanValidationError) as info:
        PrunePlan.from_json(json.dumps(d))
    assert "y" * 40 + "...(100000 characters): Extra inputs are not permitted" in str(info.value)
    assert len(str(info.value)) < 300


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_non_regular_files_are_refused_without_reading(tmp_path: Path) -> None:
    fifo = tmp_path / "plan.json"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes
    with pytest.raises(PlanValidationError, match=r"plan.json' is a FIFO, not a regular file"):
        PrunePlan.load(fifo)
    with pytest.raises(PlanValidationError, match="'/dev/zero' is a character device, not a regular"):
        PrunePlan.load("/dev/zero")  # would be read until memory runs out
    with pytest.raises(PlanValidationError, match="is a folder, not a regular file"):
        PrunePlan.load(tmp_path)
    with pytest.raises(PlanValidationError, match="No such file or directory"):
        PrunePlan.load(tmp_path / "absent.json")


def test_files_over_the_size_limit_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    with open(path, "wb") as fh:  # a sparse file: no disk used
        fh.truncate(MAX_PLAN_BYTES + 1)
    with pytest.raises(PlanValidationError, match=f"is {MAX_PLAN_BYTES + 1} bytes, more than the limit of "
                                                  f"{MAX_PLAN_BYTES} \\(256 MiB\\)"):
        PrunePlan.load(path)
    with pytest.raises(PlanValidationError, match="more than the limit"):
        PrunePlan.from_json(b" " * (MAX_PLAN_BYTES + 1))


def _lying_plan(size: int, map_: dict, removed: list[int], shape: list[int], axis: int = 0) -> str:
    return json.dumps({
        "format": "pruneplan", "version": 1,
        "model": {"tensors": {"w": shape}, "digest": "0" * 64},
        "groups": [{"name": "g", "size": size, "removed": removed,
                    "slices": [{"tensor": "w", "axis": axis, "map": map_}]}],
    })


def test_validation_time_follows_bytes_not_declared_sizes() -> None:
    # each plan is under 400 bytes but declares up to 10**15 units or positions; enumerating
    # them (what validation did before: 1.8 s for size 10**6) would take hours
    n = 10**15
    cases = [
        _lying_plan(n, {"modulo": n}, [0, 5], [4, n], axis=1),  # a grouped axis of one block
        _lying_plan(n, {"repeat": 1000}, [3], [n * 1000]),
        _lying_plan(n, {"repeat": 7, "tiles": 1000, "tile_stride": 7 * n}, [1, 2, 9], [7 * n * 1000]),
    ]
    for text in cases:
        assert len(text) < 400
        # CPU time of this process, not wall time: a busy machine does not make it fail (the
        # enumeration this guards against would take hours of CPU)
        start = time.process_time()
        plan = PrunePlan.from_json(text)
        summary = plan.summary()  # counts, not positions
        assert time.process_time() - start < 0.5
        assert summary[0]["size"] == n
    # the grouped case: 2 local positions (0 and 5) go from the axis of length n
    grouped = PrunePlan.from_json(cases[0])
    assert grouped.pruned_shapes()["w"] == [4, n - 2]
    # repeat 1000: unit 3 covers positions 3000..3999
    assert PrunePlan.from_json(cases[1]).pruned_shapes()["w"] == [n * 1000 - 1000]
    # 3 units x 7 positions x 1000 tiles
    assert PrunePlan.from_json(cases[2]).pruned_shapes()["w"] == [7 * n * 1000 - 21_000]


def test_a_grouped_axis_whose_blocks_differ_is_refused_cheaply() -> None:
    n = 10**15
    # unit 0 is local position 0 of block 0; block 1 (units n/2..) holds units but loses none
    text = _lying_plan(n, {"modulo": n // 2}, [0], [4, n // 2], axis=1)
    start = time.process_time()  # CPU time: see test_validation_time_follows_bytes_not_declared_sizes
    with pytest.raises(PlanValidationError, match="block 1 would lose local positions \\[\\] but block 0 "
                                                  "loses \\[0\\]; every block must lose the same"):
        PrunePlan.from_json(text)
    assert time.process_time() - start < 0.5


def test_too_many_tiles_are_refused_with_the_limit() -> None:
    n = 10**12
    text = _lying_plan(4, {"tiles": n, "tile_stride": 8}, [0, 2], [8 * n])
    with pytest.raises(PlanValidationError, match="tiles bring the plan's separate position ranges past "
                                                  "the limit of 4194304"):
        PrunePlan.from_json(text)


# ---- ranges against a brute-force reference ------------------------------------------------


def _brute_removed(m: IndexMap, removed: list[int]) -> list[int]:
    """The definition: every position of every removed unit, folded by modulo."""
    out = {p for u in removed for p in m.unit(u)}
    if m.modulo is not None:
        out = {p % m.modulo for p in out}
    return sorted(out)


def _brute_grouped_ok(maps: list[tuple[IndexMap, list[int], int]], modulo: int) -> bool:
    covered, gone = set(), set()
    for m, removed, size in maps:
        for u in range(size):
            covered.update(m.unit(u))
        for u in removed:
            gone.update(m.unit(u))
    blocks: dict[int, set[int]] = {p // modulo: set() for p in covered}
    for p in gone:
        blocks[p // modulo].add(p % modulo)
    return len({frozenset(v) for v in blocks.values()}) <= 1


@st.composite
def affine_maps(draw, modulo: bool = False) -> tuple[IndexMap, int, list[int]]:
    size = draw(st.integers(2, 9))
    repeat = draw(st.integers(1, 4))
    tiles = draw(st.integers(1, 4))
    stride = draw(st.integers(1, 40)) if tiles > 1 else 0
    offset = draw(st.integers(0, 6))
    removed = sorted(draw(st.sets(st.integers(0, size - 1), max_size=size - 1)))
    mod = draw(st.integers(1, 12)) if modulo else None
    m = IndexMap(offset=offset, repeat=repeat, tiles=tiles, tile_stride=stride, modulo=mod)
    return m, size, removed


@settings(max_examples=150, deadline=None, derandomize=True)
@given(affine_maps(modulo=False) | affine_maps(modulo=True))
def test_removed_positions_equal_the_brute_force_definition(case) -> None:
    m, _, removed = case
    s = TensorSlice(tensor="w", axis=0, map=m)
    assert removed_positions(s, removed) == _brute_removed(m, removed)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.integers(1, 6), st.data())
def test_grouped_check_agrees_with_the_brute_force_definition(modulo: int, data) -> None:
    # one or two groups (side by side on the axis) over a grouped convolution's input axis
    size_a = data.draw(st.integers(2, 8))
    size_b = data.draw(st.integers(2, 8))
    two = data.draw(st.booleans())
    rem_a = sorted(data.draw(st.sets(st.integers(0, size_a - 1), max_size=size_a - 1)))
    rem_b = sorted(data.draw(st.sets(st.integers(0, size_b - 1), max_size=size_b - 1)))
    groups = [{"name": "a", "size": size_a, "removed": rem_a,
               "slices": [{"tensor": "w", "axis": 1, "map": {"modulo": modulo}}]}]
    maps = [(IndexMap(modulo=modulo), rem_a, size_a)]
    if two:
        groups.append({"name": "b", "size": size_b, "removed": rem_b,
                       "slices": [{"tensor": "w", "axis": 1, "map": {"offset": size_a, "modulo": modulo}}]})
        maps.append((IndexMap(offset=size_a, modulo=modulo), rem_b, size_b))
    d = {"format": "pruneplan", "version": 1, "model": {"tensors": {"w": [3, modulo]}, "digest": "0" * 64},
         "groups": groups}
    if _brute_grouped_ok(maps, modulo):
        PrunePlan.from_dict(d)
    else:
        with pytest.raises(PlanValidationError, match="every block must lose the same ones"):
            PrunePlan.from_dict(d)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(affine_maps(), affine_maps())
def test_overlap_check_agrees_with_the_brute_force_definition(a, b) -> None:
    (ma, size_a, rem_a), (mb, size_b, rem_b) = a, b
    dom_a = {p for u in range(size_a) for p in ma.unit(u)}
    dom_b = {p for u in range(size_b) for p in mb.unit(u)}
    length = max(ma.extent(size_a), mb.extent(size_b))

    def group(name, m, size, removed):
        return {"name": name, "size": size, "removed": removed,
                "slices": [{"tensor": "w", "axis": 0, "map": m.model_dump(exclude_defaults=True)}]}

    d = {"format": "pruneplan", "version": 1, "model": {"tensors": {"w": [length]}, "digest": "0" * 64},
         "groups": [group("a", ma, size_a, rem_a), group("b", mb, size_b, rem_b)]}
    common = dom_a & dom_b
    if common:
        with pytest.raises(PlanValidationError, match=f"groups 'a' and 'b' both slice tensor 'w' axis 0 "
                                                      f"at position {min(common)}"):
            PrunePlan.from_dict(d)
    else:
        plan = PrunePlan.from_dict(d)
        expected = sorted(set(_brute_removed(ma, rem_a)) | set(_brute_removed(mb, rem_b)))
        assert plan.removed_by_axis().get(("w", 0), []) == expected
        assert plan.pruned_shapes()["w"] == [length - len(expected)]


def test_the_readme_states_the_limits_the_code_enforces() -> None:
    from pruneplan.apply.sharded import MAX_INDEX_BYTES
    from pruneplan.plan import MAX_RANGES

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Reliability")[1].split("\n## ")[0]
    assert f"**{MAX_PLAN_BYTES // 2**20} MiB**" in section
    assert f"**{MAX_DEPTH} levels**" in section
    assert f"({MAX_RANGES:,})" in section
    assert f"at most {MAX_INDEX_BYTES // 2**20} MiB" in section
    assert "`.NAME.<random>.tmp`" in section and "`.NAME.<random>.old`" in section
