"""The base class of every attribution metric: shared machinery and shared documentation.

An attribution metric scores the *units* of a module: the output features of a ``Linear``, the
output channels of a ``Conv``; in general the entries of axis 1 of the module's output ``z``.
Data-driven metrics compute one score per example and per unit (convolutional scores are summed
over spatial positions) and then reduce the ``(N, units)`` matrix over the examples.

This module imports only torch, numpy, tqdm and the standard library.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ._distributed import Collective, resolve_group

__all__ = ["AttributionMetric", "CriterionMismatchError", "Reduction"]

logger = logging.getLogger(__name__)

Reduction = str | Callable[[np.ndarray], np.ndarray]
ModuleRef = nn.Module | str

#: Modules the evaluation point moves past with ``find_best_evaluation_module=True``: they
#: directly consume the module's output and act on each unit separately.
PASS_THROUGH_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Softplus,
    nn.Softsign,
    nn.LogSigmoid,
    nn.Tanhshrink,
    nn.Threshold,
)

_SHARED_DOC = """
    Args:
        model: the network; it must already live on ``device``. It is left exactly as found:
            training flags, parameters, buffers, ``.grad`` fields and hooks are restored when
            ``run`` returns or raises. Attribution runs in eval mode.
        data_generator: any iterable of ``(x, y)`` batches (a ``DataLoader`` with any sampler or
            ``drop_last``, a list, an object whose ``__iter__`` is a generator). Its length is
            never assumed. Tensors (also inside tuples, lists and dicts) are moved to ``device``.
        criterion: loss function called as ``criterion(output, target, reduction="none")``; it
            must return per-example losses (extra axes are averaged per example). Each example's
            gradient is that of its own loss, so scores do not depend on the batch size.
        device: where batches are sent.
        reduction: how the ``(N, units)`` per-example score matrix is reduced over examples:
            ``"mean"`` (default), ``"sum"``, ``"none"`` (return the matrix itself) or a callable
            taking the matrix and returning one score per unit (e.g. mean + 2 * std).
        progress: show a tqdm progress bar (default ``True``; only on rank 0 when distributed).
        distributed: ``None`` (default): when ``torch.distributed`` is initialised with more than
            one rank, each rank scores its own batches (e.g. from a ``DistributedSampler``) and
            the results are combined so that every rank returns the same scores: per-unit sums
            and example counts are all-reduced (``"mean"``, ``"sum"``), the per-example matrix
            is gathered in rank order (``"none"``, callables). Every rank of the group must
            then call ``run``/``run_all`` with the same modules. ``False``: score locally only.
            ``True``: require an initialised process group.
        process_group: the group to combine over (default: the world group).
