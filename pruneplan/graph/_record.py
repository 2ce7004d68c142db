"""Build the graph IR by recording one real forward pass (for models fx cannot trace).

A `TorchFunctionMode` sees every torch function and tensor method called outside leaf modules;
forward hooks record each leaf module call as a single node. Python control flow is simply
executed, so whatever path the example inputs take is the graph.

Sizes read off a recorded tensor (``x.shape``, ``x.size()``, ``x.size(d)``) are recorded too, as
fx records them: they come back as `SizeInt` (an ``int`` that remembers its node), and
arithmetic on them (``C // self.num_heads``) adds a node per operation, so that a reshape
given ``C`` refers to the width it was read from instead of a bare number. A number written in
the code (``self.dim``) stays a plain int.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from pruneplan.graph._ir import Graph, Node, Recorded, Ref, copy_args, is_leaf, meta_of, op_name
from pruneplan.graph.rules.base import function_rule, module_rule

__all__ = ["SizeInt", "trace_record"]

log = logging.getLogger(__name__)


class _Builder:
    def __init__(self, model: nn.Module) -> None:
        self.nodes: list[Node] = []
        self.values: dict[int, tuple[torch.Tensor, int]] = {}  # id(tensor) -> (tensor, node)
        self.states = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
        self.scopes: list[str] = [""]
        self.in_leaf = 0
        self.active = True
        self.recording = True  # False once the pass is over: sizes kept after it stay ints
        self.sized = True  # record sizes read off tensors

    def add(self, kind: str, target: str, args: tuple = (), kwargs: dict | None = None,
            meta: Any = None, module: nn.Module | None = None, scope: str | None = None) -> Node:
        node = Node(len(self.nodes), kind, target, args, kwargs or {}, meta,
                    self.scopes[-1] if scope is None else scope, module)
        self.nodes.append(node)
        return node

    def bind(self, t: torch.Tensor, node: Node) -> None:
        self.values[id(t)] = (t, node.idx)

    def ref(self, a: Any) -> Any:
        """Replace tensors (and recorded sizes) in ``a`` by references, creating param/const
        nodes on first sight."""
        if isinstance(a, SizeInt):
            return Ref(a.node) if a.builder is self else int(a)
        if isinstance(a, torch.Tensor):
            hit = self.values.get(id(a))
            if hit is not None and hit[0] is a:
                return Ref(hit[1])
            key = self.states.get(id(a))
            node = self.add("param" if key is not None else "const",
                            key if key is not None else "tensor", meta=a.shape)
            self.bind(a, node)
            return Ref(node.idx)
        if isinstance(a, tuple):
            return tuple(self.ref(x) for x in a)
        if isinstance(a, list):
            return [self.ref(x) for x in a]
        if isinstance(a, dict):
            return {k: self.ref(v) for k, v in a.items()}
        return a

    def produced(self, node: Node, out: Any) -> None:
        """Bind the tensors of ``out`` to ``node`` (through getitem nodes for sequences)."""
        if isinstance(out, torch.Tensor):
            self.bind(out, node)
        elif isinstance(out, tuple | list):
            for i, v in enumerate(out):
                if isinstance(v, torch.Tensor):
                    item = self.add("op", "getitem", (Ref(node.idx), i), meta=v.shape,
                                    scope=node.scope)
                    self.bind(v, item)


    def sizes(self, func: Any, args: tuple, kwargs: dict, out: Any) -> Any:
        """``x.shape`` / ``x.size()`` / ``x.size(d)`` of a recorded tensor: a size node (and a
        getitem node per dim), the values returned as `SizeInt` bound to them."""
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and id(x) not in self.values and id(x) in self.states:
            self.ref(x)  # a parameter or buffer read before any operation used it
        hit = self.values.get(id(x)) if isinstance(x, torch.Tensor) else None
        if hit is None or hit[0] is not x:
            return out
        rest = (*args[1:], *kwargs.values())
        if isinstance(out, int) and len(rest) == 1 and isinstance(rest[0], int):
            node = self.add("op", "size", (Ref(hit[1]), int(rest[0])))
            return SizeInt(out, self, node.idx)
        if not isinstance(out, torch.Size) or rest:
            return out
        node = self.add("op", "size", (Ref(hit[1]),))
        return torch.Size(SizeInt(v, self, self.add("op", "getitem", (Ref(node.idx), i)).idx)
                          for i, v in enumerate(out))


class SizeInt(int):
    """An int read off a recorded tensor's shape (or computed from one): ``node`` is where it
    was produced in the graph ``builder`` records. Used as any int; arithmetic with ints gives
    `SizeInt` again (recorded as an operation) while the recording runs."""

    builder: _Builder
    node: int

    def __new__(cls, value: int, builder: _Builder, node: int) -> SizeInt:
        out = super().__new__(cls, value)
        out.builder = builder
        out.node = node
        return out

    def __reduce__(self) -> Any:  # a copy (deepcopy, pickle) is the plain number
        return (int, (int(self),))


def _arith(name: str, fn: Any, swap: bool = False) -> Any:
    def op(self: SizeInt, *other: Any) -> Any:
        args = (other[0], self) if swap else (self, *other)
        out = fn(*(int(a) if isinstance(a, SizeInt) else a for a in args))
        b = self.builder
        if (not isinstance(out, int) or isinstance(out, bool) or not b.recording or not b.active
                or b.in_leaf or not all(type(a) in (int, SizeInt) for a in args)):
            return out
        node = b.add("op", name, tuple(b.ref(a) for a in args))
        return SizeInt(out, b, node.idx)

    return op


for _name, _fn in (("add", operator.add), ("sub", operator.sub), ("mul", operator.mul),
                   ("floordiv", operator.floordiv), ("mod", operator.mod)):
    setattr(SizeInt, f"__{_name}__", _arith(_name, _fn))
    setattr(SizeInt, f"__r{_name}__", _arith(_name, _fn, swap=True))
SizeInt.__neg__ = _arith("neg", operator.neg)
SizeInt.__pos__ = _arith("pos", operator.pos)

_SIZE_FUNCS = ("shape", "size")


def _has_tensor(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, tuple | list):
        return any(_has_tensor(x) for x in v)
    return False


class _Mode(TorchFunctionMode):
    def __init__(self, b: _Builder) -> None:
        super().__init__()
        self.b = b

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        b = self.b
        if b.active and not b.in_leaf and b.sized and isinstance(out, int | torch.Size) \
                and op_name(func) in _SIZE_FUNCS:
            b.active = False
            try:
                return b.sizes(func, args, kwargs, out)
            finally:
                b.active = True
        if b.active and not b.in_leaf and _has_tensor(out):
            b.active = False
            try:
                name = op_name(func)
                node = b.add("op", name, b.ref(tuple(args)), b.ref(dict(kwargs)), meta_of(out))
                if isinstance(out, torch.Tensor) and function_rule(name) is None:
                    # kept to be examined (no rule: rare by construction)
                    node.recorded = Recorded(func, copy_args(tuple(args)), copy_args(dict(kwargs)))
                b.produced(node, out)
            finally:
                b.active = True
        return out


def trace_record(model: nn.Module, inputs: tuple, sizes: bool = True) -> Graph:
    """Run ``model(*inputs)`` once, recording every operation (caller sets eval/no_grad).

    With ``sizes``, sizes read off tensors are recorded (see the module doc); should the model
    fail with them (code that insists on an exact ``int``), it runs again without, sizes then
    being bare numbers (logged)."""
    if sizes:
        try:
            return _trace(model, inputs, True)
        except Exception as exc:  # any failure: record again the plain way
            log.info("recording with tracked sizes failed (%s: %s); recording sizes as numbers",
                     type(exc).__name__, exc)
    return _trace(model, inputs, False)


def _trace(model: nn.Module, inputs: tuple, sizes: bool) -> Graph:
    b = _Builder(model)
    b.sized = sizes
    handles = []

    def pre(name: str, leaf: bool):
        def hook(m: nn.Module, args: tuple, kwargs: dict) -> None:
            if b.in_leaf:
                if leaf:
                    b.in_leaf += 1
                return
            if leaf:
                b.in_leaf += 1
            else:
                b.scopes.append(name)

        return hook

    def post(name: str, leaf: bool):
        def hook(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            if not leaf:
                if not b.in_leaf:
                    b.scopes.pop()
                return
            b.in_leaf -= 1
            if b.in_leaf:
                return
            b.active = False
            try:
                node = b.add("module", name, b.ref(tuple(args)), b.ref(dict(kwargs)), meta_of(out),
                             m, scope=name)
                if module_rule(type(m)) is None:
                    node.recorded = Recorded(m, copy_args(tuple(args)), copy_args(dict(kwargs)))
                b.produced(node, out)
            finally:
                b.active = True

        return hook

    try:
        for name, m in model.named_modules():
            if not name:
                continue
            leaf = is_leaf(m)
            handles.append(m.register_forward_pre_hook(pre(name, leaf), with_kwargs=True))
            handles.append(m.register_forward_hook(post(name, leaf), with_kwargs=True))
        b.active = False
        for i, x in enumerate(inputs):
            if isinstance(x, torch.Tensor):
                b.bind(x, b.add("input", f"input{i}", meta=x.shape))
        b.active = True
        with _Mode(b):
            out = model(*inputs)
        b.active = False
        b.add("output", "output", (b.ref(out),))
    finally:
        b.recording = False
        for h in handles:
            h.remove()
    nodes = b.nodes
    # a size the model keeps (a cached grid size) holds the builder: leave nothing big in it
    b.nodes, b.values, b.states = [], {}, {}
    log.debug("recorded graph: %d nodes", len(nodes))
    return Graph(nodes, "record")
