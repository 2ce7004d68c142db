"""From scores to indices: which units of each group to remove, per layer or globally.

Scores are "higher is more important": the lowest-scored units go. Ties are broken by unit
index (then group name), so the same scores always give the same indices. This module knows
nothing of torch: it works on numpy arrays and plain names.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from pruneplan.errors import PlanningError

__all__ = ["aggregate_scores", "keep_count", "keep_parts", "ranked_steps", "select_indices"]

log = logging.getLogger(__name__)

_NORMS = ("mean", "l2", "l1", "max", "none")
_AGGREGATES = ("mean", "sum", "max")


def select_indices(
    scores: Mapping[str, Any],
    ratio: float | Mapping[str, float],
    scope: str = "layer",
    round_to: int = 1,
    min_keep: int = 1,
    normalize: str | None = "mean",
    groups: Mapping[str, Sequence[str]] | Iterable[Any] | None = None,
    aggregate: str = "mean",
    *,
    same_count: Iterable[Iterable[str]] | None = None,
) -> dict[str, list[int]]:
    """Indices to remove per group, lowest scores first.

    Args:
        scores: group name -> one score per unit (array-like, higher = more important). With
            ``groups``, keys may instead be member module names: the members' scores are
            combined with ``aggregate``.
        ratio: fraction of units to remove, in ``[0, 1)``: of every group (``scope="layer"``;
            a mapping gives one ratio per group name or per group kind -- ``"channels"``,
            ``"heads"``, ``"query_groups"``, read from the ``groups`` objects' ``kind`` -- a
            group name winning over its kind; groups it does not cover keep everything) or of
            all units together (``scope="global"``).
        scope: ``"layer"`` or ``"global"``. Global ranking compares units across groups after
            per-group normalisation, so a layer whose scores are large overall is not spared.
        round_to: kept counts are rounded up to a multiple of this (8 for hardware-friendly
            channel counts); a group too small for the next multiple keeps all its units.
        min_keep: every group keeps at least this many units (and never loses all).

    How counts are rounded:

    * ``scope="layer"``: a group of ``n`` units is asked to lose ``floor(ratio * n)`` (so
      ``ratio=0.3`` of 16 units asks for 4, not 4.8). The kept count ``n - floor(ratio * n)`` is
      then raised to ``min_keep`` (and to 1), rounded *up* to a multiple of ``round_to``, and
      capped at ``n``. Rounding only ever keeps more: 30% of 32 with ``round_to=8`` keeps 24
      (floor(9.6) = 9 asked, 23 kept rounds up to 24), so 8 go, not 9.
    * ``scope="global"``: ``floor(ratio * total)`` units are asked for over all groups; they are
      taken in the order of the normalised scores (ties: lower group name, then lower unit
      index), skipping a group once it is down to ``min_keep`` units. A group with ``blocks``
      above 1 is ranked in rounds (the next lowest unit of every block, scored by their mean)
      and the members of a ``same_count`` set together (a step of each, scored by their mean),
      so that the structure is kept while ranking (`ranked_steps`); a step larger than the
      units still asked for is passed over. Then each group's kept
      count is rounded up to a multiple of ``round_to`` as above, which can return units: the
      result may remove noticeably fewer than asked (`pruneplan.plan_from_metric` reports the
      requested and the achieved fraction and warns below 90%).
        normalize: per-group scaling before the global ranking: divide by the ``"mean"``
            absolute score (the default: a typical unit scores 1 in every group, whatever its
            size), the ``"l2"`` norm, the ``"l1"`` norm or the ``"max"`` absolute value;
            ``"none"``/``None`` keeps raw scores. The norms grow with the group size, so with
            ``"l2"``/``"l1"`` large groups lose more. It does not change a per-layer selection.
        groups: the coupled groups, as group name -> member names, or objects with ``name`` and
            ``roots`` (what `prunable_groups` returns). Needed only when scores are per member.
        aggregate: ``"mean"``, ``"sum"`` or ``"max"`` over a group's members.
        same_count: sets of group names that must lose the same number of units (the layers
            of a model whose config holds one width for all of them): each set loses, in every
            member, the smallest count any member would lose alone (with ``scope="global"``
            the set is ranked as one, see above, so its members are asked equal counts from the
            start). Groups whose ``blocks``
            attribute is above 1 (the key/value heads of grouped-query attention: units come in
            that many equal contiguous blocks) lose the same number of units in every block:
            the count is lowered to whole rounds that keep a multiple of ``round_to``. An
            attribute only some units count (the size of one part of a split: an edit with
            ``amounts``) keeps at least 1: a unit that would take it to 0 is passed over for
            the next lowest-scored one.
        ``round_to`` and ``min_keep`` count units of the group, so for a ``"heads"`` group they
        count heads (``round_to=2``: an even number of heads stays).

    Returns:
        group name -> sorted indices to remove (groups that lose nothing are left out), ready
        for `plan_pruning`.

    Raises:
        PlanningError: bad ratio/scope/options, non-finite scores, members of one group with
            different unit counts.
    """
    if scope not in ("layer", "global"):
        raise PlanningError(f"scope must be 'layer' or 'global', got {scope!r}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise PlanningError(f"round_to must be a positive integer, got {round_to!r}")
    if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 1:
        raise PlanningError(f"min_keep must be a positive integer, got {min_keep!r}")
    norm = "none" if normalize is None else normalize
    if norm not in _NORMS:
        raise PlanningError(f"normalize must be one of {_NORMS} or None, got {normalize!r}")
    if groups is not None and not isinstance(groups, Mapping):
        groups = list(groups)  # read twice: members, then kinds and blocks
    table = aggregate_scores(scores, groups, aggregate)
    kinds, blocks = _structure(groups)
    sets = [list(members) for members in same_count or ()]  # read twice: ranking, equal counts
    limits = {getattr(g, "name", None): _limits(g) for g in groups or ()
              if not isinstance(groups, Mapping)}
    if isinstance(ratio, Mapping):
        by_name = {n: ratio[n] for n in table if n in ratio}
        by_name.update({n: ratio[kinds[n]] for n in table if n not in ratio and kinds.get(n) in ratio})
        unknown = sorted(k for k in ratio if k not in table and k not in set(kinds.values()))
        if unknown:
            raise PlanningError(f"ratio given for {unknown[0]!r}, which has no scores")
        ratio = by_name
    if scope == "global":
        if isinstance(ratio, Mapping):
            raise PlanningError("scope='global' takes one ratio for all groups, not a mapping")
        _check_ratio(ratio, "ratio")
        normed = {name: _normalize(s, norm) for name, s in table.items()}
        counts = _global_counts(normed, ratio, min_keep, round_to, blocks, sets)
    else:
        counts = {}
        for name, s in table.items():
            r = ratio.get(name, 0.0) if isinstance(ratio, Mapping) else ratio
            _check_ratio(r, f"ratio for group {name!r}")
            counts[name] = s.size - keep_count(s.size, s.size - math.floor(r * s.size + 1e-9),
                                               round_to, min_keep)
        normed = table
    for name, b in blocks.items():
        if name in counts and b > 1:
            counts[name] = _whole_rounds(table[name].size, counts[name], b, round_to, min_keep)
    for members in sets:
        present = [m for m in dict.fromkeys(members) if m in table]
        if present:
            k = min(counts.get(m, 0) for m in present)
            for m in present:
                counts[m] = k
    out = {}
    for name in sorted(table):
        k = counts.get(name, 0)
        if k > 0:
            b = blocks.get(name, 1)
            if b > 1:
                out[name] = _lowest_per_block(normed[name], k, b)
            else:
                out[name] = _pick(normed[name], k, limits.get(name) or [])
    log.info("selected %d units in %d groups (%s scope)", sum(map(len, out.values())), len(out), scope)
    return out


def keep_count(size: int, wanted: int, round_to: int = 1, min_keep: int = 1) -> int:
    """Units a group of ``size`` keeps when ``wanted`` should stay, after rounding and floors.

    ``wanted`` is raised to ``min_keep`` (and 1), then rounded up to a multiple of ``round_to``;
    the result never exceeds ``size`` and is never 0. E.g. ``keep_count(32, 22, 8)`` is 24 and
    ``keep_count(12, 11, 8)`` is 12 (16 is more than the group has). Raises nothing.
    """
    kept = max(wanted, min_keep, 1)
    kept = -(-kept // round_to) * round_to
    return min(kept, size)


def aggregate_scores(
    scores: Mapping[str, Any],
    groups: Mapping[str, Sequence[str]] | Iterable[Any] | None = None,
    aggregate: str = "mean",
) -> dict[str, np.ndarray]:
    """Group name -> one float score per unit, combining the members of coupled groups.

    Raises:
        PlanningError: unknown ``aggregate``, scores that are not a non-empty 1-D finite array,
            members of one group with different unit counts, or ``groups`` of the wrong form.
    """
    if aggregate not in _AGGREGATES:
        raise PlanningError(f"aggregate must be one of {_AGGREGATES}, got {aggregate!r}")
    arrays = {str(k): _as_scores(k, v) for k, v in scores.items()}
    if groups is None:
        return arrays
    members = _members(groups)
    spreads = {} if isinstance(groups, Mapping) else {
        getattr(g, "name", None): dict(getattr(g, "root_units", None) or ()) for g in groups}
    owner = {m: g for g, ms in members.items() for m in (g, *ms)}
    unknown = sorted(k for k in arrays if k not in owner)
    if unknown:
        log.info("ignoring scores of %s: not in any prunable group", unknown)
    out: dict[str, np.ndarray] = {}
    for g, ms in members.items():
        present = [m for m in dict.fromkeys((g, *ms)) if m in arrays]
        if not present:
            continue
        spread = spreads.get(g) or {}
        if spread:
            spread_scores = _spread(g, {m: arrays[m] for m in present}, spread, aggregate)
            if spread_scores is not None:
                out[g] = spread_scores
            continue
        sizes = {arrays[m].size for m in present}
        if len(sizes) > 1:
            detail = ", ".join(f"{m!r}: {arrays[m].size}" for m in present)
            raise PlanningError(f"group {g!r}: members have different unit counts ({detail})")
        stack = np.stack([arrays[m] for m in present])
        out[g] = getattr(stack, aggregate)(axis=0)
    return out


def _spread(group: str, arrays: Mapping[str, np.ndarray],
            spread: Mapping[str, Sequence[Sequence[int]]], aggregate: str) -> np.ndarray | None:
    """One score per unit of a group whose units are tied unevenly (`Group.root_units`):
    a root listed in ``spread`` scores its own units, each group unit takes the mean of the
    own units it holds; ``aggregate`` then combines, per group unit, the members that hold
    it. ``None`` (logged) when some unit is held by no member with scores.

    Raises:
        PlanningError: a member's score count is not its own unit count (listed roots) or
            not the group's (the others).
    """
    size = len(next(iter(spread.values())))
    rows = []
    for m, a in arrays.items():
        units = spread.get(m)
        if units is None:
            if a.size != size:
                raise PlanningError(f"group {group!r}: {m!r} has {a.size} scores for the "
                                    f"group's {size} units")
            rows.append(a)
            continue
        own = sum(len(u) for u in units)
        if a.size != own:
            raise PlanningError(f"group {group!r}: {m!r} has {a.size} scores for its {own} "
                                "units")
        rows.append(np.array([a[list(u)].mean() if len(u) else np.nan for u in units]))
    stack = np.stack(rows)
    held = ~np.isnan(stack)
    missing = np.flatnonzero(~held.any(axis=0))
    if missing.size:
        log.warning("group %r keeps its units: no member with scores holds its unit %d",
                    group, int(missing[0]))
        return None
    fill = {"mean": np.nanmean, "sum": np.nansum, "max": np.nanmax}[aggregate]
    return np.asarray(fill(stack, axis=0), dtype=np.float64)


def _structure(groups: Mapping[str, Sequence[str]] | Iterable[Any] | None) -> tuple[dict, dict]:
    """(group name -> kind, group name -> blocks) from group objects (empty for a mapping)."""
    if groups is None or isinstance(groups, Mapping):
        return {}, {}
    kinds, blocks = {}, {}
    for g in groups:
        name = getattr(g, "name", None)
        if name is None:
            continue
        kinds[name] = getattr(g, "kind", "channels")
        b = getattr(g, "blocks", 1)
        size = getattr(g, "size", None)
        if isinstance(b, int) and b > 1:
            if isinstance(size, int) and size % b:
                raise PlanningError(f"group {name!r}: {size} units do not form {b} equal blocks")
            blocks[name] = b
    return kinds, blocks


def _whole_rounds(size: int, k: int, blocks: int, round_to: int, min_keep: int) -> int:
    """The largest count ``<= k`` that takes the same number of units from each of ``blocks``
    equal blocks (one round: a unit from every block) and keeps a count that `keep_count`
    allows (a multiple of ``round_to``, at least ``min_keep``); 0 when none does."""
    for n in range(k - k % blocks, 0, -blocks):
        if keep_count(size, size - n, round_to, min_keep) == size - n:
            return n
    return 0


def _lowest_per_block(s: np.ndarray, k: int, blocks: int) -> list[int]:
    """The ``k / blocks`` lowest-scored units of each of ``blocks`` equal contiguous blocks."""
    per, each = s.size // blocks, k // blocks
    out: list[int] = []
    for b in range(blocks):
        out += (b * per + _lowest(s[b * per:(b + 1) * per], each)).tolist()
    return sorted(out)


def _members(groups: Mapping[str, Sequence[str]] | Iterable[Any]) -> dict[str, tuple[str, ...]]:
    if isinstance(groups, Mapping):
        return {str(g): tuple(ms) for g, ms in groups.items()}
    out = {}
    for g in groups:
        name = getattr(g, "name", None)
        if name is None:
            raise PlanningError(f"groups must map names to members or have .name/.roots, got {g!r}")
        out[name] = tuple(getattr(g, "roots", (name,)))
    return out


def _as_scores(name: Any, v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor, without importing torch
        v = v.detach().cpu().numpy()
    arr = np.asarray(v, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise PlanningError(f"scores for {name!r} must be a non-empty 1-D array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise PlanningError(f"scores for {name!r}: unit {bad} has a non-finite score {arr[bad]}")
    return arr


def _check_ratio(r: Any, what: str) -> None:
    if isinstance(r, bool) or not isinstance(r, int | float) or not 0.0 <= r < 1.0:
        raise PlanningError(f"{what} must be a number in [0, 1), got {r!r}")


def _normalize(s: np.ndarray, how: str) -> np.ndarray:
    if how == "none":
        return s
    scale = {"mean": lambda: np.abs(s).mean(), "l2": lambda: np.linalg.norm(s), "l1": lambda: np.abs(s).sum(),
             "max": lambda: np.abs(s).max()}[how]()
    return s / scale if scale > 0 else s


def _limits(group: Any) -> list[tuple[np.ndarray, int]]:
    """``(per-unit drop, most that may go)`` of every edit of ``group`` that only some units
    count (`pruneplan.graph.spec.EditSpec.amounts`: the size of one part of a split)."""
    seen: dict[tuple[tuple[int, ...], int], None] = {}
    for e in getattr(group, "edits", None) or ():
        amounts = getattr(e, "amounts", None)
        if amounts is not None:
            seen[(tuple(amounts), int(e.before) - 1)] = None
    return [(np.asarray(a, dtype=np.int64), cap) for a, cap in seen]


def _pick(s: np.ndarray, k: int, limits: list[tuple[np.ndarray, int]]) -> list[int]:
    """The ``k`` lowest scores (ties: lower index), sorted, passing over a unit that would take
    one of ``limits`` past its cap (fewer than ``k`` only when no other unit is left)."""
    if not limits:
        return sorted(_lowest(s, k).tolist())
    used = [0] * len(limits)
    out: list[int] = []
    for u in np.lexsort((np.arange(s.size), s)).tolist():
        if len(out) == k:
            break
        if any(used[i] + int(a[u]) > cap for i, (a, cap) in enumerate(limits)):
            continue
        for i, (a, _) in enumerate(limits):
            used[i] += int(a[u])
        out.append(u)
    return sorted(out)


def keep_parts(removed: Mapping[str, Sequence[int]], groups: Iterable[Any],
               scores: Mapping[str, np.ndarray]) -> dict[str, list[int]]:
    """``removed`` with, in a group where it would take an attribute that only some of its
    units count (the size of one part of a split, `EditSpec.amounts`) to 0, the same number of
    units taken instead lowest-score first passing over those that would (``scores``: group
    name -> one score per unit; a group without scores counts its units in index order).
    Groups that keep every such attribute at 1 or more are returned as they are. Raises
    nothing."""
    by_name = {getattr(g, "name", None): g for g in groups}
    out: dict[str, list[int]] = {}
    for name, idx in removed.items():
        g = by_name.get(name)
        limits = _limits(g) if g is not None else []
        gone = np.asarray(list(idx), dtype=np.int64)
        if not limits or all(int(a[gone].sum()) <= cap for a, cap in limits):
            out[name] = list(idx)
            continue
        s = scores.get(name)
        if s is None:
            s = np.zeros(len(limits[0][0]))
        out[name] = _pick(np.asarray(s, dtype=np.float64), len(gone), limits)
        log.info("group %r: units %s instead of %s, so that every part of its split keeps a "
                 "unit", name, out[name], sorted(idx))
    return out


def _lowest(s: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` lowest scores; ties go to the lower index."""
    order = np.lexsort((np.arange(s.size), s))
    return order[:k]


