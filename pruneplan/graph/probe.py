"""Example inputs, side-effect-free passes, and a probe pass that records module shapes."""

from __future__ import annotations

import contextlib
import copy
import logging
import random
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = [
    "ExampleInputs",
    "as_calls",
    "as_inputs",
    "check_example_pass",
    "describe_inputs",
    "dry_run",
    "frozen_mode",
    "meta_copy",
    "probe_shapes",
    "training_mode",
]


class ExampleInputs:
    """Several example calls for discovery: each positional argument is one call of the model.

    A call is a tensor (``model(x)``) or a tuple of positional arguments (``model(*args)``).
    Use it where one call does not run every branch, e.g. two input sizes, or inputs that take
    different paths::

        pruneplan.prunable_groups(model, pruneplan.ExampleInputs(x_small, (tokens, mask)))

    A plain tuple or list given as ``example_inputs`` stays what it always was: the arguments
    of *one* call.

    Raises:
        PlanningError: no calls given.
    """

    def __init__(self, *calls: Any) -> None:
        if not calls:
            from pruneplan.errors import PlanningError

            raise PlanningError("ExampleInputs needs at least one example call")
        self.calls: tuple[tuple, ...] = tuple(
            tuple(c) if isinstance(c, tuple | list) else (c,) for c in calls)

    def __repr__(self) -> str:
        return f"ExampleInputs({len(self.calls)} calls)"


def as_calls(example_inputs: Any) -> list[tuple]:
    """Every example call (a tuple of arguments): several for `ExampleInputs`, else one."""
    if isinstance(example_inputs, ExampleInputs):
        return list(example_inputs.calls)
    return [as_inputs(example_inputs)]


def as_inputs(example_inputs: Any) -> tuple:
    """Normalise ``example_inputs`` (a tensor or a tuple/list of them) into call arguments;
    the first call of an `ExampleInputs`."""
    if isinstance(example_inputs, ExampleInputs):
        return example_inputs.calls[0]
    if isinstance(example_inputs, tuple | list):
        return tuple(example_inputs)
    return (example_inputs,)


def describe_inputs(args: tuple) -> str:
    """``"[1, 4, 64, 64] float32"`` for each argument (a tensor's shape and dtype, else its type
    name), joined by ``", "``."""
    parts = []
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append(f"{list(a.shape)} {str(a.dtype).removeprefix('torch.')}")
        else:
            parts.append(type(a).__name__)
    return ", ".join(parts) or "no arguments"


def check_example_pass(model: nn.Module, args: tuple, what: str = "example inputs") -> Any:
    """Run ``model(*args)`` once, plainly (the caller sets the mode and grad); when the model's
    own forward raises, raise an `ExamplePassError` naming the innermost module that was running
    and the inputs, chained to the model's exception. Returns the model's output when the pass
    succeeds (then a failure seen elsewhere was not the model's).

    Raises:
        ExamplePassError: the model's forward raises on ``args``.
    """
    from pruneplan.errors import ExamplePassError, quote

    running: list[tuple[str, nn.Module]] = []
    handles = []

    def pre(name: str):
        def hook(m: nn.Module, _args: tuple) -> None:
            running.append((name, m))
        return hook

    def post(m: nn.Module, _args: tuple, _out: object) -> None:
        if running and running[-1][1] is m:
            running.pop()

    try:
        for name, m in model.named_modules():
            if name:
                handles.append(m.register_forward_pre_hook(pre(name)))
                handles.append(m.register_forward_hook(post))
        try:
            return model(*args)
        except Exception as exc:
            failed = exc
    finally:
        for h in handles:
            h.remove()
    where = f"in module {quote(running[-1][0])} ({type(running[-1][1]).__name__}) of " if running else "in "
    text = "; ".join(line.strip() for line in str(failed).splitlines() if line.strip())
    text = text if len(text) <= 300 else text[:300] + "..."
    error = ExamplePassError(
        f"the example pass failed {where}{type(model).__name__} on the {what} given "
        f"({describe_inputs(args)}): {type(failed).__name__}: {text}"
    )
    error.module = running[-1][0] if running else None
    raise error from failed


