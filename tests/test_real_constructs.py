"""Constructs of real model code that gave wrong results (issue 11, the timm models whose pruned
model broke or whose plan contradicted itself): each a minimal module reproducing the construct.

Where pruning through the construct is correct, the pruned model equals the original with the
removed units zeroed at the input of their consumers (an independent reference: hooks on the
original model); where it is not possible, the roots are left out with the exact reason.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pruneplan as pp
from pruneplan.graph.spec import LeftOut

OUTPUT = "its units reach the model output (include_output=True allows pruning it)"


# ---- unbind of a labelled axis (timm csatv2's scalar attention) ------------------------------


class ScalarAttention(nn.Module):
    """``q, k, v = self.qkv(h).unbind(-1)``: three scalar channels taken apart by position."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.qkv = nn.Linear(6, 3)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        q, k, v = self.qkv(h).unbind(-1)
        return self.head(h * (q * k * v).unsqueeze(-1))


@pytest.mark.parametrize("tracer", ["fx", "record"])
def test_unbind_of_their_axis_leaves_the_root_out(tracer: str) -> None:
    # removing one of qkv's 3 outputs would leave unbind 2 parts for 3 names: qkv is left out;
    # embed's channels are consumed by qkv and head and only scaled per row: still a group
    groups = pp.prunable_groups(ScalarAttention().eval(), torch.randn(2, 5, 4), tracer=tracer)
    assert [(g.name, g.size) for g in groups] == [("embed", 6)]
    assert groups.left_out == [
        LeftOut("qkv", "operation 'unbind' in module '<top level>' takes their axis apart into one "
                "tensor per position, so the number of parts would change with the units"),
        LeftOut("head", OUTPUT),
    ]
