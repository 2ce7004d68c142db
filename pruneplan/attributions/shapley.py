"""Shapley values of units, estimated by Monte-Carlo sampling of permutations, fast.

Definitions. The *value* of a set S of units of ``z`` is the per-example loss of the network with
every unit outside S zeroed. For a removal order (a permutation p of the units), units are zeroed
one after the other starting from the intact network; the marginal contribution of unit ``p[k]``
is ``loss(p[:k+1] zeroed) - loss(p[:k] zeroed)``: the loss increase its removal causes (the loss
decrease it causes when added). Averaged over uniformly random permutations this is the unit's
Shapley value; positive means important. For one permutation the contributions telescope:
they sum to ``loss(all zeroed) - loss(none zeroed)`` (efficiency).

Speed. The network is split at the module (``torch.fx``; hook-based fallback). Per batch the part
before the module runs once; for the part after it, many masked copies of ``z`` (coalitions) are
stacked along the batch axis and evaluated in chunks sized to ``memory_budget_mb``. When the part
after ``z`` starts with unit-wise modules and a ``Linear``/``Conv`` (e.g. BN -> ReLU -> Conv, the
usual CNN block), the output of that linear layer is linear in the unit contributions, so along a
permutation it is updated by subtracting one unit's contribution at a time (a cumulative sum);
only the rest of the network runs per coalition. On CPU these small memory-bound steps run with
one intra-op thread each, chunks of examples in parallel Python threads (as many as
``torch.get_num_threads()``), so the criterion and any hooks on the modules after the linear
layer may be called from worker threads. All paths give the numbers of the plain full-model
estimator for the same permutations (to float rounding).

Hook fallback (model not traceable by fx): ``z`` is captured by a forward hook, and each chunk of
coalitions runs the *whole* model on the batch repeated K times with a hook that substitutes the
masked copies for the module's output. The part before the module is therefore recomputed for
every coalition, as in the plain estimator: the saving is only from batching coalitions (fewer,
larger calls), not from skipping work.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import nn

from ._split import Split, activation_bytes, fx_split
from .base import (
    AttributionMetric,
    Reduction,
    _with_shared_doc,
    batch_size_of,
    per_example_loss,
    repeat_batch,
    slice_batch,
    stack_rows,
    unit_axis,
)

__all__ = ["ShapleyAttributionMetric", "permutation_samples"]

logger = logging.getLogger(__name__)


_CONTRIB_BYTES = 32 * 2**20
_SEGMENT_BYTES = 16 * 2**20


@contextlib.contextmanager
def _single_thread(device: torch.device) -> Iterator[None]:
    """One intra-op thread on CPU for the loop of small memory-bound operations.

    Splitting a ~1 MB element-wise operation across threads costs more in synchronisation
    than it gains (measured 2-3x slower with 2 threads on a 2-core machine); the shortcut runs
    chunks of examples in parallel Python threads instead (torch releases the GIL). The
    previous thread count is restored on exit.
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def permutation_samples(
    n_units: int, n_samples: int, generator: np.random.Generator, antithetic: bool = False
) -> np.ndarray:
    """``(n_samples, n_units)`` removal orders; with ``antithetic`` each one is followed by its reverse."""
    if n_samples < 1:
        raise ValueError(f"sv_samples must be >= 1, got {n_samples}")
    if not antithetic:
        return np.stack([generator.permutation(n_units) for _ in range(n_samples)])
    rows = []
    for _ in range(math.ceil(n_samples / 2)):
        p = generator.permutation(n_units)
        rows += [p, p[::-1].copy()]
    return np.stack(rows[:n_samples])


class _StopForward(Exception):
    """Raised by a hook to stop a forward pass once the module's output is captured."""


def _repeat_extra(e: Any, times: int, batch: int) -> Any:
    if isinstance(e, torch.Tensor) and e.dim() > 0 and e.shape[0] == batch:
        return e.repeat(times, *([1] * (e.dim() - 1)))
    return e


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale))


