"""Lp norm: the general Lp norm of each unit's weights (L2 by default); needs no data."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from ._weights import unit_rows
from .base import AttributionMetric, Reduction, _with_shared_doc

__all__ = ["LpNormAttributionMetric"]


@_with_shared_doc
class LpNormAttributionMetric(AttributionMetric):
    """``(sum |w|^p)^(1/p)`` over every weight of a unit (``p = inf``: the largest ``|w|``).

    The magnitude criterion of Li et al., "Pruning filters for efficient ConvNets", ICLR 2017
    (who use p = 1, also `WeightNormAttributionMetric`), with the L2 norm as the default, as in
    Torch-Pruning's ``MagnitudeImportance(p=2)`` and NNI's ``L2NormPruner``. A unit's weights are
    those `._weights.unit_rows` gives (output axis 0; 1 for transposed convolutions, Embedding
    and GPT-2's Conv1D; heads; an RNN's gate rows). No data is read; the result is a single row, so
    ``reduction="none"`` returns a ``(1, units)`` matrix. ``find_best_evaluation_module`` is
    ignored.

    Extra argument:
        p: the order of the norm, a number > 0 or ``math.inf`` (default 2).

    Raises:
        ValueError: ``p`` is not > 0 (at construction); the module has no weight (at ``run``).
    """

    uses_data = False

    def __init__(
        self,
        model: nn.Module,
        data_generator: Iterable[Any],
        criterion: Callable[..., torch.Tensor],
        device: torch.device | str,
        reduction: Reduction = "mean",
        progress: bool = True,
        p: float = 2.0,
        **method_kwargs: Any,
    ) -> None:
        super().__init__(model, data_generator, criterion, device, reduction, progress, **method_kwargs)
        if isinstance(p, bool) or not isinstance(p, int | float) or not p > 0:
            raise ValueError(f"p must be a number > 0 (or math.inf), got {p!r}")
        self.p = float(p)

    def _static_scores(self, name: str, module: nn.Module) -> np.ndarray:
        rows = unit_rows(name, module).abs()
        if math.isinf(self.p):
            return rows.max(1).values.numpy()
        return rows.pow(self.p).sum(1).pow(1.0 / self.p).numpy()
