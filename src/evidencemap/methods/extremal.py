"""Extremal perturbation (Fong, Patrick & Vedaldi, ICCV 2019): the smooth mask of a given area
that keeps (or removes) the most evidence for the target.

Notation: ``x ∈ R^{N×C×S}`` the inputs (``S`` = 2-D or 3-D spatial axes), ``a`` a target area
(a fraction of the input's elements), ``f(·)`` the target's score (its logit for a class
target, as TorchRay's ``simple_reward``; the target's own score for a callable one).

**Smooth masks.** A mask is parameterised by ``m̄ ∈ [0, 1]`` on a coarse grid of
``⌈S_a / step⌉`` cells per axis, the cell ``i`` centred at ``p_i = σ + step·i`` in a frame that
starts ``σ`` elements before the input. The mask at an element ``u`` is the *smooth max* over
the ``K^d`` cells around it (``K = 2r + 1``, ``r = 1 + ⌈σ / step⌉``) of the cell's value times
a kernel of its distance::

    v_i(u) = k(‖u − p_i‖ / σ) · m̄_i,         k(z) = exp(−2 · max(z − ½, 0)²)
    M(u)   = clip( Σ_i v_i(u) · softmax_i(20 · v_i(u)), 0, 1 )

(the smooth-max convolution of the paper; cells outside the grid count as 0).

**Perturbation.** ``Φ(x; M)`` interpolates, element by element, a pyramid of ``L`` increasingly
perturbed copies ``y_l`` of ``x``: ``y_l = g_{σ_l} ∗ x`` with ``σ_l = (1 − l/(L−1))·σ_max``
(``"blur"``, zero padding as TorchRay's ``imsmooth``) or ``y_l = (l/(L−1))·x`` (``"fade"``);
``Φ(x; M)(u) = y_⌊w⌋(u) + (w − ⌊w⌋)(y_{⌊w⌋+1}(u) − y_⌊w⌋(u))`` with ``w = (L − 1)·M(u)``, so
``M = 1`` keeps ``x`` and ``M = 0`` shows the most perturbed copy.

**Objective.** For each input and each area, the energy maximised over ``m̄`` is::

    preserve:  f(Φ(x; M))                       delete:  −f(Φ(x; 1 − M))
    dual:      f(Φ(x; M)) − f(Φ(x; 1 − M))
    E = reward − λ_t · mean_j (sort(M)_j − r^a_j)²

where ``r^a`` is the sorted vector of a mask of exactly area ``a`` (``⌊|S|·(1 − a)⌋`` zeros,
then ones): the rank-based area constraint. ``λ_t = λ_0·γ^t`` grows over the iterations
(TorchRay: ``λ_0 = 300``, ``γ = 1.0035``). ``m̄`` starts at 1 and takes SGD steps with momentum
``0.9`` and dampening ``0.9`` (PyTorch's SGD: the first step uses the gradient itself),
learning rate ``0.01``, and is clipped to ``[0, 1]`` after each. With ``jitter`` the perturbed
inputs are flipped along the last spatial axis on even iterations.

**Batched.** Every input, every area (and both halves of the dual game) is one row of the same
forward and backward pass per iteration: ``N·A`` (dual ``2·N·A``) inputs. The optimiser state is
per row, so each input's result is that of a run alone (to the rounding of batched kernels).

Result: ``raw`` ``(N, A, *S)`` the masks per area; ``maps`` ``(N, 1, *S)`` their mean over the
areas (not rescaled: a mask is in [0, 1] with a meaning); ``extras``: ``"explanation"``
``Φ(x; M)`` and ``"deleted"`` ``Φ(x; 1 − M)`` of the first area ``(N, C, *S)``, ``"score"``
the target's softmax probability (a callable target: its score) and ``"top1"`` on the one the
game shows (``"deleted"`` for ``game="delete"``), ``"reward"`` ``(N, A)`` the final reward,
``"mask_area"`` ``(N, A)`` each mask's mean, ``"image_score"`` ``(N,)`` on ``x``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from evidencemap import runtime
from evidencemap.explanation import Explanation
from evidencemap.filters import gaussian_filter
from evidencemap.methods.base import Context, Method
from evidencemap.methods.call import graph_bytes
from evidencemap.methods.options import Option
from evidencemap.methods.perturbation import channels_last
from evidencemap.methods.registry import register
from evidencemap.targets import ResolvedTarget, Target, resolve

__all__ = [
    "EXTREMAL_GAMES",
    "EXTREMAL_PERTURBATIONS",
    "MAX_AREAS",
    "ExtremalPerturbation",
    "SmoothMaskGenerator",
    "SmoothMax",
    "Workspace",
    "area_reference",
    "perturb",
    "perturbation_pyramid",
]

EXTREMAL_GAMES = ("preserve", "delete", "dual")
"""Which input the reward reads: the kept part, the removed part, or their difference."""

EXTREMAL_PERTURBATIONS = ("blur", "fade")
"""What a mask's 0 shows: the input blurred by ``max_blur``, or the input faded to 0."""

