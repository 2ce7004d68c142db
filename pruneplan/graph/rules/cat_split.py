"""Concatenation, stacking, splitting and channel shuffles: labels are joined, cut or re-ordered;
parts that must stay equal are coupled position by position."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from pruneplan.graph._ir import Ref
from pruneplan.graph._labels import Lab, PView
from pruneplan.graph.rules.base import Call, FunctionRule, ModuleRule, builtin, iter_refs

__all__ = ["CatRule", "ShuffleRule", "SplitRule", "StackRule", "part_attributes", "sequence", "shuffle",
           "split_attribute"]


def sequence(call: Call, arg: Any) -> list[tuple[Any, Any]]:
    """``(info, shape)`` of each tensor of a sequence argument (a list of tensors, or a graph
    value that is a tuple)."""
    if isinstance(arg, Ref) and isinstance(call.meta(arg), list):
        info = call.read(arg)
        metas = call.meta(arg)
        infos = info if isinstance(info, list) else [None] * len(metas)
        return list(zip(infos, metas, strict=True))
    return [(call.read(r), call.meta(r)) for r in iter_refs(arg)]


def _tensors(call: Call) -> Any:
    return call.node.args[0] if call.node.args else call.node.kwargs.get("tensors")


class CatRule(FunctionRule):
    """``cat``: along the labelled axis the labels are concatenated (unlabelled parts get no
    label); along another axis the parts meet position by position (coupled)."""

    def labels(self, call: Call) -> Lab | None:
        items = sequence(call, _tensors(call))
        nd = len(call.out)
        dim = call.arg(1, "dim", 0) % nd
        if any(isinstance(i, Lab) and dim in i.axes for i, _ in items):
            if any(isinstance(i, Lab) and i.axes != (dim,) for i, _ in items):
                call.block(call.labelled_in(i for i, _ in items),
                           f"{call.where} concatenates them with other layouts")
                return None
            parts = [i.arr if isinstance(i, Lab) else np.full(m[dim], -1, dtype=np.int64)
                     for i, m in items]
            return Lab((dim,), np.concatenate(parts))
        return call.merge(items)


class StackRule(FunctionRule):
    """``stack`` along a new axis ties its inputs position by position; ``hstack``/``vstack``
    block."""

    def labels(self, call: Call) -> Lab | None:
        if call.name != "stack":
            call.block_all()
            return None
        items = sequence(call, _tensors(call))
        dim = call.arg(1, "dim", 0) % len(call.out)
        moved = []
        for info, meta in items:
            meta = torch.Size((*meta[:dim], 1, *meta[dim:]))
            if isinstance(info, Lab):
                info = Lab(tuple(a + (a >= dim) for a in info.axes), info.arr)
            elif isinstance(info, PView):
                info = PView(info.key, (*info.dims[:dim], None, *info.dims[dim:]))
            moved.append((info, meta))
        return call.merge(moved)


class SplitRule(FunctionRule):
    """chunk / split / tensor_split / unbind: equal parts of the labelled axis are tied
    position by position (a unit of the group is position ``j`` of every part, so the parts stay
    equal: CSP / C2f blocks, GLU). A split size written as a number moves with the units when
    one attribute of the module holds it (`split_attribute`). A split into a list of sizes the
    module holds (an int attribute each, or one list attribute) leaves every part its own
    labels and edits each size by the units of its part (`part_attributes`); other fixed-size
    parts block."""

    def labels(self, call: Call) -> Any:
        x = self.main(call)
        if x is None:
            return None
        name = call.name
        nd = len(call.xmeta)
        dim = call.arg(2 if name != "unbind" else 1, "dim", 0) % nd
        outs = call.out
        if dim not in x.axes:
            if name == "unbind":
                return [Lab(tuple(a - (a > dim) for a in x.axes), x.arr)] * len(outs)
            return [x] * len(outs)
        if name == "unbind":  # one part per position, the axis itself goes away
            call.block(x, f"{call.where} takes their axis apart into one tensor per position, "
                       "so the number of parts would change with the units")
            return None
        sizes = [m[dim] for m in outs]
        how = _sections(call)
        if name in ("split", "split_with_sizes") and isinstance(how, list | tuple) \
                and x.axes == (dim,) and [v for v in how if type(v) is int] == sizes:
            return _parts(call, x, dim, sizes)
        # split(n): equal parts of n, n from an attribute of the module (GPT-2's split_size)
        by_size = name == "split" and isinstance(how, int) and not isinstance(how, bool)
        fixed = name == "split_with_sizes" or (name == "split" and not by_size) or (
            name == "tensor_split" and not isinstance(how, int))
        if x.axes != (dim,) or fixed or len(set(sizes)) != 1:
            call.block(x, f"{call.where} splits them into fixed-size parts")
            return None
        rows = x.arr.reshape(len(sizes), -1)
        if not by_size:
            for i in range(1, len(sizes)):  # the parts must stay equal: position j of each part
                call.couple(rows[0], rows[i])
            return [Lab((dim,), rows[i].copy()) for i in range(len(sizes))]
        # the parts lose the same positions (query/key/value of a packed projection, the halves
        # of a CSP stage: a unit then owns one position in each part)
        if call.tie(list(rows), lazy=True) is None:
            return None
        rows = call.fresh(rows)
        attr = split_attribute(call, x, how, len(sizes))
        if attr is None:
            return None
        key, value = attr
        call.edit(key, value, rows[0] if value == how else rows.reshape(-1), module=call.node.scope)
        return [Lab((dim,), rows[i].copy()) for i in range(len(sizes))]


def _sections(call: Call) -> Any:
    """The second argument of a split (its keyword differs between spellings)."""
    for kw in ("split_size_or_sections", "split_size", "split_sizes", "sections",
               "indices_or_sections"):
        if kw in call.node.kwargs:
            return call.node.kwargs[kw]
    return call.node.args[1] if len(call.node.args) > 1 else None


def _parts(call: Call, x: Lab, dim: int, sizes: list[int]) -> list[Lab] | None:
    """``split(x, [a, b, ...])`` of the labelled axis with every size held by the running
    module (`part_attributes`): each part keeps the labels of its own positions and goes its
    own way (FasterNet's partial convolution, CoaT's per-part depthwise convolutions); the
    plan edits each part's size by the units removed from that part. A unit with channels in
    two parts blocks the roots (a unit is one part's or another's)."""
    ends = np.cumsum(sizes)[:-1]
    rows = np.split(x.arr, ends)
    seen = [np.unique(p[p >= 0]) for p in rows]
    every = np.concatenate(seen)
    labels, counts = np.unique(every, return_counts=True)
    straddle = labels[counts > 1]
    if straddle.size:
        call.block(x, f"{call.where} splits them into parts of sizes "
                   f"{sizes} and some of their units have channels in two parts, so the "
                   "parts' sizes cannot follow the units")
        return None
    keys = part_attributes(call, x, sizes)
    if keys is None:
        return None
    call.parts(x.roots)
    for key, size, part in zip(keys, sizes, rows, strict=True):
        call.edit(key, size, part, module=call.node.scope)
    return [Lab((dim,), part.copy()) for part in rows]


def part_attributes(call: Call, x: Lab, sizes: list[int]) -> list[str] | None:
    """The attributes of the module running ``split(x, sizes)`` that hold the sizes: the
    elements of one list or tuple attribute equal to ``sizes`` in order (keys
    ``"name[i]"``), or one int attribute per size (where several ints hold a size, those
    named like a count or an index are set aside). Blocks the roots of ``x`` (``None``) when
    no attribute or more than one way holds them."""
    mod = call.scope_module
    public = {n: v for n, v in (vars(mod).items() if mod is not None else ())
              if not n.startswith("_")}
    found: list[list[str]] = [[f"{n}[{i}]" for i in range(len(sizes))]
                              for n, v in sorted(public.items())
                              if isinstance(v, list | tuple) and list(v) == sizes
                              and all(type(e) is int for e in v)]
    ints = {n: v for n, v in public.items() if type(v) is int}
    per_part = []
    for size in sizes:
        names = sorted(n for n, v in ints.items() if v == size)
        if len(names) > 1:
            names = [n for n in names if not any(w in n.lower() for w in _NOT_WIDTHS)]
        per_part.append(names)
    if all(len(n) == 1 for n in per_part) and len({n[0] for n in per_part}) == len(sizes):
        found.append([n[0] for n in per_part])
    if len(found) == 1:
        return found[0]
    ambiguous = sorted({n for names in per_part if len(names) > 1 for n in names})
    if found:
        shown = " or ".join(", ".join(k) for k in found)
        why = f"several attributes of its module hold them ({shown})"
    elif ambiguous:
        why = f"several attributes of its module hold the same size ({', '.join(ambiguous)})"
    elif all(per_part):
        names = [n[0] for n in per_part]
        shared = sorted({n for n in names if names.count(n) > 1})
        why = f"the same attribute of its module holds the sizes of several parts ({', '.join(shared)})"
    else:
        why = ("no attribute of its module holds them (one int attribute per part, or one list "
               "or tuple attribute)")
    call.block(x, f"{call.where} splits them into parts of sizes {sizes} written as numbers "
               f"and {why}, so the parts' sizes would not follow pruned channels (register a "
               "rule for the module)")
    return None


#: Words in attribute names that are no channel widths.
_NOT_WIDTHS = ("idx", "index", "layer", "num", "stride", "kernel", "group", "head", "depth",
               "step", "seed", "dilation", "padding")


def split_attribute(call: Call, x: Lab, size: int, parts: int) -> tuple[str, int] | None:
    """``split(size)`` / ``split([size, size])`` of the labelled axis with the size written as a
    number: the attribute of the module running the split that holds it (``size``, or the
    whole width ``parts * size``, as timm's ``CrossStage.expand_chs``), which the plan then
    edits so that the split point moves with the pruned units. Exactly one public int
    attribute must match (a split of the module's own input prefers ``in*`` names), else the
    roots are blocked (``None``)."""
    from pruneplan.graph.rules.reshape import _HEAD_WORDS, _WIDTH_WORDS

    mod = call.scope_module
    ints = {n: v for n, v in (vars(mod).items() if mod is not None else ())
            if type(v) is int and not n.startswith("_")}
    # the size itself under a width name, preferably a split/head name (GPT-2's split_size)
    named = [n for n, v in ints.items() if v == size and any(w in n.lower() for w in
             _HEAD_WORDS + _WIDTH_WORDS) and not any(w in n.lower() for w in ("idx", "index", "layer"))]
    preferred = [n for n in named if any(w in n.lower() for w in _HEAD_WORDS)]
    names = sorted(preferred or named)
    if len(names) != 1:  # else the size or the whole width under any name that is no count
        names = sorted(n for n, v in ints.items() if v in (size, size * parts)
                       and not any(w in n.lower() for w in _NOT_WIDTHS))
    if len(names) > 1 and _module_input(call):
        # the module splits its own input: of the widths it holds (in_channels, out_channels
        # of timm's SelectiveKernel), the input width is the one split
        names = [n for n in names if n.lower().startswith("in")] or names
    if len(names) != 1:
        why = "no attribute of its module holds it" if not names else \
            f"several attributes of its module could hold it ({', '.join(names)})"
        call.block(x, f"{call.where} splits them at the size {size} written as a number and "
                   f"{why}, so the split point would not follow pruned channels (register a "
                   "rule for the module)")
        return None
    return names[0], getattr(mod, names[0])


def _module_input(call: Call) -> bool:
    """Whether the call's main input comes from outside the module running it (its input)."""
    node, scope = call.producer(call.xref), call.node.scope
    return node is not None and bool(scope) and node.scope != scope \
        and not node.scope.startswith(scope + ".")


def shuffle(call: Call, x: Lab, groups: int) -> Lab | None:
    """A channel shuffle of ``groups``: the groups are coupled, and the output labels are the
    input's re-arranged (position ``j * groups + g`` gets group ``g``'s ``j``-th channel)."""
    if x.axes != (1,):
        call.block(x, f"{call.where} shuffles other axes")
        return None
    g = x.arr.reshape(groups, -1)
    for i in range(1, groups):
        call.couple(g[0], g[i], tie=True)
    return Lab((1,), np.ascontiguousarray(g.T).reshape(-1))


class ShuffleRule(ModuleRule):
    """``nn.ChannelShuffle``."""

    def labels(self, call: Call, x: Lab) -> Lab | None:
        return shuffle(call, x, call.module.groups)


builtin(names=("cat", "concat", "concatenate"), rule=CatRule())
builtin(names=("stack", "hstack", "vstack"), rule=StackRule())
builtin(names=("chunk", "split", "tensor_split", "unbind", "split_with_sizes"), rule=SplitRule())
builtin([nn.ChannelShuffle], rule=ShuffleRule())
