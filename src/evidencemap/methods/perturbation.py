"""Perturbation methods: occlusion and RISE — the model's score on masked copies of the input.

Notation: ``x ∈ R^{N×C×S}`` the inputs (``S`` = 2-D or 3-D spatial axes), ``b`` the baseline
(:mod:`evidencemap.references`: ``"zero"``, the data mean in the model's normalised space, by
default), a *keep-mask* ``M ∈ [0, 1]^S`` (1 keeps the input, 0 shows the baseline), the
perturbed input ``x_M = b + M ⊙ (x − b)`` (every channel masked alike) and ``f(·)`` the target's
score on it: its logit or softmax probability (option ``score``) for a class target, the
target's own score for a callable one.

================  =====================================================  ====================
method            ``raw`` ``(N, 1, *S)``                                 masks
================  =====================================================  ====================
occlusion         ``Σ_w 1_w ⊙ (f(x) − f(x_{1−1_w})) / Σ_w 1_w``           one box per window
rise              ``Σ_i f(x_{M_i}) M_i / (n·p)``                          random smooth grids
================  =====================================================  ====================

``maps`` are ``raw`` (occlusion: its positive part, evidence for the target) min-max
normalised per sample.

Every method runs the same loop (:meth:`PerturbationMethod.perturbed_scores`): the masks are
made chunk by chunk, *once per call* and shared by every input of the batch (a chunk of ``g``
masks is ``g·N`` perturbed inputs in one forward pass, under ``torch.inference_mode``), in
chunks of at most ``internal_batch_size`` inputs or fewer when the run's memory budget or the
method's ``memory_budget`` asks for it (:func:`evidencemap.runtime.run_chunked`), with a
progress report and a cancellation check per chunk. Random masks are drawn up front on the CPU
from a generator seeded by ``seed``: the same masks on every device, for every chunking, for
an input explained alone or in a batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evidencemap import runtime
from evidencemap.explanation import Explanation
from evidencemap.methods.base import Context, Method
from evidencemap.methods.options import BLUR_SIGMA, MEMORY_BUDGET, Option, batch_option
from evidencemap.methods.registry import register
from evidencemap.references import REFERENCES, check_reference, reference_image
from evidencemap.targets import ResolvedTarget, Target, resolve

__all__ = [
    "CPU_CHUNK",
    "DEVICE_CHUNK",
    "MAX_WINDOWS",
    "RISE",
    "SCORES",
    "Occlusion",
    "PerturbationMethod",
    "channels_last",
    "distinct_rows",
    "occlusion_starts",
    "rise_grids",
    "rise_masks",
]

SCORES = ("logit", "probability")
"""What ``f`` is for a class target: the model's output (logit) or its softmax probability."""

ConsumeFn = Callable[[int, int, Tensor, Tensor, Tensor], None]


def _score_option(default: str) -> Option:
    return Option(
        "score",
        "str",
        default,
        "the class score f on perturbed inputs: the logit or the softmax probability",
        choices=SCORES,
    )


BASELINE = Option(
    "baseline",
    "str",
    "zero",
    "what masked-out input becomes (evidencemap.references)",
    choices=REFERENCES,
    other="a number or a tensor (N | 1, C, *S) / (C, *S)",
)
SEED = Option("seed", "int", 0, "seed of the random masks (None: torch's global generator)")
CPU_CHUNK = 4
"""Perturbed inputs per forward pass on the CPU by default (every perturbation method): the
fastest measured on Lite0 at 224² (1 thread, CPU seconds, best of 3). RISE, 64 masks, chunks of
1 / 2 / 4 / 8 / 16 / 32: 2.0, 1.48, 1.45 / 1.44, 1.90, 2.42, 3.18 s; occlusion (window 56,
stride 28, 49 boxes): 1.61, 1.41, 1.34, 1.71, 1.77, 2.01 s; LIME (64 samples) 2.52 / 2.50 / 3.34 s
and KernelSHAP 1.47 / 1.93 / 3.29 s at 4 / 8 / 32. Small chunks keep the activations in the
caches."""

DEVICE_CHUNK = 32
"""Perturbed inputs per forward pass on other devices by default (not measured here)."""

INTERNAL_BATCH = batch_option(
    None,
    f"perturbed inputs per forward pass (None: {CPU_CHUNK} on the CPU, measured fastest; "
    f"{DEVICE_CHUNK} on other devices)",
)

