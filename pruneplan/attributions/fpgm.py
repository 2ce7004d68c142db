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
        rows = unit_rows(name, module)
        # exact pairwise distances (cdist's matrix-product path loses precision for close rows)
        diff = rows[:, None, :] - rows[None, :, :] if rows.shape[0] * rows.numel() <= 2**26 else None
        if diff is not None:
            return diff.pow(2).sum(-1).sqrt().sum(1).numpy()
        return torch.stack([(rows - r).pow(2).sum(1).sqrt().sum() for r in rows]).numpy()
