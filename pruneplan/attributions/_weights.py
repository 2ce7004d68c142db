"""The weights of each output unit of a module, as the rows of a matrix (for data-free metrics)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["heads_projection", "unit_rows"]


def heads_projection(module: nn.Module) -> nn.Linear | None:
    """The layer whose input columns an attention module's heads own (their units' weights):
    ``out_proj`` of an ``nn.MultiheadAttention``; ``proj`` of a module with no weight of its own,
    an integer ``num_heads`` and ``qkv`` / ``proj`` Linear children (torchvision's Swin)."""
    if isinstance(module, nn.MultiheadAttention):
        return module.out_proj
    if getattr(module, "weight", None) is None and isinstance(getattr(module, "num_heads", None), int) \
            and isinstance(getattr(module, "qkv", None), nn.Linear) \
            and isinstance(getattr(module, "proj", None), nn.Linear):
        return module.proj
    return None


def unit_rows(name: str, module: nn.Module) -> torch.Tensor:
    """``(units, fan_in)`` float64 CPU matrix: row ``i`` holds every weight of output unit ``i``.

    The output axis of ``weight`` is 0, or 1 for transposed convolutions; an
    attention module's units are the inputs of its output projection (`heads_projection`).

    Raises:
        ValueError: the module has no ``weight`` tensor, or is a grouped transposed convolution.
    """
    weight = getattr(module, "weight", None)
    axis = 0
    proj = heads_projection(module)
    if proj is not None:  # attention heads: columns of the output projection
        weight, axis = proj.weight, 1
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"module {name!r} ({type(module).__name__}) has no weight tensor")
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        if module.groups != 1:
            raise ValueError(f"module {name!r}: grouped transposed convolution not supported")
        axis = 1
    w = weight.detach().to("cpu", torch.float64).transpose(0, axis)
    return w.reshape(w.shape[0], -1)
