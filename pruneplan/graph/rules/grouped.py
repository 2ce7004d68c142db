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
(``groups`` drops, the group width stays) ties the producer, the conv and everything after it
into units of one conv group, coarser than most of these layers need.

**Whole conv groups, where local positions leave one unit.** The channels feeding a grouped
conv may carry other ties too: in NextViT (timm ``nextvit_*``) the same channels feed an
attention whose fixed ``head_dim`` ties each 32-channel block to one head, while the grouped
conv (32 channels per group) ties position ``j`` of every block; together every channel is
tied to every other, and the group's single unit cannot be removed. Discovery then analyses
the graph again with such a conv's *whole conv groups* as units (`Engine.collapsed` finds
them; `whole_groups` is the rule): the ``L`` channels of input block ``k`` are tied into one
unit, the conv's output block ``k`` (``M`` channels) carries that unit on (the conv is no root
of its own), its weight loses rows ``k M .. (k + 1) M - 1`` (and its bias those entries), and
``in_channels``, ``out_channels`` and ``groups`` drop by ``L``, ``M`` and 1 per unit. Here a
conv group of 32 channels is one attention head, and the stream loses whole heads. Where whole
groups leave the channels one unit too (a conv block straddling two heads), the conv goes
back to local positions and stays a root of its own.

Channels tied this way may also be gathered into heads afterwards (``view(B, N, heads,
head_dim)`` of the same channels, as the values of an attention or EfficientViT's multi-scale
attention): a head gathering tied channels is tied to the heads holding their fellows
(`Engine.regroup`), so a unit may be several heads.

Any subset of the units offered this way is valid: what the engine assembles from the ties
(`pruneplan.graph.rules.Call.couple` on positions holding different units) is a group whose
unit is the whole set of tied channels. Depthwise convolutions (``groups == C_in``) are not
grouped convolutions here: their outputs follow their inputs (`linear_conv`).
"""

from __future__ import annotations

import numpy as np
from torch import nn

from pruneplan.graph._labels import MASK, SHIFT, Lab, roots_of
from pruneplan.graph.rules.base import Call
from pruneplan.graph.spec import EditSpec, SliceSpec

__all__ = ["grouped_root", "is_grouped", "tie_blocks", "whole_groups"]


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


def whole_groups(call: Call, m: nn.Module, name: str, x: Lab) -> Lab:
    """The grouped conv ``m`` at ``name`` reading the labels ``x`` (on its channel axis alone)
    with whole conv groups as units (see the module doc): ties the channels of each input
    block, owns the output rows of each block and shrinks ``in_channels``, ``out_channels`` and
    ``groups``. Returns the output labels (block ``k`` carries the units of input block ``k``)."""
    g = m.groups
    width, out_width = m.in_channels // g, m.out_channels // g
    call.tied_conv_blocks(name, x.arr)
    rows = x.arr.reshape(g, width)
    for j in range(1, width):
        call.couple(rows[:, 0], rows[:, j], tie=True)
    # output position i of block k carries input channel i mod L of block k (all of block k
    # is one unit, so which channel label a position holds only sets how positions are shared)
    out = rows[:, np.arange(out_width) % width].reshape(-1)
    p = f"{name}." if name else ""
    call.own(p + "weight", 0, out)
    if getattr(m, "bias", None) is not None:
        call.own(p + "bias", 0, out)
    # the edits say per root unit how much it takes off (a unit is one channel of a block, the
    # block is the set of tied units): in one call only one layout of positions per root can
    # be partial, and ``groups`` counts one per block
    for attribute, before, labels in (("in_channels", m.in_channels, x.arr),
                                      ("out_channels", m.out_channels, out),
                                      ("groups", g, rows[:, 0])):
        for r in roots_of(labels):
            units = labels[(labels >= 0) & ((labels >> SHIFT) == r)] & MASK
            amounts = np.bincount(units, minlength=call.root_size(r))
            call.edit_root(r, attribute, before, 1, name, tuple(int(a) for a in amounts))
    return Lab((1,), out)
