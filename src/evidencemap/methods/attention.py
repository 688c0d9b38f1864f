"""Attribution through a vision transformer's attention: rollout and its gradient-weighted form.

Notation: ``A_b ∈ R^{N×H×T×T}`` the attention probabilities of block ``b`` (``H`` heads, ``T``
tokens, rows are queries and sum to 1), recorded per call by
:class:`evidencemap.capture.AttentionRecorder`; ``r`` prefix tokens (CLS …) lead the ``T − r``
patch tokens of a grid (:mod:`evidencemap.tokens`). Both methods propagate a relevance matrix
``R ∈ R^{N×T×T}`` through the blocks in order and read the map from the row of the first prefix
token (the class token) over the patch tokens, ``M = R[0, r:]`` (the mean row over all tokens
when there is no prefix token), reshaped to the grid and upsampled to the input.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from evidencemap.capture import AttentionRecorder
from evidencemap.explanation import Explanation
from evidencemap.maps import upsample
from evidencemap.methods.base import Context, Method
from evidencemap.methods.options import Option
from evidencemap.methods.registry import register
from evidencemap.targets import Target, resolve
from evidencemap.tokens import Tokens, resolve_layout, tokens_to_grid

__all__ = ["AttentionGradient", "AttentionRollout", "rollout"]

HEAD_FUSIONS = ("mean", "max", "min")


def rollout(attentions: list[Tensor], fusion: str = "mean") -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of ``(N, H, T, T)`` maps → ``(N, T, T)``.

    ``Â_b = ½ fuse_h(A_b) + ½ I`` renormalised so each row sums to 1, ``R = Â_L ⋯ Â_2 Â_1``.
    Every row of ``R`` sums to 1 (a product of row-stochastic matrices).
    """
    fuse = {"mean": lambda a: a.mean(1), "max": lambda a: a.amax(1), "min": lambda a: a.amin(1)}
    eye = torch.eye(attentions[0].shape[-1], dtype=attentions[0].dtype, device=attentions[0].device)
    result = eye.expand_as(attentions[0][:, 0]).clone()
    for att in attentions:
        a = 0.5 * fuse[fusion](att) + 0.5 * eye
        a = a / a.sum(-1, keepdim=True)
        result = a @ result
    return result


def gradient_rollout(attentions: list[Tensor], grads: list[Tensor]) -> Tensor:
    """Gradient-weighted rollout (Chefer et al. 2021): ``R = I``, then for each block in order
    ``Ā_b = E_h[(∇A_b ⊙ A_b)^+]`` and ``R ← R + Ā_b R``; ``(N, T, T)``."""
    eye = torch.eye(attentions[0].shape[-1], dtype=attentions[0].dtype, device=attentions[0].device)
    result = eye.expand_as(attentions[0][:, 0]).clone()
    for att, grad in zip(attentions, grads, strict=True):
        a = (grad * att).clamp(min=0).mean(1)
        result = result + a @ result
    return result