"""


def _with_shared_doc(cls: type) -> type:
    """Append the constructor arguments shared by every metric to the class docstring."""
    cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n" + _SHARED_DOC
    return cls


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Move every tensor in ``obj`` (tensors, tuples, lists, dicts) to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return type(obj)({k: to_device(v, device) for k, v in obj.items()})  # type: ignore[call-arg]
    if isinstance(obj, (list, tuple)):
        moved = [to_device(v, device) for v in obj]
        return type(obj)(*moved) if hasattr(obj, "_fields") else type(obj)(moved)
    return obj


def repeat_batch(obj: Any, times: int) -> Any:
    """Stack ``times`` copies of a batch along axis 0 (copy-major: copy k is rows k*B:(k+1)*B).

    Tensors are always copied, also for ``times=1``, so in-place operations cannot leak back.
    """
    if isinstance(obj, torch.Tensor):
        if obj.dim() == 0:
            return obj
        return obj.repeat(times, *([1] * (obj.dim() - 1)))
    if isinstance(obj, Mapping):
        return type(obj)({k: repeat_batch(v, times) for k, v in obj.items()})  # type: ignore[call-arg]
    if isinstance(obj, (list, tuple)):
        moved = [repeat_batch(v, times) for v in obj]
        return type(obj)(*moved) if hasattr(obj, "_fields") else type(obj)(moved)
    return obj


def slice_batch(obj: Any, start: int, stop: int, batch_size: int) -> Any:
    """Rows ``start:stop`` of every tensor of a batch whose axis 0 has ``batch_size`` entries."""
    if isinstance(obj, torch.Tensor):
        return obj[start:stop] if obj.dim() > 0 and obj.shape[0] == batch_size else obj
    if isinstance(obj, Mapping):
        return type(obj)(  # type: ignore[call-arg]
            {k: slice_batch(v, start, stop, batch_size) for k, v in obj.items()}
        )
    if isinstance(obj, (list, tuple)):
        moved = [slice_batch(v, start, stop, batch_size) for v in obj]
        return type(obj)(*moved) if hasattr(obj, "_fields") else type(obj)(moved)
    return obj


def batch_size_of(obj: Any) -> int:
    """Number of examples in a batch: axis 0 of its first tensor."""
    if isinstance(obj, torch.Tensor):
        return int(obj.shape[0])
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for v in obj:
            with contextlib.suppress(ValueError):
                return batch_size_of(v)
    raise ValueError(f"cannot find the batch size of an input of type {type(obj).__name__}")


def per_example_loss(criterion: Callable[..., torch.Tensor], output: Any, target: Any) -> torch.Tensor:
    """Per-example losses, shape ``(N,)``: ``criterion(..., reduction="none")``, extra axes averaged.

    Averaging the extra axes makes an example's loss equal to ``criterion(..., reduction="mean")``
    on a batch holding that example alone. A model output with a ``logits`` tensor (a Hugging
    Face ``ModelOutput``) is passed as its logits, unless the criterion has a true
    ``accepts_model_output`` attribute.

    Raises:
        CriterionMismatchError: the criterion raises on these outputs and targets
            (`criterion_error`).
    """
    if not isinstance(output, torch.Tensor) and isinstance(getattr(output, "logits", None), torch.Tensor) \
            and not getattr(criterion, "accepts_model_output", False):
        output = output.logits  # a Hugging Face ModelOutput: the criterion sees the logits
    try:
        loss = criterion(output, target, reduction="none")
    except CriterionMismatchError:
        raise
    except Exception as exc:
        raise criterion_error(criterion, output, target, exc) from exc
    if not isinstance(loss, torch.Tensor) or loss.dim() == 0:
        raise ValueError(
            "criterion(output, target, reduction='none') must return one loss per example; "
            f"got {type(loss).__name__} of shape {getattr(loss, 'shape', None)}"
        )
    if loss.dim() > 1:
        loss = loss.reshape(loss.shape[0], -1).mean(1)
    return loss


class CriterionMismatchError(ValueError):
    """The criterion raised on the model's outputs and the data's targets (``cross_entropy`` with
    one target per token, a shape mismatch); the message names the criterion and the shapes,
    ``__cause__`` is the criterion's own exception. `pruneplan.plan_from_metric` turns it into a
    `pruneplan.CriterionError`."""


def _described(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} {list(value.shape)}"
    return type(value).__name__


def criterion_error(criterion: Callable[..., Any] | str, output: Any, target: Any,
                    exc: BaseException) -> CriterionMismatchError:
    """The `CriterionMismatchError` for ``criterion(output, target)`` having raised ``exc``: the
    criterion's name, the outputs' and targets' dtypes and shapes and the criterion's message;
    ``cross_entropy`` on ``[N, T, V]`` outputs with integer ``[N, T]`` targets (one per token: it
    would read axis 1 as the classes) says so and points to the ``causal_lm`` criterion."""
    name = criterion if isinstance(criterion, str) else getattr(criterion, "__name__",
                                                                 type(criterion).__name__)
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    why = f"{type(exc).__name__}: {text if len(text) <= 300 else text[:300] + '...'}"
    if name == "cross_entropy" and isinstance(output, torch.Tensor) and isinstance(target, torch.Tensor) \
            and output.dim() == 3 and target.shape == output.shape[:2] and not target.is_floating_point():
        dtype = str(target.dtype).removeprefix("torch.")
        return CriterionMismatchError(
            f"criterion 'cross_entropy' needs outputs [N, classes] and targets [N] (here N = "
            f"{output.shape[0]}); the model gives outputs {list(output.shape)} and the data {dtype} "
            f"targets {list(target.shape)}, one per token (cross_entropy would read axis 1, of size "
            f"{output.shape[1]}, as the classes: {why}); for next-token targets use the causal_lm "
            "criterion")
    return CriterionMismatchError(f"criterion {name!r} does not fit the model's outputs "
                                  f"({_described(output)}) and the targets ({_described(target)}): {why}")


@contextlib.contextmanager
def unfused_attention() -> Iterator[None]:
    """Torch's fused attention path (``torch.backends.mha``) off: it skips the hooks of the
    layers it fuses (``nn.TransformerEncoderLayer``'s ``linear1``/``linear2`` in eval mode
    without grad), so they could not be scored."""
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def unit_axis(module: nn.Module) -> int:
    """The axis of a module's output that holds its units: 1, or -1 for channels-last modules.

    ``Linear``, ``Embedding``, ``LayerNorm``, RMSNorms (by class name), GPT-2's ``Conv1D``
    (duck-typed: an integer ``nf``) and modules with ``features_last = True`` put their
    features on the last axis, so on a sequence
    ``(N, T, features)`` the units are the last axis; convolutions put them on axis 1.
    """
    if isinstance(module, nn.Linear | nn.Embedding | nn.LayerNorm | nn.Bilinear):
        return -1
    if getattr(module, "features_last", False) is True:  # a module that says so (pruneplan's
        return -1  # HeadsOutput: the outputs of attention heads, (N, L, heads * head_dim))
    if isinstance(getattr(module, "nf", None), int) or "RMSNorm" in type(module).__name__:
        return -1
    return 1


def channels_first(t: torch.Tensor, axis: int) -> torch.Tensor:
    """``t`` with its unit axis moved to axis 1 (a view; unchanged when already there)."""
    if axis == 1 or t.dim() <= 2:
        return t
    return t.movedim(axis, 1)


def unit_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a ``(N, units, *spatial)`` tensor over its spatial axes -> ``(N, units)``."""
    if t.dim() < 2:
        raise ValueError(f"an activation needs a batch and a unit axis, got shape {tuple(t.shape)}")
    return t.flatten(2).sum(-1) if t.dim() > 2 else t


