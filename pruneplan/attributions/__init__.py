"""Attribution metrics: score the units of a module to decide what to prune.

Every metric has the call signature of the original TorchPruner::

    metric = TaylorAttributionMetric(model, data_generator, criterion, device, reduction="mean")
    scores = metric.run(module, find_best_evaluation_module=False)   # np.ndarray, len z.shape[1]
    by_name = metric.run_all(["features.0", "features.3"])           # one data pass for all

This package imports only torch, numpy, tqdm and the standard library.
"""

from .activation import ActivationMagnitudeAttributionMetric
from .apoz import APoZAttributionMetric
from .base import AttributionMetric, CriterionMismatchError, Reduction
from .bn_scale import BNScaleAttributionMetric
from .criteria import causal_lm_loss
from .fpgm import FPGMAttributionMetric
from .lamp import LAMPAttributionMetric
from .lp_norm import LpNormAttributionMetric
from .rand import RandomAttributionMetric
from .sensitivity import SensitivityAttributionMetric
from .shapley import ShapleyAttributionMetric, permutation_samples
from .taylor import TaylorAttributionMetric
from .weight_norm import WeightNormAttributionMetric

__all__ = [
    "APoZAttributionMetric",
    "ActivationMagnitudeAttributionMetric",
    "AttributionMetric",
    "BNScaleAttributionMetric",
    "CriterionMismatchError",
    "FPGMAttributionMetric",
    "LAMPAttributionMetric",
    "LpNormAttributionMetric",
    "RandomAttributionMetric",
    "Reduction",
    "SensitivityAttributionMetric",
    "ShapleyAttributionMetric",
    "TaylorAttributionMetric",
    "WeightNormAttributionMetric",
    "causal_lm_loss",
    "permutation_samples",
]