def ranked_steps(
    normed: Mapping[str, np.ndarray],
    blocks: Mapping[str, int] | None = None,
    sets: Iterable[Iterable[str]] = (),
    min_keep: int = 1,
    rank: Mapping[str, int] | None = None,
) -> list[tuple[tuple[str, ...], int]]:
    """The global ranking in steps that keep the selection's structure, lowest score first.

    A step removes one unit from a plain group; from a group with ``blocks[name] = b > 1``
    (the query heads of grouped-query attention) one round, the next lowest-scored unit of
    each of its ``b`` equal contiguous blocks; from the members of a set of ``sets`` (groups
    that must lose equal counts) one such step of every member at once. A step's score is the
    mean of the scores of the units it removes (``normed``: group name -> one score per unit,
    already normalised per group); a group's steps come in its own order (within a block,
    lowest score first), so any prefix of the ranking takes a prefix of every group's steps.
    No step takes a group below ``min_keep`` units. Ties go to the lower ``rank`` (default: the
    name order) of the set's first member, then the earlier step.

    Returns:
        ``(members, units)`` per step in ranking order: the groups that each lose one step and
        the number of units the step removes in all. Raises nothing.
    """
    blocks = blocks or {}
    names = sorted(normed)
    rank = rank if rank is not None else {n: i for i, n in enumerate(names)}
    owner: set[str] = set()
    clusters: list[tuple[str, ...]] = []
    for members in sets:
        present = tuple(m for m in dict.fromkeys(members) if m in normed and m not in owner)
        if present:
            clusters.append(present)
            owner.update(present)
    clusters += [(n,) for n in names if n not in owner]
    scores, keys, steps = [], [], []
    for members in clusters:
        per_member = []
        for m in members:
            s, b = normed[m], max(blocks.get(m, 1), 1)
            by_block = np.sort(s.reshape(b, s.size // b), axis=1)  # each block, lowest first
            n = max(s.size - min(max(min_keep, 1), s.size), 0) // b
            per_member.append(by_block.mean(axis=0)[:n])
        n = min(len(p) for p in per_member)
        mean = np.mean([p[:n] for p in per_member], axis=0) if n else np.zeros(0)
        units = sum(max(blocks.get(m, 1), 1) for m in members)
        first = min(rank.get(m, len(rank)) for m in members)
        for j in range(n):
            scores.append(float(mean[j]))
            keys.append((first, j))
            steps.append((members, units))
    order = sorted(range(len(steps)), key=lambda i: (scores[i], keys[i]))
    return [steps[i] for i in order]


def _global_counts(normed: Mapping[str, np.ndarray], ratio: float, min_keep: int,
                   round_to: int, blocks: Mapping[str, int] | None = None,
                   sets: Iterable[Iterable[str]] = ()) -> dict[str, int]:
    """How many units each group loses under one global ranking (`ranked_steps`): steps are
    taken in order while they fit in ``floor(ratio * total)`` units (a step larger than what is
    left is passed over), then kept counts are rounded up to a multiple of ``round_to``."""
    blocks = blocks or {}
    total = sum(s.size for s in normed.values())
    left = math.floor(ratio * total + 1e-9)
    if left == 0:
        return {}
    taken = dict.fromkeys(normed, 0)
    for members, units in ranked_steps(normed, blocks, sets, min_keep):
        if left == 0:
            break
        if units <= left:
            for m in members:
                taken[m] += max(blocks.get(m, 1), 1)
            left -= units
    return {n: s.size - keep_count(s.size, s.size - taken[n], round_to, min_keep)
            for n, s in normed.items()}
