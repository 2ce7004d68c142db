"""Attention: ``scaled_dot_product_attention`` and attention written out as matmul-softmax-matmul.

A projection split into heads by ``view(B, T, heads, head_dim)`` reaches attention with its
labels on the head axis alone (the reshape rule regroups its units, one per head, see
`pruneplan.graph.rules.reshape.relabel`). Here the head axes of query, key and value are tied:
head ``h`` of the query meets head ``h`` of key and value, or, with grouped-query attention
(``enable_gqa``, or keys repeated by ``expand`` + ``reshape``), key/value head ``h // rep``;
the query projection's units then gather ``rep`` query heads each (a *query group*). The
contraction runs over ``head_dim``, which carries no labels, so rotary embeddings and any other
per-position work on it stay untouched. The output carries the query's units on its head
axis, down to the output projection that reads them. A per-head additive mask (a relative
position bias table) is sliced with the heads; one holding the same values for every head,
built from constants (T5's cross-attention bias), takes the heads' labels, so that every
attention reading it keeps the same heads; any other blocks them. Every axis before
(sequence, head_dim) is a batch axis of ``scaled_dot_product_attention``: the heads are the
one carrying labels, axis -3 usually, axis 1 of NesT's nested blocks ``(B, heads, T, N, E)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pruneplan.graph._ir import Ref
from pruneplan.graph._labels import Lab, PView, reshape_groups, roots_of
from pruneplan.graph.rules.base import Call, FunctionRule, builtin, iter_refs

__all__ = ["MatmulRule", "SDPARule", "label_uniform_operands", "uniform_along"]


def _on(lab: Any, shift: int) -> tuple[int, ...] | None:
    """The axes of a `Lab` once its tensor is right-aligned to the output (``None``: no labels)."""
    return tuple(a + shift for a in lab.axes) if isinstance(lab, Lab) else None


def _mask(call: Call, mask: Any, head: int, nd: int, labels: np.ndarray) -> bool:
    """An additive mask or bias of shape ``(..., heads | 1, L, S)`` next to heads ``labels``:
    a parameter with one entry per head is sliced with them; other per-head tensors block."""
    meta = call.meta(mask)
    if meta is None or len(meta) < nd - head:
        return True
    shift = nd - len(meta)
    d = head - shift
    if d < 0 or meta[d] == 1:
        return True
    info = call.read(mask)
    if isinstance(info, PView) and info.dims[d] is not None:
        call.own(info.key, info.dims[d], labels)
        return True
    chain: list[tuple[Ref, int]] = []
    if info is None and _uniform(call, mask, d, chain):
        # the same values for every head (T5's cross-attention bias: zeros of (1, n_heads, L, S)
        # built from the module's head count): nothing to slice, but every attention reading
        # it must keep the same heads, so it carries these heads' labels from here on
        refs = [r for r, _ in chain]
        if call.relabel(refs, [Lab((a,), labels) for _, a in chain]):
            return True
        call.block(roots_of(labels), f"{call.where} adds a per-head tensor that other "
                   "operations read before it")
        return False
    call.block(roots_of(labels), f"{call.where} adds a per-head tensor no prunable layer owns")
    return False


def label_uniform_operands(call: Call) -> list[Any]:
    """An element-wise call (scores + bias) where attention heads meet an unlabelled tensor
    holding the same values for every head (T5's cross-attention bias in eager attention):
    that tensor takes the heads' labels (see `_mask`). Returns the call's infos, re-read."""
    out = call.out
    if not isinstance(out, torch.Size):
        return call.infos
    nd = len(out)
    heads = None
    for info, ref in zip(call.infos, call.refs, strict=True):
        meta = call.meta(ref)
        if isinstance(info, Lab) and len(info.axes) == 1 and call.is_heads(info) \
                and isinstance(meta, torch.Size):
            heads = (info.axes[0] + nd - len(meta), info.arr)
            break
    if heads is None:
        return call.infos
    axis, arr = heads
    for info, ref in zip(call.infos, call.refs, strict=True):
        meta = call.meta(ref)
        if info is not None or not isinstance(meta, torch.Size):
            continue
        d = axis - (nd - len(meta))
        chain: list[tuple[Ref, int]] = []
        if d >= 0 and meta[d] == len(arr) and _uniform(call, ref, d, chain) and chain:
            call.relabel([r for r, _ in chain], [Lab((a,), arr) for _, a in chain])
    return [call.read(r) for r in call.refs]


#: operations whose output holds one value everywhere (whatever the sizes they are given)
_CONSTANT = frozenset({"zeros", "ones", "full", "zeros_like", "ones_like", "full_like",
                       "new_zeros", "new_ones", "new_full"})
#: element-wise operations (with broadcasting) and copies: uniform along an axis when every
#: tensor they read is
_ELEMENTWISE = frozenset({"contiguous", "clone", "detach", "to", "float", "half", "bfloat16",
                          "type_as", "add", "sub", "mul", "div", "neg", "where", "masked_fill",
                          "maximum", "minimum", "clamp"})


#: layout operations: axis ``d`` of the output comes from axes of the first argument
_LAYOUT = frozenset({"expand", "view", "reshape", "transpose", "permute", "unsqueeze", "getitem"})


def _layout_source(call: Call, node: Any, d: int) -> list[int] | None:
    """The axes of ``node``'s first argument that its output axis ``d`` is made of (all of
    them must be uniform), or ``None`` when the operation mixes it with other axes."""
    x = node.args[0] if node.args else None
    m_in, out = call.meta(x), node.meta
    if not isinstance(m_in, torch.Size) or not isinstance(out, torch.Size):
        return None
    t, args = node.target, node.args[1:]
    if t == "expand":  # new leading axes are broadcast copies
        din = d - (len(out) - len(m_in))
        return [] if din < 0 else [din]
    if t in ("view", "reshape"):
        groups = reshape_groups(tuple(m_in), tuple(out))
        found = next((gi for gi, go in (groups or []) if d in go), None)
        if found is None or [o for gi, go in groups if gi == found for o in go] != [d]:
            return None
        return found
    if t == "transpose" and len(args) == 2 and all(isinstance(a, int) for a in args):
        a, b = (v % len(out) for v in args)
        return [b if d == a else a if d == b else d]
    if t == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], tuple | list) else args
        return [int(dims[d]) % len(out)] if all(isinstance(v, int) for v in dims) else None
    if t == "unsqueeze" and len(args) == 1 and isinstance(args[0], int):
        at = args[0] % len(out)
        return [] if d == at else [d if d < at else d - 1]
    if t == "getitem" and len(args) == 1:
        index = args[0] if isinstance(args[0], tuple) else (args[0],)
        if not all(i is None or i is Ellipsis or i == slice(None) for i in index):
            return None
        if sum(i is Ellipsis for i in index) > 1:
            return None
        if Ellipsis in index:
            k = index.index(Ellipsis)
            fill = len(m_in) - sum(i is not None for i in index if i is not Ellipsis)
            index = (*index[:k], *([slice(None)] * fill), *index[k + 1:])
        src, pos = [], 0
        for i in index:
            src.append(None if i is None else pos)
            pos += i is not None
        src += list(range(pos, len(m_in)))
        return [] if src[d] is None else [src[d]]
    return None


def uniform_along(call: Call, ref: Any, d: int) -> bool:
    """Whether the value ``ref`` holds the same values at every position of its axis ``d``,
    by construction (built from constants by element-wise and layout operations)."""
    return _uniform(call, ref, d, [])


def _uniform(call: Call, ref: Any, d: int, chain: list[tuple[Ref, int]], depth: int = 0) -> bool:
    """Whether the value ``ref`` is the same at every position of its axis ``d``, by
    construction: built from constants by element-wise operations, every operand either
    broadcast along the axis (length 1) or uniform itself. ``chain`` collects (value, axis)
    for the values that have the axis at full length (they get labelled)."""
    node = call.producer(ref)
    meta = call.meta(ref)
    if node is None or not isinstance(meta, torch.Size) or depth > 32:
        return False
    if d < 0 or meta[d] == 1:
        return True
    if node.kind != "op":
        return False
    if node.target in _LAYOUT:
        src = _layout_source(call, node, d)
        if src is None:
            return False
        chain.append((ref, d))
        return all(_uniform(call, node.args[0], a, chain, depth + 1) for a in src)
    if node.target not in _CONSTANT | _ELEMENTWISE:
        return False
    chain.append((ref, d))
    if node.target in _CONSTANT and not node.target.endswith("_like"):
        return True
    operands = list(iter_refs((node.args, node.kwargs)))
    if node.target in _CONSTANT:  # *_like: only the first operand's shape is read
        return True
    nd = len(meta)
    for r in operands:
        m = call.meta(r)
        if not isinstance(m, torch.Size):
            continue
        if not _uniform(call, r, d - (nd - len(m)), chain, depth + 1):
            return False
    return True


class SDPARule(FunctionRule):
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, ..., enable_gqa)``: heads of q, k
    and v (and of a labelled mask) are tied; the output carries q's units on its head axis."""

    def labels(self, call: Call) -> Lab | None:
        refs = [call.arg(i, n) for i, n in enumerate(("query", "key", "value"))]
        metas = [call.meta(r) for r in refs]
        infos = [call.read(r) for r in refs]
        out = call.out
        nd = len(out)
        if nd < 3 or any(m is None or len(m) != nd for m in metas):
            call.block_all(f"they reach {call.where} without a head axis")
            return None
        # channels on the sequence or head_dim axis of an operand (a key/value projection of
        # multi-query attention whose outputs are the head_dim of the one key/value head
        # shared by all query heads, timm's MultiQueryAttention2d) cannot go: they take part
        # in every head's scores or outputs; those roots alone are left out
        side = [r for i in infos if isinstance(i, Lab) and any(a >= nd - 2 for a in i.axes)
                for r in i.roots]
        if side:
            call.block(sorted(set(side)), f"they reach {call.where} on the sequence or head_dim "
                       "axis")
            infos = [call.read(r) for r in refs]
            if not any(isinstance(i, Lab) for i in infos):
                return None
        # every axis before (sequence, head_dim) is a batch axis of the attention: the heads
        # are the one that carries labels (axis -3 for (B, heads, L, E); axis 1 of nested
        # blocks laid out (B, heads, T, L, E)), the same one for q, k and v
        axes = {i.axes for i in infos if isinstance(i, Lab)}
        head = next(iter(axes))[0] if len(axes) == 1 and len(next(iter(axes))) == 1 else nd - 3
        if any(isinstance(i, Lab) and i.axes != (head,) for i in infos) or head >= nd - 2:
            call.block_all(f"they reach {call.where} on the sequence or head_dim axis")
            return None
        if head != nd - 3 and call.node.kwargs.get("enable_gqa"):
            call.block_all(f"they reach {call.where} with enable_gqa on axis {head - nd} "
                           "(its key/value heads are axis -3)")
            return None
        hq, hk, hv = (m[head] for m in metas)
        if hk != hv or hq % hk:
            call.block_all(f"{call.where} pairs {hq} query heads with {hk} key and {hv} value heads")
            return None
        rep = hq // hk
        arrs = [i.arr if isinstance(i, Lab) else np.full(m[head], -1, dtype=np.int64)
                for i, m in zip(infos, metas, strict=True)]
        tied_in = [arrs[0], np.repeat(arrs[1], rep), np.repeat(arrs[2], rep)]
        if isinstance(infos[0], Lab) and all(
                not isinstance(infos[i], Lab) and _uniform(call, refs[i], head, []) for i in (1, 2)):
            # one key/value head for all query heads (multi-query attention, with enable_gqa
            # or its copies): the query heads are independent of each other
            tied_in = [arrs[0]]
        mask = call.arg(3, "attn_mask")
        minfo = call.read(mask)
        if isinstance(minfo, Lab):
            mmeta = call.meta(mask)
            if _on(minfo, nd - len(mmeta)) != (head,) or minfo.arr.shape[0] != hq:
                call.block_all(f"they reach the mask of {call.where} on other axes")
                return None
            tied_in.append(minfo.arr)
        tied = call.tie(tied_in)
        if tied is None:
            return None
        for a in arrs:
            call.mark_heads(call.fresh(a))
        if not isinstance(minfo, Lab) and mask is not None and not _mask(call, mask, head, nd, tied):
            return None
        return Lab((head,), tied)


