"""Appliers: execute a plan on a live model and optimizer, a state dict, or safetensors files.

The file appliers (`apply_to_safetensors`, `apply_to_sharded_safetensors`,
`apply_to_checkpoint`, `check_checkpoint`, `check_weights`, `check_sharded_weights`, `is_hf_checkpoint`, and
`weights_digest` of files) move bytes and never import torch; the names are imported on first
use, so `pruneplan apply PLAN FILE` starts without torch's import (seconds on a small machine).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pruneplan.apply.checkpoint import apply_to_checkpoint, check_checkpoint, is_hf_checkpoint
    from pruneplan.apply.content import weights_digest
    from pruneplan.apply.model import apply_plan
    from pruneplan.apply.safetensors_io import apply_to_safetensors, check_weights, load_pruned
    from pruneplan.apply.sharded import apply_to_sharded_safetensors, check_sharded_weights
    from pruneplan.apply.state_dict import apply_to_state_dict

# public name -> submodule that defines it
_WHERE: dict[str, str] = {
    "apply_plan": "model",
    "apply_to_checkpoint": "checkpoint",
    "apply_to_safetensors": "safetensors_io",
    "apply_to_sharded_safetensors": "sharded",
    "apply_to_state_dict": "state_dict",
    "check_checkpoint": "checkpoint",
    "check_sharded_weights": "sharded",
    "check_weights": "safetensors_io",
    "is_hf_checkpoint": "checkpoint",
    "load_pruned": "safetensors_io",
    "weights_digest": "content",
}

__all__ = [
    "apply_plan",
    "apply_to_checkpoint",
    "apply_to_safetensors",
    "apply_to_sharded_safetensors",
    "apply_to_state_dict",
    "check_checkpoint",
    "check_sharded_weights",
    "check_weights",
    "is_hf_checkpoint",
    "load_pruned",
    "weights_digest",
]


_SUBMODULES = frozenset({"checkpoint", "content", "model", "safetensors_io", "sharded", "state_dict"})


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:  # ``pruneplan.apply.sharded`` as an attribute, imported on first use
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
