"""Score-CAM (Wang et al. 2020): channel weights from the model's score on masked inputs.

For each channel ``k`` of the layer, ``H_k = minmax(Up(A_k))`` masks the input and the weight is
the target's score on ``x ⊙ H_k``; ``L = ReLU(Σ_k w_k A_k)`` (upsampling is linear, so this
equals the official ``Σ_k w_k Up(A_k)``). Weightings:

* ``"softmax_prob"`` (default, the authors' code): ``w_k = softmax(f(x ⊙ H_k))_c``.
* ``"channel_softmax"`` (pytorch-grad-cam): ``w = softmax_k(y_c(x ⊙ H_k))`` over channels.
* ``"delta_softmax"`` (TorchCAM): ``w = softmax_k(y_c(x ⊙ H_k) − y_c(x))``.

Constant channels get weight 0 and cost no forward pass. All masked forwards run batched under
``torch.inference_mode`` in chunks of at most ``internal_batch_size`` inputs (or fewer when one
chunk of masked inputs would exceed ``memory_budget`` bytes or the run's budget, see
:mod:`evidencemap.runtime`). ``top_k`` keeps only
the ``k`` channels of highest activation variance per sample (a faster approximation).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from evidencemap import runtime
from evidencemap.maps import FLAT_EPS, normalize, upsample
from evidencemap.methods.base import Context, LayerMethod, weighted_sum
from evidencemap.methods.options import MEMORY_BUDGET, Option, batch_option, top_k_option
from evidencemap.methods.registry import register

__all__ = ["CPU_CHUNK", "DEVICE_CHUNK", "MEMORY_BUDGET", "SCORECAM_WEIGHTINGS", "ScoreCAM"]

SCORECAM_WEIGHTINGS = ("softmax_prob", "channel_softmax", "delta_softmax")

CPU_CHUNK = 8
"""Masked inputs per forward pass on the CPU when ``internal_batch_size`` is ``None``: the
fastest of 8 / 16 / 32 / 64 on Lite0 at batch 1 and 8 in CPU time (2.0 / 3.3 / 4.9 / 5.9 s for
64 channels at batch 1; pytorch-grad-cam's chunks of 16: 3.2 s), where large chunks spill the
activations of the memory-bound layers (batch norm, ReLU6, padding) out of the caches
(``benchmarks/cam_variants_speed.py``)."""

DEVICE_CHUNK = 64
"""Masked inputs per forward pass on other devices (a GPU is faster with large batches)."""


@register
class ScoreCAM(LayerMethod):
    """Score-CAM: channel weights from the target's score on inputs masked by each channel.

    See the module docstring for the formula and the weightings.

    Args:
        weighting: one of :data:`SCORECAM_WEIGHTINGS`.
        internal_batch_size: masked inputs per forward pass; ``None`` (default):
            :data:`CPU_CHUNK` on the CPU (measured fastest), :data:`DEVICE_CHUNK` elsewhere.
        memory_budget: bytes one chunk of masked inputs may take (``None``: no limit).
        top_k: use only the ``top_k`` channels of highest activation variance per sample.
    """

    name = "scorecam"
    aliases = ("score-cam",)
    needs_gradients = False
    pass_kind: ClassVar[str] = "forward"
    sizes_own_chunks: ClassVar[bool] = True
    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option("weighting", "str", "softmax_prob", "channel weights", choices=SCORECAM_WEIGHTINGS),
        batch_option(
            None,
            f"masked inputs per forward pass (None: {CPU_CHUNK} on the CPU, measured fastest; "
            f"{DEVICE_CHUNK} on other devices)",
        ),
        MEMORY_BUDGET,
        top_k_option("use only the k channels of highest activation variance (one forward each)"),
    )

    def __init__(
        self,
        model: nn.Module,
        layer: Any = None,
        *,
        weighting: str = "softmax_prob",
        internal_batch_size: int | None = None,
        memory_budget: int | None = None,
        top_k: int | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(model, layer, **kw)
        self.weighting = self.option("weighting", weighting)
        self.internal_batch_size = self.option("internal_batch_size", internal_batch_size)
        self.memory_budget = self.option("memory_budget", memory_budget)
        self.top_k = self.option("top_k", top_k)

    def _score(self, output: Tensor, context: Context, n: int) -> Tensor:
        """Target scores of a chunk output ``(g·N, …)`` → ``(g, N)``."""
        groups = output.shape[0] // n
        classes = context.target.classes
        if classes is not None:
            values = output.softmax(1) if self.weighting == "softmax_prob" else output
            values = values.reshape(groups, n, *values.shape[1:])
            idx = classes.view(1, n, *([1] * (values.ndim - 2))).expand(
                groups, n, 1, *values.shape[3:]
            )
            picked = values.gather(2, idx).squeeze(2)
            return picked.flatten(2).sum(2) if picked.ndim > 2 else picked
        chunks = output.reshape(groups, n, *output.shape[1:])
        return torch.stack([context.target.score(c) for c in chunks])

    def channel_weights(self, acts: Tensor, grads: Tensor | None, context: Context) -> Tensor:
        x = context.inputs
        n, k = acts.shape[:2]
        flat = acts.flatten(2)
        valid = (flat.amax(2) - flat.amin(2)) > FLAT_EPS  # (N, K)
        key = flat.var(2).where(valid, torch.full_like(valid, float("-inf"), dtype=flat.dtype))
        slots = int(valid.sum(1).max())
        if self.top_k is not None:
            slots = min(slots, self.top_k)
        weights = acts.new_zeros(n, k)
        if slots == 0:
            return weights
        order = key.argsort(dim=1, descending=True)[:, :slots]  # (N, S) channel of each slot
        slot_valid = valid.gather(1, order)
        # one slot = N masked inputs (one per sample); a chunk holds whole slots
        # (at least: the masks and the masked inputs; measured on the first slot under a budget)
        per_slot = 2 * x.numel() * x.element_size()
        chunk = self.internal_batch_size
        if chunk is None:
            chunk = CPU_CHUNK if x.device.type == "cpu" else DEVICE_CHUNK
        requested = max(1, chunk // n)
        scores: list[Tensor] = []

        def step(start: int, stop: int) -> None:
            runtime.checkpoint(start, slots, "scorecam")
            idx = order[:, start:stop]  # (N, g)
            g = idx.shape[1]
            chans = acts.gather(
                1, idx.view(n, g, *([1] * (acts.ndim - 2))).expand(n, g, *acts.shape[2:])
            )
            masks = normalize(
                upsample(chans.transpose(0, 1).reshape(g * n, 1, *acts.shape[2:]), x.shape[2:])
            )
            masked = x.unsqueeze(0) * masks.view(g, n, 1, *x.shape[2:])
            out = context.forward(masked.reshape(g * n, *x.shape[1:]))
            scores.append(self._score(out, context, n))

        with torch.inference_mode():
            runtime.run_chunked(
                slots, per_slot, requested, step, "masked input batches", self.memory_budget
            )
            slot_scores = torch.cat(scores).transpose(0, 1).clone()  # (N, S)
            if self.weighting == "delta_softmax":
                slot_scores = slot_scores - self._score(context.output, context, n).view(n, 1)
            if self.weighting != "softmax_prob":
                slot_scores = slot_scores.masked_fill(~slot_valid, float("-inf")).softmax(1)
                slot_scores = slot_scores.nan_to_num(0.0)
            slot_scores = slot_scores.masked_fill(~slot_valid, 0.0)
        return weights.scatter(1, order, slot_scores.to(weights.dtype))

    def layer_map(self, acts: Tensor, grads: Tensor | None, context: Context) -> Tensor:
        return weighted_sum(acts, self.channel_weights(acts, grads, context))
