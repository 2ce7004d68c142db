"""A user's own layer and operator, defined outside pruneplan, and the rules that teach discovery
about them (what tests/test_rules.py and the README's "Your own layers and operations" use).

- `FrozenChannelNorm`: a hand-written per-channel normalisation with frozen statistics (like
  timm's FrozenBatchNorm2d). Traced through, its ``weight * rsqrt(var + eps)`` is arithmetic on
  parameters that discovery cannot attribute to channels, so every root reaching it is left out;
  with its rule, it is one node that carries channels and owns four per-channel tensors.
- ``gate``: a torch custom operator ``x * sigmoid(g)``. Without a rule it is an unknown
  operation; with `ElementwiseRule` its two inputs are coupled position by position (like an SE
  gate), so the roots producing ``x`` and ``g`` lose the same channels.
"""

from __future__ import annotations

import torch
from torch import nn

import pruneplan
from pruneplan.graph.rules import ChannelRule, ElementwiseRule


class FrozenChannelNorm(nn.Module):
    """``y[:, c] = (x[:, c] - mean[c]) / sqrt(var[c] + eps) * weight[c] + bias[c]`` (NCHW)."""

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.register_buffer("running_mean", torch.zeros(num_channels))
        self.register_buffer("running_var", torch.ones(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


@torch.library.custom_op("pruneplan_example::gate", mutates_args=())
def gate(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(g)`` element-wise (shapes equal)."""
    return x * torch.sigmoid(g)


@gate.register_fake
def _(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class GatedNet(nn.Module):
    """stem -> FrozenChannelNorm -> ReLU -> gate(., gate_conv(x)) -> head -> pool -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = FrozenChannelNorm(8)
        self.gate_conv = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 6, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.stem(x)))
        h = gate(h, self.gate_conv(x))
        return self.fc(torch.flatten(self.pool(torch.relu(self.head(h))), 1))


def register() -> None:
    """Teach pruneplan both (what a user's package would do once, at import)."""
    pruneplan.register_module_rule(
        FrozenChannelNorm,
        ChannelRule(axis=1, tensors=("weight", "bias", "running_mean", "running_var"),
                    attributes=("num_channels",)),
    )
    pruneplan.register_function_rule(gate, ElementwiseRule())
