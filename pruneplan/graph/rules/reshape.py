"""Views and layout changes: view/reshape/flatten, permute/transpose, expand, indexing, flip/roll,
and the shapes and sizes read off labelled tensors (fx keeps them as graph values)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from pruneplan.graph._ir import Ref
from pruneplan.graph._labels import Dim, Lab, PView, Sizes, canon, reshape_groups
from pruneplan.graph.rules.base import Call, FunctionRule, ModuleRule, builtin, tensorish
from pruneplan.graph.rules.layers import root_slices

__all__ = ["ExpandRule", "FlipRule", "GetitemRule", "PermuteRule", "ReshapeRule", "relabel"]

RESHAPE = ("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as")
PERMUTE = ("permute", "transpose", "swapaxes", "swapdims", "t", "T", "mT", "movedim", "moveaxis")
EXPAND = ("expand", "expand_as", "broadcast_to", "repeat", "tile")
#: Operations that take a target shape after the tensor: a labelled width used there is checked.
SHAPED = frozenset({"view", "reshape", "expand"})
CREATE = ("zeros", "ones", "empty", "full", "rand", "randn")


def _squeeze(g: np.ndarray, go: list[int]) -> tuple[np.ndarray, tuple[int, ...]]:
    """Drop the axes of ``g`` along which the labels do not change; the output axes kept."""
    keep = [k for k in range(g.ndim)
            if g.shape[k] > 1 and not np.array_equal(g, np.broadcast_to(np.take(g, [0], axis=k), g.shape))]
    g = g[tuple(slice(None) if k in keep else 0 for k in range(g.ndim))]
    return np.ascontiguousarray(g), tuple(go[k] for k in keep)


def relabel(call: Call, x: Lab, a: Any, b: Any) -> Lab | None:
    """Labels ``x`` of a tensor of shape ``a`` viewed as shape ``b`` (same elements, same order).

    Labels landing on several output axes (channels split into ``(groups, per_group)``) are
    kept as a multi-axis label whose rows are tied (each group keeps the same channels); a
    root whose units fill several whole rows (a projection split into ``(heads, head_dim)``)
    is regrouped first, one unit per row, so that its labels live on the outer axis alone.
    Labels repeated along an axis (a broadcast) couple the copies.
    """
    groups = reshape_groups(tuple(a), tuple(b)) if isinstance(b, torch.Size) else None
    if groups is None:
        call.error("reshapes them in a way pruneplan cannot read", x)
        return None
    hit = [g for g in groups if set(g[0]) & set(x.axes)]
    if len(hit) != 1:
        call.block(x, f"{call.where} reshapes them across separate axes")
        return None
    gi, go = hit[0]
    sub_in = [a[d] for d in gi]
    sub_out = [b[d] for d in go]
    bshape = [a[d] if d in x.axes else 1 for d in gi]
    full = np.broadcast_to(x.arr.reshape(bshape), sub_in).reshape(sub_out)
    g, axes = _squeeze(full, go)
    if len(axes) == 2 and _equal_parts(call, x, axes):
        # (parts, C // parts): channel c of every part goes together (the paths of a
        # selective-kernel attention, softmax-ed across the parts per position)
        if call.tie(list(g), lazy=True) is None:
            return None
        g, axes = _squeeze(call.fresh(full), go)
    if len(axes) > 1 and call.coarsen_rows(g.reshape(-1, g.shape[-1])):
        g, axes = _squeeze(call.fresh(full), go)
    if len(axes) > 1:
        # the rows are tied position by position: the units end on the last axis, or on the
        # axis whose size is the module's head count (Falcon's ``view(B, T, heads, 3, hd)``
        # keeps q, k and v of a head together, timm's ``(3, heads, hd)`` the other way round)
        k = _head_axis(call, axes)
        rows = np.moveaxis(g, k, -1) if k is not None else g
        if call.tie(list(rows.reshape(-1, rows.shape[-1])), lazy=True) is None:
            return None
        g, axes = _squeeze(call.fresh(full), go)
    if not axes:
        call.block(x, f"{call.where} reshapes them away")
        return None
    lab = Lab(axes, g)
    if call.regrouped or call.is_heads(lab):
        _counted(call, lab)
        return fixed_sizes(call, lab)
    if not literal_width(call, lab):
        return None

    def later() -> None:
        # units that are coupled to heads further on (a per-head bias made by an MLP, a
        # talking-heads projection): a head count written as a number here must be an
        # attribute of the module (``self.num_heads``, edited) or come from the sizes of a
        # tensor at run time (which the recorded number cannot tell: it is left alone); a
        # tuple attribute holding the shape cannot be edited
        fresh = Lab(lab.axes, call.fresh(lab.arr))
        if call.is_heads(fresh):
            _head_count(call, fresh)

    call.later(later)
    return lab


def _counted(call: Call, lab: Lab) -> None:
    """Heads (or query groups) landing on the axis a view sizes ``-1``: the view follows them,
    but the module may use its count elsewhere (Falcon's ``view(B, T, -1, self.num_heads //
    self.num_kv_heads + 2, hd)`` needs ``num_kv_heads`` to shrink with the query groups on
    that axis). Every ``*heads*`` int attribute of the module running the view that equals
    the axis's size is edited with the units."""
    args = shape_args(call)
    mod = call.scope_module
    out = call.out
    if args is None or mod is None or len(lab.axes) != 1 or not isinstance(out, torch.Size):
        return
    axis = lab.axes[0]
    if type(args[axis]) is not int or args[axis] != -1 or lab.arr.ndim != 1:
        return
    count = int(out[axis])
    for n, v in vars(mod).items():
        if type(v) is int and v == count and "heads" in n.lower() and not n.startswith("_"):
            call.edit(n, v, lab.arr, module=call.node.scope)


