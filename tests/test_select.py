"""select_indices: per-layer and global selection, rounding, floors, aggregation, errors."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from pruneplan.errors import PlanningError
from pruneplan.select import aggregate_scores, keep_count, select_indices


def test_layer_scope_removes_the_lowest_scores() -> None:
    # ratio 0.4 of 5 units removes floor(2.0) = 2: the scores 1 (unit 1) and 2 (unit 3)
    out = select_indices({"a": np.array([5.0, 1.0, 3.0, 2.0, 4.0])}, ratio=0.4)
    assert out == {"a": [1, 3]}


def test_ties_go_to_the_lower_index() -> None:
    out = select_indices({"a": [1.0, 1.0, 1.0, 1.0]}, ratio=0.5)
    assert out == {"a": [0, 1]}


def test_never_removes_everything_and_drops_untouched_groups() -> None:
    # 0.4 of 3 units is floor(1.2) = 1; 0.4 of 2 is floor(0.8) = 0, so "b" is left out;
    # 0.99 of 3 units is floor(2.97) = 2: one unit always stays
    out = select_indices({"a": [3.0, 2.0, 1.0], "b": [1.0, 2.0]}, ratio=0.4)
    assert out == {"a": [2]}
    assert select_indices({"a": [3.0, 2.0, 1.0]}, ratio=0.99) == {"a": [1, 2]}


def test_per_group_ratios() -> None:
    out = select_indices({"a": [4.0, 3.0, 2.0, 1.0], "b": [1.0, 2.0, 3.0, 4.0]}, ratio={"a": 0.5})
    assert out == {"a": [2, 3]}


def test_global_scope_normalises_each_group() -> None:
    # b is a scaled by 100: after normalisation both groups are identical, so a global
    # ratio of 0.5 (4 of 8 units) takes the two lowest units of each
    scores = {"a": np.array([1.0, 2.0, 3.0, 4.0]), "b": np.array([100.0, 200.0, 300.0, 400.0])}
    assert select_indices(scores, 0.5, scope="global") == {"a": [0, 1], "b": [0, 1]}
    # raw scores: a's units are all lower; a keeps min_keep=1, the 4th removal comes from b
    assert select_indices(scores, 0.5, scope="global", normalize="none") == {"a": [0, 1, 2], "b": [0]}
    # l2, l1 and max scalings are also per group: same result as the default (mean) here
    for how in ("l2", "l1", "max"):
        assert select_indices(scores, 0.5, scope="global", normalize=how) == {"a": [0, 1], "b": [0, 1]}


def test_mean_normalisation_does_not_favour_small_groups() -> None:
    # two groups with the same score distribution, sizes 4 and 16: "mean" scales both to a
    # mean of 1, so a global 0.5 takes half of each. "l2" divides the big group by a norm twice
    # as large (sqrt(120) vs sqrt(30)): its units score 0.09, 0.18, 0.27, 0.37 (4 each), the
    # small group's 0.18, 0.37, 0.55, 0.73, so the 10 lowest are big's 0.09s, 0.18s and one
    # 0.27 plus small's 0.18: 9 + 1
    small = np.array([1.0, 2.0, 3.0, 4.0])
    big = np.repeat(small, 4)
    out = select_indices({"big": big, "small": small}, 0.5, scope="global")
    assert (len(out["big"]), len(out["small"])) == (8, 2)
    out = select_indices({"big": big, "small": small}, 0.5, scope="global", normalize="l2")
    assert (len(out["big"]), len(out["small"])) == (9, 1)


def test_global_scope_with_round_to_8_and_min_keep() -> None:
    # a: 32 units scored 0..31, b: 20 units scored 0.5..19.5 (raw), so the global order
    # interleaves a0 b0 a1 b1 ... A ratio of 0.5 asks for 26 of the 52 units.
    a = np.arange(32, dtype=float)
    b = np.arange(20, dtype=float) + 0.5
    scores = {"a": a, "b": b}
    # without floors: 13 from each; a keeps 19 -> rounded up to 24 (removes 8),
    # b keeps 7 -> rounded up to 8 (removes 12)
    out = select_indices(scores, 0.5, scope="global", round_to=8, normalize=None)
    assert out == {"a": list(range(8)), "b": list(range(12))}
    # min_keep=10: b can lose at most 10, so a takes 16 of the 26; a keeps 16 (a multiple of
    # 8), b keeps 10 -> rounded up to 16 (removes 4)
    out = select_indices(scores, 0.5, scope="global", round_to=8, min_keep=10, normalize=None)
    assert out == {"a": list(range(16)), "b": list(range(4))}
    kept = {"a": 32 - len(out["a"]), "b": 20 - len(out["b"])}
    assert all(k % 8 == 0 and k >= 10 for k in kept.values())


def test_round_to_larger_than_the_group_keeps_it_whole() -> None:
    assert select_indices({"a": np.arange(6.0)}, 0.5, round_to=8) == {}
    # keep_count rounds up, caps at the size and never returns 0
    assert keep_count(64, 45, round_to=8) == 48
    assert keep_count(6, 3, round_to=8) == 6
    assert keep_count(10, 0) == 1
    assert keep_count(10, 2, min_keep=5) == 5


def test_scores_of_coupled_members_are_aggregated() -> None:
    # group "g" has members "g" and "m": mean [1, 1.5] drops unit 0, max [2, 1.5] drops unit 1
    scores = {"g": [2.0, 1.5], "m": [0.0, 1.5], "elsewhere": [1.0]}
    groups = {"g": ["g", "m"]}
    assert select_indices(scores, 0.5, groups=groups) == {"g": [0]}
    assert select_indices(scores, 0.5, groups=groups, aggregate="max") == {"g": [1]}
    assert select_indices(scores, 0.5, groups=groups, aggregate="sum") == {"g": [0]}
    # objects with .name/.roots (what prunable_groups returns) work the same way
    spec = [SimpleNamespace(name="g", roots=("g", "m"), size=2)]
    assert select_indices(scores, 0.5, groups=spec) == {"g": [0]}
    np.testing.assert_allclose(aggregate_scores(scores, groups)["g"], [1.0, 1.5])


def test_selection_is_deterministic() -> None:
    rng = np.random.default_rng(0)
    scores = {f"g{i}": rng.integers(0, 3, size=16).astype(float) for i in range(5)}
    first = select_indices(scores, 0.3, scope="global", round_to=4)
    assert all(select_indices(dict(reversed(scores.items())), 0.3, scope="global", round_to=4) == first
               for _ in range(3))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scores": {"a": [1.0, float("nan")]}, "ratio": 0.5}, "unit 1 has a non-finite score"),
        ({"scores": {"a": [1.0, 2.0]}, "ratio": 1.0}, "must be a number in [0, 1)"),
        ({"scores": {"a": [1.0, 2.0]}, "ratio": 0.5, "scope": "model"}, "scope must be"),
        ({"scores": {"a": [1.0, 2.0]}, "ratio": 0.5, "round_to": 0}, "round_to must be"),
        ({"scores": {"a": [1.0, 2.0]}, "ratio": 0.5, "normalize": "l3"}, "normalize must be"),
        ({"scores": {"a": [[1.0]]}, "ratio": 0.5}, "1-D array"),
        ({"scores": {"a": [1.0, 2.0], "m": [1.0]}, "ratio": 0.5, "groups": {"a": ["a", "m"]}},
         "members have different unit counts ('a': 2, 'm': 1)"),
        ({"scores": {"a": [1.0, 2.0]}, "ratio": {"b": 0.5}}, "ratio given for 'b'"),
        ({"scores": {"a": [1.0, 2.0]}, "ratio": {"a": 0.5}, "scope": "global"}, "one ratio"),
    ],
)
def test_bad_input_is_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(PlanningError) as err:
        select_indices(**kwargs)
    assert message in str(err.value)
