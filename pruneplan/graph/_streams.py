"""Streams: where the units of a group sit on a channel or feature axis.

A *stream* describes where the units of a group sit among the channels (or features) flowing
between layers: unit ``u`` occupies the positions ``Stream.unit(u)``. Roots start a stream,
pass-through layers carry it on, and consumers read it on their input axis.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pruneplan.graph.spec import SliceSpec

__all__ = ["Stream"]


@dataclass(frozen=True)
class Stream:
    """Where the units of a group sit on a channel/feature axis (affine or explicit)."""

    offset: int = 0
    repeat: int = 1
    tiles: int = 1
    tile_stride: int = 0
    positions: tuple[tuple[int, ...], ...] | None = None

    def slice(self, tensor: str, axis: int, modulo: int | None = None) -> SliceSpec:
        """The `SliceSpec` of ``tensor`` along ``axis`` that this stream implies."""
        return SliceSpec(
            tensor=tensor,
            axis=axis,
            offset=self.offset,
            repeat=self.repeat,
            tiles=self.tiles,
            tile_stride=self.tile_stride,
            positions=self.positions,
            modulo=modulo,
        )

    @property
    def per_unit(self) -> int:
        """Positions each unit occupies."""
        if self.positions is not None:
            # a unit of a tied set may hold no position here (see the engine's partial streams)
            return max(len(p) for p in self.positions)
        return self.repeat * self.tiles

    def unit(self, u: int) -> list[int]:
        """Positions of unit ``u``."""
        if self.positions is not None:
            return list(self.positions[u])
        base = self.offset + u * self.repeat
        return [base + r + t * self.tile_stride for t in range(self.tiles) for r in range(self.repeat)]

    def expand(self, factor: int) -> Stream:
        """Each position ``p`` becomes ``p * factor + f`` for ``f < factor`` (channels-first
        flatten, depthwise channel multiplier)."""
        if factor == 1:
            return self
        if self.positions is None:
            # o + u*R + r + t*S  ->  o*F + u*(R*F) + (r*F + f) + t*(S*F): still affine
            return replace(self, offset=self.offset * factor, repeat=self.repeat * factor,
                           tile_stride=self.tile_stride * factor)
        return Stream(positions=tuple(tuple(p * factor + f for p in pos for f in range(factor))
                                      for pos in self.positions))
