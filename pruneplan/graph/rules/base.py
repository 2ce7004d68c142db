"""The rule interface: how channel labels cross one module type or one function, and the registry.

Discovery pushes *labels* through the traced graph: a label array sits on one or more axes of a
tensor and says, position by position, which unit of which root is there (``-1``: no root).
For every executed call the engine looks up the rule of the called module type (through the
type's MRO, so subclasses inherit) or of the function's canonical name (``torch.add``,
``Tensor.add_`` and ``operator.iadd`` are all ``"add"``), hands it a `Call`, and stores what
the rule returns as the labels of the call's output. A rule can

- **follow**: return labels for the output (the input's, moved, re-arranged or repeated);
- **couple**: `Call.couple` ties two label arrays position by position (their roots then lose
  the same units: residual sums, gates, channel shuffles);
- **consume**: return ``None`` after recording what the reaching units own (`Call.own`,
  `Call.edit`, `Call.per_root`): the input axis of a Linear/Conv ends the labels;
- **block**: `Call.block` takes roots out of discovery with a reason a user can read;
- **create** units: `Call.root` makes the called module a root and returns its output labels.

The engine itself never names a layer type or an operation: everything it knows about them is
in the rules of this package, one file per family, and in the rules users register with
`register_module_rule` / `register_function_rule`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from pruneplan.errors import PlanningError
from pruneplan.graph._ir import Node, Ref, mark_leaf, mark_leaf_name, op_name, qualified_name
from pruneplan.graph._labels import Dim, Lab, PView, roots_of
from pruneplan.graph._streams import Stream
from pruneplan.graph.spec import DropoutSpec, EditSpec, SliceSpec

if TYPE_CHECKING:
    from pruneplan.graph._analysis import Engine

__all__ = [
    "Call",
    "FunctionRule",
    "ModuleRule",
    "Rule",
    "function_rule",
    "module_rule",
    "register_function_rule",
    "register_module_rule",
]


def iter_refs(a: Any) -> Iterator[Ref]:
    """Every graph reference inside (nested) call arguments, in order."""
    if isinstance(a, Ref):
        yield a
    elif isinstance(a, tuple | list):
        for x in a:
            yield from iter_refs(x)
    elif isinstance(a, dict):
        for x in a.values():
            yield from iter_refs(x)


def tensorish(meta: Any) -> bool:
    """Whether a node meta describes a tensor (or a sequence holding one)."""
    if isinstance(meta, torch.Size):
        return True
    return isinstance(meta, list) and any(tensorish(m) for m in meta)


class Call:
    """One executed call, as a rule sees it: its inputs' labels and the engine's actions.

    Attributes:
        node: the IR node (``node.args`` / ``node.kwargs`` hold `Ref` for graph values).
        module: the called module (``None`` for a function or method).
        name: the module path, or the function's canonical name.
        refs: the graph values among the arguments, in order.
        infos: what the engine knows of each of ``refs`` (a `Lab` for labelled tensors, a
            `PView` for parameters, a list for tuples, ``None`` for anything else).
        x, xmeta: the info and shape of the main input (first positional argument of a
            function; first graph value passed to a module).
    """

    def __init__(self, engine: Engine, node: Node, refs: list[Ref], infos: list[Any]) -> None:
        self._engine = engine
        self.node = node
        self.module: nn.Module | None = node.module
        self.name = node.target
        self.refs = refs
        self.infos = infos
        if node.kind == "module":
            self.xref: Any = refs[0] if refs else None
            self.x = infos[0] if refs else None
        else:
            self.xref = node.args[0] if node.args else None
            self.x = engine.read(self.xref) if isinstance(self.xref, Ref) else None
        self.xmeta = engine.meta(self.xref)
        self._since = len(engine.regroups)

    # ---- reading ---------------------------------------------------------------------------

    @property
    def where(self) -> str:
        """``module 'a.b' (Conv2d)`` or ``operation 'add' in module 'a'`` for messages."""
        return self.node.where()

    @property
    def model(self) -> nn.Module:
        """The model being analysed (to find the module that owns a parameter)."""
        return self._engine.model

    @property
    def out(self) -> Any:
        """Shape of the call's output (``torch.Size``), a list for a tuple output, or ``None``."""
        return self.node.meta

    @cached_property
    def labelled(self) -> list[int]:
        """Sorted roots whose labels reach any input of the call."""
        return self._engine.labeled_roots(self.infos)

    @property
    def x_only(self) -> bool:
        """The main input is labelled and no other input is."""
        return isinstance(self.x, Lab) and not self._engine.labeled_roots(self.infos[1:])

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        """Positional argument ``i``, else keyword ``name``, else ``default`` (raw: `Ref` stays)."""
        node = self.node
        if len(node.args) > i:
            return node.args[i]
        return node.kwargs.get(name, default)

    def read(self, ref: Any) -> Any:
        """What the engine knows of a graph value (``None`` for a non-`Ref`)."""
        return self._engine.read(ref)

    def meta(self, ref: Any) -> Any:
        """Shape of a graph value (``None`` for a non-`Ref`)."""
        return self._engine.meta(ref)

    def raw(self, ref: Any) -> Any:
        """What the engine recorded for a graph value, labels of blocked roots included (for
        sizes read off a tensor; everything else reads `read`)."""
        return self._engine.info[ref.node] if isinstance(ref, Ref) else None

    def dim(self, ref: Any) -> Dim | None:
        """The `Dim` a graph value holds, blocked roots included (a width read off channels
        stays a constraint on the axes it sizes even when its own roots are left out)."""
        v = self._engine.info[ref.node] if isinstance(ref, Ref) else None
        return v if isinstance(v, Dim) else None

    def width(self, lab: Lab, axis: int) -> Dim | None:
        """The width of ``axis`` of a tensor labelled ``lab``, read as a Python int (fx); an
        axis carrying no units has a fixed width (a `Dim` of no roots: it must not size an
        axis whose units may go)."""
        if axis not in lab.axes:
            return Dim(())
        arr = lab.arr if lab.axes == (axis,) else None
        return Dim(tuple(lab.roots), arr, len(self._engine.regroups))

    def labelled_in(self, infos: Iterable[Any]) -> list[int]:
        """Sorted roots labelled in the given infos."""
        return self._engine.labeled_roots(list(infos))

    # ---- acting --------------------------------------------------------------------------

    def block(self, roots: Lab | Iterable[int], reason: str) -> None:
        """Take ``roots`` (and every root coupled to them) out of discovery, for ``reason``."""
        self._engine.block(roots.roots if isinstance(roots, Lab) else list(roots), reason)

    def block_all(self, reason: str | None = None) -> None:
        """Block every labelled input root (default reason: they reach this call)."""
        self._engine.block(self.labelled, reason or f"they reach {self.where}")

    def error(self, what: str, roots: Lab | Iterable[int] | None = None) -> None:
        """An unsupported use: blocks ``roots`` (default: all labelled) and, when discovery is
        strict, raises `UnsupportedOperationError` naming this call and ``what``."""
        rs = self.labelled if roots is None else roots.roots if isinstance(roots, Lab) else list(roots)
        self._engine.error(self.node, rs, what)

    def unsupported(self) -> None:
        """What happens to a call no rule knows (the engine's default)."""
        return self._engine.unknown(self)

    def couple(self, a: np.ndarray, b: np.ndarray, tie: bool = True) -> np.ndarray:
        """Tie two equally long 1-D label arrays position by position; returns their union.

        Roots met position by position are coupled (they lose the same units); a labelled
        position meeting an unlabelled one blocks the roots involved. Positions holding
        different units tie those units: the group's unit becomes the whole set of tied units
        (a local position in every block of a grouped conv, the halves of a chunk, the ``r * r``
        channels of a pixel shuffle, a channel and its ghost copy); roots of different sizes
        can be coupled that way. All sets must come out equally large for every root, else the
        roots are left out with the reason. ``tie=False`` blocks the roots instead of tying
        units that are not tied already.
        """
        return self._engine.couple(a, b, self.node, tie)

    def merge(self, operands: list[tuple[Any, Any]]) -> Lab | None:
        """Element-wise combination with broadcasting of ``(info, shape)`` operands: labels on
        the same axes are coupled; a parameter broadcast along them is sliced with them."""
        return self._engine.merge(self.node, operands)

    def stream(self, arr: np.ndarray, root: int) -> Stream | None:
        """Where the units of ``root`` sit in the 1-D ``arr`` (blocks it if some are missing)."""
        return self._engine.stream(arr, root, self.node)

    def per_root(self, lab: Lab, rule: Callable[[Stream], tuple[Iterable, Iterable]]) -> None:
        """For each root in ``lab`` (one axis), ``rule(stream)`` gives ``(slices, edits)`` its
        units own here; a `PlanningError` from ``rule`` blocks that root with its message."""
        self._engine.apply_rule(self.node, lab, rule)

    def own(self, tensor: str, axis: int, labels: np.ndarray, modulo: int | None = None) -> None:
        """The units labelled in ``labels`` own those positions of ``tensor`` along ``axis``.

        ``labels`` is a 1-D label array as long as the tensor's axis (or ``modulo``): several
        positions per unit (gates of a recurrent layer, query/key/value rows of a packed
        projection) are written by repeating a unit's label at each of them.
        """
        for r in roots_of(labels):
            st = self.stream(labels, r)
            if st is not None:
                self._engine.effect(r, self.node, st.slice(tensor, axis, modulo))

    def edit(self, attribute: str, before: int, labels: np.ndarray, module: str | None = None) -> None:
        """``module.attribute`` (default: the called module) shrinks by the positions each
        removed unit holds in ``labels`` (``attribute`` may name one integer of a list or
        tuple attribute: ``"channel_splits[1]"``); a unit holding none there (the labels of
        one part of a split, see `parts`) takes nothing off."""
        mod = self.name if module is None else module
        for r in roots_of(labels):
            st = self.stream(labels, r)
            if st is not None:
                edit = EditSpec(mod, attribute, before, st.per_unit)
                self._engine.effect(r, self.node, self._engine.scaled(edit, st, r))

    def parts(self, roots: Iterable[int]) -> None:
        """The channels of ``roots`` are cut into parts that go their own ways (a split into
        parts of different sizes): later calls may see only the units of one part. Slices
        and edits made there belong to those units alone (a unit elsewhere owns no position
        of that tensor, and drops nothing from that attribute: `EditSpec.amounts`)."""
        self._engine.parted.update(roots)

    def dropout(self, lab: Lab, p: float) -> None:
        """A dropout layer of rate ``p`` over the channels: its rate follows the unit count
        when they are exactly one root's units."""
        rs = lab.roots
        if len(rs) == 1 and (lab.arr >= 0).all():
            self._engine.effect(rs[0], self.node, DropoutSpec(self.name, p))

    def root(self, axis: int, spec: Callable[[], tuple[int, list[SliceSpec], list[EditSpec]]],
             name: str | None = None, module: nn.Module | None = None) -> Lab | None:
        """Make a module a root whose units lie on ``axis`` of this call's output.

        The module is the called one, or ``module`` at path ``name`` (a functional call made
        with a layer's own weights). ``spec()`` (called once per module) gives ``(size,
        slices, edits)``: the unit count, the tensor slices on its output side and its attribute
        edits; a `PlanningError` from it means the module is not a root. Returns the output
        labels (``None`` when blocked).
        """
        return self._engine.new_root(self.node, axis, spec, name, module)

    def tie(self, arrs: list[np.ndarray], lazy: bool = False) -> np.ndarray | None:
        """Tie equally long 1-D label arrays position by position (see `couple`), gathering
        the units of a root into coarser units where the ties join several of them into one
        (the query heads that share a key/value head). Each new unit must gather the same
        number of old units of every root involved, else those roots are blocked. Returns the
        tied labels in the new units, or ``None`` when blocked. With ``lazy``, ties that cannot
        gather whole units now (a root only part of whose units meet here) are kept as ties
        between units instead (as `couple` does), checked when the group is assembled."""
        return self._engine.tie(arrs, self.node, lazy)

    def coarsen_rows(self, rows: np.ndarray) -> bool:
        """Channels viewed as ``(rows, row length)`` (a 2-D label array): a root whose units
        fill two or more whole rows gets one unit per row (a projection split into heads).
        Returns whether any root was regrouped; refresh held labels with `fresh`."""
        return self._engine.coarsen_rows(rows)

    def fresh(self, arr: np.ndarray) -> np.ndarray:
        """A label array read at the start of this call, in the units after any regrouping
        done since (by `tie` or `coarsen_rows`)."""
        return self._engine.refresh(arr, self._since)

    @property
    def regrouped(self) -> bool:
        """Whether units were regrouped during this call."""
        return len(self._engine.regroups) > self._since

    def mark_heads(self, arr: np.ndarray) -> None:
        """The 1-D ``arr`` labels the head axis of an attention: the units of its roots are
        attention heads (or groups of query heads), which `kind` reports."""
        self._engine.mark_heads(arr)

    def is_heads(self, lab: Lab) -> bool:
        """Whether a root of ``lab`` has units that attention made heads (or is coupled to
        one that has: a per-head bias, a talking-heads projection)."""
        eng = self._engine
        heads = {eng.uf.find(h) for h in eng.heads}
        return any(eng.uf.find(r) in heads for r in lab.roots)

    @property
    def scope_module(self) -> nn.Module | None:
        """The module whose ``forward`` ran this call (``None`` when it cannot be found)."""
        try:
            return self._engine.model.get_submodule(self.node.scope)
        except AttributeError:
            return None

    def units(self, spec: Callable[[], tuple[int, list[SliceSpec], list[EditSpec]]],
              name: str | None = None, module: nn.Module | None = None) -> np.ndarray | None:
        """Make the called module (or ``module`` at path ``name``: the module whose weights a
        function was called with) a root (as `root`) whose units are no single axis of the
        call's output (a recurrent layer's tuple, attention heads): returns the fresh 1-D labels
        of its units for the rule to place, or ``None`` when it is not a root."""
        return self._engine.new_units(self.node, spec, name, module)

    def producer(self, ref: Any) -> Node | None:
        """The node that produced a graph value (``None`` for a non-`Ref`)."""
        return self._engine.nodes[ref.node] if isinstance(ref, Ref) else None

    def relabel(self, refs: list[Ref], labs: list[Lab]) -> bool:
        """Label values computed before this call, that no other call has read since, so that
        later calls reading them see ``labs`` (a mask built once and shared by the attention
        of every layer ties their heads). Returns ``False``, changing nothing, when a call
        other than the producers listed or this one read one of them already."""
        return self._engine.relabel([r.node for r in refs], labs, self.node.idx)

    def used(self, item: int | None = None) -> bool:
        """Whether a later call (or the model output) reads this call's output, or, with
        ``item``, element ``item`` of its tuple output (reading the whole tuple counts)."""
        return self._engine.used(self.node.idx, item)

    def shape_only(self) -> bool:
        """Whether every later call that reads this call's output reads only its shape
        (``size``, ``dim``, ``getattr(x, 'shape')``): its values, and so its labels, go
        nowhere (BART's ``inputs_embeds[:, :, -1]`` passed along only for its size)."""
        users = self._engine.users(self.node.idx)
        nodes = self._engine.nodes
        return bool(users) and all(
            nodes[u].target in ("size", "dim")
            or (nodes[u].target == "getattr" and len(nodes[u].args) > 1 and nodes[u].args[1] == "shape")
            for u in users)

    def root_size(self, root: int) -> int:
        """The number of units of ``root``."""
        return self._engine.roots[root].size

    def whole_conv_groups(self, name: str) -> bool:
        """Whether the grouped conv at ``name`` offers whole conv groups as units in this
        analysis (discovery re-runs so where local positions tied every block together, see
        `pruneplan.graph.rules.grouped`)."""
        return name in self._engine.whole_groups

    def tied_conv_blocks(self, name: str, arr: np.ndarray) -> None:
        """Record that the grouped conv at ``name`` tied the 1-D input labels ``arr``: local
        positions across its blocks, or each whole block (checked after the pass: see
        `Engine.collapsed`)."""
        self._engine.grouped_inputs.append((name, arr, len(self._engine.regroups)))

    def later(self, check: Callable[[], None]) -> None:
        """Run ``check`` once every call has been seen (before the widths are checked): for
        what depends on facts found further on (units that attention makes heads)."""
        self._engine.later.append(check)

    def sliced(self, tensor: str, axis: int) -> list[tuple[int, int]]:
        """``(root, positions per unit)`` of every root (not blocked) whose units own positions
        of ``tensor`` along ``axis`` so far (in a `later` check: all of them)."""
        return self._engine.sliced(tensor, axis)

    def edit_root(self, root: int, attribute: str, before: int, per_unit: int,
                  module: str | None = None, amounts: tuple[int, ...] | None = None) -> None:
        """``module.attribute`` (default: the called module) shrinks by ``per_unit`` for each
        removed unit of ``root``, or by ``amounts[u]`` for its unit ``u`` when given."""
        mod = self.name if module is None else module
        self._engine.effect(root, self.node, EditSpec(mod, attribute, before, per_unit, amounts))

    def check_widths(self, out: Any, args: tuple) -> None:
        """``args`` are sizes given to a shape-taking op: a labelled width used there must land
        on an output axis carrying the same coupled units (checked once everything is known)."""
        self._engine.check_widths(self.node, out, args)


