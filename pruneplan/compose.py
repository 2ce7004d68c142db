"""Compose a sequence of plans into one plan relative to the original model.

Each plan of the sequence is relative to the shapes the previous ones left (as the plans a
`pruneplan.pruner.Pruner` records while it prunes a model step by step). `compose` maps every
later plan back to the original coordinates:

* groups with the same name merge: unit ``j`` of the later group is the ``j``-th unit the
  earlier plans kept; its positions on each (tensor, axis) are mapped through the positions that
  the earlier plans kept on that axis. Groups with a new name are mapped the same way.
* ``model.tensors`` is the first plan's fingerprint plus every tensor first touched later (its
  original shape is the shape the earlier plans left it, i.e. the shape the later plan records).
  A later plan whose recorded shape differs from the shape the earlier plans leave is refused
  with `PlanMismatchError` naming the tensor. The whole-state-dict digest is the first plan's;
  the digests of later plans cannot be checked (they cover tensors no plan lists).
* edits and dropout changes keep the value before the first plan and sum the deltas.
* the provenance keeps the first plan's ``library``, ``torch`` and ``weights_digest`` (the content
  digest of the weights the composed plan starts from, so that applying it to other weights
  warns as the first plan does); ``notes`` lists the plans' digests. Metric and selection, which
  differ from step to step, are not carried over. A single plan composes to itself (``compose([p])
  == p``, byte for byte).

Index maps stay affine where the composed mapping allows it (unchanged maps are kept as they
are); otherwise the slice lists explicit ``positions``. Pure Python: no torch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from pruneplan.errors import PlanMismatchError, PlanValidationError
from pruneplan.plan import (
    FORMAT,
    ConfigChange,
    ConfigEdits,
    Group,
    IndexMap,
    Provenance,
    PrunePlan,
    required_version,
)

__all__ = ["compose"]

log = logging.getLogger(__name__)

Key = tuple[str, int]  # (tensor, axis)


@dataclass
class _Slice:
    """One (tensor, axis) of a composed group: every unit's positions in original coordinates."""

    first: IndexMap  # the map of the plan where the group first appeared
    modulo: int | None  # original local length of a grouped-conv axis
    units: list[list[int]]


@dataclass
class _Group:
    """A group being composed, in the numbering of the original model."""

    name: str
    size: int
    order: int | None = None
    kind: str = "channels"
    removed: set[int] = field(default_factory=set)
    slices: dict[Key, _Slice] = field(default_factory=dict)
    edits: dict[tuple[str, str], int] = field(default_factory=dict)  # -> summed delta
    dropout: dict[str, float] = field(default_factory=dict)  # -> summed delta

    def kept(self) -> list[int]:
        return [u for u in range(self.size) if u not in self.removed]