MAX_WINDOWS = 4096
"""Occlusion's default and service cap on the boxes of one call (``max_windows``): window 8,
stride 4 on 224 × 224 is 3025; stride 1 would be 47 089 forward passes per input."""


def channels_last(x: Tensor) -> Tensor:
    """``x`` in the channels-last memory format for 2-D and 3-D batches (same values): CPU
    convolutions run it faster (Lite0, 16 images of 224², 2 threads: 6.8 s against 9.4 s);
    the first convolution converts the layout once and the rest of the network keeps it."""
    if x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if x.ndim == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


class PerturbationMethod(Method):
    """Base of the perturbation methods: the shared masked-forward loop and packaging.

    Args:
        baseline: what masked-out input becomes: ``"zero"`` (default), ``"blur"``, ``"mean"``,
            a number or a tensor (:mod:`evidencemap.references`).
        blur_sigma: σ in pixels of the ``"blur"`` baseline.
        score: ``"logit"`` or ``"probability"`` (:data:`SCORES`), for class targets.
        internal_batch_size: perturbed inputs per forward pass (a chunk holds whole masks,
            each ``N`` inputs, so at least one mask); ``None`` (default): :data:`CPU_CHUNK` on
            the CPU, :data:`DEVICE_CHUNK` on other devices.
        memory_budget: bytes one chunk of perturbed inputs may take (``None``: no limit of
            its own; the run's budget applies too).
        output_key / eval_mode / batch_size: see :class:`~evidencemap.methods.Method`.
    """

    pass_kind: ClassVar[str] = "forward"
    sizes_own_chunks: ClassVar[bool] = True
    default_score: ClassVar[str] = "logit"
    OPTIONS: ClassVar[tuple[Option, ...]] = (
        BASELINE,
        BLUR_SIGMA,
        INTERNAL_BATCH,
        MEMORY_BUDGET,
    )

    def __init__(
        self,
        model: nn.Module,
        *,
        baseline: str | float | Tensor = "zero",
        blur_sigma: float = 10.0,
        internal_batch_size: int | None = None,
        memory_budget: int | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(model, **kw)
        self.baseline = check_reference(self.option("baseline", baseline), "baseline")
        self.blur_sigma = self.option("blur_sigma", blur_sigma)
        self.internal_batch_size = self.option("internal_batch_size", internal_batch_size)
        self.memory_budget = self.option("memory_budget", memory_budget)
        self.score = self.default_score

    def input_bytes(self, x: Tensor) -> int:
        """Forward passes only, without a graph: nothing is kept for a backward pass."""
        return 0

    def chunk_size(self, device: torch.device) -> int:
        """Perturbed inputs per forward pass: ``internal_batch_size``, or when it is ``None``
        :data:`CPU_CHUNK` on the CPU and :data:`DEVICE_CHUNK` elsewhere."""
        if self.internal_batch_size is not None:
            return int(self.internal_batch_size)
        return CPU_CHUNK if device.type == "cpu" else DEVICE_CHUNK

    # -- the shared loop -----------------------------------------------------------------------
    def scorer(self, resolved: ResolvedTarget, n: int) -> Callable[[Tensor], Tensor]:
        """``f`` on an output holding ``g`` whole copies of the ``n``-sample batch → ``(g·n,)``."""
        classes = resolved.classes
        if classes is None:
            return lambda out: torch.cat([resolved.score(part) for part in out.split(n)])
        probability = self.score == "probability"

        def score(out: Tensor) -> Tensor:
            values = out.softmax(1) if probability else out
            idx = classes.to(out.device).repeat(out.shape[0] // n)
            picked = values[torch.arange(values.shape[0], device=out.device), idx]
            return picked.flatten(1).sum(1) if picked.ndim > 1 else picked

        return score

    def perturbed_scores(
        self,
        x: Tensor,
        base: Tensor,
        resolved: ResolvedTarget,
        total: int,
        make: Callable[[int, int], Tensor],
        consume: ConsumeFn,
    ) -> None:
        """Run the masked forward passes: ``total`` masks, in chunks.

        For each chunk ``[start, stop)`` of masks, ``make(start, stop)`` returns keep-masks
        ``(g, 1, *S)`` (shared by the batch) or ``(g, N, 1, *S)`` (one per input); the ``g·N``
        inputs ``b + M ⊙ (x − b)`` go through the model at once and
        ``consume(start, stop, masks, scores, inputs)`` receives the masks, the scores
        ``(g, N)`` and the perturbed inputs ``(g, N, C, *S)``. With shared masks, rows that
        repeat an input and its baseline (:func:`distinct_rows`: one image explained for several
        classes) go through the model once per mask and are scored from the same outputs.
        """
        n = x.shape[0]
        base = base.expand_as(x)
        diff = x - base
        score = self.scorer(resolved, n)
        owner, unique = distinct_rows(x, base)
        u = unique.shape[0]
        mask_numel = math.prod(x.shape[2:])
        # one mask: its N perturbed inputs, the mask (per input at most) and its broadcast
        per_mask = (2 * x.numel() + n * mask_numel) * x.element_size()
        requested = max(1, self.chunk_size(x.device) // u)

        def step(start: int, stop: int) -> None:
            runtime.checkpoint(start, total, self.name)
            masks = make(start, stop).to(device=x.device, dtype=x.dtype)
            g = stop - start
            if masks.ndim == x.ndim and u < n:
                # Masks shared by the batch and repeated inputs (one image explained for several
                # classes): each distinct input goes through the model once per mask.
                keep = masks.unsqueeze(1)
                distinct = torch.addcmul(base[unique].unsqueeze(0), keep, diff[unique].unsqueeze(0))
                out = self.forward(channels_last(distinct.reshape(g * u, *x.shape[1:])))
                out = out.view(g, u, *out.shape[1:]).index_select(1, owner)
                out = out.reshape(g * n, *out.shape[2:])
                inputs = distinct.index_select(1, owner)
            else:
                keep = masks if masks.ndim == x.ndim + 1 else masks.unsqueeze(1)
                inputs = torch.addcmul(base.unsqueeze(0), keep, diff.unsqueeze(0))
                out = self.forward(channels_last(inputs.reshape(g * n, *x.shape[1:])))
            consume(start, stop, masks, score(out).view(g, n), inputs)

        runtime.run_chunked(
            total, per_mask, requested, step, "perturbed batches", self.memory_budget
        )
        runtime.checkpoint(total, total, self.name)

    def explain_batch(self, inputs: Tensor, target: Target) -> Explanation:
        x = inputs.detach()
        with torch.inference_mode():
            output = self.forward(x)
            resolved = resolve(target, output)
            scores = self.scorer(resolved, x.shape[0])(output)
            base = reference_image(x, self.baseline, blur_sigma=self.blur_sigma, name="baseline")
            raw, extras = self.attribute(x, base, resolved, scores)
        raw = raw.clone()
        extras = {k: v.clone() if isinstance(v, Tensor) else v for k, v in extras.items()}
        context = Context(self.model, x, output.clone(), resolved, None, self.forward)
        return self.finish(raw, self.reduce(raw), context, scores.clone(), extras=extras)

    def attribute(
        self, x: Tensor, base: Tensor, resolved: ResolvedTarget, scores: Tensor
    ) -> tuple[Tensor, dict[str, Any]]:
        """``raw`` ``(N, 1, *S)`` and extras, for inputs ``x``, baseline ``base`` and the
        clean scores ``(N,)``; runs inside ``torch.inference_mode``."""
        raise NotImplementedError

    def reduce(self, raw: Tensor) -> Tensor:
        """The map ``(N, 1, *S)`` before normalising: the positive part of ``raw``."""
        return raw.clamp(min=0)


def distinct_rows(x: Tensor, base: Tensor) -> tuple[Tensor, Tensor]:
    """The distinct ``(input, baseline)`` pairs of a batch: ``owner`` ``(N,)``, the position of
    each row's pair among the distinct ones, and ``unique`` ``(U,)``, the first row of each.

    A batch that repeats one image to explain several classes (``top_k``) has ``U = 1``: the
    perturbed passes then run once and every class is scored from the same outputs.
    """
    n = x.shape[0]
    pairs = torch.cat([x.reshape(n, -1), base.expand_as(x).reshape(n, -1)], dim=1)
    _, owner = torch.unique(pairs, dim=0, return_inverse=True)
    rows = torch.arange(n, device=x.device)
    first = torch.full((int(owner.max()) + 1,), n, device=x.device, dtype=rows.dtype)
    return owner, first.scatter_reduce_(0, owner, rows, "amin")


# --------------------------------------------------------------------------------- occlusion


def _per_axis(value: Any, dims: int, name: str) -> tuple[int, ...]:
    """An int or a sequence of ``dims`` ints ≥ 1, as a tuple of ``dims`` ints."""
    values = (value,) * dims if not isinstance(value, Sequence) else tuple(value)
    if len(values) != dims or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values
    ):
        raise ValueError(
            f"{name} must be an int >= 1 or {dims} of them (one per spatial axis), got {value!r}"
        )
    return values


def _check_sizes(value: Any, name: str) -> int | tuple[int, ...]:
    """An int ≥ 1 or a non-empty sequence of them (the axes are counted at the call)."""
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0:
        _per_axis(value, len(value), name)
        return tuple(value)
    return _per_axis(value, 1, name)[0]


def occlusion_starts(size: int, window: int, stride: int) -> list[int]:
    """Start positions of the windows along one axis of ``size`` elements, as Captum's
    ``Occlusion``: ``0, stride, …, ⌈(size − window)/stride⌉·stride`` (``window`` clamped to
    ``size``); a last window that runs past the end is cut there, so every element is covered
    when ``stride ≤ window``."""
    window = min(window, size)
    return [i * stride for i in range(math.ceil((size - window) / stride) + 1)]


def _box_masks(
    starts: Sequence[Tensor], windows: Sequence[int], sizes: Sequence[int], index: Tensor
) -> Tensor:
    """Occlusion boxes ``(g, 1, *S)`` (1 inside) of the windows with flat indices ``index``."""
    counts = [len(s) for s in starts]
    box: Tensor | None = None
    rest = index
    for axis in reversed(range(len(sizes))):
        pos = starts[axis][rest % counts[axis]]
        rest = rest // counts[axis]
        ar = torch.arange(sizes[axis])
        inside = (ar >= pos[:, None]) & (ar < pos[:, None] + windows[axis])  # (g, S_a)
        shape = [len(index)] + [1] * len(sizes)
        shape[1 + axis] = sizes[axis]
        inside = inside.view(shape)
        box = inside if box is None else box & inside
    if box is None:
        raise ValueError("occlusion needs at least one spatial axis")
    return box.unsqueeze(1)


@register
class Occlusion(PerturbationMethod):
    """Occlusion (Zeiler & Fergus 2014), the sliding window: the score drop when a box is hidden.

    A box of ``window`` elements per spatial axis slides with ``stride``; for each position
    ``w`` the box ``1_w`` (every channel) is replaced by the baseline and
    ``Δ_w = f(x) − f(b + (1 − 1_w) ⊙ (x − b))``. Each element gets the mean drop of the windows
    that cover it: ``raw = Σ_w Δ_w 1_w / Σ_w 1_w`` ``(N, 1, *S)`` (0 where no window covers:
    only with ``stride > window``); the map is ``ReLU(raw)``. This is Captum's ``Occlusion``
    with ``sliding_window_shapes=(C, *window)``, ``strides=(C, *stride)`` on every channel
    (:func:`occlusion_starts`). Passes: ``Π_a (⌈(S_a − w_a)/s_a⌉ + 1)`` windows, 169 at
    224 × 224 with the defaults.

    Args:
        window: box size, an int (every spatial axis) or one per axis (clamped to the input).
        stride: step between boxes, an int or one per axis.
        max_windows: the most boxes a call may take (:data:`MAX_WINDOWS`, also the service's
            cap): more, from a small stride on a large input, is a ``ValueError`` before any
            pass.
        baseline / blur_sigma / score / internal_batch_size / memory_budget: see
            :class:`PerturbationMethod`.
    """

    name = "occlusion"
    aliases: ClassVar[tuple[str, ...]] = ("sliding_window", "sliding-window")
    passes_per_call: ClassVar[float] = 169.0
    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option("window", "int", 32, "box size per spatial axis", low=1, other="one per axis"),
        Option(
            "stride", "int", 16, "step between boxes per spatial axis", low=1, other="one per axis"
        ),
        _score_option("logit"),
        Option(
            "max_windows",
            "int",
            MAX_WINDOWS,
            "refuse a call whose window and stride give more boxes than this (one forward "
            "pass each per input)",
            low=1,
            cost="work",
            cap=MAX_WINDOWS,
        ),
    )

    def __init__(
        self,
        model: nn.Module,
        *,
        window: int | Sequence[int] = 32,
        stride: int | Sequence[int] = 16,
        score: str = "logit",
        max_windows: int = MAX_WINDOWS,
        **kw: Any,
    ) -> None:
        super().__init__(model, **kw)
        self.window = _check_sizes(self.option("window", window), "window")
        self.stride = _check_sizes(self.option("stride", stride), "stride")
        self.score = self.option("score", score)
        self.max_windows = self.option("max_windows", max_windows)

    def layout(self, sizes: Sequence[int]) -> tuple[tuple[int, ...], list[Tensor]]:
        """The windows (clamped to the input) and each axis' start positions for inputs of
        spatial size ``sizes``.

        Raises:
            ValueError: for a window or stride with another number of axes than the input, or
                more boxes in all than ``max_windows`` (checked before any forward pass).
        """
        windows = _per_axis(self.window, len(sizes), "window")
        strides = _per_axis(self.stride, len(sizes), "stride")
        windows = tuple(min(w, s) for w, s in zip(windows, sizes, strict=True))
        starts = [
            torch.tensor(occlusion_starts(s, w, st))
            for s, w, st in zip(sizes, windows, strides, strict=True)
        ]
        total = math.prod(len(s) for s in starts)
        if total > self.max_windows:
            shape = "×".join(map(str, sizes))
            raise ValueError(
                f"occlusion: window {self.window} and stride {self.stride} on a {shape} input "
                f"give {total} boxes (one forward pass each per input), over max_windows="
                f"{self.max_windows}; use a larger stride or window, or raise max_windows"
            )
        return windows, starts

    def explain_batch(self, inputs: Tensor, target: Target) -> Explanation:
        self.layout(tuple(inputs.shape[2:]))  # refused before the first pass
        return super().explain_batch(inputs, target)

    def attribute(
        self, x: Tensor, base: Tensor, resolved: ResolvedTarget, scores: Tensor
    ) -> tuple[Tensor, dict[str, Any]]:
        sizes = tuple(x.shape[2:])
        windows, starts = self.layout(sizes)
        total = math.prod(len(s) for s in starts)
        n = x.shape[0]
        drops = x.new_zeros(n, *sizes)
        counts = x.new_zeros(sizes)

        def make(start: int, stop: int) -> Tensor:
            return 1.0 - _box_masks(starts, windows, sizes, torch.arange(start, stop)).float()

        def consume(start: int, stop: int, keep: Tensor, got: Tensor, _: Tensor) -> None:
            box = (1.0 - keep).flatten(1)  # (g, S)
            delta = scores.view(1, n) - got  # (g, N)
            drops.view(n, -1).add_(delta.transpose(0, 1) @ box)
            counts.view(-1).add_(box.sum(0))

        self.perturbed_scores(x, base, resolved, total, make, consume)
        raw = torch.where(counts > 0, drops / counts.clamp(min=1), torch.zeros_like(drops))
        return raw.unsqueeze(1), {"windows": torch.full((n,), total, dtype=torch.long)}


# -------------------------------------------------------------------------------------- RISE


def rise_grids(
    count: int, cells: int, dims: int, p: float, seed: int | None
) -> tuple[Tensor, Tensor]:
    """The random part of ``count`` RISE masks, drawn on the CPU: binary grids
    ``(count, cells^dims)`` (each cell 1 with probability ``p``) and shift fractions
    ``(count, dims)`` in [0, 1) (scaled to a cell later)."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    grids = torch.rand(count, cells**dims, generator=gen) < p
    shifts = torch.rand(count, dims, generator=gen)
    return grids, shifts


def rise_masks(grids: Tensor, shifts: Tensor, cells: int, size: Sequence[int]) -> Tensor:
    """RISE masks ``(g, 1, *size)`` from grids ``(g, cells^d)`` and shift fractions ``(g, d)``.

    As Petsiuk et al.'s code: each ``cells^d`` binary grid is upsampled (bi/trilinear,
    ``align_corners=False``) to ``(cells + 1)·c_a`` per axis, ``c_a = ⌈S_a / cells⌉``, and
    cropped to ``S`` at a random offset in ``[0, c_a)`` per axis (batched: one interpolation
    and one gather per axis for the whole chunk).
    """
    dims = len(size)
    g = grids.shape[0]
    cell = [math.ceil(s / cells) for s in size]
    up_size = [(cells + 1) * c for c in cell]
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[dims]
    grid = grids.view(g, 1, *([cells] * dims)).float()
    up = F.interpolate(grid, size=up_size, mode=mode, align_corners=False)
    for axis in range(dims):
        offset = (shifts[:, axis] * cell[axis]).long().clamp(max=cell[axis] - 1)
        idx = offset[:, None] + torch.arange(size[axis])  # (g, S_a)
        shape = [g, 1] + [1] * dims
        shape[2 + axis] = size[axis]
        idx = idx.view(shape).expand(*up.shape[: 2 + axis], size[axis], *up.shape[3 + axis :])
        up = up.gather(2 + axis, idx)
    return up.clamp_(0.0, 1.0)  # interpolation rounding


@register
class RISE(PerturbationMethod):
    """RISE (Petsiuk et al. 2018): the score-weighted mean of random smooth masks.

    ``n`` masks ``M_i`` (:func:`rise_masks`: a binary ``cells^d`` grid, each cell kept with
    probability ``p``, upsampled and shifted at random) give
    ``raw = Σ_i f(b + M_i ⊙ (x − b)) · M_i / (n·p)`` ``(N, 1, *S)``, with ``f`` the softmax
    probability of the target class by default (the paper's; TorchRay applies a sigmoid, for
    multi-label benchmarks). One set of masks per call, shared by every input and every class:
    ``extras["scores"]`` ``(N, n)`` holds ``f`` per mask; a batch that repeats one image for
    several classes runs its masked passes once (:func:`distinct_rows`).

    Args:
        masks: the number of masks ``n`` (one forward pass each per input).
        cells: grid cells per spatial axis.
        p: probability that a cell is kept.
        seed: seed of the masks (``None``: a fresh draw per call).
        internal_batch_size: perturbed inputs per forward pass; ``None`` (default):
            :data:`CPU_CHUNK` on the CPU — the fastest measured, where TorchRay takes 32 —
            and :data:`DEVICE_CHUNK` on other devices.
        baseline / blur_sigma / score / memory_budget: see :class:`PerturbationMethod`.
    """

    name = "rise"
    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option(
            "masks",
            "int",
            4000,
            "random masks (one forward each)",
            low=1,
            cost="work",
            cap=8000,
            passes=True,
        ),
        Option("cells", "int", 7, "grid cells per spatial axis", low=1),
        Option("p", "float", 0.5, "probability a cell is kept", low=0.0, high=1.0, low_open=True),
        Option("seed", "int", 0, "seed of the masks (None: a fresh draw per call)", nullable=True),
        _score_option("probability"),
    )

    def __init__(
        self,
        model: nn.Module,
        *,
        masks: int = 4000,
        cells: int = 7,
        p: float = 0.5,
        seed: int | None = 0,
        score: str = "probability",
        internal_batch_size: int | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(model, internal_batch_size=internal_batch_size, **kw)
        self.masks = self.option("masks", masks)
        self.cells = self.option("cells", cells)
        self.p = self.option("p", p)
        self.seed = self.option("seed", seed)
        self.score = self.option("score", score)

    @property
    def batch_independent(self) -> bool:
        """Seeded masks are the same for an input alone or in a batch; unseeded ones are not."""
        return self.seed is not None

    def attribute(
        self, x: Tensor, base: Tensor, resolved: ResolvedTarget, scores: Tensor
    ) -> tuple[Tensor, dict[str, Any]]:
        n, sizes = x.shape[0], tuple(x.shape[2:])
        grids, shifts = rise_grids(self.masks, self.cells, len(sizes), self.p, self.seed)
        total = x.new_zeros(n, math.prod(sizes))
        per_mask = x.new_zeros(self.masks, n)

        def make(start: int, stop: int) -> Tensor:
            return rise_masks(grids[start:stop], shifts[start:stop], self.cells, sizes)

        def consume(start: int, stop: int, masks: Tensor, got: Tensor, _: Tensor) -> None:
            total.addmm_(got.transpose(0, 1), masks.flatten(1))
            per_mask[start:stop] = got

        self.perturbed_scores(x, base, resolved, self.masks, make, consume)
        raw = (total / (self.masks * self.p)).view(n, 1, *sizes)
        return raw, {"scores": per_mask.transpose(0, 1)}

    def reduce(self, raw: Tensor) -> Tensor:
        return raw
