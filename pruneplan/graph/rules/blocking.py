"""Layers and operations that tie channels to something else (time steps, matrix
shapes): every root whose channels reach them is left out, with the reason.

(``F.linear`` / ``F.convNd`` block too unless called with a layer's own weights: see
`linear_conv.FunctionalLayerRule`.)"""

from __future__ import annotations

from torch import nn

from pruneplan.graph._labels import Lab
from pruneplan.graph.rules.base import Call, FunctionRule, ModuleRule, builtin

__all__ = ["BlockModuleRule", "BlockRule"]

BLOCKING_TYPES = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.Transformer,
                  nn.Bilinear, nn.Fold, nn.Unfold, nn.CosineSimilarity, nn.PairwiseDistance)
BLOCK_OPS = ("mm", "addmm", "addbmm",
             "bilinear", "conv_transpose1d", "conv_transpose2d",
             "conv_transpose3d", "multi_head_attention_forward",
             "outer", "cross", "kron", "cosine_similarity")


def _reason(call: Call, why: str | None) -> str:
    return f"they reach {call.where}" + (f": {why}" if why else "")


class BlockModuleRule(ModuleRule):
    """A layer whose every labelled input root is blocked ("they reach module ...[: why]")."""

    def __init__(self, why: str | None = None) -> None:
        self.why = why

    def labels(self, call: Call, x: Lab) -> None:
        call.block_all(_reason(call, self.why))

    def mixed(self, call: Call) -> None:
        call.block_all(_reason(call, self.why))


class BlockRule(FunctionRule):
    """An operation whose labelled input roots are blocked, on whichever input they come."""

    def __init__(self, why: str | None = None) -> None:
        self.why = why

    def labels(self, call: Call) -> None:
        call.block_all(_reason(call, self.why))


builtin(BLOCKING_TYPES, rule=BlockModuleRule())
builtin(names=BLOCK_OPS, rule=BlockRule())
#: BLOOM computes its attention scores as baddbmm(alibi, q, k^T): the ALiBi slopes are built from
#: the model's head count, so a pruned model would give the heads that remain other biases
builtin(names=("baddbmm",), rule=BlockRule(
    "a batched product added to a bias in one call; attention scores computed this way with "
    "ALiBi biases (BLOOM) get biases built from the head count, so removing heads would change "
    "those of the heads that remain"))
