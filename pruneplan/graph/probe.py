"""A side-effect-free probe pass that records the input and output shapes of chosen modules."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["as_inputs", "frozen_mode", "probe_shapes"]


def as_inputs(example_inputs: Any) -> tuple:
    """Normalise ``example_inputs`` (a tensor or a tuple/list of them) into call arguments."""
    if isinstance(example_inputs, tuple | list):
        return tuple(example_inputs)
    return (example_inputs,)


class frozen_mode:
    """Context: eval mode and no grad, restoring every module's ``training`` flag on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.flags: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> nn.Module:
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        self._grad = torch.no_grad()
        self._grad.__enter__()
        return self.model

    def __exit__(self, *exc: object) -> None:
        self._grad.__exit__(*exc)
        for m, flag in self.flags:
            m.training = flag


def probe_shapes(
    model: nn.Module, example_inputs: Any, names: Iterable[str]
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Run one forward pass in eval mode under no_grad; return name -> (input shape, output shape).

    BatchNorm statistics, training flags and hooks are as before when this returns.
    """
    modules = dict(model.named_modules())
    seen: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    handles = []

    def hook(name: str):
        def record(_m: nn.Module, args: tuple, out: Any) -> None:
            if name in seen or not args or not isinstance(args[0], torch.Tensor):
                return
            shape_out = tuple(out.shape) if isinstance(out, torch.Tensor) else ()
            seen[name] = (tuple(args[0].shape), shape_out)

        return record

    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(hook(name)))
        with frozen_mode(model):
            model(*as_inputs(example_inputs))
    finally:
        for h in handles:
            h.remove()
    return seen
