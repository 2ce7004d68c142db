"""Groups from user-given cascades (the original TorchPruner way): root, then downstream modules."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from typing import Any

from torch import nn

from pruneplan._tied import tied_keys
from pruneplan.errors import PlanningError
from pruneplan.graph.probe import probe_dataflow, probe_shapes
from pruneplan.graph.rules import (
    CONV_TRANSPOSE_TYPES,
    CONV_TYPES,
    DROPOUT_TYPES,
    NORM_TYPES,
    Stream,
    consumer_slices,
    is_depthwise,
    norm_slices,
    root_slices,
)
from pruneplan.graph.spec import DropoutSpec, EditSpec, Group, SliceSpec

__all__ = ["explicit_groups"]

log = logging.getLogger(__name__)

_PASS_THROUGH = (nn.Flatten, nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU,
                 nn.Sigmoid, nn.Tanh, nn.ELU, nn.Hardswish, nn.MaxPool1d, nn.MaxPool2d,
                 nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d)


def explicit_groups(
    model: nn.Module,
    roots: Sequence[str],
    cascades: dict[str, Sequence[str]],
    example_inputs: Any = None,
) -> list[Group]:
    """One group per root, following the listed downstream modules in order.

    Norm layers and dropout carry the root's channels on; depthwise convs carry them on with
    their channel multiplier; Linear/Conv/ConvTranspose read them on their input axis. A Linear
    that receives ``k`` times as many features as there are channels (Conv -> pool -> Flatten ->
    Linear) owns a block of ``k`` features per channel; ``k`` comes from a probe pass.
    """
    modules = dict(model.named_modules())
    for name in roots:
        if name not in modules:
            raise PlanningError(f"no module named {name!r} in the model; {_valid(modules, name)}")
    for key, chain in cascades.items():
        if key not in modules:
            raise PlanningError(
                f"cascades key {key!r}: no module named {key!r} in the model; {_valid(modules, key)}"
            )
        if key not in roots:
            raise PlanningError(
                f"cascades key {key!r} is not a root in removed (roots: {', '.join(roots)}); "
                "give its indices in removed or drop its cascade"
            )
        for name in chain:
            if name not in modules:
                raise PlanningError(
                    f"cascades[{key!r}]: no module named {name!r} in the model; "
                    f"{_valid(modules, name)}"
                )
    _check_tied_vocabulary(model, modules, roots)
    if example_inputs is None:
        log.warning("cascades not checked against the model's data flow (no example_inputs): "
                    "a module left out of a cascade is not found")
    else:
        _check_readers(model, modules, roots, cascades, example_inputs)
    need_probe = [
        (r, c) for r in roots for c in cascades.get(r, ()) if isinstance(modules[c], nn.Linear)
        and not isinstance(modules[r], nn.Linear)
    ]
    shapes: dict = {}
    if need_probe:
        if example_inputs is None:
            raise PlanningError(
                f"module {need_probe[0][1]!r} is a Linear after {need_probe[0][0]!r}: pass "
                "example_inputs so that the probe pass can map channels to features"
            )
        wanted = {n for pair in need_probe for n in pair}
        shapes = probe_shapes(model, example_inputs, sorted(wanted))
    return [_one(model, modules, r, list(cascades.get(r, ())), shapes) for r in roots]


def _valid(modules: dict, name: str) -> str:
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=3)
    shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    return f"{hint}valid names: {shown}"


def _check_tied_vocabulary(model: nn.Module, modules: dict, roots: Sequence[str]) -> None:
    """Refuse a root whose weight is an Embedding's (a tied ``lm_head``): its output units are
    the vocabulary rows token ids index."""
    tied = tied_keys(model)
    for root in roots:
        if isinstance(modules[root], nn.Embedding):
            continue
        key = f"{root}.weight"
        canon = tied.get(key, key)
        for name, m in modules.items():
            if isinstance(m, nn.Embedding) and tied.get(f"{name}.weight", f"{name}.weight") == canon:
                raise PlanningError(
                    f"{root!r} is not prunable: its units are the vocabulary rows of the tied "
                    f"embedding {name!r}, which token ids index: removing some would renumber the "
                    "vocabulary (untie the weights to prune the output vocabulary)")


def _carries(m: nn.Module) -> bool:
    """A module whose output holds the channels of its input, in the same positions."""
    return isinstance(m, (*NORM_TYPES, *DROPOUT_TYPES, *_PASS_THROUGH)) or is_depthwise(m)


def _check_readers(model: nn.Module, modules: dict, roots: Sequence[str],
                   cascades: dict[str, Sequence[str]], example_inputs: Any) -> None:
    """Refuse a cascade that leaves out a module the probe pass sees reading the root's channels.

    From the root's output, the channels flow through the cascade's norms, dropouts, depthwise
    convs and the activations/pools/flattens in between; a module holding parameters or buffers
    that reads such a tensor and is not in the cascade would keep its old size (BatchNorm's
    running_mean, a Linear's in_features) and break the model.
    """
    events = probe_dataflow(model, example_inputs)
    for root in roots:
        chain = set(cascades.get(root, ()))
        flowing: set[int] = set()
        calls: dict[str, list[bool]] = {}  # cascade module -> reads the channels, per call
        for name, ins, out in events:
            if name == root:
                if out != -1:
                    flowing.add(out)
                continue
            reads = bool(flowing.intersection(ins))
            if name in chain:
                calls.setdefault(name, []).append(reads)
            if not reads:
                continue
            m = modules[name]
            if name in chain:
                if _carries(m) and out != -1:
                    flowing.add(out)
                continue
            stateful = next(iter(m.parameters()), None) is not None or \
                next(iter(m.buffers()), None) is not None
            if stateful:
                listed = ", ".join(repr(c) for c in cascades.get(root, ())) or "nothing"
                raise PlanningError(
                    f"cascade of {root!r} leaves out module {name!r} ({type(m).__name__}), "
                    f"which the probe pass sees reading the channels of {root!r}; the cascade lists "
                    f"{listed}: add {name!r} in the order the model runs it"
                )
            if out != -1:
                flowing.add(out)
        for name, seen in calls.items():
            m = modules[name]
            stateful = next(iter(m.parameters()), None) is not None or \
                next(iter(m.buffers()), None) is not None
            if stateful and any(seen) and not all(seen):
                which = ", ".join(str(i + 1) for i, hit in enumerate(seen) if hit)
                raise PlanningError(
                    f"cascade of {root!r} lists module {name!r} ({type(m).__name__}), which the "
                    f"probe pass sees called {len(seen)} times but reading the channels of "
                    f"{root!r} only at call {which}: cutting its tensors for them would break the "
                    "other calls (plan without cascades: discovery couples the roots of every "
                    "call)")


def _one(model: nn.Module, modules: dict, root: str, chain: list[str], shapes: dict) -> Group:
    size, slices, edits = root_slices(root, modules[root])
    slices, edits = list(slices), list(edits)
    dropouts: list[DropoutSpec] = []
    stream = Stream()
    width = size  # channels in the stream at this point
    for name in chain:
        m = modules[name]
        if isinstance(m, NORM_TYPES):
            s, e = norm_slices(name, m, stream, width)
            slices += s
            edits += e
        elif isinstance(m, DROPOUT_TYPES):
            dropouts.append(DropoutSpec(name, float(m.p)))
        elif isinstance(m, nn.Linear) and not isinstance(modules[root], nn.Linear):
            stream_in = _flatten_stream(root, name, shapes, stream, width)
            s, e, _ = consumer_slices(name, m, stream_in)
            slices += s
            edits += e
        elif is_depthwise(m) or isinstance(m, (nn.Linear, *CONV_TYPES, *CONV_TRANSPOSE_TYPES)):
            s, e, out = consumer_slices(name, m, stream)
            slices += s
            edits += e
            if out is not None:
                width = width * m.out_channels // m.in_channels
                stream = out
        elif isinstance(m, _PASS_THROUGH):
            continue
        else:
            raise PlanningError(
                f"cascade module {name!r} of {root!r} ({type(m).__name__}) is not supported"
            )
    _check_unique(root, slices)
    return Group(
        name=root,
        size=size,
        roots=(root,),
        slices=tuple(slices),
        edits=tuple(_merge(edits)),
        dropouts=tuple(dropouts),
    )


def _flatten_stream(root: str, name: str, shapes: dict, stream: Stream, width: int) -> Stream:
    if root not in shapes or name not in shapes:
        raise PlanningError(f"the probe pass did not reach {root!r} and {name!r}")
    features = shapes[name][0][-1]
    if features % width != 0:
        raise PlanningError(
            f"module {name!r} reads {features} features, not a multiple of the {width} channels "
            f"of {root!r}; is there a layer between them that is not in the cascade?"
        )
    # channels-first flatten (N, C, *spatial) -> (N, C * prod(spatial)): channel c owns a block
    return stream.expand(features // width)


def _check_unique(root: str, slices: list[SliceSpec]) -> None:
    seen = set()
    for s in slices:
        if (s.tensor, s.axis) in seen:
            raise PlanningError(f"group {root!r}: tensor {s.tensor!r} axis {s.axis} listed twice")
        seen.add((s.tensor, s.axis))


def _merge(edits: list[EditSpec]) -> list[EditSpec]:
    out: dict[tuple[str, str], EditSpec] = {}
    for e in edits:
        key = (e.module, e.attribute)
        if key in out:
            raise PlanningError(f"module {e.module!r} appears twice in one cascade")
        out[key] = e
    return list(out.values())