class _AttentionMethod(Method):
    """Shared pipeline: record the attention maps of one forward pass, propagate, read a row."""

    uses_layer: ClassVar[bool] = False
    needs_gradients: ClassVar[bool] = False
    needs_attention: ClassVar[bool] = True
    pass_kind: ClassVar[str] = "layer"
    """Counted as one Grad-CAM call: one forward recording the attention maps (and, for the
    gradient rollout, a backward to them)."""
    OPTIONS_BASE: ClassVar[tuple[Option, ...]] = (
        Option(
            "prefix_tokens",
            "int",
            None,
            "leading prefix tokens (CLS, distillation, registers); None: detected from the "
            "token count and the input's shape",
            low=0,
            nullable=True,
        ),
        Option(
            "grid",
            "any",
            None,
            "the token grid (h, w) or (d, h, w); None: inferred from the token count and the "
            "input's shape",
            nullable=True,
            other="a tuple of positive ints",
        ),
    )
    OPTIONS: ClassVar[tuple[Option, ...]] = OPTIONS_BASE

    def __init__(
        self,
        model: nn.Module,
        *,
        prefix_tokens: int | None = None,
        grid: tuple[int, ...] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(model, **kw)
        self.OPTIONS_BASE[0].check(prefix_tokens, self.name)
        self._spec = Tokens("", layout="tokens", prefix=prefix_tokens, grid=grid)
        self.prefix_tokens = self._spec.prefix
        self.grid = self._spec.grid

    @classmethod
    def unsupported(cls, model: nn.Module, *, compiled: bool = False) -> str | None:
        """A convolutional network with no attention module: nothing to roll out.

        Static, so it errs towards offering the method: a model without convolutions (it may
        compute attention with plain ``softmax`` calls), or one with a module whose class name
        says attention (``nn.MultiheadAttention``, ``…Attention``, ``…Attn``), is supported.
        """
        reason = super().unsupported(model, compiled=compiled)
        if reason is not None:
            return reason
        # A TorchScript module keeps each submodule's class name as ``original_name``.
        names = [str(getattr(m, "original_name", type(m).__name__)) for m in model.modules()]
        convolutional = any(n in {"Conv1d", "Conv2d", "Conv3d"} for n in names) or any(
            isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()
        )
        attention = any(
            isinstance(m, (nn.MultiheadAttention, nn.TransformerEncoderLayer))
            for m in model.modules()
        ) or any("attention" in n.lower() or "attn" in n.lower() for n in names)
        if convolutional and not attention:
            return "it needs a transformer: the model is convolutional, with no attention module"
        return None

    def relevance(self, recorder: AttentionRecorder, scores: Tensor) -> Tensor:
        """``(N, T, T)`` relevance from the blocks' recorded attention maps."""
        raise NotImplementedError

    def explain_batch(self, inputs: Tensor, target: Target) -> Explanation:
        # Grad mode on and an input that requires grad: nn.MultiheadAttention then takes its
        # Python path (its fused inference path would hide the attention probabilities).
        x = inputs.requires_grad_(True)
        recorder = AttentionRecorder(x.shape[0])
        with torch.enable_grad():
            with recorder:
                output = self.forward(x)
            resolved = resolve(target, output)
            scores = resolved.score(output)
        if not recorder.tensors:
            raise ValueError(
                f"{self.name}: the model made no self-attention call (softmax over square "
                "attention scores, scaled_dot_product_attention or nn.MultiheadAttention); it "
                "needs a transformer"
            )
        attentions = recorder.maps
        t = attentions[0].shape[-1]
        if any(a.shape[-1] != t for a in attentions):
            raise ValueError(
                f"{self.name}: the attention maps have different token counts "
                f"{sorted({a.shape[-1] for a in attentions})}; rollout needs global attention "
                "over the same tokens in every block (not windowed attention)"
            )
        layout = resolve_layout((x.shape[0], t, 1), tuple(x.shape), self._spec)
        if layout is None:
            raise ValueError(
                f"{self.name}: {t} tokens form no grid with the aspect ratio of the inputs "
                f"{tuple(x.shape[2:])}; pass grid= and prefix_tokens="
            )
        rel = self.relevance(recorder, scores).detach()
        row = rel[:, 0] if layout.prefix else rel.mean(1)
        raw = tokens_to_grid(row.unsqueeze(-1), layout.prefix, layout.grid)  # (N, 1, *grid)
        maps = upsample(raw, x.shape[2:])
        context = Context(self.model, x.detach(), output.detach(), resolved, None, self.forward)
        extras = {"tokens": layout.describe(), "blocks": len(attentions), "relevance": rel}
        return self.finish(raw, maps, context, scores, extras=extras)


@register
class AttentionRollout(_AttentionMethod):
    """Attention rollout (Abnar & Zuidema 2020): ``R = Π_b (½ fuse_h A_b + ½ I)`` (rows
    renormalised), map ``R[cls, patches]``. Class-agnostic: the target only sets the reported
    score.

    Args:
        model: a transformer whose blocks call ``softmax`` over square attention scores or
            ``scaled_dot_product_attention``.
        head_fusion: how the heads are fused per block: ``"mean"`` (default), ``"max"``,
            ``"min"``.
        prefix_tokens / grid: the token layout (``None``: detected, see
            :mod:`evidencemap.tokens`).
    """

    name = "attention_rollout"
    aliases = ("rollout",)
    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option("head_fusion", "str", "mean", "how heads are fused per block", choices=HEAD_FUSIONS),
    )

    def __init__(self, model: nn.Module, *, head_fusion: str = "mean", **kw: Any) -> None:
        super().__init__(model, **kw)
        self.head_fusion = self.OPTIONS[0].check(head_fusion, self.name)

    def relevance(self, recorder: AttentionRecorder, scores: Tensor) -> Tensor:
        return rollout([a.detach() for a in recorder.maps], self.head_fusion)


@register
class AttentionGradient(_AttentionMethod):
    """Gradient-weighted attention rollout (Chefer et al. 2021, arXiv 2103.15679):
    ``Ā_b = E_h[(∂y/∂A_b ⊙ A_b)^+]``, ``R ← R + Ā_b R`` from ``R = I``, map ``R[cls, patches]``.
    Class-specific: ``∂y/∂A_b`` is the target score's gradient (``torch.autograd.grad``) to
    the recorded attention probabilities.

    Args: see :class:`AttentionRollout` (no head fusion: heads are averaged).
    """

    name = "attention_gradient"
    aliases = ("chefer", "gradient_rollout")
    needs_gradients: ClassVar[bool] = True

    def relevance(self, recorder: AttentionRecorder, scores: Tensor) -> Tensor:
        if not scores.requires_grad:
            raise ValueError(f"{self.name}: the target score does not depend on the attention")
        got = torch.autograd.grad(scores.sum(), recorder.tensors, allow_unused=True)
        grads = [
            recorder.as_heads(torch.zeros_like(a) if g is None else g)
            for a, g in zip(recorder.tensors, got, strict=True)
        ]
        return gradient_rollout([a.detach() for a in recorder.maps], grads)
