"""Plain descriptions of prunable groups, produced by the graph code and read by the planner.

A `Group` says, for every unit of its root(s), which tensor positions and which module
attributes it owns. It knows nothing of which units will be removed: the planner combines a
`Group` with removed indices into a plan group.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

__all__ = ["DropoutSpec", "EditSpec", "Group", "GroupList", "LeftOut", "SliceSpec"]


@dataclass(frozen=True)
class SliceSpec:
    """Positions of ``tensor`` along ``axis`` owned by each unit (see `pruneplan.IndexMap`)."""

    tensor: str
    axis: int
    offset: int = 0
    repeat: int = 1
    tiles: int = 1
    tile_stride: int = 0
    positions: tuple[tuple[int, ...], ...] | None = None
    modulo: int | None = None

    def map_fields(self) -> dict:
        """The non-default `IndexMap` fields of this slice."""
        out: dict = {}
        for name, default in (("offset", 0), ("repeat", 1), ("tiles", 1), ("tile_stride", 0)):
            if getattr(self, name) != default:
                out[name] = getattr(self, name)
        if self.positions is not None:
            out["positions"] = [list(p) for p in self.positions]
        if self.modulo is not None:
            out["modulo"] = self.modulo
        return out


@dataclass(frozen=True)
class EditSpec:
    """Integer attribute ``module.attribute`` that drops by ``per_unit`` for each removed unit.

    ``attribute`` may name one integer of a list or tuple attribute, ``"channel_splits[1]"``.
    ``amounts``, when set, says how much removing each unit takes off instead (one entry per
    unit: the size of one part of a split drops only by the units in that part); ``per_unit``
    is then the largest of them.
    """

    module: str
    attribute: str
    before: int
    per_unit: int = 1
    amounts: tuple[int, ...] | None = None

    def drop(self, removed: Iterable[int]) -> int:
        """How much the attribute drops when the units ``removed`` (unique) go."""
        if self.amounts is None:
            return self.per_unit * len(list(removed))
        return sum(self.amounts[u] for u in removed)


@dataclass(frozen=True)
class DropoutSpec:
    """Dropout module whose rate becomes ``p * (1 - k / size)`` when k of the units go."""

    module: str
    p: float


@dataclass(frozen=True)
class Group:
    """A set of coupled units that must be removed together.

    Attributes:
        name: the key to use in `plan_pruning`'s ``removed`` mapping (the first root's name).
        size: number of units.
        roots: modules whose outputs are the units (several when coupled by a residual sum).
        slices: every tensor axis the units own.
        edits: module attributes that shrink with the units.
        dropouts: dropout modules whose rate follows the unit count.
        kind: what a unit is: ``"channels"`` (an output channel or neuron), ``"heads"`` (every
            position of one attention head) or ``"query_groups"`` (a key/value head of
            grouped-query attention with its query heads); see `pruneplan.plan.KINDS`.
        blocks: the units form this many equal contiguous blocks that must each lose the
            same number of units (the key/value heads of a ``"heads"`` group in grouped-query
            attention); 1 otherwise. `pruneplan.select_indices` honours it, and planning
            refuses indices that remove different counts from the blocks.
        alternative_to: for a group listed in `GroupList.alternatives`: the name of the
            group whose units it divides (the ``"query_groups"`` group of the same attention)
            and which it replaces; ``None`` for the groups of the list itself.
        root_units: for units tied unevenly (branches concatenated and coupled to a
            full-width tensor, ``cat([c1(x), c2(x)]) + c3(x)``: a unit is one channel of
            ``c3`` and one of ``c1`` *or* ``c2``), each root whose own units are not the
            group's one to one, with the indices of its own units that make each unit of the
            group (``("c1", ((0,), (1,), (2,), (), ()))``: c1's 3 channels are units 0-2, it
            holds none of units 3-4). Scores of such a root (one per own unit) are aggregated
            onto the group's units that hold them (`pruneplan.aggregate_scores`). Empty for
            every other group.
    """

    name: str
    size: int
    roots: tuple[str, ...]
    slices: tuple[SliceSpec, ...]
    edits: tuple[EditSpec, ...] = ()
    dropouts: tuple[DropoutSpec, ...] = ()
    notes: tuple[str, ...] = field(default=(), compare=False)
    kind: str = "channels"
    blocks: int = 1
    alternative_to: str | None = None
    root_units: tuple[tuple[str, tuple[tuple[int, ...], ...]], ...] = ()

    @property
    def tensors(self) -> list[str]:
        """The state-dict keys of every member tensor, sorted."""
        return sorted({s.tensor for s in self.slices})


@dataclass(frozen=True)
class LeftOut:
    """A root module (Linear, Conv, Embedding) that discovery does not offer for pruning.

    Attributes:
        name: the module's path in the model.
        reason: why, as a sentence for the user (the operation or module that stops it, and
            the roots it is coupled with, if any).
    """

    name: str
    reason: str


class GroupList(list):
    """What `prunable_groups` returns: a plain ``list`` of `Group` (existing callers index,
    iterate and compare it as a list) that also says what discovery did *not* offer.

    Attributes:
        left_out: every root module left out, each with its reason (`LeftOut`), in execution
            order.
        unexecuted: paths of modules holding parameters that no example call reached in eval
            or training mode; their widths were not checked (see `prunable_groups`).
        alternatives: groups that divide the units of a group of the list differently and
            may be used instead of it, never with it (they share its tensors): for each
            ``"query_groups"`` group of grouped-query attention, its query heads (kind
            ``"heads"``, ``blocks`` = the key/value heads, named ``<attention>.heads``; see
            `Group.alternative_to`).
    """

    def __init__(self, groups: Iterable[Group] = (), left_out: Iterable[LeftOut] = (),
                 unexecuted: Iterable[str] = (), alternatives: Iterable[Group] = ()) -> None:
        super().__init__(groups)
        self.left_out: list[LeftOut] = list(left_out)
        self.unexecuted: list[str] = list(unexecuted)
        self.alternatives: list[Group] = list(alternatives)

    def with_query_heads(self, names: Iterable[str] | None = None) -> GroupList:
        """A copy where every group that has an alternative (`alternatives`) is replaced by
        it, in its place: grouped-query attention offers its query heads instead of its query
        groups. ``names``: only the groups of these names (or whose alternative has one of
        them); ``None``: all. ``left_out`` and ``unexecuted`` are kept; ``alternatives`` then
        lists the replaced groups (and the alternatives not taken). Raises nothing."""
        wanted = None if names is None else set(names)
        alt = {g.alternative_to: g for g in self.alternatives
               if wanted is None or g.name in wanted or g.alternative_to in wanted}
        out = [alt.get(g.name, g) for g in self]
        swapped = [replace(g, alternative_to=alt[g.name].name) for g in self if g.name in alt]
        rest = [g for g in self.alternatives if g.alternative_to not in alt]
        return GroupList(out, self.left_out, self.unexecuted, swapped + rest)
