"""Apply a plan to a state dict: pure tensor slicing, no model code."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pruneplan.apply._slicing import (
    check_fingerprint,
    keep_indices,
    saved_names_in,
    slice_tensor,
    to_file_names,
    to_plan_names,
)
from pruneplan.plan import PrunePlan

__all__ = ["apply_to_state_dict"]


def apply_to_state_dict(
    plan: PrunePlan, state_dict: Mapping[str, torch.Tensor], *, check_digest: bool = True
) -> dict[str, torch.Tensor]:
    """Return a new state dict with the plan's slices applied; the input is not modified.

    Untouched tensors are passed through as the same objects. A state dict read from a
    checkpoint that names tensors as ``save_pretrained`` stores them (``plan.config.saved_names``)
    is checked under the state-dict keys and keeps its own names.

    Raises:
        PlanMismatchError: a tensor is missing or has another shape than the plan expects, or
            the state dict mixes the two namings (a ``module.`` prefix, as in the state dict of
            ``nn.DataParallel``, is named as such).
        AlreadyPrunedError: every tensor the plan touches already has its pruned shape.
    """
    saved = saved_names_in(plan, state_dict, "state dict")
    shapes = to_plan_names({k: v.shape for k, v in state_dict.items()}, saved)
    check_fingerprint(plan, shapes, "state dict", check_digest, pruned_check=True)
    keeps = to_file_names(keep_indices(plan), saved)
    return {
        k: slice_tensor(v, keeps[k]) if k in keeps else v for k, v in state_dict.items()
    }
