"""Normalisation layers and their functional forms: batch/instance/group norm over channel axis 1,
layer/RMS norm over the last axis. They carry the channels on and own their affine parameters
and running statistics.

A functional call (``F.batch_norm``, ``torch.layer_norm``, ...) reads as the matching layer: the
tensors it was called with are parameters of the model, and when they all belong to one norm
layer (a subclass with its own ``forward``, such as timm's ``BatchNormAct2d``, traced through)
that layer is handled exactly as the module form, attribute edits included. Group norm with
groups of several channels couples the groups position by position when each group comes from
other roots (the groups stay equal); one root's channels spread over several groups block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pruneplan.graph._ir import Ref
from pruneplan.graph._labels import Lab, PView, roots_of
from pruneplan.graph.rules.base import Call, FunctionRule, ModuleRule, builtin
from pruneplan.graph.rules.layers import NORM_TYPES, norm_slices

__all__ = ["ChannelNormRule", "ChannelRule", "FunctionalNormRule", "GroupNormRule", "LayerNormRule"]


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


def _own(call: Call, x: Lab, m: nn.Module, name: str) -> Lab:
    """Module ``m`` (path ``name``) normalises the channels ``x``: its tensors and attributes."""
    width = x.arr.shape[0]
    call.per_root(x, lambda st: norm_slices(name, m, st, width))
    return x


def _grouped(call: Call, x: Lab, groups: int, tensors: list[tuple[str, int]],
             edit: tuple[str, int] | None, module: str | None) -> Lab | None:
    """A group norm of ``groups`` groups of several channels: each group must lose the same
    local positions, so the groups are coupled position by position."""
    width = x.arr.shape[0]
    rows = x.arr.reshape(groups, width // groups)
    home: dict[int, int] = {}
    for i, row in enumerate(rows):
        for r in roots_of(row):
            if home.setdefault(r, i) != i:
                call.block(x, f"{call.where} normalises {groups} groups of {width // groups} "
                           "channels, and units of one layer lie in several groups (removing "
                           "them would leave the groups unequal)")
                return None
    for i in range(1, groups):
        call.couple(rows[0], rows[i])
    for key, axis in tensors:
        call.own(key, axis, x.arr)
    if edit is not None:
        call.edit(edit[0], edit[1], x.arr, module=module)
    return x


def _channels_on(call: Call, x: Lab, axis: int) -> bool | None:
    """``True`` when the labels are exactly on ``axis``, ``False`` when not on it at all;
    ``None`` (after blocking) when they are on it and on other axes too."""
    if axis not in x.axes:
        return False
    if x.axes != (axis,):
        call.block(x, f"{call.where} sees them on other axes")
        return None
    return True


class ChannelNormRule(ModuleRule):
    """A norm over channel axis 1 (BatchNorm, InstanceNorm)."""

    def labels(self, call: Call, x: Lab) -> Lab | None:
        on = _channels_on(call, x, 1)
        if not on:
            return x if on is False else None
        return _own(call, x, call.module, call.name)


class GroupNormRule(ModuleRule):
    """``nn.GroupNorm``: per channel (one channel per group), over all of them (one group), or
    coupling its groups position by position."""

    def labels(self, call: Call, x: Lab) -> Lab | None:
        on = _channels_on(call, x, 1)
        if not on:
            return x if on is False else None
        m, name = call.module, call.name
        if m.num_groups in (1, m.num_channels) or m.num_channels != x.arr.shape[0]:
            return _own(call, x, m, name)
        p = f"{name}." if name else ""
        keys = [(p + k, 0) for k in ("weight", "bias") if getattr(m, k, None) is not None]
        return _grouped(call, x, m.num_groups, keys, ("num_channels", m.num_channels), name)


class LayerNormRule(ModuleRule):
    """``nn.LayerNorm`` / ``nn.RMSNorm`` over the last axis only."""

    def labels(self, call: Call, x: Lab) -> Lab | None:
        shape = call.module.normalized_shape
        nd = len(call.xmeta)
        if not set(range(nd - len(shape), nd)) & set(x.axes):
            return x
        if x.axes != (nd - 1,) or len(shape) != 1:
            call.block(x, f"{call.where} normalises over more axes")
            return None
        return _own(call, x, call.module, call.name)


#: per functional norm: positions/keywords of its tensors in the ``torch.nn.functional`` form,
#: and the norm layers whose tensors they can be
_FUNCTIONAL: dict[str, tuple[dict[str, int], tuple[type, ...]]] = {
    "batch_norm": ({"running_mean": 1, "running_var": 2, "weight": 3, "bias": 4},
                   (nn.modules.batchnorm._NormBase,)),
    "instance_norm": ({"running_mean": 1, "running_var": 2, "weight": 3, "bias": 4},
                      (nn.modules.batchnorm._NormBase,)),
    "group_norm": ({"weight": 2, "bias": 3}, (nn.GroupNorm,)),
    "layer_norm": ({"weight": 2, "bias": 3}, (nn.LayerNorm,)),
    "rms_norm": ({"weight": 2}, (nn.RMSNorm,)),
}
#: ``torch.batch_norm`` / ``torch.instance_norm`` take 9 positional arguments, in another order
_TORCH_FORM = {"weight": 1, "bias": 2, "running_mean": 3, "running_var": 4}


class FunctionalNormRule(FunctionRule):
    """``F.batch_norm`` / ``instance_norm`` / ``group_norm`` / ``layer_norm`` / ``rms_norm`` (and
    their ``torch.`` spellings) read as the layers; ``local_response_norm`` mixes neighbouring
    channels and blocks them."""

    def labels(self, call: Call) -> Lab | None:
        x = self.main(call)
        if x is None:
            return None
        name, nd = call.name, len(call.xmeta)
        if name not in _FUNCTIONAL:
            if 1 in x.axes:
                call.block(x, f"{call.where} normalises over them")
                return None
            return x
        if name in ("layer_norm", "rms_norm"):
            shape = call.arg(1, "normalized_shape")
            shape = (shape,) if isinstance(shape, int) else tuple(shape)
            if not set(range(nd - len(shape), nd)) & set(x.axes):
                return x
            if x.axes != (nd - 1,) or len(shape) != 1:
                call.block(x, f"{call.where} normalises over more axes")
                return None
        else:
            on = _channels_on(call, x, 1)
            if not on:
                return x if on is False else None
        places, owners = _FUNCTIONAL[name]
        if name in ("batch_norm", "instance_norm") and (
                len(call.node.args) >= 9 or "cudnn_enabled" in call.node.kwargs):
            places = _TORCH_FORM
        tensors: dict[str, Any] = {}
        for role, i in places.items():
            ref = call.arg(i, role)
            if isinstance(ref, Ref):
                tensors[role] = call.read(ref)
        groups = call.arg(1, "num_groups") if name == "group_norm" else None
        owner = _owner(call, tensors, owners)
        width = x.arr.shape[0]
        if owner is not None:
            path, m = owner
            if groups in (None, 1, width):
                return _own(call, x, m, path)
            p = f"{path}." if path else ""
            keys = [(p + k, 0) for k in ("weight", "bias") if getattr(m, k, None) is not None]
            return _grouped(call, x, groups, keys, ("num_channels", m.num_channels), path)
        keys = []
        for role, info in tensors.items():
            if not (isinstance(info, PView) and len(info.dims) == 1 and info.dims[0] is not None):
                call.block(x, f"{call.where} normalises them with a {role} no prunable layer owns")
                return None
            keys.append((info.key, info.dims[0]))
        if name in ("layer_norm", "rms_norm") and not _shape_follows(call, x):
            return None
        if groups not in (None, 1, width):
            return _grouped(call, x, groups, keys, None, None)
        for key, axis in keys:
            call.own(key, axis, x.arr)
        return x


#: words of the names under which a module keeps a normalised width
_WIDTH_WORDS = ("shape", "dim", "size", "width", "embed", "hidden", "channels", "features")


def _shape_follows(call: Call, x: Lab) -> bool:
    """A functional layer / RMS norm called by a module that is no torch norm layer (timm's
    ``RmsNorm``: ``rms_norm(x, self.normalized_shape, self.weight, eps)``) with the width as a
    number: the module attribute that holds it must shrink with the units, or the pruned
    model's norm would refuse its input. Exactly one attribute of the module running the call
    holding that value (the same tuple, or the same int under a width name) is edited;
    otherwise (none, several) the roots are blocked (``False``). A size read off the tensor at
    run time follows by itself."""
    shape = call.arg(1, "normalized_shape")
    if not (isinstance(shape, int) and not isinstance(shape, bool)) and not (
            isinstance(shape, tuple | list) and all(type(v) is int for v in shape)):
        return True
    width = x.arr.shape[0]
    mod, scope = call.scope_module, call.node.scope
    attrs = {n: v for n, v in (vars(mod).items() if mod is not None else ())
             if not n.startswith("_")}
    same = [n for n, v in attrs.items() if isinstance(v, tuple) and isinstance(shape, tuple | list)
            and v == tuple(shape)]
    names = same or [n for n, v in attrs.items() if type(v) is int and v == width
                     and any(w in n.lower() for w in _WIDTH_WORDS)]
    if len(names) == 1:
        call.edit(names[0], width, x.arr, module=scope)
        return True
    why = "no attribute of its module holds it" if not names else \
        f"several attributes of its module hold it ({', '.join(sorted(names))})"
    call.block(x, f"{call.where} is given the width {width} as a number and {why}, so the norm "
               "would refuse the pruned channels")
    return False


def _owner(call: Call, tensors: dict[str, Any], kinds: tuple[type, ...]) -> tuple[str, nn.Module] | None:
    """The norm layer (path, module) whose own tensors these all are, if there is one."""
    keys = {role: info.key for role, info in tensors.items()
            if isinstance(info, PView) and info.dims == (0,)}
    if not keys or len(keys) != len(tensors):
        return None
    paths = {k.rpartition(".")[0] for k in keys.values()}
    if len(paths) != 1:
        return None
    path = paths.pop()
    try:
        m = call.model.get_submodule(path)
    except AttributeError:
        return None
    if not isinstance(m, kinds):
        return None
    if any(k != (f"{path}.{role}" if path else role) for role, k in keys.items()):
        return None
    return path, m


builtin([t for t in NORM_TYPES if not issubclass(t, nn.LayerNorm | nn.RMSNorm | nn.GroupNorm)],
        rule=ChannelNormRule())
builtin([nn.GroupNorm], rule=GroupNormRule())
builtin([nn.LayerNorm, nn.RMSNorm], rule=LayerNormRule())
builtin(names=("layer_norm", "group_norm", "batch_norm", "instance_norm", "rms_norm",
               "local_response_norm"), rule=FunctionalNormRule())
