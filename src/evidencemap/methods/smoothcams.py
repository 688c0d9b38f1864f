"""SS-CAM and IS-CAM: Score-CAM with several masked inputs per channel (TorchCAM's definitions).

Notation: ``A ∈ R^{N×K×s}`` the layer's activations, ``x ∈ R^{N×C×S}`` the inputs,
``M_k = minmax(Up(A_k)) ∈ [0, 1]^{N×1×S}`` channel ``k``'s mask at input resolution (as in
Score-CAM), ``y_c(·)`` the target's score before any softmax and ``T`` the number of samples.
Both weight the channels by a softmax over channels of a mean score change,

``w_k = softmax_k( (1/T) Σ_{t=1..T} [ y_c(x̃_{k,t}) − y_c(x) ] )``, ``L = ReLU(Σ_k w_k A_k)``,

and differ in the perturbed inputs ``x̃_{k,t}``:

* SS-CAM (Wang et al. 2020, "smoothed Score-CAM"): ``x̃_{k,t} = x ⊙ (M_k + δ_{k,t})`` with
  ``δ_{k,t} ~ N(0, σ²)`` one noise map ``(N, 1, *S)`` per channel and sample (TorchCAM: σ = 2,
  T = 35);
* IS-CAM (Naidu et al. 2020, "integrated Score-CAM"): ``x̃_{k,t} = c_t · (x ⊙ M_k)`` with
  TorchCAM's coefficients ``c_t = Σ_{u=1..t} u/T = t(t+1)/(2T)`` (T = 10: 0.1, 0.3, …, 5.5).

Channels that are constant get weight 0 and cost no pass (TorchCAM passes them and gives them a
softmax share; on layers after a ReLU they are all-zero, add nothing to the map, and the
normalised maps agree). The ``K·T`` perturbed inputs per image run batched under
``torch.inference_mode`` in chunks of ``internal_batch_size`` (whole (channel, sample) items of
all ``N`` images; fewer under a memory budget), with a progress checkpoint per chunk — where
TorchCAM loops over samples in Python and regenerates every channel's mask per sample.

SS-CAM's noise comes from a generator seeded per (channel slot, sample) item from
``noise_seed`` (default 0, as SmoothGrad's seed: a call is repeatable; ``None``: one seed drawn
from torch's global generator per call), so the chunk
size and the memory budget do not change the result; a batch is not split by the budget (its
noise maps cover every image of the item at once).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from evidencemap import runtime
from evidencemap.maps import FLAT_EPS, normalize, upsample
from evidencemap.methods.ablationcam import group_scores
from evidencemap.methods.base import Context, LayerMethod
from evidencemap.methods.options import MEMORY_BUDGET, Option, batch_option, top_k_option
from evidencemap.methods.registry import register

__all__ = ["ISCAM", "SSCAM"]

_CHUNKING = (
    batch_option(32, "perturbed inputs per forward pass"),
    MEMORY_BUDGET,
    top_k_option("use only the k channels of highest activation variance (samples forwards each)"),
)
"""The chunking options SS-CAM and IS-CAM share (they take the same keyword arguments)."""


class SampledScoreCAM(LayerMethod):
    """Shared pipeline of SS-CAM and IS-CAM: ``T`` perturbed copies of each channel's masked
    input, scored in chunks; a subclass supplies :meth:`perturb`."""

    needs_gradients = False
    pass_kind: ClassVar[str] = "forward"
    sizes_own_chunks: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        layer: Any = None,
        *,
        samples: int,
        internal_batch_size: int,
        memory_budget: int | None = None,
        top_k: int | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(model, layer, **kw)
        self.samples = self.option("samples", samples)
        self.internal_batch_size = self.option("internal_batch_size", internal_batch_size)
        self.memory_budget = self.option("memory_budget", memory_budget)
        self.top_k = self.option("top_k", top_k)

    def perturb(self, x: Tensor, masks: Tensor, items: Tensor, seed: int) -> Tensor:
        """The perturbed inputs ``(g, N, C, *S)`` of items ``(g,)`` (index ``j·T + t``, sample
        ``t`` from 0) from the inputs ``(N, C, *S)`` and the items' masks ``(g, N, 1, *S)``."""
        raise NotImplementedError

    def channel_weights(self, acts: Tensor, grads: Tensor | None, context: Context) -> Tensor:
        x = context.inputs
        n, k = acts.shape[:2]
        flat = acts.flatten(2)
        valid = (flat.amax(2) - flat.amin(2)) > FLAT_EPS
        key = flat.var(2).where(valid, torch.full_like(flat[..., 0], float("-inf")))
        slots = int(valid.sum(1).max())
        if self.top_k is not None:
            slots = min(slots, self.top_k)
        weights = acts.new_zeros(n, k)
        if slots == 0:
            return weights
        order = key.argsort(dim=1, descending=True)[:, :slots]  # (N, slots)
        slot_valid = valid.gather(1, order)
        total = slots * self.samples
        seed = int(torch.randint(0, 2**62, (1,))) if self.noise_seed is None else self.noise_seed
        scores: list[Tensor] = []

        def step(start: int, stop: int) -> None:
            runtime.checkpoint(start, total, self.name)
            items = torch.arange(start, stop, device=acts.device)
            idx = order[:, items // self.samples]  # (N, g)
            g = idx.shape[1]
            chans = acts.gather(
                1, idx.view(n, g, *([1] * (acts.ndim - 2))).expand(n, g, *acts.shape[2:])
            )
            masks = normalize(
                upsample(chans.transpose(0, 1).reshape(g * n, 1, *acts.shape[2:]), x.shape[2:])
            ).view(g, n, 1, *x.shape[2:])
            inputs = self.perturb(x, masks, items, seed)
            scores.append(group_scores(context.forward(inputs.flatten(0, 1)), context, n))

        with torch.inference_mode():
            runtime.run_chunked(
                total,
                2 * x.numel() * x.element_size(),
                max(1, self.internal_batch_size // n),
                step,
                "perturbed input batches",
                self.memory_budget,
            )
            base = context.target.score(context.output).view(n, 1, 1)
            change = torch.cat(scores).T.reshape(n, slots, self.samples) - base
            mean = change.mean(2).masked_fill(~slot_valid, float("-inf"))
            slot_weights = mean.softmax(1).nan_to_num(0.0).masked_fill(~slot_valid, 0.0)
        return weights.scatter(1, order, slot_weights.to(weights.dtype))


@register
class SSCAM(SampledScoreCAM):
    """SS-CAM: Score-CAM weights averaged over noisy masks ``x ⊙ (M_k + δ)``, ``δ ~ N(0, σ²)``.

    See the module docstring for the formula. Args: ``samples`` (T, default 35), ``noise``
    (σ, default 2.0), ``noise_seed`` (default 0), ``internal_batch_size``, ``memory_budget``, ``top_k``.
    """

    name = "sscam"
    aliases = ("ss-cam",)
    passes_per_call: ClassVar[float] = 35.0
    draws_noise: ClassVar[bool] = True
    """Per channel: the default ``samples`` (the declared cost counts channels, ``top_k``)."""
    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option(
            "samples",
            "int",
            35,
            "noisy masks per channel (one forward each)",
            low=1,
            cost="work",
            cap=200,
        ),
        Option("noise", "float", 2.0, "σ of the Gaussian noise added to each mask", low=0.0),
        Option(
            "noise_seed",
            "int",
            0,
            "seed of the mask noise (None: one drawn from torch's generator per call)",
            nullable=True,
        ),
        *_CHUNKING,
    )

    def __init__(
        self,
        model: nn.Module,
        layer: Any = None,
        *,
        samples: int = 35,
        noise: float = 2.0,
        noise_seed: int | None = 0,
        internal_batch_size: int = 32,
        memory_budget: int | None = None,
        top_k: int | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(
            model,
            layer,
            samples=samples,
            internal_batch_size=internal_batch_size,
            memory_budget=memory_budget,
            top_k=top_k,
            noise_seed=self.option("noise_seed", noise_seed),
            **kw,
        )
        self.noise = float(self.option("noise", noise))

    def perturb(self, x: Tensor, masks: Tensor, items: Tensor, seed: int) -> Tensor:
        shape = masks.shape[1:]
        noise = torch.stack(
            [
                torch.randn(shape, generator=torch.Generator().manual_seed(seed + int(i)))
                for i in items
            ]
        ).to(device=x.device, dtype=x.dtype)
        return x.unsqueeze(0) * (masks + self.noise * noise)


@register
class ISCAM(SampledScoreCAM):
    """IS-CAM: Score-CAM weights averaged along scaled masked inputs ``c_t · (x ⊙ M_k)``.

    See the module docstring for the formula (TorchCAM's ``c_t = t(t+1)/(2T)``). Args:
    ``samples`` (T, default 10), ``internal_batch_size``, ``memory_budget``, ``top_k``.
    """

    name = "iscam"
    aliases = ("is-cam",)
    passes_per_call: ClassVar[float] = 10.0
    """Per channel: the default ``samples`` (the declared cost counts channels, ``top_k``)."""
    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option(
            "samples",
            "int",
            10,
            "scaled masked inputs per channel (one forward each)",
            low=1,
            cost="work",
            cap=200,
        ),
        *_CHUNKING,
    )

    def __init__(
        self,
        model: nn.Module,
        layer: Any = None,
        *,
        samples: int = 10,
        internal_batch_size: int = 32,
        memory_budget: int | None = None,
        top_k: int | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(
            model,
            layer,
            samples=samples,
            internal_batch_size=internal_batch_size,
            memory_budget=memory_budget,
            top_k=top_k,
            **kw,
        )

    def perturb(self, x: Tensor, masks: Tensor, items: Tensor, seed: int) -> Tensor:
        t = (items % self.samples + 1).to(x.dtype)  # 1 … T
        coeff = (t * (t + 1) / (2 * self.samples)).view(-1, *([1] * (masks.ndim - 1)))
        return coeff * (x.unsqueeze(0) * masks)
