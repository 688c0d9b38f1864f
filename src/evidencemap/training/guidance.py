"""Explanation-guided training: a loss term that makes a model's evidence follow a guide.

:class:`GuidanceLoss` turns what the model attends to into a differentiable penalty that any
PyTorch training loop adds to its task loss::

    guide = GuidanceLoss(model, "layer4", attention="features", distance="cosine")
    with guide.record() as rec:          # hooks live for this block only
        logits = model(x)                # the training loop's own forward pass
    loss = F.cross_entropy(logits, y) + lam * rec.loss(heat_maps, target=y)
    loss.backward(); optimiser.step()

The attention ``A`` of a sample (``attention=``):

* ``"features"`` — the channel mean of the layer's features (Belharbi et al. 2024),
  ``A = (1/K) Σ_k F_k``, shape ``(N, 1, *s)``.
* ``"gradcam"`` — the differentiable Grad-CAM of the target score ``y``,
  ``A = ReLU(Σ_k α_k F_k)``, ``α_k = (1/Z) Σ_s ∂y/∂F_k,s``; the gradient is taken with
  ``create_graph=True`` so the loss can be differentiated again (double backpropagation).
* ``"input_gradient"`` — the input gradient of the log-probabilities (Ross et al. 2017),
  ``G = ∂/∂x Σ_k log p_k`` (``target=None``) or ``∂ log p_t/∂x`` for class targets, shape
  ``(N, C, *S)``, also with ``create_graph=True``.

The distance to the guidance ``H`` or mask ``M`` (``distance=``), averaged over the batch (and
over the layers when several are given; ``H``/``M`` are resized to each layer, see below):

* ``"cosine"`` — ``1 − cos(vec(A), vec(H))`` (Belharbi et al.: ``H`` is the expert heat map,
  e.g. action-unit cues; ``λ = 9`` in their code). ``0`` when ``A`` or ``H`` is all zero.
* ``"rrr"`` — "right for the right reasons": ``Σ (M ⊙ A)²`` over channels and positions, with
  ``M`` the mask of *forbidden* inputs (1 where the model must not look).
* ``"mse"`` — ``mean((Â − Ĥ)²)`` with ``Â`` and ``Ĥ`` min-max normalised per sample to [0, 1]
  (flat maps → 0).

For the map distances (``cosine``, ``mse``) the input gradient becomes a map by
``Σ_c |G_c|``. A guidance or mask ``(N, 1, *S)`` — 2-D ``(N, 1, H, W)`` or 3-D
``(N, 1, D, H, W)``, one code path — is resized to a layer's ``*s`` bilinearly (trilinearly in
3-D) with ``align_corners=True`` (antialiased when shrinking 2-D maps) and clamped to each
sample's original ``[min, max]``, as in Belharbi et al.'s code.

Guarantees: one forward pass (the caller's: :meth:`GuidanceLoss.record` reads its activations);
hooks removed in ``finally``; gradients inside the loss come from ``torch.autograd.grad`` to the
activations or the input only, so parameters get ``.grad`` only from the caller's own
``backward()``; the model's mode and ``requires_grad`` flags are never changed. With batch
normalisation in training mode the samples of a batch interact, so a sample's Grad-CAM or input
gradient also carries the (small) cross-sample terms, as in any batched implementation.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evidencemap.checks import check_model
from evidencemap.layers import LayerSpec, is_spatial, resolve_layers
from evidencemap.methods.base import weighted_sum
from evidencemap.targets import OutputKey, Target, resolve, select_output

__all__ = ["ATTENTIONS", "DISTANCES", "GuidanceLoss", "GuidanceRecording", "resize_guidance"]

ATTENTIONS: tuple[str, ...] = ("features", "gradcam", "input_gradient")
"""What the model attends to: layer features, differentiable Grad-CAM, input gradient."""
DISTANCES: tuple[str, ...] = ("cosine", "rrr", "mse")
"""How the attention is compared with the guidance (see the module docstring)."""

_EPS = 1e-12


def resize_guidance(guidance: Tensor, size: tuple[int, ...]) -> Tensor:
    """Resize maps ``(N, 1, *S)`` to ``(N, 1, *size)`` as Belharbi et al. do.

    Bilinear (2-D) or trilinear (3-D) interpolation with ``align_corners=True``, antialiased
    when a 2-D map shrinks, then clamped to each sample's original ``[min, max]``. Maps already
    at ``size`` are returned as they are.

    Raises:
        ValueError: when ``size`` does not have one entry per spatial axis of ``guidance``.
    """
    spatial = tuple(guidance.shape[2:])
    size = tuple(int(s) for s in size)
    if len(size) != len(spatial):
        raise ValueError(f"size must have {len(spatial)} entries, got {size}")
    if size == spatial:
        return guidance
    if len(size) == 2:
        shrink = any(s < t for s, t in zip(size, spatial, strict=True))
        out = F.interpolate(
            guidance, size=size, mode="bilinear", align_corners=True, antialias=shrink
        )
    elif len(size) == 3:
        out = F.interpolate(guidance, size=size, mode="trilinear", align_corners=True)
    else:
        out = F.interpolate(guidance, size=size, mode="linear", align_corners=True)
    flat = guidance.flatten(1)
    view = (guidance.shape[0], *([1] * (guidance.ndim - 1)))
    return out.clamp(flat.amin(1).view(view), flat.amax(1).view(view))


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise TypeError(
            f"{name} must be a string, one of {list(choices)}, got {type(value).__name__}"
        )
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _check_guidance(guidance: object, inputs: Tensor, dtype: torch.dtype) -> Tensor:
    """``guidance`` as a float ``(N, 1, *S)`` tensor matching the batch of ``inputs``."""
    if not isinstance(guidance, Tensor):
        raise TypeError(f"guidance must be a torch.Tensor, got {type(guidance).__name__}")
    n, d = inputs.shape[0], inputs.ndim - 2
    if guidance.ndim != inputs.ndim or guidance.shape[0] != n or guidance.shape[1] != 1:
        raise ValueError(
            f"guidance must be ({n}, 1, {', '.join(['…'] * d)}) like the inputs "
            f"{tuple(inputs.shape)} with one channel, got {tuple(guidance.shape)}"
        )
    if guidance.is_complex() or not (guidance.is_floating_point() or guidance.dtype == torch.bool):
        raise TypeError(f"guidance must be a float or bool tensor, got {guidance.dtype}")
    guidance = guidance.detach().to(inputs.device, dtype)
    if not bool(torch.isfinite(guidance).all()):
        raise ValueError("guidance contains NaN or infinite values")
    return guidance


def _minmax(maps: Tensor) -> Tensor:
    """Per-sample min-max normalisation to [0, 1]; flat maps become zeros."""
    flat = maps.flatten(1)
    low = flat.amin(1, keepdim=True)
    span = flat.amax(1, keepdim=True) - low
    ok = span > 0
    return ((flat - low) / span.where(ok, torch.ones_like(span)) * ok).view_as(maps)


def _cosine_distance(a: Tensor, h: Tensor) -> Tensor:
    """``1 − cos(vec(a), vec(h))`` per sample; ``h`` is broadcast over ``a``'s channels."""
    a, h = a.flatten(1), h.expand(a.shape[0], a.shape[1], *h.shape[2:]).flatten(1)
    dot = (a * h).sum(1)
    norms = a.norm(dim=1) * h.norm(dim=1)
    return 1 - dot / norms.clamp_min(_EPS)


