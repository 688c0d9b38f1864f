"""The FGVis method: options, the reference, the run loop and the diagnostics of each result.

See :mod:`evidencemap.methods.fgvis` for the formulas; the pieces live in
:mod:`~evidencemap.methods.fgvis.defence` (bounds and gate), :mod:`~.games` (φ, criteria),
:mod:`~.optimiser` (mask state, step, λ schedule), :mod:`~.reference` and
:mod:`~.diagnostics`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evidencemap import runtime
from evidencemap.capture import NonlinearityInterceptor, eval_mode
from evidencemap.checks import check_model
from evidencemap.explanation import Explanation
from evidencemap.methods.base import Context, Method
from evidencemap.methods.fgvis.defence import DefenceRule, NonlinearityBounds, record_bounds
from evidencemap.methods.fgvis.diagnostics import (
    CHECK_NOISE,
    DEGENERATE_SPREAD,
    JUDGE_DRAWS,
    JUDGE_GROUP,
    REASON_FLOWS,
    REASON_GENERATION,
    REASON_REQUESTED,
    REASON_STARVED,
    REASON_TRIVIAL,
    REASON_UNDEFENDED,
    STARVED_SHARE,
    defence_check,
    describe,
    map_spread,
    noise_check,
    transfer_check,
)
from evidencemap.methods.fgvis.games import (
    FGVIS_GAMES,
    FGVIS_SIMILARITIES,
    NOISE_FLOOR,
    criterion,
    phi,
)
from evidencemap.methods.fgvis.optimiser import MaskState, take
from evidencemap.methods.fgvis.reference import FGVIS_REFERENCES, reference_for
from evidencemap.methods.options import Option, warn_renamed
from evidencemap.methods.registry import installed_transfer_models, register
from evidencemap.targets import OutputKey, Target, resolve

__all__ = ["FGVIS_MASK_CHANNELS", "FGVIS_SCHEDULES", "FGVis", "Plan", "Progress"]

FGVIS_SCHEDULES = ("auto", "fine", "coarse")
FGVIS_MASK_CHANNELS = ("auto", "shared", "separate")

Progress = Callable[[int, dict[str, Tensor]], None]


@dataclass
class Plan:
    """What a batch's run decided before its first step (all ``(N,)`` unless said otherwise).

    Attributes:
        reference_score: ``p(r)``, the target's probability on the reference alone.
        trivial: preservation: ``p(r) ≥ (1 − tolerance)·p(x)`` (nothing to preserve, no
            optimisation); deletion: ``p(r) > delete_to·p(x)`` (removing everything does not
            delete the class).
        generation: a preservation run whose target is not the top class on ``x``, or with
            ``lam=0``: the generation game (no flat-map check).
        share / outside: ``defence_pass_share`` / ``units_out_of_bounds`` (``None`` undefended).
        coarse: the samples that run the localising coarse-to-fine schedule.
        reason: why each sample runs its schedule (``REASON_*`` of the diagnostics).
        shared: one mask value per pixel for all channels (bool, for the batch).
        free: ``(N, C, *S)`` positions whose mask can change ``e`` (``x ≠ r``; with a shared
            mask, pixels where any channel differs).
    """

    reference_score: Tensor
    trivial: Tensor
    generation: Tensor
    share: Tensor | None
    outside: Tensor | None
    coarse: Tensor
    reason: Tensor
    shared: bool
    free: Tensor


@register
class FGVis(Method):
    """FGVis: the per-pixel, per-channel mask of the preservation or deletion game.

    See :mod:`evidencemap.methods.fgvis` for the formulas. Shapes: inputs ``(N, C, *S)``; ``maps``
    and ``raw`` ``(N, 1, *S)``: both the channel mean of the relevant mask (``m``, or ``1 − m`` for
    the deletion game), **not** min-max normalised — the mask already is in [0, 1] and its values
    mean something (the fraction of each pixel kept or removed); every mask and image in
    ``extras`` ``(N, C, *S)``.

    Args:
        model: a classifier whose (selected) output is ``(N, classes)`` logits.
        game: ``"preserve"`` (the map is ``m``) or ``"delete"`` (the map is ``1 − m``).
        defence: filter the gradient at every nonlinearity call (the paper's defence).
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
        optimizer: ``"sgd"`` (normalised SGD with momentum) or ``"adam"``.
        schedule: ``"auto"`` (per sample: ``"fine"`` where the defence passes at least
            ``STARVED_SHARE`` of the gradient at 0.1 % dimming, in the generation game and
            without the defence; ``"coarse"`` where it starves), ``"fine"`` (the paper: one
            full-resolution mask) or ``"coarse"`` (the localising schedule, see
            :mod:`evidencemap.methods.fgvis`): ``max_iterations`` shared by a single-channel
            mask on a ``coarse_size``-cells-per-axis grid, bilinearly upsampled and optimised
            *without* the gate (the low resolution is the guard), then the full-resolution
            mask refined from it with ``defence`` as set; in the preservation game a kept
            iterate of either stage must also keep ``NOISE_FLOOR·p(x)`` on each of
            ``JUDGE_DRAWS`` fixed draws of noise on ``e`` (σ = ``noise``, or 0.1 when
            ``noise=0``). The preservation game's gradient passes see noise only when
            ``noise > 0``; the deletion and generation games (which the floor does not
            guard) are trained against it.
        mask_channels: ``"separate"`` (one mask value per pixel and channel, the paper),
            ``"shared"`` (one per pixel) or ``"auto"`` (shared when every input's channels are
            equal, e.g. greyscale exports).
        coarse_size: cells per spatial axis of the coarse stage (≥ 1).
        transfer: models for the coarse schedule's cross-model check: ``"installed"`` (the
            built-in EfficientNet-Lite1/Lite2 whose weights are installed), ``"none"``, or a
            sequence of modules taking the same inputs.
        output_key / eval_mode / batch_size: see :class:`~evidencemap.methods.base.Method`.
        defense: the former spelling of ``defence``, still accepted with a
            ``DeprecationWarning``.

    Returns (from the call) an :class:`~evidencemap.explanation.Explanation` with ``scores`` =
    the target's softmax probability on the inputs and ``extras``:

    * ``mask`` ``m``, ``explanation`` ``e``, ``deleted`` ``x ⊙ (1 − m) + r ⊙ m`` (``(N, C, *S)``);
    * ``score`` ``p(e)`` and ``top1`` on ``e`` from the unmodified model (no interceptor);
    * ``image_score`` ``p(x)``; ``reference_score`` ``p(r)``; ``lambda`` the λ of the returned
      iterate; ``satisfied`` whether it meets the game's criterion (``lam="auto"``; with a
      fixed λ whether it does anyway);
    * ``iterations`` steps run per sample; ``loss_history`` ``(N, max_iterations)`` (entries
      after a sample stopped repeat its last loss; with the localising schedule the coarse
      stage, then the refinement); ``mask_mean`` the mean of ``m`` over the
      positions that can change ``e`` (``x ≠ r``; elsewhere ``m`` is 0 in the preservation game,
      1 in the deletion game), ``free_fraction`` their share, ``shared_mask``;
    * diagnostics (:mod:`~evidencemap.methods.fgvis.diagnostics`), ``(N,)``:
      ``defence_pass_share`` and ``units_out_of_bounds`` (defended runs), ``likely_adversarial``
      (undefended runs), ``map_spread``, ``degenerate``, ``trivial``, ``generation``,
      ``coarse``, ``noise_ratio`` ``p(e + ε)/p(x)`` (mean of 8 draws ``ε ~ N(0, 0.1²)``, fixed
      seed); ``schedule`` / ``schedule_reason`` / ``notes`` (lists of strings per sample: the
      schedule that ran, why, and that plus any problem — what :meth:`Explanation.warning`
      returns); and ``warning``, a string: ``""`` when no sample has a problem, else the
      messages also issued as :class:`FGVisWarning` (:class:`FGVisDegenerateWarning` for a flat
      map);
    * with ``schedule="coarse"``: ``transfer_ratio`` ``(N, K)`` ``p_k(e)/p_k(x)`` of each
      transfer model (``K = 0`` when none), ``transfer_models`` their names.

    Raises:
        TypeError / ValueError: for bad options (at construction) or a target that is not a
            class, a model output that is not ``(N, classes)``, a reference of the wrong shape.
    """

    name: ClassVar[str] = "fgvis"
    aliases: ClassVar[tuple[str, ...]] = ("fg-vis",)
    uses_layer: ClassVar[bool] = False
    pass_kind: ClassVar[str] = "input"
    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option(
            "game", "str", "preserve", "the preservation or the deletion game", choices=FGVIS_GAMES
        ),
        Option(
            "defence",
            "bool",
            True,
            "gate the gradient at every nonlinearity (the paper's defence)",
            renamed_from=("defense",),
        ),
        Option(
            "reference",
            "any",
            "zero",
            "what removed pixels become",
            choices=FGVIS_REFERENCES,
            other="a number or a tensor broadcastable to the inputs",
        ),
        Option(
            "similarity",
            "str",
            "ce",
            "φ = −log p ('ce') or −p ('prob')",
            choices=FGVIS_SIMILARITIES,
        ),
        Option(
            "lam",
            "any",
            "auto",
            "sparsity weight λ: 'auto' (per sample) or a fixed number",
            other="'auto' or a number >= 0",
        ),
        Option(
            "tolerance",
            "float",
            0.01,
            "preservation criterion p(e) >= (1 − tolerance)·p(x)",
            low=0.0,
            high=1.0,
            high_open=True,
        ),
        Option(
            "delete_to",
            "float",
            0.1,
            "deletion criterion p(e) <= delete_to·p(x)",
            low=0.0,
            high=1.0,
            low_open=True,
            high_open=True,
        ),
        Option(
            "lr",
            "float",
            0.05,
            "step of the largest mask entry per iteration",
            low=0.0,
            low_open=True,
        ),
        Option("momentum", "float", 0.9, "SGD momentum", low=0.0, high=1.0, high_open=True),
        Option(
            "max_iterations",
            "int",
            300,
            "at most this many optimisation steps",
            low=1,
            cost="work",
            cap=500,
            passes=True,
            at_most=True,
        ),
        Option(
            "patience",
            "int",
            40,
            "steps without improvement after which a sample stops",
            low=1,
            cost="work",
            cap=500,
        ),
        Option(
            "converge_tol",
            "float",
            1e-3,
            "improvement that counts for patience",
            low=0.0,
            high=1.0,
            high_open=True,
        ),
        Option(
            "lam_rate",
            "float",
            0.05,
            "λ's multiplicative step with lam='auto'",
            low=0.0,
            low_open=True,
        ),
        Option("noise", "float", 0.0, "σ of Gaussian noise on e in each gradient pass", low=0.0),
        Option("seed", "int", 0, "seed of that noise"),
        Option(
            "progress",
            "any",
            None,
            "a tqdm bar (True) or progress(iteration, info)",
            nullable=True,
            other="true, false or a callable",
            reported=False,
        ),
        Option(
            "blur_sigma", "float", 10.0, "σ in pixels of reference='blur'", low=0.0, low_open=True
        ),
        Option(
            "optimizer",
            "str",
            "sgd",
            "normalised SGD with momentum, or Adam",
            choices=("sgd", "adam"),
        ),
        Option(
            "schedule",
            "str",
            "auto",
            "'auto' (the paper's rule where the defence passes the gradient, else coarse), "
            "'fine' (always the paper's rule) or 'coarse' (coarse mask first, then refined)",
            choices=FGVIS_SCHEDULES,
        ),
        Option(
            "mask_channels",
            "str",
            "auto",
            "one mask value per pixel and channel ('separate'), one per pixel ('shared'), or "
            "'auto' (shared for inputs whose channels are equal)",
            choices=FGVIS_MASK_CHANNELS,
        ),
        Option(
            "coarse_size", "int", 7, "cells per axis of the coarse schedule's first stage", low=1
        ),
        Option(
            "transfer",
            "any",
            "installed",
            "models of the coarse schedule's cross-model check",
            choices=("installed", "none"),
            other="a sequence of modules",
        ),
    )

    def __init__(
        self,
        model: nn.Module,
        *,
        game: str = "preserve",
        defence: bool = True,
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
        schedule: str = "auto",
        mask_channels: str = "auto",
        coarse_size: int = 7,
        transfer: str | Sequence[nn.Module] = "installed",
        output_key: OutputKey = None,
        eval_mode: bool = True,
        batch_size: int | None = None,
        defense: bool | None = None,
    ) -> None:
        super().__init__(model, output_key=output_key, eval_mode=eval_mode, batch_size=batch_size)
        check = self._check
        if defense is not None:
            warn_renamed("defense", "defence", "method 'fgvis'")
            defence = defense
        game = check("game", game)
        similarity = check("similarity", similarity)
        reference = check("reference", reference)
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
            if isinstance(lam, bool) or not isinstance(lam, (int, float)):
                raise TypeError(f"lam must be a number, got {type(lam).__name__}")
            lam = float(lam)
            if not lam >= 0 or not math.isfinite(lam):
                raise ValueError(f"lam must be 'auto' or a finite number >= 0, got {lam}")
        self.game = game
        self.defence = check("defence", defence)
        self.reference = reference
        self.similarity = similarity
        self.lam = lam
        self.tolerance = check("tolerance", tolerance)
        self.delete_to = check("delete_to", delete_to)
        self.lr = check("lr", lr)
        self.momentum = check("momentum", momentum)
        self.max_iterations = check("max_iterations", max_iterations)
        self.patience = check("patience", patience)
        self.converge_tol = check("converge_tol", converge_tol)
        self.lam_rate = check("lam_rate", lam_rate)
        self.noise = check("noise", noise)
        self.seed = check("seed", seed)
        if progress is not None and not isinstance(progress, bool) and not callable(progress):
            raise TypeError(f"progress must be a bool or a callable, got {type(progress).__name__}")
        self.progress = progress
        self.optimizer = check("optimizer", optimizer)
        self.blur_sigma = check("blur_sigma", blur_sigma)
        self.schedule = check("schedule", schedule)
        self.mask_channels = check("mask_channels", mask_channels)
        self.coarse_size = check("coarse_size", coarse_size)
        transfer = check("transfer", transfer)
        if not isinstance(transfer, str):
            try:
                if not isinstance(transfer, Sequence):
                    raise TypeError(type(transfer).__name__)
                transfer = [check_model(t) for t in transfer]  # loaded models: their modules
            except TypeError:
                raise TypeError(
                    f"transfer must be 'installed', 'none' or a sequence of modules, got "
                    f"{type(transfer).__name__}"
                ) from None
        self.transfer = transfer
        self._transfer_models: list[tuple[str, nn.Module]] | None = None

    @property
    def defense(self) -> bool:
        """The former spelling of :attr:`defence` (``DeprecationWarning``)."""
        warn_renamed("defense", "defence", "method 'fgvis'", stacklevel=2)
        return self.defence

    @classmethod
    def _check(cls, name: str, value: Any) -> Any:
        """``value`` validated by the ``OPTIONS`` entry ``name`` (the one description)."""
        for option in cls.OPTIONS:
            if option.name == name:
                return option.check(value)
        raise KeyError(name)

    def options(self) -> dict[str, Any]:
        reference = "tensor" if isinstance(self.reference, Tensor) else self.reference
        transfer = self.transfer if isinstance(self.transfer, str) else "modules"
        return {
            **super().options(),
            "game": self.game,
            "defence": self.defence,
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
            "optimizer": self.optimizer,
            "schedule": self.schedule,
            "mask_channels": self.mask_channels,
            "coarse_size": self.coarse_size,
            "transfer": transfer,
        }

    @property
    def batch_independent(self) -> bool:
        """Every noise draw on ``e`` (``noise > 0``, the localising schedule's judged draws and
        the noise check's) is one draw shared by the whole batch, so an input's result does not
        depend on the rest of its batch, and a memory budget may split it."""
        return True

    # -- pieces ---------------------------------------------------------------------------------
    def reference_for(self, x: Tensor) -> Tensor:
        """The reference ``r`` for inputs ``x`` ``(N, C, *S)``, broadcast to ``x``'s shape."""
        return reference_for(self.reference, x, self.blur_sigma)

    def _phi(self, logits: Tensor, classes: Tensor) -> tuple[Tensor, Tensor]:
        """``(φ, p)``: the similarity term and the target probability, both ``(n,)``."""
        return phi(logits, classes, self.similarity)

    def transfer_models(self) -> list[tuple[str, nn.Module]]:
        """``(name, model)`` of the cross-model check (loaded once, built-ins on the CPU)."""
        if self._transfer_models is None:
            found: list[tuple[str, nn.Module]]
            if isinstance(self.transfer, str):  # "installed" or "none"
                found = installed_transfer_models() if self.transfer == "installed" else []
            else:
                found = [(type(m).__name__, m) for m in self.transfer]
            self._transfer_models = found
        return self._transfer_models

    # -- the run ----------------------------------------------------------------------------------
    def __call__(self, inputs: Tensor, target: Target = None) -> Explanation:
        exp = super().__call__(inputs, target)
        # Built here, after the chunks of a batch are joined, from the per-sample flags.
        extras = exp.extras
        report = describe(self.game, extras, self.tolerance, self.delete_to)
        extras["schedule"] = report.schedules
        extras["schedule_reason"] = report.reasons
        extras["notes"] = report.notes
        extras["warning"] = report.warning
        for text, category in report.warnings:
            warnings.warn(text, category, stacklevel=2)
        return exp

    def explain_batch(self, inputs: Tensor, target: Target) -> Explanation:
        # One memory layout for the clean pass and every optimisation pass: convolution kernels
        # for different layouts round differently, and at e = x the bounds hold with equality.
        x = inputs.contiguous()
        ref = self.reference_for(x)
        with torch.no_grad():
            if self.defence:
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
        plan = self._plan(x, ref, output, classes, image_score, bounds)
        state, iterations, history = self._optimise_stages(
            x, ref, classes, image_score, bounds, plan
        )
        extras = self._result(x, ref, classes, image_score, state, plan)
        extras["iterations"] = iterations
        extras["loss_history"] = history
        raw = extras.pop("_raw")
        context = Context(self.model, x, output.detach(), resolved, None, self.forward)
        return self.finish(raw, raw, context, image_score, extras=extras, normalise=False)

    def _plan(
        self,
        x: Tensor,
        ref: Tensor,
        output: Tensor,
        classes: Tensor,
        image_score: Tensor,
        bounds: list[NonlinearityBounds | None],
    ) -> Plan:
        """Everything decided before the first step: the reference's own score, the trivial
        and generation games, the defence's pass share, the schedule per sample, the mask's
        channels and the positions where ``x`` equals the reference."""
        with torch.no_grad():
            ref_score = self._phi(self.forward(ref), classes)[1]
        preserve = self.game == "preserve"
        if preserve:
            trivial = ref_score >= (1 - self.tolerance) * image_score
        else:
            trivial = ref_score > self.delete_to * image_score
        generation = torch.zeros_like(trivial)
        if preserve:
            generation = classes != output.argmax(dim=1)
            if self.lam == 0:
                generation[:] = True
            # Raising a class is a game even where the reference already scores it higher.
            trivial = trivial & ~generation
        share = outside = None
        if self.defence:
            share, outside = defence_check(self.forward, x, ref, classes, bounds, self.similarity)
        n = x.shape[0]
        reason = torch.full((n,), REASON_REQUESTED, dtype=torch.long, device=x.device)
        if self.schedule == "auto":
            if share is None:
                reason[:] = REASON_UNDEFENDED
            else:
                starved = share < STARVED_SHARE
                reason = torch.where(starved, REASON_STARVED, REASON_FLOWS)
                reason = torch.where(starved & generation, REASON_GENERATION, reason)
            coarse = reason == REASON_STARVED
        else:
            coarse = torch.full((n,), self.schedule == "coarse", device=x.device)
        if preserve:
            # Nothing to optimise: the reference alone keeps the class.
            coarse = coarse & ~trivial
            reason = torch.where(trivial, REASON_TRIVIAL, reason)
        shared = self.mask_channels == "shared" or (
            self.mask_channels == "auto" and x.shape[1] > 1 and bool((x == x[:, :1]).all())
        )
        free = x != ref
        if shared:
            free = free.any(dim=1, keepdim=True).expand_as(x)
        return Plan(ref_score, trivial, generation, share, outside, coarse, reason, shared, free)

    def _optimise_stages(
        self,
        x: Tensor,
        ref: Tensor,
        classes: Tensor,
        image_score: Tensor,
        bounds: list[NonlinearityBounds | None],
        plan: Plan,
    ) -> tuple[MaskState, Tensor, Tensor]:
        """Both stages: the coarse one for the samples ``plan.coarse``, then the full-resolution
        one for all. Returns the final state, the steps per sample and the loss history."""
        n, channels = x.shape[0], x.shape[1]
        rows_c = plan.coarse.nonzero().squeeze(1)
        two = rows_c.numel() > 0
        # The localising schedule shares max_iterations between its stages.
        k1 = (self.max_iterations + 1) // 2 if two else 0
        k2 = self.max_iterations - k1
        steps = self.max_iterations if not bool(plan.coarse.all()) else k2
        total = k1 + steps
        bar = _bar(self.progress, total)
        weight_full = plan.free.to(x.dtype)
        weight_full = weight_full / weight_full.flatten(1).sum(1).clamp(min=1).view(
            -1, *([1] * (x.ndim - 1))
        )
        fine_expand = None
        if plan.shared:

            def fine_expand(theta: Tensor) -> Tensor:
                return theta.expand(-1, channels, *theta.shape[2:])

        mask_channels = 1 if plan.shared else channels
        sigma = torch.full((n,), self.noise, device=x.device)
        judge = sigma.clone()
        start = x.new_ones(n, mask_channels, *x.shape[2:])
        lam = torch.full((n,), math.nan, device=x.device)
        # The floor NOISE_FLOOR·p(x) on the fixed draws (where the image itself keeps less on
        # one of them, _optimise relaxes it to what the image keeps).
        floor = torch.zeros(n, device=x.device)
        if two and self.game == "preserve":
            floor[rows_c] = NOISE_FLOOR * image_score[rows_c]
        # Trained against the noise it is judged on: the deletion and generation games, which
        # the floor does not guard.
        trained = plan.generation | (self.game == "delete")
        iterations = torch.zeros(n, dtype=torch.long, device=x.device)
        try:
            if two:
                c_state, up = self._coarse_stage(
                    x[rows_c], ref[rows_c], classes[rows_c], image_score[rows_c],
                    weight_full[rows_c], (floor[rows_c], trained[rows_c]), k1,
                    total, bar,
                )  # fmt: skip
                result = up(c_state.result_mask()).clamp(0, 1)
                start[rows_c] = result.expand(-1, mask_channels, *x.shape[2:])
                lam[rows_c] = c_state.result_lambda()
                iterations[rows_c] += c_state.iterations
                judge[rows_c] = max(self.noise, CHECK_NOISE)
                sigma[rows_c] = torch.where(trained[rows_c], judge[rows_c], sigma[rows_c])
            weight = _adjoint(fine_expand, start, weight_full)
            limit = torch.where(plan.coarse, k2, self.max_iterations)
            state = MaskState(
                start, self, start=start, lam=lam, weight=weight, floor=floor, limit=limit,
            )  # fmt: skip
            if self.game == "preserve":
                state.settle(plan.trivial.nonzero().squeeze(1), 0.0)
            noise = None
            if bool((sigma > 0).any()):
                noise = (torch.Generator(device=x.device).manual_seed(self.seed), sigma)
            self._optimise(
                x, ref, classes, image_score, state, bounds, fine_expand, (k1, steps, total),
                noise, bar, judge if two else None,
            )  # fmt: skip
            iterations += state.iterations
        finally:
            if bar is not None:
                bar(-1, {})
        history = state.history()
        if two:
            history[rows_c] = torch.cat([c_state.history()[:, :k1], history[rows_c, :k2]], 1)
        return state, iterations, history

    def _result(
        self,
        x: Tensor,
        ref: Tensor,
        classes: Tensor,
        image_score: Tensor,
        state: MaskState,
        plan: Plan,
    ) -> dict[str, Any]:
        """The returned masks, images, scores and diagnostics (``"_raw"``: the map)."""
        preserve = self.game == "preserve"
        mask = state.result_mask().expand_as(x)
        # Positions where x equals the reference cannot change e: m = 0 there (preservation),
        # 1 (deletion), so the map is 0 there either way.
        mask = torch.where(plan.free, mask, 0.0 if preserve else 1.0).detach()
        e = mask * x + (1 - mask) * ref
        deleted = (1 - mask) * x + mask * ref
        with torch.no_grad():  # the unmodified model: no interceptor, no hooks
            out_e = self.forward(e)
        score = out_e.softmax(dim=1).gather(1, classes[:, None]).squeeze(1)
        relevant = mask if preserve else 1 - mask
        raw = relevant.mean(dim=1, keepdim=True)
        free_pixels = plan.free.any(dim=1, keepdim=True)
        count = plan.free.flatten(1).sum(1)
        mask_mean = torch.where(
            count > 0, (mask * plan.free).flatten(1).sum(1) / count.clamp(min=1), 0.0
        )
        spread = map_spread(raw, free_pixels)
        noise_ratio = noise_check(self.forward, e, classes, image_score)
        extras: dict[str, Any] = {
            "_raw": raw,
            "mask": mask,
            "explanation": e.detach(),
            "deleted": deleted.detach(),
            "score": score.detach(),
            "top1": out_e.argmax(dim=1),
            "image_score": image_score.detach(),
            "reference_score": plan.reference_score.detach(),
            "lambda": state.result_lambda(),
            "satisfied": state.criterion(score, image_score),
            "mask_mean": mask_mean,
            "free_fraction": count / plan.free[0].numel(),
            "shared_mask": torch.full_like(plan.trivial, plan.shared),
            "map_spread": spread,
            "degenerate": (spread < DEGENERATE_SPREAD) & ~plan.generation & ~plan.trivial,
            "trivial": plan.trivial,
            "generation": plan.generation,
            "noise_ratio": noise_ratio,
            "coarse": plan.coarse,
            "schedule_code": plan.reason,
        }
        if plan.share is not None:
            extras["defence_pass_share"] = plan.share
            extras["units_out_of_bounds"] = plan.outside
        else:
            broken = noise_ratio < NOISE_FLOOR if preserve else noise_ratio >= NOISE_FLOOR
            extras["likely_adversarial"] = broken & ~plan.trivial
        if self.schedule == "coarse" or (
            not isinstance(self.transfer, str) and bool(plan.coarse.any())
        ):
            shown = e if preserve else deleted
            others = self.transfer_models()
            with ExitStack() as stack:
                for _, other in others:
                    stack.enter_context(eval_mode(other, True))
                extras["transfer_ratio"] = transfer_check(
                    [m.to(x.device) for _, m in others], x, shown.detach(), classes
                )
            extras["transfer_models"] = [name for name, _ in others]
        return extras

    def _coarse_stage(
        self,
        x: Tensor,
        ref: Tensor,
        classes: Tensor,
        image_score: Tensor,
        weight_full: Tensor,
        floors: tuple[Tensor, Tensor],
        steps: int,
        total: int,
        bar: Progress | None,
    ) -> tuple[MaskState, Callable[[Tensor], Tensor]]:
        """The coarse schedule's first stage: a ``(n, 1, *grid)`` mask ``θ``, ``m = up(θ)``
        (bilinear / trilinear, expanded over the channels), no gate. ``floors`` =
        ``(floor, trained)`` ``(n,)``: in the preservation game a kept iterate must keep
        ``floor`` (``NOISE_FLOOR · p(x)``) on each of the ``JUDGE_DRAWS`` fixed draws of noise on
        ``e`` (σ = ``noise``, or ``CHECK_NOISE``; relaxed where the image itself keeps less, see
        :meth:`_optimise`). The
        gradient passes add that noise to ``e`` for the ``trained`` samples (the deletion and
        generation games), ``noise`` (0 by default) for the others.

        Returns the finished state and ``up`` (to ``(n, 1, *S)``).
        """
        grid = (self.coarse_size,) * (x.ndim - 2)
        size = x.shape[2:]
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[x.ndim - 2]

        def up(theta: Tensor) -> Tensor:
            return F.interpolate(theta, size=size, mode=mode, align_corners=False)

        def expand(theta: Tensor) -> Tensor:
            return up(theta).expand(-1, x.shape[1], *size)

        theta = x.new_ones(x.shape[0], 1, *grid)
        weight = _adjoint(expand, theta, weight_full)
        floor, trained = floors
        state = MaskState(theta, self, weight=weight, floor=floor)
        # Judged against noise (σ = `noise`, or CHECK_NOISE when 0): a mask that keeps the
        # class only at a few per cent of contrast is brittle. In the preservation game the
        # gradient passes see noise only when `noise` is set: training against it keeps
        # contrast everywhere (the mask stays flat wherever dimming costs the class little),
        # while the floor on fixed draws only rejects brittle iterates. The deletion and
        # generation games, which the floor does not guard, are trained against it.
        judge = torch.full((x.shape[0],), self.noise if self.noise > 0 else CHECK_NOISE)
        judge = judge.to(x.device)
        sigma = torch.where(trained, judge, self.noise)
        noise = None
        if bool((sigma > 0).any()):
            noise = (torch.Generator(device=x.device).manual_seed(self.seed), sigma)
        self._optimise(
            x, ref, classes, image_score, state, [], expand, (0, steps, total), noise, bar, judge
        )
        return state, up

    def _optimise(
        self,
        x: Tensor,
        ref: Tensor,
        classes: Tensor,
        image_score: Tensor,
        state: MaskState,
        bounds: list[NonlinearityBounds | None],
        expand: Callable[[Tensor], Tensor] | None,
        count: tuple[int, int, int],
        noise: tuple[torch.Generator, Tensor] | None,
        bar: Progress | None,
        judge: Tensor | None = None,
    ) -> None:
        """Run ``state``'s steps: the mask ``m = expand(θ)`` (``θ`` itself when ``None``), the
        gate on every nonlinearity call when ``bounds`` is not empty, ``noise`` = ``(generator,
        σ per sample)`` added to ``e`` in the gradient passes (the criterion then judged
        without it); ``judge`` ``(N,)``: σ of the ``JUDGE_DRAWS`` fixed draws on which the
        samples with a floor are held to it (default: ``noise``'s σ; without either, the
        noisy score of the gradient pass is held to the floor); ``count`` =
        ``(offset, steps, total)``: this stage's first step number in the whole run, its
        number of steps and the run's."""
        offset, steps, total = count
        preserve = self.game == "preserve"
        sign = 1.0 if preserve else -1.0
        defended = bool(bounds)
        gated: dict[int, list[NonlinearityBounds | None]] = {}
        draws = None
        if judge is None and noise is not None:
            judge = noise[1]
        if judge is not None and bool((state.floor > 0).any()):
            # The floor is judged on JUDGE_DRAWS fixed draws (the same at every step), not on
            # the one draw of the gradient pass: a lucky draw would let a brittle mask through.
            # One set of draws shared by every sample (expanded, not copied): an input's result
            # does not depend on the rest of its batch.
            generator = torch.Generator(device=x.device).manual_seed(self.seed + 1)
            shape = (1, JUDGE_DRAWS, *x.shape[1:])
            draws = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
            draws = draws.expand(x.shape[0], *shape[1:])
            self._relax_floor(x, classes, image_score, state, draws, judge)
        for it in range(steps):
            rows = state.active_rows()
            if rows is not None and rows.numel() == 0:
                break
            key = -1 if rows is None else rows.numel()
            if defended and key not in gated:
                gated.clear()
                gated[key] = [None if b is None else b.select(rows) for b in bounds]
            xa, ra, ca = take(x, rows), take(ref, rows), take(classes, rows)
            theta = take(state.mask, rows).detach().requires_grad_(True)
            with torch.enable_grad():
                m = theta if expand is None else expand(theta)
                e = m * xa + (1 - m) * ra
                if noise is not None:
                    generator, sigma = noise
                    # one draw per step, shared by the batch (see the judged draws above)
                    draw = torch.randn(
                        e.shape[1:], generator=generator, device=e.device, dtype=e.dtype
                    )
                    e = e + take(sigma, rows).view(-1, *([1] * (e.ndim - 1))) * draw
                if defended:
                    with NonlinearityInterceptor(DefenceRule(gated[key])):
                        logits = self.forward(e)
                else:
                    logits = self.forward(e)
                phi_e, p = self._phi(logits, ca)
                (grad,) = torch.autograd.grad(phi_e.sum(), theta)
            p_noisy = p.detach()
            noisy = None
            if noise is not None or draws is not None:
                # The criterion and the kept iterate are judged on the explanation that is
                # returned, without noise (the unmodified model; the forward pass is the
                # same with or without the defence's gates, so a noise-free gradient pass
                # already gave its score); the floor on the fixed draws.
                md = m.detach()
                clean = md * xa + (1 - md) * ra
                judged = None if draws is None else take(draws, rows)
                judge_sigma = None if judge is None else take(judge, rows)
                p, noisy = self._judge(
                    clean, ca, judged, judge_sigma, take(image_score, rows), take(state.floor, rows),
                    None if noise is not None else p.detach(), take(state.relaxed, rows),
                )  # fmt: skip
                if noisy is None:
                    noisy = p_noisy
            state.step(
                it, rows, grad.detach() * sign, p.detach(), phi_e.detach(), image_score, noisy
            )
            if bar is not None:
                bar(offset + it, state.info())
            runtime.checkpoint(offset + it + 1, total, "fgvis")

    def _relax_floor(
        self,
        x: Tensor,
        classes: Tensor,
        image_score: Tensor,
        state: MaskState,
        draws: Tensor,
        sigma: Tensor,
    ) -> None:
        """Where the image itself keeps less than the floor on one of the fixed ``draws``
        ``(N, J, C, *S)``, hold the iterates to what the image keeps there:
        ``relaxed = min(floor, min_j p(x + σ ε_j))``, judged like every iterate (so the first
        iterate, ``e = x``, always keeps it and a kept iterate exists). The state returns the
        sparsest iterate that keeps ``relaxed`` where none keeps the floor itself."""
        rows = (state.floor > 0).nonzero().squeeze(1)
        relaxed = state.floor.clone()
        if rows.numel() > 0:
            floor = state.floor[rows]
            _, own = self._judge(
                x[rows], classes[rows], draws[rows], sigma[rows], image_score[rows], floor,
                known=image_score[rows], stop=torch.full_like(floor, -math.inf),
            )  # fmt: skip
            if own is not None:
                relaxed[rows] = torch.minimum(floor, own.to(floor.dtype))
        state.relaxed = relaxed

    def _judge(
        self,
        clean: Tensor,
        classes: Tensor,
        draws: Tensor | None,
        sigma: Tensor | None,
        image_score: Tensor,
        floor: Tensor,
        known: Tensor | None = None,
        stop: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``(p(e), min_j p(e + σ ε_j))`` ``(n,)`` of the noise-free explanations ``clean``
        ``(n, C, *S)`` and their fixed draws ``ε_j`` ``(n, J, C, *S)``, without gradients;
        ``known``: ``p(e)`` when a noise-free pass already computed it (not recomputed).

        The draws are scored only for the samples whose ``p(e)`` meets the criterion and whose
        ``floor > 0``: for the others the floor cannot change the outcome (their noisy score is
        reported as ``+inf``). They are scored ``JUDGE_GROUP`` draws per sample at a time (one
        batched pass per group), and a sample whose minimum so far is below ``stop`` ``(n,)``
        (the lowest score the caller compares it with; default ``floor``) is not scored
        further: its minimum over all draws is below ``stop`` too, so every comparison with a
        threshold of at least ``stop`` comes out the same (the reported value is then the
        minimum over the draws scored). ``(p(e), None)`` when ``draws`` is ``None``.
        """
        with torch.no_grad():
            p = self._phi(self.forward(clean), classes)[1] if known is None else known
            if draws is None or sigma is None:
                return p, None
            stop = floor if stop is None else stop
            noisy = torch.full_like(p, math.inf)
            judged = criterion(self.game, p, image_score, self.tolerance, self.delete_to)
            alive = (judged & (floor > 0)).nonzero().squeeze(1)
            view = (-1, 1, *([1] * (clean.ndim - 1)))
            for first in range(0, draws.shape[1], JUDGE_GROUP):
                if alive.numel() == 0:
                    break
                group = draws[alive, first : first + JUDGE_GROUP]
                k = group.shape[1]
                batch = clean[alive, None] + sigma[alive].view(view).to(clean.dtype) * group
                q = self._phi(
                    self.forward(batch.flatten(0, 1)), classes[alive].repeat_interleave(k)
                )[1]
                noisy[alive] = torch.minimum(noisy[alive], q.view(-1, k).amin(dim=1))
                alive = alive[noisy[alive] >= stop[alive]]
            return p, noisy


def _adjoint(
    expand: Callable[[Tensor], Tensor] | None, theta: Tensor, weight_full: Tensor
) -> Tensor:
    """The sparsity weights of the optimised tensor ``θ``: ``∂(Σ w·expand(θ))/∂θ``, so that
    ``Σ w_θ·θ = Σ w·m`` — the mean of the full mask over the positions that carry a cost."""
    if expand is None:
        return weight_full
    probe = torch.zeros_like(theta, requires_grad=True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad((expand(probe) * weight_full).sum(), probe)
    return grad.detach()


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
