"""FGVis (Wagner et al., CVPR 2019): fine-grained evidence by optimising a per-pixel mask.

A mask ``m ∈ [0, 1]^{N×C×S}`` (one value per pixel *and* per channel, full resolution) mixes
the input ``x`` with a reference ``r`` (zero in the model's normalised input space by default):

    e = m ⊙ x + (1 − m) ⊙ r                    (the explanation, a valid model input)

With ``p(e) = softmax(f(e))_c`` the target's probability and ``‖m‖ = mean(m)`` (the L1 norm
divided by ``C·|S|``, so λ does not depend on the resolution or the channel count):

* preservation game: ``min_m  φ(e) + λ‖m‖``   keep the class with as few pixels as possible;
* deletion game:     ``min_m −φ(e) − λ‖m‖``   remove as few pixels as possible so that it falls;

``φ(e) = −log p(e)`` (``similarity="ce"``, cross-entropy to the target class) or ``−p(e)``
(``similarity="prob"``). The mask starts at 1 (``e = x``) and takes projected gradient steps,
clamped to [0, 1] after every step.

**λ per sample** (``lam="auto"``, the default): inside one batched run, each sample's λ rises by
the factor ``1 + lam_rate`` after an iteration whose explanation satisfies the game's criterion
and falls by it otherwise; the sparsest iterate that satisfied the criterion is returned with the
λ and the score it really had:

* preservation: ``p(e) ≥ (1 − tolerance) · p(x)`` (default tolerance 1 %);
* deletion: ``p(e) ≤ delete_to · p(x)`` (default a tenth of the image's probability).

A number ``lam=λ`` fixes λ instead (the last iterate is returned).

**The defence against adversarial evidence** (``defense=True``): after every elementwise
nonlinearity *call* ``h`` of the model (module or functional; a module reused ``k`` times in one
forward pass gets ``k`` sets of bounds) an identity is inserted whose backward pass lets the
gradient through only where ``min(0, h(x)) ≤ h(e) ≤ max(0, h(x))`` — bounds from one clean,
detached forward pass of ``x``, inclusive comparisons. A nonlinearity whose output *is* the
model's output is not filtered. The forward pass is never altered, so every reported score is the
real model's; only the gradient of ``φ`` through the network is filtered, the sparsity gradient
``±λ / (C·|S|)`` acts on ``m`` directly.

The update is SGD with momentum on a per-sample normalised gradient,
``v ← μ v + g / max|g|``, ``m ← clamp(m − η v, 0, 1)``: the largest entry moves by ``η`` per step
whatever the model's gradient scale, which makes one learning rate work across images and models.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evidencemap.capture import GradientGate, NonlinearityInterceptor
from evidencemap.checks import check_positive_int
from evidencemap.explanation import Explanation
from evidencemap.methods.base import Context, Method, register
from evidencemap.targets import OutputKey, Target, resolve

__all__ = [
    "FGVIS_GAMES",
    "FGVIS_REFERENCES",
    "FGVIS_SIMILARITIES",
    "DefenceRule",
    "FGVis",
    "NonlinearityBounds",
    "gaussian_blur",
    "record_bounds",
]

FGVIS_GAMES = ("preserve", "delete")
FGVIS_SIMILARITIES = ("ce", "prob")
FGVIS_REFERENCES = ("zero", "blur", "mean")

# Nonlinearities whose output is never negative: the lower bound min(0, h(x)) = 0 always holds.
_NON_NEGATIVE = frozenset({"relu", "relu6", "sigmoid", "hardsigmoid", "softplus"})

# λ falls this many times faster (in log scale) than it rises: a violated criterion is corrected
# before the mask has moved far past the boundary.
_LAM_DOWN = 4
# Violating steps in a row after which a sample restarts from its kept iterate.
_BACKTRACK = 10

Progress = Callable[[int, dict[str, Tensor]], None]


@dataclass
class NonlinearityBounds:
    """The bounds of one nonlinearity call, from the clean forward pass of ``x``.

    Attributes:
        name: the nonlinearity (``"relu6"``, ``"gelu"``, …).
        lower: ``min(0, h(x))`` (``None`` for non-negative nonlinearities, where it is 0).
        upper: ``max(0, h(x))``; both ``(N, *h.shape[1:])``, detached.
    """

    name: str
    lower: Tensor | None
    upper: Tensor

    def select(self, rows: Tensor | None) -> NonlinearityBounds:
        """The bounds of the samples ``rows`` (all when ``None``)."""
        if rows is None:
            return self
        lower = None if self.lower is None else self.lower[rows]
        return NonlinearityBounds(self.name, lower, self.upper[rows])

    def rule(self, h: Tensor, grad: Tensor) -> Tensor:
        """``grad · 1[lower ≤ h ≤ upper]`` (the FGVis backward rule, inclusive).

        The indicator is written as a float tensor that then takes the product in place: one
        fresh activation-sized tensor instead of a boolean one plus the product, which halves
        the rule's time on a CPU (where fresh large tensors cost page faults) and avoids the
        slow mixed bool × float product.
        """
        factor = torch.le(h, self.upper, out=torch.empty_like(grad))
        if self.lower is not None:
            factor.mul_(torch.ge(h, self.lower, out=torch.empty_like(grad)))
        return factor.mul_(grad)


def record_bounds(
    forward: Callable[[Tensor], Tensor], x: Tensor
) -> tuple[Tensor, list[NonlinearityBounds | None]]:
    """One clean forward pass of ``x`` recording the bounds of every nonlinearity call.

    Returns ``(output, bounds)`` with one entry per call in execution order; the entry is
    ``None`` for a call whose output is the model's output itself (never filtered).
    """
    seen: list[tuple[str, Tensor]] = []

    def observe(_index: int, name: str, h: Tensor) -> Tensor:
        seen.append((name, h))
        return h

    with torch.no_grad(), NonlinearityInterceptor(observe):
        output = forward(x)
    bounds: list[NonlinearityBounds | None] = []
    for name, h in seen:
        if h is output:
            bounds.append(None)
            continue
        h = h.detach()
        lower = None if name in _NON_NEGATIVE else h.clamp(max=0)
        bounds.append(NonlinearityBounds(name, lower, h.clamp(min=0)))
    return output, bounds


class DefenceRule:
    """The interceptor rule of the optimisation passes: gate every call with its bounds.

    ``with NonlinearityInterceptor(DefenceRule(bounds)): model(e)`` runs the unchanged forward
    pass; call ``k``'s output ``h`` passes through :class:`~evidencemap.capture.GradientGate`
    with ``bounds[k].rule``, so its gradient is ``γ · 1[min(0, h(x)) ≤ h(e) ≤ max(0, h(x))]``.

    Raises:
        RuntimeError: when the pass makes other nonlinearity calls than the clean pass did.
    """

    def __init__(self, bounds: list[NonlinearityBounds | None]) -> None:
        self.bounds = bounds

    def __call__(self, index: int, name: str, h: Tensor) -> Tensor:
        if index >= len(self.bounds):
            raise RuntimeError(
                f"the model made more nonlinearity calls ({index + 1}) than in the clean forward "
                f"pass ({len(self.bounds)}); FGVis' defence needs the same calls for x and e"
            )
        bound = self.bounds[index]
        if bound is None:
            return h
        if bound.name != name or bound.upper.shape != h.shape:
            raise RuntimeError(
                f"nonlinearity call {index} is {name}{tuple(h.shape)} but was "
                f"{bound.name}{tuple(bound.upper.shape)} in the clean forward pass; FGVis' "
                "defence needs the same calls for x and e"
            )
        return GradientGate.apply(h, bound.rule)


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``(N, C, *S)`` over every spatial axis (reflect padding).

    The kernel has radius ``ceil(3σ)`` (clipped so the padding fits the axis) and sums to 1.
    """
    if sigma <= 0:
        return x.clone()
    out = x
    n, c = x.shape[:2]
    spatial = x.shape[2:]
    for axis in range(2, x.ndim):
        size = x.shape[axis]
        radius = min(math.ceil(3 * sigma), size - 1)
        if radius < 1:
            continue
        t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        kernel = torch.exp(-0.5 * (t / sigma) ** 2)
        kernel = (kernel / kernel.sum()).view(1, 1, -1)
        moved = out.movedim(axis, -1)
        shape = moved.shape
        line = moved.reshape(-1, 1, size)
        line = F.conv1d(F.pad(line, (radius, radius), mode="reflect"), kernel)
        out = line.reshape(shape).movedim(-1, axis)
    return out.reshape(n, c, *spatial)