@dataclass
class GuidanceRecording:
    """What one forward pass inside :meth:`GuidanceLoss.record` produced.

    Attributes:
        guide: the loss that recorded it.
        inputs: the tensor the model was called with (for ``input_gradient``, a view of it that
            requires grad when the caller's did not).
        output: the model's raw output (tensor, tuple or mapping).
        activations: the recorded layer outputs ``(N, K, *s)``, one per layer (empty for
            ``input_gradient``).
    """

    guide: GuidanceLoss
    inputs: Tensor | None = None
    output: Any = None
    activations: list[Tensor] = field(default_factory=list)

    @property
    def logits(self) -> Tensor:
        """The output tensor scored by targets (``select_output`` with the guide's key)."""
        if self.output is None:
            raise ValueError("nothing was recorded: call the model inside 'with guide.record()'")
        return select_output(self.output, self.guide.output_key)

    def attention(self, target: Target = None) -> list[Tensor]:
        """The attention of each layer (one tensor for ``input_gradient``), differentiable.

        Returns ``(N, 1, *s)`` per layer for ``features`` and ``gradcam``, ``(N, C, *S)`` for
        ``input_gradient``. ``target`` is ignored by ``features``; for ``gradcam`` it is any
        :mod:`evidencemap.targets` target (``None``: top-1 class logit); for ``input_gradient``
        ``None`` means Ross et al.'s ``Σ_k log p_k`` and class targets their log-probability.

        Raises:
            ValueError: when nothing (or not every layer) was recorded, or the output has no
                autograd graph (the forward ran under ``torch.no_grad()``).
        """
        logits = self.logits
        kind = self.guide.attention
        if kind == "features":
            self._check_layers()
            return [a.mean(dim=1, keepdim=True) for a in self.activations]
        if not logits.requires_grad:
            raise ValueError(
                "the model output has no autograd graph: run the forward with gradients enabled "
                "(not under torch.no_grad() or inference_mode)"
            )
        if kind == "gradcam":
            self._check_layers()
            score = resolve(target, logits).score(logits).sum()
            grads = torch.autograd.grad(score, self.activations, create_graph=True)
            return [
                F.relu(weighted_sum(a, g.flatten(2).mean(2)))
                for a, g in zip(self.activations, grads, strict=True)
            ]
        if self.inputs is None:
            raise ValueError("the model's input was not recorded")
        log_p = F.log_softmax(logits, dim=1)
        score = log_p.sum() if target is None else resolve(target, log_p).score(log_p).sum()
        (grad,) = torch.autograd.grad(score, self.inputs, create_graph=True)
        return [grad]

    def loss(self, guidance: Tensor, target: Target = None) -> Tensor:
        """The guidance term: the distance of the attention to ``guidance``, a scalar.

        Args:
            guidance: ``(N, 1, *S)`` heat maps (``cosine``, ``mse``) or forbidden-region masks
                (``rrr``, 1 = forbidden), any spatial size of the inputs' rank (resized to
                each layer's, see :func:`resize_guidance`); float or bool.
            target: what the attention explains (see :meth:`attention`).

        Returns:
            A 0-d tensor, differentiable with respect to the model's parameters: the batch mean
            of the per-sample distance, averaged over the layers.

        Raises:
            TypeError / ValueError: for a guidance of the wrong type, shape or with NaNs, and
                the errors of :meth:`attention`.
        """
        if self.inputs is None:
            raise ValueError("nothing was recorded: call the model inside 'with guide.record()'")
        maps = self.attention(target)
        h = _check_guidance(guidance, self.inputs, maps[0].dtype)
        distance = self.guide.distance
        terms = []
        for a in maps:
            m = resize_guidance(h, tuple(a.shape[2:]))
            if distance == "rrr":
                per_sample = (m * a).pow(2).flatten(1).sum(1)
            else:
                if self.guide.attention == "input_gradient":
                    a = a.abs().sum(dim=1, keepdim=True)
                if distance == "cosine":
                    per_sample = _cosine_distance(a, m)
                else:
                    per_sample = (_minmax(a) - _minmax(m)).pow(2).flatten(1).mean(1)
            terms.append(per_sample.mean())
        return torch.stack(terms).mean()

    def _check_layers(self) -> None:
        if len(self.activations) != len(self.guide.layers) or not self.activations:
            raise ValueError(
                "the guided layer(s) did not run during the recorded forward pass "
                f"({len(self.activations)} of {max(1, len(self.guide.layers))} recorded)"
            )
        ndim = self.inputs.ndim if self.inputs is not None else None
        for a in self.activations:
            if a.ndim != ndim:
                raise ValueError(
                    f"a guided layer's output {tuple(a.shape)} is not spatial like the inputs "
                    "(N, C, *spatial): choose a convolutional layer"
                )


