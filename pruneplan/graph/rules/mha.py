"""``nn.MultiheadAttention``: its heads (a root of kind ``"heads"``) and the widths it reads.

With ``H = num_heads``, ``D = head_dim`` and inner width ``I = H * D`` (``embed_dim`` until it
is pruned), PyTorch stores ``in_proj_weight`` ``(3I, embed_dim)`` with q, k and v stacked (or,
when ``kdim`` / ``vdim`` differ from ``embed_dim``, ``q_proj_weight`` ``(I, embed_dim)``,
``k_proj_weight`` ``(I, kdim)``, ``v_proj_weight`` ``(I, vdim)``), ``in_proj_bias`` ``(3I,)``,
``bias_k`` / ``bias_v`` ``(1, 1, I)`` (an extra key/value token appended *after* the
projection, so they live on the inner axis) and ``out_proj`` ``(embed_dim, I)``.

- **heads** (the module is a root of kind ``"heads"``): head ``h`` is rows ``h*D .. h*D+D-1``
  of each of the q, k and v thirds of ``in_proj_weight`` / ``in_proj_bias`` (of each of the
  three separate weights), those positions of ``bias_k`` / ``bias_v``, and those columns of
  ``out_proj.weight``; ``num_heads`` and ``out_proj.in_features`` shrink, ``head_dim`` stays.
  A head reaches the rest of the model only through its columns of ``out_proj``, so removing
  it equals zeroing those columns. Per-head attention weights (``need_weights=True,
  average_attn_weights=False``) carry the heads on their head axis; weights averaged over the
  heads change with their number, so heads whose average is used are left out.
- **the widths it reads**: labels on the last axis of query, key and value. With packed
  weights the three share the columns of ``in_proj_weight``, so their labels are coupled;
  with separate weights each is read on its own (``kdim`` / ``vdim`` shrink). The output is
  ``embed_dim`` wide like the query: it carries the query's labels, whose units own those
  rows of ``out_proj`` (``embed_dim`` and ``out_proj.out_features`` shrink).

Torch's own forward cannot run once the inner width differs from ``embed_dim``;
`pruneplan.apply_plan` makes such a module a `pruneplan.modules.PrunedMultiheadAttention`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from pruneplan.errors import PlanningError
from pruneplan.graph._ir import mark_leaf
from pruneplan.graph._labels import Lab
from pruneplan.graph.rules.base import Call, Rule, builtin
from pruneplan.graph.spec import EditSpec, SliceSpec
from pruneplan.modules import PrunedMultiheadAttention

__all__ = ["MultiheadAttentionRule", "head_slices"]


def _inner(m: nn.MultiheadAttention) -> int:
    return m.num_heads * m.head_dim


def head_slices(name: str, m: nn.MultiheadAttention) -> tuple[int, list[SliceSpec], list[EditSpec]]:
    """The heads of ``m``: ``(num_heads, slices, edits)`` (see the module doc)."""
    p = f"{name}." if name else ""
    heads, hd, inner = m.num_heads, m.head_dim, _inner(m)
    if m.out_proj.weight.shape[1] != inner:
        raise PlanningError(f"module {name!r}: out_proj reads {m.out_proj.weight.shape[1]} "
                            f"channels, not num_heads * head_dim = {inner}")
    rows = {"repeat": hd}
    packed = {"repeat": hd, "tiles": 3, "tile_stride": inner}
    if m.in_proj_weight is not None:
        slices = [SliceSpec(p + "in_proj_weight", 0, **packed)]
    else:
        slices = [SliceSpec(p + w, 0, **rows) for w in ("q_proj_weight", "k_proj_weight",
                                                         "v_proj_weight")]
    if m.in_proj_bias is not None:
        slices.append(SliceSpec(p + "in_proj_bias", 0, **packed))
    for b in ("bias_k", "bias_v"):
        if getattr(m, b, None) is not None:
            slices.append(SliceSpec(p + b, 2, **rows))
    slices.append(SliceSpec(p + "out_proj.weight", 1, **rows))
    edits = [EditSpec(name, "num_heads", heads),
             EditSpec(f"{p}out_proj", "in_features", inner, hd)]
    return heads, slices, edits


def _last(call: Call, info: Any, meta: Any) -> np.ndarray | None:
    """Labels on the last axis of a q/k/v argument; ``None`` when unlabelled (other axes block)."""
    if not isinstance(info, Lab):
        return None
    if meta is None or info.axes != (len(meta) - 1,):
        call.block(info, f"they reach {call.where} on an axis other than its features")
        return None
    return info.arr


class MultiheadAttentionRule(Rule):
    """``nn.MultiheadAttention`` (see the module doc)."""

    def propagate(self, call: Call) -> Any:
        m, name = call.module, call.name
        p = f"{name}." if name else ""
        if type(m) not in (nn.MultiheadAttention, PrunedMultiheadAttention):
            call.block_all(f"they reach {call.where}, a subclass of nn.MultiheadAttention (only "
                           "the class itself is pruned: its forward is known)")
            return None
        refs = [call.arg(i, n) for i, n in enumerate(("query", "key", "value"))]
        others = [i for r, i in zip(call.refs, call.infos, strict=True) if r not in refs]
        if call.labelled_in(others):
            call.block(call.labelled_in(others), f"they reach a mask of {call.where}")
        q, k, v = (_last(call, call.read(r), call.meta(r)) for r in refs)
        out_lab = None
        if q is not None or k is not None or v is not None:
            out_lab = self._widths(call, m, p, q, k, v)
        arr = call.units(lambda: head_slices(name, m))
        if arr is not None:
            call.mark_heads(arr)
        meta = call.out
        if not isinstance(meta, list) or len(meta) != 2:
            return None
        weights = None
        if meta[1] is not None and arr is not None:
            average = call.arg(6, "average_attn_weights", True)
            if not average:
                weights = Lab((len(meta[1]) - 3,), arr)
            elif call.used(1):
                call.block(Lab((0,), arr), f"{call.where} returns attention weights averaged over "
                           "its heads, which are used: removing heads changes that average (call "
                           "it with need_weights=False or average_attn_weights=False to prune them)")
        return [out_lab, weights]

    def _widths(self, call: Call, m: nn.MultiheadAttention, p: str,
                q: np.ndarray | None, k: np.ndarray | None, v: np.ndarray | None) -> Lab | None:
        """The labels of query, key and value are read; the output carries the query's."""
        sizes = (m.embed_dim, m.kdim, m.vdim)
        arrs = [a if a is not None else np.full(n, -1, dtype=np.int64)
                for a, n in zip((q, k, v), sizes, strict=True)]
        if m.in_proj_weight is not None:  # one set of columns for q, k and v: couple them
            arr = call.couple(call.couple(arrs[0], arrs[1]), arrs[2])
            call.own(p + "in_proj_weight", 1, arr)
            for attr in ("embed_dim", "kdim", "vdim"):
                call.edit(attr, getattr(m, attr), arr)
            q = arr
        else:
            for a, w, attr in ((q, "q_proj_weight", "embed_dim"), (k, "k_proj_weight", "kdim"),
                               (v, "v_proj_weight", "vdim")):
                if a is not None:
                    call.own(p + w, 1, a)
                    call.edit(attr, getattr(m, attr), a)
        if q is None:
            return None
        call.own(p + "out_proj.weight", 0, q)
        if m.out_proj.bias is not None:
            call.own(p + "out_proj.bias", 0, q)
        call.edit("out_features", m.out_proj.out_features, q, module=f"{p}out_proj")
        # nn.Transformer checks its inputs against d_model: it follows the width
        parts = call.name.split(".")
        for depth in range(len(parts) - 1, -1, -1):
            path = ".".join(parts[:depth])
            outer = call.model.get_submodule(path) if path else call.model
            if isinstance(outer, nn.Transformer) and outer.d_model == m.embed_dim:
                call.edit("d_model", outer.d_model, q, module=path)
        meta = call.out
        if not isinstance(meta, list) or meta[0] is None:
            return None
        return Lab((len(meta[0]) - 1,), q)


builtin([nn.MultiheadAttention], rule=MultiheadAttentionRule())
mark_leaf(PrunedMultiheadAttention)  # a pruned one is recorded as one call too (pruned again)
