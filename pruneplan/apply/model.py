"""Apply a plan to a live model and its optimizer, in place and atomically."""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from pruneplan.apply._slicing import check_fingerprint, keep_indices, slice_tensor
from pruneplan.apply.content import check_content as _check_content
from pruneplan.apply.content import needs_content, weights_digest
from pruneplan.errors import OptimizerStateError, PlanMismatchError
from pruneplan.plan import PrunePlan

__all__ = ["apply_plan"]

log = logging.getLogger(__name__)


@dataclass
class _Staged:
    """Everything a plan will change, computed before anything is changed."""

    params: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    buffers: list[tuple[nn.Module, str, torch.Tensor]] = field(default_factory=list)
    state: list[tuple[dict, str, torch.Tensor]] = field(default_factory=list)
    attrs: list[tuple[nn.Module, str, object]] = field(default_factory=list)


def apply_plan(
    model: nn.Module,
    plan: PrunePlan,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    check_digest: bool = True,
    check_content: str = "warn",
) -> nn.Module:
    """Prune ``model`` (and ``optimizer``'s state) in place as ``plan`` says; return ``model``.

    Every check runs before the first change: on any error the model and optimizer are as
    before. ``nn.Parameter`` objects are kept (optimizer references stay valid); their ``.grad``
    and every optimizer state tensor shaped like them are sliced the same way, in every param
    group; scalar state such as ``step`` is kept.

    Under ``DistributedDataParallel``, apply the plan to ``ddp.module`` on every rank and wrap
    the pruned module in a new ``DistributedDataParallel``: the old wrapper's gradient buckets
    were built for the unpruned sizes.

    ``check_digest`` also compares the digest of all state-dict names and shapes. When the plan
    records the content digest of the weights its metric scored, ``check_content`` says what
    happens if the model's weights differ: ``"warn"`` (a `WeightsContentWarning`; the default),
    ``"error"`` or ``"off"`` (skips hashing the weights).

    Raises:
        PlanMismatchError: shapes, module types or attribute values differ from the plan's,
            ``model`` is a ``DistributedDataParallel`` wrapper, or the weights' content differs
            and ``check_content="error"``.
        PlanError: ``check_content`` is not ``"warn"``, ``"error"`` or ``"off"``.
        OptimizerStateError: the optimizer holds state for a pruned parameter that is not
            shaped like the parameter.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise PlanMismatchError(
            "model is a DistributedDataParallel wrapper: apply the plan to ddp.module on every "
            "rank, then wrap the pruned module in a new DistributedDataParallel"
        )
    staged = _stage(model, plan, optimizer, check_digest)
    if needs_content(plan, check_content):
        _check_content(plan, weights_digest(model), "model", check_content)
    with torch.no_grad():
        for p, data, grad in staged.params:
            _replace_data(p, data)
            p.grad = grad
        for module, name, value in staged.buffers:
            module._buffers[name] = value
        for state, key, value in staged.state:
            state[key] = value
        for module, attr, value in staged.attrs:
            setattr(module, attr, value)
    log.info("applied plan %s: %d groups", plan.digest()[:12], len(plan.groups))
    return model


def _stage(
    model: nn.Module, plan: PrunePlan, optimizer: torch.optim.Optimizer | None, check_digest: bool
) -> _Staged:
    sd = model.state_dict(keep_vars=True)
    check_fingerprint(plan, {k: v.shape for k, v in sd.items()}, "model", check_digest)
    modules = dict(model.named_modules(remove_duplicate=False))
    keeps = keep_indices(plan)
    staged = _Staged()
    opt_state = _optimizer_state(optimizer)

    done: dict[int, tuple[str, list]] = {}
    for key, keep in keeps.items():
        owner, _, name = key.rpartition(".")
        module = modules.get(owner)
        if module is None:
            raise PlanMismatchError(f"model: no module {owner!r} holds tensor {key!r}")
        tensor = sd[key]
        if isinstance(tensor, nn.Parameter):
            if id(tensor) in done:
                if done[id(tensor)][1] != keep:
                    raise PlanMismatchError(
                        f"model: tensor {key!r} is shared with {done[id(tensor)][0]!r} but the "
                        "plan slices them differently"
                    )
                continue
            done[id(tensor)] = (key, keep)
            data = slice_tensor(tensor.detach(), keep)
            grad = None if tensor.grad is None else slice_tensor(tensor.grad, keep)
            staged.params.append((tensor, data, grad))
            state = opt_state.get(tensor)
            if state is not None:
                staged.state += _stage_state(key, tensor, state, keep)
        elif name in module._buffers:
            staged.buffers.append((module, name, slice_tensor(tensor.detach(), keep)))
        else:
            raise PlanMismatchError(f"model: tensor {key!r} is neither a parameter nor a buffer")

    for (mod_name, attr), (before, after) in plan.edits().items():
        module = _module(modules, mod_name)
        if not hasattr(module, attr):
            raise PlanMismatchError(
                f"model: module {mod_name!r} ({type(module).__name__}) has no attribute {attr!r}"
            )
        current = getattr(module, attr)
        as_tuple = isinstance(current, tuple | list)
        value = current[0] if as_tuple and len(current) == 1 else current
        if value != before:
            raise PlanMismatchError(
                f"model: {mod_name}.{attr} is {current!r}, the plan expects {before} "
                "(was the model already pruned?)"
            )
        staged.attrs.append((module, attr, (after,) if as_tuple else after))

    for mod_name, (before, after) in plan.dropout_changes().items():
        module = _module(modules, mod_name)
        p = getattr(module, "p", None)
        if not isinstance(p, float | int) or not math.isclose(p, before, abs_tol=1e-9):
            raise PlanMismatchError(
                f"model: dropout {mod_name!r} has rate {p!r}, the plan expects {before}"
            )
        staged.attrs.append((module, "p", after))
    _check_flat_state(optimizer, [p for p, _, _ in staged.params])
    return staged


def _check_flat_state(optimizer: torch.optim.Optimizer | None, pruned: list[nn.Parameter]) -> None:
    """Refuse optimizers whose state spans all parameters at once (LBFGS), not per parameter.

    LBFGS keeps flat vectors over every parameter (``d``, ``prev_flat_grad``, its history) under
    the first one and caches the total size; pruning any of its parameters would only fail at
    the next ``step()``.
    """
    if not isinstance(optimizer, torch.optim.LBFGS) or not pruned:
        return
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if not any(id(p) in ids for p in pruned):
        return
    if any(optimizer.state.values()) or getattr(optimizer, "_numel_cache", None) is not None:
        raise OptimizerStateError(
            "optimizer LBFGS keeps flat state over all its parameters ('d', 'prev_flat_grad', "
            "history): cannot slice it for a pruned parameter; prune before its first step or "
            "build a new LBFGS after pruning"
        )


def _replace_data(p: nn.Parameter, data: torch.Tensor) -> None:
    """Give ``p`` new data of another shape, keeping the Python object.

    ``torch.utils.swap_tensors`` also renews the autograd metadata, so a graph built before
    pruning (a loss still referenced) cannot pin the old shape in the gradient accumulator.
    Where swapping is impossible (another reference to the tensor's storage, weak references)
    it falls back to ``p.data = data``.
    """
    fresh = nn.Parameter(data, requires_grad=p.requires_grad)
    try:
        torch.utils.swap_tensors(p, fresh)
    except RuntimeError as exc:
        warnings.warn(
            f"pruneplan: a parameter of shape {list(p.shape)} is still held by a graph built "
            f"before pruning ({exc}); assigning .data instead. Drop outputs/losses computed "
            "before pruning, or the next backward may see the old shape.",
            stacklevel=4,
        )
        p.grad = None
        p.data = data


def _module(modules: dict[str, nn.Module], name: str) -> nn.Module:
    if name not in modules:
        raise PlanMismatchError(f"model: no module named {name!r}")
    return modules[name]


def _optimizer_state(optimizer: torch.optim.Optimizer | None) -> dict[nn.Parameter, dict]:
    if optimizer is None:
        return {}
    return {p: optimizer.state[p] for group in optimizer.param_groups for p in group["params"]
            if p in optimizer.state}


def _stage_state(key: str, p: nn.Parameter, state: dict, keep: list) -> list:
    out = []
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        if value.shape == p.shape:
            out.append((state, name, slice_tensor(value.detach(), keep)))
        elif value.dim() == 0 or (value.numel() == 1 and p.numel() != 1):
            continue  # scalar state such as `step`
        else:
            raise OptimizerStateError(
                f"optimizer state {name!r} of parameter {key!r} has shape {list(value.shape)}, "
                f"not the parameter's {list(p.shape)}: cannot slice it"
            )
    return out
