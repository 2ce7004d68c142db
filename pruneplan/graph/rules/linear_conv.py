"""Linear, convolution, transposed convolution and embedding: roots on their output, consumers on
their input; a depthwise convolution carries its input channels on (with its multiplier)."""

from __future__ import annotations

import numpy as np
from torch import nn

from pruneplan.graph._labels import Lab
from pruneplan.graph.rules.base import Call, Rule, builtin
from pruneplan.graph.rules.layers import (
    CONV_TRANSPOSE_TYPES,
    CONV_TYPES,
    consumer_slices,
    is_depthwise,
    root_slices,
)

__all__ = ["ConvRule", "EmbeddingRule", "LinearRule", "consume"]


def consume(call: Call, lab: Lab, axis: int) -> Lab | None:
    """The called module reads the labels on ``axis`` (its input width): its input-side slices
    and edits become the units' own; returns the output labels of a depthwise conv."""
    if lab.axes != (axis,):
        call.block(lab, f"{call.where} reads them on other axes")
        return None
    m, name = call.module, call.name
    call.per_root(lab, lambda st: consumer_slices(name, m, st)[:2])
    if is_depthwise(m):
        return Lab((1,), np.repeat(lab.arr, m.out_channels // m.in_channels))
    return None


class LinearRule(Rule):
    """``nn.Linear``: a root on the last axis of its output; consumes the last input axis."""

    def propagate(self, call: Call) -> Lab | None:
        m, name = call.module, call.name
        out = call.root(-1, lambda: root_slices(name, m))
        x = call.x
        if isinstance(x, Lab):
            last = len(call.xmeta) - 1
            if last in x.axes:
                consume(call, x, last)
                return out
            if out is not None:
                call.block(out, f"{call.where} is applied along another labelled axis")
            return x
        return out


class ConvRule(Rule):
    """Conv / ConvTranspose: a root on axis 1 when ``groups == 1``; consumes input axis 1; a
    depthwise conv's output follows its input channels."""

    def propagate(self, call: Call) -> Lab | None:
        m, name = call.module, call.name
        out = call.root(1, lambda: root_slices(name, m)) if m.groups == 1 else None
        if isinstance(call.x, Lab):
            dw = consume(call, call.x, 1)
            if is_depthwise(m):
                return dw
        return out


class EmbeddingRule(Rule):
    """``nn.Embedding``: a root on the last axis (the embedding dimension)."""

    def propagate(self, call: Call) -> Lab | None:
        m, name = call.module, call.name
        if isinstance(call.x, Lab):
            call.error("receives labelled indices", call.x)
        return call.root(-1, lambda: root_slices(name, m))


builtin([nn.Linear], rule=LinearRule())
builtin([*CONV_TYPES, *CONV_TRANSPOSE_TYPES], rule=ConvRule())
builtin([nn.Embedding], rule=EmbeddingRule())
