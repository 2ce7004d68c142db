"""BatchNorm scale: the |gamma| of the BatchNorm that normalises each unit (network slimming)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .base import PASS_THROUGH_TYPES, AttributionMetric, Reduction, _CallRecorder, _with_shared_doc

__all__ = ["BNScaleAttributionMetric"]

_BN = nn.modules.batchnorm._BatchNorm
# leaf module calls (module, inputs, output) and F.batch_norm calls (input, weight), in order
_Trace = tuple[list[tuple[nn.Module, tuple[Any, ...], Any]], list[tuple[Any, Any]]]


@_with_shared_doc
class BNScaleAttributionMetric(AttributionMetric):
    """``|gamma_i|``, the absolute scale of the BatchNorm channel that unit ``i`` feeds.

    Liu et al., "Learning efficient convolutional networks through network slimming", ICCV
    2017: trained with an L1 penalty on the BatchNorm scales, the channels with small
    ``|gamma|`` contribute little and are pruned first (without the penalty the criterion still
    applies, less sharply). The BatchNorm is the module itself when a BatchNorm is scored;
    otherwise it is found by one forward pass (no gradient, eval mode) on ``example_inputs`` (or
    the first batch of ``data_generator``): the batch norm that consumes the module's output,
    directly or through element-wise activations, found as the ``F.batch_norm`` call it feeds
    (a BatchNorm, a subclass such as timm's ``BatchNormAct2d``, or a module calling
    ``F.batch_norm`` with its own weight). No other data is read; the result is a single
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
        self._records: _Trace | None = None

    def _run_static(
        self, resolved: list[tuple[str, nn.Module]], kwargs: dict[str, Any]
    ) -> dict[str, np.ndarray]:
        try:
            return super()._run_static(resolved, kwargs)
        finally:
            self._records = None  # one trace per run: the model may change between runs

    def _static_scores(self, name: str, module: nn.Module) -> np.ndarray:
        weight = module.weight if isinstance(module, _BN) else self._following_scale(name, module)
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"module {name!r}: its BatchNorm has no learnable scale (affine=False)")
        return weight.detach().abs().to("cpu", torch.float64).reshape(-1).numpy()

    def _following_scale(self, name: str, module: nn.Module) -> torch.Tensor | None:
        """The scale of the batch norm that normalises the module's output: the first call of
        ``F.batch_norm`` (a BatchNorm module, a subclass such as timm's ``BatchNormAct2d``, or
        any module calling it with its weight) whose input is that output, directly or through
        element-wise activations."""
        records, norms = self._trace()
        idx = [i for i, (m, _, _) in enumerate(records) if m is module]
        if len(idx) != 1:
            raise ValueError(f"module {name!r} ran {len(idx)} times in the forward pass; BatchNorm "
                             "scale needs a module that runs exactly once")
        i = idx[0]
        while True:
            out = records[i][2]
            found = [w for x, w in norms if x is out]
            if found:
                return found[0]
            consumers = [j for j in range(i + 1, len(records)) if any(a is out for a in records[j][1])]
            if len(consumers) != 1:
                break
            i = consumers[0]
            if isinstance(records[i][0], _BN):
                return records[i][0].weight
            if not isinstance(records[i][0], PASS_THROUGH_TYPES):
                break
        raise ValueError(f"module {name!r} ({type(module).__name__}): no BatchNorm consumes its output, "
                         "so it has no BatchNorm scale")

    def _trace(self) -> _Trace:
        """Every leaf module call of one forward pass, in order, and the ``(input, weight)`` of
        every ``F.batch_norm`` call (made once per run)."""
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
            norms: list[tuple[Any, Any]] = []
            original = F.batch_norm

            def batch_norm(input: Any, *a: Any, **kw: Any) -> Any:
                weight = kw["weight"] if "weight" in kw else (a[2] if len(a) > 2 else None)
                norms.append((input, weight))
                return original(input, *a, **kw)

            recorder = _CallRecorder(self.model)
            F.batch_norm = batch_norm
            try:
                with torch.no_grad():
                    self.model(*args)
            finally:
                F.batch_norm = original
                recorder.remove()
            self._records = (recorder.records, norms)
        return self._records