def compose(plans: Sequence[PrunePlan]) -> PrunePlan:
    """One plan, relative to the original model, equivalent to applying ``plans`` in order.

    The result records the first plan's fingerprint and ``provenance.weights_digest`` (both
    describe the model the composed plan applies to). ``compose([p])`` returns a copy of ``p``
    (the same digest): one plan is already relative to the model it applies to.

    Raises:
        PlanValidationError: ``plans`` is empty, or the composed plan breaks a format rule
            (e.g. two differently named groups slicing the same positions).
        PlanMismatchError: a plan does not fit the shapes, unit counts, attribute values or
            dropout rates that the plans before it leave.
    """
    plans = list(plans)
    if not plans:
        raise PlanValidationError("compose needs at least one plan")
    for i, p in enumerate(plans):
        if not isinstance(p, PrunePlan):
            raise PlanValidationError(f"plan {i} is a {type(p).__name__}, not a PrunePlan")
    if len(plans) == 1:  # the identity: nothing to map, and its provenance stays whole
        return plans[0].model_copy(deep=True)

    original: dict[str, list[int]] = {}  # composed fingerprint
    current: dict[str, list[int]] = {}  # shapes left by the plans so far
    alive: dict[Key, list[int]] = {}  # (tensor, axis) -> original positions still present
    attr_orig: dict[tuple[str, str], int] = {}
    attr_now: dict[tuple[str, str], int] = {}
    p_orig: dict[str, float] = {}
    p_now: dict[str, float] = {}
    groups: dict[str, _Group] = {}

    for i, plan in enumerate(plans):
        where = f"plan {i} ({plan.digest()[:12]})"
        for tensor, shape in plan.model.tensors.items():
            if tensor in current:
                if list(shape) != current[tensor]:
                    raise PlanMismatchError(
                        f"{where}: tensor {tensor!r} is recorded with shape {list(shape)}, but the "
                        f"plans before it leave shape {current[tensor]}"
                    )
            else:
                original[tensor] = list(shape)
                current[tensor] = list(shape)
        for (module, attr), (before, _) in plan.edits().items():
            key = (module, attr)
            if key in attr_now and attr_now[key] != before:
                raise PlanMismatchError(
                    f"{where}: expects {module}.{attr} = {before}, but the plans before it leave "
                    f"{attr_now[key]}"
                )
            attr_orig.setdefault(key, before)
            attr_now.setdefault(key, before)
        for module, (before, _) in plan.dropout_changes().items():
            if module in p_now and not math.isclose(p_now[module], before, abs_tol=1e-9):
                raise PlanMismatchError(
                    f"{where}: expects dropout {module!r} at rate {before}, but the plans before it "
                    f"leave {p_now[module]}"
                )
            p_orig.setdefault(module, before)
            p_now.setdefault(module, before)

        def back(key: Key, local: list[int], modulo: int | None) -> list[int]:
            """Positions in plan ``i``'s frame -> original positions (before ``modulo``)."""
            live = alive.get(key)
            if modulo is None:
                return sorted(live[p] for p in local) if live is not None else sorted(local)
            length = original[key[0]][key[1]]
            out = []
            for p in local:
                block, pos = divmod(p, modulo)
                out.append(block * length + (live[pos] if live is not None else pos))
            return sorted(out)

        for g in plan.groups:
            gw = f"{where}, group {g.name!r}"
            mapped = {
                (s.tensor, s.axis): (s.map, [back((s.tensor, s.axis), s.map.unit(u), s.map.modulo)
                                             for u in range(g.size)])
                for s in g.slices
            }
            cg = groups.get(g.name)
            if cg is None:
                cg = groups[g.name] = _Group(name=g.name, size=g.size, order=g.order, kind=g.kind)
                for key, (m, units) in mapped.items():
                    modulo = None if m.modulo is None else original[key[0]][key[1]]
                    cg.slices[key] = _Slice(first=m, modulo=modulo, units=units)
                cg.removed.update(g.removed)
            else:
                kept = cg.kept()
                if g.kind != cg.kind:
                    raise PlanMismatchError(
                        f"{gw}: is of kind {g.kind!r}, the plans before it say {cg.kind!r}"
                    )
                if g.size != len(kept):
                    raise PlanMismatchError(
                        f"{gw}: has {g.size} units, but the plans before it leave {len(kept)}"
                    )
                if set(mapped) != set(cg.slices):
                    extra = sorted(set(mapped) ^ set(cg.slices))[0]
                    raise PlanMismatchError(
                        f"{gw}: slices tensor {extra[0]!r} axis {extra[1]} in one plan but not in "
                        "another; groups with the same name must slice the same tensors to compose"
                    )
                for key, (_, units) in mapped.items():
                    for j, pos in enumerate(units):
                        cg.slices[key].units[kept[j]] = pos
                cg.removed.update(kept[j] for j in g.removed)
            for e in g.edits:
                k = (e.module, e.attribute)
                cg.edits[k] = cg.edits.get(k, 0) + e.after - e.before
            for d in g.dropout:
                cg.dropout[d.module] = cg.dropout.get(d.module, 0.0) + d.p_after - d.p_before

        # the shapes, positions, attributes and rates this plan leaves
        for (tensor, axis), gone in plan.removed_by_axis().items():
            key = (tensor, axis)
            live = alive.get(key, list(range(original[tensor][axis])))
            drop = set(gone)
            alive[key] = [p for j, p in enumerate(live) if j not in drop]
        current.update(plan.pruned_shapes())
        for key, (before, after) in plan.edits().items():
            attr_now[key] += after - before
        for module, (before, after) in plan.dropout_changes().items():
            p_now[module] += after - before

    out_groups = []
    for cg in groups.values():
        if not cg.removed:
            continue
        out_groups.append({
            "name": cg.name,
            "kind": cg.kind,
            "size": cg.size,
            "order": cg.order,
            "removed": sorted(cg.removed),
            "slices": [
                {"tensor": t, "axis": a, "map": _fit(s, cg.size).model_dump(exclude_defaults=True)}
                for (t, a), s in sorted(cg.slices.items())
            ],
            "edits": [
                {"module": m, "attribute": a, "before": attr_orig[(m, a)],
                 "after": attr_orig[(m, a)] + delta}
                for (m, a), delta in sorted(cg.edits.items())
            ],
            "dropout": [
                {"module": m, "p_before": p_orig[m], "p_after": p_orig[m] + delta}
                for m, delta in sorted(cg.dropout.items())
            ],
        })
    # buffers are known when every plan records them
    buffers = (sorted({b for p in plans for b in p.model.buffers or ()})
               if all(p.model.buffers is not None for p in plans) else None)
    first = plans[0].provenance
    provenance = Provenance(
        library=first.library,
        torch=first.torch,
        weights_digest=first.weights_digest,  # the weights the composed plan starts from
        notes=f"composed of {len(plans)} plans: " + ", ".join(p.digest()[:12] for p in plans),
    )
    config = _compose_config(plans)
    try:
        built = [Group.model_validate(g) for g in out_groups]
        result = PrunePlan.from_dict({
            "format": FORMAT,
            "version": required_version(built, config),
            "model": {"tensors": original, "digest": plans[0].model.digest, "buffers": buffers},
            "groups": out_groups,
            "provenance": provenance.model_dump(),
            **({"config": config.model_dump()} if config is not None else {}),
        })
    except PlanValidationError as exc:
        raise PlanValidationError(f"the composed plan is invalid: {exc}") from None
    log.info("composed %d plans into %d groups", len(plans), len(result.groups))
    return result


