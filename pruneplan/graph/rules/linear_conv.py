"""Linear, convolution, transposed convolution and embedding: roots on their output, consumers on
their input; a depthwise convolution carries its input channels on (with its multiplier).

``F.linear`` / ``F.conv2d`` & co. called with a layer's own weight and bias (a subclass with its
own ``forward``, such as timm's ``Linear``, traced through) read as that layer; called with
other tensors they block the roots whose channels reach them.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from pruneplan.graph._ir import Ref
from pruneplan.graph._labels import Lab, PView
from pruneplan.graph.rules.base import Call, FunctionRule, Rule, builtin
from pruneplan.graph.rules.blocking import BlockRule
from pruneplan.graph.rules.grouped import grouped_root, is_grouped, tie_blocks
from pruneplan.graph.rules.layers import (
    CONV_TRANSPOSE_TYPES,
    CONV_TYPES,
    consumer_slices,
    is_depthwise,
    root_slices,
)

__all__ = ["ConvRule", "EmbeddingRule", "FunctionalLayerRule", "LinearRule", "consume"]


def consume(call: Call, lab: Lab, axis: int, m: nn.Module | None = None,
            name: str | None = None) -> Lab | None:
    """Module ``m`` at ``name`` (default: the called one) reads the labels on ``axis`` (its
    input width): its input-side slices and edits become the units' own; returns the output
    labels of a depthwise conv."""
    if lab.axes != (axis,):
        call.block(lab, f"{call.where} reads them on other axes")
        return None
    if m is None:
        m, name = call.module, call.name
    call.per_root(lab, lambda st: consumer_slices(name, m, st)[:2])
    if is_depthwise(m):
        return Lab((1,), np.repeat(lab.arr, m.out_channels // m.in_channels))
    return None


def _linear(call: Call, m: nn.Module, name: str) -> Lab | None:
    out = call.root(-1, lambda: root_slices(name, m), name, m)
    x = call.x
    if isinstance(x, Lab):
        last = len(call.xmeta) - 1
        if last in x.axes:
            consume(call, x, last, m, name)
            return out
        if out is not None:
            call.block(out, f"{call.where} is applied along another labelled axis")
        return x
    return out


def _conv(call: Call, m: nn.Module, name: str) -> Lab | None:
    if m.groups == 1:
        out = call.root(1, lambda: root_slices(name, m), name, m)
    else:
        out = grouped_root(call, m, name) if is_grouped(m) else None
    if isinstance(call.x, Lab):
        dw = consume(call, call.x, 1, m, name)
        if is_depthwise(m):
            return dw
        if is_grouped(m) and call.x.axes == (1,):
            tie_blocks(call, call.x.arr, m.groups)
    return out


class LinearRule(Rule):
    """``nn.Linear``: a root on the last axis of its output; consumes the last input axis."""

    def propagate(self, call: Call) -> Lab | None:
        return _linear(call, call.module, call.name)


class ConvRule(Rule):
    """Conv / ConvTranspose: a root on axis 1 when ``groups == 1``; consumes input axis 1; a
    depthwise conv's output follows its input channels; a grouped conv ties local positions
    across its groups on both sides (`grouped`)."""

    def propagate(self, call: Call) -> Lab | None:
        return _conv(call, call.module, call.name)


class EmbeddingRule(Rule):
    """``nn.Embedding``: a root on the last axis (the embedding dimension)."""

    def propagate(self, call: Call) -> Lab | None:
        m, name = call.module, call.name
        if isinstance(call.x, Lab):
            call.error("receives labelled indices", call.x)
        return call.root(-1, lambda: root_slices(name, m))


_KINDS = {"linear": nn.Linear, "conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}


class FunctionalLayerRule(FunctionRule):
    """``F.linear`` / ``F.conv1d..3d`` with the weight (and bias) of one ``nn.Linear`` /
    ``nn.ConvNd`` of the model: exactly that layer (root and consumer); otherwise blocking."""

    def propagate(self, call: Call) -> Lab | None:
        owner = self._owner(call)
        if owner is None:
            return _BLOCK.propagate(call)
        m, name = owner
        return _linear(call, m, name) if call.name == "linear" else _conv(call, m, name)

    def _owner(self, call: Call) -> tuple[nn.Module, str] | None:
        weight = call.read(call.arg(1, "weight"))
        if not isinstance(weight, PView) or weight.dims != tuple(range(len(weight.dims))):
            return None
        path, _, leaf = weight.key.rpartition(".")
        try:
            m = call.model.get_submodule(path)
        except AttributeError:
            return None
        if leaf != "weight" or not isinstance(m, _KINDS[call.name]):
            return None
        bias = call.arg(2, "bias")
        want = f"{path}.bias" if path else "bias"
        if isinstance(bias, Ref):
            info = call.read(bias)
            if not isinstance(info, PView) or info.key != want:
                return None
        elif getattr(m, "bias", None) is not None:
            return None
        if call.name != "linear" and call.arg(6, "groups", 1) != m.groups:
            return None
        return m, path


_BLOCK = BlockRule()

builtin([nn.Linear], rule=LinearRule())
builtin(names=("linear", "conv1d", "conv2d", "conv3d"), rule=FunctionalLayerRule())
builtin([*CONV_TYPES, *CONV_TRANSPOSE_TYPES], rule=ConvRule())
builtin([nn.Embedding], rule=EmbeddingRule())
