"""The weights of each output unit of a module, as the rows of a matrix (for data-free metrics)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["unit_rows"]


def unit_rows(name: str, module: nn.Module) -> torch.Tensor:
    """``(units, fan_in)`` float64 CPU matrix: row ``i`` holds every weight of output unit ``i``.

    The output axis of ``weight`` is 0, or 1 for transposed convolutions.

    Raises:
        ValueError: the module has no ``weight`` tensor, or is a grouped transposed convolution.
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"module {name!r} ({type(module).__name__}) has no weight tensor")
    axis = 0
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        if module.groups != 1:
            raise ValueError(f"module {name!r}: grouped transposed convolution not supported")
        axis = 1
    w = weight.detach().to("cpu", torch.float64).transpose(0, axis)
    return w.reshape(w.shape[0], -1)