@register
class FGVis(Method):
    """FGVis: the per-pixel, per-channel mask of the preservation or deletion game.

    See the module docstring for the formulas. Shapes: inputs ``(N, C, *S)``; ``maps`` and
    ``raw`` ``(N, 1, *S)``: both the channel mean of the relevant mask (``m``, or ``1 − m`` for
    the deletion game), **not** min-max normalised — the mask already is in [0, 1] and its values
    mean something (the fraction of each pixel kept or removed); every mask and image in
    ``extras`` ``(N, C, *S)``.

    Args:
        model: a classifier whose (selected) output is ``(N, classes)`` logits.
        game: ``"preserve"`` (the map is ``m``) or ``"delete"`` (the map is ``1 − m``).
        defense: filter the gradient at every nonlinearity call (the paper's defence).
        reference: what removed pixels become: ``"zero"`` (0 in normalised input space, the
            paper's choice), ``"blur"`` (a Gaussian-blurred copy, σ = ``blur_sigma`` pixels),
            ``"mean"`` (each sample's per-channel mean), a number, or a tensor broadcastable to
            the inputs (``(C, *S)``, ``(1 | N, C, *S)``, ``(C, 1, …)``).
        similarity: ``"ce"`` (``φ = −log p``) or ``"prob"`` (``φ = −p``).
        lam: ``"auto"`` (per-sample λ found during the run, see the module docstring) or a fixed
            λ ≥ 0 for the mean-normalised L1 term.
        tolerance: preservation criterion ``p(e) ≥ (1 − tolerance)·p(x)``, in [0, 1).
        delete_to: deletion criterion ``p(e) ≤ delete_to · p(x)``, in (0, 1).
        lr: step size η (the largest mask entry's move per step).
        momentum: SGD momentum μ.
        max_iterations: at most this many steps.
        patience: a sample stops after this many steps without improving its result by more
            than ``converge_tol`` (the mean mask of the kept iterate with ``lam="auto"``, the
            loss with a fixed λ); the run stops when every sample has.
        converge_tol: see ``patience``.
        lam_rate: λ's multiplicative step with ``lam="auto"``.
        noise: standard deviation of Gaussian noise added to ``e`` in the gradient's forward
            pass at every step (0: none); the criterion is then checked on the noise-free ``e``
            (one more forward pass per step).
        seed: seed of that noise (the run is deterministic without noise anyway).
        progress: ``True`` for a tqdm bar, or ``progress(iteration, info)`` called after each step
            with ``info`` = ``{"loss", "score", "lambda", "mask_mean", "active"}`` ``(N,)`` tensors.
        blur_sigma: σ in pixels of ``reference="blur"``.
        output_key / eval_mode / batch_size: see :class:`~evidencemap.methods.base.Method`.

    Returns (from the call) an :class:`~evidencemap.explanation.Explanation` with ``scores`` =
    the target's softmax probability on the inputs and ``extras``:

    * ``mask`` ``m``, ``explanation`` ``e``, ``deleted`` ``x ⊙ (1 − m) + r ⊙ m`` (``(N, C, *S)``);
    * ``score`` ``p(e)`` and ``top1`` on ``e`` from the unmodified model (no interceptor);
    * ``image_score`` ``p(x)``; ``lambda`` the λ of the returned iterate; ``satisfied`` whether
      it meets the game's criterion (``lam="auto"``; with a fixed λ whether it does anyway);
    * ``iterations`` steps run per sample; ``loss_history`` ``(N, max_iterations)`` (entries
      after a sample stopped repeat its last loss); ``mask_mean`` the mean of ``m``.

    Raises:
        TypeError / ValueError: for bad options (at construction) or a target that is not a
            class, a model output that is not ``(N, classes)``, a reference of the wrong shape.
    """

    name: ClassVar[str] = "fgvis"
    aliases: ClassVar[tuple[str, ...]] = ("fg-vis",)
    uses_layer: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        *,
        game: str = "preserve",
        defense: bool = True,
        reference: str | float | Tensor = "zero",
        similarity: str = "ce",
        lam: str | float = "auto",
        tolerance: float = 0.01,
        delete_to: float = 0.1,
        lr: float = 0.05,
        momentum: float = 0.9,
        max_iterations: int = 300,
        patience: int = 40,
        converge_tol: float = 1e-3,
        lam_rate: float = 0.05,
        noise: float = 0.0,
        seed: int = 0,
        progress: bool | Progress | None = None,
        blur_sigma: float = 10.0,
        optimizer: str = "sgd",
        output_key: OutputKey = None,
        eval_mode: bool = True,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(model, output_key=output_key, eval_mode=eval_mode, batch_size=batch_size)
        if game not in FGVIS_GAMES:
            raise ValueError(f"game must be one of {FGVIS_GAMES}, got {game!r}")
        if similarity not in FGVIS_SIMILARITIES:
            raise ValueError(f"similarity must be one of {FGVIS_SIMILARITIES}, got {similarity!r}")
        if isinstance(reference, str) and reference not in FGVIS_REFERENCES:
            raise ValueError(
                f"reference must be one of {FGVIS_REFERENCES}, a number or a tensor, got {reference!r}"
            )
        if not isinstance(reference, (str, Tensor)) and (
            isinstance(reference, bool) or not isinstance(reference, (int, float))
        ):
            raise TypeError(
                f"reference must be a string, a number or a tensor, got {type(reference).__name__}"
            )
        if isinstance(lam, str):
            if lam != "auto":
                raise ValueError(f"lam must be 'auto' or a number >= 0, got {lam!r}")
        else:
            lam = _number(lam, "lam")
            if not lam >= 0 or not math.isfinite(lam):
                raise ValueError(f"lam must be 'auto' or a finite number >= 0, got {lam}")
        self.game = game
        self.defense = bool(defense)
        self.reference = reference
        self.similarity = similarity
        self.lam = lam
        self.tolerance = _in_range(tolerance, "tolerance", 0.0, 1.0, closed_low=True)
        self.delete_to = _in_range(delete_to, "delete_to", 0.0, 1.0)
        self.lr = _positive(lr, "lr")
        self.momentum = _in_range(momentum, "momentum", 0.0, 1.0, closed_low=True)
        self.max_iterations = check_positive_int(max_iterations, "max_iterations")
        self.patience = check_positive_int(patience, "patience")
        self.converge_tol = _in_range(converge_tol, "converge_tol", 0.0, 1.0, closed_low=True)
        self.lam_rate = _positive(lam_rate, "lam_rate")
        self.noise = _in_range(noise, "noise", 0.0, math.inf, closed_low=True)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.seed = seed
        if progress is not None and not isinstance(progress, bool) and not callable(progress):
            raise TypeError(f"progress must be a bool or a callable, got {type(progress).__name__}")
        self.progress = progress
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        self.optimizer = optimizer
        self.blur_sigma = _in_range(blur_sigma, "blur_sigma", 0.0, math.inf)

    def options(self) -> dict[str, Any]:
        reference = "tensor" if isinstance(self.reference, Tensor) else self.reference
        return {
            **super().options(),
            "game": self.game,
            "defense": self.defense,
            "reference": reference,
            "similarity": self.similarity,
            "lam": self.lam,
            "tolerance": self.tolerance,
            "delete_to": self.delete_to,
            "lr": self.lr,
            "momentum": self.momentum,
            "max_iterations": self.max_iterations,
            "patience": self.patience,
            "converge_tol": self.converge_tol,
            "lam_rate": self.lam_rate,
            "noise": self.noise,
            "seed": self.seed,
            "blur_sigma": self.blur_sigma,
        }

    # -- pieces ---------------------------------------------------------------------------------
    def reference_for(self, x: Tensor) -> Tensor:
        """The reference ``r`` for inputs ``x`` ``(N, C, *S)``, broadcast to ``x``'s shape."""
        ref = self.reference
        if isinstance(ref, str):
            if ref == "zero":
                return torch.zeros_like(x)
            if ref == "blur":
                return gaussian_blur(x, self.blur_sigma)
            return x.flatten(2).mean(2).view(*x.shape[:2], *([1] * (x.ndim - 2))).expand_as(x)
        if isinstance(ref, Tensor):
            if not ref.is_floating_point() and ref.dtype != torch.bool:
                ref = ref.float()
            ref = ref.to(device=x.device, dtype=x.dtype)
            if ref.ndim == x.ndim - 1:
                ref = ref.unsqueeze(0)
            try:
                out = torch.broadcast_to(ref, x.shape)
            except RuntimeError:
                raise ValueError(
                    f"reference of shape {tuple(self.reference.shape)} does not broadcast to the "
                    f"inputs {tuple(x.shape)}; give (C, *S), (1 or N, C, *S) or a broadcastable shape"
                ) from None
            if not bool(torch.isfinite(out).all()):
                raise ValueError("reference contains NaN or infinite values")
            return out.detach()
        return torch.full_like(x, float(ref))

    def _phi(self, logits: Tensor, classes: Tensor) -> tuple[Tensor, Tensor]:
        """``(φ, p)``: the similarity term and the target probability, both ``(n,)``."""
        if logits.ndim != 2:
            raise ValueError(
                f"FGVis needs a classifier output of shape (N, classes), got {tuple(logits.shape)}"
            )
        logp = logits.log_softmax(dim=1).gather(1, classes[:, None]).squeeze(1)
        p = logp.exp()
        return (-logp if self.similarity == "ce" else -p), p

    # -- the run ----------------------------------------------------------------------------------
    def explain_batch(self, inputs: Tensor, target: Target) -> Explanation:
        # One memory layout for the clean pass and every optimisation pass: convolution kernels
        # for different layouts round differently, and at e = x the bounds hold with equality.
        x = inputs.contiguous()
        ref = self.reference_for(x)
        with torch.no_grad():
            if self.defense:
                output, bounds = record_bounds(self.forward, x)
            else:
                output, bounds = self.forward(x), []
        if output.ndim != 2:
            raise ValueError(
                f"FGVis needs a classifier output of shape (N, classes), got {tuple(output.shape)}"
            )
        resolved = resolve(target, output)
        if resolved.classes is None:
            raise ValueError(
                "FGVis explains a class: target must be None, an int, class indices or a "
                "ClassLogit/ClassProbability target, not an arbitrary score function"
            )
        classes = resolved.classes
        image_score = output.softmax(dim=1).gather(1, classes[:, None]).squeeze(1)
        state = _State(x, self)
        preserve = self.game == "preserve"
        sign = 1.0 if preserve else -1.0
        generator = None
        if self.noise > 0:
            generator = torch.Generator(device=x.device).manual_seed(self.seed)
        gated: dict[int, list[NonlinearityBounds | None]] = {}
        bar = _bar(self.progress, self.max_iterations)
        try:
            for it in range(self.max_iterations):
                rows = state.active_rows()
                if rows is not None and rows.numel() == 0:
                    break
                key = -1 if rows is None else rows.numel()
                if self.defense and key not in gated:
                    gated.clear()
                    gated[key] = [None if b is None else b.select(rows) for b in bounds]
                xa, ra, ca = _take(x, rows), _take(ref, rows), _take(classes, rows)
                m = _take(state.mask, rows).detach().requires_grad_(True)
                e = m * xa + (1 - m) * ra
                if generator is not None:
                    e = e + self.noise * torch.randn(
                        e.shape, generator=generator, device=e.device, dtype=e.dtype
                    )
                with torch.enable_grad():
                    if self.defense:
                        with NonlinearityInterceptor(DefenceRule(gated[key])):
                            logits = self.forward(e)
                    else:
                        logits = self.forward(e)
                    phi, p = self._phi(logits, ca)
                    (grad,) = torch.autograd.grad(phi.sum(), m)
                if generator is not None:
                    # The criterion and the kept iterate are judged on the explanation that is
                    # returned, without noise (the unmodified model; the forward pass is the
                    # same with or without the defence's gates).
                    with torch.no_grad():
                        clean = m.detach() * xa + (1 - m.detach()) * ra
                        p = self._phi(self.forward(clean), ca)[1]
                state.step(it, rows, grad.detach() * sign, p.detach(), phi.detach(), image_score)
                if bar is not None:
                    bar(it, state.info())
        finally:
            if bar is not None:
                bar(-1, {})
        mask = state.result_mask()
        e = mask * x + (1 - mask) * ref
        deleted = (1 - mask) * x + mask * ref
        with torch.no_grad():  # the unmodified model: no interceptor, no hooks
            out_e = self.forward(e)
        score = out_e.softmax(dim=1).gather(1, classes[:, None]).squeeze(1)
        relevant = mask if preserve else 1 - mask
        raw = relevant.mean(dim=1, keepdim=True)
        satisfied = state.criterion(score, image_score)
        extras = {
            "mask": mask.detach(),
            "explanation": e.detach(),
            "deleted": deleted.detach(),
            "score": score.detach(),
            "top1": out_e.argmax(dim=1),
            "image_score": image_score.detach(),
            "lambda": state.result_lambda(),
            "satisfied": satisfied,
            "iterations": state.iterations.clone(),
            "loss_history": state.history(),
            "mask_mean": mask.flatten(1).mean(1),
        }
        context = Context(self.model, x, output.detach(), resolved, None, self.forward)
        return self.finish(raw, raw, context, image_score, extras=extras, normalise=False)


