"""Splitting a network at a module: the part before it, and the part after it as a function of z.

``fx_split`` traces the model with ``torch.fx`` (the module kept as a leaf) and builds two
``GraphModule`` objects that share the model's submodules (nothing is copied or changed):

* ``prefix(*inputs) -> (z, *extras)``: everything that does not depend on ``z``; ``extras`` are
  the values the after-part needs besides ``z`` (e.g. the input of a residual block);
* ``suffix(z, *extras) -> output``: everything that depends on ``z``.

When the part after ``z`` starts with unit-wise modules (BatchNorm, activations, pooling) and then
a ``Linear`` or ``Conv`` with ``groups=1`` that consumes them alone, ``LinearShortcut`` describes
that head so that the Shapley estimator can update the linear layer's output incrementally
(optionally with the BatchNorm right after the linear layer folded in) and run only the ``tail``
after it for every coalition.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .base import PASS_THROUGH_TYPES

__all__ = ["LinearShortcut", "Split", "activation_bytes", "fx_split"]

logger = logging.getLogger(__name__)

#: modules that act on each unit (channel) separately: masking unit c of their input changes
#: only unit c of their output, to the value it has for an all-zero input
UNITWISE_MODULES: tuple[type[nn.Module], ...] = (
    *PASS_THROUGH_TYPES,  # BatchNorm and the element-wise activations
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)
UNITWISE_FUNCTIONS = (torch.relu, F.relu, torch.sigmoid, torch.tanh, F.gelu, F.silu)
UNITWISE_METHODS = ("relu", "sigmoid", "tanh")


class _LeafTracer(fx.Tracer):
    """A tracer that keeps ``leaf`` (and the standard torch.nn modules) as call_module nodes."""

    def __init__(self, leaf: nn.Module) -> None:
        super().__init__()
        self.leaf = leaf

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is self.leaf or super().is_leaf_module(m, module_qualified_name)


def _extract(
    root: nn.Module,
    graph: fx.Graph,
    inputs: list[fx.Node],
    outputs: list[fx.Node] | fx.Node,
) -> fx.GraphModule:
    """A GraphModule computing ``outputs`` (a node list, or the original output node) from ``inputs``."""
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, n in enumerate(inputs):
        env[n] = new.placeholder(f"in_{i}_{n.name}")
    targets = [outputs] if isinstance(outputs, fx.Node) else list(outputs)
    needed: set[fx.Node] = set()
    stack = list(targets)
    while stack:
        n = stack.pop()
        if n in needed or n in env:
            continue
        needed.add(n)
        stack.extend(n.all_input_nodes)
    for n in graph.nodes:
        if n in needed and n not in env:
            if n.op == "placeholder":
                raise ValueError(f"split needs the model input {n.name}")
            env[n] = new.node_copy(n, lambda a: env[a])
    if isinstance(outputs, list):
        new.output(tuple(env[o] for o in outputs))
    gm = fx.GraphModule(root, new)
    return gm


def _descendants(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return seen


def _data_dependent(graph: fx.Graph) -> set[fx.Node]:
    dep: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op == "placeholder" or any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    return dep


def _extras(graph: fx.Graph, after: set[fx.Node], exclude: fx.Node) -> list[fx.Node]:
    """Data-dependent nodes outside ``after`` that nodes of ``after`` read."""
    dep = _data_dependent(graph)
    extras: list[fx.Node] = []
    for n in graph.nodes:
        if n in after or n is exclude or n not in dep:
            continue
        if any(u in after for u in n.users):
            extras.append(n)
    return extras


@dataclass
class LinearShortcut:
    """The head of the after-part: unit-wise modules, then a linear layer (maybe with a BN)."""

    head: list[nn.Module | Any]
    linear: nn.Module
    post_bn: nn.Module | None
    tail: fx.GraphModule
    tail_extras: list[int] = field(default_factory=list)

    def apply_head(self, z: torch.Tensor) -> torch.Tensor:
        z = z.clone()  # head modules may work in place
        for h in self.head:
            z = h(z)
        return z

    def linear_out(self, a: torch.Tensor) -> torch.Tensor:
        out = self.linear(a)
        return self.post_bn(out) if self.post_bn is not None else out

    def unit_weight(self) -> torch.Tensor:
        """The linear weight with the folded BatchNorm scale, output axis first."""
        w = self.linear.weight
        if self.post_bn is not None:
            bn = self.post_bn
            scale = (
                torch.ones_like(bn.running_var)
                if bn.running_var is None
                else ((bn.running_var + bn.eps).rsqrt())
            )
            if bn.weight is not None:
                scale = scale * bn.weight
            w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
        return w

    def contributions(
        self, delta: torch.Tensor, weight: torch.Tensor, buffer: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-unit contributions of ``delta`` to the linear output.

        Returns ``D`` with ``D[c]`` of shape ``(N, out, *spatial)``: the part of the linear
        output due to unit ``c`` of ``delta``. For a 2-d convolution ``D`` is written into
        ``buffer`` (a flat tensor, reused across calls: fresh large allocations cost page faults
        on CPU) by one batched matrix product over unfolded patches.
        """
        lin = self.linear
        if isinstance(lin, nn.Linear):
            # (N, C) x (O, C) -> (C, N, O)
            return delta.t()[:, :, None] * weight.t()[:, None, :]
        n, c_in = delta.shape[0], delta.shape[1]
        c_out = weight.shape[0]
        if isinstance(lin, nn.Conv2d) and not isinstance(lin.padding, str):
            kernel = weight.shape[2:]
            patches = F.unfold(delta, kernel, lin.dilation, lin.padding, lin.stride)
            length = patches.shape[-1]
            k = kernel[0] * kernel[1]
            patches = patches.reshape(n, c_in, k, length).permute(1, 2, 0, 3)
            patches = patches.reshape(c_in, k, n * length)
            w = weight.reshape(c_out, c_in, k).transpose(0, 1)  # (C, O, k)
            size = c_in * c_out * n * length
            if buffer is None or buffer.numel() < size:
                out = torch.bmm(w, patches)
            else:
                out = torch.bmm(w, patches, out=buffer[:size].view(c_in, c_out, n * length))
            h_out = delta.shape[2] + 2 * lin.padding[0] - lin.dilation[0] * (kernel[0] - 1) - 1
            h_out = h_out // lin.stride[0] + 1
            out = out.view(c_in, c_out, n, h_out, length // h_out)
            return out.transpose(1, 2)  # (C, N, O, H, W), a view
        w = weight.transpose(0, 1).reshape(c_in * c_out, 1, *weight.shape[2:])
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[delta.dim() - 2]
        out = conv(delta, w, None, lin.stride, lin.padding, lin.dilation, c_in)
        out = out.reshape(n, c_in, c_out, *out.shape[2:])
        return out.transpose(0, 1)


@dataclass
class Split:
    """The two halves of a model split at a module (see the module docstring)."""

    prefix: fx.GraphModule
    suffix: fx.GraphModule
    n_extras: int
    shortcut: LinearShortcut | None = None


def _unitwise(node: fx.Node, modules: dict[str, nn.Module]) -> Any | None:
    """The callable of a single-input unit-wise node, or None."""
    if len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
        return None
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, UNITWISE_MODULES) and not node.kwargs:
            return m
    if node.op == "call_function" and node.target in UNITWISE_FUNCTIONS:
        fn, kwargs = node.target, dict(node.kwargs)
        kwargs.pop("inplace", None)
        return lambda t: fn(t, **kwargs)
    if node.op == "call_method" and node.target in UNITWISE_METHODS and not node.kwargs:
        name = node.target
        return lambda t: getattr(t, name)()
    return None