@_with_shared_doc
class ShapleyAttributionMetric(AttributionMetric):
    """Monte-Carlo permutation estimate of each unit's Shapley value (positive = important).

    Removing a unit means zeroing it; the value is the per-example loss. See the module
    documentation for the definitions and how the estimate is made fast.

    Reference: Ancona et al., "Shapley value as principled metric for structured network
    pruning", 2020.

    Extra arguments:
        sv_samples: number of permutations (default 5); ``run(..., sv_samples=n)`` overrides it.
        seed: seed of the permutation generator; each module draws its permutations from its
            own generator seeded by (seed, module name), so its scores do not depend on the
            other modules scored in the same call.
        antithetic: each permutation is followed by its reverse (variance reduction).
        memory_budget_mb: target memory of one batched call of the part after the module
            (estimated as the sum of all its activations). Default: 64 on CPU, where larger
            calls were measured slower (allocation and cache misses), 1024 on other devices.
        split: ``"auto"`` (fx, else hooks), ``"fx"`` or ``"hooks"``.
        linear_shortcut: use the incremental update through the first linear layer after the
            module when the structure allows it (default ``True``).

    ``run`` also accepts ``permutations``: an explicit ``(samples, units)`` array of removal
    orders (as returned by :func:`permutation_samples`), used instead of random ones.
    """

    def __init__(
        self,
        model: nn.Module,
        data_generator: Iterable[Any],
        criterion: Callable[..., torch.Tensor],
        device: torch.device | str,
        reduction: Reduction = "mean",
        progress: bool = True,
        sv_samples: int = 5,
        seed: int | None = None,
        antithetic: bool = False,
        memory_budget_mb: float | None = None,
        split: str = "auto",
        linear_shortcut: bool = True,
        **method_kwargs: Any,
    ) -> None:
        super().__init__(model, data_generator, criterion, device, reduction, progress, **method_kwargs)
        if split not in ("auto", "fx", "hooks"):
            raise ValueError(f"split must be 'auto', 'fx' or 'hooks', got {split!r}")
        self.sv_samples = int(sv_samples)
        self.seed = seed
        self.antithetic = antithetic
        if memory_budget_mb is None:
            memory_budget_mb = 64.0 if self.device.type == "cpu" else 1024.0
        self.memory_budget = float(memory_budget_mb) * 2**20
        self.split = split
        self.linear_shortcut = linear_shortcut
        #: how the last module was evaluated: "fx+shortcut", "fx" or "hooks" (for tests, logs)
        self.last_path: str | None = None

    # ------------------------------------------------------------------ driver

    def _attribute(
        self,
        modules: list[nn.Module],
        batches: Iterator[tuple[Any, Any]],
        sv_samples: int | None = None,
        permutations: Any = None,
        **kwargs: Any,
    ) -> list[np.ndarray]:
        if kwargs:
            raise TypeError(f"{type(self).__name__}.run got unexpected arguments: {sorted(kwargs)}")
        n_samples = self.sv_samples if sv_samples is None else int(sv_samples)
        results = []
        for i, module in enumerate(modules):
            data = batches if i == 0 else self._batches()
            rng = self._module_rng(module, self.seed)
            results.append(self._attribute_one(module, data, rng, n_samples, permutations))
        return results

    def _attribute_one(
        self,
        module: nn.Module,
        batches: Iterator[tuple[Any, Any]],
        rng: np.random.Generator,
        n_samples: int,
        permutations: Any,
    ) -> np.ndarray:
        n_batches = self._n_batches()
        perms: np.ndarray | None = None
        engine: _Engine | None = None
        rows: list[torch.Tensor] = []
        bar = self._progress(None if n_batches is None else n_batches * n_samples, unit="perm")
        with torch.no_grad(), bar:
            for x, y in batches:
                if engine is None:
                    engine = self._engine(module, x, y)
                    self.last_path = engine.path
                z, extras, out_loss = engine.prefix(x, y)
                if perms is None:
                    n_units = int(z.shape[1])
                    if permutations is not None:
                        perms = np.asarray(permutations, dtype=np.int64)
                        if (
                            perms.ndim != 2
                            or perms.shape[1] != n_units
                            or not np.array_equal(
                                np.sort(perms, axis=1),
                                np.broadcast_to(np.arange(n_units), perms.shape),
                            )
                        ):
                            raise ValueError(
                                f"permutations must be an array of shape (samples, {n_units}) "
                                "whose rows are permutations of range(units)"
                            )
                    else:
                        perms = permutation_samples(n_units, n_samples, rng, self.antithetic)
                    perm_t = torch.as_tensor(perms, device=z.device)
                losses, base = engine.coalition_losses(z, extras, x, y, perm_t, bar)
                if out_loss is not None:
                    base = out_loss
                # losses: (S, C, B) after removing perm[:k+1]; contributions telescope
                prev = torch.cat([base.expand(losses.shape[0], 1, -1), losses[:, :-1]], 1)
                diffs = (losses - prev).double()
                sv = torch.zeros(z.shape[0], z.shape[1], dtype=torch.float64, device=z.device)
                for s in range(perm_t.shape[0]):
                    sv.index_add_(1, perm_t[s], diffs[s].t())
                rows.append((sv / perm_t.shape[0]).cpu())
        return stack_rows(rows)

    # ------------------------------------------------------------------ engines

    def _engine(self, module: nn.Module, x: Any, y: Any) -> _Engine:
        self._axis = unit_axis(module)
        if self.split in ("auto", "fx"):
            try:
                split = fx_split(self.model, module)
                engine = _FxEngine(self, split)
                engine.verify(x, y, module)
                return engine
            except Exception as exc:
                if self.split == "fx":
                    raise
                logger.warning(
                    "torch.fx split at %s failed (%s); using the hook-based fallback, which "
                    "recomputes the part before the module for every coalition",
                    type(module).__name__,
                    exc,
                )
        return _HookEngine(self, module)