def stack_rows(rows: list[torch.Tensor]) -> np.ndarray:
    """Concatenate per-batch ``(B, units)`` score blocks; ``(0, 0)`` when there were no batches."""
    return torch.cat(rows).numpy() if rows else np.zeros((0, 0))


def reduce_scores(matrix: np.ndarray, reduction: Reduction) -> np.ndarray:
    """Reduce an ``(N, units)`` score matrix over examples."""
    if callable(reduction):
        out = np.asarray(reduction(matrix))
        if out.shape != matrix.shape[1:]:
            raise ValueError(
                f"a callable reduction must return one score per unit, shape {matrix.shape[1:]}, "
                f"got {out.shape}"
            )
        return out
    if reduction == "mean":
        return matrix.mean(0)
    if reduction == "sum":
        return matrix.sum(0)
    if reduction == "none":
        return matrix
    raise ValueError(f"reduction must be 'mean', 'sum', 'none' or a callable, got {reduction!r}")


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode and restore it exactly on exit (also on an exception).

    Restores every module's ``training`` flag, the binding and value of every buffer, the binding
    of every parameter and its ``.grad`` and ``requires_grad``, and the hook dictionaries (any hook
    left behind by an interrupted run is removed).
    """
    modules = list(model.modules())
    flags = [m.training for m in modules]
    params = [(m, dict(m._parameters)) for m in modules]
    grads = {id(p): (p, p.grad, p.requires_grad) for p in model.parameters()}
    versions = {id(p): (p, p._version) for p in model.parameters()}
    buffers = [
        (
            m,
            {k: (b, None if b is None else (b.detach().clone(), b._version)) for k, b in m._buffers.items()},
        )
        for m in modules
    ]
    hook_dicts = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_backward_hooks",
        "_backward_pre_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_forward_pre_hooks_with_kwargs",
    )
    hooks = [(m, {h: dict(getattr(m, h)) for h in hook_dicts if hasattr(m, h)}) for m in modules]
    attrs = [(m, set(m.__dict__)) for m in modules]
    try:
        model.eval()
        yield
    finally:
        for m, f in zip(modules, flags):
            m.training = f
        for m, saved in params:
            m._parameters.clear()
            m._parameters.update(saved)
        for p, g, rg in grads.values():
            p.grad = g
            if p.requires_grad != rg:
                p.requires_grad_(rg)
        for m, saved in buffers:
            m._buffers.clear()
            for k, (b, snapshot) in saved.items():
                m._buffers[k] = b
                if b is not None and snapshot is not None and b._version != snapshot[1]:
                    with torch.no_grad():
                        b.copy_(snapshot[0])
        for m, saved in hooks:
            for name, d in saved.items():
                current = getattr(m, name)
                for key in list(current):
                    if key not in d:
                        del current[key]
        for m, names in attrs:
            for extra in set(m.__dict__) - names:
                delattr(m, extra)
        for p, v in versions.values():
            if p._version != v:
                logger.warning("a parameter was modified in place during attribution")


class _CallRecorder:
    """Forward hooks on every leaf module recording, in execution order, inputs and output."""

    def __init__(self, model: nn.Module, also: Sequence[nn.Module] = ()) -> None:
        self.records: list[tuple[nn.Module, tuple[Any, ...], Any]] = []
        self.handles = [
            m.register_forward_hook(self._hook)
            for m in model.modules()
            if not list(m.children()) or any(m is a for a in also)
        ]

    def _hook(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        self.records.append((module, inputs, output))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class AttributionMetric:
    """Base class of the attribution metrics: scores the units of a module.

    Subclasses implement :meth:`_attribute`, which computes the ``(N, units)`` per-example score
    matrices of several evaluation modules in one pass over the data, or override :meth:`run`
    for metrics that need no data.
    """

    #: whether the metric reads data; data-free metrics implement :meth:`_static_scores` and
    #: ignore ``find_best_evaluation_module``
    uses_data = True

    def __init__(
        self,
        model: nn.Module,
        data_generator: Iterable[Any],
        criterion: Callable[..., torch.Tensor],
        device: torch.device | str,
        reduction: Reduction = "mean",
        progress: bool = True,
        *,
        distributed: bool | None = None,
        process_group: Any = None,
        **method_kwargs: Any,
    ) -> None:
        if method_kwargs:
            raise TypeError(f"{type(self).__name__} got unexpected arguments: {sorted(method_kwargs)}")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise TypeError(
                "pass the module inside DistributedDataParallel (ddp.module): the wrapper would "
                "synchronise buffers and gradients on each of attribution's forward passes, "
                "which ranks make in different numbers"
            )
        if not (callable(reduction) or reduction in ("mean", "sum", "none")):
            raise ValueError(f"reduction must be 'mean', 'sum', 'none' or a callable, got {reduction!r}")
        self.model = model
        self.data_generator = data_generator
        self.criterion = criterion
        self.device = torch.device(device)
        self.reduction = reduction
        self.progress = progress
        self.distributed = distributed
        self.process_group = process_group
        #: the collectives of the run in progress (``None``: local run)
        self._collective: Collective | None = None

    # ------------------------------------------------------------------ public API

    def run(self, module: ModuleRef, find_best_evaluation_module: bool = False, **kwargs: Any) -> np.ndarray:
        """Score the units of ``module`` (an ``nn.Module`` of the model or its dotted name).

        Returns an array of length ``z.shape[1]``, z being the output of ``module`` (or of the
        evaluation module), or the ``(N, units)`` matrix when ``reduction="none"``.
        """
        name, _ = self._resolve(module)
        return self.run_all([module], find_best_evaluation_module, **kwargs)[name]

    def run_all(
        self,
        modules: Sequence[ModuleRef],
        find_best_evaluation_module: bool = False,
        **kwargs: Any,
    ) -> dict[str, np.ndarray]:
        """Score many modules; data-driven metrics do it in one pass over the data.

        Returns ``{dotted module name: scores}`` with the names of ``model.named_modules()``.
        """
        resolved = [self._resolve(m) for m in modules]
        if not resolved:
            return {}
        group = resolve_group(self.distributed, self.process_group)
        if group is not None:
            return self._run_distributed(Collective(group), resolved, find_best_evaluation_module, kwargs)
        if not self.uses_data:
            return self._run_static(resolved, kwargs)
        with preserved_state(self.model):
            matrices = self._local_matrices(resolved, find_best_evaluation_module, kwargs)
        return {name: reduce_scores(matrix, self.reduction) for (name, _), matrix in zip(resolved, matrices)}

    # ------------------------------------------------------------------ one run

    def _run_static(
        self, resolved: list[tuple[str, nn.Module]], kwargs: dict[str, Any]
    ) -> dict[str, np.ndarray]:
        if kwargs:
            raise TypeError(f"{type(self).__name__}.run got unexpected arguments: {sorted(kwargs)}")
        with preserved_state(self.model):
            return {
                name: reduce_scores(self._static_scores(name, m)[None, :], self.reduction)
                for name, m in resolved
            }

    def _local_matrices(
        self,
        resolved: list[tuple[str, nn.Module]],
        find_best_evaluation_module: bool,
        kwargs: dict[str, Any],
    ) -> list[np.ndarray]:
        """The ``(N, units)`` score matrices of this process's batches (in ``preserved_state``)."""
        batches = self._batches()
        targets = [m for _, m in resolved]
        # the unit axis is the scored module's, also where an activation after it is evaluated
        self._unit_axes = [unit_axis(m) for m in targets]
        with unfused_attention():
            if find_best_evaluation_module:
                first = next(batches, None)
                if first is not None:  # None: a rank without batches in a distributed run
                    batches = itertools.chain([first], batches)
                    targets = self._find_evaluation_modules(targets, first[0])
            return self._attribute(targets, batches, **kwargs)

    def _run_distributed(
        self,
        comm: Collective,
        resolved: list[tuple[str, nn.Module]],
        find_best_evaluation_module: bool,
        kwargs: dict[str, Any],
    ) -> dict[str, np.ndarray]:
        """Score this rank's batches, then combine over the process group.

        Data-free metrics are computed on the group's rank 0 and broadcast. Otherwise every
        rank computes its matrices; ``"mean"`` and ``"sum"`` all-reduce per-unit sums and
        example counts, ``"none"`` and callables gather the matrices in rank order.
        """
        seed_was = getattr(self, "seed", 0)
        self._collective = comm
        try:
            if comm.replicas_differ(self.model):
                logger.warning(
                    "the model differs across ranks (BatchNorm statistics after DDP training?): "
                    "each rank scores its own copy; call pruneplan.distributed.broadcast_module"
                    "(model) first to score one model"
                )
            if seed_was is None:  # unseeded: every rank must still draw the same numbers
                self.seed = comm.shared_seed()
            if not self.uses_data:
                scores, error = None, None
                if comm.rank == 0:
                    try:
                        scores = list(self._run_static(resolved, kwargs).values())
                    except Exception as exc:
                        error = exc
                arrays = comm.broadcast_arrays(scores, error)
                return {name: a for (name, _), a in zip(resolved, arrays)}
            matrices: list[np.ndarray] = []
            error = None
            try:
                with preserved_state(self.model):
                    matrices = self._local_matrices(resolved, find_best_evaluation_module, kwargs)
            except Exception as exc:
                error = exc
            rows = [m.shape[0] for m in matrices] or [0] * len(resolved)
            units = [m.shape[1] if m.shape[0] else 0 for m in matrices] or [0] * len(resolved)
            shapes = comm.check(error, rows, units)
            n = len(resolved)
            counts = [comm.units(shapes, i, n, name) for i, (name, _) in enumerate(resolved)]
            matrices = [m if m.shape[0] else np.zeros((0, u)) for m, u in zip(matrices, counts)]
            if self.reduction in ("mean", "sum"):
                sums = comm.sum([m.sum(0) for m in matrices])
                if self.reduction == "sum":
                    return {name: s for (name, _), s in zip(resolved, sums)}
                totals = shapes[:, :n].sum(0)
                return {name: s / totals[i] for i, ((name, _), s) in enumerate(zip(resolved, sums))}
            return {
                name: reduce_scores(comm.gather_rows(m, shapes[:, i], counts[i]), self.reduction)
                for i, ((name, _), m) in enumerate(zip(resolved, matrices))
            }
        finally:
            self._collective = None
            if seed_was is None:
                self.seed = None

    # ------------------------------------------------------------------ for subclasses

    def _attribute(
        self, modules: list[nn.Module], batches: Iterator[tuple[Any, Any]], **kwargs: Any
    ) -> list[np.ndarray]:
        """Return one ``(N, units)`` score matrix per evaluation module."""
        raise NotImplementedError

    def _static_scores(self, name: str, module: nn.Module) -> np.ndarray:
        """Scores of a data-free metric, shape ``(units,)``."""
        raise NotImplementedError

    def _axes(self, modules: list[nn.Module]) -> list[int]:
        """The unit axis of each evaluation module's output (see `unit_axis`)."""
        axes = getattr(self, "_unit_axes", None)
        if axes is not None and len(axes) == len(modules):
            return list(axes)
        return [unit_axis(m) for m in modules]

    def _resolve(self, module: ModuleRef) -> tuple[str, nn.Module]:
        """Dotted name and module object of a module reference."""
        if isinstance(module, str):
            try:
                return module, self.model.get_submodule(module)
            except AttributeError as exc:
                raise ValueError(f"the model has no module named {module!r}") from exc
        for name, m in self.model.named_modules():
            if m is module:
                return name, m
        raise ValueError(f"{type(module).__name__} module is not part of the model")

    def _module_rng(self, module: nn.Module, seed: int | None) -> np.random.Generator:
        """A generator for one module: seeded by (seed, module name), so a module's scores do
        not depend on which other modules are scored in the same call."""
        if seed is None:
            return np.random.default_rng()
        name, _ = self._resolve(module)
        return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])

    def _n_batches(self) -> int | None:
        try:
            return len(self.data_generator)  # type: ignore[arg-type]
        except TypeError:
            return None

    def _batches(self) -> Iterator[tuple[Any, Any]]:
        """Yield ``(x, y)`` batches moved to the device; raise if there are none.

        In a distributed run a rank may have no batches (the check is then made over all ranks).
        """
        empty = True
        for batch in self.data_generator:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise ValueError("data_generator must yield (x, y) pairs")
            empty = False
            yield to_device(batch[0], self.device), to_device(batch[1], self.device)
        if empty and self._collective is None:
            raise ValueError(
                "data_generator yielded no batches (a generator object can be iterated only "
                "once: pass a list, a DataLoader or an object whose __iter__ starts over)"
            )

    def _progress(self, total: int | None, unit: str = "batch") -> tqdm:
        return tqdm(
            total=total,
            desc=type(self).__name__,
            unit=unit,
            disable=not self.progress or (self._collective is not None and self._collective.rank != 0),
            leave=False,
        )

    def _find_evaluation_modules(self, modules: list[nn.Module], x: Any) -> list[nn.Module]:
        """Follow the executed graph from each module past BatchNorm and element-wise activations.

        One forward pass on ``x`` records every leaf module call in execution order; from the
        module's output tensor we move to the single leaf module that consumes it if that is a
        BatchNorm or an element-wise activation, and repeat.
        """
        recorder = _CallRecorder(self.model, modules)
        try:
            with torch.no_grad():
                self.model(x)
        finally:
            recorder.remove()
        records = recorder.records
        found = []
        for module in modules:
            idx = [i for i, (m, _, _) in enumerate(records) if m is module]
            if len(idx) != 1:
                logger.info("module called %d times; evaluation point not moved", len(idx))
                found.append(module)
                continue
            i = idx[0]
            current = module
            while True:
                out = records[i][2]
                consumers = [j for j in range(i + 1, len(records)) if any(a is out for a in records[j][1])]
                if len(consumers) != 1 or not isinstance(records[consumers[0]][0], PASS_THROUGH_TYPES):
                    break
                i = consumers[0]
                current = records[i][0]
            found.append(current)
        return found


