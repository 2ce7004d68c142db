"""What the ``pruneplan plan`` / ``pruneplan groups`` commands need: loading models and data
from ``pkg.module:factory`` specs, example inputs, and one call from a metric to a plan.

This is a convenience layer on top of the public API (discovery, attributions, selection,
planner); the CLI stays a thin wrapper around it.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import importlib
import importlib.util
import itertools
import logging
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pruneplan._io import check_regular
from pruneplan.errors import CriterionError, ExamplePassError, PlanningError, quote
from pruneplan.graph.discover import left_out_summary, prunable_groups
from pruneplan.graph.probe import check_example_pass
from pruneplan.graph.spec import Group as GroupSpec
from pruneplan.modules import heads_projection, heads_sites
from pruneplan.plan import PrunePlan
from pruneplan.planner import build_plan, check_runs, execution_order
from pruneplan.select import _lowest, _normalize, aggregate_scores, keep_count, keep_parts, select_indices

__all__ = [
    "CRITERIA",
    "DATA_FREE_METRICS",
    "METRICS",
    "check_criterion",
    "check_device",
    "check_example",
    "config_count_sets",
    "example_input",
    "load_data",
    "load_factory",
    "load_model",
    "load_weights",
    "metric_needs_data",
    "parse_input_shape",
    "plan_from_metric",
    "score_groups",
]

log = logging.getLogger(__name__)

#: metric name (CLI spelling) -> attribution class name in `pruneplan.attributions`
METRICS = {
    "weight_norm": "WeightNormAttributionMetric",
    "lp_norm": "LpNormAttributionMetric",
    "bn_scale": "BNScaleAttributionMetric",
    "fpgm": "FPGMAttributionMetric",
    "lamp": "LAMPAttributionMetric",
    "random": "RandomAttributionMetric",
    "apoz": "APoZAttributionMetric",
    "sensitivity": "SensitivityAttributionMetric",
    "taylor": "TaylorAttributionMetric",
    "shapley": "ShapleyAttributionMetric",
    "activation": "ActivationMagnitudeAttributionMetric",
}
DATA_FREE_METRICS = ("weight_norm", "lp_norm", "bn_scale", "fpgm", "lamp", "random")
#: metrics that draw random numbers: ``seed`` reaches them (and only them)
RANDOM_METRICS = ("random", "shapley")
#: metric -> its parameters (beyond ``criterion`` and ``seed``) with their defaults
METRIC_PARAMS: dict[str, dict[str, Any]] = {"lp_norm": {"p": 2.0}, "shapley": {"sv_samples": 5}}


def _causal_lm(output: Any, target: Any, reduction: str = "mean") -> torch.Tensor:
    from pruneplan.attributions.criteria import causal_lm_loss

    return causal_lm_loss(output, target, reduction=reduction)


_causal_lm.accepts_model_output = True  # type: ignore[attr-defined]

#: criterion name (CLI spelling) -> loss; ``causal_lm`` is next-token cross-entropy on
#: ``(input_ids, input_ids)`` batches (`pruneplan.attributions.causal_lm_loss`)
CRITERIA: dict[str, Callable[..., torch.Tensor]] = {
    "cross_entropy": F.cross_entropy, "mse": F.mse_loss, "causal_lm": _causal_lm}
TARGETS = ("macs", "params")


def load_factory(spec: str) -> Any:
    """The object named by ``"pkg.module:attr"`` (``attr`` may be dotted) or ``"file.py:attr"``.

    Raises:
        PlanningError: malformed spec, module not importable, attribute missing.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise PlanningError(f"expected 'pkg.module:factory', got {spec!r}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise PlanningError(f"{spec!r}: no file {module_name!r}")
            name = f"_pruneplan_user_{path.stem}"
            mod_spec = importlib.util.spec_from_file_location(name, path)
            if mod_spec is None or mod_spec.loader is None:
                raise PlanningError(f"{spec!r}: cannot load {module_name!r}")
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[name] = module
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PlanningError(f"{spec!r}: cannot import {module_name!r}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PlanningError(f"{spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def load_model(spec: str, weights: str | Path | None = None) -> nn.Module:
    """Build the model named by ``spec`` (a factory, a class, or a module instance) in eval mode,
    then load ``weights`` (safetensors, or a ``torch.save``-d state dict) strictly.

    Raises:
        PlanningError: the spec cannot be loaded (see `load_factory`), it does not give an
            ``nn.Module``, the weights file does not exist, or its tensors do not fit the model.
    """
    obj = load_factory(spec)
    model = obj if isinstance(obj, nn.Module) else _call(spec, obj) if callable(obj) else obj
    if not isinstance(model, nn.Module):
        raise PlanningError(f"{spec!r} gave a {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        load_weights(model, weights, spec)
    return model.eval()


def load_weights(model: nn.Module, weights: str | Path, spec: str = "the model") -> None:
    """Load ``weights`` (safetensors, or a ``torch.save``-d state dict) into ``model`` strictly.

    Every name and shape is compared before the model is touched.

    Raises:
        PlanningError: the file is missing, not a regular file, not weights, or does not fit
            ``model`` (a tensor missing, extra, or of another shape); names the file.
    """
    path = Path(weights)
    if not path.exists():
        raise PlanningError(f"weights file {str(path)!r} does not exist")
    check_regular(path, "weights file", PlanningError)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            import warnings

            with warnings.catch_warnings():  # torch's notes on odd pickles: the error below says it
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader's complaint means the same: not weights we read
        raise PlanningError(
            f"{path}: not a safetensors file or a torch state dict ({type(exc).__name__}: "
            f"{_one_line(exc)})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PlanningError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise PlanningError(f"{path}: weights do not fit {spec!r}: {what}")
    for key in sorted(own):
        if state[key].shape != own[key].shape:
            raise PlanningError(
                f"{path}: weights do not fit {spec!r}: tensor {quote(key)} has shape "
                f"{list(state[key].shape)} in the file, {list(own[key].shape)} in the model"
            )
    model.load_state_dict(state, strict=True)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text if len(text) <= limit else text[:limit] + "..."


def _call(spec: str, factory: Callable[[], Any]) -> Any:
    """Call a user's factory with no arguments; its failure is a `PlanningError`."""
    try:
        return factory()
    except Exception as exc:
        raise PlanningError(
            f"{spec!r}: calling it with no arguments failed ({type(exc).__name__}: {_one_line(exc)})"
        ) from None


def load_data(spec: str) -> tuple[Iterable[Any], Any]:
    """The batches of the data factory named by ``spec``, and the first batch.

    Called with no arguments, the factory returns an iterable of ``(inputs, targets)`` batches
    (a DataLoader, a list, a generator). The first batch is checked, and kept: a one-pass
    iterable still yields it.

    Raises:
        PlanningError: the factory cannot be found or called, returns something that is not
            iterable or yields nothing, or its first batch is not an ``(inputs, targets)`` pair.
    """
    obj = load_factory(spec)
    data = _call(spec, obj) if callable(obj) and not hasattr(obj, "__iter__") else obj
    try:
        it = iter(data)
    except TypeError:
        raise PlanningError(f"{spec!r} gave a {type(data).__name__}, not an iterable of batches") from None
    try:
        first = next(it)
    except StopIteration:
        raise PlanningError(f"{spec!r} yields no batches") from None
    except Exception as exc:
        raise PlanningError(
            f"{spec!r}: reading the first batch failed ({type(exc).__name__}: {_one_line(exc)})"
        ) from None
    if not (isinstance(first, tuple | list) and len(first) >= 2):
        what = f"a {type(first).__name__}" + (f" of {len(first)} items" if isinstance(first, tuple | list)
                                                 else "")
        raise PlanningError(f"{spec!r}: batches must be (inputs, targets) pairs; the first batch is {what}")
    if it is data:  # one pass only: give the first batch back
        import itertools

        return itertools.chain([first], it), first
    return data, first


def check_example(model: nn.Module, example: Any) -> None:
    """Run ``model`` once on ``example``; a failure is a `PlanningError` naming the input shape.

    Raises:
        PlanningError: the model does not run on the example input.
    """
    try:
        with torch.no_grad():
            check_example_pass(model, (example,))
    except ExamplePassError as exc:
        raise _pass_failed(exc, "the model does not run on an example input of shape "
                           f"{_shape(example)}") from exc.__cause__


def _shape(x: Any) -> Any:
    return list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def _pass_failed(exc: ExamplePassError, what: str) -> ExamplePassError:
    """``what`` failed, with the module the example pass failed in and its cause."""
    cause = exc.__cause__
    where = "" if exc.module is None else f", in module {quote(exc.module)}"
    return ExamplePassError(f"{what}{where} ({type(cause).__name__}: {_one_line(cause)})")


def check_criterion(model: nn.Module, batch: Sequence[Any], criterion: str) -> None:
    """Run ``model`` and the named criterion once on one ``(inputs, targets)`` batch.

    Raises:
        PlanningError: the batch does not fit the model, or (`CriterionError`) the criterion
            does not fit the model's output and the targets (``mse`` with class labels,
            ``cross_entropy`` with one target per token). A Hugging Face ``ModelOutput`` is
            checked by its ``logits``, as the metrics see it.
    """
    if criterion not in CRITERIA:
        raise PlanningError(f"unknown criterion {criterion!r}; choose from {sorted(CRITERIA)}")
    x, y = batch[0], batch[1]
    try:
        with torch.no_grad():
            out = check_example_pass(model, (x,), "data's inputs")
    except ExamplePassError as exc:
        raise _pass_failed(exc, f"the data's inputs (first batch: {_shape(x)}) do not fit the "
                           "model") from exc.__cause__
    fn = CRITERIA[criterion]
    if not isinstance(out, torch.Tensor) and isinstance(getattr(out, "logits", None), torch.Tensor) \
            and not getattr(fn, "accepts_model_output", False):
        out = out.logits  # a Hugging Face ModelOutput: the criterion sees the logits (per_example_loss)
    if not isinstance(out, torch.Tensor) or not isinstance(y, torch.Tensor):
        return  # structured outputs: left to the metric
    if criterion == "mse" and (out.shape != y.shape or not y.is_floating_point()):
        raise PlanningError(
            f"criterion 'mse' needs float targets shaped like the model's output {list(out.shape)}; "
            f"the data gives {str(y.dtype).removeprefix('torch.')} targets of shape {list(y.shape)}"
            + (" (class labels: use cross_entropy)" if not y.is_floating_point() else "")
        )
    try:
        with torch.no_grad():
            fn(out, y)
    except Exception as exc:
        from pruneplan.attributions.base import criterion_error

        raise CriterionError(str(criterion_error(criterion, out, y, exc))) from exc


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"3,224,224"`` -> ``(3, 224, 224)`` (the shape of one example, without the batch).

    Raises:
        PlanningError: not comma-separated positive integers.
    """
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise PlanningError(f"input shape must be comma-separated integers, got {text!r}") from None
    if not shape or any(d < 1 for d in shape):
        raise PlanningError(f"input shape must be positive integers, got {text!r}")
    return shape


def example_input(shape: Sequence[int], batch_size: int = 1, dtype: torch.dtype = torch.float32,
                  seed: int = 0) -> torch.Tensor:
    """A deterministic example batch of ``shape`` (random normal; zeros for integer dtypes).

    Raises nothing for valid shapes (torch's own errors for negative sizes).
    """
    full = (batch_size, *shape)
    if dtype.is_floating_point:
        return torch.randn(full, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return torch.zeros(full, dtype=dtype)


def metric_needs_data(metric: str) -> bool:
    """Whether ``metric`` reads data (and so needs ``--data``).

    Raises:
        PlanningError: unknown metric.
    """
    if metric not in METRICS:
        raise PlanningError(f"unknown metric {metric!r}; choose from {sorted(METRICS)}")
    return metric not in DATA_FREE_METRICS


def check_metric_options(
    metric: str,
    *,
    data: Any = None,
    criterion: Any = None,
    seed: int | None = None,
    metric_params: Mapping[str, Any] | None = None,
    max_batches: int | None = None,
) -> dict[str, Any]:
    """Refuse options ``metric`` would ignore; return its parameters with defaults filled in.

    Data-free metrics take no ``data``, ``criterion`` or ``max_batches``; only the random
    metrics (`RANDOM_METRICS`) take a ``seed``; ``metric_params`` must be parameters the metric
    has (`METRIC_PARAMS`).

    Raises:
        PlanningError: unknown metric, an option the metric ignores, a data metric without
            data, a bad ``max_batches`` or ``sv_samples``.
    """
    needs = metric_needs_data(metric)
    if not needs:
        for name, value in (("data", data), ("criterion", criterion), ("max_batches", max_batches)):
            if value is not None:
                raise PlanningError(f"metric {metric!r} reads no data: it ignores {name}; leave it out")
    elif data is None:
        raise PlanningError(f"metric {metric!r} needs data")
    if seed is not None and metric not in RANDOM_METRICS:
        raise PlanningError(f"metric {metric!r} is deterministic: it ignores seed; leave it out "
                            f"(seeded metrics: {', '.join(RANDOM_METRICS)})")
    allowed = METRIC_PARAMS.get(metric, {})
    params = dict(allowed)
    for key, value in (metric_params or {}).items():
        if key not in allowed:
            takes = ", ".join(sorted(allowed)) or "none"
            raise PlanningError(f"metric {metric!r} has no parameter {key!r} (its parameters: {takes})")
        params[key] = value
    if "sv_samples" in params and (isinstance(params["sv_samples"], bool)
                                   or not isinstance(params["sv_samples"], int) or params["sv_samples"] < 1):
        raise PlanningError(f"sv_samples must be a positive integer, got {params['sv_samples']!r}")
    if "p" in params and (isinstance(params["p"], bool) or not isinstance(params["p"], int | float)
                          or not params["p"] > 0):
        raise PlanningError(f"p must be a number > 0, got {params['p']!r}")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise PlanningError(f"max_batches must be a positive integer, got {max_batches!r}")
    return params


class LimitedBatches:
    """The first ``n`` batches of ``data`` on every iteration (re-iterable when ``data`` is)."""

    def __init__(self, data: Iterable[Any], n: int) -> None:
        self.data, self.n = data, n

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.data), self.n)

    def __len__(self) -> int:
        try:
            return min(len(self.data), self.n)  # type: ignore[arg-type]
        except TypeError:
            return self.n


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a `torch.device`, checked to be one this machine can use.

    Raises:
        PlanningError: ``device`` is not a device name (``"cdua"``), or names one this machine
            lacks (``"cuda"`` without a GPU, ``"cuda:7"`` with one); the message names it.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise PlanningError(f"device {quote(str(device))} is not a device name ({_first_line(exc)}); "
                            f"give cpu, cuda, cuda:N or mps") from None
    try:
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise PlanningError(f"device {quote(str(device))} is not available on this machine "
                            f"({_first_line(exc)})") from None
    return dev


def _first_line(exc: BaseException) -> str:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return text[:200]


def score_groups(
    model: nn.Module,
    groups: Sequence[GroupSpec],
    metric: str,
    data: Iterable[Any] | None = None,
    criterion: str | Callable[..., torch.Tensor] | None = None,
    device: str | torch.device = "cpu",
    seed: int | None = None,
    *,
    metric_params: Mapping[str, Any] | None = None,
    max_batches: int | None = None,
    progress: bool = False,
    example_inputs: Any = None,
) -> dict[str, np.ndarray]:
    """Scores of every root module of ``groups`` with the named metric (member name -> array).

    A metric scores the output rows of a root; where a unit spans several rows (an attention
    head: ``head_dim`` rows of ``q_proj``; three blocks of them in GPT-2's fused ``c_attn``,
    whose ``Conv1D`` weight is (in, out)), a unit's score is the mean of its rows' scores, as
    the group's slices of the root's weight place them.
    Members whose scores still do not fit their group (a metric that scores another axis, e.g.
    the vocabulary of an Embedding) are left out with a warning, and so are the roots a
    data-free metric cannot score (``bn_scale``: no BatchNorm follows; a module with no weight)
    and, for the data metrics, recurrent roots (``nn.RNN`` / ``LSTM`` / ``GRU``) built with
    ``batch_first=False``. The data metrics score a ``batch_first`` recurrent root at the
    features of its output sequence (the last layer's hidden units; the mean of both directions
    when bidirectional); the data-free ones by the gate rows of every layer. Aggregate what
    remains with
    `select_indices(..., groups=groups)`.

    Args:
        seed: seed of the random metrics (`RANDOM_METRICS`; default 0 for them).
        metric_params: the metric's parameters (`METRIC_PARAMS`), e.g. ``{"sv_samples": 20}``.
        max_batches: score on the first ``max_batches`` batches of ``data`` only.
        progress: tqdm progress bars on stderr while scoring.
        example_inputs: the forward pass of ``bn_scale`` that finds each root's BatchNorm.

    Raises:
        PlanningError: unknown metric or criterion, a data metric without ``data``, an option
            the metric ignores (see `check_metric_options`); `CriterionError` when the
            criterion raises on the model's outputs and the data's targets.
    """
    from pruneplan import attributions

    params = check_metric_options(metric, data=data, criterion=criterion, seed=seed,
                                  metric_params=metric_params, max_batches=max_batches)
    check_device(device)
    if isinstance(criterion, str):
        if criterion not in CRITERIA:
            raise PlanningError(f"unknown criterion {criterion!r}; choose from {sorted(CRITERIA)}")
        criterion = CRITERIA[criterion]
    if data is not None and max_batches is not None:
        data = LimitedBatches(data, max_batches)
    cls = getattr(attributions, METRICS[metric])
    kwargs: dict[str, Any] = {"progress": progress, **params}
    if metric in RANDOM_METRICS:
        kwargs["seed"] = 0 if seed is None else seed
    if metric == "bn_scale":
        kwargs["example_inputs"] = example_inputs
    scorer = cls(model, data if data is not None else [], criterion or CRITERIA["cross_entropy"],
                 device, **kwargs)
    members = sorted({r for g in groups for r in g.roots})
    rnn_sites: dict[str, str] = {}
    if scorer.uses_data:  # a recurrent layer's units are read at its output sequence's features
        rnn = [m for m in members if isinstance(_submodule(model, m), nn.RNNBase)]
        rnn_sites = {m: f"{m}.hidden_output" for m in rnn if _submodule(model, m).batch_first}
        other = [m for m in rnn if m not in rnn_sites]
        if other:
            log.warning("leaving %d recurrent roots out of %s scoring (batch_first=False: the "
                        "examples are not on axis 0 of their output; score them with a data-free "
                        "metric such as lp_norm): %s", len(other), metric,
                        ", ".join(repr(m) for m in other))
            members = [m for m in members if m not in other]
    if metric == "bn_scale" or not scorer.uses_data:  # each root alone: one that fails is told
        raw = {}
        for name in members:
            try:
                raw.update(scorer.run_all([name]))
            except ValueError as exc:
                log.warning("leaving %r out: %s", name, exc)
    else:  # nn.MultiheadAttention: data metrics score its heads' outputs (see heads_sites)
        def score(members: list[str], rnn_sites: Mapping[str, str]) -> dict[str, Any]:
            with heads_sites(model, members if scorer.uses_data else ()) as sites, \
                    _hidden_outputs(model, rnn_sites):
                sites = {**sites, **rnn_sites}
                back = {site: name for name, site in sites.items()}
                try:
                    got = scorer.run_all([sites.get(m, m) for m in members])
                except attributions.CriterionMismatchError as exc:
                    raise CriterionError(str(exc)) from exc.__cause__
                return {back.get(k, k): v for k, v in got.items()}

        try:
            raw = score(members, rnn_sites)
        except ValueError as exc:
            if not rnn_sites or "_HiddenOutput module ran" not in str(exc):
                raise
            # a recurrent layer fed a PackedSequence (or not run): its output sequence is no tensor
            log.warning("leaving %d recurrent roots out of %s scoring (their output sequence was "
                        "not one (N, T, features) tensor: %s; score them with a data-free metric "
                        "such as lp_norm): %s", len(rnn_sites), metric, exc,
                        ", ".join(repr(m) for m in rnn_sites))
            members = [m for m in members if m not in rnn_sites]
            rnn_sites = {}
            raw = score(members, rnn_sites)
        for name in rnn_sites:  # bidirectional: unit j is feature j of both directions (their mean)
            rnn_module = model.get_submodule(name)
            dirs = 2 if rnn_module.bidirectional else 1
            raw[name] = np.asarray(raw[name], dtype=np.float64).reshape(dirs, -1).mean(0)
    owner = {r: g for g in groups for r in g.roots}
    out = {}
    for name, s in raw.items():
        s = np.asarray(s, dtype=np.float64).reshape(-1)
        g = owner[name]
        spread = dict(getattr(g, "root_units", None) or ()).get(name)
        if spread is not None:  # units tied unevenly: its own units, placed by aggregate_scores
            own = sum(len(u) for u in spread)
            if s.size != own:
                log.warning("ignoring %s scores of %r: %d scores for its %d units", metric, name,
                            s.size, own)
                continue
        elif s.size != g.size:
            units = _unit_positions(model, g, name, s.size)
            if units is None:
                log.warning("ignoring %s scores of %r: %d scores for %d units", metric, name, s.size,
                            g.size)
                continue
            log.info("%s: the %d row scores of %r averaged into its %d %s", metric, s.size, name, g.size,
                     _kind(g))
            s = np.array([s[pos].mean() for pos in units])
        out[name] = s
    return out


class _HiddenOutput(nn.Identity):
    """Where a recurrent layer hands its output sequence ``(N, T, directions * hidden)`` while a
    data metric scores it (`_hidden_outputs`): an identity whose hooks see it."""

    features_last = True  # the attribution metrics' unit axis is the last one


_RNN_SITE_CLASSES: dict[type, type] = {}


def _rnn_site_class(cls: type) -> type:
    if cls not in _RNN_SITE_CLASSES:
        def forward(self: Any, input: Any, hx: Any = None) -> Any:
            out, h = cls.forward(self, input, hx)
            return (self.hidden_output(out) if isinstance(out, torch.Tensor) else out), h

        # the same module path as the layer's: torch.fx keeps it a leaf, as it keeps the layer
        body = {"forward": forward, "__module__": cls.__module__}
        _RNN_SITE_CLASSES[cls] = type(cls.__name__, (cls,), body)
    return _RNN_SITE_CLASSES[cls]


@contextlib.contextmanager
def _hidden_outputs(model: nn.Module, sites: Mapping[str, str]) -> Iterator[None]:
    """For the run, each recurrent layer named in ``sites`` passes its output sequence through
    a `_HiddenOutput` child (the site); on exit the layers are exactly as before."""
    undo: list[tuple[nn.Module, type]] = []
    try:
        for name in sites:
            m = model.get_submodule(name)
            undo.append((m, type(m)))
            m.__class__ = _rnn_site_class(type(m))
            m.hidden_output = _HiddenOutput()
        yield
    finally:
        for m, cls in reversed(undo):
            m._modules.pop("hidden_output", None)
            m.__class__ = cls


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _unit_positions(model: nn.Module, group: GroupSpec, root: str, n: int) -> list[list[int]] | None:
    """Positions of the root's ``n`` output units that each unit of ``group`` owns, or None.

    A unit of a ``"heads"`` group owns ``head_dim`` outputs of its query projection (three
    blocks of them in a fused q/k/v projection; ``head_dim`` inputs of the output projection
    of an ``nn.MultiheadAttention`` or a Swin attention): the unit's score is the mean of theirs, as
    `select_indices` aggregates the members of a group.
    """
    from pruneplan.plan import IndexMap

    try:
        module = model.get_submodule(root)
    except AttributeError:
        return None
    axis = 1 if isinstance(getattr(module, "nf", None), int) else 0  # Conv1D stores (in, out)
    tensor = f"{root}.weight"
    proj = heads_projection(module)
    if proj is not None:  # attention scored at its output projection's inputs (its columns)
        tensor, axis = f"{root}.{proj}.weight", 1
    maps = [IndexMap(**sl.map_fields()) for sl in group.slices
            if sl.tensor == tensor and sl.axis == axis and sl.modulo is None]
    if not maps:
        return None
    units = [sorted({p for m in maps for p in m.unit(u)}) for u in range(group.size)]
    if any(not pos or pos[-1] >= n for pos in units):
        return None
    return units


def plan_from_metric(
    model: nn.Module,
    example_inputs: Any,
    metric: str,
    ratio: float | Mapping[str, float] | None = None,
    *,
    target: Mapping[str, float] | None = None,
    n_steps: int = 1,
    scope: str | None = None,
    round_to: int = 1,
    min_keep: int = 1,
    normalize: str | None = "mean",
    layer_ratios: Mapping[str, float] | None = None,
    kind_ratios: Mapping[str, float] | None = None,
    exclude: Sequence[str] = (),
    data: Iterable[Any] | None = None,
    criterion: str | Callable[..., torch.Tensor] | None = None,
    device: str | torch.device = "cpu",
    seed: int | None = None,
    metric_params: Mapping[str, Any] | None = None,
    max_batches: int | None = None,
    progress: bool = False,
    same_count: Iterable[Iterable[str]] | str | None = "auto",
    include_output: bool = False,
) -> PrunePlan:
    """Discover groups, score them, select units and plan: the whole ``pruneplan plan`` command.

    Coupled groups get the mean of their members' scores. The provenance records the metric and
    its parameters, the seed (random metrics), the selection policy with the requested and the
    achieved fraction, and the content digest of the scored weights (`weights_digest`), so that
    applying the plan to other weights warns. The same inputs and seed give a byte-identical plan.
    One INFO line on the ``pruneplan.loading`` logger says how many roots discovery left out and
    why (all of them: ``prunable_groups(...).left_out``).

    Selection, by ratio or by target:

    * ``ratio``: the fraction of units to remove (of every group with ``scope="layer"``, the
      default; of all units together with ``scope="global"``), or a mapping group kind -> ratio
      (``{"channels": 0.3, "heads": 0.25}``: the same as ``kind_ratios``, groups of the kinds
      not named keep their units). ``kind_ratios`` (group kind ->
      ratio, e.g. ``{"heads": 0.25}``; a group's kind is ``"channels"`` unless discovery says
      otherwise; with ``"heads"`` and no ``"query_groups"``, grouped-query attention is pruned
      by its query heads, the same count from every key/value head, instead of by its query
      groups: `GroupList.with_query_heads`) and ``layer_ratios`` (glob pattern over group and
      root names -> ratio; the first matching pattern wins; a pattern that matches
      ``<attention>.heads`` and not the query group's names prunes its query heads likewise)
      override it for some groups; with ``scope="global"`` each kind is ranked separately with
      its ratio, and ``layer_ratios`` are refused.
    * ``target``: ``{"macs": f}`` or ``{"params": f}``: remove at least the fraction ``f`` of
      the model's MACs or parameters (as `pruneplan.count` measures them on ``example_inputs``).
      Units are removed in one global ranking (normalised per group with ``normalize``) until the
      target is met: the first prefix of the ranking that meets it, found by bisection on the
      measured counts of the plans themselves (rounded to ``round_to`` and fitted to the config
      as below, so the plan measured is the plan returned). The ranking is in steps that keep
      the structure (`pruneplan.select.ranked_steps`): a unit; a round over the key/value heads
      for query heads; with equal counts per layer, that step in every layer at once. The plan
      one step shorter misses the target, so the result overshoots by less than what its last
      step removes (with ``round_to``, a block; for a Hugging Face hidden size, the channels
      the config fit adds with it). When the step that crosses the target removes more than
      the later steps of the other groups would need to, it is passed over for them (as a
      ratio's ranking passes over a step larger than what is left; up to 3 times), so that a
      coarse step does not set the overshoot where finer ones meet the target. The candidates
      are planned with logging silenced: only the returned plan's warnings are logged (a
      parameter target counts them from the plans' shapes, `params_after`; MACs are measured
      on a pruned copy). If even
      the whole ranking misses the target, the plan removes all of it and a warning says why
      (the floors each group keeps, and the parameters of tensors no group slices).

    For a model with a Hugging Face ``config`` (``same_count="auto"``), the groups whose width
    the config holds once for all layers (MLP width, query heads, key/value heads: the
    `pruneplan.hf_config.config_role` of the root's weight) lose the same number of units in
    every layer (the smallest count selected for any of them), a group with ``blocks > 1`` (the
    query heads of grouped-query attention) loses the same number in every block, and the hidden
    group keeps a size the config can hold with the heads that remain (a multiple of them, or
    exactly heads * head size where the config derives the head size as hidden / heads: BERT,
    GPT-2, ViT, DistilBERT; logged, with a warning when that is not the nearest count above the
    selection; with the hidden size not pruned, the head groups lose the largest smaller count,
    in whole rounds of ``blocks`` keeping a multiple of ``round_to``, that the hidden size
    holds, with a warning, or stay as selected when none does), so that the pruned model stays
    expressible; ``same_count=None`` leaves per-layer counts free, explicit sets of group names
    equalise those sets.

    ``include_output`` also plans the groups whose units reach the model output
    (`prunable_groups`): the hidden size of an encoder-decoder, whose output holds the encoder's
    last hidden state (T5, BART, Whisper); the output's shape changes with them.

    ``exclude`` (glob patterns over group and root names) leaves groups untouched. With
    ``n_steps > 1`` the model is pruned in steps, a copy is re-scored after each step and the
    step plans are composed into one plan relative to ``model``: the target grows linearly
    (step ``s`` of ``n`` removes up to ``f * s / n`` of the original amount), and so does a
    ratio (after step ``s`` a group has lost ``floor(ratio * size * s / n)`` of its original
    units; with ``scope="global"``, the kind's units together).

    Args:
        model: the model (not modified); it must already be on ``device``.
        example_inputs: a batch for discovery and counting (tensor or tuple of arguments).
        metric: a name of `METRICS`.
        seed: seed of the random metrics (`RANDOM_METRICS`); default 0 for them; refused for the
            others.
        metric_params: the metric's parameters (`METRIC_PARAMS`), e.g. ``{"sv_samples": 20}``,
            ``{"p": 1}``.
        max_batches: score on the first ``max_batches`` batches of ``data`` only.
        progress: tqdm progress bars on stderr while scoring.
        round_to, min_keep, normalize: as in `select_indices`.

    Returns:
        the plan (its groups in execution order). A warning is logged when it removes nothing or
        less than 90% of the requested units; when nothing is removed because discovery left out
        every root, the warning gives their count and most frequent reasons.

    Raises:
        PlanningError: bad ratio, target, n_steps, scope or option combination, an option the
            metric ignores, a pattern of ``layer_ratios`` or ``exclude`` that matches no
            prunable group (an ``exclude`` pattern may match a root discovery left out), a
            kind ratio for a kind not in `pruneplan.plan.KINDS` or not in [0, 1),
            everything excluded, or a model on the ``meta`` device (no data to score) with a
            metric other than ``"random"`` (its plan then records no content digest).
        UnsupportedOperationError: discovery meets an operation it does not understand.
        ExamplePassError: the model's own forward pass fails on ``example_inputs`` (naming the
            module where it failed and the inputs' shapes and dtypes).
        CriterionError: the criterion raises on the model's outputs and the data's targets
            (``cross_entropy`` with one target per token points to ``causal_lm``).
    """
    from pruneplan.apply import apply_plan, weights_digest
    from pruneplan.apply.content import no_data_message, tensors_without_data
    from pruneplan.compose import compose

    params = check_metric_options(metric, data=data, criterion=criterion, seed=seed,
                                  metric_params=metric_params, max_batches=max_batches)
    check_device(device)
    ratio, kind_ratios = _kind_mapping(ratio, kind_ratios)
    what, goal_frac = _check_target(target, ratio, layer_ratios, kind_ratios)
    if scope is None:
        scope = "global" if target else "layer"
    if target and scope != "global":
        raise PlanningError("a target ranks all units together: scope must be 'global'")
    if scope not in ("layer", "global"):
        raise PlanningError(f"scope must be 'layer' or 'global', got {scope!r}")
    if scope == "global" and layer_ratios:
        raise PlanningError("layer_ratios need scope='layer' (a global ranking has no per-layer ratio)")
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise PlanningError(f"n_steps must be a positive integer, got {n_steps!r}")
    if isinstance(exclude, str):
        exclude = [exclude]
    state = model.state_dict()
    empty = tensors_without_data(state)
    if empty and metric not in RANDOM_METRICS:
        raise PlanningError(no_data_message("model", empty, len(state)) + f": metric {metric!r} "
                            "scores the weights or the outputs they compute, so load the weights "
                            "first (prunable_groups and the 'random' metric work on the meta device)")
    scored_digest = None if empty else weights_digest(state)
    base = None
    if what is not None:
        from pruneplan.stats import count

        base = count(model, example_inputs, macs=what == "macs")
    current = model if n_steps == 1 else copy.deepcopy(model)
    plans: list[PrunePlan] = []
    requested = 0
    units = 0
    selected_units = 0  # units the ratio selection kept to remove (after round_to/min_keep)
    fit_lost = 0  # units the config fit (same_count) gave back
    shortfall: str | None = None  # why a target cannot be met (the most removable misses it)
    unscored: list[str] = []
    original: dict[str, int] = {}  # group -> unit count before the first step
    for step in range(1, n_steps + 1):
        found = prunable_groups(current, example_inputs, include_output=include_output)
        if step == 1:
            log.info("planning from %s: %s", metric, left_out_summary(found))
            left_first = list(getattr(found, "left_out", []))
        swap = _query_heads_wanted(found, kind_ratios, layer_ratios)
        if swap:
            found = found.with_query_heads(swap)
            if step == 1:
                log.info("the query heads of %d grouped-query attention layers are pruned (the "
                         "same count from every key/value head) instead of their query groups",
                         len(swap))
        order = execution_order(found)
        groups = _included(found, exclude, [lo.name for lo in getattr(found, "left_out", [])])
        if step == 1:
            units = sum(g.size for g in groups)
            original = {g.name: g.size for g in groups}
            kinds_first = {g.kind for g in groups}
        scores = score_groups(current, groups, metric, data, criterion, device, seed,
                              metric_params=params, max_batches=max_batches, progress=progress,
                              example_inputs=example_inputs)
        table = aggregate_scores(scores, groups)
        sets = _count_sets(current, groups, same_count)
        if what is not None:
            goal = getattr(base, what) * (1 - goal_frac * step / n_steps)
            removed, short = _select_target(current, example_inputs, groups, table, what, goal,
                                            round_to, min_keep, normalize, order, same_count)
            shortfall = shortfall or short
        else:
            def step_ratio(r: float, members: Sequence[GroupSpec], step: int = step,
                           original: dict[str, int] = original) -> float:
                """The ratio of what is left that brings ``members`` to ``floor(r * s / n)`` of
                their original units removed after step ``s`` of ``n``."""
                if n_steps == 1:
                    return r
                start = sum(original.get(g.name, g.size) for g in members)
                now = sum(g.size for g in members)
                due = math.floor(r * start * step / n_steps + 1e-9) - (start - now)
                return min(max(due, 0) / now, r) if now else 0.0

            removed, want = _select_ratio(groups, table, ratio or 0.0, scope, layer_ratios, kind_ratios,
                                          round_to, min_keep, normalize, step_ratio, sets)
            if step == 1:
                requested = want
                unscored = [g.name for g in groups if g.name not in table]
            selected = sum(len(v) for v in removed.values())
            removed = _config_fit(current, groups, table, removed, same_count, round_to)
            removed = keep_parts(removed, groups, table)  # no part of a split emptied
            fit_lost += selected - sum(len(v) for v in removed.values())
            selected_units += selected
        by_name = {g.name: g for g in groups}
        # a step plan's config problems are not the result's: told once, for the composed plan
        with quiet_logs() if n_steps > 1 else contextlib.nullcontext():
            made = build_plan(current, [(by_name[k], v) for k, v in removed.items()], order=order)
        if same_count == "auto" and made.config is not None and made.config.unsupported:
            made, lost = _fit_unheld(current, made, by_name, table, removed, order)
            fit_lost += lost
        plans.append(made)
        if n_steps > 1:
            with quiet_logs():
                apply_plan(current, made, check_content="off")
    plan = plans[0] if n_steps == 1 else _config_of_composed(model, compose(plans))
    check_runs(model, plan, example_inputs)  # refused, never returned, if the model breaks
    asked = goal_frac > 0 if what is not None else any(
        r > 0 for r in [ratio or 0.0, *(layer_ratios or {}).values(), *(kind_ratios or {}).values()])
    if units == 0 and asked:  # no group at all: every root left out (nothing silent)
        log.warning("the plan removes nothing: %s", nothing_prunable(left_first))

    crit = criterion if isinstance(criterion, str) or criterion is None else getattr(
        criterion, "__name__", "callable")
    metric_record = dict(params)
    if metric_needs_data(metric):
        metric_record["criterion"] = crit or "cross_entropy"
        if max_batches is not None:
            metric_record["max_batches"] = max_batches
    removed_units = sum(len(g.removed) for g in plan.groups)
    selection: dict[str, Any] = {"scope": scope, "round_to": round_to, "min_keep": min_keep,
                                 "normalize": normalize or "none", "aggregate": "mean"}
    if n_steps > 1:
        selection["n_steps"] = n_steps
    if exclude:
        selection["exclude"] = list(exclude)
    if what is not None:
        assert base is not None and target is not None
        from pruneplan.stats import count

        with quiet_logs():  # a copy for counting: its warnings are the plan's, logged already
            pruned = apply_plan(copy.deepcopy(model), plan, check_content="off")
        after = count(pruned, example_inputs, macs=what == "macs")
        achieved = 1 - getattr(after, what) / max(getattr(base, what), 1)
        selection["target"] = {what: goal_frac}
        selection["achieved"] = {what: round(achieved, 6)}
        if achieved + 1e-12 < goal_frac and units == 0:
            log.warning("target not met: removes %.2f%% of the %s, %.2f%% asked: no prunable group",
                        100 * achieved, _WHAT[what], 100 * goal_frac)
        elif achieved + 1e-12 < goal_frac:
            cause = shortfall or ("the steps' re-scoring left less to remove" if n_steps > 1 else
                                  "the plan the search chose misses it")
            log.warning("target not met: removes %.2f%% of the %s, %.2f%% asked: %s", 100 * achieved,
                        _WHAT[what], 100 * goal_frac, cause)
        else:
            log.info("target met: removes %.2f%% of the %s (%.2f%% asked)", 100 * achieved, _WHAT[what],
                     100 * goal_frac)
    else:
        selection["ratio"] = ratio if ratio is not None else 0.0
        if layer_ratios:
            selection["layer_ratios"] = dict(layer_ratios)
        if kind_ratios:
            selection["kind_ratios"] = dict(kind_ratios)
        selection["units"] = units
        selection["requested_units"] = requested
        selection["requested_fraction"] = round(requested / max(units, 1), 6)
        selection["achieved_fraction"] = round(removed_units / max(units, 1), 6)
        if unscored:
            selection["unscored_groups"] = unscored
        if unscored:
            log.warning("%d groups have no scores from %s and keep their units: %s", len(unscored),
                        metric, ", ".join(unscored[:5]) + (", ..." if len(unscored) > 5 else ""))
        floors = (ratio or 0.0) > 0 or any(r > 0 for r in (layer_ratios or {}).values()) or any(
            r > 0 and k in kinds_first for k, r in (kind_ratios or {}).items())
        if removed_units == 0 and requested == 0 and units > 0 and floors:  # nothing silent
            largest = max(original.values())
            where = (f"in each of the {len(original)} groups considered (the largest has {largest} "
                     f"units: a ratio below 1/{largest} removes none of it)" if scope == "layer" else
                     f"of each kind's units (scope 'global': {units} units in {len(original)} groups)")
            log.warning("the plan removes nothing: the ratios asked floor to 0 units %s", where)
        if removed_units < 0.9 * requested:
            why = []
            if selected_units < requested:
                why.append(f"round_to={round_to} and min_keep={min_keep} keep "
                           f"{requested - selected_units} of them")
            if fit_lost > 0:
                why.append(f"the config fit (same_count: equal counts per layer, whole rounds, a "
                           f"hidden size the heads divide) gives back {fit_lost}")
            if n_steps > 1 and not why:
                why.append(f"the {n_steps} steps' re-scoring keeps more")
            cause = "; ".join(why) or "the selection keeps more"
            if removed_units == 0:
                log.warning("the plan removes nothing: %d units were asked, but %s", requested, cause)
            else:
                log.warning("the plan removes %d units (%.1f%% of the %d units of the groups "
                            "considered), %d (%.1f%%) were asked: %s", removed_units,
                            100 * removed_units / max(units, 1), units, requested,
                            100 * requested / max(units, 1), cause)
    provenance = plan.provenance.model_copy(update={
        "metric": metric,
        "metric_params": metric_record,
        "seed": (0 if seed is None else seed) if metric in RANDOM_METRICS else None,
        "selection": selection,
        "weights_digest": scored_digest,
        "notes": plan.provenance.notes,
    })
    return PrunePlan.from_dict({**plan.model_dump(), "provenance": provenance.model_dump()})


_WHAT = {"macs": "MACs", "params": "parameters"}


def nothing_prunable(left_out: Sequence[Any], shown: int = 2) -> str:
    """Why a model offers no prunable group, in one line: how many roots discovery left out and
    the ``shown`` most frequent reasons (with how many roots each and the first root's name), for
    the warning of a plan that removes nothing. ``left_out``: `LeftOut` entries
    (``prunable_groups(...).left_out``). Raises nothing."""
    if not left_out:
        return ("the model has no prunable group and discovery left out no root (no Linear, Conv "
                "or Embedding ran on the example inputs)")
    reasons: dict[str, list[str]] = {}
    for lo in left_out:
        reasons.setdefault(lo.reason, []).append(lo.name)
    top = sorted(reasons.items(), key=lambda kv: -len(kv[1]))  # stable: first seen wins a tie
    parts = [f"{len(names)} root{'s' if len(names) > 1 else ''} ({names[0]!r}"
             f"{', ...' if len(names) > 1 else ''}): {reason}" for reason, names in top[:shown]]
    rest = sum(len(names) for _, names in top[shown:])
    others = len(top) - shown
    more = f"; {rest} more for {others} other reason{'s' if others > 1 else ''}" if rest else ""
    return (f"no prunable group: discovery left out all {len(left_out)} roots: " + "; ".join(parts)
            + more + " (prunable_groups(...).left_out, or `pruneplan groups`, lists every root "
            "with its reason)")


def stats_before_after(model: nn.Module, plan: PrunePlan, example_inputs: Any) -> tuple[Any, Any]:
    """`pruneplan.count` of ``model`` and of a pruned copy (``model`` is not modified).

    The copy is pruned without the weights-content check (the plan may come from other weights:
    only the shapes matter for counting).

    Raises:
        PlanMismatchError: the plan does not fit the model.
    """
    from pruneplan.apply import apply_plan
    from pruneplan.stats import count

    pruned = apply_plan(copy.deepcopy(model), plan, check_content="off")
    return count(model, example_inputs), count(pruned, example_inputs)


def _kind_mapping(ratio: Any, kind_ratios: Mapping[str, float] | None
                  ) -> tuple[float | None, Mapping[str, float] | None]:
    """``ratio`` given as a mapping of kinds becomes ``kind_ratios`` (groups of other kinds keep
    their units); kind names are checked against `KINDS`."""
    from pruneplan.plan import KINDS

    if isinstance(ratio, Mapping):
        if kind_ratios:
            raise PlanningError("give the kinds' ratios either as ratio={kind: r} or as kind_ratios, "
                                "not both")
        ratio, kind_ratios = None, dict(ratio)
    for kind, r in (kind_ratios or {}).items():
        if kind not in KINDS:
            raise PlanningError(f"ratio given for kind {kind!r}, which is not one of {KINDS}")
        if not _valid(r):
            raise PlanningError(f"ratio for kind {kind!r} must be a number in [0, 1), got {r!r}")
    return ratio, kind_ratios


def _check_target(target: Mapping[str, float] | None, ratio: float | None,
                  layer_ratios: Mapping[str, float] | None,
                  kind_ratios: Mapping[str, float] | None) -> tuple[str | None, float]:
    if target is None:
        if ratio is None and not layer_ratios and not kind_ratios:
            raise PlanningError("give a ratio (or layer_ratios / kind_ratios) or a target")
        return None, 0.0
    if ratio is not None or layer_ratios or kind_ratios:
        raise PlanningError("give either a target or ratios, not both")
    if not isinstance(target, Mapping) or len(target) != 1:
        raise PlanningError(f"target must be one of {{'macs': f}} or {{'params': f}}, got {target!r}")
    (what, frac), = target.items()
    if what not in TARGETS:
        raise PlanningError(f"target {what!r} is not one of {TARGETS}")
    if isinstance(frac, bool) or not isinstance(frac, int | float) or not 0 < frac < 1:
        raise PlanningError(f"target {what!r} must be a fraction in (0, 1) to remove, got {frac!r}")
    return what, float(frac)


def _query_heads_wanted(found: Any, kind_ratios: Mapping[str, float] | None,
                        layer_ratios: Mapping[str, float] | None) -> list[str]:
    """The query-group groups to replace by their query heads (`GroupList.with_query_heads`):
    all of them when ``kind_ratios`` names ``"heads"`` but not ``"query_groups"``, and those
    whose alternative's name (``<attention>.heads``) a ``layer_ratios`` pattern matches while
    none matches the group's own names."""
    alts = getattr(found, "alternatives", [])
    if kind_ratios and "heads" in kind_ratios and "query_groups" not in kind_ratios:
        return [a.alternative_to for a in alts]
    patterns = list(layer_ratios or {})
    by_name = {g.name: g for g in found}

    def hit(names: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)

    return [a.alternative_to for a in alts if a.alternative_to in by_name and hit([a.name])
            and not hit(_names(by_name[a.alternative_to]))]


def _names(g: GroupSpec) -> list[str]:
    return list(dict.fromkeys((g.name, *g.roots)))


def _included(groups: Sequence[GroupSpec], exclude: Sequence[str],
              left_out: Sequence[str] = ()) -> list[GroupSpec]:
    """The groups none of whose names match an ``exclude`` pattern.

    Raises:
        PlanningError: a pattern matches no prunable group (nor a root discovery left out), or
            every group is excluded.
    """
    if not exclude:
        return list(groups)
    used = set()
    kept = []
    for g in groups:
        hit = [p for p in exclude if any(fnmatch.fnmatchcase(n, p) for n in _names(g))]
        used.update(hit)
        if not hit:
            kept.append(g)
    for p in exclude:
        if p in used:
            continue
        if any(fnmatch.fnmatchcase(n, p) for n in left_out):
            log.info("exclude pattern %r matches only roots that are not pruned anyway", p)
            continue
        raise PlanningError(f"exclude pattern {p!r} matches no prunable group{_hint(p, groups)}")
    if not kept:
        raise PlanningError(f"exclude {list(exclude)} leaves no group to prune")
    log.info("excluded %d of %d groups", len(groups) - len(kept), len(groups))
    return kept


def _hint(pattern: str, groups: Sequence[GroupSpec]) -> str:
    """``"; did you mean 'a', 'b'?"`` from the group and root names closest to ``pattern``."""
    import difflib

    names = list(dict.fromkeys(n for g in groups for n in _names(g)))
    close = difflib.get_close_matches(pattern, names, n=3)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def _kind(g: GroupSpec) -> str:
    return getattr(g, "kind", None) or "channels"


def _fit_unheld(
    model: nn.Module, plan: PrunePlan, by_name: Mapping[str, GroupSpec], table: Mapping[str, np.ndarray],
    removed: dict[str, list[int]], order: Mapping[str, int],
) -> tuple[PrunePlan, int]:
    """The plan made expressible by the model's config (a Hugging Face model,
    ``same_count="auto"``), and the units this gave back.

    Found by building the model the rewritten config describes (`pruneplan._hf_verify.misfits`).
    Where that model has another length on a tensor axis that one group owns, the group is
    given the count that makes the length the config builds, its lowest-scored units going (a
    width derived from another: Bloom's MLP of ``4 * hidden_size``, a sequence classifier's
    hidden layer sized by ``hidden_size``; never the hidden size itself, chosen with the heads);
    where no such count exists, the group is left out;
    where no group owns such an axis, the groups slicing those tensors are left out. Repeated
    until the config holds the plan (or 4 rounds); every change is logged with a warning.
    """
    from pruneplan._hf_verify import misfits

    removed = dict(removed)
    before = sum(len(v) for v in removed.values())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    from pruneplan.hf_config import HEADS_KEYS

    values = model.config.to_dict()
    # where the config holds one head count, the hidden size was chosen with the heads
    # (_hidden_multiple_of_heads): the other widths follow it, not the reverse
    hidden = _hidden_groups(list(by_name.values())) if any(
        isinstance(values.get(k), int) for k in HEADS_KEYS) else set()
    owners: dict[tuple[str, int], list[str]] = {}
    for name, g in by_name.items():
        for s in g.slices:
            owners.setdefault((s.tensor, s.axis), []).append(name)
    for _ in range(4):
        wrong = misfits(model, plan)
        if not wrong:
            break
        fitted: dict[str, int] = {}
        drop: list[str] = []
        for t, (want, built) in sorted(wrong.items()):
            for a in range(len(want)):
                if built is not None and len(built) == len(want) and built[a] == want[a]:
                    continue
                names = owners.get((t, a), [])
                if len(names) != 1 or names[0] in fitted or names[0] in drop or names[0] in hidden:
                    continue
                g = by_name[names[0]]
                n = shapes[t][a]
                per, rest = divmod(n, g.size)
                k = (n - built[a]) // per if built is not None and len(built) == len(want) and not rest \
                    and (n - built[a]) % per == 0 else -1
                if 0 <= k < g.size and g.name in table:
                    fitted[g.name] = k
                else:
                    drop.append(g.name)
        if not fitted and not drop:
            drop = [n for n in removed if any(s.tensor in wrong for s in by_name[n].slices)]
        if not fitted and not drop:
            break
        for n, k in fitted.items():
            removed[n] = sorted(int(u) for u in _lowest(table[n], k)) if k else []
            if k:
                log.warning("group %r loses %d units so that the model's config holds it (a "
                            "model built from the rewritten config has that width)", n, k)
            else:
                log.warning("group %r keeps all its units: a model built from the rewritten "
                            "config has its full width (no config key holds it pruned)", n)
        for n in drop:
            removed.pop(n, None)
        if drop:
            t, (w, b) = next(iter(sorted(wrong.items())))
            log.warning("left out of the plan: %s (no key of the model's config holds the width "
                        "pruning %s would give, e.g. %s pruned to %s, a model built from the config "
                        "has %s)", ", ".join(drop), "it" if len(drop) == 1 else "them", t, w, b)
        removed = {k: v for k, v in removed.items() if v}
        plan = build_plan(model, [(by_name[k], v) for k, v in removed.items()], order=order)
    return plan, before - sum(len(v) for v in removed.values())


def _select_ratio(
    groups: Sequence[GroupSpec], table: Mapping[str, np.ndarray], ratio: float, scope: str,
    layer_ratios: Mapping[str, float] | None, kind_ratios: Mapping[str, float] | None, round_to: int,
    min_keep: int, normalize: str | None, step: Callable[[float, Sequence[GroupSpec]], float],
    sets: Sequence[Sequence[str]] = (),
) -> tuple[dict[str, list[int]], int]:
    """Indices per group by ratio, and the number of units asked for (before rounding/floors).

    The groups go to `select_indices` with their structure (a group's ``blocks``: the query
    heads of grouped-query attention lose the same count, the lowest-scored, from every
    key/value head) and ``sets`` (groups that must lose equal counts: ranked together with
    ``scope="global"``)."""
    present = [g for g in groups if g.name in table]
    kinds = kind_ratios or {}
    unknown = sorted(set(kinds) - {_kind(g) for g in groups})
    if unknown:
        log.warning("kind_ratios names %s, but no group has that kind", unknown)
    if scope == "layer":
        per: dict[str, float] = {}
        used: set[str] = set()
        for g in present:
            r = kinds.get(_kind(g), ratio)
            for pattern, value in (layer_ratios or {}).items():
                if any(fnmatch.fnmatchcase(n, pattern) for n in _names(g)):
                    r = value
                    used.add(pattern)
                    break
            per[g.name] = r
        missing = [p for p in (layer_ratios or {}) if p not in used]
        if missing:
            raise PlanningError(f"layer_ratios pattern {missing[0]!r} matches no prunable group"
                                f"{_hint(missing[0], groups)}")
        asked = sum(math.floor(per[g.name] * g.size + 1e-9) for g in present if _valid(per[g.name]))
        by_name = {g.name: g for g in present}
        # the groups go along for their blocks: the query heads of grouped-query attention lose
        # the same number from every key/value head
        return select_indices({n: table[n] for n in per}, {n: step(r, [by_name[n]]) for n, r in per.items()},
                              scope="layer", round_to=round_to, min_keep=min_keep,
                              normalize=normalize, groups=present, same_count=sets), asked
    out: dict[str, list[int]] = {}
    asked = 0
    by_kind: dict[str, list[GroupSpec]] = {}
    for g in present:
        by_kind.setdefault(_kind(g), []).append(g)
    for kind, members in by_kind.items():
        r = kinds.get(kind, ratio)
        if _valid(r):
            asked += math.floor(r * sum(g.size for g in members) + 1e-9)
        names = {g.name for g in members}
        out.update(select_indices({g.name: table[g.name] for g in members}, step(r, members), scope="global",
                                  round_to=round_to, min_keep=min_keep, normalize=normalize,
                                  groups=members, same_count=[[m for m in s if m in names] for s in sets]))
    return out, asked


def _valid(r: Any) -> bool:
    return not isinstance(r, bool) and isinstance(r, int | float) and 0 <= r < 1


def _select_target(
    model: nn.Module, example_inputs: Any, groups: Sequence[GroupSpec], table: Mapping[str, np.ndarray],
    what: str, goal: float, round_to: int, min_keep: int, normalize: str | None, order: Mapping[str, int],
    same_count: Iterable[Iterable[str]] | str | None = None,
) -> tuple[dict[str, list[int]], str | None]:
    """The smallest prefix of the global ranking whose plan leaves at most ``goal`` MACs/params,
    and, when even the whole ranking leaves more, why (else ``None``).

    The ranking is in steps that keep the structure (`pruneplan.select.ranked_steps`: rounds over
    the key/value heads for query heads, the groups of a ``same_count`` set together), and every
    candidate is measured as it would be planned: rounded to ``round_to``, fitted to the config
    (`_config_fit`: a hidden size the remaining heads divide) and with no part of a split
    emptied, so the returned selection is the one that was measured. The candidates are planned
    with logging silenced; only the returned selection's fit logs its warnings. A crossing step
    (the last of the first prefix that meets the goal) is passed over, up to ``_PASSES`` times,
    when the steps after it, without those of its groups, meet the goal removing less.
    """
    from pruneplan.select import _NORMS, _limits, _lowest_per_block, _pick, _whole_rounds, ranked_steps
    from pruneplan.stats import count

    norm = "none" if normalize is None else normalize
    if norm not in _NORMS:
        raise PlanningError(f"normalize must be one of {_NORMS} or None, got {normalize!r}")
    present = sorted((g for g in groups if g.name in table), key=lambda g: order.get(g.name, 0))
    normed = {g.name: _normalize(table[g.name], norm) for g in present}
    blocks = {g.name: g.blocks for g in present
              if isinstance(getattr(g, "blocks", 1), int) and g.blocks > 1 and g.size % g.blocks == 0}
    sets = _count_sets(model, present, same_count)
    steps = ranked_steps(normed, blocks, sets, min_keep, rank=order)
    by_name = {g.name: g for g in present}
    limits = {g.name: _limits(g) for g in present}

    def counted(chosen: Sequence[tuple[tuple[str, ...], int]]) -> dict[str, int]:
        counts = dict.fromkeys(by_name, 0)
        for members, _ in chosen:
            for m in members:
                counts[m] += blocks.get(m, 1)
        return counts

    def removed_for(chosen: Sequence[tuple[tuple[str, ...], int]]) -> dict[str, list[int]]:
        counts = counted(chosen)
        raw = {}
        for g in present:
            b = blocks.get(g.name, 1)
            n = g.size - keep_count(g.size, g.size - counts[g.name], round_to, min_keep)
            if b > 1:
                n = _whole_rounds(g.size, n, b, round_to, min_keep)
            if n > 0:
                raw[g.name] = (_lowest_per_block(normed[g.name], n, b) if b > 1
                               else _pick(normed[g.name], n, limits[g.name]))
        fitted = _config_fit(model, present, table, raw, same_count, round_to)
        return keep_parts(fitted, present, table)

    measured: dict[tuple[int, ...], int] = {}

    def left(chosen: Sequence[tuple[tuple[str, ...], int]]) -> int:
        key = tuple(counted(chosen).values())  # the selection depends on the counts only
        if key not in measured:
            with quiet_logs():
                removed = removed_for(chosen)
                if removed:
                    plan = build_plan(model, [(by_name[n], v) for n, v in removed.items()], order=order)
                    if same_count == "auto" and plan.config is not None and plan.config.unsupported:
                        plan, _ = _fit_unheld(model, plan, by_name, table, removed, order)  # as returned
                    if what == "params":  # from the plan's shapes: no copy to prune and count
                        measured[key] = params_after(model, plan)
                        return measured[key]
                    pruned = apply_plan_copy(model, plan)
                else:
                    pruned = model
                measured[key] = getattr(count(pruned, example_inputs, macs=what == "macs"), what)
        return measured[key]

    def first(base: list, more: list) -> int:
        """The smallest ``m`` with ``base + more[:m]`` meeting the goal (``more`` whole does);
        ``base + more[:m - 1]`` misses it once ``m > 0``."""
        lo, hi = 0, len(more)
        while lo < hi:
            mid = (lo + hi) // 2
            if left(base + more[:mid]) <= goal:
                hi = mid
            else:
                lo = mid + 1
        return lo

    if left(steps) > goal:
        most = removed_for(steps)
        fitted = bool(sets) or (same_count == "auto" and callable(
            getattr(getattr(model, "config", None), "to_dict", None)))
        return most, _unreachable(model, present, most, what, min_keep, round_to, fitted)
    k = first([], steps)
    chosen, pending = steps[:k], steps
    passed: list[tuple[str, ...]] = []
    while k > 0 and len(passed) < _PASSES:
        # the step that crosses the goal may remove much more than needed (a hidden size that
        # must stay a multiple of the heads moves by a whole multiple): pass it over, as a
        # ratio's ranking passes over a step larger than what is left, and take the following
        # steps of the other groups instead when that meets the goal removing less
        crossing = pending[k - 1][0]
        base, rest = pending[:k - 1], [st for st in pending[k:] if st[0] != crossing]
        if not rest or left(base + rest) > goal:
            break
        m = first(base, rest)
        if left(base + rest[:m]) <= left(chosen):
            break
        chosen, pending, k = base + rest[:m], base + rest, len(base) + m
        passed.append(crossing)
    if passed:
        log.info("target: passed over %d steps of the ranking that crossed the goal removing more "
                 "than needed (of %s)", len(passed), ", ".join(sorted({n for c in passed for n in c})))
    log.info("target: %d of %d steps of the ranking (%d plans measured)", len(chosen), len(steps),
             len(measured))
    return removed_for(chosen), None


def _config_of_composed(model: nn.Module, plan: PrunePlan) -> PrunePlan:
    """``plan`` (the composed step plans) with its config part measured on ``model`` as one
    plan's is (the steps' parts carry the problems of intermediate models, whose configs could
    not say their widths), its problems logged once as `build_plan` logs them.

    Raises:
        ConfigError: the plan leaves grouped-query attention uneven.
    """
    from pruneplan.plan import required_version
    from pruneplan.planner import hf_config_edits

    config = hf_config_edits(model, plan)
    if config is None:
        return plan
    for problem in config.problems():
        log.warning("the model's config cannot express this plan (applying it to a checkpoint "
                    "folder will be refused): %s", problem)
    return PrunePlan.from_dict({**plan.model_dump(), "config": config.model_dump(),
                                "version": required_version(plan.groups, config)})


_PASSES = 3  # crossing steps a target search may pass over, each a bisection of its own


def params_after(model: nn.Module, plan: PrunePlan) -> int:
    """The parameter scalars ``model`` holds once ``plan`` is applied (shared parameters once,
    as `pruneplan.count` counts them), from the plan's `PrunePlan.pruned_shapes`: no copy is
    pruned. Raises nothing."""
    shapes = plan.pruned_shapes()
    by_id: dict[int, Sequence[int]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in shapes or id(p) not in by_id:
            by_id[id(p)] = shapes.get(name, tuple(p.shape))
    return sum(math.prod(s) for s in by_id.values())


def apply_plan_copy(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """A pruned deep copy of ``model`` (no weights-content check: only shapes matter)."""
    from pruneplan.apply import apply_plan

    return apply_plan(copy.deepcopy(model), plan, check_content="off")


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """Drop the records below ERROR of the library's loggers (``pruneplan`` and every
    ``pruneplan.*``, whatever level each is set to) for the block: candidate plans of a search,
    copies pruned for counting. The loggers are as before afterwards. Raises nothing."""
    names = ["pruneplan", *(n for n in list(logging.Logger.manager.loggerDict) if n.startswith("pruneplan."))]
    loggers = [logging.getLogger(n) for n in names]
    quiet = _BelowError()
    for lg in loggers:
        lg.addFilter(quiet)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(quiet)


def _unreachable(model: nn.Module, groups: Sequence[GroupSpec], removed: Mapping[str, Sequence[int]],
                 what: str, min_keep: int, round_to: int, fitted: bool) -> str:
    """Why the whole ranking misses a target: the floors the groups keep, and the parameters of
    tensors no group slices."""
    kept = sum(g.size - len(removed.get(g.name, ())) for g in groups)
    floors = f"each group keeps at least min_keep={min_keep} unit(s), a multiple of round_to={round_to}"
    if fitted:
        floors += ", and the config fit keeps equal counts per layer and a hidden size the heads divide"
    sliced = {s.tensor for g in groups for s in g.slices}
    seen: set[int] = set()
    outside = 0
    for _, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if not any(n in sliced for n in _aliases(model, p)):
            outside += p.numel()
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    where = (f"; {outside} of the {total} parameters ({100 * outside / max(total, 1):.1f}%) are in "
             "tensors that no prunable group slices" if what == "params" and outside else "")
    return (f"even removing every unit the selection may take ({floors}: {kept} of "
            f"{sum(g.size for g in groups)} units kept) misses it{where}; lower min_keep/round_to, "
            "exclude fewer groups or set a smaller target")


def _aliases(model: nn.Module, p: torch.Tensor) -> list[str]:
    """Every name under which ``model`` holds the parameter ``p`` (tied weights have several)."""
    return [n for n, q in model.named_parameters(remove_duplicate=False) if q is p]


def _config_fit(
    model: nn.Module, groups: Sequence[GroupSpec], table: Mapping[str, np.ndarray],
    removed: dict[str, list[int]], same_count: Iterable[Iterable[str]] | str | None,
    round_to: int = 1,
) -> dict[str, list[int]]:
    """Equal counts in ``same_count`` sets, whole rounds over GQA blocks, hidden % heads."""
    sets = _count_sets(model, groups, same_count)
    counts = {n: len(v) for n, v in removed.items()}
    sizes = {g.name: g.size for g in groups}
    for members in sets:
        present = [m for m in dict.fromkeys(members) if m in table]
        if present:
            k = min(counts.get(m, 0) for m in present)
            counts.update({m: k for m in present})
    fitted = select_indices({n: table[n] for n in table if counts.get(n)},
                            {n: (counts[n] + 0.5) / sizes[n] for n in table if counts.get(n)},
                            normalize=None, groups=[g for g in groups if counts.get(g.name)],
                            min_keep=1)
    # select_indices rounds GQA blocks down; keep the original choice where the count is unchanged
    out = {n: (removed[n] if len(removed.get(n, ())) == len(v) else v) for n, v in fitted.items()}
    if same_count == "auto":
        out = _hidden_multiple_of_heads(model, groups, table, out)
        out = _heads_fit_hidden(model, groups, table, out, round_to)
    return out


def _count_sets(model: nn.Module, groups: Sequence[GroupSpec],
                same_count: Iterable[Iterable[str]] | str | None) -> list[list[str]]:
    """The sets of group names that lose equal counts: `config_count_sets` for ``"auto"``,
    none for ``None``, else the sets given.

    Raises:
        PlanningError: ``same_count`` is another string.
    """
    if same_count == "auto":
        return config_count_sets(model, groups)
    if isinstance(same_count, str):
        raise PlanningError(f"same_count must be 'auto', None or sets of group names, got {same_count!r}")
    return [list(s) for s in same_count or ()]


def config_count_sets(model: nn.Module, groups: Sequence[GroupSpec]) -> list[list[str]]:
    """Sets of groups that must lose equal counts so that the model's config can hold them.

    Empty unless ``model`` has a Hugging Face-style ``config`` (``to_dict``): then the groups of
    each kind, size and config role (`pruneplan.hf_config.config_role` of their first root's
    weight: MLP width, query heads, key/value heads) form one set.
    """
    from pruneplan.hf_config import config_role

    if not callable(getattr(getattr(model, "config", None), "to_dict", None)):
        return []
    sets: dict[tuple, list[str]] = {}
    for g in groups:
        role = config_role(f"{g.roots[0]}.weight")
        if role is not None and role != "hidden":
            sets.setdefault((role, getattr(g, "kind", "channels"), g.size), []).append(g.name)
    return [names for _, names in sorted(sets.items()) if len(names) > 1]


def _hidden_groups(groups: Sequence[GroupSpec]) -> set[str]:
    """The groups that are a hidden size (the residual stream) the config holds: where head
    groups exist, the channels groups slicing a tensor that a head group slices on the other
    axis of a 2-D weight (the output projection's rows, the query projection's columns: by
    kind, so ALBERT's encoder width counts and its smaller embedding width does not);
    otherwise the groups whose roots' weights the config table reads as the hidden size."""
    from pruneplan.hf_config import config_role

    heads_axes = {(s.tensor, s.axis) for g in groups if getattr(g, "kind", "channels") != "channels"
                  for s in g.slices}
    if heads_axes:
        return {g.name for g in groups if getattr(g, "kind", "channels") == "channels" and any(
            (s.tensor, 1 - s.axis) in heads_axes for s in g.slices if s.axis in (0, 1))}
    return {g.name for g in groups if any(config_role(f"{r}.weight") == "hidden" for r in g.roots)}


def _fit_values(model: nn.Module, values: dict[str, Any]) -> dict[str, Any]:
    """The config as `pruneplan.hf_config.hidden_fits` should read it: a config with
    ``num_key_value_heads`` and no ``head_dim`` value is read as Llama's (the model reads a
    ``head_dim`` when one is written, so the hidden size need only be a multiple of the heads),
    unless the model ignores a written ``head_dim`` (StableLM derives the head size as hidden /
    heads): then it is given without ``num_key_value_heads``, which `hidden_fits` reads as a
    derived head size. Found by building the model on ``meta`` at twice the hidden size with
    and without ``head_dim``: the same shapes mean it is ignored."""
    from pruneplan._hf_verify import _shapes_of
    from pruneplan.hf_config import HEAD_DIM_KEYS, HEADS_KEYS, HIDDEN_KEYS, KV_KEYS

    kv = next((k for k in KV_KEYS if k in values), None)
    hidden_key = next((k for k in HIDDEN_KEYS if isinstance(values.get(k), int)), None)
    heads_key = next((k for k in HEADS_KEYS if isinstance(values.get(k), int)), None)
    if kv is None or hidden_key is None or heads_key is None or any(
            isinstance(values.get(k), int) for k in HEAD_DIM_KEYS):
        return values
    config = model.config
    hidden, heads = values[hidden_key], values[heads_key]
    if not heads or hidden % heads:
        return values
    wider = _shapes_of(model, config, {hidden_key: 2 * hidden})
    written = _shapes_of(model, config, {hidden_key: 2 * hidden, "head_dim": hidden // heads})
    if isinstance(wider, str) or isinstance(written, str) or wider != written:
        return values
    return {k: v for k, v in values.items() if k != kv}


def _query_heads_group(g: GroupSpec, heads: int) -> bool:
    """Whether ``g`` is the query heads of an attention the config's head count describes: a
    group of kind ``"heads"`` or ``"query_groups"`` whose size divides it (by kind, whatever
    the projections are called: DeBERTa's ``query_proj``, a fused ``query_key_value``)."""
    return (bool(g.roots) and getattr(g, "kind", "channels") in ("heads", "query_groups")
            and heads % g.size == 0)


def _heads_fit_hidden(
    model: nn.Module, groups: Sequence[GroupSpec], table: Mapping[str, np.ndarray],
    removed: dict[str, list[int]], round_to: int = 1,
) -> dict[str, list[int]]:
    """For a Hugging Face model whose hidden size this selection leaves as it is, keep a query
    head count the config can hold with it (`pruneplan.hf_config.hidden_fits`: Llama-style
    configs refuse a hidden size that is not a multiple of the heads): when the heads that
    remain do not fit, every head group (config role ``"heads"``, all losing the same number of
    query heads) loses fewer, the largest count that fits, in whole rounds over its ``blocks``
    and keeping a multiple of ``round_to``; its lowest-scored units go. Logged with a warning;
    nothing changes when no smaller positive count fits (a config deriving the head size as
    hidden / heads fits none) or the layers lose different counts: the plan's config part then
    says why a checkpoint cannot hold it (the live model can still be pruned).
    """
    from pruneplan.hf_config import HEADS_KEYS, HIDDEN_KEYS, hidden_fits
    from pruneplan.select import _lowest_per_block

    config = getattr(model, "config", None)
    if not callable(getattr(config, "to_dict", None)):
        return removed
    values = _fit_values(model, config.to_dict())
    heads = next((values[k] for k in HEADS_KEYS if isinstance(values.get(k), int)), None)
    hidden = next((values[k] for k in HIDDEN_KEYS if isinstance(values.get(k), int)), None)
    if not heads or not hidden:
        return removed
    hidden_names = _hidden_groups(groups)
    if any(g.name in removed and g.name in hidden_names
           for g in groups):
        return removed  # the hidden size changes: fitted to the heads by _hidden_multiple_of_heads
    head_groups = [g for g in groups if _query_heads_group(g, heads) and g.name in removed]
    lost = {len(removed[g.name]) * (heads // g.size) for g in head_groups}
    if len(lost) != 1:
        return removed
    was = lost.pop()
    if hidden_fits(values, hidden, heads - was):
        return removed

    def units(g: GroupSpec, n_heads: int) -> int | None:
        per = heads // g.size  # query heads per unit
        n = n_heads // per
        b = max(getattr(g, "blocks", 1), 1)
        kept = g.size - n
        ok = n_heads % per == 0 and n % b == 0 and (kept % round_to == 0 or kept == g.size)
        return n if ok else None

    fit = next((k for k in range(was - 1, 0, -1) if hidden_fits(values, hidden, heads - k)
                and all(units(g, k) is not None for g in head_groups)), None)
    if fit is None:
        log.warning("no smaller head count than the %d selected per layer fits the config's hidden "
                    "size %d; kept as selected (the plan's config part says why)", was, hidden)
        return removed
    log.warning("the query heads lose %d per layer instead of the %d selected: the config's "
                "hidden size %d must stay a multiple of the heads that remain (%d, not %d)",
                fit, was, hidden, heads - fit, heads - was)
    out = dict(removed)
    for g in head_groups:
        n = units(g, fit) or 0
        b = max(getattr(g, "blocks", 1), 1)
        out[g.name] = _lowest_per_block(table[g.name], n, b) if n else []
    return {k: v for k, v in out.items() if v}


def _hidden_multiple_of_heads(
    model: nn.Module, groups: Sequence[GroupSpec], scores: Mapping[str, Any],
    removed: dict[str, list[int]],
) -> dict[str, list[int]]:
    """For a Hugging Face model, keep a hidden size the config can hold with the heads that
    remain (`pruneplan.hf_config.hidden_fits`): a multiple of the remaining query heads (Llama
    validates it), or exactly heads * head size where the config derives the head size as
    hidden / heads (BERT, GPT-2, ViT, DistilBERT).

    The remaining heads are the config's count less what the head groups (config role
    ``"heads"``) lose; when they lose different counts per layer nothing is changed (the config
    refuses such a plan anyway). The hidden group (roots whose weight is an embedding, role
    ``"hidden"``) keeps the nearest valid count at or above the selected one, getting back its
    highest-scored removed units; with none above (a derived head size and heads pruned more
    than the hidden size), the nearest below, losing its lowest-scored kept units, with a
    warning. No valid count: left as selected, with a warning (the plan's config part says why).
    """
    from pruneplan.hf_config import HEADS_KEYS, hidden_fits
    from pruneplan.select import aggregate_scores

    config = getattr(model, "config", None)
    if not callable(getattr(config, "to_dict", None)):
        return removed
    values = _fit_values(model, config.to_dict())
    heads = next((values[k] for k in HEADS_KEYS if isinstance(values.get(k), int)), None)
    if not heads:
        return removed
    lost = set()
    for g in groups:
        if _query_heads_group(g, heads):
            lost.add(len(removed.get(g.name, ())) * (heads // g.size))
    if len(lost) > 1:
        return removed
    remaining = heads - (lost.pop() if lost else 0)
    table = aggregate_scores(scores, groups)
    hidden_names = _hidden_groups(groups)
    out = dict(removed)
    for g in groups:
        if g.name not in out or g.name not in hidden_names:
            continue
        rem = out[g.name]
        kept = g.size - len(rem)
        fits = [k for k in range(1, g.size + 1) if hidden_fits(values, k, remaining)]
        if not fits:
            log.warning("group %r: no hidden size up to %d fits %d heads in the config; kept as "
                        "selected (%d)", g.name, g.size, remaining, kept)
            continue
        up = [k for k in fits if k >= kept]
        want = up[0] if up else fits[-1]
        if want == kept:
            continue
        order = table[g.name]
        if want > kept:
            back = set(sorted(rem, key=lambda u: (-order[u], u))[:want - kept])
            out[g.name] = [u for u in rem if u not in back]
        else:
            gone = set(rem)
            more = sorted((u for u in range(g.size) if u not in gone), key=lambda u: (order[u], u))
            out[g.name] = sorted(gone | set(more[:kept - want]))
        if len(fits) > 1:
            log.info("group %r keeps %d hidden channels (selected: %d) so that the config can hold "
                     "them with %d heads", g.name, want, kept, remaining)
        else:
            log.warning("group %r keeps %d hidden channels instead of the %d selected: the config "
                        "derives the head size from hidden / heads, and %d heads remain", g.name,
                        want, kept, remaining)
    return {k: v for k, v in out.items() if v}