class MatmulRule(FunctionRule):
    """``matmul`` / ``bmm`` / ``@``: labels on the batch axes of both operands are tied (the
    heads of ``q @ k^T`` and ``attn @ v``, marked as heads); labels on the rows of the first or
    the columns of the second follow into the output; labels on the contracted axis block.
    A product whose operands carry no labels keeps the parameter axes that reach the output
    whole: the rows of a parameter on the left, the columns of one on the right, when the
    other operand is no parameter (a position table read by one-hot rows, ``one_hot @
    table``, keeps the table's channel axis)."""

    def params(self, call: Call) -> PView | None:
        a, b = call.arg(0, "input"), call.arg(1, "other", call.node.kwargs.get("mat2"))
        ma, mb, out = call.meta(a), call.meta(b), call.out
        if ma is None or mb is None or len(ma) < 2 or len(mb) < 2 or len(out) < 2:
            return None
        ia, ib = call.read(a), call.read(b)
        if isinstance(ia, PView) == isinstance(ib, PView):
            return None  # a product of two parameters: neither axis is one parameter's alone
        if isinstance(ia, PView):
            return PView(ia.key, (*(None,) * (len(out) - 2), ia.dims[-2], None))
        return PView(ib.key, (*(None,) * (len(out) - 1), ib.dims[-1]))

    def labels(self, call: Call) -> Lab | None:
        a, b = call.arg(0, "input"), call.arg(1, "other", call.node.kwargs.get("mat2"))
        ma, mb = call.meta(a), call.meta(b)
        ia, ib = call.read(a), call.read(b)
        out = call.out
        if ma is None or mb is None or len(ma) < 2 or len(mb) < 2:
            call.block_all()
            return None
        nd = len(out)
        sa, sb = nd - len(ma), nd - len(mb)
        axa, axb = _on(ia, sa), _on(ib, sb)
        if (axa and nd - 1 in axa) or (axb and nd - 2 in axb):
            call.block_all(f"{call.where} multiplies over them")
            return None
        batch = set(range(nd - 2))
        if axa and axb:
            if len(axa) != 1 or axa != axb or axa[0] not in batch \
                    or ia.arr.shape != ib.arr.shape:
                call.block_all(f"{call.where} meets them on different axes")
                return None
            tied = call.tie([ia.arr, ib.arr])
            if tied is None:
                return None
            call.mark_heads(tied)
            return Lab(axa, tied)
        lab, ax, other, shift = (ia, axa, mb, sb) if axa else (ib, axb, ma, sa)
        other_ref = b if axa else a
        for d in ax:
            if d in batch and d - shift >= 0 and other[d - shift] != 1:
                if len(ax) == 1 and _uniform(call, other_ref, d - shift, []):
                    # the copies of one key/value head for every query head (multi-query
                    # attention through repeat_kv): the query heads stay independent
                    call.mark_heads(lab.arr)
                    continue
                call.block(lab, f"{call.where} meets them with a tensor no prunable layer owns")
                return None
        return Lab(ax, lab.arr)


builtin(names=("scaled_dot_product_attention",), rule=SDPARule())
# ``matmul`` itself is registered by `linear_conv` (a Linear's own weight, transposed: its linear map)
builtin(names=("bmm",), rule=MatmulRule())