class GuidanceLoss:
    """A loss term that aligns the model's attention with guidance maps (module docstring).

    Args:
        model: the network being trained.
        layer: for ``features`` and ``gradcam``: a module, dotted name or list of them (the term
            is averaged over the layers); ``None`` picks the last leaf module with a spatial
            output during the first recorded pass (and keeps it). ``input_gradient`` takes no
            layer.
        attention: ``"features"``, ``"gradcam"`` or ``"input_gradient"``.
        distance: ``"cosine"``, ``"rrr"`` or ``"mse"``.
        output_key: which element of a tuple/dict model output holds the logits.

    Use :meth:`record` around the training loop's forward pass (one forward for task loss and
    guidance), or call the object, ``guide(x, guidance, target=y)``, which runs its own forward.

    Raises:
        TypeError / ValueError: for a model that is not a module, an unknown attention or
            distance, a layer not in the model, or a layer given with ``input_gradient``.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: LayerSpec = None,
        attention: str = "features",
        distance: str = "cosine",
        *,
        output_key: OutputKey = None,
    ) -> None:
        model = check_model(model)
        self.model = model
        self.attention = _check_choice("attention", attention, ATTENTIONS)
        self.distance = _check_choice("distance", distance, DISTANCES)
        if self.attention == "input_gradient" and layer is not None:
            raise ValueError("attention='input_gradient' works in input space and takes no layer")
        self.layers: list[nn.Module] = resolve_layers(model, layer)
        self.output_key = output_key

    def __repr__(self) -> str:
        return (
            f"GuidanceLoss(attention={self.attention!r}, distance={self.distance!r}, "
            f"layers={len(self.layers)})"
        )

    @contextmanager
    def record(self) -> Iterator[GuidanceRecording]:
        """Record the model's input, output and guided layers during one forward pass.

        Hooks are registered on entry and removed in ``finally``; only the entering thread's
        passes are recorded, the last pass wins. A guided layer's output is handed on as a copy,
        so an in-place operation after it (``ReLU(inplace=True)``) cannot alter the recorded
        activation; values and gradients are unchanged.
        """
        rec = GuidanceRecording(self)
        owner = threading.get_ident()
        auto = self.attention != "input_gradient" and not self.layers
        handles = []

        def pre_hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if threading.get_ident() != owner or not args or not isinstance(args[0], Tensor):
                return None
            x = args[0]
            rec.activations = []
            calls.clear()
            if self.attention == "input_gradient" and not x.requires_grad:
                if not x.is_floating_point():
                    raise TypeError(f"inputs must be a float tensor, got {x.dtype}")
                x = x.detach().requires_grad_(True)
                rec.inputs = x
                return (x, *args[1:])
            rec.inputs = x
            return None

        def layer_hook(_module: nn.Module, _args: Any, output: Any) -> Tensor | None:
            if threading.get_ident() != owner or not isinstance(output, Tensor):
                return None
            rec.activations.append(output)
            return output.clone()

        calls: list[tuple[nn.Module, Tensor]] = []

        def output_hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if threading.get_ident() == owner:
                rec.output = output

        def leaf_hook(module: nn.Module, _args: Any, output: Any) -> None:
            if threading.get_ident() == owner and isinstance(output, Tensor):
                calls.append((module, output))

        try:
            handles.append(self.model.register_forward_pre_hook(pre_hook))
            if auto:
                leaves = [
                    m
                    for m in self.model.modules()
                    if next(m.children(), None) is None and m is not self.model
                ]
                handles.extend(m.register_forward_hook(leaf_hook) for m in leaves)
            else:
                handles.extend(m.register_forward_hook(layer_hook) for m in self.layers)
            handles.append(self.model.register_forward_hook(output_hook))
            yield rec
        finally:
            for handle in handles:
                handle.remove()
        if auto and rec.inputs is not None:
            ndim = rec.inputs.ndim
            for module, out in reversed(calls):
                if is_spatial(out, ndim):
                    self.layers = [module]
                    rec.activations = [out]
                    break
            else:
                raise ValueError(
                    "the model has no layer with a spatial output (N, C, *spatial) matching the "
                    "inputs; pass layer= explicitly or use attention='input_gradient'"
                )

    def __call__(self, inputs: Tensor, guidance: Tensor, target: Target = None) -> Tensor:
        """Run the model on ``inputs`` and return the guidance term (see
        :meth:`GuidanceRecording.loss`). This is a forward pass of its own: to share the
        training loop's forward, use :meth:`record`.

        Raises:
            TypeError: for inputs that are not a tensor.
        """
        if not isinstance(inputs, Tensor):
            raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
        if inputs.ndim < 3:
            raise ValueError(
                f"inputs must be (N, C, H, W) or (N, C, D, H, W), got {tuple(inputs.shape)}"
            )
        with self.record() as rec:
            self.model(inputs)
        return rec.loss(guidance, target)
