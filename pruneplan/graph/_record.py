"""Build the graph IR by recording one real forward pass (for models fx cannot trace).

A `TorchFunctionMode` sees every torch function and tensor method called outside leaf modules;
forward hooks record each leaf module call as a single node. Python control flow is simply
executed, so whatever path the example inputs take is the graph.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from pruneplan.graph._ir import Graph, Node, Recorded, Ref, copy_args, is_leaf, meta_of, op_name
from pruneplan.graph.rules.base import function_rule, module_rule

__all__ = ["trace_record"]

log = logging.getLogger(__name__)


class _Builder:
    def __init__(self, model: nn.Module) -> None:
        self.nodes: list[Node] = []
        self.values: dict[int, tuple[torch.Tensor, int]] = {}  # id(tensor) -> (tensor, node)
        self.states = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
        self.scopes: list[str] = [""]
        self.in_leaf = 0
        self.active = True

    def add(self, kind: str, target: str, args: tuple = (), kwargs: dict | None = None,
            meta: Any = None, module: nn.Module | None = None, scope: str | None = None) -> Node:
        node = Node(len(self.nodes), kind, target, args, kwargs or {}, meta,
                    self.scopes[-1] if scope is None else scope, module)
        self.nodes.append(node)
        return node

    def bind(self, t: torch.Tensor, node: Node) -> None:
        self.values[id(t)] = (t, node.idx)

    def ref(self, a: Any) -> Any:
        """Replace tensors in ``a`` by references, creating param/const nodes on first sight."""
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


def trace_record(model: nn.Module, inputs: tuple) -> Graph:
    """Run ``model(*inputs)`` once, recording every operation (caller sets eval/no_grad)."""
    b = _Builder(model)
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
        for h in handles:
            h.remove()
    log.debug("recorded graph: %d nodes", len(b.nodes))
    return Graph(b.nodes, "record")
