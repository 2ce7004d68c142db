"""Appliers: execute a plan on a live model and optimizer, a state dict, or safetensors files."""

from pruneplan.apply.checkpoint import apply_to_checkpoint, is_hf_checkpoint
from pruneplan.apply.content import weights_digest
from pruneplan.apply.model import apply_plan
from pruneplan.apply.safetensors_io import apply_to_safetensors, check_weights, load_pruned
from pruneplan.apply.sharded import apply_to_sharded_safetensors, check_sharded_weights
from pruneplan.apply.state_dict import apply_to_state_dict

__all__ = [
    "apply_plan",
    "apply_to_checkpoint",
    "apply_to_safetensors",
    "apply_to_sharded_safetensors",
    "apply_to_state_dict",
    "check_sharded_weights",
    "check_weights",
    "is_hf_checkpoint",
    "load_pruned",
    "weights_digest",
]