def _compose_config(plans: Sequence[PrunePlan]) -> ConfigEdits | None:
    """Config changes of plans applied in order: each key's first ``before``, last value."""
    parts = [(i, p.config) for i, p in enumerate(plans) if p.config is not None]
    if not parts:
        return None
    changes: dict[str, ConfigChange] = {}
    unsupported: list[str] = []
    tied: dict[str, str] = {}
    saved: dict[str, str] = {}
    for i, part in parts:
        for c in part.changes:
            prev = changes.get(c.key)
            if prev is not None:
                if prev.after != c.before:
                    now = prev.after if prev.after is not None else "different per layer"
                    raise PlanMismatchError(
                        f"plan {i}: expects config {c.key} = {c.before}, but the plans before it "
                        f"leave {now}"
                    )
                c = c.model_copy(update={"before": prev.before})
            changes[c.key] = c
        unsupported += part.unsupported
        tied.update(part.tied)
        saved.update(part.saved_names)
    kept = [c for c in changes.values() if c.per_layer or c.after != c.before]
    model_type = next((p.model_type for _, p in parts if p.model_type), None)
    return ConfigEdits(model_type=model_type, changes=kept, unsupported=unsupported, tied=tied,
                       saved_names=saved)


def _fit(s: _Slice, size: int) -> IndexMap:
    """The simplest `IndexMap` giving every unit exactly the positions in ``s.units``."""
    want = [sorted(u) for u in s.units]
    if s.first.positions is None and all(sorted(s.first.unit(u)) == want[u] for u in range(size)):
        return s.first.model_copy(update={"modulo": s.modulo})
    affine = _affine(want, s.modulo)
    if affine is not None:
        return affine
    return IndexMap(positions=want, modulo=s.modulo)


def _affine(units: list[list[int]], modulo: int | None) -> IndexMap | None:
    """An affine map (offset, repeat, tiles, tile_stride) matching ``units``, if there is one."""
    first = units[0]
    if not first:
        return None
    offset = first[0]
    repeat = 1
    while repeat < len(first) and first[repeat] == offset + repeat:
        repeat += 1
    if len(first) % repeat:
        return None
    tiles = len(first) // repeat
    stride = first[repeat] - offset if tiles > 1 else 0
    try:
        m = IndexMap(offset=offset, repeat=repeat, tiles=tiles, tile_stride=stride, modulo=modulo)
    except ValueError:
        return None
    if all(sorted(m.unit(u)) == want for u, want in enumerate(units)):
        return m
    return None
