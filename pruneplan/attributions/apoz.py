"""APoZ: the number of positive activations of each unit."""

from __future__ import annotations

import torch

from .base import ForwardAttributionMetric, _with_shared_doc, unit_sum

__all__ = ["APoZAttributionMetric"]


@_with_shared_doc
class APoZAttributionMetric(ForwardAttributionMetric):
    """Per example, the number of positive entries of each unit of ``z`` (summed over space).

    This is 1 - APoZ (Average Percentage of Zeros) up to the number of spatial positions: a
    high score marks an often active, important unit. One forward pass per batch, no backward.

    Reference: Hu et al., "Network trimming: a data-driven neuron pruning approach towards
    efficient deep architectures", 2016.
    """

    def _unit_scores(self, z: torch.Tensor) -> torch.Tensor:
        return unit_sum((z > 0).to(torch.float32))
