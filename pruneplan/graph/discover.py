"""Automatic dependency discovery: every prunable group of a model, found from one example pass.

The model is traced with torch.fx where it traces, otherwise by recording one real forward pass
(`TorchFunctionMode` plus hooks on leaf modules), into one small graph IR; several example calls,
and a training-mode pass where the eval pass leaves parameters unused, are traced one after
another into the same IR. Channel labels are then
pushed through that graph (see `pruneplan.graph._analysis`) to find, for each root, every tensor
axis, module attribute and dropout rate its units own, and which roots are coupled.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from pruneplan._tied import tied_keys
from pruneplan.errors import PlanError, PlanningError, UnexecutedModuleError
from pruneplan.graph._analysis import analyze
from pruneplan.graph._fx import trace_fx
from pruneplan.graph._ir import Graph, Node, Ref
from pruneplan.graph._record import trace_record
from pruneplan.graph.probe import as_calls, as_inputs, check_example_pass, frozen_mode, training_mode
from pruneplan.graph.spec import Group, GroupList, LeftOut

__all__ = ["build_graph", "build_graphs", "describe_groups", "left_out_summary", "merge_graphs",
           "prunable_groups"]

log = logging.getLogger(__name__)

_TRACERS = ("auto", "fx", "record")
_TRAINING_PASS = ("auto", "always", "never")


def build_graph(model: nn.Module, example_inputs: Any, tracer: str = "auto") -> Graph:
    """Trace ``model`` on ``example_inputs`` (its first call, for `ExampleInputs`) in eval mode
    under no_grad (flags restored).

    Args:
        tracer: ``"fx"`` (symbolic trace, then one execution for shapes), ``"record"``
            (record one real forward pass), or ``"auto"``: fx, falling back to recording when
            fx cannot trace the model (Python control flow on tensor values and the like).
    """
    if tracer not in _TRACERS:
        raise PlanningError(f"tracer must be one of {_TRACERS}, got {tracer!r}")
    with frozen_mode(model):
        return _trace(model, as_inputs(example_inputs), tracer)


def _trace(model: nn.Module, inputs: tuple, tracer: str, check: bool = True) -> Graph:
    """Trace one call; with ``check``, when tracing fails and the model's own forward fails on
    these inputs too, an `ExamplePassError` (naming the module and the inputs) instead of the
    raw error."""
    try:
        return _trace_call(model, inputs, tracer)
    except PlanError:
        raise
    except Exception as exc:
        if not check:
            raise
        error = exc
    check_example_pass(model, inputs)  # raises when the model itself does not run
    raise error  # the model runs: the tracer's own failure


def _trace_call(model: nn.Module, inputs: tuple, tracer: str) -> Graph:
    if tracer in ("auto", "fx"):
        try:
            return trace_fx(model, inputs)
        except Exception as exc:  # fx raises many types; any of them means "fall back"
            if tracer == "fx":
                raise
            log.info("torch.fx cannot trace %s (%s: %s); recording a forward pass instead",
                     type(model).__name__, type(exc).__name__, exc)
    return trace_record(model, inputs)


def build_graphs(model: nn.Module, example_inputs: Any, tracer: str = "auto",
                 training_pass: str = "auto") -> tuple[Graph, list[str]]:
    """Trace every example call in eval mode, and in training mode as ``training_pass`` says;
    return the traces merged into one graph, and the modules holding parameters that no call
    reached (paths, model order).

    Args:
        training_pass: ``"auto"`` (a training-mode pass of every call when the eval passes leave
            a module holding parameters unreached: an auxiliary head), ``"always"`` or
            ``"never"``. The training-mode pass leaves the model exactly as it was (see
            `training_mode`); when it raises (a model that needs targets in training mode), the
            eval traces are used and that is logged.
    """
    if tracer not in _TRACERS:
        raise PlanningError(f"tracer must be one of {_TRACERS}, got {tracer!r}")
    if training_pass not in _TRAINING_PASS:
        raise PlanningError(f"training_pass must be one of {_TRAINING_PASS}, got {training_pass!r}")
    calls = as_calls(example_inputs)
    with frozen_mode(model):
        graphs = [_trace(model, call, tracer) for call in calls]
    unreached = _unreached(model, graphs)
    if training_pass == "always" or (training_pass == "auto" and unreached):
        for call in calls:
            with training_mode(model):
                try:
                    graphs.append(_trace(model, call, tracer, check=False))
                except Exception as exc:  # the model's own training forward failed
                    log.warning("the training-mode pass of %s failed (%s: %s); only the eval-mode "
                                "passes are used", type(model).__name__, type(exc).__name__, exc)
                    break
        unreached = _unreached(model, graphs)
    return merge_graphs(graphs), unreached


def merge_graphs(graphs: list[Graph]) -> Graph:
    """One graph holding every trace one after another (references shifted); a trace equal to
    an earlier one is dropped. Roots and consumers seen in several traces are merged by the
    analysis like a module called twice: their slices must agree."""
    kept: list[Graph] = []
    for g in graphs:
        if not any(_same(g, k) for k in kept):
            kept.append(g)
    if len(kept) == 1:
        return kept[0]
    nodes: list[Node] = []
    for g in kept:
        off = len(nodes)
        for n in g.nodes:
            nodes.append(Node(n.idx + off, n.kind, n.target, _shift(n.args, off),
                              _shift(n.kwargs, off), n.meta, n.scope, n.module, n.recorded))
    return Graph(nodes, "+".join(dict.fromkeys(g.source for g in kept)))


def _same(a: Graph, b: Graph) -> bool:
    if len(a.nodes) != len(b.nodes):
        return False
    try:
        return all(bool(x == y) for x, y in zip(a.nodes, b.nodes, strict=True))
    except Exception:  # an argument that does not compare (a tensor constant): keep both
        return False


def _shift(a: Any, off: int) -> Any:
    if isinstance(a, Ref):
        return Ref(a.node + off)
    if isinstance(a, tuple):
        return tuple(_shift(x, off) for x in a)
    if isinstance(a, list):
        return [_shift(x, off) for x in a]
    if isinstance(a, dict):
        return {k: _shift(v, off) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(_shift(a.start, off), _shift(a.stop, off), _shift(a.step, off))
    return a


def _unreached(model: nn.Module, graphs: list[Graph]) -> list[str]:
    """Paths of modules holding parameters of their own none of which any trace used."""
    states = model.state_dict(keep_vars=True)
    used: set[int] = set()
    for g in graphs:
        for n in g.nodes:
            if n.kind == "module" and n.module is not None:
                used.update(id(p) for p in n.module.parameters())
            elif n.kind == "param" and n.target in states:
                used.add(id(states[n.target]))
    out = []
    for name, m in model.named_modules():
        own = list(m.parameters(recurse=False))
        if own and not any(id(p) in used for p in own):
            out.append(name or "<top level>")
    return out


def prunable_groups(
    model: nn.Module,
    example_inputs: Any,
    *,
    include_output: bool = False,
    tracer: str = "auto",
    on_unsupported: str = "error",
    strict: bool = False,
    training_pass: str = "auto",
) -> GroupList:
    """Every prunable group of ``model``, in execution order of its first root, and every root
    left out with the reason.

    Roots are Linear, Conv/ConvTranspose (``groups == 1``) and Embedding (its embedding
    dimension). A group couples roots whose units must go together (residual sums, SE gates,
    channel shuffles); its ``name`` is its first root and is the key for `plan_pruning`.

    Discovery sees only what the example calls execute. The model is traced in eval mode and,
    when that leaves a module holding parameters unreached (an auxiliary head used only in
    training), in training mode too (see `build_graphs`; nothing in the model changes). A module
    that stays unreached is reported: a warning on the ``pruneplan.graph.discover`` logger
    naming it, its path in ``result.unexecuted``, and, for a root, an entry in ``left_out``;
    with ``strict=True`` it is an error instead.

    Args:
        model: the model; it is not modified (flags, buffers and RNG states are restored).
        example_inputs: a tensor, a tuple of call arguments, or `ExampleInputs` (several calls,
            all traced; their graphs are analysed together).
        include_output: also list roots whose units reach the model output (pruning them
            changes the output shape).
        tracer: see `build_graph`.
        on_unsupported: ``"error"`` raises `UnsupportedOperationError` when an operation the
            library does not understand touches a root's channels; ``"skip"`` leaves those
            roots out (with a warning in the log and their reason in ``left_out``).
        strict: raise `UnexecutedModuleError` when a module holding parameters is not reached
            by any example call in eval or training mode.
        training_pass: ``"auto"``, ``"always"`` or ``"never"`` (see `build_graphs`).

    Returns:
        A `GroupList`: a list of `Group` whose ``left_out`` attribute lists every root module
        that is not offered, as `LeftOut` (name, reason), e.g. the classifier ("its units
        reach the model output") or a root blocked by attention heads, and whose
        ``unexecuted`` attribute lists the modules no call reached.

    Raises:
        UnsupportedOperationError: naming the operation and the module path it ran in.
        UnexecutedModuleError: with ``strict=True``, naming the modules no call reached.
        ExamplePassError: the model's own forward pass fails on ``example_inputs`` (naming the
            module where it failed and the inputs' shapes and dtypes).
    """
    if on_unsupported not in ("error", "skip"):
        raise PlanningError(f"on_unsupported must be 'error' or 'skip', got {on_unsupported!r}")
    graph, unreached = build_graphs(model, example_inputs, tracer, training_pass)
    if unreached:
        shown = ", ".join(repr(n) for n in unreached[:10])
        more = f" and {len(unreached) - 10} more" if len(unreached) > 10 else ""
        msg = (f"{len(unreached)} modules holding parameters were not executed by the example "
               f"inputs in eval or training mode: {shown}{more}; their input widths are not "
               "checked against pruned channels (give example inputs that run them, several "
               "with pruneplan.ExampleInputs)")
        if strict:
            raise UnexecutedModuleError(msg)
        log.warning(msg)
    groups = analyze(model, graph, include_output=include_output, strict=on_unsupported == "error")
    modules = dict(model.named_modules())
    _leave_out_vocabulary(model, modules, groups)
    offered = {r for g in groups for r in g.roots} | {lo.name for lo in groups.left_out}
    groups.left_out += [
        LeftOut(n, "not executed by the example inputs (in eval or training mode)")
        for n in unreached if n not in offered and _is_root_type(modules.get(n))]
    # a layer that ran but that no recognised call used as itself: its weight was transformed
    # before use (timm's ScaledStdConv2d standardises it through F.batch_norm, then calls
    # F.conv2d with the result), or read by code no rule describes; never dropped silently
    offered |= {lo.name for lo in groups.left_out}
    skipped = set(unreached)
    # a module sharing its weight with one offered or left out (BART's ``shared`` and the
    # encoder's ``embed_tokens``): that one's entry speaks for the weight
    spoken = {id(getattr(modules[n], "weight", None)) for n in offered if n in modules}
    spoken.discard(id(None))
    sliced = {s.tensor.rsplit(".", 1)[0] for g in groups for s in g.slices}
    groups.left_out += [
        LeftOut(n, f"this {type(m).__name__} ran, but no call discovery recognises used its "
                   "weight as the layer's own (it is transformed first, e.g. by weight "
                   "standardisation, or read by code no rule describes); register a rule for "
                   f"{type(m).__name__} (pruneplan.register_module_rule) to prune it")
        for n, m in modules.items()
        if n and n not in offered and n not in skipped and n not in sliced and _is_root_type(m)
        and _owns_weight(m) and id(getattr(m, "weight", None)) not in spoken]
    groups.left_out += _stacked_weights(modules, groups, skipped)
    groups.unexecuted = list(unreached)
    _unshared_dropouts(groups)
    log.info("%d prunable groups, %d roots left out (%s graph of %d nodes)", len(groups),
             len(groups.left_out), graph.source, len(graph.nodes))
    return groups


def _stacked_weights(modules: dict[str, nn.Module], groups: GroupList, skipped: set[str]
                     ) -> list[LeftOut]:
    """Modules of no layer type that hold stacked weights, parameters with three or more axes
    longer than 1 (the experts of a mixture-of-experts layer, stored as one
    ``[experts, out, in]`` tensor each in transformers 5's ``Qwen2MoeExperts``,
    ``MixtralExperts``), none of which any group slices: their widths are not offered, and
    they are named rather than passed over in silence."""
    sliced = {s.tensor for g in groups for s in g.slices}
    named = {lo.name for lo in groups.left_out}
    out = []
    for n, m in modules.items():
        if not n or n in named or n in skipped or _is_root_type(m):
            continue
        params = [(k, p) for k, p in m.named_parameters(recurse=False)]
        stacked = [(k, tuple(p.shape)) for k, p in params if sum(d > 1 for d in p.shape) >= 3]
        if not stacked or any(f"{n}.{k}" in sliced for k, _ in params):
            continue
        shown = ", ".join(f"{k} {list(shape)}" for k, shape in stacked)
        out.append(LeftOut(n, f"this {type(m).__name__} holds stacked weights ({shown}) that no "
                              "rule describes, so their widths are not offered; register a rule "
                              f"for {type(m).__name__} (pruneplan.register_module_rule) to prune "
                              "them"))
    return out


def _unshared_dropouts(groups: GroupList) -> None:
    """A dropout module that several groups' units pass through (one module called at several
    places, as RoBERTa's classification head applies ``dropout`` to the hidden size and to its
    dense layer's output) keeps its rate: one rate cannot follow two unit counts, and summing
    the groups' changes could leave it outside [0, 1). Logged at INFO, naming the module."""
    seen: dict[str, list[str]] = {}
    for g in groups:
        for d in g.dropouts:
            seen.setdefault(d.module, []).append(g.name)
    shared = {m: names for m, names in seen.items() if len(names) > 1}
    if not shared:
        return
    for m, names in sorted(shared.items()):
        log.info("dropout %r is reached by the units of %d groups (%s); its rate stays as it is",
                 m, len(names), ", ".join(repr(n) for n in names))
    def keep(g: Group) -> Group:
        if not any(d.module in shared for d in g.dropouts):
            return g
        return replace(g, dropouts=tuple(d for d in g.dropouts if d.module not in shared))

    groups[:] = [keep(g) for g in groups]
    groups.alternatives = [keep(g) for g in groups.alternatives]


def _leave_out_vocabulary(model: nn.Module, modules: dict, groups: GroupList) -> None:
    """Leave out the groups that slice an Embedding's weight on its vocabulary axis (a tied
    ``lm_head``: T5's, a tied Llama's): token ids index those rows, so removing some would
    renumber the vocabulary rather than remove units, and ids past the end would fail."""
    tied = tied_keys(model)
    vocab: dict[str, str] = {}  # canonical weight key -> the first Embedding holding it
    for n, m in modules.items():
        if isinstance(m, nn.Embedding):
            vocab.setdefault(tied.get(f"{n}.weight", f"{n}.weight"), n)
    def why(hit: str) -> str:
        return (f"its units are the vocabulary rows of the tied embedding {hit!r}, which token ids "
                "index: removing some would renumber the vocabulary (untie the weights to prune "
                "the output vocabulary)")

    kept = []
    for g in groups:
        hit = next((vocab[tied.get(s.tensor, s.tensor)] for s in g.slices
                    if s.axis == 0 and tied.get(s.tensor, s.tensor) in vocab), None)
        if hit is None:
            kept.append(g)
            continue
        reason = why(hit)
        log.warning("group %r left out: %s", g.name, reason)
        groups.left_out += [LeftOut(r, reason) for r in g.roots]
    groups[:] = kept
    # a Linear whose own weight is the table (a tied lm_head) left out already, because the
    # embedding's lookups read that table without channels (see the engine's `couple_shared`):
    # the vocabulary is the reason a user can act on
    for i, lo in enumerate(groups.left_out):
        m = modules.get(lo.name)
        key = f"{lo.name}.weight"
        if isinstance(m, nn.Linear) and tied.get(key, key) in vocab:
            groups.left_out[i] = LeftOut(lo.name, why(vocab[tied.get(key, key)]))


def _owns_weight(m: nn.Module) -> bool:
    """A layer that would be a root of its own: it has a weight, and it is not a depthwise
    conv (whose channels follow its input's, so it is never a root)."""
    if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and m.groups == m.in_channels:
        return False
    return isinstance(getattr(m, "weight", None), torch.Tensor)


def _is_root_type(m: nn.Module | None) -> bool:
    return isinstance(m, nn.Linear | nn.Embedding | nn.modules.conv._ConvNd)


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
    """A plain-text table of groups: name, kind (only when some group's units are not
    channels: ``heads``, ``query_groups``), size, roots, tensor count (for the CLI); for a
    `GroupList` with alternatives (query heads of grouped-query attention), one line each
    (name, kind, units and blocks, the group it replaces); with roots left out, one line per
    such root: its name and the reason. Raises nothing."""
    lines = []
    width = max([len("group"), *(len(g.name) for g in groups)])
    kinds = any(g.kind != "channels" for g in groups)
    kind_head = f"  {'kind':<12}" if kinds else ""
    lines.append(f"{'group':<{width}}{kind_head}  {'size':>6}  {'tensors':>7}  roots")
    for g in groups:
        roots = ", ".join(g.roots)
        kind = f"  {g.kind:<12}" if kinds else ""
        lines.append(f"{g.name:<{width}}{kind}  {g.size:>6}  {len(g.tensors):>7}  {roots}")
    alts = getattr(groups, "alternatives", [])
    if alts:
        lines.append(f"instead of a group above ({len(alts)}; never both in one plan):")
        lines.extend(f"  {g.name}  {g.kind}  {g.size} units in {g.blocks} blocks of "
                     f"{g.size // max(g.blocks, 1)}, instead of {g.alternative_to}" for g in alts)
    left = getattr(groups, "left_out", [])
    if left:
        lines.append(f"left out ({len(left)} roots):")
        lines.extend(f"  {lo.name}: {lo.reason}" for lo in left)
    return "\n".join(lines)