MAX_AREAS = 16
"""The most target areas one call takes (each is one more row of every pass)."""

TORCHRAY_ITERATIONS = 800
"""TorchRay's default number of steps, the length its learning rate and ``λ`` growth are for."""

COLDNESS = 20.0
"""The smooth max's softmax temperature (TorchRay's ``coldness``)."""


@dataclass(frozen=True)
class SmoothMaskGenerator:
    """The smooth-max mask generator for inputs of spatial size ``size`` (any number of axes).

    Attributes:
        size: the spatial size ``S`` of the masks.
        step: cell size of the parameter grid in elements.
        sigma: kernel size ``σ`` in elements.
    """

    size: tuple[int, ...]
    step: int
    sigma: float

    @property
    def shape_in(self) -> tuple[int, ...]:
        """The parameter grid ``⌈S_a / step⌉`` per axis."""
        return tuple(math.ceil(s / self.step) for s in self.size)

    @property
    def radius(self) -> int:
        """``r = 1 + ⌈σ / step⌉``: cells on each side of an element's own that reach it."""
        return 1 + math.ceil(self.sigma / self.step)

    @property
    def padding(self) -> int:
        """Zero cells added on each side of the grid (TorchRay's ``1 + ⌈2σ / step⌉``)."""
        return 1 + math.ceil(2 * self.sigma / self.step)

    @property
    def neighbours(self) -> int:
        """``K^d``: the cells each element's smooth max runs over."""
        return (2 * self.radius + 1) ** len(self.size)

    def cells(self) -> list[tuple[int, int, int]]:
        """Per axis: the first and the number of cells of the padded, unfolded grid that the
        input's elements fall in, and the offset of the first element in the first cell."""
        margin = round(self.sigma)
        found = []
        for length in self.size:
            first = margin // self.step
            last = (margin + length - 1) // self.step
            found.append((first, last - first + 1, margin - first * self.step))
        return found

    def layout(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The kernel ``k(‖u − p_i‖/σ)`` as a function of an element's position inside its cell
        and the neighbour's offset, ``(1, step, 1, step, …, K^d)``: an element ``u = step·c +
        s`` (in the frame with the margin) and its neighbour ``i = c + j − padding`` are
        ``s − σ − step·(j − padding)`` apart on each axis, whatever the cell ``c``."""
        k = 2 * self.radius + 1
        dims = len(self.size)
        s = torch.arange(self.step, dtype=torch.float64)
        offsets = self.sigma + self.step * (torch.arange(k, dtype=torch.float64) - self.padding)
        delta2 = (s[:, None] - offsets[None, :]) ** 2  # (step, K), the same on every axis
        dist2: Tensor | None = None
        for axis in range(dims):
            shape = [1] * (2 * dims)
            shape[axis], shape[dims + axis] = self.step, k
            part = delta2.view(shape)
            dist2 = part if dist2 is None else dist2 + part
        if dist2 is None:
            raise ValueError("smooth masks need at least one spatial axis")
        kernel = torch.exp(-2 * (dist2.sqrt() / self.sigma - 0.5).clamp(min=0) ** 2)
        kernel = kernel.reshape(*([self.step] * dims), -1)  # (step, …, K^d)
        kernel = kernel.view(*[v for _ in range(dims) for v in (1, self.step)], -1)
        return kernel.to(device=device, dtype=dtype)

    def workspace(self, batch: int, like: Tensor) -> Workspace:
        """Three buffers ``(B, n_1, step, …, K^d)`` for :class:`SmoothMax`, made once per run and
        reused by every step (a fresh buffer of this size costs more in page faults than the
        arithmetic done in it)."""
        shape = [batch, *[v for _, c, _ in self.cells() for v in (c, self.step)]]
        shape.append(self.neighbours)
        return Workspace(like.new_empty(shape), like.new_empty(shape), like.new_empty(shape))

    def generate(
        self, params: Tensor, kernel: Tensor, workspace: Workspace | None = None
    ) -> Tensor:
        """Masks ``(B, *S)`` in [0, 1] from parameters ``(B, *shape_in)`` (differentiable).

        The ``K^d`` neighbouring cells of every cell are read by one unfold per axis of the
        zero-padded grid (``(B, n_1, …, K^d)``, small); every element of a cell shares them,
        weighted by the periodic kernel of :meth:`layout` (a broadcast, nothing gathered), and
        the smooth max (:class:`SmoothMax`) pools them; the margin is cropped last.
        ``workspace`` (:meth:`workspace`) holds the large intermediates; one generated mask's
        backward pass must run before the next mask is generated in the same workspace.
        """
        dims = len(self.size)
        k = 2 * self.radius + 1
        grid = torch.nn.functional.pad(params, [self.padding] * (2 * dims))
        for axis in range(dims):
            grid = grid.unfold(1 + axis, k, 1)
        cells = self.cells()
        for axis, (first, count, _) in enumerate(cells):
            grid = grid.narrow(1 + axis, first, count)
        counts = [count for _, count, _ in cells]
        grid = grid.reshape(params.shape[0], *counts, -1)
        grid = grid.view(params.shape[0], *[v for c in counts for v in (c, 1)], -1)
        if workspace is None:
            workspace = self.workspace(params.shape[0], params)
        pooled = SmoothMax.apply(grid, kernel * COLDNESS, workspace)
        pooled = pooled.reshape(params.shape[0], *[c * self.step for c in counts])
        for axis, (_, _, offset) in enumerate(cells):
            pooled = pooled.narrow(1 + axis, offset, self.size[axis])
        return pooled.clamp(0.0, 1.0)


@dataclass
class Workspace:
    """The large buffers of :class:`SmoothMax`: ``τ·v``, its exponentials, the gradient."""

    scaled: Tensor
    exps: Tensor
    grad: Tensor
    generation: int = 0


class SmoothMax(torch.autograd.Function):
    """``M = Σ_j v_j·softmax_j(τ·v)`` over the last axis of ``v = grid·kernel`` (broadcast),
    ``τ`` = :data:`COLDNESS`, with the backward pass in closed form,
    ``∂M/∂v_j = p_j·(1 + τ·(v_j − M))``.

    Computed as ``s = grid·(τ·kernel)``, ``e = exp(s − c)`` with ``c = τ·max(grid, 0)`` (no
    overflow; the parameters are in [0, 1]), ``M = Σ s·e / (τ·Σ e)``, in the buffers of a
    :class:`Workspace`: a mask's backward pass must run before the next mask is generated in
    the same workspace (checked).
    """

    @staticmethod
    def forward(ctx: Any, grid: Tensor, kernel: Tensor, work: Workspace) -> Tensor:
        scaled = torch.mul(grid, kernel, out=work.scaled)
        shift = float(grid.detach().max().clamp(min=0)) * float(kernel.max())
        exps = torch.sub(scaled, shift, out=work.exps).exp_()
        total = exps.sum(-1)
        pooled = torch.einsum("...k,...k->...", scaled, exps).div_(total).div_(COLDNESS)
        work.generation += 1
        ctx.work, ctx.generation = work, work.generation
        ctx.save_for_backward(kernel, total, pooled)
        return pooled

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        kernel, total, pooled = ctx.saved_tensors
        work: Workspace = ctx.work
        if work.generation != ctx.generation:
            raise RuntimeError(
                "SmoothMax: the workspace was reused by a later mask; run a mask's backward "
                "pass before generating the next in the same workspace"
            )
        # ∂M/∂s_j = (e_j/Σe)·(1 + s_j − τM)/τ; ∂s_j/∂grid = τ·kernel_j
        g = torch.sub(work.scaled, COLDNESS * pooled.unsqueeze(-1), out=work.grad)
        g.add_(1).mul_(work.exps)
        g.mul_((grad / total).unsqueeze(-1)).mul_(kernel)
        axes = [i for i in range(1, g.ndim - 1) if i % 2 == 0]
        return g.sum(axes, keepdim=True).div_(COLDNESS), None, None


def area_reference(
    numel: int,
    areas: Sequence[float],
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> Tensor:
    """The sorted values ``r^a`` ``(A, numel)`` of a binary mask of area ``a`` for each area:
    ``⌊numel·(1 − a)⌋`` zeros, then ones."""
    zeros = torch.tensor([int(numel * (1 - a)) for a in areas], device=device)
    return (torch.arange(numel, device=device)[None, :] >= zeros[:, None]).to(dtype)


def perturbation_pyramid(x: Tensor, kind: str, levels: int, max_blur: float) -> Tensor:
    """The ``L`` perturbed copies ``(N, L, C, *S)`` of ``x``, most perturbed first, ``x`` last:
    ``g_{σ_l} ∗ x`` with ``σ_l = (1 − l/(L−1))·max_blur`` (separable, radius ``⌈4σ_l⌉``, zero
    padding) for ``"blur"``, ``(l/(L−1))·x`` for ``"fade"``."""
    copies = []
    for level in range(levels):
        share = level / (levels - 1)
        if kind == "fade":
            copies.append(x * share)
        elif share >= 1:
            copies.append(x)
        else:
            sigma = (1 - share) * max_blur
            copies.append(gaussian_filter(x, sigma, radius=math.ceil(4 * sigma), padding="zero"))
    return torch.stack(copies, dim=1)


def perturb(pyramid: Tensor, masks: Tensor) -> Tensor:
    """``Φ(x; M)`` ``(R, N, C, *S)`` for masks ``(R, N, *S)`` and the pyramid ``(N, L, C, *S)``
    of :func:`perturbation_pyramid`: linear interpolation between the two levels around
    ``(L − 1)·M`` (differentiable in the mask)."""
    levels, channels = pyramid.shape[1], pyramid.shape[2]
    w = masks.unsqueeze(2).unsqueeze(3) * (levels - 1)  # (R, N, 1, 1, *S)
    low = w.detach().floor()
    frac = w - low
    shape = (masks.shape[0], *pyramid.shape[:1], 1, channels, *pyramid.shape[3:])
    idx = low.long().expand(shape)
    source = pyramid.unsqueeze(0).expand(masks.shape[0], *pyramid.shape)
    y0 = source.gather(2, idx)
    y1 = source.gather(2, (idx + 1).clamp(max=levels - 1))
    return (y0 + frac * (y1 - y0)).squeeze(2)


def _check_areas(value: Any) -> tuple[float, ...]:
    """``areas`` as a tuple of floats in (0, 1): a number, a sequence of them, or a string of
    comma-separated numbers (the command line's ``--option areas=0.05,0.1``)."""
    values: Any = value
    if isinstance(value, str):
        try:
            values = [float(v) for v in value.strip("[]() ").split(",")]
        except ValueError:
            values = ()
    elif not isinstance(value, Sequence):
        values = (value,)
    ok = 0 < len(values) <= MAX_AREAS and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1 for v in values
    )
    if not ok:
        raise ValueError(
            f"areas must be a number in (0, 1) or a list of 1 to {MAX_AREAS} of them, got {value!r}"
        )
    return tuple(float(v) for v in values)


@register
class ExtremalPerturbation(Method):
    """Extremal perturbation (Fong et al. 2019): the smooth mask of a given area that keeps most.

    For each area ``a``, the smooth mask of area ``a`` whose perturbation keeps
    (``game="preserve"``) or removes (``"delete"``) the most of the target's score — formulas
    in :mod:`evidencemap.methods.extremal`.

    ``maps`` ``(N, 1, *S)``: the mean of the masks over the areas (one area: the mask);
    ``raw`` ``(N, A, *S)``: each area's mask. One forward and one backward pass of all
    ``N·A`` perturbed inputs per iteration.

    Args:
        areas: target area(s), fractions of the input in (0, 1) (one mask each).
        game: ``"preserve"``, ``"delete"`` or ``"dual"`` (:data:`EXTREMAL_GAMES`).
        max_iterations: optimisation steps (TorchRay: 800).
        perturbation: ``"blur"`` or ``"fade"`` (:data:`EXTREMAL_PERTURBATIONS`).
        levels: copies in the perturbation pyramid ``L``.
        max_blur: ``σ_max`` of the blur, in elements.
        step: cell size of the mask's parameter grid, in elements.
        sigma: the mask kernel's size ``σ``, in elements.
        jitter: flip the perturbed inputs along the last axis on even iterations.
        smooth: Gaussian smoothing of the final masks, ``σ = smooth·min(S)`` (0: none).
        lr / momentum: the SGD step on the parameters.
        area_weight / area_growth: ``λ_0`` and ``γ`` of ``λ_t = λ_0·γ^t``.
        output_key / eval_mode / batch_size: see :class:`~evidencemap.methods.Method`.
    """

    name = "extremal_perturbation"
    aliases: ClassVar[tuple[str, ...]] = ("extremal", "extremal-perturbation")
    pass_kind: ClassVar[str] = "input"
    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option(
            "areas",
            "float",
            0.1,
            "target area of the mask, a fraction of the input",
            low=0.0,
            high=1.0,
            low_open=True,
            high_open=True,
            other=f"a list of 1 to {MAX_AREAS} such numbers, one mask each (comma-separated)",
        ),
        Option("game", "str", "preserve", "keep, remove, or both (dual)", choices=EXTREMAL_GAMES),
        Option(
            "max_iterations",
            "int",
            300,
            "optimisation steps (one forward and backward each)",
            low=1,
            cost="work",
            cap=1000,
            passes=True,
        ),
        Option(
            "perturbation",
            "str",
            "blur",
            "what a mask's 0 shows",
            choices=EXTREMAL_PERTURBATIONS,
        ),
        Option("levels", "int", 8, "copies in the perturbation pyramid", low=2, high=64),
        Option("max_blur", "float", 20.0, "σ of the strongest blur", low=0.0, low_open=True),
        Option("step", "int", 7, "cell size of the mask's parameter grid", low=1),
        Option("sigma", "float", 21.0, "size of the mask's kernel", low=0.0, low_open=True),
        Option("jitter", "bool", True, "flip the inputs along the last axis every other step"),
        Option("smooth", "float", 0.0, "Gaussian smoothing of the final mask (× min size)", low=0),
        Option(
            "lr",
            "float",
            None,
            "SGD learning rate (None: 0.01 × 800 / max_iterations, TorchRay's over 800 steps)",
            low=0.0,
            low_open=True,
            nullable=True,
        ),
        Option("momentum", "float", 0.9, "SGD momentum", low=0.0, high=1.0, high_open=True),
        Option("area_weight", "float", 300.0, "λ_0 of the area constraint", low=0.0),
        Option(
            "area_growth",
            "float",
            None,
            "factor of λ per step (None: 1.0035^(800 / max_iterations), TorchRay's over 800)",
            low=1.0,
            high=2.0,
            nullable=True,
        ),
    )

    def __init__(
        self,
        model: nn.Module,
        *,
        areas: float | Sequence[float] = 0.1,
        game: str = "preserve",
        max_iterations: int = 300,
        perturbation: str = "blur",
        levels: int = 8,
        max_blur: float = 20.0,
        step: int = 7,
        sigma: float = 21.0,
        jitter: bool = True,
        smooth: float = 0.0,
        lr: float | None = None,
        momentum: float = 0.9,
        area_weight: float = 300.0,
        area_growth: float | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(model, **kw)
        self.areas = _check_areas(self.option("areas", areas))
        self.game = self.option("game", game)
        self.max_iterations = self.option("max_iterations", max_iterations)
        self.perturbation = self.option("perturbation", perturbation)
        self.levels = self.option("levels", levels)
        self.max_blur = self.option("max_blur", max_blur)
        self.step = self.option("step", step)
        self.sigma = self.option("sigma", sigma)
        self.jitter = self.option("jitter", jitter)
        self.smooth = self.option("smooth", smooth)
        self.lr = self.option("lr", lr)
        self.momentum = self.option("momentum", momentum)
        self.area_weight = self.option("area_weight", area_weight)
        self.area_growth = self.option("area_growth", area_growth)

    @property
    def rows_per_input(self) -> int:
        """Rows of every pass per input: one per area, twice in the dual game."""
        return len(self.areas) * (2 if self.game == "dual" else 1)

    def schedule(self) -> tuple[float, float]:
        """The learning rate and the growth of ``λ`` per step: the options, or TorchRay's
        800-step schedule stretched to ``max_iterations`` steps (the same distance covered and
        the same final ``λ``): ``0.01·800/T`` and ``1.0035^(800/T)``."""
        stretch = TORCHRAY_ITERATIONS / self.max_iterations
        lr = 0.01 * stretch if self.lr is None else self.lr
        growth = 1.0035**stretch if self.area_growth is None else self.area_growth
        return lr, growth

    def input_bytes(self, x: Tensor) -> int:
        """One input's graph for each of its rows, plus the smooth max's buffers (three of
        ``K^d·|S|`` per area, :meth:`SmoothMaskGenerator.workspace`), and the pyramid."""
        one = x[:1]
        generator = SmoothMaskGenerator(tuple(one.shape[2:]), self.step, self.sigma)
        numel = math.prod(one.shape[2:])
        masks = 3 * generator.neighbours * numel * len(self.areas)
        pyramid = self.levels * one.numel()
        graph = graph_bytes(self, one, ("input",), self.forward)
        return graph * self.rows_per_input + (masks + pyramid) * one.element_size()

    def explain_batch(self, inputs: Tensor, target: Target) -> Explanation:
        x = inputs.detach()
        with torch.no_grad():
            output = self.forward(x)
        resolved = resolve(target, output)
        image_score = _shown_score(output, resolved)
        pyramid = perturbation_pyramid(x, self.perturbation, self.levels, self.max_blur)
        masks = self.optimise(x, pyramid, resolved)  # (A, N, *S)
        if self.smooth > 0:
            sigma = self.smooth * min(x.shape[2:])
            masks = gaussian_filter(
                masks.unsqueeze(2).flatten(0, 1), sigma, radius=math.ceil(4 * sigma), padding="zero"
            ).view(masks.shape)
        extras = self._extras(pyramid, masks, resolved)
        extras["image_score"] = image_score
        raw = masks.transpose(0, 1).contiguous()  # (N, A, *S)
        context = Context(self.model, x, output.detach(), resolved, None, self.forward)
        scores = resolved.score(output).detach()
        return self.finish(
            raw, raw.mean(1, keepdim=True), context, scores, extras=extras, normalise=False
        )

    def _rewards(self, out: Tensor, resolved: ResolvedTarget, n: int) -> Tensor:
        """``f`` of each row of ``out`` (rows ordered copy by copy of the ``n`` inputs), with
        the game's sign: ``(A, n)``."""
        scores = torch.stack([resolved.score(part) for part in out.split(n)])
        areas = len(self.areas)
        if self.game == "preserve":
            return scores
        if self.game == "delete":
            return -scores
        return scores[:areas] - scores[areas:]

    def optimise(self, x: Tensor, pyramid: Tensor, resolved: ResolvedTarget) -> Tensor:
        """The masks ``(A, N, *S)`` after ``max_iterations`` steps (those of the last step, as
        TorchRay returns them) for inputs ``x`` and their pyramid
        (:func:`perturbation_pyramid`)."""
        n, sizes = x.shape[0], tuple(x.shape[2:])
        generator = SmoothMaskGenerator(sizes, self.step, self.sigma)
        layout = generator.layout(x.device, x.dtype)
        workspace = generator.workspace(len(self.areas) * n, x)
        reference = area_reference(math.prod(sizes), self.areas, x.dtype, x.device)[:, None, :]
        params = x.new_ones(len(self.areas), n, *generator.shape_in)
        velocity: Tensor | None = None
        weight = self.area_weight
        lr, growth = self.schedule()
        masks = x.new_ones(len(self.areas), n, *sizes)
        total = self.max_iterations
        for t in range(total):
            runtime.checkpoint(t, total, self.name)
            with torch.enable_grad():
                leaf = params.detach().requires_grad_(True)
                masks = generator.generate(leaf.flatten(0, 1), layout, workspace).view(masks.shape)
                out = self.forward(self._perturbed(pyramid, masks, flip=self.jitter and t % 2 == 0))
                reward = self._rewards(out, resolved, n)
                ranked = masks.flatten(2).sort(dim=2).values
                regul = (ranked - reference).pow(2).mean(2)
                energy = (reward - weight * regul).sum()
                (grad,) = torch.autograd.grad(-energy, leaf)
            masks = masks.detach()
            if velocity is None:
                velocity = grad
            else:
                velocity = velocity.mul_(self.momentum).add_(grad, alpha=1 - self.momentum)
            params = (params - lr * velocity).clamp_(0.0, 1.0)
            weight *= growth
        runtime.checkpoint(total, total, self.name)
        return masks

    def _perturbed(self, pyramid: Tensor, masks: Tensor, flip: bool = False) -> Tensor:
        """The game's perturbed inputs ``(R·N, C, *S)`` for masks ``(A, N, *S)``."""
        if self.game == "preserve":
            keep = masks
        elif self.game == "delete":
            keep = 1 - masks
        else:
            keep = torch.cat([masks, 1 - masks])
        if self.perturbation == "fade":  # the interpolation of a linear pyramid is exact
            z = keep.unsqueeze(2) * pyramid[:, -1].unsqueeze(0)
        else:
            z = perturb(pyramid, keep)
        z = z.flatten(0, 1)
        return channels_last(z.flip(-1) if flip else z)

    def _extras(self, pyramid: Tensor, masks: Tensor, resolved: ResolvedTarget) -> dict[str, Any]:
        """The images of the first area, the score on the one the game shows, the final
        rewards and areas."""
        n = pyramid.shape[0]
        with torch.no_grad():
            first = masks[:1]
            kept = perturb(pyramid, first)[0]
            deleted = perturb(pyramid, 1 - first)[0]
            shown = deleted if self.game == "delete" else kept
            out_shown = self.forward(shown)
            out = self.forward(self._perturbed(pyramid, masks))
            reward = self._rewards(out, resolved, n)
        return {
            "explanation": kept,
            "deleted": deleted,
            "score": _shown_score(out_shown, resolved),
            "top1": out_shown.argmax(dim=1)
            if out_shown.ndim == 2
            else torch.zeros(n, dtype=torch.long, device=pyramid.device),
            "reward": reward.transpose(0, 1).contiguous(),
            "mask_area": masks.flatten(2).mean(2).transpose(0, 1).contiguous(),
        }


def _shown_score(out: Tensor, resolved: ResolvedTarget) -> Tensor:
    """The target's softmax probability on ``out`` (a class target), else its score."""
    if resolved.classes is not None and out.ndim == 2:
        idx = resolved.classes.to(out.device)[:, None]
        return out.softmax(dim=1).gather(1, idx).squeeze(1).detach()
    return resolved.score(out).detach()
