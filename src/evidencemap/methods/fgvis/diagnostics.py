"""What every FGVis result says about itself: how much gradient the defence let through, how
spread the map is, whether it degenerated, and (for the experimental coarse schedule) whether
its explanation survives noise and other models.

Definitions (all ``(N,)``, per sample):

* ``defence_pass_share`` ``= ‖∂φ/∂m‖_defended / ‖∂φ/∂m‖_undefended`` at the flat mask
  ``m = 0.999`` (``e = 0.999·x + 0.001·r``, 0.1 % dimming), both L2 norms over the whole mask,
  same ``φ`` and target as the run. 1 when nothing is blocked (and when the undefended gradient
  is 0); near 0 when the defence starves the optimisation.
* ``units_out_of_bounds``: at that same ``e``, the fraction of all gated nonlinearity units
  (every call, every position and channel) whose activation is outside
  ``[min(0, h(x)), max(0, h(x))]``, i.e. whose gradient the gate blocks.
* ``map_spread``: the share of the map's total mass held by its top 10 % of pixels
  (``k = ⌈P/10⌉`` of the ``P`` pixels of the ``(1, *S)`` map): ``k/P`` (≈ 0.1) for a flat map,
  1 when all mass lies in those pixels. A map without mass counts as flat (``k/P``).
* ``degenerate``: ``map_spread < DEGENERATE_SPREAD`` (0.15): the map is (nearly) flat — the mask
  dims the whole image instead of selecting a region.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from evidencemap.capture import NonlinearityInterceptor
from evidencemap.methods.fgvis.defence import DefenceRule, NonlinearityBounds
from evidencemap.methods.fgvis.games import phi

__all__ = [
    "CHECK_DRAWS",
    "CHECK_NOISE",
    "DEGENERATE_SPREAD",
    "DIAGNOSTIC_DIMMING",
    "STARVED_SHARE",
    "FGVisDegenerateWarning",
    "defence_check",
    "degenerate_message",
    "map_spread",
    "noise_check",
    "transfer_check",
]

DEGENERATE_SPREAD = 0.15
"""``map_spread`` below which a map counts as flat (a flat map gives 0.1)."""
DIAGNOSTIC_DIMMING = 0.999
"""The flat mask at which the defence is measured (0.1 % dimming)."""
STARVED_SHARE = 0.1
"""``defence_pass_share`` below which the warning says that the defence starved the run."""
CHECK_NOISE = 0.1
"""σ (in the model's normalised input space) of the noise check of the coarse schedule."""
CHECK_DRAWS = 8
"""Noise draws averaged by the noise check."""


class FGVisDegenerateWarning(UserWarning):
    """An FGVis map is flat: the defence starved the optimisation, the mask only dims."""


class _CountingRule(DefenceRule):
    """:class:`DefenceRule` that also counts, per sample, the gated units outside their bounds."""

    def __init__(
        self, bounds: list[NonlinearityBounds | None], n: int, device: torch.device
    ) -> None:
        super().__init__(bounds)
        self.outside = torch.zeros(n, device=device)
        self.total = 0

    def __call__(self, index: int, name: str, h: Tensor) -> Tensor:
        out = super().__call__(index, name, h)
        bound = self.bounds[index]
        if bound is not None:
            plain = h.detach()
            inside = bound.rule(plain, torch.ones_like(plain)).flatten(1).sum(1)
            self.outside += plain[0].numel() - inside
            self.total += plain[0].numel()
        return out


def defence_check(
    forward: Callable[[Tensor], Tensor],
    x: Tensor,
    ref: Tensor,
    classes: Tensor,
    bounds: list[NonlinearityBounds | None],
    similarity: str,
) -> tuple[Tensor, Tensor]:
    """``(defence_pass_share, units_out_of_bounds)`` ``(N,)`` at ``m = 0.999`` (module docstring).

    Two batched forward + backward passes (one defended, one not).
    """
    n = x.shape[0]
    norms = []
    counter = _CountingRule(bounds, n, x.device)
    for defended in (True, False):
        m = torch.full_like(x, DIAGNOSTIC_DIMMING).requires_grad_(True)
        with torch.enable_grad():
            e = m * x + (1 - m) * ref
            if defended:
                with NonlinearityInterceptor(counter):
                    logits = forward(e)
            else:
                logits = forward(e)
            (grad,) = torch.autograd.grad(phi(logits, classes, similarity)[0].sum(), m)
        norms.append(grad.detach().flatten(1).norm(dim=1))
    share = torch.where(norms[1] > 0, norms[0] / norms[1].clamp(min=1e-30), 1.0)
    out = counter.outside / counter.total if counter.total else torch.zeros(n, device=x.device)
    return share, out


def map_spread(raw: Tensor) -> Tensor:
    """Share of each ``(N, 1, *S)`` map's mass in its top 10 % pixels ``(N,)`` (see above)."""
    flat = raw.detach().flatten(1).clamp(min=0)
    k = max(1, math.ceil(flat.shape[1] / 10))
    total = flat.sum(1)
    top = flat.topk(k, dim=1).values.sum(1)
    return torch.where(total > 0, top / total.clamp(min=1e-30), k / flat.shape[1])


def degenerate_message(game: str, rows: Sequence[int], spread: Tensor, share: Tensor | None) -> str:
    """The warning text for the degenerate samples ``rows`` (``""`` when there are none)."""
    if not rows:
        return ""
    which = ", ".join(str(i) for i in rows)
    worst = min(float(spread[i]) for i in rows)
    text = (
        f"FGVis: the {game} map of sample(s) {which} is flat (map_spread {worst:.3f} < "
        f"{DEGENERATE_SPREAD}; a flat map gives 0.1): the mask dims the whole image instead of "
        "selecting a region"
    )
    if share is not None:
        passed = max(float(share[i]) for i in rows)
        text += f"; the defence passes {passed:.1%} of the gradient at 0.1 % dimming"
        if passed < STARVED_SHARE:
            text += ", so the optimisation is starved (typical of batch-normalised networks)"
    return text + (
        ". Use the defended deletion game instead (game='delete', and check "
        "extras['satisfied']), or a CAM-family method (method='gradcam')."
    )


def noise_check(
    forward: Callable[[Tensor], Tensor], e: Tensor, classes: Tensor, image_score: Tensor
) -> Tensor:
    """``mean_j p(e + ε_j) / p(x)`` ``(N,)`` over ``CHECK_DRAWS`` draws ``ε_j ~ N(0, CHECK_NOISE²)``
    (one generator seeded 0; one batched forward pass per draw)."""
    generator = torch.Generator(device=e.device).manual_seed(0)
    total = torch.zeros(e.shape[0], device=e.device, dtype=e.dtype)
    with torch.no_grad():
        for _ in range(CHECK_DRAWS):
            noise = torch.randn(e.shape, generator=generator, device=e.device, dtype=e.dtype)
            total += phi(forward(e + CHECK_NOISE * noise), classes, "prob")[1]
    return total / CHECK_DRAWS / image_score.clamp(min=1e-30)


def transfer_check(models: Sequence[nn.Module], x: Tensor, e: Tensor, classes: Tensor) -> Tensor:
    """``p_k(e) / p_k(x)`` ``(N, K)`` for each other model ``k`` (eval mode, no gradients)."""
    columns = []
    with torch.no_grad():
        for model in models:
            p_x = phi(model(x), classes, "prob")[1]
            p_e = phi(model(e), classes, "prob")[1]
            columns.append(p_e / p_x.clamp(min=1e-30))
    if not columns:
        return torch.zeros(x.shape[0], 0, device=x.device)
    return torch.stack(columns, dim=1)
