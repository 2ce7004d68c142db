"""Channel labels: which unit of which root sits at each position of a tensor's channel axes.

A label is an int64 ``root << 32 | unit`` (``-1`` for a position no prunable root owns). A
`Lab` attaches a label array to one or more axes of a tensor; the analysis pushes labels through
the graph and reads them at every layer that owns a tensor slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from pruneplan.graph._streams import Stream

__all__ = ["SHIFT", "Dim", "Lab", "PView", "Sizes", "affine_stream", "canon", "make_labels",
           "reshape_groups", "roots_of", "unit_positions"]

SHIFT = 32
MASK = (1 << SHIFT) - 1


@dataclass(frozen=True)
class Lab:
    """Labels on tensor axes ``axes`` (strictly increasing); ``arr`` has one dim per axis."""

    axes: tuple[int, ...]
    arr: np.ndarray

    @cached_property
    def roots(self) -> list[int]:
        """Root indices present (computed once)."""
        return roots_of(self.arr)

    def shifted(self, by: int) -> Lab:
        """The same labels with every axis moved by ``by`` (leading dims added/removed)."""
        return Lab(tuple(a + by for a in self.axes), self.arr)


@dataclass(frozen=True)
class PView:
    """A tensor that is a view of the parameter/buffer ``key``: value dim -> parameter dim."""

    key: str
    dims: tuple[int | None, ...]


@dataclass(frozen=True)
class Dim:
    """A Python int (fx graphs only) that is the width of labelled channels of ``roots``.

    ``arr`` holds the labels along that axis (1-D, ``None`` when they lay on several axes),
    as they were after ``since`` regroups of units; ``div`` is a literal the width was divided
    by (``C // num_heads``: 1 for the width itself), ``mul`` one it was multiplied by
    (``B * num_heads``, ``head_dim * num_heads``).
    """

    roots: tuple[int, ...]
    arr: np.ndarray | None = field(default=None, compare=False, repr=False)
    since: int = field(default=0, compare=False)
    div: int = 1
    mul: int = 1


@dataclass(frozen=True)
class Sizes:
    """``x.shape`` / ``x.size()`` of a labelled tensor (fx graphs only)."""

    lab: Lab
    ndim: int


def make_labels(root: int, size: int) -> np.ndarray:
    """The labels of a fresh root: unit ``u`` at position ``u``."""
    return (np.int64(root) << SHIFT) | np.arange(size, dtype=np.int64)


def roots_of(arr: np.ndarray) -> list[int]:
    """Root indices present in a label array."""
    lab = arr[arr >= 0]
    if lab.size == 0:
        return []
    return [int(r) for r in np.unique(lab >> SHIFT)]


def canon(axes: tuple[int, ...], arr: np.ndarray) -> Lab:
    """A `Lab` with its axes sorted (transposing the array to match)."""
    order = sorted(range(len(axes)), key=lambda i: axes[i])
    if order != list(range(len(axes))):
        arr = np.transpose(arr, order)
    return Lab(tuple(axes[i] for i in order), arr)


def unit_positions(arr: np.ndarray, root: int, size: int) -> np.ndarray | None:
    """Positions of each unit of ``root`` in a 1-D label array, as a ``(size, k)`` array.

    ``None`` when some unit is missing or units occupy different numbers of positions.
    """
    sel = np.flatnonzero((arr >> SHIFT) == root)
    sel = sel[arr[sel] >= 0]
    if sel.size == 0 or sel.size % size:
        return None
    units = arr[sel] & MASK
    counts = np.bincount(units, minlength=size)
    if counts.size != size or counts.min() != counts.max():
        return None
    order = np.argsort(units, kind="stable")
    return sel[order].reshape(size, -1)


def affine_stream(pos: np.ndarray) -> Stream:
    """The `Stream` of a ``(units, k)`` position array: affine when it fits, else explicit."""
    size, k = pos.shape
    first = pos[0]
    r = 1
    while r < k and first[r] == first[0] + r:
        r += 1
    if k % r == 0:
        t = k // r
        s = int(first[r] - first[0]) if t > 1 else 0
        off = int(first[0])
        block = (np.arange(t)[:, None] * s + np.arange(r)[None, :]).reshape(-1)
        expected = off + np.arange(size)[:, None] * r + block[None, :]
        if (t == 1 or s > 0) and np.array_equal(pos, expected):
            return Stream(offset=off, repeat=r, tiles=t, tile_stride=s)
    return Stream(positions=tuple(tuple(int(p) for p in row) for row in np.sort(pos, axis=1)))


def reshape_groups(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Pair consecutive dims of two shapes of the same size into groups with equal products.

    ``(2, 3, 4) -> (6, 4)`` gives ``[([0, 1], [0]), ([2], [1])]``. ``None`` if impossible.
    """
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        gi, gj, pa, pb = [i], [j], a[i], b[j]
        i += 1
        j += 1
        while pa != pb:
            if pa < pb:
                if i >= len(a):
                    return None
                gi.append(i)
                pa *= a[i]
                i += 1
            else:
                if j >= len(b):
                    return None
                gj.append(j)
                pb *= b[j]
                j += 1
        groups.append((gi, gj))
    if any(a[k] != 1 for k in range(i, len(a))) or any(b[k] != 1 for k in range(j, len(b))):
        return None
    groups += [([k], []) for k in range(i, len(a))]
    groups += [([], [k]) for k in range(j, len(b))]
    return groups
