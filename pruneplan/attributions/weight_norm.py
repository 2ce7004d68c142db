"""WeightNorm: the L1 norm of each unit's weights; needs no data."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ._weights import heads_projection
from .base import AttributionMetric, _with_shared_doc

__all__ = ["WeightNormAttributionMetric"]


@_with_shared_doc
class WeightNormAttributionMetric(AttributionMetric):
    """The L1 norm of the module's ``weight`` over every axis but the output axis.

    The output axis is 0, or 1 for transposed convolutions, ``Embedding`` (its units are the
    embedding features) and GPT-2's ``Conv1D`` (duck-typed by ``nf``; its weight is (in, out)).
    No data is read; the result is a single row, so ``reduction="none"`` returns a
    ``(1, units)`` matrix.
    ``find_best_evaluation_module`` is ignored.
    """

    uses_data = False

    def _static_scores(self, name: str, module: nn.Module) -> np.ndarray:
        weight = getattr(module, "weight", None)
        proj = heads_projection(module)
        if proj is not None:  # attention heads: columns of the output projection
            weight = proj.weight
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"module {name!r} ({type(module).__name__}) has no weight tensor")
        axis = 0
        if isinstance(module, nn.Embedding) or proj is not None or \
                isinstance(getattr(module, "nf", None), int):
            axis = 1  # an Embedding's units are its features; GPT-2's Conv1D stores (in, out)
        elif isinstance(module, nn.modules.conv._ConvTransposeNd):
            if module.groups != 1:
                raise ValueError(f"module {name!r}: grouped transposed convolution not supported")
            axis = 1
        w = weight.detach().abs().to("cpu", torch.float64).transpose(0, axis)
        return w.reshape(w.shape[0], -1).sum(1).numpy()