def _head_axis(call: Call, axes: tuple[int, ...]) -> int | None:
    """Which of the view's labelled output ``axes`` (its index in ``axes``) counts the units:
    the one given the size ``-1`` (what remains: the count that follows pruning, as in
    Falcon's ``view(B, T, -1, heads // kv_heads + 2, head_dim)`` of query groups), else the one
    given a size that a ``*heads*`` int attribute of the module running the view holds
    (``self.num_heads``), when exactly one was; ``None`` otherwise."""
    args = shape_args(call)
    mod = call.scope_module
    if args is None or mod is None:
        return None
    rest = [i for i, a in enumerate(axes) if type(args[a]) is int and args[a] == -1]
    if len(rest) == 1:
        return rest[0]
    heads = {v for n, v in vars(mod).items() if type(v) is int and "heads" in n.lower()
             and not n.startswith("_")}
    hit = [i for i, a in enumerate(axes) if type(args[a]) is int and args[a] in heads]
    return hit[0] if len(hit) == 1 else None


def _equal_parts(call: Call, x: Lab, axes: tuple[int, ...]) -> bool:
    """Whether a view splits the labelled channels ``x`` (``C`` of them) into ``(P, C // P)``
    on ``axes`` with ``C // P`` read off these very channels (``x.view(B, P, C // P, H, W)``
    after ``B, C, H, W = x.shape``, timm's selective-kernel attention) and ``P`` a number that
    is no head count (no ``*head*`` attribute of the module holds it): the parts are then
    *parts*, whose count stays while each shrinks, so position ``c`` of every part is one
    unit. (A head split keeps ``head_dim`` and loses whole rows, `coarsen_rows`.)"""
    args = shape_args(call)
    out = call.out
    if args is None or len(x.axes) != 1 or not isinstance(out, torch.Size):
        return False
    count, size = args[axes[0]], args[axes[1]]
    if not isinstance(count, int) or isinstance(count, bool) or count != out[axes[0]] or count < 2:
        return False
    dim = call.read(size) if isinstance(size, Ref) else None
    if not isinstance(dim, Dim) or dim.div != count or dim.arr is None \
            or len(dim.arr) != x.arr.size or set(dim.roots) != set(x.roots):
        return False
    mod = call.scope_module
    return not any(type(v) is int and v == count and "head" in n.lower()
                   for n, v in (vars(mod).items() if mod is not None else ()))


#: Attribute names that hold the width of attention heads or their count (preferred, in this
#: order of checks) and names of other widths a module may cache.
_HEAD_WORDS = ("head", "inner", "attn", "split")
_WIDTH_WORDS = ("dim", "size", "width", "embed", "hidden", "channels", "features")


def shape_args(call: Call) -> list[Any] | None:
    """The sizes a view/reshape/unflatten call was given, one per output axis (``None`` when
    they cannot be read)."""
    node, out = call.node, call.out
    if call.name in ("view", "reshape"):
        args = list(node.args[1:]) or [node.kwargs.get("shape", node.kwargs.get("size"))]
        if len(args) == 1 and isinstance(args[0], tuple | list | torch.Size):
            args = list(args[0])
        return args if len(args) == len(out) else None
    if call.name == "unflatten":
        dim, sizes = call.arg(1, "dim"), call.arg(2, "sizes")
        if not isinstance(dim, int) or not isinstance(sizes, tuple | list):
            return None
        d = dim % (len(out) - len(sizes) + 1)
        return [None] * d + list(sizes) + [None] * (len(out) - d - len(sizes))
    return None


