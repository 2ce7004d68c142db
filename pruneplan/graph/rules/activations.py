"""Element-wise layers and operations: activations, arithmetic, comparisons, casts.

Channels pass through unchanged; where two labelled operands meet position by position (a
residual sum, a gate) their roots are coupled; a parameter broadcast along the channels (a
learnt scale) is sliced with them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pruneplan.graph._labels import Dim, Lab, PView
from pruneplan.graph.rules.attention import label_uniform_operands
from pruneplan.graph.rules.base import Call, FunctionRule, ModuleRule, builtin, iter_refs, tensorish

__all__ = ["ActivationRule", "ConversionRule", "ElementwiseRule", "PReLURule"]

ACTIVATION_TYPES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
    nn.Softsign, nn.LogSigmoid, nn.Tanhshrink, nn.Threshold, nn.Identity, nn.Softshrink,
    nn.Hardshrink,
)

UNARY = (
    "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh",
    "leaky_relu", "elu", "selu", "celu", "mish", "softplus", "softsign", "logsigmoid", "exp",
    "log", "log1p", "expm1", "sqrt", "rsqrt", "abs", "neg", "pos", "clamp", "clamp_min",
    "clamp_max", "clip", "sin", "cos", "erf", "square", "reciprocal", "sign", "round", "floor",
    "ceil", "tanhshrink", "threshold", "contiguous", "clone", "detach", "float", "double",
    "half", "bfloat16", "cpu", "cuda", "requires_grad", "zeros_like", "ones_like", "full_like",
    "empty_like", "rand_like", "randn_like", "nan_to_num", "invert", "logical_not", "isnan",
    "isfinite", "hardshrink", "softshrink", "trunc", "frac", "exp2", "log2", "log10",
)
BINARY = (
    "add", "sub", "mul", "div", "truediv", "floordiv", "mod", "fmod", "remainder", "pow",
    "maximum", "minimum", "fmax", "fmin", "where", "masked_fill", "eq", "ne", "lt", "le", "gt",
    "ge", "and", "or", "xor", "logical_and", "logical_or", "logical_xor", "atan2", "hypot",
    "lerp", "addcmul", "addcdiv", "copysign", "true_divide", "multiply", "subtract", "divide",
)
#: Operations that, on Python ints, compute a channel width from another (fx graphs).
ARITH = frozenset({"add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow"})


class ActivationRule(ModuleRule):
    """A layer acting on each element alone: channels follow."""

    def labels(self, call: Call, x: Lab) -> Lab:
        return x


class PReLURule(ModuleRule):
    """``nn.PReLU``: follows; with one slope per channel, its ``weight`` is sliced with them."""

    def labels(self, call: Call, x: Lab) -> Lab | None:
        m = call.module
        if m.num_parameters == 1 or 1 not in x.axes:
            return x
        if x.axes != (1,):
            call.block(x, f"{call.where} sees them on other axes")
            return None
        call.own(f"{call.name}.weight", 0, x.arr)
        call.edit("num_parameters", m.num_parameters, x.arr)
        return x


class ElementwiseRule(FunctionRule):
    """An operation on its operands element by element (with broadcasting): labels meeting
    position by position are coupled; a parameter broadcast along them is sliced with them.

    Use it for a custom gating function: ``register_function_rule("my_gate", ElementwiseRule())``.
    """

    def propagate(self, call: Call) -> Any:
        if call.name in ARITH and not tensorish(call.out):
            dims = [d for d in (call.dim(r) for r in iter_refs(call.node.args)) if d is not None]
            if not dims:
                return None
            args = call.node.args
            if call.name == "floordiv" and len(args) == 2 and call.dim(args[0]) is not None \
                    and type(args[1]) is int and args[1] > 0 and dims[0].mul == 1:
                d = dims[0]  # a width divided by a literal (C // num_heads): kept exact
                return Dim(d.roots, d.arr, d.since, d.div * args[1])
            if call.name == "mul" and len(args) == 2 and len(dims) == 1 and dims[0].div == 1 \
                    and sum(type(a) is int and a > 1 for a in args) == 1:
                d = dims[0]  # a width times a literal (B * num_heads): the literal is kept
                k = next(a for a in args if type(a) is int)
                return Dim(d.roots, None, d.since, 1, d.mul * k)
            return Dim(tuple(sorted({r for d in dims for r in d.roots})))
        return super().propagate(call)

    def params(self, call: Call) -> PView | None:
        x = call.x
        if not isinstance(x, PView) or not isinstance(call.out, torch.Size):
            return None
        others = next(iter_refs((call.node.args[1:], call.node.kwargs)), None)
        return x if others is None else None

    def labels(self, call: Call) -> Lab | None:
        infos = label_uniform_operands(call)
        return call.merge([(i, call.meta(r)) for i, r in zip(infos, call.refs, strict=True)])


class ConversionRule(FunctionRule):
    """``to`` / ``type_as`` / ``type`` keep the main input's labels; ``new_*`` make fresh
    tensors whose sizes are checked (a labelled width used there must stay consistent)."""

    _KEEP = ("to", "type_as", "type")

    def propagate(self, call: Call) -> Any:
        out = super().propagate(call)
        if call.name.startswith("new_") and tensorish(call.out):
            call.check_widths(out, call.node.args[1:])
        return out

    def params(self, call: Call) -> PView | None:
        x = call.x
        ok = isinstance(x, PView) and isinstance(call.out, torch.Size) and call.name in ("to", "type_as")
        return x if ok else None

    def labels(self, call: Call) -> Lab | None:
        return call.x if call.name in self._KEEP and isinstance(call.x, Lab) else None


builtin(ACTIVATION_TYPES, rule=ActivationRule())
# an empty nn.Sequential() (a no-op shortcut) is the only Sequential recorded as one call
builtin([nn.Sequential], rule=ActivationRule())
builtin([nn.PReLU], rule=PReLURule())
builtin(names=(*UNARY, *BINARY), rule=ElementwiseRule())
builtin(names=("to", "type_as", "type", "new_zeros", "new_ones", "new_empty", "new_full"),
        rule=ConversionRule())
