"""The discovery engine: push channel labels through the graph IR, couple and assemble groups.

Every root (a module whose rule makes it one: Linear, Conv/ConvTranspose with ``groups == 1``,
Embedding, ...) labels the positions of its output's channel axis with its units. Labels flow
forward through the calls of the graph; what each call does with them is its *rule*
(`pruneplan.graph.rules`): carry them, move them, couple them, consume them (recording which
tensors and attributes the units own) or block their roots. Wherever two labelled tensors meet
position by position their roots are coupled (union-find): the same indices go out of all of
them. A root that meets something it cannot be pruned against (the model output, a tensor no
root owns, a hard-coded split, attention heads) is *blocked*; a call no rule knows, applied to
labelled channels, is an error naming the call and the module. Labels of blocked roots are
dropped as soon as they are read, so nothing downstream of a block is examined on their
account. This module never names a layer type or an operation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from pruneplan._tied import tied_keys
from pruneplan.errors import PlanningError, UnsupportedOperationError
from pruneplan.graph._examine import examine
from pruneplan.graph._ir import Graph, Node, Ref
from pruneplan.graph._labels import (
    MASK,
    SHIFT,
    Dim,
    Lab,
    PView,
    Sizes,
    affine_stream,
    make_labels,
    roots_of,
    unit_positions,
)
from pruneplan.graph._streams import Stream
from pruneplan.graph.rules import Call, function_rule, iter_refs, module_rule, tensorish
from pruneplan.graph.spec import DropoutSpec, EditSpec, Group, GroupList, LeftOut, SliceSpec

__all__ = ["Engine", "analyze"]

log = logging.getLogger(__name__)


@dataclass
class _Root:
    idx: int
    name: str
    module: nn.Module
    size: int
    slices: list[SliceSpec]
    edits: list[EditSpec]
    labels: np.ndarray | None = None  # unit at each output position (after any regrouping)


@dataclass
class _State:
    """Union-find over roots with per-class block reasons and notes, and the ties between units.

    Every class has a *space* of unit places: by default the units of its roots, shared (unit
    ``u`` of every coupled root is place ``u``: they lose the same indices). Roots coupled in
    another layout (a root meeting two copies of another's channels, as in GhostNet) get their
    own places (``emb``), and ``part`` records which places must go together; a group's unit
    is then one set of tied places (see `Engine.groups`).
    """

    parent: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    blocked: dict[int, list[str]] = field(default_factory=dict)
    notes: dict[int, list[str]] = field(default_factory=dict)
    #: class -> partition of its places (place -> smallest place it must go with), only for
    #: classes whose units were tied together (grouped convs, splits, pixel shuffles)
    part: dict[int, np.ndarray] = field(default_factory=dict)
    #: root -> place of each of its units (absent: unit u is place u)
    emb: dict[int, np.ndarray] = field(default_factory=dict)
    #: class -> number of places (absent: its representative root's size)
    space: dict[int, int] = field(default_factory=dict)

    def add(self, size: int) -> None:
        self.parent.append(len(self.parent))
        self.sizes.append(size)

    def find(self, r: int) -> int:
        p = self.parent
        while p[r] != r:
            p[r] = p[p[r]]
            r = p[r]
        return r

    def places(self, r: int, units: np.ndarray | None = None) -> np.ndarray:
        """Places of ``units`` (default: all) of root ``r`` in its class's space."""
        e = self.emb.get(r)
        if units is None:
            return e if e is not None else np.arange(self.sizes[r], dtype=np.int64)
        return e[units] if e is not None else units

    def extent(self, c: int) -> int:
        return self.space.get(c, self.sizes[c])

    def relate(self, p: int, up: np.ndarray, q: int, uq: np.ndarray, note: str) -> None:
        """Units ``up[i]`` of root ``p`` and ``uq[i]`` of root ``q`` go together."""
        cp, cq = self.find(p), self.find(q)
        a, b = self.places(p, up), self.places(q, uq)
        if cp == cq:
            if not np.array_equal(a, b):
                self._tie(cp, a, b)
                self.notes.setdefault(cp, []).append(note)
            return
        na, nb = self.extent(cp), self.extent(cq)
        if cq < cp:
            cp, cq, a, b, na, nb = cq, cp, b, a, nb, na
        if na == nb and np.array_equal(a, b):  # the same places: one shared space
            self._merge(cp, cq, note)
            other = self.part.pop(cq, None)
            if other is not None:
                mine = self.part.get(cp)
                self.part[cp] = other if mine is None else _components(
                    na, np.concatenate([np.arange(na), np.arange(na)]), np.concatenate([mine, other]))
            return
        # another layout: the second class's places follow the first's, then tie the pairs
        for r in range(len(self.parent)):
            if self.find(r) == cq:
                self.emb[r] = self.places(r) + na
        first = self.part.get(cp, np.arange(na, dtype=np.int64))
        second = self.part.pop(cq, np.arange(nb, dtype=np.int64)) + na
        self._merge(cp, cq, note)
        self.space[cp] = na + nb
        self.space.pop(cq, None)
        self.part[cp] = np.concatenate([first, second])
        self._tie(cp, a, b + na)

    def _merge(self, ra: int, rb: int, note: str) -> None:
        self.parent[rb] = ra
        for d in (self.blocked, self.notes):
            if rb in d:
                d.setdefault(ra, []).extend(d.pop(rb))
        self.notes.setdefault(ra, []).append(note)

    def _tie(self, c: int, a: np.ndarray, b: np.ndarray) -> None:
        n = self.extent(c)
        base = self.part.get(c)
        if base is None:
            base = np.arange(n, dtype=np.int64)
        self.part[c] = _components(n, np.concatenate([np.arange(n), a]), np.concatenate([base, b]))

    def tied(self, p: int, up: np.ndarray, q: int, uq: np.ndarray) -> bool:
        """Whether those units are already known to go together."""
        c = self.find(p)
        if c != self.find(q) or c not in self.part:
            return np.array_equal(self.places(p, up), self.places(q, uq)) and c == self.find(q)
        part = self.part[c]
        return bool(np.array_equal(part[self.places(p, up)], part[self.places(q, uq)]))

    def is_blocked(self, r: int) -> bool:
        return self.find(r) in self.blocked


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of the graph on ``range(n)`` with edges ``a[i] -- b[i]``: each
    node's smallest fellow (label propagation with pointer jumping, vectorised)."""
    comp = np.arange(n, dtype=np.int64)
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    while True:
        m = np.minimum(comp[a], comp[b])
        new = comp.copy()
        np.minimum.at(new, a, m)
        np.minimum.at(new, b, m)
        while True:
            nxt = new[new]
            if np.array_equal(nxt, new):
                break
            new = nxt
        if np.array_equal(new, comp):
            return comp
        comp = new


#: operations that read only the dtype, device or shape of their tensor arguments
#: (``torch.zeros_like(self.w)``, ``self.w.new_zeros(n)``): no call reading a parameter's values
#: (`couple_shared`)
_READS_NO_VALUES = frozenset({
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
    "randint_like", "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "size", "dim",
    "numel"})
#: operations whose arguments after the first give only a dtype, device or shape
#: (``x.to(self.w)``, ``x.expand_as(self.w)``)
_READS_FIRST_ONLY = frozenset({"to", "type_as", "expand_as", "view_as", "reshape_as"})


class Engine:
    """Label propagation, coupling and assembly over one traced graph (see the module doc)."""

    def __init__(self, model: nn.Module, graph: Graph, include_output: bool,
                 whole_groups: frozenset[str] = frozenset()) -> None:
        self.model = model
        #: grouped convs whose units are whole conv groups in this pass (see `collapsed`)
        self.whole_groups = whole_groups
        #: (grouped conv, input labels whose local positions it tied, regroups done then)
        self.grouped_inputs: list[tuple[str, np.ndarray, int]] = []
        self.nodes = graph.nodes
        self.include_output = include_output
        self.info: list[Any] = [None] * len(graph.nodes)
        self.roots: list[_Root] = []
        self.by_name: dict[str, int] = {}
        self.uf = _State()
        self.effects: list[list[tuple[int, Any]]] = []
        self.errors: list[tuple[str, list[int]]] = []
        #: (call, width, labels on the axis it sizes, output labels, regroups done then)
        self.widths: list[tuple[Node, Dim, Lab | None, Lab | None, int]] = []
        #: widths divided by a literal (``C // num_heads``) sizing an axis with no labels:
        #: checked on the assembled groups (see `_derived`)
        self.derived: list[tuple[Node, Dim]] = []
        self.later: list[Callable[[], None]] = []  # checks run by `finish` (see `Call.later`)
        self.refused: dict[str, str] = {}  # module path -> why it cannot be a root
        self.holders: dict[int, set[int]] = {}  # root -> nodes whose info holds its labels
        self.regroups: list[tuple[frozenset[int], np.ndarray]] = []  # (roots, old -> new unit)
        self.heads: dict[int, int] = {}  # root -> attention heads per unit on a head axis
        #: (node, root) -> positions per unit where only some units reach (see `_partial`)
        self.partial: dict[tuple[int, int], np.ndarray] = {}
        #: roots whose channels a split cut into parts of their own: calls may see only the
        #: units of one part (see `Call.parts`)
        self.parted: set[int] = set()
        self._users: dict[int, list[int]] | None = None  # node -> nodes reading it (`used`)
        self.root_calls: dict[int, set[int]] = {}  # root -> calls that made it a root
        self._state_cache: tuple[dict[str, str], dict[str, torch.Size]] | None = None

    # ---- bookkeeping ---------------------------------------------------------------------

    def block(self, roots: list[int], reason: str) -> None:
        for r in roots:
            c = self.uf.find(r)
            self.uf.blocked.setdefault(c, []).append(reason)

    def error(self, node: Node, roots: list[int], what: str) -> None:
        names = ", ".join(repr(self.roots[r].name) for r in roots)
        msg = f"{node.where()} {what} (channels of {names})"
        self.errors.append((msg, roots))
        self.block(roots, msg)

    def effect(self, r: int, node: Node, item: Any) -> None:
        self.effects[r].append((node.idx, item))

    def read(self, ref: Any) -> Any:
        if not isinstance(ref, Ref):
            return None
        return self._filter(self.info[ref.node])

    def _filter(self, v: Any) -> Any:
        if isinstance(v, Lab):
            rs = v.roots
            bad = [r for r in rs if self.uf.is_blocked(r)]
            if len(bad) == len(rs):
                return None
            if not bad:
                return v
            arr = v.arr.copy()
            arr[np.isin(arr >> SHIFT, bad) & (arr >= 0)] = -1
            return Lab(v.axes, arr)
        if isinstance(v, list):
            return [self._filter(x) for x in v]
        if isinstance(v, Dim):  # kept whole: a blocked width still sizes what it sizes
            return v
        if isinstance(v, Sizes):  # kept whole, as `Dim` (sizes of blocked channels still size)
            return v
        return v

    def meta(self, ref: Any) -> Any:
        return self.nodes[ref.node].meta if isinstance(ref, Ref) else None

    def labeled_roots(self, infos: list[Any]) -> list[int]:
        out: set[int] = set()
        for i in infos:
            if isinstance(i, Lab):
                out.update(i.roots)
            elif isinstance(i, list):
                out.update(self.labeled_roots(i))
        return sorted(out)

    def stream(self, arr: np.ndarray, r: int, node: Node) -> Stream | None:
        pos = unit_positions(arr, r, self.roots[r].size)
        if pos is None:
            if self.uf.find(r) in self.uf.part or self.is_parted(r):
                return self._partial(arr, r, node)
            self.block([r], f"only some of its units reach {node.where()}")
            return None
        return affine_stream(pos)

    def is_parted(self, r: int) -> bool:
        """Whether ``r`` or a root coupled with it had its channels cut into parts."""
        if not self.parted:
            return False
        c = self.uf.find(r)
        return any(self.uf.find(p) == c for p in self.parted)

    def scaled(self, e: EditSpec, st: Stream, r: int) -> EditSpec:
        """An edit made on a partial stream of a parted root ``r`` (units of one part of a
        split, some holding no position there) drops by the positions each unit holds: its
        `EditSpec.amounts`. (Partial streams of tied units alone are checked at assembly.)

        Raises:
            PlanningError: ``e.per_unit`` is no multiple of the widest unit's positions.
        """
        if st.positions is None or not self.is_parted(r):
            return e
        counts = [len(p) for p in st.positions]
        widest = max(counts)
        if len(set(counts)) == 1 or widest == 0:
            return e
        if e.per_unit % widest:
            raise PlanningError(f"{e.module}.{e.attribute} would shrink by a fraction of a "
                                "unit's channels")
        f = e.per_unit // widest
        return replace(e, amounts=tuple(c * f for c in counts))

    def _partial(self, arr: np.ndarray, r: int, node: Node) -> Stream:
        """Units of a root whose units are tied: some may reach ``node`` only through the
        units they are tied to (a pixel shuffle keeps one label per ``r * r`` channels). The
        positions are explicit (empty for a unit that does not reach); whether every set of
        tied units holds as many positions is checked when the group is assembled."""
        size = self.roots[r].size
        sel = np.flatnonzero((arr >= 0) & ((arr >> SHIFT) == r))
        units = arr[sel] & MASK
        order = np.argsort(units, kind="stable")
        sel, units = sel[order], units[order]
        counts = np.bincount(units, minlength=size)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        positions = tuple(tuple(int(p) for p in sel[bounds[u]:bounds[u + 1]]) for u in range(size))
        self.partial[(node.idx, r)] = counts
        return Stream(positions=positions)

    # ---- coupling ------------------------------------------------------------------------

    def couple(self, a: np.ndarray, b: np.ndarray, node: Node, tie: bool = True) -> np.ndarray:
        """Positions of ``a`` and ``b`` are tied one to one: couple their roots.

        Positions holding different units tie those units (they can only go together; the
        roots may even differ in size); with ``tie=False`` that blocks the roots instead,
        unless the units are tied already."""
        la, lb = a >= 0, b >= 0
        lonely = (la & ~lb, a), (lb & ~la, b)
        for mask, arr in lonely:
            if mask.any():
                self.block(roots_of(arr[mask]),
                           f"meets channels no prunable layer owns at {node.where()}")
        both = la & lb
        if both.any():
            x, y = a[both], b[both]
            rx, ry, ux, uy = x >> SHIFT, y >> SHIFT, x & MASK, y & MASK
            note = f"{node.target} in {node.scope or '<top level>'}"
            pairs, inverse = np.unique(np.stack([rx, ry], axis=1), axis=0, return_inverse=True)
            inverse = inverse.reshape(-1)
            for k, (p, q) in enumerate(pairs.tolist()):
                sel = inverse == k
                up, uq = ux[sel], uy[sel]
                if p == q and np.array_equal(up, uq):
                    continue
                if tie or self.uf.tied(p, up, q, uq):
                    self.uf.relate(p, up, q, uq, note)
                elif self.roots[p].size == self.roots[q].size and np.array_equal(up, uq):
                    self.uf.relate(p, up, q, uq, note)
                else:
                    self.block([p, q], f"coupled to other units in another order at {node.where()}")
        return np.where(la, a, b)

    def merge(self, node: Node, operands: list[tuple[Any, Any]]) -> Lab | None:
        """Element-wise combination (with broadcasting) of operands ``(info, shape)``."""
        out = node.meta if isinstance(node.meta, torch.Size) else None
        if out is None:
            return None
        nd = len(out)
        labs: list[Lab] = []
        plain: list[tuple[Any, Any]] = []
        operands = [(i, m) for i, m in operands if isinstance(m, torch.Size)]  # ints are scalars
        for info, meta in operands:
            shift = nd - len(meta)
            if isinstance(info, Lab):
                lab = info.shifted(shift)
                if any(out[a] != lab.arr.shape[k] for k, a in enumerate(lab.axes)):
                    self.block(lab.roots, f"broadcast across channels at {node.where()}")
                    continue
                labs.append(lab)
            else:
                plain.append((info, meta))
        if not labs:
            return None
        axes = labs[0].axes
        if any(lab.axes != axes for lab in labs):
            self.block(self.labeled_roots(labs), f"labels on different axes meet at {node.where()}")
            return None
        arr = labs[0].arr
        for lab in labs[1:]:
            arr = self.couple(arr, lab.arr, node)
        for info, meta in plain:
            shift = nd - len(meta)
            for a in axes:
                d = a - shift
                if d < 0 or meta[d] == 1:
                    continue
                if isinstance(info, PView) and info.dims[d] is not None and len(axes) == 1:
                    for r in roots_of(arr):
                        st = self.stream(arr, r, node)
                        if st is not None:
                            self.effect(r, node, st.slice(info.key, info.dims[d]))
                else:
                    self.block(roots_of(arr),
                               f"combined with a tensor no prunable layer owns at {node.where()}")
        return Lab(axes, arr)

    # ---- regrouping units ----------------------------------------------------------------

    def members(self, r: int) -> list[int]:
        """Every root coupled with ``r`` (its class), ``r`` included."""
        c = self.uf.find(r)
        return [o for o in range(len(self.roots)) if self.uf.find(o) == c]

    def regroup(self, roots: list[int], mapping: np.ndarray) -> None:
        """Units of ``roots`` (one coupled class) become coarser: old unit ``u`` is now part of
        unit ``mapping[u]``; every new unit gathers the same number of old ones.

        Everything recorded so far is rewritten: the labels stored on graph values, the roots'
        own slices and edits and the effects of the calls already seen, so that a unit keeps
        owning all the positions of the old units it gathers.
        """
        mapping = np.asarray(mapping, dtype=np.int64)
        old = len(mapping)
        new = int(mapping.max()) + 1
        k = old // new
        order = np.argsort(mapping, kind="stable")
        members = frozenset(roots)
        c = self.uf.find(roots[0])
        tied = self.uf.part.get(c)
        if tied is not None and (c in self.uf.space or any(r in self.uf.emb for r in roots)
                                 or any(r in roots for _, r in self.partial)):
            # units tied into sets in a layout of their own (concatenated parts, partial
            # streams): both at once are not supported
            self.block(list(roots), "their units are both tied into sets of channels and "
                       "gathered into heads, which pruneplan does not combine")
            self.uf.part.pop(c)
            self.uf.space.pop(c, None)
            for r in roots:
                self.uf.emb.pop(r, None)
        elif tied is not None:
            # units tied into sets (a local position of every block of a grouped conv): the
            # new units that gather tied units are tied in turn
            self.uf.part[c] = _components(new, np.concatenate([np.arange(new), mapping]),
                                          np.concatenate([np.arange(new), mapping[tied]]))
        for r in roots:
            self.uf.sizes[r] = new
        for r in roots:
            root = self.roots[r]
            root.size = new
            root.slices = [_regroup_slice(s, order, new, old) for s in root.slices]
            root.edits = [_regroup_edit(e, k, mapping, new) for e in root.edits]
            root.labels = _remap(root.labels, members, mapping)
            self.effects[r] = [(n, _regroup_slice(it, order, new, old) if isinstance(it, SliceSpec)
                                else _regroup_edit(it, k, mapping, new) if isinstance(it, EditSpec)
                                else it)
                               for n, it in self.effects[r]]
            if r in self.heads:
                self.heads[r] *= k
            for idx in self.holders.get(r, ()):
                self.info[idx] = _remap_info(self.info[idx], members, mapping)
        self.regroups.append((members, mapping))

    def refresh(self, arr: np.ndarray, since: int) -> np.ndarray:
        """A label array made before regroups number ``since`` onwards, in today's units."""
        for members, mapping in self.regroups[since:]:
            arr = _remap(arr, members, mapping)
        return arr

    def tie(self, arrs: list[np.ndarray], node: Node, lazy: bool = False) -> np.ndarray | None:
        """Tie equally long 1-D label arrays position by position, regrouping units when the
        ties join several units of a root into one (attention: the rows of a head, the query
        heads sharing a key/value head). Returns the tied labels (``None`` when blocked).

        Where every position meets the same unit, this is `couple`. Otherwise the units tied
        together form the new units: each must gather the same number of units of every root
        involved, else those roots are blocked.
        """
        arrs = [np.asarray(a) for a in arrs]
        stack = np.stack(arrs)
        lab = stack >= 0
        lonely = lab.any(0) & ~lab.all(0)
        if lonely.any():
            self.block(roots_of(stack[:, lonely]), f"meets channels no prunable layer owns at {node.where()}")
            return None
        if not lab.any():
            return arrs[0]
        units = stack & MASK
        if (units == units[0]).all():
            out = arrs[0]
            for a in arrs[1:]:
                out = self.couple(out, a, node)
            return out
        cls = np.vectorize(lambda v: self.uf.find(int(v >> SHIFT)), otypes=[np.int64])(stack)
        keys = (cls << SHIFT) | units
        flat = sorted(set(keys.reshape(-1).tolist()))
        index = {key: i for i, key in enumerate(flat)}
        parent = list(range(len(flat)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for col in keys.T.tolist():
            a = find(index[col[0]])
            for key in col[1:]:
                b = find(index[key])
                if a != b:
                    parent[max(a, b)] = min(a, b)
        classes = sorted({key >> SHIFT for key in flat})
        roots = sorted(set(roots_of(stack)))
        comp_of = {c: np.full(self.roots[c].size, -1, dtype=np.int64) for c in classes}
        bad = None
        if any(r in self.uf.emb or self.roots[r].size != self.roots[self.uf.find(r)].size
               for r in roots):
            # a class whose roots are placed at offsets of a wider space (concatenated parts):
            # its units are no single numbering to regroup
            bad = f"{node.where()} ties their units across parts of different widths"
        else:
            for key in flat:
                comp_of[key >> SHIFT][key & MASK] = find(index[key])
        for comps in comp_of.values() if bad is None else ():
            if (comps < 0).any():
                bad = f"only some of their units reach {node.where()}"
                break
        if bad is None:
            sets = [np.unique(comp_of[c], return_counts=True) for c in classes]
            first = sets[0][0]
            if any(not np.array_equal(s[0], first) or len(set(s[1].tolist())) != 1 for s in sets):
                bad = f"{node.where()} ties their units unevenly"
        if bad is not None:
            if lazy:  # tie the units where they meet; the sets are checked at assembly
                out = arrs[0]
                for a in arrs[1:]:
                    out = self.couple(out, a, node)
                return out
            self.block(roots, bad)
            return None
        # new unit ids: the components in the order of the first class's lowest unit
        start = len(self.regroups)
        lead = comp_of[classes[0]]
        seen: dict[int, int] = {}
        for comp in lead.tolist():
            seen.setdefault(comp, len(seen))
        for c in classes:
            mapping = np.array([seen[comp] for comp in comp_of[c].tolist()], dtype=np.int64)
            if not np.array_equal(mapping, np.arange(len(mapping))):
                self.regroup(self.members(c), mapping)
        arrs = [self.refresh(a, start) for a in arrs]
        out = arrs[0]
        for a in arrs[1:]:
            out = self.couple(out, a, node)
        return out

    def coarsen_rows(self, rows: np.ndarray) -> bool:
        """Channels viewed as ``(rows, row length)``: a root whose units fill two or more whole
        rows, one run of units per row, gets one unit per row (the heads of a projection
        split by ``view(B, T, heads, head_dim)``). Returns whether any root was regrouped."""
        done = False
        if rows.ndim != 2 or rows.shape[1] < 2:
            return False
        rs = rows >> SHIFT
        for r in roots_of(rows):
            hit = (rs == r) & (rows >= 0)
            which = np.flatnonzero(hit.any(1))
            if len(which) < 2 or not hit[which].all():
                continue
            part = rows[which] & MASK
            if part.size != self.roots[r].size or len(np.unique(part)) != part.size:
                continue
            mapping = np.empty(part.size, dtype=np.int64)
            mapping[part.reshape(-1)] = np.repeat(np.arange(len(which)), rows.shape[1])
            self.regroup(self.members(r), mapping)
            rows = self.refresh(rows, len(self.regroups) - 1)
            rs = rows >> SHIFT
            done = True
        return done

    def mark_heads(self, arr: np.ndarray) -> None:
        """``arr`` (1-D) labels a head axis of attention: its roots' units are heads (or groups
        of query heads: the count per unit is kept). An axis that repeats its whole run of
        heads (heads merged with the batch axis, SAM's ``(B * heads, N, head_dim)``) counts
        one run: the copies are samples, not query heads."""
        n = len(arr)
        p = next(p for p in range(1, n + 1)
                 if n % p == 0 and np.array_equal(arr, np.tile(arr[:p], n // p)))
        arr = arr[:p]
        for r in roots_of(arr):
            per = int(np.count_nonzero((arr >> SHIFT == r) & (arr >= 0))) // self.roots[r].size
            self.heads[r] = max(self.heads.get(r, 1), per)

    def users(self, idx: int) -> list[int]:
        """The nodes that read node ``idx``'s output."""
        if self._users is None:
            self._users = {}
            for n in self.nodes:
                for ref in iter_refs((n.args, n.kwargs)):
                    self._users.setdefault(ref.node, []).append(n.idx)
        return self._users.get(idx, [])

    def used(self, idx: int, item: int | None) -> bool:
        """Whether node ``idx``'s output (element ``item`` of it) is read by a later node."""
        for u in self.users(idx):
            n = self.nodes[u]
            if item is None or n.target != "getitem" or n.kind != "op":
                return True
            if len(n.args) > 1 and n.args[1] == item and self._users.get(u):
                return True
        return False

    # ---- driver --------------------------------------------------------------------------

    def run(self) -> None:
        for node in self.nodes:
            kind = node.kind
            if kind == "param":
                meta = node.meta
                self.info[node.idx] = PView(node.target, tuple(range(len(meta)))) \
                    if isinstance(meta, torch.Size) else None
            elif kind == "module":
                self.info[node.idx] = self.call_module(node)
                self._index(node.idx)
            elif kind == "op":
                self.info[node.idx] = self.call_function(node)
                self._index(node.idx)
            elif kind == "output":
                self.output(node)

    def _index(self, idx: int) -> None:
        """Remember which roots' labels node ``idx`` holds (for `regroup`)."""
        for r in _info_roots(self.info[idx]):
            self.holders.setdefault(r, set()).add(idx)

    def output(self, node: Node) -> None:
        roots = self.labeled_roots([self.read(r) for r in iter_refs(node.args)])
        if roots and not self.include_output:
            self.block(roots, "its units reach the model output "
                       "(include_output=True allows pruning it)")

    def call_module(self, node: Node) -> Any:
        refs = list(iter_refs((node.args, node.kwargs)))
        call = Call(self, node, refs, [self.read(r) for r in refs])
        rule = module_rule(type(node.module))
        if rule is None:
            return self.unknown(call)
        return rule.propagate(call)

    def call_function(self, node: Node) -> Any:
        refs = list(iter_refs((node.args, node.kwargs)))
        infos = [self.read(r) for r in refs]
        if all(i is None for i in infos) and isinstance(node.meta, torch.Size) \
                and not any(isinstance(self.info[r.node], Lab) for r in refs):
            return None  # (sizes read off any tensor are followed: see `check_widths`)
        call = Call(self, node, refs, infos)
        rule = function_rule(node.target)
        if rule is None:
            return self.unknown(call)
        return rule.propagate(call)

    def unknown(self, call: Call) -> Any:
        """A call no rule knows, reached by labelled channels: examined on its recorded example
        (followed when it acts on each channel alone, its roots left out when it mixes them);
        an error when it cannot be examined."""
        if not call.labelled:
            return None
        node = call.node
        is_module = node.kind == "module"
        if not is_module and not tensorish(call.out):
            return None
        what = "a module" if is_module else "an operation"
        reason = self.examinable(call)
        if reason is None:
            labelled = [(k, i) for k, i in enumerate(call.infos) if isinstance(i, Lab)]
            found = examine(node.recorded, call.refs, labelled, call.out, seed=node.idx)
            if found is None:
                log.info("%s is not %s pruneplan knows; re-run with single channels perturbed, "
                         "it acts on each channel alone: channels follow it", node.where(), what)
                return call.merge([(i, self.meta(r)) for i, r in zip(call.infos, call.refs, strict=True)])
            call.block_all(f"{node.where()}, which no rule describes, {found} (seen by running "
                           "it again with single channels perturbed); register a rule for it "
                           "(pruneplan.register_module_rule / register_function_rule) to prune "
                           "through it")
            return None
        follows = call.x_only if is_module else isinstance(call.x, Lab)
        if not follows:
            call.error("receives them in an argument pruneplan does not follow")
        else:
            call.error(f"is not {what} pruneplan knows how to follow ({reason})")
        return None

    def examinable(self, call: Call) -> str | None:
        """Why a call no rule knows cannot be examined on its example (``None``: it can)."""
        node = call.node
        if not isinstance(node.meta, torch.Size):
            return "it does not return one tensor"
        if node.recorded is None:
            return "no example of the call was kept"
        if node.module is not None and next(iter(node.module.state_dict()), None) is not None:
            return "it holds parameters or buffers that may follow the channels"
        for info in call.infos:
            if isinstance(info, list) or (isinstance(info, Lab) and len(info.axes) != 1):
                return "their labels are not on one axis of a tensor argument"
        return None

    # ---- roots ---------------------------------------------------------------------------

    def new_units(self, node: Node,
                  spec: Callable[[], tuple[int, list[SliceSpec], list[EditSpec]]],
                  name: str | None = None, module: nn.Module | None = None) -> np.ndarray | None:
        """Register the called module (or ``module`` at ``name``) as a root; its labels, for a
        rule to place (or ``None``)."""
        if name is None:
            name, module = node.target, node.module
        r = self._register(name, module, spec)
        if r is not None:
            self.root_calls.setdefault(r, set()).add(node.idx)
        if r is None or self.uf.is_blocked(r):
            return None
        return self.roots[r].labels

    def _register(self, name: str, module: nn.Module | None,
                  spec: Callable[[], tuple[int, list[SliceSpec], list[EditSpec]]]) -> int | None:
        r = self.by_name.get(name)
        if r is None:
            try:
                size, slices, edits = spec()
            except PlanningError as exc:
                self.refused.setdefault(name, str(exc))
                return None
            r = len(self.roots)
            self.roots.append(_Root(r, name, module, size, list(slices), list(edits),
                                    make_labels(r, size)))
            self.by_name[name] = r
            self.uf.add(size)
            self.effects.append([])
        return r

    def new_root(self, node: Node, axis: int,
                 spec: Callable[[], tuple[int, list[SliceSpec], list[EditSpec]]],
                 name: str | None = None, module: nn.Module | None = None) -> Lab | None:
        if name is None:
            name, module = node.target, node.module
        r = self._register(name, module, spec)
        if r is None:
            return None
        self.root_calls.setdefault(r, set()).add(node.idx)
        meta = node.meta
        if not isinstance(meta, torch.Size) or len(meta) < (-axis if axis < 0 else axis + 1):
            self.block([r], f"{node.where()} returns no batched tensor")
            return None
        axis %= len(meta)
        labels = self.roots[r].labels
        if meta[axis] != len(labels):
            self.block([r], f"{node.where()} output has {meta[axis]} channels on axis {axis}")
            return None
        return Lab((axis,), labels)

    def apply_rule(self, node: Node, lab: Lab, rule: Callable[[Stream], tuple[Any, Any]]) -> None:
        """For each root in ``lab``: the slices and edits ``rule`` gives for its stream become
        effects of that root; a rule that refuses blocks the root."""
        for r in lab.roots:
            st = self.stream(lab.arr, r, node)
            if st is None:
                continue
            try:
                slices, edits = rule(st)
                edits = [self.scaled(e, st, r) for e in edits]
            except PlanningError as exc:
                self.block([r], str(exc))
                continue
            for item in (*slices, *edits):
                self.effect(r, node, item)

    def relabel(self, idxs: list[int], labs: list[Lab], until: int) -> bool:
        """Give the values of nodes ``idxs`` (computed earlier, unlabelled) the labels ``labs``,
        so that calls from ``until`` on read them. Refused (``False``) when a call before
        ``until`` outside ``idxs`` already read one of them unlabelled."""
        chosen = set(idxs)
        if any(self.info[i] is not None for i in chosen):
            return False
        for node in self.nodes[min(chosen) + 1:until]:
            if node.idx in chosen:
                continue
            if any(r.node in chosen for r in iter_refs((node.args, node.kwargs))):
                return False
        for i, lab in zip(idxs, labs, strict=True):
            self.info[i] = lab
            self._index(i)
        return True

    def sliced(self, key: str, axis: int) -> list[tuple[int, int]]:
        """``(root, positions per unit)`` of every root not blocked whose units own positions
        of tensor ``key`` along ``axis`` (so far)."""
        out = []
        for r, root in enumerate(self.roots):
            if self.uf.is_blocked(r):
                continue
            for item in (*root.slices, *(it for _, it in self.effects[r])):
                if isinstance(item, SliceSpec) and item.tensor == key and item.axis == axis:
                    st = Stream(item.offset, item.repeat, item.tiles, item.tile_stride, item.positions)
                    out.append((r, st.per_unit))
                    break
        return out

    # ---- sizes read as Python ints -------------------------------------------------------

    def check_widths(self, node: Node, out: Any, args: tuple) -> None:
        """Record where a channel width is used as a fixed size; checked in `finish`."""
        if len(args) == 1 and isinstance(args[0], tuple | list):
            args = args[0]
        for i, a in enumerate(args):
            dim = self.info[a.node] if isinstance(a, Ref) else None
            if isinstance(dim, Dim):
                lab = out if isinstance(out, Lab) and i in out.axes else None
                whole = out if isinstance(out, Lab) else None
                self.widths.append((node, dim, lab, whole, len(self.regroups)))

    def finish(self) -> None:
        """A width used as a fixed size must land on an axis carrying the same coupled units
        (checked once all couplings are known: an SE gate is coupled after its reshape).

        Where it lands on an axis of other units, as many positions as long (the hidden width
        ``C`` of a block sizing its attention output, ``reshape(B, N, C)``), the two are tied
        position by position: each keeps exactly as many positions as the other, so the size
        read at run time stays right (heads of ``head_dim`` positions are then tied to
        ``head_dim`` channels of the hidden width each). A width divided by a literal sizing an
        axis with no units (``C // num_heads``) is checked on the groups (`_derived`).
        Parameters held under several state-dict keys are coupled first (`couple_tied`)."""
        self.couple_tied()
        self.couple_shared()
        for check in self.later:
            check()
        for node, dim, lab, out, since in self.widths:
            if dim.div > 1 and lab is None:
                if dim.arr is not None:
                    self._per_head(node, dim, out, since)
                self.derived.append((node, dim))
                continue
            want = {self.uf.find(r) for r in dim.roots}
            have = {self.uf.find(r) for r in lab.roots} if lab is not None else set()
            if want == have:
                continue
            if self._product(node, dim, lab, since):
                continue
            if dim.div == 1 and dim.arr is not None and lab is not None and lab.arr.ndim == 1 \
                    and len(lab.arr) == len(dim.arr) and (lab.arr >= 0).all() \
                    and (dim.arr >= 0).all():
                self.couple(self.refresh(dim.arr, dim.since), self.refresh(lab.arr, since), node)
                continue
            self.block(list(dim.roots) + (list(lab.roots) if lab is not None else []),
                       f"their width is used as a fixed size at {node.where()}")

    def _product(self, node: Node, dim: Dim, lab: Lab | None, since: int) -> bool:
        """A fixed size (of no roots, or of roots left out) times a literal ``k`` sizing an
        axis that holds ``k`` units equally often: ``B * self.num_heads`` sizing the batch
        axis that heads were merged into (SAM's ``(B * heads, N, head_dim)``), ``head_dim *
        self.num_heads`` the channels that heads are put back into. The product follows the
        units when their group edits the module's attribute holding ``k`` by one per unit,
        which is checked on the groups (`_derived`)."""
        if dim.mul < 2 or lab is None or len(lab.axes) != 1 or lab.arr.ndim != 1 \
                or any(not self.uf.is_blocked(r) for r in dim.roots):
            return False
        arr = self.refresh(lab.arr, since)
        units, counts = np.unique(arr, return_counts=True)
        if (arr < 0).any() or len(units) != dim.mul or (counts != counts[0]).any():
            return False
        self.derived.append((node, Dim(tuple(lab.roots), div=dim.mul)))
        return True

    def _per_head(self, node: Node, dim: Dim, out: Lab | None, since: int) -> None:
        """``C // k`` sizes the head width of a view whose output carries ``k`` heads on one
        axis (``qkv.view(B, N, 3, self.num_heads, C // self.num_heads)``): the hidden channels
        are tied position by position to the heads' channels (``C // k`` hidden channels per
        head), so that ``C`` and the head count shrink in proportion and the quotient stays."""
        k = dim.div
        width = len(dim.arr)
        if out is None or len(out.axes) != 1 or out.arr.ndim != 1 or len(out.arr) != k \
                or width % k or not (out.arr >= 0).all() or not (dim.arr >= 0).all():
            return
        heads = self.refresh(out.arr, since)
        self.couple(self.refresh(dim.arr, dim.since), np.repeat(heads, width // k), node)

    def _derived(self, groups: list[Group]) -> dict[int, str]:
        """Groups (by index) that would change a width divided by a literal ``k`` sizing an
        axis with no units (``C // num_heads`` as head_dim), with the reason. The quotient
        stays only when the width's group also edits the module's attribute holding ``k``
        (``num_heads``) by ``k / size`` per unit: both then shrink in proportion."""
        bad: dict[int, str] = {}
        owner = {r: gi for gi, g in enumerate(groups) for r in g.roots}
        for node, dim in self.derived:
            names = {self.roots[r].name for r in dim.roots}
            hit = {owner[n] for n in names if n in owner}
            k = dim.div
            editing = {gi for gi, g in enumerate(groups) for e in g.edits
                       if e.module == node.scope and e.before == k}
            why = (f"their width divided by {k} is used as a fixed size at {node.where()}, "
                   "which would not follow pruned units")
            for gi in hit:
                g = groups[gi]
                if not any(e.module == node.scope and e.before == k and e.per_unit * g.size == k
                           for e in g.edits):
                    bad[gi] = why
            for gi in editing - hit:
                bad[gi] = why
        return bad

    def _state(self) -> tuple[dict[str, str], dict[str, torch.Size]]:
        """The model's tied keys (alias -> first key, `tied_keys`) and the shape of every
        state-dict entry, read once."""
        if self._state_cache is None:
            state = self.model.state_dict(keep_vars=True)
            self._state_cache = (tied_keys(self.model, state), {k: v.shape for k, v in state.items()})
        return self._state_cache

    def couple_shared(self) -> None:
        """One tensor axis read with channels by several calls (a module called more than once,
        shared across branches or in depth; one parameter given to several functional calls; a
        weight tied between modules): the units that the calls bring to it are coupled
        position by position (unit ``i`` of one call's root with unit ``i`` of the other's), so
        that one group owns each position and every call keeps its width.

        Every call that reads the tensor must bring units to the same positions of that axis.
        Where one does not (it brings channels no prunable layer owns, or units at other
        positions), removing a position for the others would break it: every root involved is
        left out, with a reason naming the calls. A root's own output side (``("root", r)``)
        counts for each call that made it the root: those calls all bring its fresh units."""
        alias, shapes = self._state()
        # (tensor, axis) -> source -> [(root, slice)]; a source is a call (node index) or a
        # root's output side
        found: dict[tuple[str, int], dict[Any, list[tuple[int, SliceSpec]]]] = {}
        for r, root in enumerate(self.roots):
            for where, item in [*((("root", r), s) for s in root.slices), *self.effects[r]]:
                if isinstance(item, SliceSpec) and item.modulo is None:
                    key = alias.get(item.tensor, item.tensor)
                    found.setdefault((key, item.axis), {}).setdefault(where, []).append((r, item))
        uses = self._uses({key for key, _ in found}, alias)
        for (key, axis), by in sorted(found.items()):
            calls = uses.get(key, [])
            if len(by) == 1:
                (where,) = by
                covered = self.root_calls.get(where[1], set()) if isinstance(where, tuple) \
                    else {where}
                if covered.issuperset(calls):
                    continue  # one source, and it is what every call reading the axis brings
            if key not in shapes or axis >= len(shapes[key]):
                continue
            length = int(shapes[key][axis])
            entries = self._shared_entries(by, calls, length)
            if len(entries) < 2:
                continue
            arrs = [a for _, a in entries]
            masks = [a >= 0 for a in arrs]
            if all(np.array_equal(masks[0], m) for m in masks[1:]) and masks[0].any():
                node = Node(-1, "param", f"shared tensor {key!r}")
                base = arrs[0]
                for a in arrs[1:]:
                    base = self.couple(base, a, node)
                continue
            roots = sorted({r for a in arrs for r in roots_of(a)})
            self.block(roots, self._shared_reason(key, axis, entries))

    def _shared_entries(self, by: dict[Any, list[tuple[int, SliceSpec]]], calls: list[int],
                        length: int) -> list[tuple[Node | None, np.ndarray]]:
        """One label array per call reading a tensor axis (``None`` for a call that brings no
        units: all ``-1``), in execution order; then sources at calls that do not read it."""

        def labels(specs: list[tuple[int, SliceSpec]], arr: np.ndarray) -> None:
            for r, sp in specs:
                pos, units = _unit_positions(sp, self.roots[r].size)
                keep = pos < length
                arr[pos[keep]] = (np.int64(r) << SHIFT) | units[keep]

        out: list[tuple[Node | None, np.ndarray]] = []
        done: set[Any] = set()
        for n in calls:
            arr = np.full(length, -1, dtype=np.int64)
            if n in by:
                labels(by[n], arr)
                done.add(n)
            for where, specs in by.items():
                if isinstance(where, tuple) and n in self.root_calls.get(where[1], ()):
                    labels(specs, arr)
                    done.add(where)
            out.append((self.nodes[n], arr))
        for where, specs in by.items():
            if where not in done:
                arr = np.full(length, -1, dtype=np.int64)
                labels(specs, arr)
                out.append((self.nodes[where] if isinstance(where, int) else None, arr))
        return out

    def _shared_reason(self, key: str, axis: int,
                       entries: list[tuple[Node | None, np.ndarray]]) -> str:
        """Why the calls reading ``key`` along ``axis`` cannot lose the same positions."""
        nodes = [n for n, _ in entries if n is not None]
        modules = {id(n.module) for n in nodes if n.kind == "module"}
        if len(modules) == 1 and len(nodes) == len(entries) and all(n.kind == "module" for n in nodes):
            subject = f"{nodes[0].where()} is called {len(entries)} times"
        else:
            shown = ", ".join(dict.fromkeys(n.where() for n in nodes)) or "its layer"
            subject = f"{key!r} is read by {len(entries)} calls ({shown})"
        parts = []
        for i, (_, arr) in enumerate(entries):
            rs = roots_of(arr)
            if not rs:
                what = "channels no prunable layer owns"
            else:
                what = "units of " + " and ".join(repr(self.roots[r].name) for r in rs)
                held = int((arr >= 0).sum())
                if held != len(arr):
                    what += f" on {held} of its {len(arr)} positions"
            parts.append(f"call {i + 1}: {what}")
        return (f"{subject}, bringing different channels to {key!r} axis {axis} "
                f"({'; '.join(parts)}), so no position can be removed for every call alike")

    def _uses(self, keys: set[str], alias: dict[str, str]) -> dict[str, list[int]]:
        """The calls that read each tensor of ``keys`` (state-dict keys, aliases folded onto
        their first key), in execution order: calls of a module holding it, and operations
        given it (or a view of it) as an argument, other than taking a view of it."""
        out: dict[str, list[int]] = {}
        owned: dict[str, set[str]] = {}  # module path -> the wanted tensors it (or a child) holds
        for k in self._state()[1]:
            first = alias.get(k, k)
            if first in keys:
                path = k
                while path:
                    path = path.rpartition(".")[0]
                    owned.setdefault(path, set()).add(first)
        for node in self.nodes:
            hit: set[str] = set()
            if node.kind == "module" and node.module is not None:
                hit.update(owned.get(node.target, ()))
            elif node.kind != "op" or isinstance(self.info[node.idx], PView) \
                    or not tensorish(node.meta) or node.target in _READS_NO_VALUES:
                continue
            read = node.args[:1] if node.target in _READS_FIRST_ONLY else (node.args, node.kwargs)
            for ref in iter_refs(read):
                v = self.info[ref.node]
                if isinstance(v, PView):
                    hit.add(alias.get(v.key, v.key))
            for k in hit & keys:
                out.setdefault(k, []).append(node.idx)
        return out

    def couple_tied(self) -> None:
        """One parameter held under several state-dict keys (tied embeddings: T5's ``shared``,
        ``encoder.embed_tokens``, ``decoder.embed_tokens`` and ``lm_head``): the roots slicing
        it under any key are coupled position by position, and every key is sliced alike, so
        that the plan names all of them and a state dict holding them apart stays consistent."""
        aliases: dict[str, list[str]] = {}
        for alias, first in self._state()[0].items():
            aliases.setdefault(first, [first]).append(alias)
        alias_of = {k: ks for ks in aliases.values() for k in ks}
        if not alias_of:
            return
        # (r, where, slice): ``where`` is the call that made it (the root itself: ("root", r)),
        # kept for the alias so that a module called more than once stays one layout per call
        found: dict[tuple[str, int], list[tuple[int, Any, SliceSpec]]] = {}
        for r, root in enumerate(self.roots):
            for where, item in [*((("root", r), s) for s in root.slices), *self.effects[r]]:
                if isinstance(item, SliceSpec) and item.tensor in alias_of and item.modulo is None:
                    found.setdefault((alias_of[item.tensor][0], item.axis), []).append(
                        (r, where, item))
        shapes = self._state()[1]
        added: set[tuple[int, Any, EditSpec, str]] = set()
        for (first, axis), items in sorted(found.items()):
            keys = alias_of[first]
            length = int(shapes[first][axis])
            per_key: dict[str, np.ndarray] = {}
            for r, _, sp in items:
                arr = per_key.setdefault(sp.tensor, np.full(length, -1, dtype=np.int64))
                st = Stream(sp.offset, sp.repeat, sp.tiles, sp.tile_stride, sp.positions)
                for u in range(self.roots[r].size):
                    arr[list(st.unit(u))] = (np.int64(r) << SHIFT) | u
            present = [k for k in keys if k in per_key]
            base = per_key[present[0]]
            node = Node(-1, "param", f"tied parameter {present[0]!r}")
            for k in present[1:]:
                other = per_key[k]
                if not np.array_equal(base >= 0, other >= 0):
                    self.block(roots_of(base) + roots_of(other),
                               f"{k!r} is the same tensor as {present[0]!r}, but they are sliced "
                               "at different positions")
                    continue
                self.couple(base, other, node)
            owner = present[0].rpartition(".")[0]
            for k in keys:
                if k in per_key:
                    continue
                module = k.rpartition(".")[0]
                for r, where, sp in items:
                    if sp.tensor != present[0]:
                        continue
                    self.effects[r].append((where, replace(sp, tensor=k)))
                    # the alias's module caches the same sizes as the sliced one's (once
                    # per call, however many of its tensors the call slices)
                    root = self.roots[r]
                    for w, e in [*((("root", r), e) for e in root.edits), *self.effects[r]]:
                        if isinstance(e, EditSpec) and e.module == owner \
                                and (r, w, e, module) not in added \
                                and _attr(self.model, module, e.attribute) == e.before:
                            added.add((r, w, e, module))
                            self.effects[r].append((w, replace(e, module=module)))

    def collapsed(self) -> tuple[set[str], set[str]]:
        """Grouped convs whose input channels all ended in one set of tied units, and those of
        this pass's whole-group convs (`whole_groups`) that did not help.

        Tying local position ``j`` of every block, together with the other ties of the class
        (attention heads reading blocks of the same channels, in NextViT), may leave the
        channels feeding a grouped conv a single unit, which no selection can remove. Whole conv
        groups may still be units there (`pruneplan.graph.rules.grouped`). Returns ``(convs to
        analyse with whole conv groups, whole-group convs whose channels still form one unit
        or are left out: back to local positions)``."""
        more: set[str] = set()
        failed: set[str] = set()
        for name, arr, since in self.grouped_inputs:
            arr = self.refresh(arr, since)
            if arr.size < 2 or (arr < 0).any():
                continue
            roots = arr >> SHIFT
            units = arr & MASK
            sets: set[tuple[int, int]] = set()
            for r in np.unique(roots):
                c = self.uf.find(int(r))
                places = self.uf.places(int(r), units[roots == r])
                part = self.uf.part.get(c)
                ids = places if part is None else part[places]
                sets.update((c, int(i)) for i in np.unique(ids))
            blocked = any(c in self.uf.blocked for c, _ in sets)
            if name in self.whole_groups:
                if blocked or len(sets) == 1:
                    failed.add(name)
            elif len(sets) == 1 and not blocked:
                # (a class left out for another reason stays so: the conv stays a root)
                more.add(name)
        return more, failed

    # ---- result --------------------------------------------------------------------------

    def groups(self) -> GroupList:
        """The unblocked classes as groups; every blocked root in ``left_out`` with its reason."""
        classes: dict[int, list[int]] = {}
        for r in range(len(self.roots)):
            classes.setdefault(self.uf.find(r), []).append(r)
        out = GroupList()
        left: list[tuple[int, LeftOut]] = []
        query_classes: dict[str, list[int]] = {}  # group name -> its roots (untied)
        for rep, members in sorted(classes.items()):
            notes = self.uf.notes.get(rep, [])
            reason = self.uf.blocked[rep][0] if rep in self.uf.blocked else None
            if reason is None:
                try:
                    blocks = None
                    if rep in self.uf.part:
                        members, blocks = self._blocks(rep, members, notes)
                    out.append(self.assemble(members, notes, blocks))
                    if blocks is None:
                        query_classes[out[-1].name] = members
                    continue
                except PlanningError as exc:
                    reason = str(exc)
            for r in members:
                others = [self.roots[o].name for o in members if o != r]
                why = reason
                if others:
                    shown = ", ".join(repr(o) for o in others[:3])
                    more = f" and {len(others) - 3} more" if len(others) > 3 else ""
                    why = f"{reason} (coupled with {shown}{more})"
                left.append((r, LeftOut(self.roots[r].name, why)))
        if self.derived:
            bad = self._derived(out)
            for gi in sorted(bad, reverse=True):
                g = out.pop(gi)
                for n in g.roots:
                    others = [o for o in g.roots if o != n]
                    more = f" and {len(others) - 3} more" if len(others) > 3 else ""
                    shown = ", ".join(repr(o) for o in others[:3])
                    why = f"{bad[gi]} (coupled with {shown}{more})" if others else bad[gi]
                    left.append((self.by_name[n], LeftOut(n, why)))
        for gi, why in sorted(self._overlapping(out).items(), reverse=True):
            g = out.pop(gi)
            left += [(self.by_name[n], LeftOut(n, why)) for n in g.roots]
        out.left_out = [lo for _, lo in sorted(left, key=lambda t: t[0])]
        out.left_out += [LeftOut(n, why) for n, why in self.refused.items()
                         if n not in self.by_name]
        for g in out:
            if g.kind == "query_groups" and g.name in query_classes:
                alt = self._query_heads(g, query_classes[g.name])
                if alt is not None:
                    out.alternatives.append(alt)
        return out

    def _overlapping(self, groups: list[Group]) -> dict[int, str]:
        """Groups (by index) owning a position of a tensor axis that another group owns too
        (under any key of a tied tensor), with the reason. Groups are disjoint on every
        (tensor, axis) by contract (DESIGN), which `couple_shared` and the couplings ensure; a
        group that would still share a position with another is left out rather than offered,
        since removing its units would cut the other's tensors."""
        alias, shapes = self._state()
        spans: dict[tuple[str, int], list[tuple[int, int, int]]] = {}
        for gi, g in enumerate(groups):
            seen: set[tuple[str, int]] = set()
            for sp in g.slices:
                key = (alias.get(sp.tensor, sp.tensor), sp.axis)
                if key in seen or key[0] not in shapes:
                    continue  # (another key of a tied tensor, sliced alike, by the same group)
                seen.add(key)
                spans.setdefault(key, []).extend((a, b, gi) for a, b in _slice_spans(sp, g.size))
        bad: dict[int, str] = {}
        for (tensor, axis), items in spans.items():
            if len({gi for _, _, gi in items}) < 2:
                continue
            items.sort()
            end, owner = -1, -1
            for a, b, gi in items:
                if a < end and gi != owner:
                    for x, y in ((gi, owner), (owner, gi)):
                        bad.setdefault(x, f"its units and those of group {groups[y].name!r} both "
                                          f"own position {a} of tensor {tensor!r} axis {axis}, "
                                          "so removing either would cut the other's channels")
                if b > end:
                    end, owner = b, gi
        return bad

    def _blocks(self, rep: int, members: list[int], notes: list[str]
                ) -> tuple[list[int], dict[int, Any]]:
        """For each root of a class whose units are tied: which of its units make each unit of
        the group, with the members reordered so that the group is named after its first.

        Tied evenly (every set of tied units holds as many units of each root: grouped convs,
        pixel shuffles), a root's entry is an array ``(group units, k)`` and the group's units
        are the sets in the order of their smallest place. Tied unevenly (branches concatenated
        and coupled to a full-width tensor, ``cat([conv1(x), conv2(x)]) + conv3(z)``: a set
        holds one channel of ``conv3`` and one of ``conv1`` *or* ``conv2``), a root's entry is
        a list holding, per group unit, the array of its units there (possibly empty); the
        group's units are then numbered by the first member that holds the same number of units
        in every set (``conv3``: unit ``u`` of the group is its channel ``u``), which names the
        group. A `PlanningError` when every unit is tied to every other."""
        by = ", ".join(dict.fromkeys(notes[-3:])) or "their layers"
        part = self.uf.part[rep]
        reps, inverse = np.unique(part, return_inverse=True)
        inverse = inverse.reshape(-1)
        n = len(reps)
        if n == 1:
            raise PlanningError(f"all of its units are tied together (by {by}), so none can be "
                                "removed on its own")
        bids = {r: inverse[self.uf.places(r)] for r in members}
        counts = {r: np.bincount(bids[r], minlength=n) for r in members}
        if all(c.min() == c.max() for c in counts.values()):
            return members, {r: np.argsort(bids[r], kind="stable").reshape(n, -1)
                             for r in members}
        # uneven: number the sets by the first root holding as many of its units in each
        lead = next((r for r in members if counts[r].min() == counts[r].max()), None)
        if lead is None:
            order = np.arange(n)
        else:
            first_unit = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
            np.minimum.at(first_unit, bids[lead], np.arange(len(bids[lead])))
            order = np.argsort(first_unit, kind="stable")
            members = [lead] + [r for r in members if r != lead]
        out: dict[int, Any] = {}
        for r in members:
            srt = np.argsort(bids[r], kind="stable")
            ragged = np.split(srt, np.cumsum(counts[r])[:-1])
            out[r] = [ragged[i] for i in order]
        return members, out

    def assemble(self, members: list[int], notes: list[str],
                 blocks: dict[int, Any] | None = None) -> Group:
        """One group from the roots of a class. ``blocks`` (from `_blocks`) lists, per root,
        the units that make each unit of the group when units are tied together; a
        `PlanningError` says why such a class cannot be a group after all."""
        first = self.roots[members[0]]
        size = first.size if blocks is None else len(blocks[members[0]])
        # units may own different amounts: parts of a split, or units tied unevenly
        uneven = blocks is not None and not isinstance(blocks[members[0]], np.ndarray)
        parted = uneven or self.is_parted(members[0])
        slices: dict[tuple[str, int], dict[Any, list[tuple[int, SliceSpec]]]] = {}
        edits: dict[tuple[str, str], dict[Any, list[tuple[int, EditSpec]]]] = {}
        drops: dict[str, DropoutSpec] = {}
        for r in members:
            root = self.roots[r]
            items = [(("root", r), s) for s in root.slices + root.edits] + self.effects[r]
            for where, item in items:
                if isinstance(item, SliceSpec):
                    slices.setdefault((item.tensor, item.axis), {}).setdefault(
                        where, []).append((r, item))
                elif isinstance(item, EditSpec):
                    edits.setdefault((item.module, item.attribute), {}).setdefault(
                        where, []).append((r, item))
                else:
                    drops.setdefault(item.module, item)
        final_slices = []
        for key, by_node in sorted(slices.items()):
            if blocks is None:
                merged = {_merge_slices([sp for _, sp in specs], size) for specs in by_node.values()}
            else:
                merged = {_coarse_slice([(sp, blocks[r]) for r, sp in specs], parted)
                          for specs in by_node.values()}
            if len(merged) > 1:
                raise UnsupportedOperationError(
                    f"tensor {key[0]!r} axis {key[1]} is reached by the units of {first.name!r} "
                    "in different layouts (a module used more than once?)")
            final_slices.append(merged.pop())
        final_edits = []
        for (mod, attr), by_node in sorted(edits.items()):
            if blocks is None:
                merged_e = {_summed(mod, attr, specs, size) for specs in by_node.values()}
            else:
                merged_e = {_edit_of(mod, attr, specs[0][1].before,
                                     sum(self._coarse_per(where, r, e, blocks, parted)
                                         for r, e in specs))
                            for where, specs in by_node.items()}
            if len(merged_e) > 1:
                raise UnsupportedOperationError(
                    f"{mod}.{attr} shrinks by different amounts per unit of {first.name!r} "
                    "(a module used more than once?)")
            final_edits.append(merged_e.pop())
        heads = [self.heads[r] for r in members if r in self.heads]
        kind = "channels" if not heads else "query_groups" if max(heads) > 1 else "heads"
        root_units: tuple[tuple[str, tuple[tuple[int, ...], ...]], ...] = ()
        if uneven:
            assert blocks is not None
            root_units = tuple(
                (self.roots[r].name, tuple(tuple(int(u) for u in b) for b in blocks[r]))
                for r in members
                if not all(len(b) == 1 and int(b[0]) == i for i, b in enumerate(blocks[r])))
        return Group(
            kind=kind,
            name=first.name,
            size=size,
            roots=tuple(self.roots[r].name for r in members),
            slices=tuple(final_slices),
            edits=tuple(final_edits),
            dropouts=tuple(drops[k] for k in sorted(drops)),
            notes=tuple(dict.fromkeys(f"coupled by {n}" for n in notes)),
            root_units=root_units,
        )

    def _query_heads(self, qg: Group, members: list[int]) -> Group | None:
        """The query heads of a grouped-query attention group as units of their own: an
        alternative to ``qg`` (kind ``"heads"``, ``blocks`` = its key/value heads), or ``None``.

        Only the roots whose units gather several query heads (``self.heads[r] > 1``) take
        part; the key/value projections are untouched. Unit ``u`` of ``qg`` owns, in every
        tensor of those roots, one contiguous run of positions; query head ``u * rep + j``
        owns the ``j``-th of ``rep`` equal parts of it (the heads keep their order from the
        query projection to the output projection, as a split by ``view`` and a merge by the
        inverse ``view`` / ``reshape`` keep it). Anything else (a fused q/k/v root, tiled or
        scattered positions, a tensor shared with a key/value root, an attribute that does
        not shrink per query head) offers no alternative.
        """
        qroots = [r for r in members if self.heads.get(r, 1) > 1]
        others = [r for r in members if self.heads.get(r, 1) <= 1]
        if not qroots or not others or qg.size < 2:
            return None
        rep = self.heads[qroots[0]]
        if any(self.heads[r] != rep or self.roots[r].size != qg.size for r in qroots):
            return None
        kv_axes = {(it.tensor, it.axis) for r in others
                   for it in [*self.roots[r].slices, *(i for _, i in self.effects[r])]
                   if isinstance(it, SliceSpec)}
        size = qg.size * rep
        slices: dict[tuple[str, int], set[SliceSpec]] = {}
        edits: dict[tuple[str, str], set[EditSpec]] = {}
        drops: dict[str, DropoutSpec] = {}
        for r in qroots:
            root = self.roots[r]
            for item in [*root.slices, *root.edits, *(i for _, i in self.effects[r])]:
                if isinstance(item, SliceSpec):
                    if (item.tensor, item.axis) in kv_axes or item.positions is not None \
                            or item.modulo is not None or item.tiles != 1 or item.repeat % rep:
                        return None
                    part = item.repeat // rep
                    slices.setdefault((item.tensor, item.axis), set()).add(
                        SliceSpec(item.tensor, item.axis, offset=item.offset, repeat=part))
                elif isinstance(item, EditSpec):
                    if item.per_unit % rep or item.amounts is not None:
                        return None
                    edits.setdefault((item.module, item.attribute), set()).add(
                        EditSpec(item.module, item.attribute, item.before, item.per_unit // rep))
                else:
                    drops.setdefault(item.module, item)
        if not slices or any(len(v) > 1 for v in [*slices.values(), *edits.values()]):
            return None
        prefix = [r.rsplit(".", 1)[0] if "." in r else "" for r in qg.roots]
        name = (prefix[0] if len(set(prefix)) == 1 and prefix[0] else qg.name) + ".heads"
        if name in self.by_name:
            return None
        return Group(
            kind="heads",
            name=name,
            size=size,
            roots=tuple(self.roots[r].name for r in qroots),
            slices=tuple(next(iter(slices[k])) for k in sorted(slices)),
            edits=tuple(next(iter(edits[k])) for k in sorted(edits)),
            dropouts=tuple(drops[k] for k in sorted(drops)),
            notes=(f"the query heads of {qg.name!r}: {rep} per key/value head",),
            blocks=qg.size,
            alternative_to=qg.name,
        )

    def _coarse_per(self, where: Any, r: int, e: EditSpec, blocks: dict[int, Any],
                    parted: bool) -> np.ndarray:
        """How much ``e`` shrinks per unit of the group, each a set of root units (``blocks``:
        an array ``(group units, k)``, or one array of root units per group unit when tied
        unevenly); unequal amounts only for a parted group (split parts, uneven ties), else a
        `PlanningError`."""
        blk = blocks[r]
        counts = self.partial.get((where, r)) if isinstance(where, int) else None
        if e.amounts is not None:
            held = _block_sums(np.asarray(e.amounts, dtype=np.int64), blk)
        elif counts is None:
            held = _block_sums(np.full(self.roots[r].size, e.per_unit, dtype=np.int64), blk)
        else:
            # a partial stream: e.per_unit is per position of its widest unit
            widest = int(counts.max())
            if widest == 0:  # none of this root's units reach that call
                return np.zeros(len(blk), dtype=np.int64)
            held = _block_sums(counts * e.per_unit, blk)
            if (held % widest).any():
                raise PlanningError(f"{e.module}.{e.attribute} would shrink by different "
                                    "amounts for different units")
            held = held // widest
        if not parted and len(set(held.tolist())) != 1:
            raise PlanningError(f"{e.module}.{e.attribute} would shrink by different amounts "
                                "for different units")
        return held


def _block_sums(values: np.ndarray, blk: Any) -> np.ndarray:
    """Per group unit, the sum of ``values`` over the root units making it (``blk``: an array
    ``(group units, k)`` or a list of arrays, one per group unit)."""
    if isinstance(blk, np.ndarray):
        return values[blk].sum(axis=1).astype(np.int64)
    return np.array([int(values[b].sum()) for b in blk], dtype=np.int64)


def _slice_spans(sp: SliceSpec, size: int) -> list[tuple[int, int]]:
    """The positions the ``size`` units of ``sp`` own, as half-open ranges (``modulo`` applied)."""
    if sp.positions is None:  # tile t: offset + t * tile_stride, size * repeat long
        out = [(sp.offset + t * sp.tile_stride, sp.offset + t * sp.tile_stride + size * sp.repeat)
               for t in range(sp.tiles)]
    else:
        pos = sorted({p for row in sp.positions for p in row})
        out = []
        for p in pos:
            if out and out[-1][1] == p:
                out[-1] = (out[-1][0], p + 1)
            else:
                out.append((p, p + 1))
    m = sp.modulo
    if m is None:
        return out
    wrapped: list[tuple[int, int]] = []
    for a, b in out:
        if b - a >= m:
            wrapped.append((0, m))
            continue
        x = a % m
        y = x + b - a
        wrapped += [(x, y)] if y <= m else [(x, m), (0, y - m)]
    return wrapped


def _unit_positions(sp: SliceSpec, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every position ``sp`` gives the units of a root of ``size`` units, and the unit at each
    (``modulo`` not applied)."""
    if sp.positions is None:  # affine: unit u at offset + u * repeat + r + t * tile_stride
        within = (np.arange(sp.tiles)[:, None] * sp.tile_stride
                  + np.arange(sp.repeat)[None, :]).reshape(-1)
        pos = (sp.offset + np.arange(size)[:, None] * sp.repeat + within[None, :]).reshape(-1)
        return pos.astype(np.int64), np.repeat(np.arange(size), len(within))
    pos = np.array([p for row in sp.positions for p in row], dtype=np.int64)
    return pos, np.repeat(np.arange(len(sp.positions)), [len(row) for row in sp.positions])


def _coarse_slice(specs: list[tuple[SliceSpec, np.ndarray]], parted: bool = False) -> SliceSpec:
    """The slice of one tensor axis at one call when each group unit is a set of root units
    (each spec comes with its root's ``(group units, k)`` blocks); in a parted group (split
    parts) a unit may hold fewer positions than another, or none."""
    first = specs[0][0]
    parts = [(Stream(s.offset, s.repeat, s.tiles, s.tile_stride, s.positions), blk)
             for s, blk in specs]
    n = len(specs[0][1])
    rows = [sorted(p for st, blk in parts for u in blk[i].tolist() for p in st.unit(u))
            for i in range(n)]
    if parted and any(rows):
        return _rows_stream(rows).slice(first.tensor, first.axis, first.modulo)
    if len({len(row) for row in rows}) != 1 or not rows[0]:
        raise PlanningError(f"tensor {first.tensor!r} axis {first.axis}: its tied units hold "
                            "different numbers of positions there")
    return affine_stream(np.array(rows)).slice(first.tensor, first.axis, first.modulo)


def _attr(model: nn.Module, module: str, attribute: str) -> Any:
    """``model.<module>.<attribute>`` (``None`` when there is no such module or attribute)."""
    try:
        return getattr(model.get_submodule(module), attribute, None)
    except AttributeError:
        return None


def _info_roots(v: Any) -> set[int]:
    if isinstance(v, Lab):
        return set(v.roots)
    if isinstance(v, Sizes):
        return set(v.lab.roots)
    if isinstance(v, list):
        out: set[int] = set()
        for x in v:
            out |= _info_roots(x)
        return out
    return set()


def _remap(arr: np.ndarray, members: frozenset[int], mapping: np.ndarray) -> np.ndarray:
    hit = (arr >= 0) & np.isin(arr >> SHIFT, list(members))
    if not hit.any():
        return arr
    out = arr.copy()
    v = arr[hit]
    out[hit] = ((v >> SHIFT) << SHIFT) | mapping[v & MASK]
    return out


def _remap_info(v: Any, members: frozenset[int], mapping: np.ndarray) -> Any:
    if isinstance(v, Lab):
        return Lab(v.axes, _remap(v.arr, members, mapping))
    if isinstance(v, Sizes):
        return Sizes(_remap_info(v.lab, members, mapping), v.ndim)
    if isinstance(v, list):
        return [_remap_info(x, members, mapping) for x in v]
    return v


def _rows_stream(rows: list[list[int]]) -> Stream:
    """The `Stream` giving unit ``u`` the sorted positions ``rows[u]``: affine when they fit,
    explicit when units hold different numbers of positions (parts of a split)."""
    rows = [sorted(r) for r in rows]
    if len({len(r) for r in rows}) == 1 and rows[0]:
        return affine_stream(np.array(rows))
    return Stream(positions=tuple(tuple(r) for r in rows))


def _regroup_slice(s: SliceSpec, order: np.ndarray, new: int, old: int) -> SliceSpec:
    """The slice of ``s`` once old units ``order`` (sorted by new unit) are gathered by ``new``."""
    st = Stream(s.offset, s.repeat, s.tiles, s.tile_stride, s.positions)
    k = old // new
    rows = [[p for u in order[i * k:(i + 1) * k] for p in st.unit(int(u))] for i in range(new)]
    return _rows_stream(rows).slice(s.tensor, s.axis, s.modulo)


def _regroup_edit(e: EditSpec, k: int, mapping: np.ndarray, new: int) -> EditSpec:
    if e.amounts is None:
        return EditSpec(e.module, e.attribute, e.before, e.per_unit * k)
    amounts = np.bincount(mapping, weights=np.asarray(e.amounts), minlength=new).astype(np.int64)
    return _edit_of(e.module, e.attribute, e.before, amounts)


def _edit_of(module: str, attribute: str, before: int, amounts: np.ndarray) -> EditSpec:
    """An `EditSpec` dropping by ``amounts[u]`` per unit (``per_unit`` when all are equal)."""
    values = tuple(int(a) for a in amounts)
    if len(set(values)) == 1:
        return EditSpec(module, attribute, before, values[0])
    return EditSpec(module, attribute, before, max(values), values)


def _summed(module: str, attribute: str, specs: list[tuple[int, EditSpec]], size: int) -> EditSpec:
    """The edits of one call to one attribute by the roots of a group (units not tied): the
    drops of every root's unit ``u`` add up."""
    total = np.zeros(size, dtype=np.int64)
    for _, e in specs:
        total += np.asarray(e.amounts, dtype=np.int64) if e.amounts is not None else e.per_unit
    return _edit_of(module, attribute, specs[0][1].before, total)


def _merge_slices(specs: list[SliceSpec], size: int) -> SliceSpec:
    if len(specs) == 1:
        return specs[0]
    first = specs[0]
    streams = [Stream(s.offset, s.repeat, s.tiles, s.tile_stride, s.positions) for s in specs]
    rows = [[p for st in streams for p in st.unit(u)] for u in range(size)]
    return _rows_stream(rows).slice(first.tensor, first.axis, first.modulo)



#: most analyses of one graph: each further pass turns the grouped convs found collapsed in
#: the previous one to whole conv groups (`Engine.collapsed`)
_WHOLE_GROUP_PASSES = 4


def analyze(model: nn.Module, graph: Graph, *, include_output: bool = False,
            strict: bool = True) -> GroupList:
    """Groups of the traced ``graph`` (with the roots left out and why); raise on unsupported
    operations when ``strict``."""
    whole: frozenset[str] = frozenset()
    tried = {whole}
    for _ in range(_WHOLE_GROUP_PASSES):
        a = Engine(model, graph, include_output, whole)
        a.run()
        a.finish()
        more, failed = a.collapsed()
        if failed:
            log.info("grouped convs %s: whole conv groups leave their channels one unit too; "
                     "back to local positions", ", ".join(sorted(failed)))
        if more:
            log.info("grouped convs %s: their local positions tie every channel feeding them "
                     "together; analysing again with whole conv groups as units there",
                     ", ".join(sorted(more)))
        nxt = (whole | more) - failed
        if nxt in tried:
            if nxt != whole:  # back to the pass analysed with those convs before
                a = Engine(model, graph, include_output, nxt)
                a.run()
                a.finish()
            break
        tried.add(nxt)
        whole = nxt
    if a.errors:
        msg, _ = a.errors[0]
        more = f" (and {len(a.errors) - 1} more)" if len(a.errors) > 1 else ""
        if strict:
            raise UnsupportedOperationError(
                f"{msg}: cannot tell which tensors follow the pruned channels{more}; teach "
                "pruneplan with pruneplan.register_module_rule / register_function_rule, or pass "
                "on_unsupported='skip' to leave those roots out")
        for m, _ in a.errors:
            log.warning("skipping groups: %s", m)
    return a.groups()
