"""Model statistics: parameters, buffers and multiply-accumulates (MACs), total and per module.

MACs are counted by torch's own `torch.utils.flop_counter.FlopCounterMode` during one forward
pass on the example inputs, and reported as FLOPs / 2: the counter counts the matrix products
and convolutions (``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``convolution``, scaled dot-product
attention), each multiply-accumulate as 2 FLOPs, and ignores element-wise work (bias additions,
normalisation, activations, pooling, residual sums). So a ``Linear(i, o)`` on a batch of ``n``
rows counts ``n * i * o`` MACs and a ``Conv2d`` counts ``n * out_h * out_w * out_channels *
in_channels / groups * kernel_h * kernel_w``.

The pass runs with autograd enabled and scaled dot-product attention on its math backend, so
that fused inference kernels (the fast path of ``nn.TransformerEncoderLayer`` and
``nn.MultiheadAttention`` under ``no_grad``, the CPU flash-attention kernel), which the counter
does not see, are replaced by the plain products it counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pruneplan.graph.probe import check_example_pass

__all__ = ["ModelStats", "ModuleStats", "count"]


@dataclass(frozen=True)
class ModuleStats:
    """Parameters, buffer values and MACs of one module, its submodules included."""

    params: int
    buffers: int
    macs: int


@dataclass(frozen=True)
class ModelStats:
    """What `count` returns.

    Attributes:
        params: parameter scalars (shared parameters counted once).
        buffers: buffer values (BatchNorm running statistics, ``num_batches_tracked``, ...).
        macs: multiply-accumulates of one forward pass on the example inputs (the whole batch).
        modules: dotted module name -> its `ModuleStats` (submodules included); ``""`` is the model.
    """

    params: int
    buffers: int
    macs: int
    modules: Mapping[str, ModuleStats] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.params:,} parameters, {self.buffers:,} buffer values, {self.macs:,} MACs"


def count(model: nn.Module, example_inputs: Any, *, macs: bool = True) -> ModelStats:
    """Count the parameters, buffers and MACs of ``model``, total and per module.

    Args:
        model: the model; it is not modified (one forward pass in eval mode; the training
            flags are restored; no gradient is computed).
        example_inputs: a tensor or a tuple of positional arguments for ``model``; MACs are
            those of this whole batch (use a batch of one for per-example MACs).
        macs: ``False`` skips the forward pass (``macs`` is then 0 everywhere).

    Returns:
        a `ModelStats`; MACs are FLOPs / 2 as counted by ``FlopCounterMode`` (see the module
        docstring for what is and is not counted).

    Raises:
        ExamplePassError: ``model``'s forward pass fails on ``example_inputs`` (naming the
            module where it failed and the inputs' shapes).
    """
    by_module: dict[str, int] = {}
    total = 0
    if macs:
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        flags = [(m, m.training) for m in model.modules()]
        counter = FlopCounterMode(display=False, depth=None)
        failed = None
        try:
            model.eval()
            with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), counter:
                model(*args)
        except Exception as exc:
            failed = exc
        finally:
            if failed is not None:  # the model's own failure, or the counter's?
                with torch.no_grad():
                    check_example_pass(model, args)
            for m, t in flags:
                m.training = t
        if failed is not None:
            raise failed
        total = int(counter.get_total_flops()) // 2
        prefix = type(model).__name__
        for key, ops in counter.get_flop_counts().items():
            if key == "Global":
                continue
            name = "" if key == prefix else key.removeprefix(prefix + ".")
            by_module[name] = int(sum(ops.values())) // 2
    modules = {}
    for name, m in model.named_modules():
        modules[name] = ModuleStats(
            params=sum(p.numel() for p in m.parameters()),
            buffers=sum(b.numel() for b in m.buffers()),
            macs=by_module.get(name, 0),
        )
    whole = modules[""]
    return ModelStats(params=whole.params, buffers=whole.buffers, macs=total, modules=modules)
