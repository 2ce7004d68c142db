"""``nn.PixelShuffle`` / ``nn.PixelUnshuffle`` (and ``F.pixel_shuffle`` / ``F.pixel_unshuffle``).

A pixel shuffle of factor ``r`` turns ``(*, C*r*r, H, W)`` into ``(*, C, H*r, W*r)``: output
channel ``c`` is made of input channels ``c*r*r ... c*r*r + r*r - 1``. Those ``r*r`` input
channels are tied (one unit of the group feeding the shuffle is ``r*r`` channels of its
producer) and the output channel carries that unit on. The unshuffle does the reverse: input
channel ``c`` becomes output channels ``c*r*r ... c*r*r + r*r - 1`` (a unit spans ``r*r``
consecutive channels after it).
"""

from __future__ import annotations

import numpy as np
from torch import nn

from pruneplan.graph._labels import Lab
from pruneplan.graph.rules.base import Call, FunctionRule, ModuleRule, builtin

__all__ = ["PixelShuffleFunctionRule", "PixelShuffleRule", "pixel"]


def pixel(call: Call, x: Lab, factor: int, up: bool) -> Lab | None:
    """Labels after a pixel shuffle (``up``) or unshuffle of ``factor``."""
    nd = len(call.xmeta)
    if nd < 3 or x.axes != (nd - 3,):
        call.block(x, f"{call.where} moves them between channels and pixels")
        return None
    k = factor * factor
    if not up:
        return Lab(x.axes, np.repeat(x.arr, k))
    rows = x.arr.reshape(-1, k)
    for j in range(1, k):  # the r*r channels that make one output channel go together
        call.couple(rows[:, 0], rows[:, j], tie=True)
    return Lab(x.axes, rows[:, 0].copy())


class PixelShuffleRule(ModuleRule):
    """``nn.PixelShuffle`` / ``nn.PixelUnshuffle``."""

    def labels(self, call: Call, x: Lab) -> Lab | None:
        m = call.module
        if isinstance(m, nn.PixelShuffle):
            return pixel(call, x, m.upscale_factor, True)
        return pixel(call, x, m.downscale_factor, False)


class PixelShuffleFunctionRule(FunctionRule):
    """``F.pixel_shuffle(x, upscale_factor)`` / ``F.pixel_unshuffle(x, downscale_factor)``."""

    def labels(self, call: Call) -> Lab | None:
        x = self.main(call)
        if x is None:
            return None
        up = call.name == "pixel_shuffle"
        factor = call.arg(1, "upscale_factor" if up else "downscale_factor")
        if not isinstance(factor, int):
            call.error("takes a factor pruneplan cannot read", x)
            return None
        return pixel(call, x, factor, up)


builtin([nn.PixelShuffle, nn.PixelUnshuffle], rule=PixelShuffleRule())
builtin(names=("pixel_shuffle", "pixel_unshuffle"), rule=PixelShuffleFunctionRule())
