"""pruneplan: structured pruning for PyTorch with reviewable, replayable plans.

Importing the package is cheap: the plan document, its errors and `compose` (pydantic only) are
imported at once; every name that needs torch or numpy (the appliers, discovery, the planner,
selection, the metrics) is imported on first use through the module-level ``__getattr__``, so
reviewing plans (``pruneplan show``, ``diff``, ``validate PLAN``, ``schema``) never loads torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pruneplan._io import check_output, write_output
from pruneplan.compose import compose
from pruneplan.errors import (
    AlreadyPrunedError,
    ConfigError,
    CoupledGroupError,
    CriterionError,
    ExamplePassError,
    OptimizerStateError,
    OutputFileError,
    PlanError,
    PlanMismatchError,
    PlanningError,
    PlanValidationError,
    UnexecutedModuleError,
    UnsupportedOperationError,
    WeightsContentWarning,
    WeightsFileError,
)
from pruneplan.plan import (
    FORMAT,
    VERSION,
    ConfigChange,
    ConfigEdits,
    DropoutChange,
    Group,
    IndexMap,
    ModelFingerprint,
    ModuleEdit,
    PlanDiff,
    Provenance,
    PrunePlan,
    TensorSlice,
    diff_plans,
    json_schema,
)

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and IDEs
    from pruneplan.apply import (
        apply_plan,
        apply_to_checkpoint,
        apply_to_safetensors,
        apply_to_sharded_safetensors,
        apply_to_state_dict,
        check_checkpoint,
        check_sharded_weights,
        check_weights,
        is_hf_checkpoint,
        load_pruned,
        weights_digest,
    )
    from pruneplan.graph.discover import describe_groups, prunable_groups
    from pruneplan.graph.probe import ExampleInputs
    from pruneplan.graph.rules import register_function_rule, register_module_rule
    from pruneplan.graph.spec import LeftOut
    from pruneplan.loading import plan_from_metric
    from pruneplan.planner import plan_pruning
    from pruneplan.select import select_indices
    from pruneplan.stats import ModelStats, ModuleStats, count

__version__ = "0.1.0"

# public name -> module that defines it; imported (with torch) on first access
_LAZY: dict[str, str] = {
    "apply_plan": "pruneplan.apply",
    "apply_to_checkpoint": "pruneplan.apply",
    "is_hf_checkpoint": "pruneplan.apply",
    "apply_to_safetensors": "pruneplan.apply",
    "apply_to_sharded_safetensors": "pruneplan.apply",
    "apply_to_state_dict": "pruneplan.apply",
    "check_checkpoint": "pruneplan.apply",
    "check_sharded_weights": "pruneplan.apply",
    "check_weights": "pruneplan.apply",
    "load_pruned": "pruneplan.apply",
    "weights_digest": "pruneplan.apply",
    "count": "pruneplan.stats",
    "ModelStats": "pruneplan.stats",
    "ModuleStats": "pruneplan.stats",
    "ExampleInputs": "pruneplan.graph.probe",
    "LeftOut": "pruneplan.graph.spec",
    "describe_groups": "pruneplan.graph.discover",
    "prunable_groups": "pruneplan.graph.discover",
    "register_function_rule": "pruneplan.graph.rules",
    "register_module_rule": "pruneplan.graph.rules",
    "plan_from_metric": "pruneplan.loading",
    "plan_pruning": "pruneplan.planner",
    "select_indices": "pruneplan.select",
}
# subpackages that `import pruneplan` used to import as a side effect: still reachable as
# attributes (``pruneplan.apply.sharded``, ``pruneplan.attributions``) without an explicit import
_SUBMODULES = frozenset(
    {"apply", "attributions", "distributed", "graph", "loading", "planner", "pruner", "select",
     "stats"}
)


def __getattr__(name: str) -> Any:
    """Import a torch-needing public name (or subpackage) on first access, then cache it."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})


__all__ = [
    "FORMAT",
    "VERSION",
    "AlreadyPrunedError",
    "ConfigChange",
    "ConfigEdits",
    "ConfigError",
    "CoupledGroupError",
    "CriterionError",
    "DropoutChange",
    "ExampleInputs",
    "ExamplePassError",
    "Group",
    "IndexMap",
    "LeftOut",
    "ModelFingerprint",
    "ModelStats",
    "ModuleEdit",
    "ModuleStats",
    "OptimizerStateError",
    "OutputFileError",
    "PlanDiff",
    "PlanError",
    "PlanMismatchError",
    "PlanValidationError",
    "PlanningError",
    "Provenance",
    "PrunePlan",
    "TensorSlice",
    "UnexecutedModuleError",
    "UnsupportedOperationError",
    "WeightsContentWarning",
    "WeightsFileError",
    "__version__",
    "apply_plan",
    "apply_to_checkpoint",
    "apply_to_safetensors",
    "apply_to_sharded_safetensors",
    "apply_to_state_dict",
    "check_checkpoint",
    "check_output",
    "check_sharded_weights",
    "check_weights",
    "compose",
    "count",
    "describe_groups",
    "diff_plans",
    "is_hf_checkpoint",
    "json_schema",
    "load_pruned",
    "plan_from_metric",
    "plan_pruning",
    "prunable_groups",
    "register_function_rule",
    "register_module_rule",
    "select_indices",
    "weights_digest",
    "write_output",
]
