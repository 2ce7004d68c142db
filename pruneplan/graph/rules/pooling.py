"""Pooling, padding and resampling: they act on the spatial axes (the last ``k``); channels
follow unless they sit on a spatial axis."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from pruneplan.graph._labels import Lab, PView
from pruneplan.graph.rules.base import Call, FunctionRule, ModuleRule, builtin

__all__ = ["PoolRule", "SpatialRule"]

POOL_TYPES = (
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd, nn.modules.padding._ConstantPadNd,
    nn.modules.padding._ReflectionPadNd, nn.modules.padding._ReplicationPadNd,
    nn.ZeroPad2d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)
_POOL_OPS = ("adaptive_avg_pool", "adaptive_max_pool", "avg_pool", "max_pool", "lp_pool",
             "fractional_max_pool")
_RESAMPLE = ("interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "grid_sample")


def _spatial(call: Call, x: Lab, k: int) -> bool:
    """Whether the labels stay off the last ``k`` axes (blocks them otherwise)."""
    nd = len(call.xmeta)
    return not set(x.axes) & set(range(nd - k, nd))


class PoolRule(ModuleRule):
    """A pooling / padding / upsampling layer (spatial rank from its class name)."""

    def labels(self, call: Call, x: Lab) -> Lab | None:
        m = re.search(r"([123])d$", type(call.module).__name__)
        k = int(m.group(1)) if m else len(call.xmeta) - 2
        if not _spatial(call, x, k):
            call.block(x, f"{call.where} mixes them spatially")
            return None
        return x


class SpatialRule(FunctionRule):
    """``F.max_pool2d`` & co., ``interpolate``, ``grid_sample``, ``pad``. A parameter resampled
    on its spatial axes (a learned position table resized to the input's grid) keeps its other
    axes: units meeting it there slice it."""

    def params(self, call: Call) -> PView | None:
        x, out = call.x, call.out
        if call.name not in ("interpolate", "upsample") or not isinstance(x, PView) \
                or not isinstance(out, torch.Size) or len(out) != len(x.dims):
            return None
        k = len(out) - 2
        return PView(x.key, (*x.dims[:len(out) - k], *(None,) * k))

    def labels(self, call: Call) -> Any:
        x = self.main(call)
        if x is None:
            return None
        name = call.name
        m = re.search(r"([123])d(_with_indices)?$", name)
        if name in _RESAMPLE:
            k: int | None = len(call.xmeta) - 2
        elif name == "pad":
            pad = call.arg(1, "pad")
            if not isinstance(pad, tuple | list):
                return call.unsupported()
            # pairs run from the last axis backwards; a (0, 0) pair leaves its axis alone
            nd = len(call.xmeta)
            padded = {nd - 1 - j for j in range(len(pad) // 2) if pad[2 * j] or pad[2 * j + 1]}
            if padded & set(x.axes):
                call.block(x, f"{call.where} acts on their axis")
                return None
            return x
        else:
            k = int(m.group(1)) if m else None
        if k is None:
            return call.unsupported()
        if not _spatial(call, x, k):
            call.block(x, f"{call.where} acts on their axis")
            return None
        return [x, x] if isinstance(call.out, list) else x


builtin(POOL_TYPES, rule=PoolRule())
builtin(names=[f"{p}{k}d{s}" for p in _POOL_OPS for k in (1, 2, 3) for s in ("", "_with_indices")],
        rule=SpatialRule())
builtin(names=(*_RESAMPLE, "pad"), rule=SpatialRule())
