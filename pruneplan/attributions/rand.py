"""Random: uniform random scores, the baseline every criterion should beat."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from ._weights import heads_projection
from .base import ActivationCapture, AttributionMetric, Reduction, _with_shared_doc

__all__ = ["RandomAttributionMetric"]


@_with_shared_doc
class RandomAttributionMetric(AttributionMetric):
    """Scores drawn uniformly from [0, 1), reproducible with ``seed``.

    The number of units comes from ``out_features`` / ``out_channels`` / ``num_features`` /
    ``nf`` / ``embedding_dim`` (``hidden_size`` of a recurrent layer) or the weight; for other
    modules one forward pass on the first batch measures ``z.shape[1]`` (no data is needed
    otherwise).
    The result is a single row, so ``reduction="none"`` returns a ``(1, units)`` matrix.
    ``find_best_evaluation_module`` is ignored.

    Extra argument:
        seed: seed of the numpy generator (``None``: fresh entropy). With a seed, each module
            draws from its own generator seeded by (seed, module name): the same scores on every
            call, whether the module is scored alone or with others.
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
        seed: int | None = None,
        **method_kwargs: Any,
    ) -> None:
        super().__init__(model, data_generator, criterion, device, reduction, progress, **method_kwargs)
        self.seed = seed

    def _static_scores(self, name: str, module: nn.Module) -> np.ndarray:
        return self._module_rng(module, self.seed).random(self._unit_count(module))

    def _unit_count(self, module: nn.Module) -> int:
        if isinstance(module, nn.RNNBase):  # recurrent layer: its hidden units
            return int(module.hidden_size)
        proj = heads_projection(module)
        if proj is not None:  # attention heads: the inputs of the output projection
            return int(proj.weight.shape[1])
        for attr in ("out_features", "out_channels", "num_features", "nf", "embedding_dim"):
            n = getattr(module, attr, None)
            if isinstance(n, int):
                return n
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() > 0:
            return int(weight.shape[0])
        if next(iter(self.data_generator), None) is None:
            raise ValueError(f"module {type(module).__name__}: its unit count is not an attribute "
                             "(out_features, out_channels, hidden_size, ...) and no data batch was "
                             "given to measure it")
        capture = ActivationCapture([module])
        try:
            with torch.no_grad():
                self.model(next(self._batches())[0])
            return int(capture.single_outputs([module])[0].shape[1])
        finally:
            capture.remove()
