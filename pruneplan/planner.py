"""Turn removed indices and coupled groups into a `PrunePlan`."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from pruneplan._tied import tied_keys
from pruneplan.errors import CoupledGroupError, PlanningError
from pruneplan.graph.discover import prunable_groups
from pruneplan.graph.explicit import explicit_groups
from pruneplan.graph.probe import dry_run
from pruneplan.graph.spec import EditSpec
from pruneplan.graph.spec import Group as GroupSpec
from pruneplan.hf_config import config_edits
from pruneplan.plan import (
    FORMAT,
    ConfigEdits,
    DropoutChange,
    Group,
    IndexMap,
    ModelFingerprint,
    ModuleEdit,
    Provenance,
    PrunePlan,
    TensorSlice,
    required_version,
    state_dict_digest,
)

__all__ = ["build_plan", "check_blocks", "check_runs", "execution_order", "hf_config_edits",
           "normalize_indices", "plan_pruning", "saved_names", "tied_keys"]

log = logging.getLogger(__name__)

IndexLike = Sequence[int] | np.ndarray | torch.Tensor


def normalize_indices(indices: IndexLike, size: int, where: str) -> list[int]:
    """Sorted unique ints in ``[0, size)``; raise `PlanningError` naming ``where`` otherwise."""
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().reshape(-1).tolist()
    elif isinstance(indices, np.ndarray):
        indices = indices.reshape(-1).tolist()
    out = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int | np.integer):
            if isinstance(i, float) and i.is_integer():
                i = int(i)
            else:
                raise PlanningError(f"{where}: index {i!r} is not an integer")
        i = int(i)
        if i < 0 or i >= size:
            raise PlanningError(f"{where}: index {i} is out of range for {size} units")
        out.append(i)
    if len(set(out)) != len(out):
        dup = sorted({i for i in out if out.count(i) > 1})
        raise PlanningError(f"{where}: index {dup[0]} is given more than once")
    if len(out) >= size:
        raise PlanningError(f"{where}: removing all {size} units; at least one must stay")
    return sorted(out)


def plan_pruning(
    model: nn.Module,
    removed: Mapping[str, IndexLike],
    example_inputs: Any = None,
    cascades: Mapping[str, Sequence[str]] | None = None,
    *,
    couple: str = "error",
    include_output: bool = False,
    on_unsupported: str = "error",
    strict: bool = False,
    provenance: Provenance | Mapping[str, Any] | None = None,
) -> PrunePlan:
    """Plan the removal of units from the named root modules, with everything it implies.

    Args:
        model: the model to prune (not modified; a probe pass runs in eval mode, no grad).
        removed: root module name -> indices of its output units to remove.
        example_inputs: a batch (tensor or tuple of call arguments) for the probe pass / graph
            discovery, or `pruneplan.ExampleInputs` (several calls, all traced by discovery).
        cascades: root name -> downstream modules to adjust, in order (original TorchPruner
            style). ``None`` discovers them automatically from the executed graph.
        couple: for discovered coupled groups, ``"error"`` refuses indices given for one
            member only; ``"expand"`` applies them to every member (a member holding only
            some units of its group, a branch of a concatenation tied to a full width,
            `GroupSpec.root_units`: its indices count its own units, and each removes the
            group unit holding it).
        include_output: with discovery, also allow roots whose units are the model's output
            (the classifier); pruning them changes the output shape.
        on_unsupported: with discovery, as in `prunable_groups`: ``"error"`` raises
            `UnsupportedOperationError` when an operation the library does not understand
            touches a root's channels; ``"skip"`` leaves those roots out, so naming one in
            ``removed`` raises `PlanningError` with the reason.
        strict: with discovery, raise `UnexecutedModuleError` when a module holding parameters
            is executed by no example call in eval or training mode (default: a warning).
        provenance: informative metadata stored in the plan.

    With ``example_inputs``, the plan is applied to a copy of the model on the ``meta`` device
    (module structure only: no data is copied, no arithmetic done) and the example calls are run
    on it, in eval and in training mode: a plan after which the model would not run is refused,
    never returned (a model whose code needs data, such as ``.item()``, cannot run on ``meta``;
    it is not checked). This costs about as much as discovery (ResNet-50: 0.3 s).

    Returns:
        The validated plan; nothing in ``model`` changes. Its groups are listed in the order the
        model executes them (discovery order; with ``cascades``, the order in which the model
        defines the root modules).

    Raises:
        PlanningError: a key is not a prunable group (or module, with ``cascades``), an index is
            out of range, repeated or not an integer, every unit of a group would go, or
            discovery needs ``example_inputs``; with ``cascades``: a name (key or value) that is
            no module (the message lists the valid names), a key that is not in ``removed``, a
            module the probe pass sees reading a root's channels that its cascade leaves out
            (checked when ``example_inputs`` is given), or a tied ``lm_head`` root.
        PlanningError: the example inputs fail on the model with the plan applied (the
            message names the groups and the error).
        CoupledGroupError: indices are given for one member of a coupled group with
            ``couple="error"``.
        UnsupportedOperationError: discovery meets an operation it does not understand.
        ExamplePassError: the model's own forward pass fails on ``example_inputs`` (naming the
            module where it failed and the inputs' shapes and dtypes).
    """
    if cascades is not None:
        groups = explicit_groups(model, list(removed), dict(cascades), example_inputs)
        chosen = [(g, removed[g.name]) for g in groups]
        order = None
    else:
        chosen, order = _discovered(model, removed, example_inputs, couple, include_output,
                                    on_unsupported, strict)
    plan = build_plan(model, chosen, provenance, order=order)
    if example_inputs is not None:
        check_runs(model, plan, example_inputs)
    return plan


def check_runs(model: nn.Module, plan: PrunePlan, example_inputs: Any) -> None:
    """Refuse a plan after which the model would no longer run the example inputs: the plan is
    applied to a copy of the model on the ``meta`` device (no data, no arithmetic) and the
    inputs are run (`pruneplan.graph.probe.dry_run`).

    Raises:
        PlanningError: naming the groups and the error the pruned copy raises.
    """
    from pruneplan.apply import apply_plan  # (the applier of the public API, on a copy)

    problem = dry_run(model, example_inputs,
                      lambda twin: apply_plan(twin, plan, check_content="off"))
    if problem is not None:
        names = ", ".join(repr(g.name) for g in plan.groups)
        raise PlanningError(
            f"the plan of groups {names} would break the model: with it applied (to a copy on "
            f"the meta device), the example inputs fail with {problem}")


def _discovered(
    model: nn.Module,
    removed: Mapping[str, IndexLike],
    example_inputs: Any,
    couple: str,
    include_output: bool,
    on_unsupported: str,
    strict: bool,
) -> tuple[list[tuple[GroupSpec, IndexLike]], dict[str, int]]:
    if example_inputs is None:
        raise PlanningError("automatic discovery needs example_inputs")
    if couple not in ("error", "expand"):
        raise PlanningError(f"couple must be 'error' or 'expand', got {couple!r}")
    groups = prunable_groups(model, example_inputs, include_output=include_output,
                             on_unsupported=on_unsupported, strict=strict)
    by_name = {g.name: g for g in [*groups, *groups.alternatives]}
    by_root = {r: g for g in groups for r in g.roots}
    left_out = {lo.name: lo.reason for lo in groups.left_out}
    chosen: dict[str, tuple[GroupSpec, IndexLike]] = {}
    for key, idx in removed.items():
        g = by_name.get(key) or by_root.get(key)
        if g is None and key in left_out:
            raise PlanningError(f"{key!r} is not prunable: {left_out[key]}")
        if g is None:
            names = [x.name for x in groups]
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise PlanningError(
                f"{key!r} is not a prunable group of this model (prunable: {shown or 'none'}; "
                "roots that produce the model's output need include_output=True)"
            )
        if key != g.name and couple != "expand":
            raise CoupledGroupError(
                f"module {key!r} is coupled with {list(g.roots)} in group {g.name!r}: give the "
                f"indices for {g.name!r}, or pass couple='expand'"
            )
        if g.name in chosen:
            raise PlanningError(f"group {g.name!r} is given twice (as {key!r})")
        spread = dict(g.root_units).get(key)
        if spread is not None:  # units tied unevenly: the key's own units name the group's
            own = normalize_indices(idx, sum(len(u) for u in spread), f"module {key!r}")
            idx = [u for u, held in enumerate(spread) if set(held) & set(own)]
            log.info("module %r: its units %s are units %s of group %r", key, own, idx, g.name)
        chosen[g.name] = (g, idx)
    for name, (g, _) in chosen.items():
        if g.alternative_to is not None and g.alternative_to in chosen:
            raise PlanningError(
                f"{name!r} (query heads) and {g.alternative_to!r} (query groups) divide the same "
                "attention: give indices for one of them (remove whole query groups, or query "
                "heads from every group); for both, apply one plan, then plan the other on the "
                "pruned model")
    return list(chosen.values()), execution_order(groups)


def execution_order(groups: Sequence[GroupSpec]) -> dict[str, int]:
    """Group name -> rank in discovery order, which is the order the model executes them (an
    alternative group of a `GroupList` takes the rank of the group it replaces)."""
    order = {g.name: i for i, g in enumerate(groups)}
    for alt in getattr(groups, "alternatives", ()):
        if alt.alternative_to in order:
            order.setdefault(alt.name, order[alt.alternative_to])
    return order


def check_blocks(spec: GroupSpec, removed: Sequence[int]) -> None:
    """Refuse ``removed`` (sorted unit indices of ``spec``) when ``spec.blocks > 1`` and the
    equal contiguous blocks lose different counts (the query heads of grouped-query attention:
    every key/value head must keep the same number of query heads).

    Raises:
        PlanningError: naming the group, its roots and the count removed from each block.
    """
    b = getattr(spec, "blocks", 1)
    if not isinstance(b, int) or b <= 1 or not removed:
        return
    if spec.size % b:
        raise PlanningError(f"group {spec.name!r}: {spec.size} units do not form {b} equal blocks")
    per = spec.size // b
    counts = [0] * b
    for u in removed:
        counts[u // per] += 1
    if len(set(counts)) > 1:
        detail = ", ".join(f"{i}: {n}" for i, n in enumerate(counts))
        raise PlanningError(
            f"group {spec.name!r} ({', '.join(spec.roots)}): grouped-query attention needs every "
            f"key/value head to keep the same number of query heads, these indices remove "
            f"{detail} (key/value head: query heads removed; units {per}k to {per}k+{per - 1} "
            "belong to key/value head k)")


def _after(spec: GroupSpec, e: EditSpec, removed: list[int]) -> int:
    """The value of ``e``'s attribute once ``removed`` go; a `PlanningError` when nothing of
    it would stay (all the units of one part of a split)."""
    after = e.before - e.drop(removed)
    if after < 1:
        held = [u for u in range(spec.size) if e.amounts is None or e.amounts[u]]
        shown = ", ".join(map(str, held[:12])) + (", ..." if len(held) > 12 else "")
        raise PlanningError(
            f"group {spec.name!r}: these indices remove every unit that {e.module}."
            f"{e.attribute} (now {e.before}) counts, leaving it at {after}; keep at least one "
            f"of the units {shown}")
    return after


def build_plan(
    model: nn.Module,
    chosen: Sequence[tuple[GroupSpec, IndexLike]],
    provenance: Provenance | Mapping[str, Any] | None = None,
    *,
    order: Mapping[str, int] | None = None,
) -> PrunePlan:
    """Combine group descriptions with removed indices into a validated `PrunePlan`.

    Args:
        order: group name -> rank in the model's execution order (`execution_order` of the
            discovered groups). Without it, a group's rank is the position of its first root in
            ``model.named_modules()`` (the order the model defines its modules). The plan
            records the dense rank among its own groups (0, 1, ...), so that a plan does not
            depend on which other groups discovery found.

    Raises:
        PlanningError: bad indices (see `normalize_indices`), indices that remove every unit
            an attribute counts (all the units of one part of a split), or a slice names a
            tensor that is not in the state dict.
    """
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    buffer_names = _buffer_keys(model)
    if order is None:
        rank = {name: i for i, (name, _) in enumerate(model.named_modules())}
        order = {spec.name: rank.get(spec.roots[0] if spec.roots else spec.name, len(rank))
                 for spec, _ in chosen}
    ranked = sorted(chosen, key=lambda c: (order.get(c[0].name, len(order)), c[0].name))
    order = {spec.name: i for i, (spec, _) in enumerate(ranked)}
    touched: dict[str, list[int]] = {}
    groups = []
    for spec, idx in chosen:
        rem = normalize_indices(idx, spec.size, f"group {spec.name!r}")
        if not rem:
            continue
        check_blocks(spec, rem)
        k = len(rem)
        slices = []
        for s in spec.slices:
            if s.tensor not in shapes:
                raise PlanningError(f"group {spec.name!r}: tensor {s.tensor!r} is not in the state dict")
            touched[s.tensor] = shapes[s.tensor]
            slices.append(TensorSlice(tensor=s.tensor, axis=s.axis, map=IndexMap(**s.map_fields())))
        edits = [
            ModuleEdit(module=e.module, attribute=e.attribute, before=e.before,
                       after=_after(spec, e, rem))
            for e in spec.edits
        ]
        dropout = [
            DropoutChange(module=d.module, p_before=d.p, p_after=d.p * (1 - k / spec.size))
            for d in spec.dropouts
        ]
        groups.append(Group(name=spec.name, size=spec.size, removed=rem, slices=slices,
                            edits=edits, dropout=dropout, order=order.get(spec.name), kind=spec.kind))
    if provenance is None:
        provenance = Provenance()
    elif not isinstance(provenance, Provenance):
        provenance = Provenance(**dict(provenance))
    if provenance.library is None:
        from pruneplan import __version__

        provenance = provenance.model_copy(update={"library": f"pruneplan {__version__}",
                                                   "torch": torch.__version__})
    document = {
        "format": FORMAT,
        "version": required_version(groups, None),
        "model": ModelFingerprint(tensors=touched, digest=state_dict_digest(shapes),
                                  buffers=sorted(k for k in touched if k in buffer_names)).model_dump(),
        "groups": [g.model_dump() for g in groups],
        "provenance": provenance.model_dump(),
    }
    plan = PrunePlan.from_dict(document)
    config = hf_config_edits(model, plan)
    if config is not None:
        plan = PrunePlan.from_dict({**document, "version": required_version(groups, config),
                                    "config": config.model_dump()})
        for problem in config.problems():
            log.warning("the model's config cannot express this plan (applying it to a checkpoint "
                        "folder will be refused): %s", problem)
    log.info("planned %d groups touching %d tensors", len(plan.groups), len(touched))
    return plan


def _buffer_keys(model: nn.Module) -> set[str]:
    """State-dict keys that are buffers (running statistics), not parameters."""
    params = {id(p) for p in model.parameters()}
    return {k for k, v in model.state_dict(keep_vars=True).items() if id(v) not in params}
def hf_config_edits(model: nn.Module, plan: PrunePlan) -> ConfigEdits | None:
    """The config changes of ``plan`` for a model with a Hugging Face-style ``config``.

    Duck-typed: a model whose ``config`` has ``to_dict()`` (every `transformers` model); other
    models give ``None``. See `pruneplan.hf_config.config_edits`; the result is checked by
    building the model the rewritten config describes (`pruneplan._hf_verify.verify_config`):
    widths the name table misses are added when one config key holds them, and recorded as
    unsupported (the plan is then refused on a checkpoint folder) when none does.

    Raises:
        ConfigError: the plan leaves grouped-query attention uneven (naming the layer).
    """
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if not callable(to_dict):
        return None
    from pruneplan._hf_verify import verify_config

    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    edits = config_edits(to_dict(), shapes, plan, tied=tied_keys(model), saved_names=saved_names(model))
    return verify_config(model, plan, edits)


def saved_names(model: nn.Module) -> dict[str, str]:
    """State-dict key -> the name ``save_pretrained`` stores the tensor under, for every key
    that a `transformers` model saves under another name; ``{}`` for other models.

    transformers 5 loads some models' checkpoints through a weight conversion mapping (ViT's
    ``vit.encoder.layer.0.attention.attention.query`` becomes ``vit.layers.0.attention.q_proj``)
    and reverts it when saving. The names come from transformers' own
    ``revert_weight_conversion`` (what ``save_pretrained`` calls), run on empty ``meta``
    tensors shaped like the state dict, tied keys left out as ``save_pretrained`` leaves them
    out; a key counts as renamed when its tensor comes back unchanged under another name.
    Tensors the mapping converts (several merged or one split, e.g. Mixtral's experts) are no
    renaming: they are logged at WARNING, since a checkpoint folder then holds them in another
    form than the state dict, which the file appliers do not read. Raises nothing (a failure
    of transformers' function is logged and gives ``{}``).
    """
    tf = sys.modules.get("transformers")
    base = getattr(tf, "PreTrainedModel", None) if tf is not None else None
    if base is None or not isinstance(model, base):
        return {}
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: checkpoints are saved under the state-dict keys
        return {}
    tied = tied_keys(model)
    empty = {k: torch.empty(tuple(v.shape), dtype=v.dtype, device="meta")
             for k, v in model.state_dict().items() if k not in tied}
    by_id = {id(t): k for k, t in empty.items()}
    try:
        reverted = revert_weight_conversion(model, dict(empty))
    except Exception as exc:  # transformers' code: any failure gives no names
        log.warning("could not compute the names save_pretrained gives this model's tensors "
                    "(%s: %s); the plan records none", type(exc).__name__, exc)
        return {}
    out: dict[str, str] = {}
    for name, t in reverted.items():
        key = by_id.pop(id(t), None)
        if key is not None and key != name:
            out[key] = name
    converted = sorted(by_id.values())
    if converted:
        log.warning(
            "transformers saves %d tensors of this model converted, not renamed (e.g. %r): its "
            "checkpoint folder holds them in another form than the state dict, so a plan applies "
            "to the live model (then save_pretrained), not to that folder", len(converted),
            converted[0])
    return out
