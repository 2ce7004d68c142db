"""LAMP: layer-adaptive magnitude scores, comparable across layers."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ._weights import unit_rows
from .base import AttributionMetric, _with_shared_doc

__all__ = ["LAMPAttributionMetric"]


@_with_shared_doc
class LAMPAttributionMetric(AttributionMetric):
    """Score of unit ``i``: ``v_i / sum_{j : v_j >= v_i} v_j``, with ``v_i = ||w_i||_2^2``.

    Lee et al., "Layer-adaptive sparsity for the magnitude-based pruning", ICLR 2021, applied to
    units (the channel form Torch-Pruning's ``LAMPImportance`` uses): a unit's squared weight
    norm over the squared norms of every unit at least as large in the same layer (itself
    included). The largest unit of every layer scores 1, so the scores compare across layers
    without further scaling: rank them globally with ``normalize=None`` (``"none"``). No data is
    read; ``reduction="none"`` returns a ``(1, units)`` matrix; ``find_best_evaluation_module`` is
    ignored.

    Raises:
        ValueError: the module has no weight tensor (at ``run``).
    """

    uses_data = False

    def _static_scores(self, name: str, module: nn.Module) -> np.ndarray:
        v = unit_rows(name, module).pow(2).sum(1)
        # denominators: for every unit, the sum of v over units with v_j >= v_i (ties included)
        order = torch.argsort(v, descending=True, stable=True)
        ranked = v[order]
        cum = torch.cumsum(ranked, 0)
        # the last position of each run of equal values holds the sum including all its ties
        last = torch.searchsorted(-ranked, -ranked, right=True) - 1
        denom = torch.empty_like(v)
        denom[order] = cum[last]
        out = torch.where(denom > 0, v / torch.where(denom > 0, denom, 1), torch.zeros_like(v))
        return out.numpy()
