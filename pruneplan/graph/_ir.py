"""A small graph IR shared by the fx tracer and the recording tracer.

Both tracers produce the same thing: a list of `Node` in execution (topological) order, whose
arguments refer to earlier nodes through `Ref`. Every node carries the shape of the value it
produced in the example pass (``torch.Size`` for a tensor, a list for a tuple/list of values,
``None`` for anything else), so the analysis never needs to run the model again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Graph", "Node", "Recorded", "Ref", "copy_args", "is_leaf", "mark_leaf", "mark_leaf_name",
           "meta_of", "op_name", "qualified_name"]

#: Module types recorded as one node whatever library defines them (types given a rule by users).
_LEAF_TYPES: set[type] = set()
#: The same by ``"module.Class"`` name, for types of optional libraries (never imported here).
_LEAF_NAMES: set[str] = set()
_named_leaf: dict[type, bool] = {}
_TORCH_OPS = (torch._ops.OpOverload, torch._ops.OpOverloadPacket)

_REVERSED_OR_INPLACE = {
    "radd": "add",
    "iadd": "add",
    "rsub": "sub",
    "isub": "sub",
    "rmul": "mul",
    "imul": "mul",
    "rtruediv": "truediv",
    "itruediv": "truediv",
    "rdiv": "div",
    "idiv": "div",
    "rfloordiv": "floordiv",
    "ifloordiv": "floordiv",
    "rpow": "pow",
    "ipow": "pow",
    "rmatmul": "matmul",
    "imatmul": "matmul",
    "iand": "and",
    "ior": "or",
}


@dataclass(frozen=True)
class Ref:
    """A reference to the value produced by node ``node``."""

    node: int


@dataclass
class Recorded:
    """A call kept to be run again: the callable and a copy of its example arguments."""

    fn: Any
    args: tuple
    kwargs: dict


def copy_args(a: Any) -> Any:
    """``a`` with every tensor replaced by a detached copy (later in-place ops cannot touch it)."""
    if isinstance(a, torch.Tensor):
        return a.detach().clone()
    if isinstance(a, tuple):
        return tuple(copy_args(x) for x in a)
    if isinstance(a, list):
        return [copy_args(x) for x in a]
    if isinstance(a, dict):
        return {k: copy_args(v) for k, v in a.items()}
    return a


@dataclass
class Node:
    """One executed operation.

    Attributes:
        idx: position in `Graph.nodes`.
        kind: ``input``, ``param`` (a parameter/buffer of the model, ``target`` is its
            state-dict key), ``const`` (any other tensor not produced by the graph),
            ``module`` (a call of a leaf module, ``target`` is its path), ``op`` (a function or
            method, ``target`` is its canonical name, see `op_name`) or ``output``.
        args, kwargs: the call's arguments, with `Ref` in place of graph values.
        meta: shape of the produced value (``torch.Size``), a list of metas, or ``None``.
        scope: path of the innermost module whose ``forward`` executed the operation.
        module: the called module for ``module`` nodes.
        recorded: for a call no rule knew when it was traced, the call itself (to examine it).
    """

    idx: int
    kind: str
    target: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    meta: Any = None
    scope: str = ""
    module: nn.Module | None = None
    recorded: Recorded | None = field(default=None, compare=False)

    def where(self) -> str:
        """A human description for messages: the op and the module path it ran in."""
        if self.kind == "module":
            return f"module {self.target!r} ({type(self.module).__name__})"
        return f"operation {self.target!r} in module {self.scope or '<top level>'!r}"


@dataclass
class Graph:
    """The executed graph: nodes in order, and which tracer produced it."""

    nodes: list[Node]
    source: str


def op_name(target: Any) -> str:
    """Canonical name of a function/method target shared by both tracers.

    ``operator.add``, ``torch.add``, ``Tensor.add``, ``Tensor.__radd__``, ``Tensor.add_`` and the
    fx method name ``"add"`` all become ``"add"``.
    """
    if isinstance(target, str):
        name = target
    elif hasattr(target, "_opoverload") or isinstance(target, _TORCH_OPS):
        # torch operators (``torch.ops.ns.op``, ``torch.library.custom_op``): "ns::op", and the
        # plain name for ATen's own
        op = getattr(target, "_opoverload", target)
        name = op._schema.name if isinstance(op, torch._ops.OpOverload) else op._qualified_op_name
        if name.startswith("aten::"):
            name = name[len("aten::"):]
        else:
            return name
    else:
        name = getattr(target, "__name__", None) or str(target)
        if name == "__get__":  # a property getter such as Tensor.T
            name = getattr(getattr(target, "__self__", None), "__name__", name)
    if name.startswith("__") and name.endswith("__") and len(name) > 4:
        name = name[2:-2]
    name = _REVERSED_OR_INPLACE.get(name, name)
    if name.endswith("_") and not name.startswith("_") and len(name) > 1:
        name = name[:-1]
    return name


def meta_of(value: Any) -> Any:
    """The shape meta of a runtime value (see `Node.meta`)."""
    if isinstance(value, torch.Tensor):
        return value.shape
    if isinstance(value, tuple | list):
        return [meta_of(v) for v in value]
    return None


def mark_leaf(cls: type) -> None:
    """Record calls of modules of type ``cls`` (and its subclasses) as single nodes."""
    _LEAF_TYPES.add(cls)


def qualified_name(cls: type) -> str:
    """``"package.module.Class"`` of a class."""
    return f"{cls.__module__}.{cls.__qualname__}"


def mark_leaf_name(qualified: str) -> None:
    """Record calls of modules whose type (or a base) is named ``qualified`` as single nodes."""
    _LEAF_NAMES.add(qualified)
    _named_leaf.clear()


def _leaf_by_name(cls: type) -> bool:
    try:
        return _named_leaf[cls]
    except KeyError:
        found = any(qualified_name(c) in _LEAF_NAMES for c in cls.__mro__)
        _named_leaf[cls] = found
        return found


def is_leaf(m: nn.Module) -> bool:
    """A module recorded as one node: a built-in ``torch.nn`` layer, or a type given a rule.

    Built-in modules made of other modules (``TransformerEncoderLayer``, containers) are traced
    through, so that their inner layers are seen; ``MultiheadAttention`` (whose packed
    projection is not a child module) stays one node.
    """
    if _LEAF_TYPES and any(c in _LEAF_TYPES for c in type(m).__mro__):
        return True
    if _LEAF_NAMES and _leaf_by_name(type(m)):
        return True
    mod = type(m).__module__
    builtin = mod.startswith("torch.nn") or mod.startswith("torch.ao.nn")
    return builtin and (isinstance(m, nn.MultiheadAttention) or next(m.children(), None) is None)
