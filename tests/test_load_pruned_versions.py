"""`load_pruned` keeps the module versions a state dict carries (found on torchvision's MNASNet,
whose loader refuses a state dict without its version)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import pruneplan as pp


class Versioned(nn.Module):
    """Refuses to load without the version its state dict records, like MNASNet."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs) -> None:
        if local_metadata.get("version") != 2:
            raise ValueError(f"version should be 2, got {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


def test_load_pruned_gives_the_model_its_own_versions(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = Versioned(), torch.randn(3, 4)
    plan = pp.plan_pruning(model, {"a": [1, 4]}, example_inputs=x)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    pp.apply_to_safetensors(plan, tmp_path / "w.safetensors", tmp_path / "p.safetensors")
    pruned = pp.apply_plan(model, plan)
    fresh = pp.load_pruned(Versioned(), plan, tmp_path / "p.safetensors")
    assert fresh.a.out_features == 4
    assert torch.equal(fresh(x), pruned(x))
