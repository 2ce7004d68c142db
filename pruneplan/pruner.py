"""The seed-compatible `Pruner`: prune a live model (and its optimizer) while it trains.

Every operation builds a small `PrunePlan` from the graph rules and executes it with
`pruneplan.apply_plan`, so each step is checked before anything changes (atomic), keeps the
``nn.Parameter`` objects, slices ``.grad`` and the optimizer state, and is recorded in
``Pruner.history``. `pruneplan.compose.compose` turns the history into one plan relative to the
original model (`Pruner.save_history` writes it), so a pruning schedule run during training can
be reviewed and replayed on the original weights.

Choices:

* Empty ``indices`` change nothing: `Pruner.prune_model` returns an empty plan (no groups),
  `Pruner.prune_module` and `Pruner.prune_parameter` return ``None``; nothing is recorded.
* `Pruner.prune_module` and `Pruner.prune_parameter` are recorded too, as plans with one group
  named ``"<module>:out"``, ``"<module>:in"``, ``"<module>:channels"`` (norm layers) or
  ``"<tensor>:axis<k>"``; `Pruner.prune_module` on a dropout layer records a group named
  ``"<module>:dropout"`` that holds only the rate change.
* The probe pass that maps channels to features runs on a zero batch of 2 examples of
  ``input_size`` in eval mode under ``torch.no_grad()``; training flags and BatchNorm statistics
  are as before.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pruneplan.apply.model import apply_plan
from pruneplan.compose import compose
from pruneplan.errors import PlanningError
from pruneplan.graph.rules import (
    CONV_TRANSPOSE_TYPES,
    CONV_TYPES,
    DROPOUT_TYPES,
    NORM_TYPES,
    Stream,
    consumer_slices,
    is_depthwise,
    norm_slices,
    root_slices,
)
from pruneplan.graph.spec import DropoutSpec, SliceSpec
from pruneplan.graph.spec import Group as GroupSpec
from pruneplan.plan import PrunePlan
from pruneplan.planner import build_plan, plan_pruning

__all__ = ["Pruner"]

log = logging.getLogger(__name__)

ModuleRef = nn.Module | str
IndexLike = Sequence[int] | np.ndarray | torch.Tensor


class Pruner:
    """Prune ``model`` in place, fixing ``optimizer``'s state, and record every step as a plan.

    Args:
        model: the model to prune (in place).
        input_size: shape of one example without the batch axis, e.g. ``(c, h, w)``; the probe
            pass feeds a zero batch of two such examples.
        device: where the probe batch is created.
        optimizer: optional optimizer whose per-parameter state is sliced with the parameters.
        example_inputs: a probe batch to use instead of the zero batch (models with several
            or non-float inputs); ``input_size`` may then be ``None``.
    """

    def __init__(
        self,
        model: nn.Module,
        input_size: Sequence[int] | None,
        device: torch.device | str,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        example_inputs: Any = None,
    ) -> None:
        self.model = model
        self.input_size = None if input_size is None else tuple(int(d) for d in input_size)
        self.device = torch.device(device)
        self.optimizer = optimizer
        self.example_inputs = example_inputs
        self.history: list[PrunePlan] = []

    # ---- public API ------------------------------------------------------------------------

    def prune_model(
        self,
        module: ModuleRef,
        indices: IndexLike,
        cascading_modules: Sequence[ModuleRef] | None = None,
    ) -> PrunePlan:
        """Remove output units ``indices`` of ``module`` and adjust the modules that read them.

        Args:
            module: the root (Linear, Conv, ConvTranspose, Embedding), object or dotted name.
            indices: output units to remove.
            cascading_modules: downstream modules to adjust, in order (norm layers, dropout,
                the consumer), as in the original TorchPruner. ``None`` discovers them from the
                executed graph; for roots coupled by a residual sum, name the group (its first root,
                see `pruneplan.prunable_groups`): all of them lose the same units.

        Returns:
            The plan applied (recorded in `history`); an empty plan when ``indices`` is empty.
        """
        root = self._name(module)
        cascades = None
        if cascading_modules is not None:
            cascades = {root: [self._name(m) for m in cascading_modules]}
        plan = plan_pruning(
            self.model,
            {root: indices},
            example_inputs=self._example_inputs(),
            cascades=cascades,
            provenance={"notes": "Pruner.prune_model"},
        )
        if plan.groups:
            self._apply(plan)
        return plan

    def prune_module(
        self,
        module: ModuleRef,
        indices: IndexLike,
        direction: str = "out",
        original_len: int | None = None,
    ) -> PrunePlan | None:
        """Prune one module's units along ``direction`` and update its attributes.

        ``"out"``: output units of Linear, Conv (plain or depthwise) and ConvTranspose.
        ``"in"``: input features/channels of Linear, Conv (plain, grouped, depthwise) and
        ConvTranspose. Norm layers (BatchNorm, InstanceNorm, LayerNorm and GroupNorm over
        channels) lose channels in either direction. Dropout (any dimensionality) needs
        ``original_len``, the unit count before this pruning; its rate becomes
        ``p * (1 - k / original_len)``.

        Returns:
            The plan applied and recorded, or ``None`` when nothing changed (empty ``indices``).
        """
        if direction not in ("out", "in"):
            raise PlanningError(f"direction must be 'out' or 'in', got {direction!r}")
        name = self._name(module)
        m = self._modules()[name]
        if isinstance(m, DROPOUT_TYPES):
            return self._prune_dropout(name, m, indices, original_len)
        spec = self._module_spec(name, m, direction)
        return self._record(spec, indices, f"Pruner.prune_module({direction})")

    def prune_parameter(
        self, module: ModuleRef, parameter_name: str, indices: IndexLike, axis: int = 0
    ) -> PrunePlan | None:
        """Remove positions ``indices`` of one parameter (or buffer) along ``axis``.

        Keeps the ``nn.Parameter`` object, slices its ``.grad`` and optimizer state. Module
        attributes are not changed (use `prune_module` for that). A parameter that is ``None``
        (e.g. ``bias=False``) is skipped, as in the original.

        Returns:
            The plan applied and recorded, or ``None`` when nothing changed.
        """
        name = self._name(module)
        m = self._modules()[name]
        tensor = getattr(m, parameter_name, None)
        if tensor is None:
            if not hasattr(m, parameter_name):
                raise PlanningError(f"module {name!r} has no parameter {parameter_name!r}")
            log.info("%s.%s is None: nothing to prune", name, parameter_name)
            return None
        key = f"{name}.{parameter_name}" if name else parameter_name
        if not isinstance(tensor, torch.Tensor) or key not in self.model.state_dict(keep_vars=True):
            raise PlanningError(f"{key!r} is not a parameter or persistent buffer of the model")
        ndim = tensor.dim()
        if not -ndim <= axis < ndim:
            raise PlanningError(f"axis {axis} is out of range for {key!r} of shape {list(tensor.shape)}")
        axis %= ndim
        spec = GroupSpec(
            name=f"{key}:axis{axis}",
            size=int(tensor.shape[axis]),
            roots=(name,),
            slices=(SliceSpec(key, axis),),
        )
        return self._record(spec, indices, "Pruner.prune_parameter")

    def composed(self) -> PrunePlan:
        """The whole history as one plan relative to the model as it was before any step."""
        if not self.history:
            return build_plan(self.model, [], {"notes": "Pruner: empty history"})
        return compose(self.history)

    def save_history(self, path: str | Path) -> Path:
        """Write `composed` (the history as one plan on the original model) to ``path``."""
        return self.composed().save(path)

    # ---- internals -------------------------------------------------------------------------

    def _modules(self) -> dict[str, nn.Module]:
        return dict(self.model.named_modules())

    def _name(self, module: ModuleRef) -> str:
        """The dotted name of ``module`` (an object of the model or a name)."""
        modules = self._modules()
        if isinstance(module, str):
            if module not in modules:
                raise PlanningError(f"no module named {module!r} in the model")
            return module
        for name, m in modules.items():
            if m is module:
                return name
        raise PlanningError(f"module {type(module).__name__} is not part of the model")

    def _example_inputs(self) -> Any:
        if self.example_inputs is not None:
            return self.example_inputs
        if self.input_size is None:
            return None  # the planner says so if a probe pass is needed
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None)
        return torch.zeros((2, *self.input_size), dtype=dtype or torch.float32, device=self.device)

    def _module_spec(self, name: str, m: nn.Module, direction: str) -> GroupSpec:
        """The group of units of one module along ``direction``, for `prune_module`."""
        if isinstance(m, NORM_TYPES):
            size = _norm_size(m)
            slices, edits = norm_slices(name, m, Stream(), size)
            if not slices:
                raise PlanningError(
                    f"module {name!r} ({type(m).__name__}) holds no tensors to prune (affine and "
                    "running statistics are off)"
                )
            return GroupSpec(name=f"{name}:channels", size=size, roots=(name,), slices=tuple(slices),
                             edits=tuple(edits))
        if direction == "out" and not is_depthwise(m):
            size, slices, edits = root_slices(name, m)
        else:
            if not isinstance(m, (nn.Linear, *CONV_TYPES, *CONV_TRANSPOSE_TYPES)):
                raise PlanningError(
                    f"module {name!r} ({type(m).__name__}) cannot lose {direction}put units: "
                    "supported are Linear, Conv, ConvTranspose, norm layers and dropout"
                )
            if direction == "out" and m.out_channels != m.in_channels:
                raise PlanningError(
                    f"module {name!r}: a depthwise convolution with channel multiplier "
                    f"{m.out_channels // m.in_channels} cannot lose single output channels"
                )
            size = m.in_features if isinstance(m, nn.Linear) else m.in_channels
            slices, edits, _ = consumer_slices(name, m, Stream())
        return GroupSpec(name=f"{name}:{direction}", size=size, roots=(name,), slices=tuple(slices),
                         edits=tuple(edits))

    def _prune_dropout(
        self, name: str, m: nn.Module, indices: IndexLike, original_len: int | None
    ) -> PrunePlan | None:
        if original_len is None:
            raise PlanningError(
                f"dropout {name!r}: pass original_len (the unit count before pruning) so that its "
                "rate can become p * (1 - k / original_len)"
            )
        spec = GroupSpec(name=f"{name}:dropout", size=int(original_len), roots=(name,), slices=(),
                         dropouts=(DropoutSpec(name, float(m.p)),))
        return self._record(spec, indices, "Pruner.prune_module(dropout)")

    def _record(self, spec: GroupSpec, indices: IndexLike, notes: str) -> PrunePlan | None:
        plan = build_plan(self.model, [(spec, indices)], {"notes": notes})
        if not plan.groups:
            return None
        self._apply(plan)
        return plan

    def _apply(self, plan: PrunePlan) -> None:
        apply_plan(self.model, plan, self.optimizer)
        self.history.append(plan)
        log.info("pruner step %d: %s", len(self.history), ", ".join(
            f"{g.name} -{len(g.removed)}/{g.size}" for g in plan.groups))


def _norm_size(m: nn.Module) -> int:
    if isinstance(m, nn.LayerNorm):
        return int(m.normalized_shape[0])
    if isinstance(m, nn.GroupNorm):
        return int(m.num_channels)
    return int(m.num_features)
