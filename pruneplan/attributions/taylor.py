"""Taylor: the first-order estimate of the loss change when a unit is zeroed."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .base import GradientAttributionMetric, Reduction, _with_shared_doc, unit_sum

__all__ = ["TaylorAttributionMetric"]


@_with_shared_doc
class TaylorAttributionMetric(GradientAttributionMetric):
    """Per example, ``-(dL/dz * z)`` of each unit, summed over space, absolute unless ``signed``.

    ``-(dL/dz * z)`` is the first-order Taylor estimate of ``L(z with the unit zeroed) - L(z)``:
    positive when removing the unit would raise the loss.

    Reference: Molchanov et al., "Pruning convolutional neural networks for resource efficient
    inference", ICLR 2017.

    Extra argument:
        signed: keep the sign instead of taking the absolute value (default ``False``).
    """

    def __init__(
        self,
        model: nn.Module,
        data_generator: Iterable[Any],
        criterion: Callable[..., torch.Tensor],
        device: torch.device | str,
        reduction: Reduction = "mean",
        progress: bool = True,
        signed: bool = False,
        **method_kwargs: Any,
    ) -> None:
        # ``signed_attribution`` is the spelling of the original TorchPruner
        signed = bool(method_kwargs.pop("signed_attribution", signed))
        super().__init__(model, data_generator, criterion, device, reduction, progress, **method_kwargs)
        self.signed = signed

    def _unit_scores(self, z: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        taylor = unit_sum(-(grad * z))
        return taylor if self.signed else taylor.abs()