class ActivationCapture:
    """Forward hooks capturing the output of each evaluation module, once per forward pass.

    With ``grad=True`` the captured output is made differentiable when nothing upstream is, and,
    if ``clone`` is set, the module passes a copy downstream so that in-place operations after it
    cannot alter the captured tensor.
    """

    def __init__(
        self,
        modules: list[nn.Module],
        on_output: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
        grad: bool = False,
        clone: bool = False,
    ) -> None:
        self.outputs: list[list[torch.Tensor]] = [[] for _ in modules]
        self.versions: list[list[int]] = [[] for _ in modules]
        self.grad = grad
        self.clone = clone
        self.on_output = on_output
        self.handles = []
        for i, m in enumerate(modules):
            self.handles.append(m.register_forward_hook(self._make_hook(i)))

    def _make_hook(self, i: int) -> Callable[..., Any]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
            if not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"attribution needs a module whose output is a tensor, "
                    f"{type(module).__name__} returned {type(output).__name__}"
                )
            leaf = self.grad and not output.requires_grad
            if leaf:
                # nothing upstream is differentiable: differentiate with respect to a leaf
                output = output.detach().requires_grad_()
            self.outputs[i].append(output)
            self.versions[i].append(output._version)
            if self.on_output is not None:
                self.on_output(i, output)
            if self.clone or leaf:
                # a copy downstream: in-place operations cannot touch the captured tensor
                return output.clone()
            return None

        return hook

    def reset(self) -> None:
        for o, v in zip(self.outputs, self.versions):
            o.clear()
            v.clear()

    def single_outputs(self, modules: list[nn.Module]) -> list[torch.Tensor]:
        """The one output of each module in the last pass; raise if a module ran != 1 times."""
        result = []
        for m, outs in zip(modules, self.outputs):
            if len(outs) != 1:
                raise ValueError(
                    f"{type(m).__name__} module ran {len(outs)} times in one forward pass; "
                    "attribution needs a module that runs exactly once"
                )
            result.append(outs[0])
        return result

    def modified_in_place(self) -> bool:
        return any(o._version != v for outs, vs in zip(self.outputs, self.versions) for o, v in zip(outs, vs))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class ForwardAttributionMetric(AttributionMetric):
    """A metric computed from the activations alone: one forward pass per batch, no gradient."""

    def _unit_scores(self, z: torch.Tensor) -> torch.Tensor:
        """Per-example scores ``(N, units)`` from the activation ``z``."""
        raise NotImplementedError

    def _attribute(
        self, modules: list[nn.Module], batches: Iterator[tuple[Any, Any]], **kwargs: Any
    ) -> list[np.ndarray]:
        if kwargs:
            raise TypeError(f"{type(self).__name__}.run got unexpected arguments: {sorted(kwargs)}")
        scores: list[list[torch.Tensor]] = [[] for _ in modules]
        axes = self._axes(modules)

        # scores are computed inside the hook, before any in-place operation downstream
        def on_output(i: int, z: torch.Tensor) -> None:
            z = channels_first(z.detach(), axes[i])
            scores[i].append(self._unit_scores(z).to("cpu", torch.float64))

        capture = ActivationCapture(modules, on_output=on_output)
        bar = self._progress(self._n_batches())
        try:
            with torch.no_grad(), bar:
                for x, _ in batches:
                    self.model(x)
                    capture.single_outputs(modules)  # raises unless each module ran once
                    capture.reset()
                    bar.update(1)
        finally:
            capture.remove()
        return [stack_rows(s) for s in scores]