class frozen_mode:
    """Context: eval mode and no grad, restoring every module's ``training`` flag on exit.

    Torch's fused attention paths (``torch.backends.mha`` fast path of ``nn.MultiheadAttention``
    and ``nn.TransformerEncoderLayer``, taken in eval mode without grad) are switched off inside,
    so the layers a ``TransformerEncoderLayer`` is made of run and are seen one by one.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.flags: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> nn.Module:
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        self._grad = torch.no_grad()
        self._grad.__enter__()
        self._fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        return self.model

    def __exit__(self, *exc: object) -> None:
        torch.backends.mha.set_fastpath_enabled(self._fast)
        self._grad.__exit__(*exc)
        for m, flag in self.flags:
            m.training = flag


class training_mode:
    """Context: training mode (norm layers excepted) and no grad, for a structural pass.

    Container and other modules get ``training=True`` so that branches taken only in training
    run; batch/instance norm layers stay in eval mode (a batch of one still runs, and no running
    statistic is updated). On exit every module's ``training`` flag, every buffer (values,
    including running statistics and ``num_batches_tracked``, and identity) and the torch and
    Python random number generators are exactly as before. Inside, both generators are seeded
    with 0, so stochastic depth or layer drop takes the same path on every call.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> nn.Module:
        mods = list(self.model.modules())
        self.flags = [(m, m.training) for m in mods]
        self.buffers = [(m, dict(m._buffers), {k: b.detach().clone() for k, b in m._buffers.items()
                                               if b is not None}) for m in mods if m._buffers]
        self.params = [(m, dict(m._parameters)) for m in mods if m._parameters]
        self.py_state = random.getstate()
        devices = sorted({p.device.index or 0 for p in self.model.parameters()
                          if p.device.type == "cuda"})
        self._rng = torch.random.fork_rng(devices=devices)
        self._rng.__enter__()
        torch.manual_seed(0)
        random.seed(0)
        self._grad = torch.no_grad()
        self._grad.__enter__()
        self.model.train()
        for m in mods:
            if isinstance(m, nn.modules.batchnorm._NormBase):
                m.training = False
        return self.model

    def __exit__(self, *exc: object) -> None:
        try:
            for m, held, values in self.buffers:
                m._buffers.clear()
                m._buffers.update(held)
                for k, v in values.items():
                    held[k].copy_(v)
            for m, held in self.params:
                m._parameters.clear()
                m._parameters.update(held)
            for m, flag in self.flags:
                m.training = flag
        finally:
            self._grad.__exit__(*exc)
            self._rng.__exit__(*exc)
            random.setstate(self.py_state)