class Rule:
    """How channels cross one module type or one function: subclass and override `propagate`.

    `propagate` receives the `Call` and returns the labels of its output: a `Lab`, a list of
    them for a tuple output, or ``None`` when no labelled channel comes out.
    """

    def propagate(self, call: Call) -> Any:
        """Labels of the call's output; record ownership, couplings and blocks through ``call``."""
        raise NotImplementedError


class ModuleRule(Rule):
    """A layer that receives labelled channels on its first input and nowhere else.

    Override `labels`; a call with labels on another input goes to `mixed` (default: error).
    """

    def propagate(self, call: Call) -> Any:
        if not call.labelled:
            return None
        if not call.x_only:
            return self.mixed(call)
        return self.labels(call, call.x)

    def mixed(self, call: Call) -> Any:
        """Labels on an input other than the first (default: an unsupported use)."""
        call.error("receives them in an argument pruneplan does not follow")
        return None

    def labels(self, call: Call, x: Lab) -> Any:
        """Labels of the output, given the main input's labels ``x``."""
        raise NotImplementedError


class FunctionRule(Rule):
    """An operation on tensors: `labels` sees calls with labelled inputs and a tensor output;
    `params` sees calls on parameters only (to follow a view of a weight)."""

    def propagate(self, call: Call) -> Any:
        if not tensorish(call.out):
            return None
        if not call.labelled:
            return self.params(call) if any(isinstance(i, PView) for i in call.infos) else None
        return self.labels(call)

    def params(self, call: Call) -> PView | None:
        """The `PView` of the output when the inputs are parameters only (default: none)."""
        return None

    def labels(self, call: Call) -> Any:
        raise NotImplementedError

    @staticmethod
    def main(call: Call) -> Lab | None:
        """The labels of the main input, or ``None`` after an error when another input carries
        the labels (a position this rule does not follow)."""
        if isinstance(call.x, Lab):
            return call.x
        call.error("receives them in an argument pruneplan does not follow")
        return None


