"""Evaluation metrics for maps of evidence, batched torch on the inputs' device.

====================  =================================  ==========  ========
metric                class                               better      3-D
====================  =================================  ==========  ========
deletion AUC          :class:`Deletion`                   lower       yes
insertion AUC         :class:`Insertion`                  higher      yes
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
higher is better). See ``docs/evaluation.md`` for the definitions.
"""

from evidencemap.metrics.causal import CurveResult, Deletion, Insertion, auc, gaussian_blur
from evidencemap.metrics.common import Explainer, Metric, rank_positions
from evidencemap.metrics.confidence import ADCC, ADCCResult, AverageDrop, ConfidenceResult
from evidencemap.metrics.cost import Cost, CostResult, PeakMemory
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

METRICS: dict[str, type[Metric]] = {
    cls.name: cls
    for cls in (
        Deletion,
        Insertion,
        AverageDrop,
        ADCC,
        PointingGame,
        EnergyPointingGame,
        ROAD,
        ModelRandomisation,
        MaxSensitivity,
        Cost,
    )
}
"""Metric name → class."""

__all__ = [
    "ADCC",
    "METRICS",
    "ROAD",
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
    "ModelRandomisation",
    "PeakMemory",
    "PointingGame",
    "PointingResult",
    "ROADResult",
    "RandomisationResult",
    "auc",
    "average_ranks",
    "gaussian_blur",
    "ground_truth_masks",
    "noisy_linear_impute",
    "parameter_layers",
    "pearson",
    "rank_positions",
    "spearman",
    "ssim",
]
