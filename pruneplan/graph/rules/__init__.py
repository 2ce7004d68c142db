"""Rules: how channels cross each layer and operation, one small rule per family.

The discovery engine (`pruneplan.graph._analysis`) pushes channel labels through the traced
graph and asks, for every call, the rule registered for the module type or function name
(`base.Rule`, `base.Call`). The families:

========================  =====================================================================
``linear_conv``           Linear, Conv, ConvTranspose, Embedding: roots and consumers
``norms``                 BatchNorm, InstanceNorm, GroupNorm, LayerNorm (modules and functions)
``activations``           element-wise layers and operations, casts, PReLU
``dropout``               dropout layers (their rate follows the unit count) and functions
``pooling``               pooling, padding, resampling
``reshape``               view/flatten/permute/expand, indexing, flip/roll, shapes and sizes
``cat_split``             cat, stack, chunk/split, channel shuffle
``reduce``                reductions and softmax
``attention``             scaled_dot_product_attention, matmul/bmm: heads and query groups
``einsum``                einsum: units on an index the output keeps follow
``grouped``               grouped convs: local positions in every conv group, or whole groups
``recurrent``             LSTM / GRU / RNN: input width and hidden units
``pixel``                 pixel shuffle / unshuffle (one unit is ``r * r`` channels before it)
``hf``                    Hugging Face ``Conv1D`` (by class name: transformers is optional)
``mha``                   nn.MultiheadAttention: heads, and the widths it reads
``torchvision_ops``       torchvision's Swin window attention functions: heads and widths
``blocking``              mm, outer & co.: their roots are left out
========================  =====================================================================

Users add their own with `register_module_rule` / `register_function_rule` (re-exported as
``pruneplan.register_module_rule`` / ``pruneplan.register_function_rule``); `ChannelRule` and
`ElementwiseRule` cover the two common cases (a per-channel layer with parameters; a gate).
"""

from pruneplan.graph._streams import Stream

# the families register their rules on import (order is irrelevant: one rule per key)
from pruneplan.graph.rules import (
    activations,
    attention,
    blocking,
    cat_split,
    dropout,
    einsum,
    grouped,
    hf,
    linear_conv,
    mha,
    norms,
    pixel,
    pooling,
    recurrent,
    reduce,
    reshape,
    torchvision_ops,
)
from pruneplan.graph.rules.activations import ElementwiseRule
from pruneplan.graph.rules.base import (
    Call,
    FunctionRule,
    ModuleRule,
    Rule,
    function_rule,
    iter_refs,
    module_rule,
    register_function_rule,
    register_module_rule,
    tensorish,
)
from pruneplan.graph.rules.blocking import BlockModuleRule, BlockRule
from pruneplan.graph.rules.layers import (
    CONV_TRANSPOSE_TYPES,
    CONV_TYPES,
    DROPOUT_TYPES,
    NORM_TYPES,
    consumer_slices,
    is_depthwise,
    norm_slices,
    root_slices,
)
from pruneplan.graph.rules.norms import ChannelRule

__all__ = [
    "CONV_TRANSPOSE_TYPES",
    "CONV_TYPES",
    "DROPOUT_TYPES",
    "NORM_TYPES",
    "BlockModuleRule",
    "BlockRule",
    "Call",
    "ChannelRule",
    "ElementwiseRule",
    "FunctionRule",
    "ModuleRule",
    "Rule",
    "Stream",
    "activations",
    "attention",
    "blocking",
    "cat_split",
    "consumer_slices",
    "dropout",
    "einsum",
    "function_rule",
    "grouped",
    "hf",
    "is_depthwise",
    "iter_refs",
    "linear_conv",
    "mha",
    "module_rule",
    "norm_slices",
    "norms",
    "pixel",
    "pooling",
    "recurrent",
    "reduce",
    "register_function_rule",
    "register_module_rule",
    "reshape",
    "root_slices",
    "tensorish",
    "torchvision_ops",
]