# ---- registry --------------------------------------------------------------------------------

_MODULE: dict[type, Rule] = {}
_FUNCTION: dict[str, Rule] = {}
_module_cache: dict[type, Rule | None] = {}


def _check(rule: Any) -> None:
    if not isinstance(rule, Rule):
        raise PlanningError(f"a rule must be a pruneplan.graph.rules.Rule, got {type(rule).__name__}")


def register_module_rule(module_type: type[nn.Module], rule: Rule) -> None:
    """Use ``rule`` for every module of ``module_type`` (and its subclasses without their own).

    Calls of such modules are recorded as single nodes (their ``forward`` is not traced into),
    whatever library defines them; a rule registered later for the same type replaces it.

    Raises:
        PlanningError: ``module_type`` is not an ``nn.Module`` subclass or ``rule`` is no `Rule`.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise PlanningError(f"register_module_rule needs an nn.Module subclass, got {module_type!r}")
    _check(rule)
    _MODULE[module_type] = rule
    _module_cache.clear()
    if not _builtin_registration:
        mark_leaf(module_type)


def register_function_rule(function: Callable | str, rule: Rule) -> None:
    """Use ``rule`` for calls of ``function`` (a callable or its canonical name).

    The name is what the tracers record: ``torch.add``, ``Tensor.add``, ``Tensor.add_`` and
    ``operator.add`` are all ``"add"``; a plain Python function appears in the graph when it is
    wrapped with ``torch.fx.wrap`` (fx tracer) or is a torch custom operator.

    Raises:
        PlanningError: ``rule`` is not a `Rule`.
    """
    _check(rule)
    _FUNCTION[op_name(function)] = rule


def module_rule(module_type: type) -> Rule | None:
    """The rule of a module type: the first registered class along its MRO."""
    try:
        return _module_cache[module_type]
    except KeyError:
        pass
    found = next((_MODULE[c] for c in module_type.__mro__ if c in _MODULE), None)
    if found is None and _BY_NAME:
        found = next((_BY_NAME[qualified_name(c)] for c in module_type.__mro__
                      if qualified_name(c) in _BY_NAME), None)
    _module_cache[module_type] = found
    return found


_BY_NAME: dict[str, Rule] = {}


def builtin_by_name(qualified: str, rule: Rule) -> None:
    """A rule shipped with pruneplan for a module type of an optional library, named
    ``"package.module.Class"``: nothing is imported; the rule applies when a module of that
    type (or a subclass) is met, and such modules are recorded as single nodes."""
    _check(rule)
    _BY_NAME[qualified] = rule
    _module_cache.clear()
    mark_leaf_name(qualified)


def function_rule(name: str) -> Rule | None:
    """The rule of a canonical function name."""
    return _FUNCTION.get(name)


_builtin_registration = False


def builtin(module_types: Iterable[type] = (), names: Iterable[str] = (), *, rule: Rule) -> None:
    """Register a rule shipped with pruneplan (built-in torch types are leaves already)."""
    global _builtin_registration
    _builtin_registration = True
    try:
        for t in module_types:
            register_module_rule(t, rule)
        for n in names:
            register_function_rule(n, rule)
    finally:
        _builtin_registration = False

