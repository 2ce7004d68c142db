"""BatchNorm scale: the |gamma| of the BatchNorm that normalises each unit (network slimming)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from .base import PASS_THROUGH_TYPES, AttributionMetric, Reduction, _CallRecorder, _with_shared_doc

__all__ = ["BNScaleAttributionMetric"]

_BN = nn.modules.batchnorm._BatchNorm


@_with_shared_doc
class BNScaleAttributionMetric(AttributionMetric):
    """``|gamma_i|``, the absolute scale of the BatchNorm channel that unit ``i`` feeds.

    Liu et al., "Learning efficient convolutional networks through network slimming", ICCV
    2017: trained with an L1 penalty on the BatchNorm scales, the channels with small
    ``|gamma|`` contribute little and are pruned first (without the penalty the criterion still
    applies, less sharply). The BatchNorm is the module itself when a BatchNorm is scored;
    otherwise it is found by one forward pass (no gradient, eval mode) on ``example_inputs`` (or
    the first batch of ``data_generator``): the BatchNorm that consumes the module's output,
    directly or through element-wise activations. No other data is read; the result is a single
    row (``reduction="none"`` gives ``(1, units)``); ``find_best_evaluation_module`` is ignored.

    Extra argument:
        example_inputs: a tensor or a tuple of call arguments for the forward pass that finds
            the BatchNorm of each module (default: the first batch of ``data_generator``).

    Raises:
        ValueError (at ``run``): no BatchNorm with a learnable scale follows the module, the
            module runs more than once, or there is neither ``example_inputs`` nor data.
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
        example_inputs: Any = None,
        **method_kwargs: Any,
    ) -> None:
        super().__init__(model, data_generator, criterion, device, reduction, progress, **method_kwargs)
        self.example_inputs = example_inputs
        self._records: list[tuple[nn.Module, tuple[Any, ...], Any]] | None = None

    def _run_static(
        self, resolved: list[tuple[str, nn.Module]], kwargs: dict[str, Any]
    ) -> dict[str, np.ndarray]:
        try:
            return super()._run_static(resolved, kwargs)
        finally:
            self._records = None  # one trace per run: the model may change between runs

    def _static_scores(self, name: str, module: nn.Module) -> np.ndarray:
        bn = module if isinstance(module, _BN) else self._following_bn(name, module)
        if not isinstance(bn.weight, torch.Tensor):
            raise ValueError(f"module {name!r}: its BatchNorm has no learnable scale (affine=False)")
        return bn.weight.detach().abs().to("cpu", torch.float64).numpy()

    def _following_bn(self, name: str, module: nn.Module) -> nn.Module:
        records = self._trace()
        idx = [i for i, (m, _, _) in enumerate(records) if m is module]
        if len(idx) != 1:
            raise ValueError(f"module {name!r} ran {len(idx)} times in the forward pass; BatchNorm "
                             "scale needs a module that runs exactly once")
        i = idx[0]
        while True:
            out = records[i][2]
            consumers = [j for j in range(i + 1, len(records)) if any(a is out for a in records[j][1])]
            if len(consumers) != 1:
                break
            i = consumers[0]
            if isinstance(records[i][0], _BN):
                return records[i][0]
            if not isinstance(records[i][0], PASS_THROUGH_TYPES):
                break
        raise ValueError(f"module {name!r} ({type(module).__name__}): no BatchNorm consumes its output, "
                         "so it has no BatchNorm scale")

    def _trace(self) -> list[tuple[nn.Module, tuple[Any, ...], Any]]:
        """Every leaf module call of one forward pass, in order (made once per metric)."""
        if self._records is None:
            if self.example_inputs is not None:
                x = self.example_inputs
            else:
                first = next(iter(self.data_generator), None)
                if first is None:
                    raise ValueError("BatchNorm scale needs example_inputs or one data batch to find "
                                     "the BatchNorm after each module")
                x = first[0]
            args = x if isinstance(x, tuple) else (x,)
            recorder = _CallRecorder(self.model)
            try:
                with torch.no_grad():
                    self.model(*args)
            finally:
                recorder.remove()
            self._records = recorder.records
        return self._records
