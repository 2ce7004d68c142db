"""Per-layer slices: which tensors and attributes of a module follow a channel it produces or reads.

Shared by discovery's rules and by explicit cascades (`pruneplan.graph.explicit`, the `Pruner`):
roots start a `Stream`, pass-through layers (BatchNorm, LayerNorm, depthwise convs) carry it on,
and consumers (Linear, Conv) read it on their input axis.
"""

from __future__ import annotations

from torch import nn

from pruneplan.errors import PlanningError
from pruneplan.graph._streams import Stream
from pruneplan.graph.spec import EditSpec, SliceSpec

__all__ = [
    "CONV_TRANSPOSE_TYPES",
    "CONV_TYPES",
    "DROPOUT_TYPES",
    "NORM_TYPES",
    "Stream",
    "consumer_slices",
    "is_depthwise",
    "norm_slices",
    "root_slices",
]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.RMSNorm,
    nn.GroupNorm,
)
DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def is_depthwise(m: nn.Module) -> bool:
    """A conv whose every group reads exactly one input channel."""
    return isinstance(m, CONV_TYPES) and m.groups > 1 and m.groups == m.in_channels


def root_slices(name: str, m: nn.Module) -> tuple[int, list[SliceSpec], list[EditSpec]]:
    """Units of a root module: (size, tensors on the output axis, attribute edits)."""
    p = f"{name}." if name else ""
    if isinstance(m, nn.Linear):
        size, attr, axis = m.out_features, "out_features", 0
    elif isinstance(m, CONV_TYPES):
        if m.groups != 1:
            raise PlanningError(
                f"module {name!r}: a grouped convolution (groups={m.groups}) cannot be a root on "
                "its own; its output channels are tied to its input channels"
            )
        size, attr, axis = m.out_channels, "out_channels", 0
    elif isinstance(m, CONV_TRANSPOSE_TYPES):
        if m.groups != 1:
            raise PlanningError(f"module {name!r}: grouped ConvTranspose roots are not supported")
        size, attr, axis = m.out_channels, "out_channels", 1
    elif isinstance(m, nn.Embedding):
        size, attr, axis = m.embedding_dim, "embedding_dim", 1
    else:
        raise PlanningError(
            f"module {name!r} ({type(m).__name__}) is not prunable: roots are Linear, Conv, "
            "ConvTranspose and Embedding"
        )
    slices = [SliceSpec(p + "weight", axis)]
    if getattr(m, "bias", None) is not None:
        slices.append(SliceSpec(p + "bias", 0))
    return size, slices, [EditSpec(name, attr, size)]


def norm_slices(
    name: str, m: nn.Module, stream: Stream, width: int
) -> tuple[list[SliceSpec], list[EditSpec]]:
    """A normalisation layer over the stream's channels: parameters and running statistics.

    Args:
        width: number of channels that reach the layer; it must normalise exactly that many.
    """
    if isinstance(m, nn.LayerNorm | nn.RMSNorm):
        channels = m.normalized_shape[-1]
    elif isinstance(m, nn.GroupNorm):
        channels = m.num_channels
    else:
        channels = m.num_features
    if channels != width:
        raise PlanningError(
            f"module {name!r} ({type(m).__name__}) normalises {channels} channels, but {width} "
            "reach it from the pruned layer"
        )
    p = f"{name}." if name else ""
    slices = []
    for key in ("weight", "bias"):
        if getattr(m, key, None) is not None:
            slices.append(stream.slice(p + key, 0))
    for key in ("running_mean", "running_var"):
        if getattr(m, key, None) is not None:
            slices.append(stream.slice(p + key, 0))
    per = stream.per_unit
    if isinstance(m, nn.LayerNorm | nn.RMSNorm):
        if len(m.normalized_shape) != 1:
            raise PlanningError(
                f"module {name!r}: {type(m).__name__} over {tuple(m.normalized_shape)} spans more than the "
                "channel axis"
            )
        return slices, [EditSpec(name, "normalized_shape", m.normalized_shape[0], per)]
    if isinstance(m, nn.GroupNorm):
        if m.num_groups != 1 and m.num_groups != m.num_channels:
            raise PlanningError(
                f"module {name!r}: GroupNorm with {m.num_groups} groups of "
                f"{m.num_channels // m.num_groups} channels cannot lose single channels"
            )
        edits = [EditSpec(name, "num_channels", m.num_channels, per)]
        if m.num_groups == m.num_channels and m.num_groups > 1:
            edits.append(EditSpec(name, "num_groups", m.num_groups, per))
        return slices, edits
    return slices, [EditSpec(name, "num_features", m.num_features, per)]


def consumer_slices(
    name: str, m: nn.Module, stream: Stream
) -> tuple[list[SliceSpec], list[EditSpec], Stream | None]:
    """A layer that reads the stream: its input-axis slices, edits and the stream it emits.

    Returns a new stream for depthwise convolutions, whose outputs follow their inputs, and
    ``None`` for layers that end the stream (Linear, ordinary Conv).
    """
    p = f"{name}." if name else ""
    per = stream.per_unit
    if isinstance(m, nn.Linear):
        return [stream.slice(p + "weight", 1)], [EditSpec(name, "in_features", m.in_features, per)], None
    if is_depthwise(m):
        mult = m.out_channels // m.in_channels
        out = stream.expand(mult)
        slices = [out.slice(p + "weight", 0)]
        if m.bias is not None:
            slices.append(out.slice(p + "bias", 0))
        edits = [
            EditSpec(name, "in_channels", m.in_channels, per),
            EditSpec(name, "out_channels", m.out_channels, per * mult),
            EditSpec(name, "groups", m.groups, per),
        ]
        return slices, edits, out
    if isinstance(m, CONV_TYPES):
        edits = [EditSpec(name, "in_channels", m.in_channels, per)]
        if m.groups == 1:
            return [stream.slice(p + "weight", 1)], edits, None
        local = m.in_channels // m.groups
        return [stream.slice(p + "weight", 1, modulo=local)], edits, None
    if isinstance(m, CONV_TRANSPOSE_TYPES):
        if m.groups != 1:
            raise PlanningError(f"module {name!r}: grouped ConvTranspose inputs are not supported")
        return [stream.slice(p + "weight", 0)], [EditSpec(name, "in_channels", m.in_channels, per)], None
    raise PlanningError(
        f"module {name!r} ({type(m).__name__}) does not know how to lose input channels"
    )
