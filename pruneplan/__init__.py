"""pruneplan: structured pruning for PyTorch with reviewable, replayable plans."""

from pruneplan.apply import (
    apply_plan,
    apply_to_safetensors,
    apply_to_sharded_safetensors,
    apply_to_state_dict,
    check_sharded_weights,
    check_weights,
    load_pruned,
)
from pruneplan.compose import compose
from pruneplan.errors import (
    CoupledGroupError,
    OptimizerStateError,
    OutputFileError,
    PlanError,
    PlanMismatchError,
    PlanningError,
    PlanValidationError,
    UnsupportedOperationError,
    WeightsFileError,
)
from pruneplan.graph.discover import describe_groups, prunable_groups
from pruneplan.loading import plan_from_metric
from pruneplan.plan import (
    FORMAT,
    VERSION,
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
from pruneplan.planner import plan_pruning
from pruneplan.select import select_indices

__version__ = "0.1.0"

__all__ = [
    "FORMAT",
    "VERSION",
    "CoupledGroupError",
    "DropoutChange",
    "Group",
    "IndexMap",
    "ModelFingerprint",
    "ModuleEdit",
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
    "UnsupportedOperationError",
    "WeightsFileError",
    "__version__",
    "apply_plan",
    "apply_to_safetensors",
    "apply_to_sharded_safetensors",
    "apply_to_state_dict",
    "check_sharded_weights",
    "check_weights",
    "compose",
    "describe_groups",
    "diff_plans",
    "json_schema",
    "load_pruned",
    "plan_from_metric",
    "plan_pruning",
    "prunable_groups",
    "select_indices",
]
