"""Grouped convolutions (``1 < groups < in_channels``): units that keep every conv group equal.

A grouped convolution splits its ``C_in`` input channels into ``g`` blocks of ``L = C_in / g``
and its ``C_out`` output channels into ``g`` blocks of ``M = C_out / g``; output block ``k``
reads input block ``k`` only, and every block has the same width. Removing channels keeps
the convolution valid only when every block loses the same *local* positions. So:

- **input side**: the channels at local position ``j`` of every block (``j, j + L, ...,
  j + (g - 1) L``) are tied together: one unit of the group feeding the conv is one local
  position in every block (``g`` channels of the producing layer). ``groups`` stays; the
  group width ``L`` shrinks by one per unit; the conv's weight loses column ``j`` (its input
  axis holds local positions: the slice has ``modulo = L``).
- **output side**: the grouped conv is a root of its own, whose unit is one local output
  position ``j`` of every block (output channels ``j, j + M, ...``; ``out_channels`` drops by
  ``g`` per unit).

This is the default because it keeps the conv's structure (``groups``) and lets the conv's
inputs and outputs be pruned independently, at any rate. Pruning whole conv groups instead
(``groups`` drops, the group width stays) would tie the producer, the conv and everything
after it into units of one conv group, coarser than most of these layers need.

Any subset of the units offered this way is valid: what the engine assembles from the ties
(`pruneplan.graph.rules.Call.couple` on positions holding different units) is a group whose
unit is the whole set of tied channels. Depthwise convolutions (``groups == C_in``) are not
grouped convolutions here: their outputs follow their inputs (`linear_conv`).
"""

from __future__ import annotations

import numpy as np
from torch import nn

from pruneplan.graph._labels import Lab
from pruneplan.graph.rules.base import Call
from pruneplan.graph.spec import EditSpec, SliceSpec

__all__ = ["grouped_root", "is_grouped", "tie_blocks"]


def is_grouped(m: nn.Module) -> bool:
    """A convolution with ``groups > 1`` that is not depthwise."""
    groups = getattr(m, "groups", 1)
    return groups > 1 and groups != getattr(m, "in_channels", groups)


def tie_blocks(call: Call, arr: np.ndarray, groups: int) -> None:
    """Tie position ``j`` of every one of ``groups`` equal blocks of the 1-D labels ``arr``."""
    rows = arr.reshape(groups, -1)
    for k in range(1, groups):
        call.couple(rows[0], rows[k], tie=True)


def grouped_root(call: Call, m: nn.Module, name: str) -> Lab | None:
    """The grouped conv ``m`` at ``name`` as a root: unit ``j`` is local output position ``j``
    of every conv group (see the module doc). Returns its output labels."""

    def spec() -> tuple[int, list[SliceSpec], list[EditSpec]]:
        p = f"{name}." if name else ""
        transposed = getattr(m, "transposed", False)
        slices = [SliceSpec(p + "weight", 1 if transposed else 0)]
        if getattr(m, "bias", None) is not None:
            slices.append(SliceSpec(p + "bias", 0))
        return m.out_channels, slices, [EditSpec(name, "out_channels", m.out_channels)]

    if getattr(m, "transposed", False):
        return None
    out = call.root(1, spec, name, m)
    if out is not None:
        tie_blocks(call, out.arr, m.groups)
    return out