class GradientAttributionMetric(AttributionMetric):
    """A metric computed from activations and per-example gradients of the loss.

    Each batch takes one forward pass and one backward pass restricted to the activations
    (``torch.autograd.grad`` of the sum of the per-example losses, so that every example gets the
    gradient of its own loss and no parameter ``.grad`` is touched), for all modules at once.
    """

    def _unit_scores(self, z: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Per-example scores ``(N, units)`` from the activation and ``dL/dz``."""
        raise NotImplementedError

    def _attribute(
        self, modules: list[nn.Module], batches: Iterator[tuple[Any, Any]], **kwargs: Any
    ) -> list[np.ndarray]:
        if kwargs:
            raise TypeError(f"{type(self).__name__}.run got unexpected arguments: {sorted(kwargs)}")
        scores: list[list[torch.Tensor]] = [[] for _ in modules]
        axes = self._axes(modules)
        clone = False
        capture = ActivationCapture(modules, grad=True)
        bar = self._progress(self._n_batches())
        try:
            with torch.enable_grad(), bar:
                for x, y in batches:
                    while True:
                        capture.reset()
                        loss = per_example_loss(self.criterion, self.model(x), y)
                        zs = capture.single_outputs(modules)
                        if clone or not capture.modified_in_place():
                            break
                        # an in-place operation after a module altered its captured output:
                        # from now on the module passes a copy downstream
                        clone = capture.clone = True
                    if loss.requires_grad:
                        grads = torch.autograd.grad(loss.sum(), zs, allow_unused=True, materialize_grads=True)
                    else:
                        grads = tuple(torch.zeros_like(z) for z in zs)
                    with torch.no_grad():
                        for i, (z, g) in enumerate(zip(zs, grads)):
                            z, g = channels_first(z, axes[i]), channels_first(g, axes[i])
                            scores[i].append(self._unit_scores(z, g).to("cpu", torch.float64))
                    del loss, zs, grads
                    capture.reset()
                    bar.update(1)
        finally:
            capture.remove()
        return [stack_rows(s) for s in scores]
