"""Pruning under ``torch.distributed``: plan once, broadcast the plan, apply it on every rank.

The metrics combine their scores over the ranks by themselves (see
:class:`pruneplan.attributions.AttributionMetric`). What is left is to make one decision: the plan
is made on one rank and sent to the others as its canonical JSON (a plan is data; nothing is
pickled), so that :func:`pruneplan.apply_plan` gives identical models everywhere::

    broadcast_module(model)                # identical replicas (DDP leaves BN statistics apart)
    scores = TaylorAttributionMetric(model, loader, F.cross_entropy, device).run_all(names)
    plan = broadcast_plan(lambda: plan_pruning(model, select(scores), example_inputs=x))
    apply_plan(model, plan, optimizer=optimizer)
    ddp = DistributedDataParallel(model)   # re-wrap: DDP's buckets have the old sizes

This module imports torch, the plan model and the errors; no metric, graph or applier code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from pruneplan.errors import PlanningError, PlanValidationError
from pruneplan.plan import PrunePlan

__all__ = ["broadcast_module", "broadcast_plan"]

log = logging.getLogger(__name__)

_OK, _FAILED = 0, 1


def broadcast_plan(
    plan: PrunePlan | Callable[[], PrunePlan] | None,
    src: int = 0,
    group: Any = None,
) -> PrunePlan:
    """Send the plan made on rank ``src`` to every rank of ``group``; return it everywhere.

    Every rank of the group must call this. On ``src``, ``plan`` is the plan or a function
    making it (called on ``src`` only); other ranks pass ``None`` (a value they pass is ignored).
    If making the plan raises on ``src``, the error is raised there and a `PlanningError`
    naming it is raised on every other rank, so no rank is left waiting.
    Without an initialised process group (or with one rank) the plan is returned as is.

    Args:
        plan: the plan, a zero-argument function returning it, or ``None`` off ``src``.
        src: the rank (global numbering) that makes the plan.
        group: the process group (default: the world group).

    Returns:
        the plan, equal (same digest) on every rank.

    Raises:
        PlanningError: the plan could not be made on ``src``.
    """
    if _alone(group):
        return _make(plan)
    rank = dist.get_rank()
    device = _device(group)
    payload, error = b"", None
    if rank == src:
        try:
            made = _make(plan)
            payload = made.to_json().encode("utf-8")
        except Exception as exc:
            error = exc
            payload = f"{type(exc).__name__}: {exc}".encode()
    status = _FAILED if error is not None else _OK
    head = torch.tensor([status, len(payload)], dtype=torch.int64, device=device)
    dist.broadcast(head, src=src, group=group)
    status, length = (int(v) for v in head.cpu().tolist())
    buf = torch.zeros(length, dtype=torch.uint8)
    if rank == src:
        buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    buf = buf.to(device)
    dist.broadcast(buf, src=src, group=group)
    if error is not None:
        raise error
    text = bytes(buf.cpu().numpy()).decode("utf-8")
    if status == _FAILED:
        raise PlanningError(f"making the plan failed on rank {src}: {text}")
    received = PrunePlan.from_json(text)
    if received.to_json() != text:
        raise PlanValidationError(f"the plan received from rank {src} is not in canonical form")
    log.info("plan %s received from rank %d", received.digest()[:12], src)
    return received


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0, group: Any = None) -> torch.nn.Module:
    """Copy rank ``src``'s parameters and buffers into ``module`` on every rank, in place.

    Replicas trained with ``DistributedDataParallel`` share parameters but not necessarily
    buffers: DDP sends rank 0's buffers at the start of each forward pass, and each rank's last
    pass then updates its own BatchNorm statistics. Call this before attribution and pruning so
    every rank scores and prunes the same model. Tensors are updated in place (the
    ``nn.Parameter`` objects stay, so optimizers keep their references). Without an initialised
    process group it does nothing.

    Returns:
        ``module``.
    """
    if _alone(group):
        return module
    device = _device(group)
    tensors = [t for t in (*module.parameters(), *module.buffers())]
    for t in tensors:
        buf = t.detach()
        moved = buf if buf.device == device else buf.to(device)
        dist.broadcast(moved, src=src, group=group)
        if moved is not buf:
            buf.copy_(moved)
    return module


def _make(plan: PrunePlan | Callable[[], PrunePlan] | None) -> PrunePlan:
    made = plan() if callable(plan) else plan
    if not isinstance(made, PrunePlan):
        raise TypeError(f"broadcast_plan needs a PrunePlan (or a function returning one) on the source "
                        f"rank, got {type(made).__name__}")
    return made


def _alone(group: Any) -> bool:
    """No process group, or one of a single rank: nothing to send."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1


def _device(group: Any) -> torch.device:
    """CPU for gloo, the current CUDA device for NCCL (as the metrics' collectives choose;
    written twice because the attributions package depends on nothing of pruneplan)."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
