"""Examine a call no rule knows on its recorded example: which output channels move when single
input channels are perturbed.

The tracers keep, for calls that have no rule when they are recorded (rare by construction),
the callable and a copy of its arguments (`pruneplan.graph._ir.Recorded`). When labelled
channels reach such a call, it is run again on that copy with the channels of one labelled
input perturbed, a few at a time: if only the perturbed channels of the output move (same axis,
same positions) the call acts on each channel alone and the labels follow it (coupled, like an
element-wise operation, when several inputs carry them); if other channels move it mixes them,
and the roots are left out with a reason naming the call.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from pruneplan.graph._ir import Recorded, Ref
from pruneplan.graph._labels import Lab

__all__ = ["examine"]

log = logging.getLogger(__name__)

#: single channels tried per labelled input, besides the random halves
_SINGLES = 4
_HALVES = 2


def _substitute(a: Any, pos: int, value: torch.Tensor, counter: list[int]) -> Any:
    """``a`` with its ``pos``-th tensor (in `iter_refs` order) replaced by ``value``."""
    if isinstance(a, torch.Tensor):
        k = counter[0]
        counter[0] += 1
        return value if k == pos else a
    if isinstance(a, tuple):
        return tuple(_substitute(x, pos, value, counter) for x in a)
    if isinstance(a, list):
        return [_substitute(x, pos, value, counter) for x in a]
    if isinstance(a, dict):
        return {k: _substitute(v, pos, value, counter) for k, v in a.items()}
    return a


def _tensors(a: Any) -> list[torch.Tensor]:
    if isinstance(a, torch.Tensor):
        return [a]
    if isinstance(a, tuple | list):
        return [t for x in a for t in _tensors(x)]
    if isinstance(a, dict):
        return [t for x in a.values() for t in _tensors(x)]
    return []


def _run(rec: Recorded, pos: int | None = None, value: torch.Tensor | None = None) -> Any:
    args, kwargs = rec.args, rec.kwargs
    if pos is not None:
        counter = [0]
        args = _substitute(args, pos, value, counter)
        kwargs = _substitute(kwargs, pos, value, counter)
    with torch.no_grad():
        return rec.fn(*args, **kwargs)


def examine(rec: Recorded, refs: list[Ref], labelled: list[tuple[int, Lab]], out_shape: Any,
            seed: int) -> str | None:
    """How a recorded call treats the channels of its labelled inputs.

    Args:
        rec: the recorded call (its tensors in the same order as ``refs``).
        labelled: ``(index into refs, labels)`` of every labelled input, each on one axis.
        out_shape: the shape of the call's output.
        seed: seeds the perturbations (the result is deterministic).

    Returns:
        ``None`` when every labelled input's channels reach the same positions of the same
        axis of the output and nowhere else (a per-channel call), else a short reason.
    """
    tensors = _tensors((rec.args, rec.kwargs))
    if len(tensors) != len(refs):
        return "has recorded arguments that do not match the graph"
    try:
        base = _run(rec)
        again = _run(rec)
    except Exception as exc:  # a call that cannot be repeated cannot be examined
        return f"could not be run again ({type(exc).__name__}: {exc})"
    if not isinstance(base, torch.Tensor) or base.shape != out_shape:
        return "does not return one tensor"
    if not torch.equal(base, again):
        return "does not give the same result twice"
    gen = torch.Generator().manual_seed(seed)
    for k, lab in labelled:
        x = tensors[k]
        (axis,) = lab.axes
        nd = x.dim()
        if base.dim() != nd or base.shape[axis] != x.shape[axis] or not x.is_floating_point():
            return "does not keep their axis in its output"
        c = x.shape[axis]
        trials = sorted({0, c - 1, *torch.randint(c, (_SINGLES - 2,), generator=gen).tolist()})
        subsets = [[t] for t in trials]
        subsets += [torch.randperm(c, generator=gen)[: max(1, c // 2)].tolist() for _ in range(_HALVES)]
        scale = float(x.abs().max()) + 1.0
        for chans in subsets:
            idx = torch.tensor(chans)
            noise = torch.zeros_like(x)
            shape = [1] * nd
            shape[axis] = len(chans)
            bump = (torch.rand(shape, generator=gen, dtype=x.dtype) + 0.5) * scale
            noise.index_add_(axis, idx, bump.expand(*[s if d != axis else len(chans)
                                                     for d, s in enumerate(x.shape)]).contiguous())
            y = _run(rec, k, x + noise)
            if not isinstance(y, torch.Tensor) or y.shape != base.shape:
                return "changes the shape of its output"
            moved = (y - base).abs().amax(dim=[d for d in range(nd) if d != axis]) > 0
            outside = moved.clone()
            outside[idx] = False
            if bool(outside.any()):
                return "mixes their channels"
    return None
