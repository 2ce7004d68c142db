"""Build the graph IR with torch.fx: symbolic trace, then one execution to record shapes."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from pruneplan.graph._ir import Graph, Node, Recorded, Ref, copy_args, is_leaf, meta_of, op_name
from pruneplan.graph.rules.base import function_rule, module_rule

__all__ = ["trace_fx"]

log = logging.getLogger(__name__)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_leaf(m)


def trace_fx(model: nn.Module, inputs: tuple) -> Graph:
    """Trace ``model`` symbolically and execute the graph once on ``inputs``.

    The caller puts the model in eval mode under no_grad. Raises whatever fx raises when the
    model cannot be traced (Python control flow on tensor values, unsupported constructs).
    """
    graph = _Tracer().trace(model)
    modules = dict(model.named_modules())
    states = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
    nodes: list[Node] = []
    env: dict[fx.Node, Any] = {}
    ref: dict[fx.Node, int] = {}
    last_use: dict[fx.Node, fx.Node] = {}
    for n in graph.nodes:
        for a in n.all_input_nodes:
            last_use[a] = n

    def load(a: Any) -> Any:
        return fx.node.map_arg(a, lambda x: env[x])

    packed: dict[fx.Node, tuple] = {}  # a namedtuple built in forward: the refs it holds

    def refs(a: Any) -> Any:
        return fx.node.map_arg(a, lambda x: packed[x] if x in packed else Ref(ref[x]))

    placeholders = 0
    for n in graph.nodes:
        stack = n.meta.get("nn_module_stack") or {}
        scope = next(reversed(stack.values()))[0] if stack else ""
        if n.op == "placeholder":
            if placeholders < len(inputs):
                value = inputs[placeholders]
            elif n.args:
                value = n.args[0]
            else:
                raise TypeError(f"no example input for argument {n.target!r}")
            placeholders += 1
            node = Node(len(nodes), "input", str(n.target), meta=meta_of(value))
        elif n.op == "get_attr":
            value = _fetch(model, str(n.target))
            key = states.get(id(value))
            kind = "param" if key is not None else "const"
            node = Node(len(nodes), kind, key or str(n.target), meta=meta_of(value), scope=scope)
        elif n.op == "call_module":
            m = modules[str(n.target)]
            args, kwargs = load(n.args), load(n.kwargs)
            value = m(*args, **kwargs)
            kept = _keep(m, args, kwargs, value, module_rule(type(m)) is None)
            scope = str(n.target)
            node = Node(len(nodes), "module", str(n.target), refs(n.args), refs(n.kwargs),
                        meta_of(value), scope, m, kept)
        elif n.op == "call_function" and _is_namedtuple(n.target):
            # a container such as torchvision's InceptionOutputs(logits, aux_logits): not an
            # operation, its fields are the values it packs
            env[n] = n.target(*load(n.args), **load(n.kwargs))
            packed[n] = (*refs(tuple(n.args)), *refs(tuple(n.kwargs.values())))
            continue
        elif n.op == "call_function":
            name = op_name(n.target)
            args, kwargs = load(n.args), load(n.kwargs)
            value = n.target(*args, **kwargs)
            kept = _keep(n.target, args, kwargs, value, function_rule(name) is None)
            given = n.args
            if n.target is getattr and len(n.args) == 2 and n.args[1] in _VIEW_PROPERTIES:
                # ``x.T`` is getattr(x, "T") to fx: the transpose the recorder sees as "T"
                name, given = str(n.args[1]), n.args[:1]
            node = Node(len(nodes), "op", name, refs(given), refs(n.kwargs), meta_of(value),
                        scope, recorded=kept)
        elif n.op == "call_method":
            name = op_name(str(n.target))
            args, kwargs = load(n.args), load(n.kwargs)
            value = getattr(args[0], str(n.target))(*args[1:], **kwargs)
            kept = _keep(_Method(str(n.target)), args, kwargs, value, function_rule(name) is None)
            node = Node(len(nodes), "op", name, refs(n.args), refs(n.kwargs), meta_of(value),
                        scope, recorded=kept)
        elif n.op == "output":
            node = Node(len(nodes), "output", "output", refs(n.args), meta=None)
            value = None
        else:  # pragma: no cover - fx has no other opcodes
            raise TypeError(f"unknown fx opcode {n.op!r}")
        env[n] = value
        ref[n] = node.idx
        nodes.append(node)
        for a in n.all_input_nodes:
            if last_use.get(a) is n:
                env[a] = None
    log.debug("fx graph: %d nodes", len(nodes))
    return Graph(nodes, "fx")


#: tensor properties that are views of their tensor (axes permuted), recorded as operations
_VIEW_PROPERTIES = ("T", "mT")


def _is_namedtuple(target: Any) -> bool:
    return isinstance(target, type) and issubclass(target, tuple) and hasattr(target, "_fields")


def _keep(fn: Any, args: Any, kwargs: Any, value: Any, unknown: bool) -> Recorded | None:
    """The call, kept to be examined, when no rule knows it and it produced a tensor."""
    if not unknown or meta_of(value) is None or not isinstance(meta_of(value), torch.Size):
        return None
    return Recorded(fn, copy_args(args), copy_args(kwargs))


class _Method:
    """Calls method ``name`` of its first argument (a recorded ``call_method``)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, obj: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(obj, self.name)(*args, **kwargs)


def _fetch(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
