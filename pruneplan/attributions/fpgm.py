"""FPGM: distance of each filter from the others (filter pruning via geometric median)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ._weights import unit_rows
from .base import AttributionMetric, _with_shared_doc

__all__ = ["FPGMAttributionMetric"]


@_with_shared_doc
class FPGMAttributionMetric(AttributionMetric):
    """Score of unit ``i``: ``sum_j ||w_i - w_j||_2`` over the other units ``j`` of the module.

    He et al., "Filter pruning via geometric median for deep convolutional neural networks
    acceleration", CVPR 2019: units close to the geometric median of the layer's filters are the
    most replaceable by the others, so the smallest total distance is pruned first. ``w_i`` is
    every weight of unit ``i`` as `._weights.unit_rows` gives it (output axis 0; 1 for transposed
    convolutions, Embedding and GPT-2's Conv1D; an RNN's gate rows), flattened. No
    data is read; ``reduction="none"`` returns a ``(1, units)`` matrix;
    ``find_best_evaluation_module`` is ignored.

    Raises:
        ValueError: the module has no weight tensor (at ``run``).
    """

    uses_data = False

    def _static_scores(self, name: str, module: nn.Module) -> np.ndarray:
        return distance_sums(unit_rows(name, module)).numpy()


#: a pair whose squared distance from the Gram form is below this fraction of the two centred
#: squared norms is recomputed from its difference (the Gram form cancels for close rows)
_CLOSE = 1e-3
#: float64 elements of one block of the distance matrix or of the differences (32 MiB)
_BLOCK = 2**22


def distance_sums(rows: torch.Tensor) -> torch.Tensor:
    """``(units,)`` float64: ``sum_j ||rows[i] - rows[j]||_2`` for every row ``i`` of a float64
    ``(units, fan_in)`` matrix.

    The squared distances come from the Gram matrix of the centred rows
    (``|a|^2 + |b|^2 - 2 a.b``, one matrix product: distances do not change under a shift, and
    centring makes the norms that cancel small), computed for the upper triangle in blocks of
    rows so that memory stays at about ``_BLOCK`` elements whatever the width. The Gram form
    loses precision where two rows are close (its rounding is relative to their norms, not
    their distance), so every pair below ``_CLOSE`` of their norms, the diagonal included, is
    recomputed exactly from the difference of the rows. ``d(i, j)`` and ``d(j, i)`` are the
    same number, so symmetric units score the same.
    """
    n, k = rows.shape
    out = torch.zeros(n, dtype=torch.float64)
    if n == 0:
        return out
    c = rows - rows.mean(0)
    sq = (c * c).sum(1)
    step = max(1, _BLOCK // n)
    for s in range(0, n, step):
        e = min(n, s + step)
        scale = sq[s:e, None] + sq[None, s:]
        d2 = scale - 2 * (c[s:e] @ c[s:].T)  # (e - s, n - s): rows s:e against rows s:n
        i, j = torch.nonzero(d2 <= _CLOSE * scale, as_tuple=True)
        chunk = max(1, _BLOCK // max(k, 1))
        for p in range(0, i.numel(), chunk):
            ii, jj = i[p : p + chunk], j[p : p + chunk]
            d2[ii, jj] = (rows[s + ii] - rows[s + jj]).pow(2).sum(1)
        d = d2.clamp_min_(0).sqrt_()
        tri = d[:, : e - s].triu(1)  # the diagonal block: its upper triangle mirrored
        d[:, : e - s] = tri + tri.T
        out[s:e] += d.sum(1)
        out[e:] += d[:, e - s :].sum(0)
    return out
