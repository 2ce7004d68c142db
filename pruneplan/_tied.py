"""Tied tensors: one parameter or buffer held under several state-dict keys.

A tied ``lm_head`` is the embedding's ``weight``; T5's ``shared``, ``encoder.embed_tokens``,
``decoder.embed_tokens`` and ``lm_head`` hold one tensor. ``save_pretrained`` stores such a
tensor once, under its first key in state-dict order. This module (torch only) is imported by
discovery, the planner and the applier alike, so that they agree on what is tied.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

__all__ = ["tied_keys"]


def tied_keys(model: nn.Module, state: Mapping[str, Any] | None = None) -> dict[str, str]:
    """State-dict keys whose tensor is also held under an earlier key: alias -> that first key
    (state-dict order; the same Python object in ``state_dict(keep_vars=True)``, which may be
    given as ``state`` when the caller has it already)."""
    first: dict[int, str] = {}
    out = {}
    if state is None:
        state = model.state_dict(keep_vars=True)
    for key, t in state.items():
        if id(t) in first:
            out[key] = first[id(t)]
        else:
            first[id(t)] = key
    return out
