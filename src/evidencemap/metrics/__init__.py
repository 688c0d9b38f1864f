"""Evaluation metrics for maps of evidence, batched torch on the inputs' device.

====================  =================================  ==========  ========
metric                class                               better      3-D
====================  =================================  ==========  ========
deletion AUC          :class:`Deletion`                   lower       yes
insertion AUC         :class:`Insertion`                  higher      yes
region deletion AUC   :class:`RegionDeletion`             lower       yes
Average Drop          :class:`AverageDrop`                lower       yes
Increase in Conf.     :class:`AverageDrop`                higher      yes
ADCC                  :class:`ADCC`                       higher      yes
pointing game         :class:`PointingGame`               higher      yes
energy pointing       :class:`EnergyPointingGame`         higher      yes
ROAD (LeRF−MoRF)/2    :class:`ROAD`                       higher      yes
sanity (similarity)   :class:`ModelRandomisation`         lower       yes
max-sensitivity       :class:`MaxSensitivity`             lower       yes
cost                  :class:`Cost`                       lower       yes
====================  =================================  ==========  ========

Each class carries ``higher_is_better`` and ``directions`` (every value it reports → whether
higher is better). See ``docs/metrics.md`` for the definitions.

Every metric is registered with ``@register_metric`` (:mod:`evidencemap.metrics.base`):
``metric_names()``, ``get_metric(name)`` and ``describe_metric(name)`` read the registry, which
:func:`evidencemap.evaluation.evaluate` and ``evidencemap evaluate --metrics`` use. A new metric
is one class with the decorator (docs/metrics.md, "Adding a metric").
"""

from evidencemap.metrics.base import (
    METRIC_REGISTRY,
    MetricContext,
    MetricRecord,
    MetricSpec,
    describe_metric,
    get_metric,
    metric_names,
    register_metric,
    unregister_metric,
)
from evidencemap.metrics.causal import (
    SUBSTRATES,
    CurveResult,
    Deletion,
    Insertion,
    auc,
    gaussian_blur,
    rise_blur,
)

# isort: split
# registered after insertion: the tables' next column
from evidencemap.metrics.region import RegionDeletion, patch_grid

# isort: split
from evidencemap.metrics.common import Explainer, Metric, rank_positions
from evidencemap.metrics.confidence import ADCC, ADCCResult, AverageDrop, ConfidenceResult
from evidencemap.metrics.pointing import (
    EnergyPointingGame,
    PointingGame,
    PointingResult,
    ground_truth_masks,
)
from evidencemap.metrics.road import ROAD, ROADResult, noisy_linear_impute
from evidencemap.metrics.sanity import ModelRandomisation, RandomisationResult, parameter_layers
from evidencemap.metrics.similarity import average_ranks, pearson, spearman, ssim
from evidencemap.metrics.stability import MaxSensitivity

# isort: split
# registered last, so that the cost is the tables' last column
from evidencemap.metrics.cost import Cost, CostResult, PeakMemory

METRICS: dict[str, type[Metric]] = METRIC_REGISTRY
"""Metric name → class: the registry itself (registered metrics included)."""

__all__ = [
    "ADCC",
    "METRICS",
    "METRIC_REGISTRY",
    "ROAD",
    "SUBSTRATES",
    "ADCCResult",
    "AverageDrop",
    "ConfidenceResult",
    "Cost",
    "CostResult",
    "CurveResult",
    "Deletion",
    "EnergyPointingGame",
    "Explainer",
    "Insertion",
    "MaxSensitivity",
    "Metric",
    "MetricContext",
    "MetricRecord",
    "MetricSpec",
    "ModelRandomisation",
    "PeakMemory",
    "PointingGame",
    "PointingResult",
    "ROADResult",
    "RandomisationResult",
    "RegionDeletion",
    "auc",
    "average_ranks",
    "describe_metric",
    "gaussian_blur",
    "get_metric",
    "ground_truth_masks",
    "metric_names",
    "noisy_linear_impute",
    "parameter_layers",
    "patch_grid",
    "pearson",
    "rank_positions",
    "register_metric",
    "rise_blur",
    "spearman",
    "ssim",
    "unregister_metric",
]
