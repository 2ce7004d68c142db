"""Reductions, softmax and Lp-normalisation: a reduction over all the labelled axes ends the
labels (its value is taken over the channels that remain); over other axes the labels follow;
softmax or normalisation over the channels blocks (removing one changes every other)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pruneplan.graph._ir import Ref
from pruneplan.graph._labels import Lab, PView
from pruneplan.graph.rules.base import Call, FunctionRule, ModuleRule, builtin, iter_refs

__all__ = ["NormalizeRule", "ReduceRule", "SoftmaxModuleRule", "SoftmaxRule", "reduce"]

REDUCE = ("mean", "sum", "nansum", "nanmean", "amax", "amin", "max", "min", "std", "var",
          "norm", "logsumexp", "prod", "argmax", "argmin", "all", "any", "median", "count_nonzero")


def reduce(call: Call, x: Lab) -> Any:
    """Labels after reducing over ``dim`` (``keepdim`` kept into account)."""
    nd = len(call.xmeta)
    dim = call.arg(1, "dim")
    keep = bool(call.arg(2, "keepdim", False))
    dims = set(range(nd)) if dim is None else {d % nd for d in ((dim,) if isinstance(dim, int)
                                                                 else dim)}
    tuple_out = isinstance(call.out, list)
    if dims & set(x.axes):
        if set(x.axes) <= dims:
            return None
        call.block(x, f"{call.where} reduces over part of their axes")
        return None
    lab = x if keep else Lab(tuple(a - sum(d < a for d in dims) for a in x.axes), x.arr)
    return [lab, lab] if tuple_out else lab


#: reductions whose value along the axes that stay is computed from those positions alone
_VALUES = ("mean", "sum", "nansum", "nanmean", "amax", "amin", "std", "var", "logsumexp", "prod")


class ReduceRule(FunctionRule):
    """mean / sum / amax / ...; ``max(a, b)`` / ``min(a, b)`` of two tensors are element-wise.
    A parameter reduced over some axes keeps the others (a sum of per-axis position tables)."""

    def params(self, call: Call) -> PView | None:
        x, out = call.x, call.out
        if call.name not in _VALUES or not isinstance(x, PView) or not isinstance(out, torch.Size):
            return None
        nd = len(x.dims)
        dim = call.arg(1, "dim")
        if dim is None or not isinstance(dim, int | tuple | list):
            return None
        dims = {d % nd for d in ((dim,) if isinstance(dim, int) else dim)}
        if bool(call.arg(2, "keepdim", False)):
            kept = tuple(None if i in dims else p for i, p in enumerate(x.dims))
        else:
            kept = tuple(p for i, p in enumerate(x.dims) if i not in dims)
        return PView(x.key, kept) if len(kept) == len(out) else None

    def labels(self, call: Call) -> Any:
        if call.name in ("max", "min") and isinstance(call.arg(1, "other"), Ref):
            refs = list(iter_refs(call.node.args))
            return call.merge([(call.read(r), call.meta(r)) for r in refs])
        x = self.main(call)
        return reduce(call, x) if x is not None else None


class SoftmaxRule(FunctionRule):
    """softmax / log_softmax / softmin over a dim."""

    def labels(self, call: Call) -> Lab | None:
        x = self.main(call)
        if x is None:
            return None
        dim = call.arg(1, "dim")
        if dim is None or dim % len(call.xmeta) in x.axes:
            call.block(x, f"{call.where} normalises over them")
            return None
        return x


class NormalizeRule(FunctionRule):
    """``F.normalize(x, p, dim)`` (Lp-normalisation along ``dim``, 1 by default): over another
    axis than the labelled ones the labels follow (cosine attention normalises q and k over
    head_dim or over the tokens, per head); over them it blocks."""

    def labels(self, call: Call) -> Lab | None:
        x = self.main(call)
        if x is None:
            return None
        dim = call.arg(2, "dim", 1)
        if not isinstance(dim, int) or dim % len(call.xmeta) in x.axes:
            call.block(x, f"{call.where} normalises over them")
            return None
        return x


class SoftmaxModuleRule(ModuleRule):
    """``nn.Softmax`` / ``LogSoftmax`` / ``Softmin`` (torch's implicit dim when ``dim=None``)."""

    def labels(self, call: Call, x: Lab) -> Lab | None:
        nd = len(call.xmeta)
        dim = call.module.dim
        if dim is None:
            dim = 0 if nd in (0, 1, 3) else 1
        if dim % nd in x.axes:
            call.block(x, f"{call.where} normalises over them")
            return None
        return x


builtin(names=REDUCE, rule=ReduceRule())
builtin(names=("softmax", "log_softmax", "softmin"), rule=SoftmaxRule())
builtin(names=("normalize",), rule=NormalizeRule())
builtin([nn.Softmax, nn.LogSoftmax, nn.Softmin], rule=SoftmaxModuleRule())