def fixed_sizes(call: Call, lab: Lab) -> Lab | None:
    """Attention heads (or positions of heads) landing on an output axis whose size the code
    wrote as a number: the number must come from an attribute of the module running the view
    (``self.num_heads``, ``self.attn_dim``), which the plan then edits; otherwise the roots are
    blocked, since the view would fail or mis-split once heads are removed. ``-1`` and sizes
    read off the labelled channels themselves are fine (`constant_size`)."""
    fixed = _fixed_size(call, lab)
    if fixed is None:
        return lab
    v, at_run_time = fixed
    if at_run_time:
        return None if _run_time(call, lab, v) else lab
    return lab if attribute_size(call, lab, v) else None


def _fixed_size(call: Call, lab: Lab) -> tuple[int, bool] | None:
    """The constant size (`constant_size`) a view gives ``lab``'s one axis, and whether it was
    computed at run time rather than written as a number; ``None`` when the axis may follow
    the units (``-1``, a width of labelled channels) or the call is no view of one axis."""
    args = shape_args(call)
    if args is None or len(lab.axes) != 1:
        return None
    v = constant_size(call, args[lab.axes[0]], lab.axes[0])
    return None if v is None else (v, isinstance(args[lab.axes[0]], Ref))


def constant_size(call: Call, v: Any, axis: int) -> int | None:
    """The size ``v`` given for output ``axis`` of a view when it cannot follow pruned units:
    a number written in the code, or a size computed at run time from anything but a width of
    labelled channels (the width of an axis whose roots were left out, which stays as it is).
    ``None`` for ``-1`` and for a width of labelled channels (checked by `Call.check_widths`)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return None if v == -1 else v
    if isinstance(v, Ref) and not isinstance(call.read(v), Dim) and isinstance(call.out, torch.Size):
        return int(call.out[axis])
    return None


def _run_time(call: Call, lab: Lab, v: int) -> bool:
    """Block ``lab``'s roots: their axis gets the size ``v`` computed at run time from channels
    that stay (no attribute can stand for it). Returns ``True``."""
    call.block(lab, f"{call.where} gives their axis the size {v} read at run time from a tensor "
               "whose channels stay, so the view would fail once units are removed")
    return True


def literal_width(call: Call, lab: Lab) -> bool:
    """Channels landing on an output axis whose size is a constant (`constant_size`): when the
    code wrote it as a number that exactly one integer attribute of the module running the
    view holds under a width name (torchvision's ViT: ``x.reshape(n, self.hidden_dim, n_h *
    n_w)``), the plan edits it with the units; otherwise (``x.view(-1, 16 * 5 * 5)``, a size
    read off channels that stay) the roots are blocked (``False``), since the view would fail
    or mis-split once units are removed."""
    fixed = _fixed_size(call, lab)
    if fixed is None:
        return True
    v, at_run_time = fixed
    if at_run_time:
        return not _run_time(call, lab, v)
    names = _attributes(call, v)
    if len(names) == 1 or (len(names) > 1 and all("heads" in n.lower() for n in names)):
        for n in sorted(names):  # equal head counts: see `attribute_size`
            call.edit(n, v, lab.arr, module=call.node.scope)
        return True
    why = "no attribute of its module holds it" if not names else \
        f"several attributes of its module hold it ({', '.join(sorted(names))})"
    call.block(lab, f"{call.where} gives their axis the fixed size {v} and {why}, so the view "
               "would fail once units are removed")
    return False


def _attributes(call: Call, v: int) -> list[str]:
    """Integer attributes of the module running the call equal to ``v`` with a width name."""
    mod = call.scope_module
    return [n for n, val in (vars(mod).items() if mod is not None else ())
            if type(val) is int and val == v and not n.startswith("_")
            and any(w in n.lower() for w in _HEAD_WORDS + _WIDTH_WORDS)
            and not any(w in n.lower() for w in ("idx", "index", "layer"))]


def _head_count(call: Call, lab: Lab) -> None:
    """A head count written as a number where units coupled to heads lie, in a view of a
    per-head tensor (a relative position bias made by an MLP, often in a method of a
    submodule called by the attention, ``self.rel_pos.get_bias()``): every ``*heads*`` int
    attribute holding it in the module running the view or below is edited with the heads, and
    so is that element of a tuple attribute holding the whole shape (``view(self.bias_shape)``:
    the edit ``bias_shape[2]``). A number no such attribute holds is taken as computed from
    tensor sizes."""
    args = shape_args(call)
    mod = call.scope_module
    if args is None or len(lab.axes) != 1 or mod is None:
        return
    v = args[lab.axes[0]]
    if not isinstance(v, int) or isinstance(v, bool) or v == -1:
        return
    scope = call.node.scope
    mods = [(".".join(p for p in (scope, n) if p), m) for n, m in mod.named_modules()]
    held = [(p, n) for p, m in mods for n, val in vars(m).items()
            if isinstance(val, tuple | list) and list(val) == list(args)]
    for p, n in held:
        call.edit(f"{n}[{lab.axes[0]}]", v, lab.arr, module=p)
    done = _attributes(call, v)  # `literal_width` edited those of the module itself
    for p, m in mods:
        for n, val in vars(m).items():
            if type(val) is int and val == v and "heads" in n.lower() and not n.startswith("_") \
                    and not (p == scope and n in done):
                call.edit(n, v, lab.arr, module=p)


def attribute_size(call: Call, lab: Lab, v: int) -> bool:
    """The size ``v``, written as a number where labels ``lab`` (one axis) lie, is an attribute
    of the module running the call: edit it with the units (``False``: blocked, no such
    attribute or several, unless the several are all head counts, which are all edited)."""
    names = _attributes(call, v)
    preferred = [n for n in names if any(w in n.lower() for w in _HEAD_WORDS)]
    pick = preferred or names
    if not pick and _head_product(call, lab, v):
        return True
    if len(pick) > 1 and all("heads" in n.lower() for n in pick):
        # head counts under several names that agree (``num_heads`` and ``num_kv_heads`` of an
        # attention without grouped queries): each query head meets its own key/value head,
        # so a unit removes one of each and every count shrinks with the units
        for n in sorted(pick):
            call.edit(n, v, lab.arr, module=call.node.scope)
        return True
    if len(pick) != 1:
        why = "no attribute of its module holds it" if not pick else \
            f"several attributes of its module hold it ({', '.join(sorted(pick))})"
        call.block(lab, f"{call.where} writes the size {v} of their axis as a number and "
                   f"{why}, so it would not follow pruned units")
        return False
    call.edit(pick[0], v, lab.arr, module=call.node.scope)
    return True


def param_sizes(call: Call, view: PView | None, args: list[Any] | None) -> PView | None:
    """A view of a parameter whose output axes were given the sizes ``args``: where an axis
    that is a whole axis of the parameter got its size as a number (``scale.view(64, 1, 1)``,
    ``table.view(self.bias_shape)``), that number must shrink with any units that slice the
    parameter there. Checked once everything is known (`Call.later`): when exactly one tuple
    attribute of the module running the view (or of a module below it) holds the whole shape,
    the plan edits that element of it (``shape[0]``); else when exactly one integer attribute
    of the module holds the number under a width name, the plan edits it; otherwise (a bare
    number, or several candidates) the roots slicing the parameter there are left out. ``-1``
    and sizes read off tensors are fine."""
    if view is None or args is None or len(args) != len(view.dims):
        return view
    for o, (p, v) in enumerate(zip(view.dims, args, strict=True)):
        if p is None or not isinstance(v, int) or isinstance(v, bool) or v == -1:
            continue
        call.later(_param_size_check(call, view.key, p, v, o, args))
    return view


def _param_size_check(call: Call, key: str, axis: int, v: int, o: int,
                      args: list[Any]) -> Callable[[], None]:
    scope, mod = call.node.scope, call.scope_module
    mods = [(".".join(q for q in (scope, n) if q), m) for n, m in mod.named_modules()] \
        if mod is not None else []
    held = [(q, n) for q, m in mods for n, val in vars(m).items()
            if isinstance(val, tuple | list) and list(val) == list(args)]
    own = [(q, n) for q, n in held if q == scope]
    edit: tuple[str, str] | None = None
    if len(own) == 1 or len(held) == 1:
        q, n = (own or held)[0]
        edit = (q, f"{n}[{o}]")
    names = [] if held else _attributes(call, v)
    if len(names) == 1:
        edit = (scope, names[0])
    if held:
        why = ("from tuples that several modules hold (" + ", ".join(
            f"{q or '<top level>'}.{n}" for q, n in held) + ")")
    elif names:
        why = f"written as a number that several attributes of its module hold ({', '.join(sorted(names))})"
    else:
        why = "written as a number no attribute of its module holds"

    def check() -> None:
        owners = call.sliced(key, axis)
        if not owners:
            return
        if edit is not None:
            for r, per in owners:
                call.edit_root(r, edit[1], v, per, module=edit[0])
            return
        call.block([r for r, _ in owners], f"{call.where} views parameter {key!r} with the size "
                   f"{v} of its axis {axis} {why}, so the view would fail once units are removed")

    return check


def _head_product(call: Call, lab: Lab, v: int) -> bool:
    """``v`` is ``self.num_heads * self.head_dim`` computed in the forward (VOLO's class
    attention: ``reshape(B, 1, self.head_dim * self.num_heads)``) where the axis holds the
    heads: one ``*heads*`` attribute equal to the number of heads there and one ``*head_dim*``
    attribute equal to the positions of each. The head count is edited with the heads; the
    product then follows them (``head_dim`` stays)."""
    mod = call.scope_module
    arr = lab.arr
    if mod is None or arr.ndim != 1 or len(arr) != v or not (arr >= 0).all():
        return False
    units, counts = np.unique(arr, return_counts=True)
    per = int(counts[0])
    if (counts != per).any() or len(units) * per != v:
        return False
    ints = {n: val for n, val in vars(mod).items() if type(val) is int and not n.startswith("_")}
    count = [n for n, val in ints.items() if "heads" in n.lower() and val == len(units)]
    width = [n for n, val in ints.items() if "head_dim" in n.lower() and val == per]
    if len(count) != 1 or len(width) != 1:
        return False
    call.edit(count[0], len(units), units, module=call.node.scope)
    return True


def _view_dims(x: PView, a: Any, out: Any) -> PView | None:
    groups = reshape_groups(tuple(a), tuple(out))
    if groups is None:
        return None
    dims: list[int | None] = [None] * len(out)
    for gi, go in groups:
        big_i = [d for d in gi if a[d] != 1]
        big_o = [d for d in go if out[d] != 1]
        if len(big_i) > 1 or len(big_o) > 1:
            # merged or split axes are no single axis of the parameter: nothing sliceable
            # there (units meeting them are blocked), the other axes keep theirs (a learned
            # position table (1, H, W, C) viewed as (1, H * W, C) keeps its channel axis)
            continue
        if big_i and big_o:
            dims[big_o[0]] = x.dims[big_i[0]]
    return PView(x.key, tuple(dims))


def _param(call: Call) -> PView | None:
    """The parameter view at the main input when the output is a tensor."""
    x = call.x
    return x if isinstance(x, PView) and isinstance(call.out, torch.Size) else None


class ReshapeRule(FunctionRule):
    """view / reshape / flatten / unflatten / squeeze / unsqueeze (and the ``_as`` forms)."""

    def propagate(self, call: Call) -> Any:
        out = super().propagate(call)
        if call.name in SHAPED and tensorish(call.out):
            call.check_widths(out, call.node.args[1:])
        return out

    def params(self, call: Call) -> PView | None:
        x = _param(call)
        view = _view_dims(x, call.xmeta, call.out) if x is not None else None
        return param_sizes(call, view, shape_args(call))

    def labels(self, call: Call) -> Lab | None:
        x = self.main(call)
        return relabel(call, x, call.xmeta, call.out) if x is not None else None


class FlattenRule(ModuleRule):
    """``nn.Flatten`` / ``nn.Unflatten``."""

    def labels(self, call: Call, x: Lab) -> Lab | None:
        return relabel(call, x, call.xmeta, call.out)


def permutation(call: Call, nd: int) -> list[int] | None:
    """Output axis ``i`` is input axis ``perm[i]``; ``None`` when the arguments are unreadable."""
    name = call.name
    args = call.node.args[1:]
    try:
        if name == "permute":
            dims = call.node.kwargs.get("dims", args[0] if len(args) == 1 and isinstance(
                args[0], tuple | list) else args)
            return [d % nd for d in dims]
        if name in ("transpose", "swapaxes", "swapdims"):
            d0 = call.arg(1, "dim0") % nd
            d1 = call.arg(2, "dim1") % nd
            perm = list(range(nd))
            perm[d0], perm[d1] = perm[d1], perm[d0]
            return perm
        if name == "t":
            return [1, 0] if nd == 2 else list(range(nd))
        if name == "T":
            return list(reversed(range(nd)))
        if name == "mT":
            return [*range(nd - 2), nd - 1, nd - 2]
        if name in ("movedim", "moveaxis"):
            src, dst = call.arg(1, "source"), call.arg(2, "destination")
            return [int(v) for v in np.moveaxis(np.arange(nd), src, dst)]
    except (TypeError, IndexError, ValueError):
        return None
    return None


class PermuteRule(FunctionRule):
    """permute / transpose / movedim and friends: labels move with their axes."""

    def params(self, call: Call) -> PView | None:
        x = _param(call)
        if x is None:
            return None
        perm = permutation(call, len(call.xmeta))
        return PView(x.key, tuple(x.dims[p] for p in perm)) if perm is not None else None

    def labels(self, call: Call) -> Lab | None:
        x = self.main(call)
        if x is None:
            return None
        perm = permutation(call, len(call.xmeta))
        if perm is None:
            call.error("permutes them in a way pruneplan cannot read", x)
            return None
        return canon(tuple(perm.index(a) for a in x.axes), x.arr)


class ExpandRule(FunctionRule):
    """expand / broadcast_to / repeat / tile: leading axes added; the labelled axes must stay."""

    def propagate(self, call: Call) -> Any:
        out = super().propagate(call)
        if call.name in SHAPED and tensorish(call.out):
            call.check_widths(out, call.node.args[1:])
        return out

    def params(self, call: Call) -> PView | None:
        x = _param(call)
        if x is None:
            return None
        a, out = call.xmeta, call.out
        shift = len(out) - len(a)
        dims = [None] * shift + [x.dims[d] if a[d] == out[d + shift] else None for d in range(len(a))]
        view = PView(x.key, tuple(dims))
        if call.name not in ("expand", "broadcast_to"):  # repeat/tile take multipliers
            return view
        args = list(call.node.args[1:]) or [call.node.kwargs.get("size")]
        if len(args) == 1 and isinstance(args[0], tuple | list | torch.Size):
            args = list(args[0])
        return param_sizes(call, view, args)

    def labels(self, call: Call) -> Lab | None:
        x = self.main(call)
        if x is None:
            return None
        out = call.out
        lab = x.shifted(len(out) - len(call.xmeta))
        if any(out[a] != lab.arr.shape[k] for k, a in enumerate(lab.axes)):
            call.block(x, f"repeated along their axis at {call.where}")
            return None
        return lab


class RepeatInterleaveRule(FunctionRule):
    """``repeat_interleave`` along an axis without labels (a global query repeated for every
    window, along the batch): the labels stay; along their own axis, or flattened, it blocks."""

    def labels(self, call: Call) -> Lab | None:
        x = self.main(call)
        if x is None:
            return None
        dim = call.arg(2, "dim")
        if not isinstance(dim, int) or isinstance(dim, bool) or len(call.out) != len(call.xmeta):
            call.block(x, f"{call.where} repeats them into one flat axis")
            return None
        if dim % len(call.xmeta) in x.axes:
            call.block(x, f"repeated along their axis at {call.where}")
            return None
        return x


def _trivial(idx: Any) -> bool:
    return all(it is None or it is Ellipsis or it == slice(None)
               for it in (idx if isinstance(idx, tuple) else (idx,)))


class GetitemRule(FunctionRule):
    """``x[...]``: an item of a tuple, a size of a shape, or basic indexing of a tensor."""

    def propagate(self, call: Call) -> Any:
        node = call.node
        x, idx = call.x, node.args[1]
        if isinstance(x, Sizes) and isinstance(idx, int):
            return call.width(x.lab, idx % x.ndim)
        if not tensorish(call.out):
            return None
        if isinstance(call.xmeta, list):
            return x[idx] if isinstance(x, list) and isinstance(idx, int | slice) else None
        owner = _embedding_lookup(call)
        if owner is not None:  # weight[ids]: the embedding itself (Whisper's positions)
            path, m = owner
            return call.root(-1, lambda: root_slices(path, m), path, m)
        return super().propagate(call)

    def params(self, call: Call) -> PView | None:
        x = _param(call)
        if x is None:
            return None
        idx = call.node.args[1]
        if isinstance(idx, Ref) and tensorish(call.meta(idx)):
            # table[index]: rows gathered by a tensor of indices (a relative position bias
            # table indexed per pair of positions); the other dims stay the table's
            lead = len(call.out) - (len(call.xmeta) - 1)
            return PView(x.key, (None,) * lead + x.dims[1:])
        if _trivial(idx):
            return _view_dims(x, call.xmeta, call.out)
        return _sliced_dims(x, idx, call.xmeta, call.out)

    def labels(self, call: Call) -> Lab | None:
        x = self.main(call)
        if x is None:
            return None
        idx = call.node.args[1]
        xmeta = call.xmeta
        items = list(idx) if isinstance(idx, tuple) else [idx]
        lists = [k for k, it in enumerate(items) if isinstance(it, list)]
        if len(lists) == 1 and all(type(v) is int for v in items[lists[0]]) and not any(
                isinstance(it, Ref) and tensorish(call.meta(it)) for it in items):
            # one list of positions (Falcon's ``qkv[:, :, :, [-2]]``): that axis stays in place,
            # with the listed positions; fine where the labels are not
            items[lists[0]] = _PICK
        # a graph value inside an index is an int computed at run time unless it is a tensor
        if any((isinstance(it, Ref) and tensorish(call.meta(it))) or isinstance(it, list)
               for it in items):
            return _gathered(call, x, items)
        nd = len(xmeta)
        if Ellipsis in items:
            k = items.index(Ellipsis)
            used = sum(1 for it in items if it is not None and it is not Ellipsis)
            items[k:k + 1] = [slice(None)] * (nd - used)
        items += [slice(None)] * (nd - sum(1 for it in items if it is not None))
        out = call.out
        where: dict[int, int] = {}
        i = o = 0
        for it in items:
            if it is None:
                o += 1
                continue
            if it is _PICK:  # a list of positions: the axis stays, labelled or not
                if i in x.axes:
                    call.block(x, f"{call.where} picks single positions")
                    return None
                i += 1
                o += 1
                continue
            if not isinstance(it, slice):  # an int (literal or computed): the axis goes
                if i in x.axes:
                    if call.shape_only():  # read for its shape alone: nothing follows
                        return None
                    call.block(x, f"{call.where} picks single positions")
                    return None
                i += 1
                continue
            # a slice of the same length as the axis (steps are positive in torch) is all of it
            if i in x.axes and out[o] != xmeta[i]:
                call.block(x, f"{call.where} slices their axis")
                return None
            where[i] = o
            i += 1
            o += 1
        return Lab(tuple(where[a] for a in x.axes), x.arr)


_PICK = object()  # `GetitemRule`: an axis indexed by one list of positions


def _embedding_lookup(call: Call) -> tuple[str, nn.Embedding] | None:
    """``weight[ids]`` with the whole weight of an ``nn.Embedding`` and a tensor of ids: that
    embedding's lookup (a subclass whose forward indexes its own weight, as Whisper's
    positional embedding does), a root on the last axis; ``None`` otherwise."""
    from pruneplan.graph.rules.linear_conv import _embedding_owner

    x, idx = _param(call), call.node.args[1]
    if x is None or x.dims != (0, 1) or not (isinstance(idx, Ref) and tensorish(call.meta(idx))):
        return None
    return _embedding_owner(call.model, x.key, call.node.scope)


def _gathered(call: Call, x: Lab, items: list[Any]) -> Lab | None:
    """``x[..., index, ...]`` with integer tensors among whole slices, on axes the labels are
    not on (a relative position bias of one column per head gathered per pair of positions,
    ``bias[index]``; CLIP's pooled text features ``h[arange(B), eos_positions]``, the channel
    axis taken whole): the labelled axes stay, moved as advanced indexing moves them (the
    index dims, broadcast together, replace adjacent tensor-indexed axes in place, or lead
    when those axes are apart). Anything else (a boolean mask, a labelled axis indexed) is an
    error."""
    xmeta, out = call.xmeta, call.out
    tensors = [k for k, it in enumerate(items) if isinstance(it, Ref) and tensorish(call.meta(it))]
    plain = all(k in tensors or it == slice(None) for k, it in enumerate(items))
    metas = [call.meta(items[k]) for k in tensors]
    # (a boolean mask gives another output shape than integer indices would: refused below)
    if not tensors or not plain or not isinstance(out, torch.Size) or not all(
            isinstance(mt, torch.Size) for mt in metas):
        call.error("indexes them with tensors", x)
        return None
    try:
        bshape = tuple(torch.broadcast_shapes(*metas))
    except RuntimeError:
        call.error("indexes them with tensors", x)
        return None
    rest = list(range(len(items), len(xmeta)))  # axes after the index items: whole
    whole = [k for k in range(len(items)) if k not in tensors] + rest
    adjacent = tensors == list(range(tensors[0], tensors[-1] + 1))
    if adjacent:
        p0, p1 = tensors[0], tensors[-1]
        expected = (*xmeta[:p0], *bshape, *xmeta[p1 + 1:])
        where = {a: (a if a < p0 else a - (p1 - p0 + 1) + len(bshape)) for a in whole}
    else:
        expected = (*bshape, *(xmeta[a] for a in whole))
        where = {a: len(bshape) + i for i, a in enumerate(whole)}
    if any(a in tensors for a in x.axes) or tuple(out) != expected:
        call.error("indexes them with tensors", x)
        return None
    return Lab(tuple(where[a] for a in x.axes), x.arr)


def _sliced_dims(x: PView, idx: Any, xmeta: Any, out: Any) -> PView | None:
    """A parameter indexed with ints, slices, ``None`` and ``...`` (a positional table cut to
    the sequence length at run time, ``pos[:, :T]``): a dim taken whole keeps its parameter
    dim; a dim cut short or picked from maps to none (labels there cannot slice it)."""
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if not all(it is None or it is Ellipsis or isinstance(it, int | slice) for it in items):
        return None
    nd = len(xmeta)
    if Ellipsis in items:
        k = items.index(Ellipsis)
        used = sum(1 for it in items if it is not None and it is not Ellipsis)
        items[k:k + 1] = [slice(None)] * (nd - used)
    items += [slice(None)] * (nd - sum(1 for it in items if it is not None))
    dims: list[int | None] = []
    i = 0
    for it in items:
        if it is None:
            dims.append(None)
            continue
        if isinstance(it, slice):
            o = len(dims)
            whole = o < len(out) and out[o] == xmeta[i] and it.step in (None, 1)
            dims.append(x.dims[i] if whole else None)
        i += 1
    return PView(x.key, tuple(dims)) if len(dims) == len(out) else None


class SizeRule(FunctionRule):
    """``x.size()`` / ``x.size(d)`` / ``x.shape`` of a labelled tensor: tracked so that a
    channel width reused as a fixed size is checked."""

    def propagate(self, call: Call) -> Any:
        # the labels as recorded, blocked roots included: a width read off a tensor sizes what
        # it sizes whether or not its own channels can be pruned (it then keeps that fixed)
        x = call.raw(call.xref)
        if x is None and isinstance(call.xmeta, torch.Size):  # no units: every width is fixed
            x = Lab((), np.full((), -1, dtype=np.int64))
        if isinstance(x, Lab):
            nd = len(call.xmeta)
            if call.name == "getattr":
                if call.node.args[1] == "shape":
                    return Sizes(x, nd)
                return call.unsupported()
            dim = call.arg(1, "dim")
            if dim is None:
                return Sizes(x, nd)
            return call.width(x, dim % nd)
        if call.name == "getattr":
            return call.unsupported()
        return super().propagate(call)

    def labels(self, call: Call) -> None:
        return call.unsupported()


class CreateRule(FunctionRule):
    """zeros / ones / full / rand...: new tensors; a labelled width among their sizes is checked."""

    def propagate(self, call: Call) -> Any:
        out = super().propagate(call)
        if tensorish(call.out):
            call.check_widths(out, call.node.args)
        return out

    def labels(self, call: Call) -> None:
        return call.unsupported()


class FlipRule(FunctionRule):
    """flip / roll: an error when they reorder the labelled axis."""

    def labels(self, call: Call) -> Lab | None:
        x = self.main(call)
        if x is None:
            return None
        nd = len(call.xmeta)
        dims = call.arg(1 if call.name == "flip" else 2, "dims")
        dims = {d % nd for d in ((dims,) if isinstance(dims, int) else (dims or range(nd)))}
        if dims & set(x.axes):
            call.error("reorders them", x)
            return None
        return x


builtin(names=RESHAPE, rule=ReshapeRule())
builtin([nn.Flatten, nn.Unflatten], rule=FlattenRule())
builtin(names=PERMUTE, rule=PermuteRule())
builtin(names=EXPAND, rule=ExpandRule())
builtin(names=("repeat_interleave",), rule=RepeatInterleaveRule())
builtin(names=("getitem",), rule=GetitemRule())
builtin(names=("size", "getattr"), rule=SizeRule())
builtin(names=CREATE, rule=CreateRule())
builtin(names=("flip", "roll"), rule=FlipRule())
