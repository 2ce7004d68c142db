"""Automatic dependency discovery: every prunable group of a model, found from one example pass.

The model is traced with torch.fx where it traces, otherwise by recording one real forward pass
(`TorchFunctionMode` plus hooks on leaf modules), into one small graph IR. Channel labels are then
pushed through that graph (see `pruneplan.graph._analysis`) to find, for each root, every tensor
axis, module attribute and dropout rate its units own, and which roots are coupled.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from pruneplan.errors import PlanningError
from pruneplan.graph._analysis import analyze
from pruneplan.graph._fx import trace_fx
from pruneplan.graph._ir import Graph
from pruneplan.graph._record import trace_record
from pruneplan.graph.probe import as_inputs, frozen_mode
from pruneplan.graph.spec import Group, GroupList

__all__ = ["build_graph", "describe_groups", "left_out_summary", "prunable_groups"]

log = logging.getLogger(__name__)

_TRACERS = ("auto", "fx", "record")


def build_graph(model: nn.Module, example_inputs: Any, tracer: str = "auto") -> Graph:
    """Trace ``model`` on ``example_inputs`` in eval mode under no_grad (flags restored).

    Args:
        tracer: ``"fx"`` (symbolic trace, then one execution for shapes), ``"record"``
            (record one real forward pass), or ``"auto"``: fx, falling back to recording when
            fx cannot trace the model (Python control flow on tensor values and the like).
    """
    if tracer not in _TRACERS:
        raise PlanningError(f"tracer must be one of {_TRACERS}, got {tracer!r}")
    inputs = as_inputs(example_inputs)
    with frozen_mode(model):
        if tracer in ("auto", "fx"):
            try:
                return trace_fx(model, inputs)
            except Exception as exc:  # fx raises many types; any of them means "fall back"
                if tracer == "fx":
                    raise
                log.info("torch.fx cannot trace %s (%s: %s); recording a forward pass instead",
                         type(model).__name__, type(exc).__name__, exc)
        return trace_record(model, inputs)


def prunable_groups(
    model: nn.Module,
    example_inputs: Any,
    *,
    include_output: bool = False,
    tracer: str = "auto",
    on_unsupported: str = "error",
) -> GroupList:
    """Every prunable group of ``model``, in execution order of its first root, and every root
    left out with the reason.

    Roots are Linear, Conv/ConvTranspose (``groups == 1``) and Embedding (its embedding
    dimension). A group couples roots whose units must go together (residual sums, SE gates,
    channel shuffles); its ``name`` is its first root and is the key for `plan_pruning`.

    Args:
        model: the model; it is not modified (eval mode and no_grad during the pass).
        example_inputs: a tensor or a tuple of call arguments.
        include_output: also list roots whose units reach the model output (pruning them
            changes the output shape).
        tracer: see `build_graph`.
        on_unsupported: ``"error"`` raises `UnsupportedOperationError` when an operation the
            library does not understand touches a root's channels; ``"skip"`` leaves those
            roots out (with a warning in the log and their reason in ``left_out``).

    Returns:
        A `GroupList`: a list of `Group` whose ``left_out`` attribute lists every root module
        that is not offered, as `LeftOut` (name, reason), e.g. the classifier ("its units
        reach the model output") or a root blocked by attention heads.

    Raises:
        UnsupportedOperationError: naming the operation and the module path it ran in.
    """
    if on_unsupported not in ("error", "skip"):
        raise PlanningError(f"on_unsupported must be 'error' or 'skip', got {on_unsupported!r}")
    graph = build_graph(model, example_inputs, tracer)
    groups = analyze(model, graph, include_output=include_output, strict=on_unsupported == "error")
    log.info("%d prunable groups, %d roots left out (%s graph of %d nodes)", len(groups),
             len(groups.left_out), graph.source, len(graph.nodes))
    return groups


def left_out_summary(groups: GroupList, shown: int = 3) -> str:
    """One line: how many roots `prunable_groups` left out and why (the first ``shown``)."""
    left = getattr(groups, "left_out", [])
    total = len({r for g in groups for r in g.roots}) + len(left)
    if not left:
        return f"no roots left out ({total} roots in {len(groups)} groups)"
    parts = [f"{lo.name!r}: {lo.reason}" for lo in left[:shown]]
    more = f"; and {len(left) - shown} more" if len(left) > shown else ""
    return f"{len(left)} of {total} roots left out: " + "; ".join(parts) + more


def describe_groups(groups: list[Group]) -> str:
    """A plain-text table of groups: name, size, roots, tensor count (for the CLI); for a
    `GroupList` with roots left out, then one line per such root: its name and the reason."""
    lines = []
    width = max([len("group"), *(len(g.name) for g in groups)])
    lines.append(f"{'group':<{width}}  {'size':>6}  {'tensors':>7}  roots")
    for g in groups:
        roots = ", ".join(g.roots)
        lines.append(f"{g.name:<{width}}  {g.size:>6}  {len(g.tensors):>7}  {roots}")
    left = getattr(groups, "left_out", [])
    if left:
        lines.append(f"left out ({len(left)} roots):")
        lines.extend(f"  {lo.name}: {lo.reason}" for lo in left)
    return "\n".join(lines)
