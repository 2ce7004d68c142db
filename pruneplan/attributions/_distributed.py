"""Attribution across processes: the collectives that give every rank the same scores.

Each rank scores its own batches; the per-unit sums and example counts (or, for
``reduction="none"`` and callable reductions, the per-example matrices in rank order) are then
combined with ``torch.distributed`` collectives. Before any data moves, the ranks exchange a
small status vector, so an error on one rank is raised on every rank instead of leaving the
others blocked in a collective.

This module imports only torch, numpy and the standard library.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["Collective", "resolve_group"]


def resolve_group(distributed: bool | None, group: Any) -> Any | None:
    """The process group to reduce over, or ``None`` to compute locally.

    Args:
        distributed: ``None`` (auto): reduce when ``torch.distributed`` is initialised and the
            group has more than one rank; ``True``: require it; ``False``: never reduce.
        group: a process group, or ``None`` for the default (world) group.
    """
    if distributed is False:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        if distributed:
            raise ValueError("distributed=True, but torch.distributed is not initialised")
        return None
    group = dist.group.WORLD if group is None else group
    size = dist.get_world_size(group)
    if size < 1:
        raise ValueError("this process is not a member of the process group given for attribution")
    if size == 1 and not distributed:
        return None
    return group


class Collective:
    """The few collectives attribution needs, on one process group.

    Tensors travel on the CPU for gloo and on the current CUDA device for NCCL.
    """

    def __init__(self, group: Any) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.src = dist.get_global_rank(group, 0)
        backend = str(dist.get_backend(group)).lower()
        if "nccl" in backend and "gloo" not in backend:
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")

    # ------------------------------------------------------------------ building blocks

    def _all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        t = t.to(self.device)
        out = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(out, t, group=self.group)
        return [o.cpu() for o in out]

    def _broadcast(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device)
        dist.broadcast(t, src=self.src, group=self.group)
        return t.cpu()

    # ------------------------------------------------------------------ status

    def check(self, error: BaseException | None, rows: Sequence[int], units: Sequence[int]) -> np.ndarray:
        """Exchange (failed, rows and units per module); raise on every rank if one failed.

        Returns:
            an ``(ranks, 2 * modules)`` array: rows of each module, then units of each module.
        """
        n = len(rows)
        if len(units) != n:
            raise ValueError("internal: rows and units of different lengths")
        local = torch.tensor([1 if error is not None else 0, n, *rows, *units], dtype=torch.int64)
        # the vector length depends on the number of modules: agree on it first
        lengths = self._all_gather(torch.tensor([local.numel()], dtype=torch.int64))
        if len({int(v) for v in lengths}) != 1:
            raise ValueError(
                "ranks asked to score different numbers of modules; every rank must call "
                "run/run_all with the same modules"
            )
        status = torch.stack(self._all_gather(local)).numpy()
        failed = [r for r in range(self.size) if status[r, 0]]
        if failed:
            messages: list[Any] = [None] * self.size
            text = None if error is None else f"{type(error).__name__}: {error}"
            dist.all_gather_object(messages, text, group=self.group)
            if error is not None:
                error.add_note(f"(attribution on rank {self.rank} of {self.size})")
                raise error
            details = "; ".join(f"rank {r}: {messages[r]}" for r in failed)
            raise RuntimeError(f"attribution failed on another rank ({details})")
        return status[:, 2:]

    # ------------------------------------------------------------------ reductions

    def units(self, shapes: np.ndarray, module: int, n_modules: int, name: str) -> int:
        """The unit count every rank with data agrees on; raise if they disagree or none has data."""
        rows, units = shapes[:, module], shapes[:, n_modules + module]
        seen = sorted({int(u) for r, u in zip(rows, units) if r > 0})
        if not seen:
            raise ValueError("data_generator yielded no batches on any rank")
        if len(seen) > 1:
            raise ValueError(f"ranks disagree on the number of units of {name!r}: {seen}")
        return seen[0]

    def sum(self, vectors: list[np.ndarray]) -> list[np.ndarray]:
        """Element-wise sum over ranks of several float64 vectors, in one collective."""
        sizes = [v.size for v in vectors]
        flat = torch.from_numpy(np.concatenate(vectors).astype(np.float64))
        flat = flat.to(self.device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        parts = np.split(flat.cpu().numpy(), np.cumsum(sizes)[:-1])
        return [p.copy() for p in parts]

    def gather_rows(self, matrix: np.ndarray, rows: Sequence[int], units: int) -> np.ndarray:
        """Concatenate every rank's ``(rows_r, units)`` matrix in rank order."""
        longest = max(int(r) for r in rows)
        padded = np.zeros((longest, units), dtype=np.float64)
        if matrix.shape[0]:
            padded[: matrix.shape[0]] = matrix
        parts = self._all_gather(torch.from_numpy(padded))
        return np.concatenate([p.numpy()[: int(r)] for p, r in zip(parts, rows)])

    def broadcast_arrays(
        self, arrays: list[np.ndarray] | None, error: BaseException | None
    ) -> list[np.ndarray]:
        """Rank 0's float64 arrays on every rank (other ranks pass ``None``)."""
        if self.rank == 0:
            assert arrays is not None or error is not None
            shapes = [] if arrays is None else [a.shape for a in arrays]
            header = [1 if error is not None else 0, len(shapes)]
            header += [d for s in shapes for d in (len(s), *s, *[0] * (2 - len(s)))]
        else:
            header = []
        # header: failed, count, then (ndim, d0, d1) per array; agree on its length first
        length = self._broadcast(torch.tensor([len(header)], dtype=torch.int64))
        buf = torch.zeros(int(length), dtype=torch.int64)
        if self.rank == 0:
            buf[:] = torch.tensor(header, dtype=torch.int64)
        head = self._broadcast(buf).tolist()
        if head[0]:
            message = [None if error is None else f"{type(error).__name__}: {error}"]
            dist.broadcast_object_list(message, src=self.src, group=self.group)
            if error is not None:
                raise error
            raise RuntimeError(f"attribution failed on another rank (rank 0: {message[0]})")
        shapes = [tuple(head[2 + 3 * i + 1 : 2 + 3 * i + 1 + head[2 + 3 * i]]) for i in range(head[1])]
        total = sum(int(np.prod(s)) for s in shapes)
        data = torch.zeros(total, dtype=torch.float64)
        if self.rank == 0:
            assert arrays is not None
            data[:] = torch.from_numpy(np.concatenate([a.ravel() for a in arrays]).astype(np.float64))
        flat = self._broadcast(data).numpy()
        out, start = [], 0
        for s in shapes:
            size = int(np.prod(s))
            out.append(flat[start : start + size].reshape(s).copy())
            start += size
        return out

    def replicas_differ(self, model: torch.nn.Module) -> bool:
        """Whether the ranks hold different parameters or buffers (compared by checksums).

        Each tensor contributes its sum and its sum of absolute values in float64; they are
        compared with a relative tolerance of 1e-9, so summation order does not matter.
        """
        with torch.no_grad():
            sums = [
                torch.stack([t.double().sum(), t.double().abs().sum()]).cpu()
                for t in (*model.parameters(), *model.buffers())
                if t.is_floating_point() and t.numel()
            ]
        local = torch.cat([torch.tensor([float(len(sums))], dtype=torch.float64), *sums])
        lengths = self._all_gather(torch.tensor([local.numel()], dtype=torch.int64))
        if len({int(v) for v in lengths}) != 1:
            return True
        gathered = self._all_gather(local)
        return not all(torch.allclose(g, gathered[0], rtol=1e-9, atol=0) for g in gathered[1:])

    def shared_seed(self) -> int:
        """A fresh random seed drawn on rank 0, the same on every rank."""
        seed = secrets.randbits(62) if self.rank == 0 else 0
        return int(self._broadcast(torch.tensor([seed], dtype=torch.int64)).item())