def _find_shortcut(gm: fx.GraphModule, z_node: fx.Node, extras: list[fx.Node]) -> LinearShortcut | None:
    modules = dict(gm.named_modules())
    head: list[Any] = []
    cur = z_node
    while len(cur.users) == 1:
        nxt = next(iter(cur.users))
        fn = _unitwise(nxt, modules)
        if fn is None:
            break
        head.append(fn)
        cur = nxt
    if len(cur.users) != 1:
        return None
    lin_node = next(iter(cur.users))
    if lin_node.op != "call_module" or lin_node.args != (cur,) or lin_node.kwargs:
        return None
    lin = modules[lin_node.target]
    ok_conv = (
        isinstance(lin, nn.modules.conv._ConvNd)
        and not isinstance(lin, nn.modules.conv._ConvTransposeNd)
        and lin.groups == 1
        and lin.padding_mode == "zeros"
    )
    if not (ok_conv or isinstance(lin, nn.Linear)):
        return None
    end = lin_node
    post_bn = None
    if len(lin_node.users) == 1:
        nxt = next(iter(lin_node.users))
        if (
            nxt.op == "call_module"
            and isinstance(modules[nxt.target], nn.modules.batchnorm._BatchNorm)
            and nxt.args == (lin_node,)
            and modules[nxt.target].track_running_stats
        ):
            post_bn = modules[nxt.target]
            end = nxt
    after = _descendants(end)
    tail_extra_nodes = _extras(gm.graph, after, end)
    if any(n not in extras for n in tail_extra_nodes):
        return None
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    tail = _extract(gm, gm.graph, [end, *tail_extra_nodes], out_node)
    return LinearShortcut(
        head=head,
        linear=lin,
        post_bn=post_bn,
        tail=tail,
        tail_extras=[extras.index(n) for n in tail_extra_nodes],
    )


def fx_split(model: nn.Module, module: nn.Module) -> Split:
    """Split ``model`` at ``module`` with torch.fx; raise if the model is not traceable."""
    tracer = _LeafTracer(module)
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph)
    name = next(n for n, m in model.named_modules() if m is module)
    z_nodes = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
    if len(z_nodes) != 1:
        raise ValueError(f"module {name!r} appears {len(z_nodes)} times in the traced graph")
    z_node = z_nodes[0]
    after = _descendants(z_node)
    out_node = next(n for n in graph.nodes if n.op == "output")
    if out_node not in after:
        raise ValueError(f"the model output does not depend on module {name!r}")
    extras = _extras(graph, after, z_node)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    prefix = _extract(gm, graph, placeholders, [z_node, *extras])
    suffix = _extract(gm, graph, [z_node, *extras], out_node)
    try:
        shortcut = _find_shortcut(gm, z_node, extras)
    except Exception as exc:  # pragma: no cover - defensive: the shortcut is optional
        logger.info("no linear shortcut: %s", exc)
        shortcut = None
    return Split(prefix=prefix, suffix=suffix, n_extras=len(extras), shortcut=shortcut)


class _ByteCounter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.total = 0

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor) and n.op != "placeholder":
            self.total += result.numel() * result.element_size()
        return result


def activation_bytes(gm: fx.GraphModule, *args: Any) -> int:
    """Bytes of every tensor a GraphModule computes on ``args`` (an upper bound of its memory)."""
    counter = _ByteCounter(gm)
    counter.run(*args)
    return counter.total
