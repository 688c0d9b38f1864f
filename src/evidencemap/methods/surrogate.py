"""LIME and KernelSHAP: a weighted linear model of the score on features switched on and off.

The input is split into ``F`` features (superpixels of a photo, a regular grid of cells for a
volume, or a feature map given by the caller). A sample ``z ∈ {0, 1}^F`` keeps the features
with ``z_f = 1`` and shows the baseline ``b`` on the others: ``x_z = b + M(z) ⊙ (x − b)`` with
``M(z) = z[feature of each element]``. With ``S`` samples ``Z ∈ {0,1}^{S×F}``, their scores
``y = f(x_Z)`` ``(S,)`` and weights ``π`` ``(S,)``, the explanation is the linear model

    ``(β₀, β) = argmin Σ_s π_s (y_s − β₀ − z_s·β)² + α ‖β‖²``

solved in closed form per input (weighted centring as scikit-learn does: ``z̄ = Σπz/Σπ``,
``ȳ = Σπy/Σπ``; the normal equations; ``α = 0``: with a vanishing ridge of 1e-9 of the mean diagonal, which
gives the minimum-norm least-squares solution continuously in ``y``), in float64; ``raw = β[feature of each element]`` ``(N, 1, *S)``, the map its positive
part. ``extras``: ``intercept`` ``(N,)`` (``β₀``) and ``features`` ``(N, 1, *S)`` (feature ids).

=============  =================================================  ================================
method         samples ``z``                                      weight ``π(z)``
=============  =================================================  ================================
lime           each ``z_f ~ Bernoulli(½)``                        ``exp(−d²/(2w²))``, ``d = 1 −
                                                                   cos(x, x_z)`` over ``C×S``
kernel_shap    ``1``, ``0``, then ``k ~ p(k) ∝ (F−1)/(k(F−k))``,   ``10⁶`` for ``1`` and ``0``,
               ``k`` features at random                            1 otherwise (``α = 0``)
=============  =================================================  ================================

Both are Captum's ``Lime`` (its default similarity, with a ridge instead of its Lasso) and
``KernelShap`` (the same sampling, weights and unregularised regression); given the same
samples they solve the same model. Samples are drawn on the CPU per input from a generator
seeded by ``seed`` (an input gets the same samples alone or in a batch) and evaluated like the
other perturbation methods (:mod:`evidencemap.methods.perturbation`): ``g`` samples of every
input in one forward pass, chunked by the memory budget, with progress and cancellation.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from evidencemap.methods.options import Option
from evidencemap.methods.perturbation import SEED, PerturbationMethod, _score_option
from evidencemap.methods.registry import register
from evidencemap.targets import ResolvedTarget

__all__ = [
    "FEATURES",
    "KernelShap",
    "Lime",
    "SurrogateMethod",
    "grid_features",
    "kernel_shap_samples",
    "slic_features",
    "solve_weighted",
]

FEATURES = ("auto", "slic", "grid")
"""Named feature maps: ``"slic"`` superpixels (2-D), ``"grid"`` cells, ``"auto"`` (SLIC for
2-D inputs, the grid otherwise)."""


def grid_features(shape: tuple[int, ...], cells: int) -> Tensor:
    """Feature ids ``(*shape)`` of a regular grid of ``cells`` cells per axis (row-major)."""
    ids: Tensor | None = None
    for size in shape:
        count = min(cells, size)
        axis = torch.arange(size) * count // size
        ids = axis if ids is None else ids[..., None] * count + axis
    if ids is None:
        raise ValueError("features need at least one spatial axis")
    return ids


def slic_features(x: Tensor, segments: int) -> Tensor:
    """SLIC superpixels (scikit-image) of 2-D inputs ``(N, C, H, W)`` → ids ``(N, H, W)``.

    Each input is rescaled to [0, 1] over all its channels first (SLIC's colour distance
    assumes it); a per-input loop, as superpixels are per image (NumPy at this edge only).
    """
    from skimage.segmentation import slic

    out = []
    for image in x.detach().float().cpu():
        arr = image.permute(1, 2, 0).numpy()
        arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-12)
        labels = slic(arr, n_segments=segments, compactness=10.0, start_label=0, channel_axis=-1)
        out.append(torch.from_numpy(np.ascontiguousarray(labels)).long())
    return torch.stack(out)


def _relabel(ids: Tensor) -> tuple[Tensor, Tensor]:
    """Per input, feature ids made ``0 … F_n − 1``: ids ``(N, P)`` and counts ``(N,)``."""
    flat = ids.flatten(1)
    out = torch.empty_like(flat)
    counts = torch.empty(flat.shape[0], dtype=torch.long)
    for n, row in enumerate(flat):
        uniq, inverse = torch.unique(row, return_inverse=True)
        out[n] = inverse
        counts[n] = len(uniq)
    return out, counts


def kernel_shap_samples(features: int, samples: int, gen: torch.Generator) -> Tensor:
    """KernelSHAP's samples ``(samples, features)`` as Captum draws them: all ones, all zeros,
    then ``k ~ p(k) ∝ (F−1)/(k(F−k))`` (``k = 1 … F−1``) features on, chosen at random."""
    out = torch.zeros(samples, features, dtype=torch.bool)
    out[0] = True
    rest = samples - 2
    if rest > 0 and features > 1:
        k = torch.arange(1, features, dtype=torch.float64)
        probs = (features - 1) / (k * (features - k))
        chosen = torch.multinomial(probs, rest, replacement=True, generator=gen) + 1
        ranks = torch.rand(rest, features, generator=gen).argsort(1).argsort(1)
        out[2:] = ranks < chosen[:, None]
    elif rest > 0:
        out[2:] = torch.rand(rest, features, generator=gen) < 0.5
    return out


def solve_weighted(z: Tensor, y: Tensor, w: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """The weighted (ridge) regression of the module docstring, batched over inputs.

    Args:
        z: ``(N, S, F)`` samples (0/1; padded features all 0 get coefficient 0).
        y: ``(N, S)`` scores. w: ``(N, S)`` weights ≥ 0. alpha: ridge ``α ≥ 0``.

    Returns:
        coefficients ``(N, F)`` and intercepts ``(N,)``, float64.
    """
    z, y, w = z.double(), y.double(), w.double()
    wsum = w.sum(1, keepdim=True).clamp(min=1e-300)
    zbar = (w.unsqueeze(2) * z).sum(1, keepdim=True) / wsum.unsqueeze(2)  # (N, 1, F)
    ybar = (w * y).sum(1, keepdim=True) / wsum  # (N, 1)
    root = w.sqrt()
    a = (z - zbar) * root.unsqueeze(2)  # (N, S, F)
    b = ((y - ybar) * root).unsqueeze(2)  # (N, S, 1)
    gram = a.transpose(1, 2) @ a
    eye = torch.eye(z.shape[2], dtype=z.dtype)
    # α = 0: a vanishing ridge (1e-9 of the mean diagonal) picks the minimum-norm solution of
    # an under-determined system continuously in y (a rank cut-off would not)
    scale = gram.diagonal(dim1=1, dim2=2).mean(1).clamp(min=1e-300).view(-1, 1, 1)
    ridge = alpha * eye if alpha > 0 else 1e-9 * scale * eye
    coef = torch.linalg.solve(gram + ridge, a.transpose(1, 2) @ b)
    coef = coef.squeeze(2)
    intercept = ybar.squeeze(1) - (zbar.squeeze(1) * coef).sum(1)
    return coef, intercept


class SurrogateMethod(PerturbationMethod):
    """Base of LIME and KernelSHAP (see the module docstring).

    Args:
        samples: perturbed samples ``S`` per input (one forward pass each).
        features: ``"auto"``, ``"slic"``, ``"grid"`` (:data:`FEATURES`), or a tensor of integer
            feature ids ``(N | 1, *S)`` / ``(N | 1, 1, *S)`` / ``(*S)``.
        cells: grid cells per spatial axis (``"grid"``).
        segments: the approximate number of SLIC superpixels (``"slic"``).
        alpha: ridge penalty ``α`` of the linear model.
        seed: seed of the samples.
        baseline / blur_sigma / score / internal_batch_size / memory_budget: see
            :class:`~evidencemap.methods.perturbation.PerturbationMethod`.
    """

    default_alpha: ClassVar[float] = 0.0
    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option(
            "features",
            "str",
            "auto",
            "feature map: SLIC superpixels, a grid, or a tensor of ids",
            choices=FEATURES,
            other="a tensor of integer ids (N | 1, *S)",
        ),
        Option("cells", "int", 8, "grid cells per spatial axis", low=1, cap=64, cost="work"),
        Option("segments", "int", 50, "approximate number of SLIC superpixels", low=1),
        SEED,
    )

    def __init__(
        self,
        model: nn.Module,
        *,
        samples: int = 1000,
        features: str | Tensor = "auto",
        cells: int = 8,
        segments: int = 50,
        alpha: float = 0.0,
        seed: int = 0,
        score: str = "probability",
        **kw: Any,
    ) -> None:
        super().__init__(model, **kw)
        self.samples = self.option("samples", samples)
        features = self.option("features", features)
        if not isinstance(features, (str, Tensor)):
            raise TypeError(
                f"features must be one of {FEATURES} or a tensor of ids, got "
                f"{type(features).__name__}"
            )
        if isinstance(features, Tensor) and (
            features.is_floating_point() or features.is_complex() or features.dtype == torch.bool
        ):
            raise TypeError(f"features must hold integer ids, got dtype {features.dtype}")
        self.features = features
        self.cells = self.option("cells", cells)
        self.segments = self.option("segments", segments)
        self.alpha = self.option("alpha", alpha)
        self.seed = self.option("seed", seed)
        self.score = self.option("score", score)

    def feature_ids(self, x: Tensor) -> Tensor:
        """Feature ids ``(N, *S)`` (CPU, long) of inputs ``x``."""
        n, sizes = x.shape[0], tuple(x.shape[2:])
        kind = self.features
        if isinstance(kind, Tensor):
            ids = kind.detach().cpu().long()
            if ids.ndim == len(sizes) + 2 and ids.shape[1] == 1:
                ids = ids[:, 0]
            if ids.ndim == len(sizes):
                ids = ids.unsqueeze(0)
            if (
                ids.ndim != len(sizes) + 1
                or tuple(ids.shape[1:]) != sizes
                or ids.shape[0]
                not in (
                    1,
                    n,
                )
            ):
                raise ValueError(
                    f"features of shape {tuple(kind.shape)} do not fit the inputs "
                    f"{tuple(x.shape)}; give (N | 1, *S) or (N | 1, 1, *S) integer ids"
                )
            return ids.expand(n, *sizes)
        if kind == "auto":
            kind = "slic" if len(sizes) == 2 else "grid"
        if kind == "slic":
            if len(sizes) != 2:
                raise ValueError("features='slic' needs 2-D inputs; use 'grid' for volumes")
            return slic_features(x, self.segments)
        return grid_features(sizes, self.cells).expand(n, *sizes)

    def draw(self, features: int, gen: torch.Generator) -> Tensor:
        """Samples ``(S, features)`` (bool) of one input."""
        raise NotImplementedError

    def weights(self, start: int, z: Tensor, x: Tensor, perturbed: Tensor) -> Tensor:
        """Weights ``(g, N)`` of samples ``start …`` ``z`` ``(N, g, F)`` with perturbed inputs
        ``(g, N, C, *S)`` of inputs ``x``."""
        raise NotImplementedError

    def attribute(
        self, x: Tensor, base: Tensor, resolved: ResolvedTarget, scores: Tensor
    ) -> tuple[Tensor, dict[str, Any]]:
        n, sizes = x.shape[0], tuple(x.shape[2:])
        ids, counts = _relabel(self.feature_ids(x))
        most = int(counts.max())
        z = torch.zeros(n, self.samples, most, dtype=torch.bool)
        for i, count in enumerate(counts.tolist()):  # per input: the same samples alone or not
            gen = torch.Generator().manual_seed(int(self.seed))
            z[i, :, :count] = self.draw(count, gen)
        ids_dev = ids.to(x.device)
        z_dev = z.to(x.device)
        y = x.new_zeros(self.samples, n)
        w = x.new_zeros(self.samples, n)

        def make(start: int, stop: int) -> Tensor:
            picked = z_dev[:, start:stop].gather(
                2, ids_dev.unsqueeze(1).expand(n, stop - start, ids.shape[1])
            )  # (N, g, P)
            return picked.transpose(0, 1).reshape(stop - start, n, 1, *sizes)

        def consume(start: int, stop: int, _: Tensor, got: Tensor, inputs: Tensor) -> None:
            y[start:stop] = got
            w[start:stop] = self.weights(start, z_dev[:, start:stop], x, inputs)

        self.perturbed_scores(x, base, resolved, self.samples, make, consume)
        coef, intercept = solve_weighted(
            z.double(), y.transpose(0, 1).cpu(), w.transpose(0, 1).cpu(), self.alpha
        )
        coef = coef.to(device=x.device, dtype=x.dtype)
        raw = coef.gather(1, ids_dev).view(n, 1, *sizes)
        extras = {
            "intercept": intercept.to(device=x.device, dtype=x.dtype),
            "features": ids_dev.view(n, 1, *sizes),
        }
        return raw, extras


def _samples_option(default: int) -> Option:
    return Option(
        "samples",
        "int",
        default,
        "perturbed samples per input (one forward each)",
        low=1,
        cost="work",
        cap=8192,
        passes=True,
    )


@register
class Lime(SurrogateMethod):
    """LIME (Ribeiro et al. 2016): a local linear model, samples weighted by their closeness.

    ``z_f ~ Bernoulli(½)``, ``π = exp(−d²/(2w²))`` with ``d = 1 − cos(x, x_z)`` the cosine
    distance between the input and the perturbed input, flattened (Captum's default
    similarity, ``w = kernel_width``), ridge ``α = alpha`` (see :class:`SurrogateMethod` and
    the module docstring for the rest).

    Args:
        kernel_width: the kernel's width ``w``.
    """

    name = "lime"
    OPTIONS: ClassVar[tuple[Option, ...]] = (
        _samples_option(1000),
        Option("alpha", "float", 1.0, "ridge penalty of the linear model", low=0.0),
        Option(
            "kernel_width", "float", 1.0, "width w of the similarity kernel", low=0.0, low_open=True
        ),
        _score_option("probability"),
    )

    def __init__(
        self,
        model: nn.Module,
        *,
        samples: int = 1000,
        alpha: float = 1.0,
        kernel_width: float = 1.0,
        **kw: Any,
    ) -> None:
        super().__init__(model, samples=samples, alpha=alpha, **kw)
        self.kernel_width = self.option("kernel_width", kernel_width)

    def draw(self, features: int, gen: torch.Generator) -> Tensor:
        return torch.rand(self.samples, features, generator=gen) < 0.5

    def weights(self, start: int, z: Tensor, x: Tensor, perturbed: Tensor) -> Tensor:
        flat = perturbed.flatten(2).float()  # (g, N, D)
        ref = x.flatten(1).float().unsqueeze(0)  # (1, N, D)
        cos = (flat * ref).sum(2) / (flat.norm(dim=2) * ref.norm(dim=2)).clamp(min=1e-8)
        return torch.exp(-((1 - cos) ** 2) / (2 * self.kernel_width**2)).to(x.dtype)


@register
class KernelShap(SurrogateMethod):
    """KernelSHAP (Lundberg & Lee 2017): Shapley values from a linear model of sampled coalitions.

    Samples from the Shapley kernel's distribution (all features, none, then ``k`` of ``F``
    with ``p(k) ∝ (F−1)/(k(F−k))``), weights ``10⁶`` for the two end points (the efficiency
    constraint ``β₀ + Σβ = f(x)``, ``β₀ = f(b)``, nearly exact) and 1 for the others, no
    penalty (see :class:`SurrogateMethod` and the module docstring).
    """

    name = "kernel_shap"
    aliases: ClassVar[tuple[str, ...]] = ("kernelshap", "kernel-shap")
    OPTIONS: ClassVar[tuple[Option, ...]] = (
        _samples_option(1000),
        Option("alpha", "float", 0.0, "ridge penalty of the linear model", low=0.0),
        _score_option("probability"),
    )

    def __init__(
        self, model: nn.Module, *, samples: int = 1000, alpha: float = 0.0, **kw: Any
    ) -> None:
        super().__init__(model, samples=samples, alpha=alpha, **kw)

    @property
    def batch_independent(self) -> bool:
        """Not split by a memory budget without a ridge: an under-determined unregularised fit
        (fewer samples than features) amplifies the float rounding by which a batched forward
        pass differs from a single one (1e-7 of a score became 1e-5 of a map). Its masked
        passes are still chunked by the budget."""
        return self.alpha > 0

    def draw(self, features: int, gen: torch.Generator) -> Tensor:
        return kernel_shap_samples(features, self.samples, gen)

    def weights(self, start: int, z: Tensor, x: Tensor, perturbed: Tensor) -> Tensor:
        index = torch.arange(start, start + z.shape[1], device=x.device)
        ends = (index < 2).to(x.dtype) * (1e6 - 1.0) + 1.0  # samples 0 and 1: all, none
        return ends.view(-1, 1).expand(z.shape[1], z.shape[0])