def probe_shapes(
    model: nn.Module, example_inputs: Any, names: Iterable[str]
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Run one forward pass in eval mode under no_grad; return name -> (input shape, output shape).

    BatchNorm statistics, training flags and hooks are as before when this returns.
    """
    modules = dict(model.named_modules())
    seen: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    handles = []

    def hook(name: str):
        def record(_m: nn.Module, args: tuple, out: Any) -> None:
            if name in seen or not args or not isinstance(args[0], torch.Tensor):
                return
            shape_out = tuple(out.shape) if isinstance(out, torch.Tensor) else ()
            seen[name] = (tuple(args[0].shape), shape_out)

        return record

    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(hook(name)))
        with frozen_mode(model):
            model(*as_inputs(example_inputs))
    finally:
        for h in handles:
            h.remove()
    return seen


def probe_dataflow(model: nn.Module, example_inputs: Any) -> list[tuple[str, tuple[int, ...], int]]:
    """Run one forward pass in eval mode under no_grad and record the leaf modules' data flow.

    Returns, in the order the calls finish, ``(name, ids of the input tensors, id of the output
    tensor or -1)`` for each call of a module without children. Every tensor seen stays referenced
    until the pass ends, so an id names one tensor. BatchNorm statistics, training flags and hooks
    are as before when this returns.
    """
    events: list[tuple[str, tuple[int, ...], int]] = []
    keep: list[torch.Tensor] = []
    handles = []

    def hook(name: str):
        def record(_m: nn.Module, args: tuple, out: Any) -> None:
            ins = tuple(a for a in args if isinstance(a, torch.Tensor))
            keep.extend(ins)
            if isinstance(out, torch.Tensor):
                keep.append(out)
            events.append((name, tuple(id(a) for a in ins),
                           id(out) if isinstance(out, torch.Tensor) else -1))

        return record

    try:
        for name, m in model.named_modules():
            if name and next(iter(m.children()), None) is None:
                handles.append(m.register_forward_hook(hook(name)))
        with frozen_mode(model):
            model(*as_inputs(example_inputs))
    finally:
        for h in handles:
            h.remove()
    return events


def meta_copy(model: nn.Module) -> nn.Module | None:
    """A copy of ``model`` whose parameters and buffers are on the ``meta`` device (shapes, no
    data: nothing is copied but the module structure); tied tensors stay tied. ``None`` when
    the model cannot be copied."""
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in memo:
            continue
        m = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(m, requires_grad=t.requires_grad) \
            if isinstance(t, nn.Parameter) else m
    try:
        return copy.deepcopy(model, memo)
    except Exception:  # a module holding what cannot be copied, code that needs data
        return None


def _to_meta(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return torch.empty_like(a, device="meta")
    if isinstance(a, tuple):
        return tuple(_to_meta(x) for x in a)
    if isinstance(a, list):
        return [_to_meta(x) for x in a]
    if isinstance(a, dict):
        return {k: _to_meta(v) for k, v in a.items()}
    return a


def dry_run(model: nn.Module, example_inputs: Any,
            change: Callable[[nn.Module], Any]) -> str | None:
    """Change a copy of ``model`` on the ``meta`` device with ``change`` (applying a plan) and
    run the example calls on it, in eval mode, then in training mode (`training_mode`: branches
    that run only in training, such as auxiliary heads), without grad: the error it raises, or
    ``None`` when it runs (and when nothing can be told: the model cannot be copied, ``change``
    refuses, or an unchanged copy fails in that mode as well, as code that needs data does on
    ``meta``). ``model`` is not
    touched, and no arithmetic is done; the library's log records below ERROR and Python
    warnings raised meanwhile are dropped (they are the copy's: what they say is said for the
    plan itself)."""
    def run(twin: nn.Module, mode: type) -> Exception | None:
        try:
            with mode(twin):
                for c in calls:
                    twin(*c)
        except Exception as exc:
            return exc
        return None

    with _quiet():
        twin = meta_copy(model)
        if twin is None:
            return None
        calls = [_to_meta(c) for c in as_calls(example_inputs)]
        try:
            change(twin)
        except Exception:  # refused for the model as well: it is left as it was
            return None
        for mode, where in ((frozen_mode, ""), (training_mode, " in training mode")):
            failed = run(twin, mode)
            if failed is None:
                continue
            # the unchanged copy must run for the failure to be the change's (code that needs
            # data cannot run on meta at all, a model may need targets in training mode)
            plain = meta_copy(model)
            if plain is None or run(plain, mode) is not None:
                continue
            return f"{type(failed).__name__}{where}: {failed}"
    return None


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Drop the ``pruneplan`` loggers' records below ERROR and every Python warning."""
    names = ["pruneplan", *(n for n in list(logging.Logger.manager.loggerDict)
                            if n.startswith("pruneplan."))]
    loggers = [logging.getLogger(n) for n in names]
    quiet = _BelowError()
    for lg in loggers:
        lg.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg in loggers:
            lg.removeFilter(quiet)
