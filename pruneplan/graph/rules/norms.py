"""Normalisation layers: batch/instance/group norm over channel axis 1, layer norm over the last
axis. They carry the channels on and own their affine parameters and running statistics."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pruneplan.graph._labels import Lab
from pruneplan.graph.rules.base import Call, FunctionRule, ModuleRule, builtin
from pruneplan.graph.rules.layers import NORM_TYPES, norm_slices

__all__ = ["ChannelNormRule", "ChannelRule", "FunctionalNormRule", "LayerNormRule"]


class ChannelRule(ModuleRule):
    """A layer acting on each channel of ``axis`` alone, holding per-channel tensors.

    For a custom normalisation or scaling layer: the channels follow through it, and the units
    that reach it own positions of each of ``tensors`` (parameters or buffers of the module, one
    entry per channel along their dim 0) and shrink each integer attribute in ``attributes``.

    Args:
        axis: the channel axis of the layer's input (``1`` for NCHW, ``-1`` for channels-last).
        tensors: names of the module's per-channel tensors (missing or ``None`` ones skipped).
        attributes: integer attributes equal to the channel count (``num_features``, ...).

    A call that meets the channels on another axis blocks their roots; a tensor whose length
    is not the channel count blocks them with a message naming the tensor.
    """

    def __init__(self, axis: int = 1, tensors: Sequence[str] = ("weight", "bias"),
                 attributes: Sequence[str] = ()) -> None:
        self.axis = axis
        self.tensors = tuple(tensors)
        self.attributes = tuple(attributes)

    def labels(self, call: Call, x: Lab) -> Lab | None:
        axis = self.axis % len(call.xmeta)
        if axis not in x.axes:
            return x
        if x.axes != (axis,):
            call.block(x, f"{call.where} sees them on other axes")
            return None
        m, width = call.module, x.arr.shape[0]
        prefix = f"{call.name}." if call.name else ""
        for key in self.tensors:
            t = getattr(m, key, None)
            if not isinstance(t, torch.Tensor):
                continue
            if t.dim() == 0 or t.shape[0] != width:
                call.block(x, f"{call.where}: tensor {key!r} of shape {tuple(t.shape)} does not "
                           f"hold one entry per channel ({width} reach it)")
                return None
            call.own(prefix + key, 0, x.arr)
        for attr in self.attributes:
            before = getattr(m, attr)
            if before != width:
                call.block(x, f"{call.where}: attribute {attr!r} is {before}, but {width} channels "
                           "reach it")
                return None
            call.edit(attr, before, x.arr)
        return x


def _own(call: Call, x: Lab) -> Lab:
    m, name, width = call.module, call.name, x.arr.shape[0]
    call.per_root(x, lambda st: norm_slices(name, m, st, width))
    return x


class ChannelNormRule(ModuleRule):
    """A norm over channel axis 1 (BatchNorm, InstanceNorm, GroupNorm)."""

    def labels(self, call: Call, x: Lab) -> Lab | None:
        if 1 not in x.axes:
            return x
        if x.axes != (1,):
            call.block(x, f"{call.where} sees them on other axes")
            return None
        return _own(call, x)


class LayerNormRule(ModuleRule):
    """``nn.LayerNorm`` over the last axis only."""

    def labels(self, call: Call, x: Lab) -> Lab | None:
        shape = call.module.normalized_shape
        nd = len(call.xmeta)
        if not set(range(nd - len(shape), nd)) & set(x.axes):
            return x
        if x.axes != (nd - 1,) or len(shape) != 1:
            call.block(x, f"{call.where} normalises over more axes")
            return None
        return _own(call, x)


class FunctionalNormRule(FunctionRule):
    """``F.batch_norm`` & co.: labelled channels on the normalised axes are blocked."""

    def labels(self, call: Call) -> Lab | None:
        x = self.main(call)
        if x is None:
            return None
        nd = len(call.xmeta)
        if call.name == "layer_norm":
            dims = set(range(nd - len(call.arg(1, "normalized_shape")), nd))
        else:
            dims = {1}
        if dims & set(x.axes):
            call.block(x, f"{call.where} normalises over them")
            return None
        return x


builtin([t for t in NORM_TYPES if not issubclass(t, nn.LayerNorm)], rule=ChannelNormRule())
builtin([nn.LayerNorm], rule=LayerNormRule())
builtin(names=("layer_norm", "group_norm", "batch_norm", "instance_norm", "local_response_norm"),
        rule=FunctionalNormRule())
