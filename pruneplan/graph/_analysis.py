"""Propagate channel labels through the graph IR and collect, per root, what its units own.

Every root (Linear, Conv/ConvTranspose with ``groups == 1``, Embedding) labels the positions of
its output's channel axis with its units. Labels flow forward: element-wise ops, norms, pooling
and depthwise convs carry them, cat/split/view/permute move them, and consumers (Linear/Conv
input axes) end them. Wherever two labelled tensors meet position by position (residual sums,
SE gates, channel shuffles, chunks) their roots are coupled (union-find): the same indices go out
of all of them. A root that meets something it cannot be pruned against (the model output, a
tensor no root owns, a hard-coded split, attention heads) is *blocked*; an operation the
analysis does not know, applied to labelled channels, is an error naming the op and the module.
Labels of blocked roots are dropped as soon as they are read, so nothing downstream of a block
is examined on their account.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pruneplan.errors import PlanningError, UnsupportedOperationError
from pruneplan.graph._ir import Graph, Node, Ref
from pruneplan.graph._labels import (
    MASK,
    SHIFT,
    Lab,
    PView,
    affine_stream,
    canon,
    make_labels,
    reshape_groups,
    roots_of,
    unit_positions,
)
from pruneplan.graph.rules import (
    CONV_TRANSPOSE_TYPES,
    CONV_TYPES,
    DROPOUT_TYPES,
    NORM_TYPES,
    Stream,
    consumer_slices,
    is_depthwise,
    norm_slices,
    root_slices,
)
from pruneplan.graph.spec import DropoutSpec, EditSpec, Group, GroupList, LeftOut, SliceSpec

__all__ = ["analyze"]

log = logging.getLogger(__name__)

_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
    nn.Softsign, nn.LogSigmoid, nn.Tanhshrink, nn.Threshold, nn.Identity, nn.Softshrink,
    nn.Hardshrink,
)
_POOLS = (
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd, nn.modules.padding._ConstantPadNd,
    nn.modules.padding._ReflectionPadNd, nn.modules.padding._ReplicationPadNd,
    nn.ZeroPad2d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)
#: Modules whose internals tie channels to heads or time steps: roots reaching them are blocked.
_BLOCKING = (nn.MultiheadAttention, nn.RNNBase, nn.TransformerEncoderLayer,
             nn.TransformerDecoderLayer, nn.Transformer, nn.Bilinear, nn.PixelShuffle,
             nn.PixelUnshuffle, nn.Fold, nn.Unfold, nn.CosineSimilarity, nn.PairwiseDistance)

_UNARY = {
    "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh",
    "leaky_relu", "elu", "selu", "celu", "mish", "softplus", "softsign", "logsigmoid", "exp",
    "log", "log1p", "expm1", "sqrt", "rsqrt", "abs", "neg", "pos", "clamp", "clamp_min",
    "clamp_max", "clip", "sin", "cos", "erf", "square", "reciprocal", "sign", "round", "floor",
    "ceil", "tanhshrink", "threshold", "contiguous", "clone", "detach", "float", "double",
    "half", "bfloat16", "cpu", "cuda", "requires_grad", "zeros_like", "ones_like", "full_like",
    "empty_like", "rand_like", "randn_like", "dropout", "dropout1d", "dropout2d", "dropout3d",
    "alpha_dropout", "feature_alpha_dropout", "nan_to_num", "invert", "logical_not", "isnan",
    "isfinite", "hardshrink", "softshrink", "trunc", "frac", "exp2", "log2", "log10",
}
_BINARY = {
    "add", "sub", "mul", "div", "truediv", "floordiv", "mod", "fmod", "remainder", "pow",
    "maximum", "minimum", "fmax", "fmin", "where", "masked_fill", "eq", "ne", "lt", "le", "gt",
    "ge", "and", "or", "xor", "logical_and", "logical_or", "logical_xor", "atan2", "hypot",
    "lerp", "addcmul", "addcdiv", "copysign", "true_divide", "multiply", "subtract", "divide",
}
_REDUCE = {"mean", "sum", "nansum", "nanmean", "amax", "amin", "max", "min", "std", "var",
           "norm", "logsumexp", "prod", "argmax", "argmin", "all", "any", "median", "count_nonzero"}
_RESHAPE = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
            "reshape_as"}
_PERMUTE = {"permute", "transpose", "swapaxes", "swapdims", "t", "T", "mT", "movedim", "moveaxis"}
_EXPAND = {"expand", "expand_as", "broadcast_to", "repeat", "tile"}
_SPLIT = {"chunk", "split", "tensor_split", "unbind", "split_with_sizes"}
_SPATIAL = re.compile(r"^(adaptive_avg_pool|adaptive_max_pool|avg_pool|max_pool|lp_pool|"
                      r"fractional_max_pool)([123])d(_with_indices)?$")
#: Known operations that tie channels to something else (heads, matmul shapes): block.
_BLOCK_OPS = {"matmul", "mm", "bmm", "einsum", "baddbmm", "addmm", "addbmm", "linear",
              "bilinear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
              "conv_transpose3d", "scaled_dot_product_attention", "multi_head_attention_forward",
              "stack", "pixel_shuffle", "pixel_unshuffle", "outer", "cross", "kron",
              "cosine_similarity", "normalize"}


@dataclass(frozen=True)
class _Dim:
    """A Python int (fx graphs only) that is the width of labelled channels of ``roots``."""

    roots: tuple[int, ...]


@dataclass(frozen=True)
class _Sizes:
    """``x.shape`` / ``x.size()`` of a labelled tensor (fx graphs only)."""

    lab: Lab
    ndim: int


_ARITH = {"add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow"}
_SHAPED = {"view", "reshape", "expand", "new_zeros", "new_ones", "new_empty", "new_full"}
_CREATE = {"zeros", "ones", "empty", "full", "rand", "randn"}


@dataclass
class _Root:
    idx: int
    name: str
    module: nn.Module
    size: int
    slices: list[SliceSpec]
    edits: list[EditSpec]


@dataclass
class _State:
    """Union-find over roots with per-class block reasons and notes."""

    parent: list[int] = field(default_factory=list)
    blocked: dict[int, list[str]] = field(default_factory=dict)
    notes: dict[int, list[str]] = field(default_factory=dict)

    def add(self) -> None:
        self.parent.append(len(self.parent))

    def find(self, r: int) -> int:
        p = self.parent
        while p[r] != r:
            p[r] = p[p[r]]
            r = p[r]
        return r

    def union(self, a: int, b: int, note: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra
        for d in (self.blocked, self.notes):
            if rb in d:
                d.setdefault(ra, []).extend(d.pop(rb))
        self.notes.setdefault(ra, []).append(note)

    def is_blocked(self, r: int) -> bool:
        return self.find(r) in self.blocked


def _tensorish(meta: Any) -> bool:
    if isinstance(meta, torch.Size):
        return True
    return isinstance(meta, list) and any(_tensorish(m) for m in meta)


def _refs(a: Any) -> Iterator[Ref]:
    if isinstance(a, Ref):
        yield a
    elif isinstance(a, tuple | list):
        for x in a:
            yield from _refs(x)
    elif isinstance(a, dict):
        for x in a.values():
            yield from _refs(x)


def _arg(node: Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


class _Analyzer:
    def __init__(self, model: nn.Module, graph: Graph, include_output: bool) -> None:
        self.model = model
        self.nodes = graph.nodes
        self.include_output = include_output
        self.info: list[Any] = [None] * len(graph.nodes)
        self.roots: list[_Root] = []
        self.by_name: dict[str, int] = {}
        self.uf = _State()
        self.effects: list[list[tuple[int, Any]]] = []
        self.errors: list[tuple[str, list[int]]] = []
        self.widths: list[tuple[Node, tuple[int, ...], tuple[int, ...]]] = []
        self.refused: dict[str, str] = {}  # module path -> why it cannot be a root

    # ---- bookkeeping ---------------------------------------------------------------------

    def block(self, roots: list[int], reason: str) -> None:
        for r in roots:
            c = self.uf.find(r)
            self.uf.blocked.setdefault(c, []).append(reason)

    def error(self, node: Node, roots: list[int], what: str) -> None:
        names = ", ".join(repr(self.roots[r].name) for r in roots)
        msg = f"{node.where()} {what} (channels of {names})"
        self.errors.append((msg, roots))
        self.block(roots, msg)

    def effect(self, r: int, node: Node, item: Any) -> None:
        self.effects[r].append((node.idx, item))

    def read(self, ref: Any) -> Any:
        if not isinstance(ref, Ref):
            return None
        return self._filter(self.info[ref.node])

    def _filter(self, v: Any) -> Any:
        if isinstance(v, Lab):
            rs = v.roots
            bad = [r for r in rs if self.uf.is_blocked(r)]
            if len(bad) == len(rs):
                return None
            if not bad:
                return v
            arr = v.arr.copy()
            arr[np.isin(arr >> SHIFT, bad) & (arr >= 0)] = -1
            return Lab(v.axes, arr)
        if isinstance(v, list):
            return [self._filter(x) for x in v]
        if isinstance(v, _Dim):
            rs = tuple(r for r in v.roots if not self.uf.is_blocked(r))
            return _Dim(rs) if rs else None
        if isinstance(v, _Sizes):
            lab = self._filter(v.lab)
            return _Sizes(lab, v.ndim) if lab is not None else None
        return v

    def meta(self, ref: Any) -> Any:
        return self.nodes[ref.node].meta if isinstance(ref, Ref) else None

    def labeled_roots(self, infos: list[Any]) -> list[int]:
        out: set[int] = set()
        for i in infos:
            if isinstance(i, Lab):
                out.update(i.roots)
            elif isinstance(i, list):
                out.update(self.labeled_roots(i))
        return sorted(out)

    def stream(self, arr: np.ndarray, r: int, node: Node) -> Stream | None:
        pos = unit_positions(arr, r, self.roots[r].size)
        if pos is None:
            self.block([r], f"only some of its units reach {node.where()}")
            return None
        return affine_stream(pos)

    # ---- coupling ------------------------------------------------------------------------

    def couple(self, a: np.ndarray, b: np.ndarray, node: Node) -> np.ndarray:
        """Positions of ``a`` and ``b`` are tied one to one: couple their roots."""
        la, lb = a >= 0, b >= 0
        lonely = (la & ~lb, a), (lb & ~la, b)
        for mask, arr in lonely:
            if mask.any():
                self.block(roots_of(arr[mask]),
                           f"meets channels no prunable layer owns at {node.where()}")
        both = la & lb
        if both.any():
            x, y = a[both], b[both]
            rx, ry, ux, uy = x >> SHIFT, y >> SHIFT, x & MASK, y & MASK
            bad = ux != uy
            if bad.any():
                self.block(sorted(set(rx[bad].tolist()) | set(ry[bad].tolist())),
                           f"coupled to other units in another order at {node.where()}")
            pairs = np.unique(np.stack([rx[~bad], ry[~bad]], axis=1), axis=0)
            for p, q in pairs.tolist():
                if p == q:
                    continue
                if self.roots[p].size != self.roots[q].size:
                    self.error(node, [p, q], f"couples {self.roots[p].name!r} "
                               f"({self.roots[p].size} units) with {self.roots[q].name!r} "
                               f"({self.roots[q].size} units); coupled groups need equal sizes")
                else:
                    self.uf.union(p, q, f"{node.target} in {node.scope or '<top level>'}")
        return np.where(la, a, b)

    def merge(self, node: Node, operands: list[tuple[Any, Any]]) -> Lab | None:
        """Element-wise combination (with broadcasting) of operands ``(info, shape)``."""
        out = node.meta if isinstance(node.meta, torch.Size) else None
        if out is None:
            return None
        nd = len(out)
        labs: list[Lab] = []
        plain: list[tuple[Any, Any]] = []
        operands = [(i, m) for i, m in operands if isinstance(m, torch.Size)]  # ints are scalars
        for info, meta in operands:
            shift = nd - len(meta)
            if isinstance(info, Lab):
                lab = info.shifted(shift)
                if any(out[a] != lab.arr.shape[k] for k, a in enumerate(lab.axes)):
                    self.block(lab.roots, f"broadcast across channels at {node.where()}")
                    continue
                labs.append(lab)
            else:
                plain.append((info, meta))
        if not labs:
            return None
        axes = labs[0].axes
        if any(lab.axes != axes for lab in labs):
            self.block(self.labeled_roots(labs), f"labels on different axes meet at {node.where()}")
            return None
        arr = labs[0].arr
        for lab in labs[1:]:
            arr = self.couple(arr, lab.arr, node)
        for info, meta in plain:
            shift = nd - len(meta)
            for a in axes:
                d = a - shift
                if d < 0 or meta[d] == 1:
                    continue
                if isinstance(info, PView) and info.dims[d] is not None and len(axes) == 1:
                    for r in roots_of(arr):
                        st = self.stream(arr, r, node)
                        if st is not None:
                            self.effect(r, node, st.slice(info.key, info.dims[d]))
                else:
                    self.block(roots_of(arr),
                               f"combined with a tensor no prunable layer owns at {node.where()}")
        return Lab(axes, arr)

    # ---- driver --------------------------------------------------------------------------

    def run(self) -> None:
        for node in self.nodes:
            if node.kind == "param":
                meta = node.meta
                self.info[node.idx] = PView(node.target, tuple(range(len(meta)))) \
                    if isinstance(meta, torch.Size) else None
            elif node.kind == "module":
                self.info[node.idx] = self.module(node)
            elif node.kind == "op":
                self.info[node.idx] = self.op(node)
            elif node.kind == "output":
                self.output(node)

    def output(self, node: Node) -> None:
        roots = self.labeled_roots([self.read(r) for r in _refs(node.args)])
        if roots and not self.include_output:
            self.block(roots, "its units reach the model output "
                       "(include_output=True allows pruning it)")

    # ---- roots and modules ---------------------------------------------------------------

    def new_root(self, node: Node, axis_last: bool) -> Lab | None:
        name, m = node.target, node.module
        r = self.by_name.get(name)
        if r is None:
            try:
                size, slices, edits = root_slices(name, m)
            except PlanningError as exc:
                self.refused.setdefault(name, str(exc))
                return None
            r = len(self.roots)
            self.roots.append(_Root(r, name, m, size, list(slices), list(edits)))
            self.by_name[name] = r
            self.uf.add()
            self.effects.append([])
        meta = node.meta
        if not isinstance(meta, torch.Size) or len(meta) < 2 - axis_last:
            self.block([r], f"{node.where()} returns no batched tensor")
            return None
        axis = len(meta) - 1 if axis_last else 1
        if meta[axis] != self.roots[r].size:
            self.block([r], f"{node.where()} output has {meta[axis]} channels on axis {axis}")
            return None
        return Lab((axis,), make_labels(r, self.roots[r].size))

    def consume(self, node: Node, lab: Lab, axis: int) -> Lab | None:
        """``node``'s module reads the labels on ``axis``; returns output labels (depthwise)."""
        if lab.axes != (axis,):
            self.block(lab.roots, f"{node.where()} reads them on other axes")
            return None
        m = node.module
        self.apply_rule(node, lab, lambda st: consumer_slices(node.target, m, st)[:2])
        if is_depthwise(m):
            out_labs = np.repeat(lab.arr, m.out_channels // m.in_channels)
            return Lab((1,), out_labs)
        return None

    def norm(self, node: Node, lab: Lab) -> None:
        m, width = node.module, lab.arr.shape[0]
        self.apply_rule(node, lab, lambda st: norm_slices(node.target, m, st, width))

    def apply_rule(self, node: Node, lab: Lab, rule: Callable[[Stream], tuple[list, list]]) -> None:
        """For each root in ``lab``: the slices and edits ``rule`` gives for its stream become
        effects of that root; a rule that refuses blocks the root."""
        for r in lab.roots:
            st = self.stream(lab.arr, r, node)
            if st is None:
                continue
            try:
                slices, edits = rule(st)
            except PlanningError as exc:
                self.block([r], str(exc))
                continue
            for item in (*slices, *edits):
                self.effect(r, node, item)

    def module(self, node: Node) -> Any:
        m = node.module
        xref = next(_refs((node.args, node.kwargs)), None)
        x = self.read(xref)
        xmeta = self.meta(xref)
        infos = [self.read(r) for r in _refs((node.args, node.kwargs))]
        if isinstance(m, nn.Linear):
            out = self.new_root(node, axis_last=True)
            if isinstance(x, Lab):
                last = len(xmeta) - 1
                if last in x.axes:
                    self.consume(node, x, last)
                    return out
                if out is not None:
                    self.block(out.roots, f"{node.where()} is applied along another "
                               "labelled axis")
                return x
            return out
        if isinstance(m, CONV_TYPES):
            out = self.new_root(node, axis_last=False) if m.groups == 1 else None
            if isinstance(x, Lab):
                dw = self.consume(node, x, 1)
                if is_depthwise(m):
                    return dw
            return out
        if isinstance(m, CONV_TRANSPOSE_TYPES):
            out = self.new_root(node, axis_last=False) if m.groups == 1 else None
            if isinstance(x, Lab):
                self.consume(node, x, 1)
            return out
        if isinstance(m, nn.Embedding):
            if isinstance(x, Lab):
                self.error(node, x.roots, "receives labelled indices")
            return self.new_root(node, axis_last=True)
        labeled = self.labeled_roots(infos)
        if not labeled:
            return None
        if not isinstance(x, Lab) or (len(infos) > 1 and self.labeled_roots(infos[1:])):
            if isinstance(m, _BLOCKING):
                self.block(labeled, f"they reach {node.where()}")
                return None
            self.error(node, labeled, "receives them in an argument pruneplan does not follow")
            return None
        nd = len(xmeta)
        if isinstance(m, NORM_TYPES):
            if isinstance(m, nn.LayerNorm):
                dims = set(range(nd - len(m.normalized_shape), nd))
                if not dims & set(x.axes):
                    return x
                if x.axes != (nd - 1,) or len(m.normalized_shape) != 1:
                    self.block(x.roots, f"{node.where()} normalises over more axes")
                    return None
            else:
                if 1 not in x.axes:
                    return x
                if x.axes != (1,):
                    self.block(x.roots, f"{node.where()} sees them on other axes")
                    return None
            self.norm(node, x)
            return x
        if isinstance(m, DROPOUT_TYPES):
            rs = x.roots
            if len(rs) == 1 and (x.arr >= 0).all():
                self.effect(rs[0], node, DropoutSpec(node.target, float(m.p)))
            return x
        if isinstance(m, nn.PReLU):
            if m.num_parameters == 1 or 1 not in x.axes:
                return x
            if x.axes != (1,):
                self.block(x.roots, f"{node.where()} sees them on other axes")
                return None
            for r in x.roots:
                st = self.stream(x.arr, r, node)
                if st is not None:
                    self.effect(r, node, st.slice(f"{node.target}.weight", 0))
                    self.effect(r, node, EditSpec(node.target, "num_parameters", m.num_parameters,
                                                  st.per_unit))
            return x
        if isinstance(m, _ACTIVATIONS):
            return x
        if isinstance(m, nn.Softmax | nn.LogSoftmax | nn.Softmin):
            dim = m.dim if m.dim is not None else (0 if nd in (0, 1, 3) else 1)
            if dim % nd in x.axes:
                self.block(x.roots, f"{node.where()} normalises over them")
                return None
            return x
        if isinstance(m, _POOLS):
            k = _spatial_dims(type(m).__name__, nd)
            if set(x.axes) & set(range(nd - k, nd)):
                self.block(x.roots, f"{node.where()} mixes them spatially")
                return None
            return x
        if isinstance(m, nn.Flatten | nn.Unflatten):
            return self.reshape(node, x, xmeta, node.meta)
        if isinstance(m, nn.ChannelShuffle):
            return self.shuffle(node, x, m.groups)
        if isinstance(m, _BLOCKING):
            self.block(x.roots, f"they reach {node.where()}")
            return None
        self.error(node, x.roots, "is not a module pruneplan knows how to follow")
        return None

    # ---- operations ----------------------------------------------------------------------

    def op(self, node: Node) -> Any:
        size = self.sizes(node)
        if size is not None:
            return size
        if not _tensorish(node.meta):
            return None
        out = self.op_tensor(node)
        if node.target in _SHAPED or node.target in _CREATE:
            self.check_widths(node, out)
        return out

    def sizes(self, node: Node) -> _Dim | _Sizes | None:
        """Track channel widths read as Python ints (fx keeps them as graph values)."""
        name = node.target
        src = node.args[0] if node.args else None
        x = self.read(src)
        if name == "getattr" and len(node.args) > 1 and node.args[1] == "shape" and isinstance(x, Lab):
            return _Sizes(x, len(self.meta(src)))
        if name == "size" and isinstance(x, Lab):
            dim = _arg(node, 1, "dim")
            if dim is None:
                return _Sizes(x, len(self.meta(src)))
            d = dim % len(self.meta(src))
            return _Dim(tuple(x.roots)) if d in x.axes else None
        if name == "getitem" and isinstance(x, _Sizes) and isinstance(node.args[1], int):
            d = node.args[1] % x.ndim
            return _Dim(tuple(x.lab.roots)) if d in x.lab.axes else None
        if name in _ARITH:
            dims = [i for i in (self.read(r) for r in _refs(node.args)) if isinstance(i, _Dim)]
            if dims and not _tensorish(node.meta):
                return _Dim(tuple(sorted({r for d in dims for r in d.roots})))
        return None

    def check_widths(self, node: Node, out: Any) -> None:
        """Record where a channel width is used as a fixed size; checked in `finish`."""
        args = node.args[1:] if node.target in _SHAPED else node.args
        if len(args) == 1 and isinstance(args[0], tuple | list):
            args = args[0]
        for i, a in enumerate(args):
            dim = self.read(a)
            if isinstance(dim, _Dim):
                on_axis = tuple(out.roots) if isinstance(out, Lab) and i in out.axes else ()
                self.widths.append((node, dim.roots, on_axis))

    def finish(self) -> None:
        """A width used as a fixed size must land on an axis carrying the same coupled units
        (checked once all couplings are known: an SE gate is coupled after its reshape)."""
        for node, dim_roots, on_axis in self.widths:
            want = {self.uf.find(r) for r in dim_roots}
            have = {self.uf.find(r) for r in on_axis}
            if want != have:
                self.block(list(dim_roots) + list(on_axis),
                           f"their width is used as a fixed size at {node.where()}")

    def op_tensor(self, node: Node) -> Any:
        name = node.target
        src = node.args[0] if node.args else None
        if name == "getitem" and isinstance(self.meta(src), list):
            seq = self.read(src)
            if not isinstance(seq, list):
                return None
            idx = node.args[1]
            return seq[idx] if isinstance(idx, int | slice) else None
        infos = [self.read(r) for r in _refs((node.args, node.kwargs))]
        if not self.labeled_roots(infos):
            return self.pview(node) if any(isinstance(i, PView) for i in infos) else None
        x = self.read(src)
        xmeta = self.meta(src)
        if name in ("to", "type_as", "type", "new_zeros", "new_ones", "new_empty", "new_full"):
            return x if name in ("to", "type_as", "type") and isinstance(x, Lab) else None
        if name in _UNARY or name in _BINARY:
            return self.merge(node, [(self.read(r), self.meta(r)) for r in _refs((node.args,
                                                                                   node.kwargs))])
        if name in ("max", "min") and isinstance(_arg(node, 1, "other"), Ref):
            return self.merge(node, [(self.read(r), self.meta(r)) for r in _refs(node.args)])
        if name in ("stack", "hstack", "vstack"):
            return self.stack(node) if name == "stack" else self.block_all(node, infos)
        if not isinstance(x, Lab):
            if name == "cat" or name in ("concat", "concatenate"):
                return self.cat(node)
            self.error(node, self.labeled_roots(infos), "receives them in an argument pruneplan "
                       "does not follow")
            return None
        nd = len(xmeta)
        if name in _RESHAPE:
            return self.reshape(node, x, xmeta, node.meta)
        if name in _PERMUTE:
            perm = _permutation(node, nd)
            if perm is None:
                self.error(node, x.roots, "permutes them in a way pruneplan cannot read")
                return None
            return canon(tuple(perm.index(a) for a in x.axes), x.arr)
        if name in _EXPAND:
            out = node.meta
            lab = x.shifted(len(out) - nd)
            if any(out[a] != lab.arr.shape[k] for k, a in enumerate(lab.axes)):
                self.block(x.roots, f"repeated along their axis at {node.where()}")
                return None
            return lab
        if name in ("cat", "concat", "concatenate"):
            return self.cat(node)
        if name in _SPLIT:
            return self.split(node, x, xmeta)
        if name == "getitem":
            return self.index(node, x, xmeta)
        if name in _REDUCE:
            return self.reduce(node, x, nd)
        if name in ("softmax", "log_softmax", "softmin"):
            dim = _arg(node, 1, "dim")
            if dim is None or dim % nd in x.axes:
                self.block(x.roots, f"{node.where()} normalises over them")
                return None
            return x
        k = _spatial_op(name, node, nd)
        if k is not None:
            if set(x.axes) & set(range(nd - k, nd)):
                self.block(x.roots, f"{node.where()} acts on their axis")
                return None
            return [x, x] if isinstance(node.meta, list) else x
        if name in ("layer_norm", "group_norm", "batch_norm", "instance_norm", "local_response_norm"):
            if name == "layer_norm":
                dims = set(range(nd - len(_arg(node, 1, "normalized_shape")), nd))
            else:
                dims = {1}
            if dims & set(x.axes):
                self.block(x.roots, f"{node.where()} normalises over them")
                return None
            return x
        if name in ("flip", "roll"):
            dims = _arg(node, 1 if name == "flip" else 2, "dims")
            dims = {d % nd for d in ((dims,) if isinstance(dims, int) else (dims or range(nd)))}
            if dims & set(x.axes):
                self.error(node, x.roots, "reorders them")
                return None
            return x
        if name in _BLOCK_OPS:
            self.block(self.labeled_roots(infos), f"they reach {node.where()}")
            return None
        self.error(node, self.labeled_roots(infos), "is not an operation pruneplan knows how to "
                   "follow")
        return None

    def reshape(self, node: Node, x: Lab, a: Any, b: Any) -> Lab | None:
        groups = reshape_groups(tuple(a), tuple(b)) if isinstance(b, torch.Size) else None
        if groups is None:
            self.error(node, x.roots, "reshapes them in a way pruneplan cannot read")
            return None
        hit = [g for g in groups if set(g[0]) & set(x.axes)]
        if len(hit) != 1:
            self.block(x.roots, f"{node.where()} reshapes them across separate axes")
            return None
        gi, go = hit[0]
        sub_in = [a[d] for d in gi]
        sub_out = [b[d] for d in go]
        bshape = [a[d] if d in x.axes else 1 for d in gi]
        g = np.broadcast_to(x.arr.reshape(bshape), sub_in).reshape(sub_out)
        keep = [k for k in range(len(go))
                if sub_out[k] > 1 and not np.array_equal(g, np.broadcast_to(
                    np.take(g, [0], axis=k), g.shape))]
        g = g[tuple(slice(None) if k in keep else 0 for k in range(len(go)))]
        axes = tuple(go[k] for k in keep)
        if not axes:
            self.block(x.roots, f"{node.where()} reshapes them away")
            return None
        if len(axes) > 1:
            rows = g.reshape(-1, g.shape[-1])
            for i in range(1, rows.shape[0]):
                self.couple(rows[0], rows[i], node)
        return Lab(axes, np.ascontiguousarray(g))

    def shuffle(self, node: Node, x: Lab, groups: int) -> Lab | None:
        if x.axes != (1,):
            self.block(x.roots, f"{node.where()} shuffles other axes")
            return None
        g = x.arr.reshape(groups, -1)
        for i in range(1, groups):
            self.couple(g[0], g[i], node)
        return Lab((1,), np.ascontiguousarray(g.T).reshape(-1))

    def cat(self, node: Node) -> Lab | None:
        items = self.sequence(node.args[0] if node.args else node.kwargs.get("tensors"))
        nd = len(node.meta)
        dim = _arg(node, 1, "dim", 0) % nd
        if any(isinstance(i, Lab) and dim in i.axes for i, _ in items):
            if any(isinstance(i, Lab) and i.axes != (dim,) for i, _ in items):
                self.block(self.labeled_roots([i for i, _ in items]),
                           f"{node.where()} concatenates them with other layouts")
                return None
            parts = [i.arr if isinstance(i, Lab) else np.full(m[dim], -1, dtype=np.int64)
                     for i, m in items]
            return Lab((dim,), np.concatenate(parts))
        return self.merge(node, items)

    def stack(self, node: Node) -> Lab | None:
        """``stack`` along a new axis ties its inputs position by position."""
        items = self.sequence(node.args[0] if node.args else node.kwargs.get("tensors"))
        dim = _arg(node, 1, "dim", 0) % len(node.meta)
        moved = []
        for info, meta in items:
            meta = torch.Size((*meta[:dim], 1, *meta[dim:]))
            if isinstance(info, Lab):
                info = Lab(tuple(a + (a >= dim) for a in info.axes), info.arr)
            elif isinstance(info, PView):
                info = PView(info.key, (*info.dims[:dim], None, *info.dims[dim:]))
            moved.append((info, meta))
        return self.merge(node, moved)

    def block_all(self, node: Node, infos: list[Any]) -> None:
        self.block(self.labeled_roots(infos), f"they reach {node.where()}")
        return None

    def sequence(self, arg: Any) -> list[tuple[Any, Any]]:
        if isinstance(arg, Ref) and isinstance(self.meta(arg), list):
            info = self.read(arg)
            metas = self.meta(arg)
            infos = info if isinstance(info, list) else [None] * len(metas)
            return list(zip(infos, metas, strict=True))
        return [(self.read(r), self.meta(r)) for r in _refs(arg)]

    def split(self, node: Node, x: Lab, xmeta: Any) -> Any:
        name = node.target
        nd = len(xmeta)
        dim = _arg(node, 2 if name != "unbind" else 1, "dim", 0) % nd
        outs = node.meta
        if dim not in x.axes:
            if name == "unbind":
                return [Lab(tuple(a - (a > dim) for a in x.axes), x.arr)] * len(outs)
            return [x] * len(outs)
        sizes = [m[dim] for m in outs]
        how = _arg(node, 1, "sections")
        fixed = name in ("unbind", "split_with_sizes", "split") or (
            name == "tensor_split" and not isinstance(how, int))
        if x.axes != (dim,) or fixed or len(set(sizes)) != 1:
            self.block(x.roots, f"{node.where()} splits them into fixed-size parts")
            return None
        rows = x.arr.reshape(len(sizes), -1)
        for i in range(1, len(sizes)):
            self.couple(rows[0], rows[i], node)
        return [Lab((dim,), rows[i].copy()) for i in range(len(sizes))]

    def index(self, node: Node, x: Lab, xmeta: Any) -> Lab | None:
        idx = node.args[1]
        items = list(idx) if isinstance(idx, tuple) else [idx]
        # a graph value inside an index is an int computed at run time unless it is a tensor
        if any((isinstance(it, Ref) and _tensorish(self.meta(it))) or isinstance(it, list)
               for it in items):
            self.error(node, x.roots, "indexes them with tensors")
            return None
        nd = len(xmeta)
        if Ellipsis in items:
            k = items.index(Ellipsis)
            used = sum(1 for it in items if it is not None and it is not Ellipsis)
            items[k:k + 1] = [slice(None)] * (nd - used)
        items += [slice(None)] * (nd - sum(1 for it in items if it is not None))
        out = node.meta
        where: dict[int, int] = {}
        i = o = 0
        for it in items:
            if it is None:
                o += 1
                continue
            if not isinstance(it, slice):  # an int (literal or computed): the axis goes
                if i in x.axes:
                    self.block(x.roots, f"{node.where()} picks single positions")
                    return None
                i += 1
                continue
            # a slice of the same length as the axis (steps are positive in torch) is all of it
            if i in x.axes and out[o] != xmeta[i]:
                self.block(x.roots, f"{node.where()} slices their axis")
                return None
            where[i] = o
            i += 1
            o += 1
        return Lab(tuple(where[a] for a in x.axes), x.arr)

    def reduce(self, node: Node, x: Lab, nd: int) -> Any:
        dim = _arg(node, 1, "dim")
        keep = bool(_arg(node, 2, "keepdim", False))
        dims = set(range(nd)) if dim is None else {d % nd for d in ((dim,) if isinstance(dim, int)
                                                                     else dim)}
        tuple_out = isinstance(node.meta, list)
        if dims & set(x.axes):
            # a reduction over the channels ends them: its value is taken over the channels
            # that remain (like a LayerNorm's statistics), whatever their number
            if set(x.axes) <= dims:
                return None
            self.block(x.roots, f"{node.where()} reduces over part of their axes")
            return None
        lab = x if keep else Lab(tuple(a - sum(d < a for d in dims) for a in x.axes), x.arr)
        return [lab, lab] if tuple_out else lab

    def pview(self, node: Node) -> PView | None:
        """Follow a parameter through the few views that keep its axes identifiable."""
        x = self.read(node.args[0]) if node.args else None
        if not isinstance(x, PView):
            return None
        others = [r for r in _refs((node.args[1:], node.kwargs))]
        name, out = node.target, node.meta
        if not isinstance(out, torch.Size):
            return None
        if name in _UNARY or name in _BINARY or name in ("to", "type_as"):
            return x if not others or name in ("to", "type_as") else None
        a = self.meta(node.args[0])
        if name in _RESHAPE or (name == "getitem" and all(
                it is None or it is Ellipsis or it == slice(None)
                for it in (node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)))):
            groups = reshape_groups(tuple(a), tuple(out))
            if groups is None:
                return None
            dims: list[int | None] = [None] * len(out)
            for gi, go in groups:
                big_i = [d for d in gi if a[d] != 1]
                big_o = [d for d in go if out[d] != 1]
                if len(big_i) > 1 or len(big_o) > 1:
                    return None
                if big_i and big_o:
                    dims[big_o[0]] = x.dims[big_i[0]]
            return PView(x.key, tuple(dims))
        if name in _EXPAND:
            shift = len(out) - len(a)
            dims = [None] * shift + [x.dims[d] if a[d] == out[d + shift] else None
                                     for d in range(len(a))]
            return PView(x.key, tuple(dims))
        if name in _PERMUTE:
            perm = _permutation(node, len(a))
            return PView(x.key, tuple(x.dims[p] for p in perm)) if perm is not None else None
        return None

    # ---- result --------------------------------------------------------------------------

    def groups(self) -> GroupList:
        """The unblocked classes as groups; every blocked root in ``left_out`` with its reason."""
        classes: dict[int, list[int]] = {}
        for r in range(len(self.roots)):
            classes.setdefault(self.uf.find(r), []).append(r)
        out = GroupList()
        left: list[tuple[int, LeftOut]] = []
        for rep, members in sorted(classes.items()):
            if rep in self.uf.blocked:
                reason = self.uf.blocked[rep][0]
                for r in members:
                    others = [self.roots[o].name for o in members if o != r]
                    why = reason
                    if others:
                        shown = ", ".join(repr(o) for o in others[:3])
                        more = f" and {len(others) - 3} more" if len(others) > 3 else ""
                        why = f"{reason} (coupled with {shown}{more})"
                    left.append((r, LeftOut(self.roots[r].name, why)))
                continue
            out.append(self.assemble(members, self.uf.notes.get(rep, [])))
        out.left_out = [lo for _, lo in sorted(left, key=lambda t: t[0])]
        out.left_out += [LeftOut(n, why) for n, why in self.refused.items()
                         if n not in self.by_name]
        return out

    def assemble(self, members: list[int], notes: list[str]) -> Group:
        first = self.roots[members[0]]
        size = first.size
        slices: dict[tuple[str, int], dict[Any, list[SliceSpec]]] = {}
        edits: dict[tuple[str, str], dict[Any, list[EditSpec]]] = {}
        drops: dict[str, DropoutSpec] = {}
        for r in members:
            root = self.roots[r]
            items = [(("root", r), s) for s in root.slices + root.edits] + self.effects[r]
            for where, item in items:
                if isinstance(item, SliceSpec):
                    slices.setdefault((item.tensor, item.axis), {}).setdefault(where, []).append(item)
                elif isinstance(item, EditSpec):
                    edits.setdefault((item.module, item.attribute), {}).setdefault(where, []).append(item)
                else:
                    drops.setdefault(item.module, item)
        final_slices = []
        for key, by_node in sorted(slices.items()):
            merged = {_merge_slices(specs, size) for specs in by_node.values()}
            if len(merged) > 1:
                raise UnsupportedOperationError(
                    f"tensor {key[0]!r} axis {key[1]} is reached by the units of {first.name!r} "
                    "in different layouts (a module used more than once?)")
            final_slices.append(merged.pop())
        final_edits = []
        for (mod, attr), by_node in sorted(edits.items()):
            merged_e = {EditSpec(mod, attr, specs[0].before, sum(e.per_unit for e in specs))
                        for specs in by_node.values()}
            if len(merged_e) > 1:
                raise UnsupportedOperationError(
                    f"{mod}.{attr} shrinks by different amounts per unit of {first.name!r} "
                    "(a module used more than once?)")
            final_edits.append(merged_e.pop())
        return Group(
            name=first.name,
            size=size,
            roots=tuple(self.roots[r].name for r in members),
            slices=tuple(final_slices),
            edits=tuple(final_edits),
            dropouts=tuple(drops[k] for k in sorted(drops)),
            notes=tuple(dict.fromkeys(f"coupled by {n}" for n in notes)),
        )


