"""Sensitivity: the absolute gradient of the loss with respect to each unit."""

from __future__ import annotations

import torch

from .base import GradientAttributionMetric, _with_shared_doc, unit_sum

__all__ = ["SensitivityAttributionMetric"]


@_with_shared_doc
class SensitivityAttributionMetric(GradientAttributionMetric):
    """Per example, ``|dL/dz|`` of each unit (summed over spatial positions).

    ``L`` is the example's own loss. One forward and one (activation-only) backward per batch.

    Reference: Mittal et al., "Studying the plasticity in deep convolutional neural networks
    using random pruning", 2018.
    """

    def _unit_scores(self, z: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return unit_sum(grad.abs())
