"""A uniformly random map: the sanity baseline of the metrics, not an explanation.

Every metric should rank a method above it; where one does not (pixel deletion ranks a random
map above Grad-CAM on ImageNet photos: scattered removed pixels break the texture the model
reads), the metric rewards something other than finding the evidence. pytorch-grad-cam's
``RandomCAM`` and Quantus' random baselines play the same part.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from evidencemap.checks import ModelLike
from evidencemap.explanation import Explanation
from evidencemap.methods.base import Context, Method
from evidencemap.methods.options import Option
from evidencemap.methods.registry import register
from evidencemap.targets import Target, resolve

__all__ = ["RandomMap"]


@register
class RandomMap(Method):
    """A uniformly random map (a sanity baseline for the metrics, not an explanation):
    ``m_p ~ U(0, 1)`` independently for every position ``p`` of the input's spatial axes.

    Shapes: inputs ``(N, C, *S)`` (2-D or 3-D) → maps and raw ``(N, 1, *S)``, drawn at once for
    the whole batch on the CPU from a generator seeded with ``seed`` (then moved to the inputs'
    device), so the same seed and batch shape give the same maps on every device; sample ``i``
    of a batch gets the ``i``-th of the ``N`` draws, hence a batch is never split into chunks.
    The map does not depend on the model, the input's values or the target; one forward pass
    resolves the target and its scores (the explanation's ``scores``), as for any method.

    Args:
        model: the classifier.
        seed: seed of the draw (give each image its own to draw independent maps when images
            are explained one at a time).
        output_key / eval_mode / batch_size: see :class:`~evidencemap.methods.Method`.
    """

    name = "random"
    aliases: ClassVar[tuple[str, ...]] = ("random_map", "random-map")
    needs_gradients: ClassVar[bool] = False
    pass_kind: ClassVar[str] = "forward"
    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option("seed", "int", 0, "seed of the uniform draw (same seed and batch: same maps)"),
    )

    def __init__(self, model: nn.Module | ModelLike, *, seed: int = 0, **kw: Any) -> None:
        super().__init__(model, **kw)
        self.seed = self.option("seed", seed)

    @property
    def batch_independent(self) -> bool:
        """One draw covers the whole batch: a batch is not split."""
        return False

    def input_bytes(self, x: Tensor) -> int:
        """One input's share of a run: its float64 draw (the forward pass keeps no graph)."""
        return x[0, 0].numel() * 8

    def explain_batch(self, inputs: Tensor, target: Target) -> Explanation:
        x = inputs.detach()
        with torch.no_grad():
            output = self.forward(x)
            resolved = resolve(target, output)
            scores = resolved.score(output)
        generator = torch.Generator().manual_seed(self.seed)
        shape = (x.shape[0], 1, *x.shape[2:])
        raw = torch.rand(shape, generator=generator, dtype=torch.float64)
        raw = raw.to(device=x.device, dtype=x.dtype)
        context = Context(self.model, x, output.detach(), resolved, None, self.forward)
        return self.finish(raw, raw, context, scores.detach(), normalise=False)
