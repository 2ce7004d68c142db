"""Apply a plan to a state dict: pure tensor slicing, no model code."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pruneplan.apply._slicing import check_fingerprint, keep_indices, slice_tensor
from pruneplan.plan import PrunePlan

__all__ = ["apply_to_state_dict"]


def apply_to_state_dict(
    plan: PrunePlan, state_dict: Mapping[str, torch.Tensor], *, check_digest: bool = True
) -> dict[str, torch.Tensor]:
    """Return a new state dict with the plan's slices applied; the input is not modified.

    Untouched tensors are passed through as the same objects.

    Raises:
        PlanMismatchError: a tensor is missing or has another shape than the plan expects.
    """
    check_fingerprint(plan, {k: v.shape for k, v in state_dict.items()}, "state dict", check_digest)
    keeps = keep_indices(plan)
    return {
        k: slice_tensor(v, keeps[k]) if k in keeps else v for k, v in state_dict.items()
    }
