"""Linear, convolution, transposed convolution and embedding: roots on their output, consumers on
their input; a depthwise convolution carries its input channels on (with its multiplier).

``F.linear`` / ``F.conv2d`` & co. called with a layer's own weight and bias (a subclass with its
own ``forward``, such as timm's ``Linear``, traced through) read as that layer; called with
other tensors they block the roots whose channels reach them. A matmul of an input with the
transpose of an ``nn.Linear``'s own weight (``x @ self.weight.T``, as Falcon's ``FalconLinear``
computes its forward) is that layer's linear map too; its bias, added afterwards, is a
parameter broadcast along the layer's outputs and is sliced with them (`activations`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from pruneplan.graph._ir import Ref
from pruneplan.graph._labels import Lab, PView
from pruneplan.graph.rules.attention import MatmulRule
from pruneplan.graph.rules.base import Call, FunctionRule, Rule, builtin
from pruneplan.graph.rules.blocking import BlockRule
from pruneplan.graph.rules.grouped import grouped_root, is_grouped, tie_blocks, whole_groups
from pruneplan.graph.rules.layers import (
    CONV_TRANSPOSE_TYPES,
    CONV_TYPES,
    consumer_slices,
    is_depthwise,
    root_slices,
)
from pruneplan.graph.spec import EditSpec, SliceSpec

__all__ = ["ConvRule", "EmbeddingRule", "FunctionalEmbeddingRule", "FunctionalLayerRule", "LinearMatmulRule",
           "LinearRule", "consume"]


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


def _linear(call: Call, m: nn.Module, name: str, extra: tuple[SliceSpec, ...] = (),
            bias: bool = True) -> Lab | None:
    def spec() -> tuple[int, list[SliceSpec], list[EditSpec]]:
        size, slices, edits = root_slices(name, m)
        if not bias:  # the call does not add it: whatever adds it owns its slice
            slices = [s for s in slices if s.tensor != (f"{name}.bias" if name else "bias")]
        return size, [*slices, *extra], edits

    out = call.root(-1, spec, name, m)
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
    x = call.x
    if (isinstance(x, Lab) and x.axes == (1,) and is_grouped(m)
            and not getattr(m, "transposed", False) and call.whole_conv_groups(name)):
        return whole_groups(call, m, name, x)
    if m.groups == 1:
        out = call.root(1, lambda: root_slices(name, m), name, m)
    else:
        out = grouped_root(call, m, name) if is_grouped(m) else None
    if isinstance(x, Lab):
        dw = consume(call, x, 1, m, name)
        if is_depthwise(m):
            return dw
        if is_grouped(m) and x.axes == (1,):
            tie_blocks(call, x.arr, m.groups)
            call.tied_conv_blocks(name, x.arr)
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


class FunctionalEmbeddingRule(FunctionRule):
    """``F.embedding(ids, weight)`` with the whole weight of an ``nn.Embedding`` of the model (a
    subclass with its own ``forward`` that calls ``super().forward`` and scales the result, as
    Gemma's scaled word embedding does, traced through): exactly that layer, a root on the
    last axis. Any other weight blocks the roots whose channels reach it."""

    def propagate(self, call: Call) -> Lab | None:
        weight = call.read(call.arg(1, "weight"))
        if isinstance(weight, PView) and weight.dims == (0, 1):
            owner = _embedding_owner(call.model, weight.key, call.node.scope)
            if owner is not None:
                path, m = owner
                if isinstance(call.x, Lab):
                    call.error("receives labelled indices", call.x)
                return call.root(-1, lambda: root_slices(path, m), path, m)
        return _BLOCK.propagate(call)


def _embedding_owner(model: nn.Module, key: str, scope: str | None = None
                     ) -> tuple[str, nn.Embedding] | None:
    """The ``nn.Embedding`` whose weight is the parameter at ``key`` (the graph names a tied
    parameter by one of its keys, ``lm_head.weight`` for a tied embedding): the module running
    the call (``scope``) when it is one (BART's encoder and decoder embeddings share one
    weight), else the first in model order; ``None`` when no embedding owns it."""
    try:
        p = model.get_parameter(key)
    except AttributeError:
        return None
    if scope is not None:
        try:
            m = model.get_submodule(scope)
        except AttributeError:
            m = None
        if isinstance(m, nn.Embedding) and m.weight is p:
            return scope, m
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, nn.Embedding) and m.weight is p:
            return name, m
    return None


_KINDS = {"linear": nn.Linear, "conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}


class FunctionalLayerRule(FunctionRule):
    """``F.linear`` / ``F.conv1d..3d`` with the weight (and bias) of one ``nn.Linear`` /
    ``nn.ConvNd`` of the model: exactly that layer (root and consumer); otherwise blocking."""

    def propagate(self, call: Call) -> Lab | None:
        owner = self._owner(call)
        if owner is None:
            return _BLOCK.propagate(call)
        m, name, extra = owner
        return _linear(call, m, name, extra) if call.name == "linear" else _conv(call, m, name)

    def _owner(self, call: Call) -> tuple[nn.Module, str, tuple[SliceSpec, ...]] | None:
        weight = call.read(call.arg(1, "weight"))
        if not isinstance(weight, PView) or weight.dims != tuple(range(len(weight.dims))):
            return None
        owner = _weight_owner(call, weight, _KINDS[call.name])
        if owner is None:
            return None
        m, path = owner
        bias = call.arg(2, "bias")
        want = f"{path}.bias" if path else "bias"
        extra: tuple[SliceSpec, ...] = ()
        if isinstance(bias, Ref):
            info = call.read(bias)
            if isinstance(info, PView) and info.key == want:
                pass
            elif call.name == "linear" and getattr(m, "bias", None) is None:
                parts = _concatenated_bias(call, bias, m.out_features)
                if parts is None:
                    return None
                extra = parts
            else:
                return None
        elif getattr(m, "bias", None) is not None:
            return None
        if call.name != "linear" and call.arg(6, "groups", 1) != m.groups:
            return None
        return m, path, extra


def _concatenated_bias(call: Call, bias: Ref, width: int) -> tuple[SliceSpec, ...] | None:
    """``F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))``
    (timm's BEiT, EVA, Swin V2): a bias concatenated from ``k`` equally long 1-D parameters,
    one per equal part of the output rows. Part ``j`` is sliced at the rows' positions taken
    modulo its length (a unit owning rows of q, k and v owns the same positions in each part,
    as every attention head does). A part that is a non-persistent buffer (a constant
    ``k_bias`` of zeros) has no state-dict entry: `apply_plan` gives it the length of the
    parameters it mirrors. ``None`` when the bias is anything else."""
    node = call.producer(bias)
    if node is None or node.target != "cat":
        return None
    items = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if dim not in (0, -1) or not isinstance(items, tuple | list) or len(items) < 2 \
            or not all(isinstance(r, Ref) for r in items):
        return None
    metas = [call.meta(r) for r in items]
    if not all(isinstance(mt, torch.Size) and len(mt) == 1 for mt in metas):
        return None
    n = int(metas[0][0])
    if any(int(mt[0]) != n for mt in metas) or n * len(items) != width:
        return None
    saved = call.model.state_dict(keep_vars=True)
    out = []
    for r in items:
        info = call.read(r)
        if isinstance(info, PView) and info.dims == (0,) and info.key in saved:
            out.append(SliceSpec(info.key, 0, modulo=n))
            continue
        node = call.producer(r)  # a non-persistent buffer is recorded as a constant
        key = node.target if node is not None and node.kind in ("const", "param") else None
        try:
            t = call.model.get_buffer(key) if isinstance(key, str) else None
        except AttributeError:
            t = None
        if t is None or key in saved or not t.numel() or not bool((t == t.reshape(-1)[0]).all()):
            return None  # a buffer that is not constant would be cut at unknown positions
    return tuple(out)


class LinearMatmulRule(MatmulRule):
    """``matmul`` / ``@``: ``x @ W.T`` with ``W`` the 2-D weight of an ``nn.Linear`` of the model
    (read through a transpose, as ``.T``, ``.t()`` or ``.transpose(0, 1)`` give it) is that
    layer's linear map without its bias: a root on the output's last axis, consuming the
    input's last axis (a subclass whose own ``forward`` writes ``input @ self.weight.T``, such as
    Falcon's ``FalconLinear``, traced through). Any other matmul is `MatmulRule`'s."""

    def propagate(self, call: Call) -> Any:
        owner = _matmul_owner(call)
        if owner is None:
            return super().propagate(call)
        m, name = owner
        return _linear(call, m, name, bias=False)


def _matmul_owner(call: Call) -> tuple[nn.Module, str] | None:
    args = call.node.args
    if len(args) != 2 or call.node.kwargs:
        return None
    ma, weight = call.meta(args[0]), call.read(args[1])
    if not isinstance(weight, PView) or weight.dims != (1, 0) or ma is None or len(ma) < 1:
        return None
    owner = _weight_owner(call, weight, nn.Linear)
    if owner is None or owner[0].weight.dim() != 2 or int(ma[-1]) != owner[0].in_features:
        return None
    return owner


def _weight_owner(call: Call, weight: PView, kinds: type | tuple[type, ...]
                  ) -> tuple[nn.Module, str] | None:
    """The module of type ``kinds`` whose own ``weight`` parameter ``weight`` views, and its
    path; ``None`` for any other tensor."""
    path, _, leaf = weight.key.rpartition(".")
    try:
        m = call.model.get_submodule(path)
    except AttributeError:
        return None
    if leaf != "weight" or not isinstance(m, kinds):
        return None
    return m, path


_BLOCK = BlockRule()

builtin([nn.Linear], rule=LinearRule())
builtin(names=("linear", "conv1d", "conv2d", "conv3d"), rule=FunctionalLayerRule())
builtin(names=("matmul",), rule=LinearMatmulRule())
builtin([*CONV_TYPES, *CONV_TRANSPOSE_TYPES], rule=ConvRule())
builtin([nn.Embedding], rule=EmbeddingRule())
builtin(names=("embedding",), rule=FunctionalEmbeddingRule())
