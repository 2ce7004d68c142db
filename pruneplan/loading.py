"""What the ``pruneplan plan`` / ``pruneplan groups`` commands need: loading models and data
from ``pkg.module:factory`` specs, example inputs, and one call from a metric to a plan.

This is a convenience layer on top of the public API (discovery, attributions, selection,
planner); the CLI stays a thin wrapper around it.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pruneplan.errors import PlanningError
from pruneplan.graph.discover import left_out_summary, prunable_groups
from pruneplan.graph.spec import Group as GroupSpec
from pruneplan.plan import PrunePlan
from pruneplan.planner import build_plan
from pruneplan.select import select_indices

__all__ = [
    "CRITERIA",
    "DATA_FREE_METRICS",
    "METRICS",
    "example_input",
    "load_factory",
    "load_model",
    "metric_needs_data",
    "parse_input_shape",
    "plan_from_metric",
    "score_groups",
]

log = logging.getLogger(__name__)

#: metric name (CLI spelling) -> attribution class name in `pruneplan.attributions`
METRICS = {
    "weight_norm": "WeightNormAttributionMetric",
    "random": "RandomAttributionMetric",
    "apoz": "APoZAttributionMetric",
    "sensitivity": "SensitivityAttributionMetric",
    "taylor": "TaylorAttributionMetric",
    "shapley": "ShapleyAttributionMetric",
}
DATA_FREE_METRICS = ("weight_norm", "random")
CRITERIA: dict[str, Callable[..., torch.Tensor]] = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}


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
    then load ``weights`` (safetensors, or a ``torch.save``-d state dict) strictly."""
    obj = load_factory(spec)
    model = obj if isinstance(obj, nn.Module) else obj() if callable(obj) else obj
    if not isinstance(model, nn.Module):
        raise PlanningError(f"{spec!r} gave a {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise PlanningError(f"weights file {str(path)!r} does not exist")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            what = (f"missing {result.missing_keys[:3]}" if result.missing_keys
                    else f"unexpected {result.unexpected_keys[:3]}")
            raise PlanningError(f"{path}: weights do not fit {spec!r}: {what}")
    return model.eval()


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"3,224,224"`` -> ``(3, 224, 224)`` (the shape of one example, without the batch)."""
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise PlanningError(f"input shape must be comma-separated integers, got {text!r}") from None
    if not shape or any(d < 1 for d in shape):
        raise PlanningError(f"input shape must be positive integers, got {text!r}")
    return shape


def example_input(shape: Sequence[int], batch_size: int = 1, dtype: torch.dtype = torch.float32,
                  seed: int = 0) -> torch.Tensor:
    """A deterministic example batch of ``shape`` (random normal; zeros for integer dtypes)."""
    full = (batch_size, *shape)
    if dtype.is_floating_point:
        return torch.randn(full, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return torch.zeros(full, dtype=dtype)


def metric_needs_data(metric: str) -> bool:
    """Whether ``metric`` reads data (and so needs ``--data``)."""
    if metric not in METRICS:
        raise PlanningError(f"unknown metric {metric!r}; choose from {sorted(METRICS)}")
    return metric not in DATA_FREE_METRICS


def score_groups(
    model: nn.Module,
    groups: Sequence[GroupSpec],
    metric: str,
    data: Iterable[Any] | None = None,
    criterion: str | Callable[..., torch.Tensor] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Scores of every root module of ``groups`` with the named metric (member name -> array).

    Members whose score count differs from their group's size (a metric that scores another
    axis, e.g. the vocabulary of an Embedding) are left out with a warning; aggregate what
    remains with `select_indices(..., groups=groups)`.

    Raises:
        PlanningError: unknown metric or criterion, or a data metric without ``data``.
    """
    from pruneplan import attributions

    if metric_needs_data(metric) and data is None:
        raise PlanningError(f"metric {metric!r} needs data")
    if isinstance(criterion, str):
        if criterion not in CRITERIA:
            raise PlanningError(f"unknown criterion {criterion!r}; choose from {sorted(CRITERIA)}")
        criterion = CRITERIA[criterion]
    cls = getattr(attributions, METRICS[metric])
    kwargs: dict[str, Any] = {"progress": False}
    if metric == "random":
        kwargs["seed"] = seed
    scorer = cls(model, data if data is not None else [], criterion or CRITERIA["cross_entropy"],
                 device, **kwargs)
    members = sorted({r for g in groups for r in g.roots})
    raw = scorer.run_all(members)
    sizes = {r: g.size for g in groups for r in g.roots}
    out = {}
    for name, s in raw.items():
        s = np.asarray(s).reshape(-1)
        if s.size != sizes[name]:
            log.warning("ignoring %s scores of %r: %d scores for %d units", metric, name, s.size,
                        sizes[name])
            continue
        out[name] = s
    return out


def plan_from_metric(
    model: nn.Module,
    example_inputs: Any,
    metric: str,
    ratio: float,
    *,
    scope: str = "layer",
    round_to: int = 1,
    min_keep: int = 1,
    normalize: str | None = "mean",
    data: Iterable[Any] | None = None,
    criterion: str | Callable[..., torch.Tensor] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> PrunePlan:
    """Discover groups, score them, select indices and plan: the whole ``pruneplan plan`` command.

    Coupled groups get the mean of their members' scores. The metric and selection policy are
    recorded in the plan's provenance. One INFO line on the ``pruneplan.loading`` logger says
    how many roots discovery left out and why (all of them: ``prunable_groups(...).left_out``).
    """
    groups = prunable_groups(model, example_inputs)
    log.info("planning from %s: %s", metric, left_out_summary(groups))
    scores = score_groups(model, groups, metric, data, criterion, device, seed)
    removed = select_indices(scores, ratio, scope=scope, round_to=round_to, min_keep=min_keep,
                             normalize=normalize, groups=groups)
    by_name = {g.name: g for g in groups}
    crit = criterion if isinstance(criterion, str) or criterion is None else getattr(
        criterion, "__name__", "callable")
    provenance = {
        "metric": metric,
        "metric_params": {"seed": seed} if metric == "random" else
        ({"criterion": crit} if metric_needs_data(metric) else {}),
        "selection": {"ratio": ratio, "scope": scope, "round_to": round_to, "min_keep": min_keep,
                      "normalize": normalize or "none", "aggregate": "mean"},
    }
    return build_plan(model, [(by_name[k], v) for k, v in removed.items()], provenance)