def _merge_slices(specs: list[SliceSpec], size: int) -> SliceSpec:
    if len(specs) == 1:
        return specs[0]
    first = specs[0]
    streams = [Stream(s.offset, s.repeat, s.tiles, s.tile_stride, s.positions) for s in specs]
    pos = np.array([sorted(p for st in streams for p in st.unit(u)) for u in range(size)])
    return affine_stream(pos).slice(first.tensor, first.axis, first.modulo)


def _permutation(node: Node, nd: int) -> list[int] | None:
    name = node.target
    args = node.args[1:]
    try:
        if name == "permute":
            dims = node.kwargs.get("dims", args[0] if len(args) == 1 and isinstance(
                args[0], tuple | list) else args)
            return [d % nd for d in dims]
        if name in ("transpose", "swapaxes", "swapdims"):
            d0 = _arg(node, 1, "dim0") % nd
            d1 = _arg(node, 2, "dim1") % nd
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
            src, dst = _arg(node, 1, "source"), _arg(node, 2, "destination")
            return [int(v) for v in np.moveaxis(np.arange(nd), src, dst)]
    except (TypeError, IndexError, ValueError):
        return None
    return None


def _spatial_dims(cls_name: str, nd: int) -> int:
    m = re.search(r"([123])d$", cls_name)
    if m:
        return int(m.group(1))
    return nd - 2


def _spatial_op(name: str, node: Node, nd: int) -> int | None:
    m = _SPATIAL.match(name)
    if m:
        return int(m.group(2))
    if name in ("interpolate", "upsample", "upsample_nearest", "upsample_bilinear",
                "grid_sample"):
        return nd - 2
    if name == "pad":
        pad = _arg(node, 1, "pad")
        return len(pad) // 2 if isinstance(pad, tuple | list) else None
    return None


def analyze(model: nn.Module, graph: Graph, *, include_output: bool = False,
            strict: bool = True) -> GroupList:
    """Groups of the traced ``graph`` (with the roots left out and why); raise on unsupported
    operations when ``strict``."""
    a = _Analyzer(model, graph, include_output)
    a.run()
    a.finish()
    if a.errors:
        msg, _ = a.errors[0]
        more = f" (and {len(a.errors) - 1} more)" if len(a.errors) > 1 else ""
        if strict:
            raise UnsupportedOperationError(
                f"{msg}: cannot tell which tensors follow the pruned channels{more}")
        for m, _ in a.errors:
            log.warning("skipping groups: %s", m)
    return a.groups()
