"""Dropout and drop-path: channels pass unchanged; a dropout layer's rate follows the unit count.

``torchvision.ops.stochastic_depth`` (and timm's ``drop_path``, traced through) multiply whole
samples or rows by one random factor: per channel, followed like any element-wise operation.
"""

from __future__ import annotations

from pruneplan.graph._labels import Lab
from pruneplan.graph.rules.activations import ElementwiseRule
from pruneplan.graph.rules.base import Call, ModuleRule, builtin
from pruneplan.graph.rules.layers import DROPOUT_TYPES

__all__ = ["DropoutRule"]


class DropoutRule(ModuleRule):
    """``nn.Dropout*``: follow; record the layer's rate for the plan's dropout adjustment."""

    def labels(self, call: Call, x: Lab) -> Lab:
        call.dropout(x, float(call.module.p))
        return x


builtin(DROPOUT_TYPES, rule=DropoutRule())
builtin(names=("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
               "feature_alpha_dropout", "stochastic_depth", "drop_path"), rule=ElementwiseRule())
