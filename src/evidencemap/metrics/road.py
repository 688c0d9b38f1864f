"""ROAD: Remove And Debias (Rong et al. 2022) with noisy linear imputation, batched on the device.

For each removal level ``p`` (default 10, 20, …, 90 %), the ``round(p · P)`` positions ranked
first by the map (**MoRF**, most relevant first) or last (**LeRF**) are removed from every channel
and imputed: each removed value is the weighted average of its neighbours,

    ``v_i = Σ_j w_ij v_j / Σ_j w_ij``,   ``w = 1/6`` for the 4 direct and ``1/12`` for the 4
    diagonal neighbours (only neighbours inside the image count: the weights renormalise at
    the border),

solved jointly for all removed positions (neighbouring removed values are unknowns too), then
``N(0, σ²)`` noise (``σ = 0.01``) is added to them. The system ``(D − W) v = W x_kept`` on the
removed positions is symmetric positive definite; it is solved for all images, levels, orders
and channels at once by Jacobi-preconditioned conjugate gradients (depthwise convolutions on
the device) to a relative residual ``tol``, starting from the same system solved at half
resolution (recursively; cascadic multigrid), so large holes need few fine iterations. In 3-D, neighbours differing in 1, 2, 3 axes weigh
``1 : 1/2 : 1/4`` (our extension; in 2-D this is the published ``1/6 : 1/12``).

Each level's value is the change of the target's softmax probability, ``p(x̃) − p(x)``
(the model is not retrained). MoRF: lower is better; LeRF: higher is better; the summary
``(LeRF − MoRF) / 2``, averaged over levels, is higher-is-better.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evidencemap.checks import check_model, check_positive_int
from evidencemap.methods.options import Option
from evidencemap.metrics.base import MetricContext, MetricRecord, register_metric
from evidencemap.metrics.common import (
    BATCH_SIZE,
    SEED,
    Metric,
    check_nonneg_float,
    make_scorer,
    metric_context,
    prepare,
    rank_positions,
)
from evidencemap.targets import OutputKey, Target

__all__ = ["ROAD", "ROADResult", "noisy_linear_impute"]

DEFAULT_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)


def _neighbour_kernel(dims: int, device: Any, dtype: torch.dtype) -> Tensor:
    """``3^d`` kernel: weight ``2^{-(k-1)}`` for neighbours differing in ``k`` axes, 0 at the centre."""
    kernel = torch.zeros([3] * dims, device=device, dtype=dtype)
    for offset in itertools.product((0, 1, 2), repeat=dims):
        k = sum(o != 1 for o in offset)
        if k:
            kernel[offset] = 2.0 ** (-(k - 1))
    return kernel


# Iterations of the finest-level solve of the last call (for tests and benchmarks).
_LAST_ITERATIONS = [0]

# Below this many positions on the shortest axis the first guess is a push-pull fill.
_COARSEST = 16


def _pyramid_fill(values: Tensor, weights: Tensor) -> Tensor:
    """Fill where ``weights == 0`` from coarser averages of the weighted ``values`` (push-pull).

    ``values`` ``(B, C, *S)`` (zero where unknown), ``weights`` ``(B, 1, *S)`` in {0, 1}.
    """
    dims = values.ndim - 2
    pool = F.avg_pool2d if dims == 2 else F.avg_pool3d
    levels = [(values, weights)]
    while min(levels[-1][1].shape[2:]) > 1:
        v, w = levels[-1]
        levels.append((pool(v, 2, ceil_mode=True), pool(w, 2, ceil_mode=True)))
    v, w = levels[-1]
    fill = v / w.clamp(min=1e-12)
    for v, w in reversed(levels[:-1]):
        up = F.interpolate(fill, size=v.shape[2:], mode="nearest")
        fill = torch.where(w > 0, v / w.clamp(min=1e-12), up)
    return fill


def _first_guess(known: Tensor, u: Tensor, tol: float, max_iter: int) -> Tensor:
    """A smooth guess of the removed values: the same system solved at half resolution.

    A coarse position is removed when all positions it pools are; the others keep the mean of
    their known values. The coarse solution, upsampled (bilinear / trilinear), leaves the
    fine conjugate gradients only the detail to fix (cascadic multigrid); at the coarsest
    level the guess is a push-pull fill.
    """
    dims = known.ndim - 2
    if min(known.shape[2:]) < _COARSEST:
        return _pyramid_fill(known, 1 - u)
    pool = F.avg_pool2d if dims == 2 else F.avg_pool3d
    kept = pool(1 - u, 2, ceil_mode=True)
    coarse_u = (kept == 0).to(u.dtype)
    coarse_known = pool(known, 2, ceil_mode=True) / kept.where(kept > 0, torch.ones_like(kept))
    coarse = _conjugate_gradients(coarse_known, coarse_u, tol, max_iter)
    mode = "bilinear" if dims == 2 else "trilinear"
    return F.interpolate(coarse, size=known.shape[2:], mode=mode, align_corners=False)


def _conjugate_gradients(known: Tensor, u: Tensor, tol: float, max_iter: int) -> Tensor:
    """Solve ``(D − W) v = W known`` on the positions where ``u == 1``; ``v`` is 0 elsewhere.

    ``known`` ``(B, C, *S)`` (0 where removed), ``u`` ``(B, 1, *S)`` in {0, 1}. Jacobi
    preconditioning; one system per (image, channel), all iterated together.
    """
    dims = known.ndim - 2
    conv = F.conv2d if dims == 2 else F.conv3d
    c = known.shape[1]
    kernel = _neighbour_kernel(dims, known.device, known.dtype)
    weight = kernel.view(1, 1, *kernel.shape).expand(c, 1, *kernel.shape).contiguous()

    def neighbours(v: Tensor) -> Tensor:
        return conv(v, weight, padding=1, groups=c)

    diag = conv(
        torch.ones((1, 1, *known.shape[2:]), device=known.device, dtype=known.dtype),
        kernel.view(1, 1, *kernel.shape),
        padding=1,
    )

    def apply(v: Tensor) -> Tensor:
        return u * (diag * v - neighbours(v))

    def dot(a: Tensor, b: Tensor) -> Tensor:
        return (a * b).flatten(2).sum(2).view(*a.shape[:2], *([1] * dims))

    b = u * neighbours(known)
    v = u * _first_guess(known, u, tol, max_iter)
    r = b - apply(v)
    z = r / diag
    p = z.clone()
    rz = dot(r, z)
    limit = (tol * dot(b, b).sqrt()).clamp(min=torch.finfo(known.dtype).tiny)
    it = 0
    for it in range(max_iter):
        if it % 10 == 0 and bool((dot(r, r).sqrt() <= limit).all()):
            break
        ap = apply(p)
        pap = dot(p, ap)
        # A system whose residual is already below its limit stops; a step that rounding makes
        # non-finite (p·Ap subnormal once a system stagnates at float precision) is not taken.
        active = (pap > 0) & (dot(r, r).sqrt() > limit)
        alpha = rz / pap.where(active, torch.ones_like(pap))
        alpha = alpha.where(active & alpha.isfinite(), torch.zeros_like(alpha))
        v = v + alpha * p
        r = r - alpha * ap
        z = r / diag
        rz_new = dot(r, z)
        beta = rz_new / rz.where(rz > 0, torch.ones_like(rz))
        beta = beta.where((rz > 0) & beta.isfinite(), torch.zeros_like(beta))
        p = z + beta * p
        rz = rz_new
    _LAST_ITERATIONS[0] = it
    return v


def noisy_linear_impute(
    x: Tensor,
    removed: Tensor,
    *,
    noise: float = 0.01,
    tol: float = 1e-5,
    max_iter: int = 2000,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Impute the ``removed`` positions of ``x`` (module docstring), batched.

    Args:
        x: ``(B, C, *S)`` images or volumes.
        removed: ``(B, 1, *S)`` or ``(B, *S)`` bool, the positions to impute (all channels).
        noise: standard deviation of the Gaussian noise added to imputed values.
        tol: stop when every system's residual is below ``tol`` times its right-hand side.
        max_iter: most conjugate-gradient iterations (per resolution level).
        generator: random generator for the noise (on ``x``'s device).

    Returns:
        ``(B, C, *S)``: ``x`` where kept, the imputed values where removed.

    Raises:
        TypeError: for tensors of the wrong kind.
        ValueError: for mismatched shapes or inputs without 2 or 3 spatial axes.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point torch.Tensor")
    if not isinstance(removed, Tensor) or removed.dtype != torch.bool:
        raise TypeError("removed must be a boolean torch.Tensor")
    dims = x.ndim - 2
    if dims not in (2, 3):
        raise ValueError(f"x must be (B, C, H, W) or (B, C, D, H, W), got {tuple(x.shape)}")
    if removed.ndim == x.ndim - 1:
        removed = removed.unsqueeze(1)
    if removed.shape != (x.shape[0], 1, *x.shape[2:]):
        raise ValueError(
            f"removed must be (B, 1, *S) matching x {tuple(x.shape)}, got {tuple(removed.shape)}"
        )
    noise = check_nonneg_float(noise, "noise")
    tol = check_nonneg_float(tol, "tol", positive=True)
    max_iter = check_positive_int(max_iter, "max_iter")
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    u = removed.to(x.device, work)
    known = x.to(work) * (1 - u)
    v = _conjugate_gradients(known, u, tol, max_iter)
    if noise > 0:
        v = v + noise * torch.randn(v.shape, generator=generator, device=v.device, dtype=work)
    return (known + u * v).to(x.dtype)


@dataclass
class ROADResult:
    """MoRF and LeRF curves of a ROAD run.

    Attributes:
        percentiles: ``(L,)`` removal levels in percent.
        morf: ``(N, L)`` ``p(x̃) − p(x)`` removing the most relevant positions first.
        lerf: ``(N, L)`` the same removing the least relevant first.
        combined: ``(N,)`` ``mean_levels (LeRF − MoRF) / 2``.
        original: ``(N,)`` ``p(x)``.
        classes: ``(N,)`` the classes scored, or ``None`` for a callable target.
    """

    percentiles: Tensor
    morf: Tensor
    lerf: Tensor
    combined: Tensor
    original: Tensor
    classes: Tensor | None


@register_metric
class ROAD(Metric):
    """ROAD with noisy linear imputation; see the module docstring.

    Args:
        model: the classifier.
        percentiles: removal levels in percent, each in (0, 100).
        noise: σ of the imputation noise (0.01 in the normalised input space).
        batch_size: images imputed and scored at a time.
        output_key: which model output to read.
        seed: seed of the noise and of the random order among tied map values.
        tol / max_iter: conjugate-gradient stopping rule.
    """

    name = "road"
    higher_is_better = True
    directions: ClassVar[dict[str, bool]] = {
        "road_combined": True,
        "road_morf": False,
        "road_lerf": True,
    }
    titles: ClassVar[dict[str, str]] = {
        "road_combined": "ROAD (LeRF−MoRF)/2",
        "road_morf": "ROAD MoRF",
        "road_lerf": "ROAD LeRF",
    }
    OPTIONS = (
        Option(
            "percentiles",
            "any",
            DEFAULT_PERCENTILES,
            "removal levels in percent",
            other="a non-empty list of numbers in (0, 100)",
            cost="work",
        ),
        Option("noise", "float", 0.01, "σ of the imputation noise", low=0),
        Option("tol", "float", 1e-5, "relative residual of the imputation", low=0, low_open=True),
        Option("max_iter", "int", 2000, "conjugate-gradient iterations at most", low=1),
        replace(BATCH_SIZE, default=32),
        SEED,
    )
    # ROAD's conjugate-gradient tolerance in quick mode: 1e-3 moves the probabilities by
    # < 1e-3 on the built-in model and photos (against 1e-5) at about a third of the iterations
    QUICK: ClassVar[dict[str, Any]] = {"percentiles": [25, 75], "tol": 1e-3}

    def __init__(
        self,
        model: nn.Module,
        *,
        percentiles: Sequence[float] = DEFAULT_PERCENTILES,
        noise: float = 0.01,
        batch_size: int = 32,
        output_key: OutputKey = None,
        seed: int = 0,
        tol: float = 1e-5,
        max_iter: int = 2000,
    ) -> None:
        self.model = check_model(model)
        if (
            isinstance(percentiles, (str, bytes))
            or not isinstance(percentiles, Sequence)
            or not percentiles
        ):
            raise TypeError(
                f"percentiles must be a non-empty sequence of numbers, got {percentiles!r}"
            )
        levels = [check_nonneg_float(p, "percentiles") for p in percentiles]
        if any(not 0 < p < 100 for p in levels):
            raise ValueError(f"percentiles must lie in (0, 100), got {list(percentiles)}")
        self.percentiles = tuple(levels)
        self.noise = self.option("noise", noise)
        self.batch_size = self.option("batch_size", batch_size)
        self.output_key = output_key
        self.seed = self.option("seed", seed)
        self.tol = self.option("tol", tol)
        self.max_iter = self.option("max_iter", max_iter)

    def __call__(self, inputs: Tensor, maps: Any, target: Target = None) -> ROADResult:
        """MoRF/LeRF curves for ``inputs`` ranked by ``maps``.

        Raises:
            TypeError / ValueError: for invalid inputs, maps or target.
        """
        x, m = prepare(inputs, maps)
        n, positions = x.shape[0], m[0].numel()
        levels = torch.tensor(self.percentiles, device=x.device, dtype=torch.float64)
        counts = (levels / 100 * positions).round().long()  # (L,)
        gen = torch.Generator(device=x.device).manual_seed(self.seed)
        with metric_context(self.model):
            scorer, base = make_scorer(
                self.model, x, target, output_key=self.output_key, batch_size=self.batch_size
            )
            order = rank_positions(m, descending=True, seed=self.seed)
            ranks = torch.empty_like(order).scatter_(
                1, order, torch.arange(positions, device=x.device).expand(n, positions)
            )
            # jobs: (sample, level, order) with order 0 = MoRF, 1 = LeRF
            nl = counts.shape[0]
            sample = torch.arange(n, device=x.device).repeat_interleave(2 * nl)
            level = torch.arange(nl, device=x.device).repeat_interleave(2).repeat(n)
            lerf = torch.tensor([0, 1], device=x.device).repeat(n * nl).bool()
            scores = []
            for s in range(0, sample.shape[0], self.batch_size):
                i, j, low = (t[s : s + self.batch_size] for t in (sample, level, lerf))
                r = ranks[i]
                c = counts[j, None]
                removed = torch.where(low[:, None], r >= positions - c, r < c)
                imputed = noisy_linear_impute(
                    x[i],
                    removed.view(i.shape[0], 1, *x.shape[2:]),
                    noise=self.noise,
                    tol=self.tol,
                    max_iter=self.max_iter,
                    generator=gen,
                )
                scores.append(scorer(imputed, i))
            change = (torch.cat(scores).view(n, nl, 2) - base.view(n, 1, 1)).float()
        morf, lerf_curve = change[..., 0], change[..., 1]
        combined = ((lerf_curve - morf) / 2).mean(1)
        return ROADResult(levels.float(), morf, lerf_curve, combined, base.float(), scorer.classes)

    def score(self, context: MetricContext) -> MetricRecord:
        """The combined, MoRF and LeRF means of one image, and its two curves."""
        result = self(context.inputs, context.maps, context.target)
        return MetricRecord(
            {
                "road_combined": float(result.combined[0]),
                "road_morf": float(result.morf[0].mean()),
                "road_lerf": float(result.lerf[0].mean()),
            },
            curves={"road_morf": result.morf[0].tolist(), "road_lerf": result.lerf[0].tolist()},
            levels={"road_percentiles": result.percentiles.tolist()},
        )