class _Engine:
    path = ""

    def __init__(self, metric: ShapleyAttributionMetric) -> None:
        self.metric = metric
        self.model = metric.model
        # the module's unit axis: -1 for a Linear on a sequence (N, T, features). The engine
        # works on z with the units on axis 1 and moves them back before the rest of the model.
        self.axis = getattr(metric, "_axis", 1)
        self.budget = metric.memory_budget
        self.bytes_per_example: float | None = None

    def fwd(self, z: torch.Tensor) -> torch.Tensor:
        """The module's output with its units on axis 1."""
        return z.movedim(self.axis, 1) if self.axis != 1 and z.dim() > 2 else z

    def back(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of `fwd`: the layout the rest of the model reads."""
        return z.movedim(1, self.axis) if self.axis != 1 and z.dim() > 2 else z

    def loss(self, out: Any, y: Any, times: int) -> torch.Tensor:
        y_rep = repeat_batch(y, times) if times > 1 else y
        return per_example_loss(self.metric.criterion, out, y_rep).float()

    def prefix(self, x: Any, y: Any) -> tuple[torch.Tensor, list[Any], torch.Tensor | None]:
        raise NotImplementedError

    def run_masked(
        self, z: torch.Tensor, extras: list[Any], x: Any, y: Any, masks: torch.Tensor
    ) -> torch.Tensor:
        """Per-example losses ``(K, B)`` of the ``K`` coalitions given by ``masks`` ``(K, C)``."""
        raise NotImplementedError

    def _measure(self, z: torch.Tensor, extras: list[Any], x: Any) -> float:
        raise NotImplementedError

    def coalition_losses(
        self,
        z: torch.Tensor,
        extras: list[Any],
        x: Any,
        y: Any,
        perms: torch.Tensor,
        bar: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Losses ``(S, C, B)`` after each removal step, and the intact loss ``(B,)``."""
        n_perm, n_units = perms.shape
        batch = z.shape[0]
        if self.bytes_per_example is None:
            self.bytes_per_example = max(1.0, self._measure(z, extras, x) / batch)
        chunk = max(1, int(self.budget // (self.bytes_per_example * batch)))
        ranks = torch.empty_like(perms)
        ranks.scatter_(1, perms, torch.arange(n_units, device=perms.device).expand_as(perms))
        steps = torch.arange(n_units, device=perms.device)
        # mask[s, k, c] = 1 while unit c is still present after k+1 removals of permutation s
        masks = (ranks[:, None, :] > steps[None, :, None]).to(z.dtype).reshape(-1, n_units)
        masks = torch.cat([torch.ones(1, n_units, dtype=z.dtype, device=z.device), masks])
        out = torch.empty(masks.shape[0], batch, dtype=torch.float32, device=z.device)
        for start in range(0, masks.shape[0], chunk):
            stop = min(start + chunk, masks.shape[0])
            out[start:stop] = self.run_masked(z, extras, x, y, masks[start:stop])
            bar.update((stop - start) / n_units)
        return out[1:].reshape(n_perm, n_units, batch), out[0]


class _FxEngine(_Engine):
    def __init__(self, metric: ShapleyAttributionMetric, split: Split) -> None:
        super().__init__(metric)
        self.split = split
        self.shortcut = split.shortcut if metric.linear_shortcut and self.axis == 1 else None
        self.path = "fx+shortcut" if self.shortcut is not None else "fx"
        self.sc_sizes: tuple[int, int] | None = None

    def prefix(self, x: Any, y: Any) -> tuple[torch.Tensor, list[Any], None]:
        z, *extras = self.split.prefix(x)
        return self.fwd(z), extras, None

    def _extras(self, extras: list[Any], times: int, batch: int) -> list[Any]:
        return [_repeat_extra(e, times, batch) for e in extras]

    def _measure(self, z: torch.Tensor, extras: list[Any], x: Any) -> float:
        return activation_bytes(self.split.suffix, self.back(z), *extras)

    def run_masked(
        self, z: torch.Tensor, extras: list[Any], x: Any, y: Any, masks: torch.Tensor
    ) -> torch.Tensor:
        k, batch = masks.shape[0], z.shape[0]
        shape = (k, 1, masks.shape[1]) + (1,) * (z.dim() - 2)
        zs = (z.unsqueeze(0) * masks.reshape(shape)).reshape(k * batch, *z.shape[1:])
        out = self.split.suffix(self.back(zs), *self._extras(extras, k, batch))
        return self.loss(out, y, k).reshape(k, batch)

    def verify(self, x: Any, y: Any, module: nn.Module) -> None:
        """Check the split against the model on a few examples; drop the shortcut if it fails."""
        n = batch_size_of(x)
        x, y = slice_batch(x, 0, min(n, 3), n), slice_batch(y, 0, min(n, 3), n)
        with torch.no_grad():
            full = per_example_loss(self.metric.criterion, self.model(x), y).float()
            z, extras, _ = self.prefix(x, y)
            ones = torch.ones(2, z.shape[1], dtype=z.dtype, device=z.device)
            twice = self.run_masked(z, extras, x, y, ones)
            if not (_close(twice[0], full) and _close(twice[1], full)):
                raise ValueError("the fx split does not reproduce the model's loss")
            if self.shortcut is not None:
                try:
                    zero = self.run_masked(z, extras, x, y, torch.zeros_like(ones[:1]))[0]
                    perm = torch.arange(z.shape[1], device=z.device)[None]
                    steps, base = self._shortcut_losses(z, extras, y, perm, None)
                    ok = _close(base, full) and _close(steps[0, -1], zero)
                except Exception as exc:
                    logger.info("linear shortcut failed: %s", exc)
                    ok = False
                if not ok:
                    logger.info("linear shortcut disabled for %s", type(module).__name__)
                    self.shortcut = None
                    self.path = "fx"
                self.sc_sizes = None

    def coalition_losses(
        self,
        z: torch.Tensor,
        extras: list[Any],
        x: Any,
        y: Any,
        perms: torch.Tensor,
        bar: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.shortcut is None:
            return super().coalition_losses(z, extras, x, y, perms, bar)
        return self._shortcut_losses(z, extras, y, perms, bar)

    def _shortcut_losses(
        self, z: torch.Tensor, extras: list[Any], y: Any, perms: torch.Tensor, bar: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sc = self.shortcut
        assert sc is not None
        batch, n_units = z.shape[0], z.shape[1]
        n_perm = perms.shape[0]
        perm_list = perms.tolist()
        weight = sc.unit_weight()
        a0 = sc.apply_head(torch.zeros_like(z[:1]))
        losses = torch.empty(n_perm, n_units, batch, dtype=torch.float32, device=z.device)
        base_loss = torch.empty(batch, dtype=torch.float32, device=z.device)
        tail_extras = [extras[i] for i in sc.tail_extras]
        if self.sc_sizes is None:
            self.sc_sizes = self._shortcut_sizes(z, tail_extras)
        n_ex, seg = self.sc_sizes
        workers = torch.get_num_threads() if z.device.type == "cpu" else 1
        workers = max(1, min(workers, math.ceil(batch / n_ex)))
        local = threading.local()
        lock = threading.Lock()

        def locked_bar(n: float) -> None:
            with lock:
                bar.update(n)

        def process(start: int) -> None:
            with torch.no_grad():  # grad mode is thread-local
                process_chunk(start)

        def process_chunk(start: int) -> None:
            stop = min(start + n_ex, batch)
            ex = [slice_batch(e, start, stop, batch) for e in tail_extras]
            yc = slice_batch(y, start, stop, batch)
            a = sc.apply_head(z[start:stop])
            base = sc.linear_out(a)
            if not hasattr(local, "contrib"):
                # per-thread buffers reused across chunks: fresh large allocations are slow
                local.contrib = base.new_empty(n_units * base.numel())
                local.coal = base.new_empty(seg * base.numel())
                local.carry = base.new_empty(base.numel())
            carry = local.carry[: base.numel()].view(base.shape)
            contrib = sc.contributions(a - a0, weight, local.contrib)  # contrib[c]: (b, out, ...)
            base_loss[start:stop] = self.loss(sc.tail(base.clone(), *ex), yc, 1)
            self._permutation_loop(
                sc,
                base,
                contrib,
                carry,
                local.coal,
                seg,
                ex,
                yc,
                perm_list,
                losses,
                start,
                None if bar is None else locked_bar,
            )

        starts = list(range(0, batch, n_ex))
        # small memory-bound operations: parallel over chunks of examples, one thread each
        with _single_thread(z.device):
            if workers == 1:
                for start in starts:
                    process(start)
            else:
                with ThreadPoolExecutor(workers) as pool:
                    list(pool.map(process, starts))
        return losses, base_loss

    def _permutation_loop(
        self,
        sc: Any,
        base: torch.Tensor,
        contrib: torch.Tensor,
        carry: torch.Tensor,
        coal_buf: torch.Tensor,
        seg: int,
        ex: list[Any],
        yc: Any,
        perm_list: list[list[int]],
        losses: torch.Tensor,
        start: int,
        bar: Any,
    ) -> None:
        """Losses of every removal step of every permutation for one chunk of examples."""
        b, n_units, batch = base.shape[0], len(perm_list[0]), losses.shape[2]
        stop = start + b
        for s in range(len(perm_list)):
            prev = base
            for u0 in range(0, n_units, seg):
                u1 = min(u0 + seg, n_units)
                block = coal_buf[: (u1 - u0) * base.numel()].view(u1 - u0, *base.shape)
                # remove one more unit at a time: subtract its contribution
                for k in range(u1 - u0):
                    prev = torch.sub(prev, contrib[perm_list[s][u0 + k]], out=block[k])
                prev = carry.copy_(prev)  # the tail may work in place on ``block``
                out = sc.tail(
                    block.view((u1 - u0) * b, *base.shape[1:]),
                    *(_repeat_extra(e, u1 - u0, b) for e in ex),
                )
                losses[s, u0:u1, start:stop] = self.loss(out, yc, u1 - u0).view(u1 - u0, b)
                if bar is not None:
                    bar((u1 - u0) * b / (n_units * batch))

    def _shortcut_sizes(self, z: torch.Tensor, tail_extras: list[Any]) -> tuple[int, int]:
        """Examples per chunk and units per segment.

        Chunks of examples keep the contributions (units x linear output) within
        ``_CONTRIB_BYTES`` and segments of units keep one batched tail call within
        ``_SEGMENT_BYTES`` (cache-sized: these element-wise passes are memory-bound), both capped
        by the memory budget.
        """
        sc = self.shortcut
        assert sc is not None
        batch, n_units = z.shape[0], z.shape[1]
        one = sc.linear_out(sc.apply_head(z[:1]))
        out_bytes = one.numel() * one.element_size()
        tail_in = [slice_batch(e, 0, 1, batch) for e in tail_extras]
        tail_bytes = activation_bytes(sc.tail, one.clone(), *tail_in)
        contrib_limit = min(self.budget / 2, _CONTRIB_BYTES)
        segment_limit = min(self.budget / 2, _SEGMENT_BYTES)
        n_ex = max(1, min(batch, int(contrib_limit // (n_units * out_bytes))))
        seg = max(1, min(n_units, int(segment_limit // (n_ex * (out_bytes + tail_bytes)))))
        return n_ex, seg


class _HookEngine(_Engine):
    path = "hooks"

    def __init__(self, metric: ShapleyAttributionMetric, module: nn.Module) -> None:
        super().__init__(metric)
        self.module = module

    def prefix(self, x: Any, y: Any) -> tuple[torch.Tensor, list[Any], torch.Tensor]:
        captured: list[torch.Tensor] = []

        def hook(m: nn.Module, inputs: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"{type(m).__name__} must return a tensor")
            captured.append(output.detach().clone())

        handle = self.module.register_forward_hook(hook)
        try:
            loss = per_example_loss(self.metric.criterion, self.model(x), y).float()
        finally:
            handle.remove()
        if len(captured) != 1:
            raise ValueError(
                f"{type(self.module).__name__} module ran {len(captured)} times in one forward "
                "pass; Shapley values need a module that runs exactly once"
            )
        return self.fwd(captured[0]), [], loss

    def _measure(self, z: torch.Tensor, extras: list[Any], x: Any) -> float:
        total = 0

        def count(m: nn.Module, inputs: Any, output: Any) -> None:
            nonlocal total
            if isinstance(output, torch.Tensor):
                total += output.numel() * output.element_size()

        leaves = [m for m in self.model.modules() if not list(m.children())]
        handles = [m.register_forward_hook(count) for m in leaves]
        try:
            self.model(x)
        finally:
            for h in handles:
                h.remove()
        return float(total)

    def run_masked(
        self, z: torch.Tensor, extras: list[Any], x: Any, y: Any, masks: torch.Tensor
    ) -> torch.Tensor:
        k, batch = masks.shape[0], z.shape[0]
        shape = (k, 1, masks.shape[1]) + (1,) * (z.dim() - 2)
        zs = self.back((z.unsqueeze(0) * masks.reshape(shape)).reshape(k * batch, *z.shape[1:]))

        def substitute(m: nn.Module, inputs: Any, output: Any) -> torch.Tensor:
            if output.shape != zs.shape:
                raise ValueError("the module's output changed shape between passes")
            return zs

        handle = self.module.register_forward_hook(substitute)
        try:
            out = self.model(repeat_batch(x, k))
        finally:
            handle.remove()
        return self.loss(out, y, k).reshape(k, batch)
