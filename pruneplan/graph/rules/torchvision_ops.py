"""torchvision's Swin: the fx-wrapped functions ``shifted_window_attention``,
``_get_relative_position_bias`` (and pruneplan's `pruned_shifted_window_attention`) and
``_patch_merging_pad``.

``shifted_window_attention(input, qkv_weight, proj_weight, relative_position_bias, window_size,
num_heads, shift_size, ..., qkv_bias, proj_bias, logit_scale)`` is called by
``ShiftedWindowAttention`` (and its V2) with the weights of its ``qkv`` and ``proj`` Linear
layers. With ``H = num_heads`` and inner width ``I = qkv_weight.shape[0] // 3``, ``D = I // H``:

- **heads** (the attention module, the parent of ``qkv``, is a root of kind ``"heads"``): head
  ``h`` is rows ``h*D .. h*D+D-1`` of each of the q, k and v thirds of ``qkv.weight`` /
  ``qkv.bias``, those columns of ``proj.weight``, entry ``h`` of V2's ``logit_scale`` and the
  head column of the relative position bias: of the bias table (V1: ``(T, H)``, gathered by
  ``_get_relative_position_bias``), or of whatever layer makes it (V2: the last layer of
  ``cpb_mlp``, whose outputs are then coupled with the heads). ``num_heads`` of the attention
  module, ``qkv.out_features`` and ``proj.in_features`` shrink.
- **the width it reads** (labels on the input's last axis): columns of ``qkv.weight``, rows of
  ``proj.weight`` / ``proj.bias``; the output carries the same labels.

``_patch_merging_pad(x)`` (``(..., H, W, C) -> (..., H/2, W/2, 4C)``) concatenates four strided
copies of the channels: channel ``c`` lands at ``c``, ``C + c``, ``2C + c`` and ``3C + c``.

A head reaches the rest of the model only through its columns of ``proj.weight``: removing it
equals zeroing them. torchvision's function takes the head size and the output width from the
input width, so `pruneplan.apply_plan` makes a pruned module a
``pruneplan.modules.PrunedShiftedWindowAttention`` (``...V2``), whose forward reads them from
the weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from pruneplan.errors import PlanningError
from pruneplan.graph._labels import Lab, PView
from pruneplan.graph.rules.base import Call, FunctionRule, Rule, builtin
from pruneplan.graph.spec import EditSpec, SliceSpec

__all__ = ["PatchMergingPadRule", "RelativePositionBiasRule", "ShiftedWindowAttentionRule"]


def _linear(call: Call, ref: Any) -> tuple[str, nn.Linear] | None:
    """The ``nn.Linear`` whose whole weight ``ref`` is (path, module), else ``None``."""
    info = call.read(ref)
    if not isinstance(info, PView) or info.dims != (0, 1):
        return None
    path, _, leaf = info.key.rpartition(".")
    try:
        m = call.model.get_submodule(path)
    except AttributeError:
        return None
    return (path, m) if leaf == "weight" and isinstance(m, nn.Linear) else None


def _heads(attn: str, heads: int, qkv: tuple[str, nn.Linear], proj: tuple[str, nn.Linear],
           logit: str | None) -> tuple[int, list[SliceSpec], list[EditSpec]]:
    (qn, q), (pn, p) = qkv, proj
    inner = q.weight.shape[0] // 3
    if inner * 3 != q.weight.shape[0] or inner % heads or p.weight.shape[1] != inner:
        raise PlanningError(f"module {attn!r}: qkv {tuple(q.weight.shape)} and proj "
                            f"{tuple(p.weight.shape)} are not {heads} heads")
    hd = inner // heads
    packed = {"repeat": hd, "tiles": 3, "tile_stride": inner}
    slices = [SliceSpec(f"{qn}.weight", 0, **packed)]
    if q.bias is not None:
        slices.append(SliceSpec(f"{qn}.bias", 0, **packed))
    slices.append(SliceSpec(f"{pn}.weight", 1, repeat=hd))
    if logit is not None:
        slices.append(SliceSpec(logit, 0))
    edits = [EditSpec(attn, "num_heads", heads), EditSpec(qn, "out_features", 3 * inner, 3 * hd),
             EditSpec(pn, "in_features", inner, hd)]
    return heads, slices, edits


class ShiftedWindowAttentionRule(Rule):
    """``shifted_window_attention`` (see the module doc)."""

    def propagate(self, call: Call) -> Any:
        qkv, proj = _linear(call, call.arg(1, "qkv_weight")), _linear(call, call.arg(2, "proj_weight"))
        heads = call.arg(5, "num_heads")
        if qkv is None or proj is None or not isinstance(heads, int):
            call.block_all(f"they reach {call.where} with weights of no Linear layer")
            return None
        out = self._width(call, qkv, proj)
        self._heads(call, qkv, proj, heads)
        return out

    def _width(self, call: Call, qkv: tuple[str, nn.Linear], proj: tuple[str, nn.Linear]) -> Lab | None:
        x, meta = call.read(call.arg(0, "input")), call.meta(call.arg(0, "input"))
        skip = (call.arg(0, "input"), call.arg(3, "relative_position_bias"))
        others = [i for r, i in zip(call.refs, call.infos, strict=True) if r not in skip]
        if call.labelled_in(others):
            call.error("receives them in an argument pruneplan does not follow",
                       call.labelled_in(others))
        if not isinstance(x, Lab):
            return None
        if meta is None or x.axes != (len(meta) - 1,):
            call.block(x, f"{call.where} reads them on an axis other than its features")
            return None
        (qn, q), (pn, p) = qkv, proj
        call.own(f"{qn}.weight", 1, x.arr)
        call.edit("in_features", q.in_features, x.arr, module=qn)
        call.own(f"{pn}.weight", 0, x.arr)
        if p.bias is not None:
            call.own(f"{pn}.bias", 0, x.arr)
        call.edit("out_features", p.out_features, x.arr, module=pn)
        return Lab(x.axes, x.arr) if isinstance(call.out, torch.Size) and call.out == meta else None

    def _heads(self, call: Call, qkv: tuple[str, nn.Linear], proj: tuple[str, nn.Linear],
               heads: int) -> None:
        attn = qkv[0].rpartition(".")[0]
        module = call.model.get_submodule(attn) if attn else call.model
        bias_ref = call.arg(3, "relative_position_bias")
        bias, meta = call.read(bias_ref), call.meta(bias_ref)
        logit = call.read(call.arg(11, "logit_scale"))
        key = logit.key if isinstance(logit, PView) and logit.dims[:1] == (0,) else None
        why = None
        if getattr(module, "num_heads", None) != heads:
            why = f"module {attn!r} holds no num_heads = {heads}"
        elif logit is not None and key is None:
            why = "its logit scale is no parameter with one entry per head"
        arr = None if why else call.units(lambda: _heads(attn, heads, qkv, proj, key), attn, module)
        if arr is None:
            if isinstance(bias, Lab):
                call.block(bias, f"they reach the per-head bias of {call.where}, whose heads are "
                           f"no unit{': ' + why if why else ''}")
            return
        call.mark_heads(arr)
        if meta is None or len(meta) != 4 or meta[1] != heads:
            if meta is not None and len(meta) == 4 and meta[1] == 1 and not isinstance(bias, Lab):
                return  # one bias for every head
            call.block(Lab((0,), arr), f"{call.where} adds a bias that is not one per head")
            return
        if isinstance(bias, PView) and bias.dims[1] is not None:
            call.own(bias.key, bias.dims[1], arr)
        elif isinstance(bias, Lab) and bias.axes == (1,):
            call.tie([arr, bias.arr])
        else:
            call.block(Lab((0,), arr), f"{call.where} adds a per-head bias no prunable layer owns")


class RelativePositionBiasRule(FunctionRule):
    """``_get_relative_position_bias(table (T, H), index, window_size) -> (1, H, N, N)``: the
    head column of the table becomes axis 1 of the bias (labels or a parameter view)."""

    def params(self, call: Call) -> PView | None:
        table = call.read(call.arg(0, "relative_position_bias_table"))
        if not isinstance(table, PView) or len(table.dims) != 2 or not isinstance(call.out, torch.Size) \
                or len(call.out) != 4:
            return None
        return PView(table.key, (None, table.dims[1], None, None))

    def labels(self, call: Call) -> Lab | None:
        table = call.read(call.arg(0, "relative_position_bias_table"))
        if not isinstance(table, Lab) or table.axes != (1,) or len(call.out) != 4:
            call.block_all(f"they reach {call.where} on an axis other than the heads")
            return None
        return Lab((1,), np.asarray(table.arr))


class PatchMergingPadRule(FunctionRule):
    """``_patch_merging_pad``: labels on the channel (last) axis, repeated four times."""

    def labels(self, call: Call) -> Lab | None:
        x = self.main(call)
        if x is None:
            return None
        nd = len(call.xmeta)
        if x.axes != (nd - 1,) or not isinstance(call.out, torch.Size) or \
                call.out[-1] != 4 * call.xmeta[-1]:
            call.block(x, f"{call.where} moves them on spatial axes")
            return None
        return Lab((len(call.out) - 1,), np.tile(x.arr, 4))


builtin(names=("_patch_merging_pad",), rule=PatchMergingPadRule())
builtin(names=("shifted_window_attention", "pruned_shifted_window_attention"),
        rule=ShiftedWindowAttentionRule())
builtin(names=("_get_relative_position_bias",), rule=RelativePositionBiasRule())
