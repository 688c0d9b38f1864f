"""Ablation-CAM (Desai & Ramaswamy, WACV 2020): channel weights from the score drop when a
channel of the layer is zeroed.

With ``A ∈ R^{N×K×s}`` the layer's activations, ``y_c`` the target's score and ``y_c^{(k)}`` the
score with channel ``k`` of ``A`` set to 0 (the rest of the network run on the ablated
activations), ``w_k = (y_c − y_c^{(k)}) / y_c`` and ``L = ReLU(Σ_k w_k A_k)`` (where ``y_c = 0``
the drop itself, ``w_k = y_c − y_c^{(k)}``). Channels that are 0 everywhere have ``w_k = 0`` and
cost no pass.

How the ablated passes run (faster than pytorch-grad-cam's loop, which runs the *whole* model
on 32 copies of one image at a time, per image):

* the layer's activations are computed once; each pass hands the network after the layer a
  chunk of ablated copies ``(g·N, K, *s)`` through a forward hook that replaces the layer's
  output, while the part before the layer runs once per chunk on the ``N`` inputs themselves
  (not on ``g·N`` copies). A first pass with two unablated copies checks that the rest of the
  network reads nothing but the layer's output (a skip connection from before the layer would
  fail or differ); where it does, every pass runs the whole model on the ``g·N`` copies of the
  inputs instead (pytorch-grad-cam's way, batched over images);
* the chunks hold whole "slots" (the ``j``-th ablated channel of every image) and are sized by
  ``internal_batch_size`` (256 by default: the part before the layer runs once per chunk, so
  large chunks pay it rarely; 32 at most when every pass runs the whole model) and the memory
  budget (:func:`evidencemap.runtime.run_chunked`), with a
  progress checkpoint per chunk.

``ratio`` (pytorch-grad-cam's ``ratio_channels_to_ablate``) ablates only a fraction of the
channels: pytorch-grad-cam scores each channel by the share of its normalised magnitude
``|A_k| − min, / max`` that falls inside the binary mask ``P > 0.01`` of the min-max normalised
``|first principal component projection|`` of ``A`` (Eigen-CAM's), and ablates the ``⌊K·r⌋``
channels of highest and the ``⌊K·r⌋`` of lowest score (``2⌊K·r⌋`` channels in all). Here
``ratio`` is the fraction actually ablated: ``m = round(K·ratio)`` channels, ``⌈m/2⌉`` of highest
and ``⌊m/2⌋`` of lowest score (``ratio = 2r`` ablates pytorch-grad-cam's channels), chosen among
channels that are not constant (pytorch-grad-cam's score is 0/0 there and such channels sort
first). The channels not ablated get ``w_k = 0``.

Ablation sets a channel to 0 (the paper's rule). pytorch-grad-cam sets it to ``min(A) − 10⁷``
when the layer's activations are not ≥ 0 with minimum 0; the two agree on layers after a ReLU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from evidencemap import runtime
from evidencemap.maps import FLAT_EPS
from evidencemap.methods.base import Context, LayerMethod
from evidencemap.methods.options import MEMORY_BUDGET, Option, batch_option, top_k_option
from evidencemap.methods.registry import register

__all__ = ["WHOLE_MODEL_CHUNK", "AblationCAM", "objectness_scores"]

WHOLE_MODEL_CHUNK = 32
"""Ablated copies per pass at most when each pass runs the whole model (pytorch-grad-cam's
chunk): the part before the layer then runs on every copy and holds its activations."""


@contextmanager
def replaced_output(layer: nn.Module, box: list[Tensor]) -> Iterator[None]:
    """While open, ``layer``'s output is replaced by ``box[0]`` (a forward hook).

    Raises:
        ValueError: when the layer's output is not a tensor shaped like ``box[0]`` per sample
            (a token or channels-last layout).
    """

    def hook(_module: nn.Module, _args: Any, output: Any) -> Tensor:
        new = box[0]
        if not isinstance(output, Tensor) or tuple(output.shape[1:]) != tuple(new.shape[1:]):
            raise ValueError(
                "Ablation-CAM replaces the layer's output by ablated activations and needs a "
                "channels-first layer output (N, K, *spatial); choose a convolutional layer"
            )
        return new

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def objectness_scores(acts: Tensor) -> Tensor:
    """pytorch-grad-cam's channel score for ``ratio_channels_to_ablate``: ``(N, K, *s)`` →
    ``(N, K)``, NaN for constant channels.

    ``P = |(A − Ā) v₁|`` (the first principal component projection over positions), min-max
    normalised and thresholded at 0.01 into a mask ``B``; ``n_k = |A_k| − min |A_k|``, divided by
    its maximum; ``score_k = Σ B n_k / Σ n_k``.
    """
    flat = acts.flatten(2).float()  # (N, K, Z)
    centred = flat.transpose(1, 2) - flat.transpose(1, 2).mean(1, keepdim=True)  # (N, Z, K)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    proj = (centred @ vh[:, 0, :].unsqueeze(2)).squeeze(2).abs()  # (N, Z)
    proj = proj - proj.amin(1, keepdim=True)
    proj = proj / proj.amax(1, keepdim=True).clamp(min=FLAT_EPS)
    mask = (proj > 0.01).to(flat.dtype).unsqueeze(1)  # (N, 1, Z)
    mag = flat.abs()
    mag = mag - mag.amin(2, keepdim=True)
    mag = mag / mag.amax(2, keepdim=True)
    return (mask * mag).sum(2) / mag.sum(2)


@register
class AblationCAM(LayerMethod):
    """Ablation-CAM: ``w_k = (y_c − y_c^{(k)}) / y_c``, the score drop when channel ``k`` is zeroed.

    See the module docstring for the formula, the ``ratio`` selection and how the passes run.

    Args:
        ratio: fraction of the channels ablated (1: all; below 1: pytorch-grad-cam's choice).
        top_k: ablate at most ``top_k`` channels (those of highest activation variance when
            ``ratio`` is 1; else the first of the ratio's choice).
        internal_batch_size: ablated copies per pass (default 256; at most
            :data:`WHOLE_MODEL_CHUNK` when the passes run the whole model).
        memory_budget: bytes one chunk of ablated copies may take (``None``: no limit).
    """

    name = "ablationcam"
    token_layers = False  # its ablated passes replace the layer's raw output
    aliases = ("ablation-cam",)
    needs_gradients = False
    pass_kind: ClassVar[str] = "forward"
    sizes_own_chunks: ClassVar[bool] = True
    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option(
            "ratio",
            "float",
            1.0,
            "fraction of the channels ablated (pytorch-grad-cam's choice below 1)",
            low=0.0,
            low_open=True,
            high=1.0,
        ),
        top_k_option("ablate at most k channels (one pass of the network after the layer each)"),
        batch_option(256, "ablated copies per pass (32 at most through the whole model)", cap=4096),
        MEMORY_BUDGET,
    )

    def __init__(
        self,
        model: nn.Module,
        layer: Any = None,
        *,
        ratio: float = 1.0,
        top_k: int | None = None,
        internal_batch_size: int = 256,
        memory_budget: int | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(model, layer, **kw)
        self.ratio = float(self.option("ratio", ratio))
        self.top_k = self.option("top_k", top_k)
        self.internal_batch_size = self.option("internal_batch_size", internal_batch_size)
        self.memory_budget = self.option("memory_budget", memory_budget)

    def ablation_order(self, acts: Tensor) -> tuple[Tensor, Tensor]:
        """The channels to ablate per sample, ``(N, S)`` indices, and which are real ``(N, S)``
        (samples with fewer non-constant channels pad their slots with unused ones)."""
        n, k = acts.shape[:2]
        flat = acts.flatten(2)
        valid = (flat.amax(2) - flat.amin(2)) > FLAT_EPS
        if self.ratio >= 1.0:
            key = flat.var(2).where(valid, torch.full_like(flat[..., 0], float("-inf")))
            order = key.argsort(dim=1, descending=True)
            count = valid.sum(1)
        else:
            m = max(1, round(k * self.ratio))
            score = objectness_scores(acts).to(flat.dtype).nan_to_num(0.0)
            score = score.where(valid, torch.full_like(score, float("-inf")))
            ranked = score.argsort(dim=1, descending=True, stable=True)  # valid ones first
            rank = torch.empty_like(ranked).scatter_(
                1, ranked, torch.arange(k, device=acts.device).expand(n, k)
            )
            valid_count = valid.sum(1, keepdim=True)
            count = valid_count.clamp(max=m)
            high, low = (count + 1) // 2, count // 2
            chosen = (rank < high) | ((rank >= valid_count - low) & (rank < valid_count))
            # the ⌈m/2⌉ highest first, then the ⌊m/2⌋ lowest, then the channels not ablated
            order = rank.masked_fill(~chosen, k).argsort(dim=1, stable=True)
            count = count.squeeze(1)
        if self.top_k is not None:
            count = count.clamp(max=self.top_k)
        width = max(1, int(count.max()))
        order = order[:, :width]
        real = torch.arange(width, device=acts.device)[None, :] < count[:, None]
        return order, real

    def channel_weights(self, acts: Tensor, grads: Tensor | None, context: Context) -> Tensor:
        n, k = acts.shape[:2]
        order, real = self.ablation_order(acts)
        slots = order.shape[1]
        weights = acts.new_zeros(n, k)
        if not bool(real.any()):
            return weights
        layer = context.layer
        if layer is None:
            raise RuntimeError("Ablation-CAM needs the explained layer")
        tail_only = self._tail_only(acts, layer, context)
        x = context.inputs
        per_slot = 2 * acts.numel() * acts.element_size()
        if not tail_only:
            per_slot += x.numel() * x.element_size()
        copies = (
            self.internal_batch_size
            if tail_only
            else min(self.internal_batch_size, WHOLE_MODEL_CHUNK)
        )
        requested = max(1, copies // n)
        box: list[Tensor] = []
        scores: list[Tensor] = []

        def step(start: int, stop: int) -> None:
            runtime.checkpoint(start, slots, "ablationcam")
            g = stop - start
            keep = torch.ones(g, n, k, dtype=acts.dtype, device=acts.device)
            keep.scatter_(2, order[:, start:stop].T.unsqueeze(2), 0.0)
            ablated = acts.unsqueeze(0) * keep.view(g, n, k, *([1] * (acts.ndim - 2)))
            box[:] = [ablated.reshape(g * n, *acts.shape[1:])]
            inputs = x if tail_only else x.repeat(g, *([1] * (x.ndim - 1)))
            with replaced_output(layer, box):
                out = context.forward(inputs)
            scores.append(group_scores(out, context, n))

        with torch.inference_mode():
            runtime.run_chunked(
                slots, per_slot, requested, step, "ablated activation batches", self.memory_budget
            )
            ablated_scores = torch.cat(scores).T.clone()  # (N, S)
            base = context.target.score(context.output).view(n, 1)
            drop = base - ablated_scores
            slot_weights = drop / base.where(base != 0, torch.ones_like(base))
            slot_weights = slot_weights.masked_fill(~real, 0.0)
        return weights.scatter(1, order, slot_weights.to(weights.dtype))

    def _tail_only(self, acts: Tensor, layer: nn.Module, context: Context) -> bool:
        """Whether the network after ``layer`` reads only the layer's output: two copies of the
        activations handed on, with the inputs themselves, give the output twice."""
        n = acts.shape[0]
        box = [torch.cat([acts, acts])]
        try:
            with torch.inference_mode(), replaced_output(layer, box):
                out = context.forward(context.inputs)
        except RuntimeError:  # batch sizes that do not broadcast: a path around the layer
            return False
        want = torch.cat([context.output, context.output])
        if out.shape != want.shape:
            return False
        scale = float(want.abs().max()) if want.numel() else 0.0
        return bool(torch.allclose(out, want, rtol=1e-4, atol=1e-5 * max(scale, 1.0))) and n > 0


def group_scores(output: Tensor, context: Context, n: int) -> Tensor:
    """Target scores of a chunk output ``(g·N, …)`` laid out slot-major → ``(g, N)``: copy
    ``j·N + i`` is scored for sample ``i``'s target."""
    groups = output.shape[0] // n
    chunks = output.reshape(groups, n, *output.shape[1:])
    classes = context.target.classes
    if classes is not None and output.ndim == 2:
        idx = classes.view(1, n, 1).expand(groups, n, 1)
        return chunks.gather(2, idx).squeeze(2)
    return torch.stack([context.target.score(c) for c in chunks])
