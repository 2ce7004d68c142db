"""WeightNorm: the L1 norm of each unit's weights; needs no data."""

from __future__ import annotations

import numpy as np
from torch import nn

from ._weights import unit_rows
from .base import AttributionMetric, _with_shared_doc

__all__ = ["WeightNormAttributionMetric"]


@_with_shared_doc
class WeightNormAttributionMetric(AttributionMetric):
    """The L1 norm of the module's ``weight`` over every axis but the output axis.

    The units' weights are those of `pruneplan.attributions._weights.unit_rows`: the output axis
    is 0, or 1 for transposed convolutions, ``Embedding`` (its units are the embedding features)
    and GPT-2's ``Conv1D`` (duck-typed by ``nf``; its weight is (in, out)); attention heads own
    the input columns of the output projection, a recurrent layer's hidden units their gate rows
    of every ``weight_ih`` / ``weight_hh``.
    No data is read; the result is a single row, so ``reduction="none"`` returns a
    ``(1, units)`` matrix.
    ``find_best_evaluation_module`` is ignored.
    """

    uses_data = False

    def _static_scores(self, name: str, module: nn.Module) -> np.ndarray:
        return unit_rows(name, module).abs().sum(1).numpy()
