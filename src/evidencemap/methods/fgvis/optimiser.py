"""FGVis' optimiser: per-sample mask state, SGD-momentum / Adam step, λ schedule, backtracking.

**λ per sample** (``lam="auto"``): inside one batched run, each sample's λ starts where the
sparsity gradient equals the mean ``|∂φ/∂m|`` of its first step, rises by the factor
``1 + lam_rate`` after an iteration whose explanation satisfies the game's criterion and falls
by ``(1 + lam_rate)^−4`` otherwise; after 10 violating steps in a row the sample restarts from
its kept iterate with half its λ and half its step size. The sparsest iterate that satisfied the
criterion is returned with the λ it really had. A number ``lam=λ`` fixes λ (the last iterate).

The update is SGD with momentum on a per-sample normalised gradient,
``v ← μ v + g / max|g|``, ``m ← clamp(m − η v, 0, 1)``: the largest entry moves by ``η`` per step
whatever the model's gradient scale; ``optimizer="adam"`` uses Adam (β = 0.9, 0.999) instead.
An entry pushed past 0 or 1 stops there and loses its momentum.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor

from evidencemap.methods.fgvis.games import criterion


class MaskOptions(Protocol):
    """The options of :class:`~evidencemap.methods.fgvis.method.FGVis` that the optimiser reads
    (a protocol: this module does not import the method)."""

    game: str
    lam: str | float
    lr: float
    momentum: float
    max_iterations: int
    patience: int
    converge_tol: float
    lam_rate: float
    tolerance: float
    delete_to: float
    optimizer: str


__all__ = ["MaskOptions", "MaskState", "take"]

# λ falls this many times faster (in log scale) than it rises: a violated criterion is corrected
# before the mask has moved far past the boundary.
_LAM_DOWN = 4
# Violating steps in a row after which a sample restarts from its kept iterate.
_BACKTRACK = 10


class MaskState:
    """Per-sample optimisation state of one batch: mask, momentum, λ, kept iterate, stopping.

    Args:
        x: a tensor of the mask's shape ``(N, *mask)`` (the inputs ``(N, C, *S)``, or a coarse
            grid ``(N, 1, *grid)``); the L1 term is the mean over its entries.
        method: the :class:`~evidencemap.methods.fgvis.method.FGVis` whose options apply.
        start: the mask to start from (default all ones, ``e = x``).
        lam: the λ ``(N,)`` to start from with ``lam="auto"`` (default: set at the first step
            from the gradient's scale; a NaN entry is set that way too).
        weight: the sparsity cost's weights ``w ≥ 0`` of the mask's shape, summing to 1 per
            sample: ``‖m‖ = Σ w·m`` (default uniform, ``1/numel``: the mean). Entries with
            ``w = 0`` (positions where ``x`` equals the reference) carry no cost.
        floor: ``(N,)`` score a kept iterate must also keep under noise (the ``noisy`` score
            :meth:`step` is given; default 0: no floor).
        relaxed: ``(N,)`` a lower floor (default ``floor``): where no iterate keeps ``floor``,
            the sparsest one that meets the criterion and keeps ``relaxed`` is returned.
        limit: ``(N,)`` steps each sample may take at most (default ``max_iterations``).
    """

    def __init__(
        self,
        x: Tensor,
        method: MaskOptions,
        start: Tensor | None = None,
        lam: Tensor | None = None,
        weight: Tensor | None = None,
        floor: Tensor | None = None,
        limit: Tensor | None = None,
        relaxed: Tensor | None = None,
    ) -> None:
        n = x.shape[0]
        self.method = method
        self.preserve = method.game == "preserve"
        self.auto = method.lam == "auto"
        self.numel = x[0].numel()
        if weight is None:
            weight = torch.full_like(x, 1.0 / self.numel)
        self.weight = weight.detach()
        self.floor = torch.zeros(n, device=x.device) if floor is None else floor
        self.relaxed = self.floor if relaxed is None else torch.minimum(relaxed, self.floor)
        self.mask = torch.ones_like(x) if start is None else start.detach().clone()
        self.velocity = torch.zeros_like(x)
        self.sq = torch.zeros_like(x) if method.optimizer == "adam" else self.velocity
        device = x.device
        self.lam = torch.full((n,), 0.0 if self.auto else float(method.lam), device=device)
        self.lam_ready = torch.zeros(n, dtype=torch.bool, device=device)
        if lam is not None and self.auto:
            lam = lam.detach().to(device=device, dtype=self.lam.dtype)
            self.lam_ready = torch.isfinite(lam)
            self.lam = torch.where(self.lam_ready, lam, 0.0)
        self.best = self.mask.clone()
        self.best_lam = self.lam.clone()
        self.best_value = torch.full((n,), math.inf, device=device)
        self.found = torch.zeros(n, dtype=torch.bool, device=device)
        # The sparsest iterate that keeps only the relaxed floor (returned where none keeps
        # the floor).
        self.spare = self.mask.clone()
        self.spare_lam = self.lam.clone()
        self.spare_value = torch.full((n,), math.inf, device=device)
        # Deletion with lam="auto": until the criterion is met, the iterate with the lowest
        # score so far (returned with satisfied=False if the criterion is never met).
        self.closest = self.mask.clone() if self.auto and not self.preserve else None
        self.closest_score = torch.full((n,), math.inf, device=device)
        self.closest_lam = self.lam.clone()
        self.last_improved = torch.zeros(n, dtype=torch.long, device=device)
        self.limit = (
            torch.full((n,), method.max_iterations, device=device) if limit is None else limit
        )
        self.active = self.limit > 0
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
        m = self.method
        return criterion(m.game, score, image_score, m.tolerance, m.delete_to)

    def _start_lambda(self, idx: Tensor, weight: Tensor, grad_phi: Tensor, lam: Tensor) -> Tensor:
        """λ of the samples ``idx``, set at their first step: where the sparsity gradient λ·w
        equals the mean ``|∂φ/∂m|``, both over the entries that carry a cost."""
        fresh = ~self.lam_ready[idx]
        if not bool(fresh.any()):
            return lam
        costly = (weight > 0).flatten(1)
        count = costly.sum(1).clamp(min=1)
        g_mean = (grad_phi.flatten(1).abs() * costly).sum(1) / count
        w_mean = weight.flatten(1).sum(1) / count
        self.lam_ready[idx] = True
        return torch.where(fresh, g_mean / w_mean.clamp(min=1e-30), lam)

    def step(
        self,
        it: int,
        rows: Tensor | None,
        grad_phi: Tensor,
        p: Tensor,
        phi: Tensor,
        image_score: Tensor,
        noisy: Tensor | None = None,
    ) -> None:
        """One update of the samples ``rows`` given ``±∂φ/∂m`` and their current ``p``, ``φ``.

        ``noisy``: the score under noise that the floor is held to (the localising schedule:
        the minimum of ``p(e + σ ε_j)`` over its fixed draws; else ``p(e + ε)`` of this step's
        gradient pass); an iterate meets the criterion only if also ``noisy ≥ floor``.
        """
        idx = torch.arange(self.mask.shape[0], device=p.device) if rows is None else rows
        method = self.method
        mask = self.mask[idx]
        weight = self.weight[idx]
        mean = (mask * weight).flatten(1).sum(1)
        lam = self.lam[idx]
        if self.auto:
            lam = self._start_lambda(idx, weight, grad_phi, lam)
        sign = 1.0 if self.preserve else -1.0
        # The kept iterate: the sparsest (preserve) / least removed (delete) one that satisfies
        # the criterion; with a fixed λ, the last one (tracked by its loss for stopping).
        loss = sign * phi + sign * lam * mean
        if self.auto:
            ok = self.criterion(p, image_score[idx])
            value = mean if self.preserve else 1 - mean
            if noisy is not None:
                self._keep_spare(idx, ok & (noisy >= self.relaxed[idx]), value, mask, lam)
                ok = ok & (noisy >= self.floor[idx])
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
        shape = (-1, *([1] * (mask.ndim - 1)))
        grad = grad_phi + (sign * lam).view(shape) * weight
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
        done |= (it + 1) >= self.limit[idx]
        self.active[idx] = ~done

    def _keep_spare(
        self, idx: Tensor, ok: Tensor, value: Tensor, mask: Tensor, lam: Tensor
    ) -> None:
        """Keep the iterates of the samples ``idx`` that meet the criterion and the relaxed
        floor (``ok``) where they are sparser than the spare so far."""
        spare = ok & (value < self.spare_value[idx])
        if bool(spare.any()):
            sidx = idx[spare]
            self.spare[sidx] = mask[spare]
            self.spare_lam[sidx] = lam[spare]
            self.spare_value[sidx] = value[spare]

    def info(self) -> dict[str, Tensor]:
        return {
            "loss": self.last_loss,
            "score": self.last_score,
            "lambda": self.lam,
            "mask_mean": (self.mask * self.weight).flatten(1).sum(1),
            "active": self.active,
        }

    def settle(self, rows: Tensor, value: float) -> None:
        """Finish the samples ``rows`` before the first step with the mask ``value`` everywhere,
        kept as satisfying (a game the reference alone already wins)."""
        if rows.numel() == 0:
            return
        self.best[rows] = value
        self.mask[rows] = value
        self.best_value[rows] = value
        self.found[rows] = True
        self.active[rows] = False

    def result_mask(self) -> Tensor:
        if self.auto:
            # A deletion run that never met its criterion returns its lowest-scoring iterate.
            fallback = self.mask if self.closest is None else self.closest
            view = (-1, *([1] * (self.mask.ndim - 1)))
            fallback = torch.where(
                torch.isfinite(self.spare_value).view(view), self.spare, fallback
            )
            return torch.where(self.found.view(view), self.best, fallback)
        return self.mask

    def result_lambda(self) -> Tensor:
        if self.auto:
            fallback = self.lam if self.closest is None else self.closest_lam
            fallback = torch.where(torch.isfinite(self.spare_value), self.spare_lam, fallback)
            return torch.where(self.found, self.best_lam, fallback)
        return self.lam.clone()

    def history(self) -> Tensor:
        """``(N, max_iterations)`` losses; after a sample stopped, its last loss repeated."""
        cols = torch.arange(self.losses.shape[1], device=self.losses.device)
        stopped = cols[None, :] >= self.iterations[:, None]
        last = self.losses.gather(1, (self.iterations - 1).clamp(min=0)[:, None])
        return torch.where(stopped, last, self.losses)


def take(t: Tensor, rows: Tensor | None) -> Tensor:
    """The rows ``rows`` of ``t`` (all of ``t`` when ``None``)."""
    return t if rows is None else t[rows]