class _State:
    """Per-sample optimisation state of one batch: mask, momentum, λ, kept iterate, stopping."""

    def __init__(self, x: Tensor, method: FGVis) -> None:
        n = x.shape[0]
        self.method = method
        self.preserve = method.game == "preserve"
        self.auto = method.lam == "auto"
        self.numel = x[0].numel()
        self.mask = torch.ones_like(x)
        self.velocity = torch.zeros_like(x)
        self.sq = torch.zeros_like(x) if method.optimizer == "adam" else self.velocity
        device = x.device
        self.lam = torch.full((n,), 0.0 if self.auto else float(method.lam), device=device)
        self.lam_ready = torch.zeros(n, dtype=torch.bool, device=device)
        self.best = self.mask.clone()
        self.best_lam = self.lam.clone()
        self.best_value = torch.full((n,), math.inf, device=device)
        self.found = torch.zeros(n, dtype=torch.bool, device=device)
        # Deletion with lam="auto": until the criterion is met, the iterate with the lowest
        # score so far (returned with satisfied=False if the criterion is never met).
        self.closest = self.mask.clone() if self.auto and not self.preserve else None
        self.closest_score = torch.full((n,), math.inf, device=device)
        self.closest_lam = self.lam.clone()
        self.last_improved = torch.zeros(n, dtype=torch.long, device=device)
        self.active = torch.ones(n, dtype=torch.bool, device=device)
        self.misses = torch.zeros(n, dtype=torch.long, device=device)
        self.step_size = torch.full((n,), method.lr, device=device)
        self.iterations = torch.zeros(n, dtype=torch.long, device=device)
        self.losses = torch.zeros(n, method.max_iterations, device=device)
        self.last_loss = torch.zeros(n, device=device)
        self.last_score = torch.zeros(n, device=device)

    def active_rows(self) -> Tensor | None:
        """Indices of the samples still optimised; ``None`` when all are."""
        if bool(self.active.all()):
            return None
        return self.active.nonzero().squeeze(1)

    def criterion(self, score: Tensor, image_score: Tensor) -> Tensor:
        """Whether ``score`` satisfies the game's criterion relative to ``image_score``."""
        if self.preserve:
            return score >= (1 - self.method.tolerance) * image_score
        return score <= self.method.delete_to * image_score

    def step(
        self,
        it: int,
        rows: Tensor | None,
        grad_phi: Tensor,
        p: Tensor,
        phi: Tensor,
        image_score: Tensor,
    ) -> None:
        """One update of the samples ``rows`` given ``±∂φ/∂m`` and their current ``p``, ``φ``."""
        idx = torch.arange(self.mask.shape[0], device=p.device) if rows is None else rows
        method = self.method
        mask = self.mask[idx]
        mean = mask.flatten(1).mean(1)
        lam = self.lam[idx]
        if self.auto:
            # λ starts where the sparsity gradient equals the mean |∂φ/∂m| of the first step.
            fresh = ~self.lam_ready[idx]
            if bool(fresh.any()):
                start = grad_phi.flatten(1).abs().mean(1) * self.numel
                lam = torch.where(fresh, start, lam)
                self.lam_ready[idx] = True
        sign = 1.0 if self.preserve else -1.0
        # The kept iterate: the sparsest (preserve) / least removed (delete) one that satisfies
        # the criterion; with a fixed λ, the last one (tracked by its loss for stopping).
        loss = sign * phi + sign * lam * mean
        if self.auto:
            ok = self.criterion(p, image_score[idx])
            value = mean if self.preserve else 1 - mean
            better = ok & (value < self.best_value[idx] - method.converge_tol)
            keep = ok & (value < self.best_value[idx])
        else:
            ok = self.criterion(p, image_score[idx])
            value = loss
            better = value < self.best_value[idx] - method.converge_tol * value.abs().clamp(min=1)
            keep = torch.ones_like(ok)
        if self.closest is not None:
            lower = p < self.closest_score[idx]
            if bool(lower.any()):
                lidx = idx[lower]
                self.closest[lidx] = mask[lower]
                self.closest_score[lidx] = p[lower]
                self.closest_lam[lidx] = lam[lower]
        if bool(keep.any()):
            kidx = idx[keep]
            self.best[kidx] = mask[keep]
            self.best_lam[kidx] = lam[keep]
            self.best_value[kidx] = torch.minimum(value[keep], self.best_value[kidx])
            self.found[kidx] = True
        self.last_improved[idx[better]] = it
        # The step: normalised gradient of φ (defended) plus the sparsity gradient.
        grad = grad_phi + (sign * lam / self.numel).view(-1, *([1] * (mask.ndim - 1)))
        shape = (-1, *([1] * (mask.ndim - 1)))
        if method.optimizer == "adam":
            t = (self.iterations[idx] + 1).to(grad.dtype).view(shape)
            velocity = 0.9 * self.velocity[idx] + 0.1 * grad
            sq = 0.999 * self.sq[idx] + 0.001 * grad * grad
            self.sq[idx] = sq
            direction = (velocity / (1 - 0.9**t)) / ((sq / (1 - 0.999**t)).sqrt() + 1e-12)
        else:
            scale = grad.flatten(1).abs().amax(1).clamp(min=1e-30)
            grad = grad / scale.view(shape)
            velocity = method.momentum * self.velocity[idx] + grad
            direction = velocity
        moved = mask - self.step_size[idx].view(shape) * direction
        # Projection: an entry pushed past 0 or 1 stops there and loses its momentum.
        velocity = velocity.masked_fill((moved < 0) | (moved > 1), 0)
        moved.clamp_(0, 1)
        if self.auto:
            factor = torch.where(ok, 1 + method.lam_rate, (1 + method.lam_rate) ** -_LAM_DOWN)
            lam = lam * factor
            # Backtracking: after _BACKTRACK violating steps in a row, restart from the kept
            # iterate with half its λ and half the step size (the defended gradient is not the
            # real model's gradient, so a step that is too long may not be undone by it).
            misses = torch.where(ok, 0, self.misses[idx] + 1)
            back = (misses >= _BACKTRACK) & self.found[idx]
            if bool(back.any()):
                self.step_size[idx[back]] /= 2
                moved = torch.where(back.view(shape), self.best[idx], moved)
                velocity = velocity.masked_fill(back.view(shape), 0)
                lam = torch.where(back, self.best_lam[idx] / 2, lam)
                misses = misses.masked_fill(back, 0)
            self.misses[idx] = misses
        self.velocity[idx] = velocity
        self.mask[idx] = moved
        self.lam[idx] = lam
        self.iterations[idx] = it + 1
        self.losses[idx, it] = loss
        self.last_loss[idx] = loss
        self.last_score[idx] = p
        done = (it + 1 - self.last_improved[idx]) >= method.patience
        if self.auto:
            done &= self.found[idx]
        self.active[idx] = ~done

    def info(self) -> dict[str, Tensor]:
        return {
            "loss": self.last_loss,
            "score": self.last_score,
            "lambda": self.lam,
            "mask_mean": self.mask.flatten(1).mean(1),
            "active": self.active,
        }

    def result_mask(self) -> Tensor:
        if self.auto:
            # A deletion run that never met its criterion returns its lowest-scoring iterate.
            fallback = self.mask if self.closest is None else self.closest
            return torch.where(
                self.found.view(-1, *([1] * (self.mask.ndim - 1))), self.best, fallback
            )
        return self.mask

    def result_lambda(self) -> Tensor:
        if self.auto:
            fallback = self.lam if self.closest is None else self.closest_lam
            return torch.where(self.found, self.best_lam, fallback)
        return self.lam.clone()

    def history(self) -> Tensor:
        """``(N, max_iterations)`` losses; after a sample stopped, its last loss repeated."""
        cols = torch.arange(self.losses.shape[1], device=self.losses.device)
        stopped = cols[None, :] >= self.iterations[:, None]
        last = self.losses.gather(1, (self.iterations - 1).clamp(min=0)[:, None])
        return torch.where(stopped, last, self.losses)


def _take(t: Tensor, rows: Tensor | None) -> Tensor:
    return t if rows is None else t[rows]


def _bar(
    progress: bool | Progress | None, total: int
) -> Callable[[int, dict[str, Tensor]], None] | None:
    """A progress callback: the user's, a tqdm bar (``True``), or ``None``."""
    if progress is None or progress is False:
        return None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="fgvis", unit="it")

        def update(it: int, info: dict[str, Tensor]) -> None:
            if it < 0:
                bar.close()
                return
            bar.update(1)
            bar.set_postfix(
                active=int(info["active"].sum()), mask=f"{float(info['mask_mean'].mean()):.3f}"
            )

        return update
    user = progress

    def call(it: int, info: dict[str, Tensor]) -> None:
        if it >= 0:
            user(it, info)

    return call


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def _positive(value: Any, name: str) -> float:
    value = _number(value, name)
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def _in_range(value: Any, name: str, low: float, high: float, *, closed_low: bool = False) -> float:
    value = _number(value, name)
    ok = (value >= low if closed_low else value > low) and value < high
    if not ok:
        left = "[" if closed_low else "("
        raise ValueError(f"{name} must be in {left}{low}, {high}), got {value}")
    return value
