"""The three templates of a method: :class:`Method`, :class:`LayerMethod`, :class:`InputMethod`.

A method is a small class that supplies one thing:

* :class:`LayerMethod` subclasses (the CAM family) implement :meth:`LayerMethod.layer_map`, the
  map at the layer's resolution from its activations ``A`` (and gradients ``∂y/∂A`` when
  ``needs_gradients``); most only supply channel weights through :meth:`channel_weights`.
* :class:`InputMethod` subclasses (gradient methods in input space) implement
  :meth:`InputMethod.attribute`, per-channel attributions ``(N, C, *S)``.
* Other :class:`Method` subclasses implement :meth:`Method.explain_batch`.

What a method declares instead of code: its options (``OPTIONS``, a tuple of
:class:`~evidencemap.methods.options.Option`, which also make its report,
:meth:`Method.options`) and its capabilities as class attributes (``uses_layer``,
``needs_gradients``, ``sizes_own_chunks``, ``forwards_options_to``, ``wrap_aliases``,
``pass_kind``, ``passes_per_call``). It is registered by name with
:func:`evidencemap.methods.registry.register`.

The pipeline owns everything else: validation, eval mode restored afterwards, hooks for one
call, target resolution, ``torch.autograd.grad`` to the layer tensors only (no parameter
``.grad`` is touched), ReLU, N-d upsampling, fusion of several layers and normalisation; the
call itself (chunks, memory budget, packaging) is :mod:`evidencemap.methods.call`.
"""

from __future__ import annotations

import threading
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn

from evidencemap.capture import record_outputs
from evidencemap.checks import ModelLike, check_model
from evidencemap.explanation import Explanation
from evidencemap.layers import LayerSpec, find_spatial_layer, layer_names, resolve_layers
from evidencemap.maps import FLAT_EPS, normalize, upsample
from evidencemap.methods.call import Context, MethodCall, graph_bytes
from evidencemap.methods.options import Option, options_of, report_value, reported_options
from evidencemap.targets import OutputKey, ResolvedTarget, Target, resolve
from evidencemap.tokens import GridLayout, resolve_layout, to_grid

__all__ = [
    "Attribution",
    "Context",
    "FlatMapWarning",
    "InputMethod",
    "LayerMethod",
    "Method",
    "gradients_of",
    "weighted_sum",
]


class FlatMapWarning(UserWarning):
    """A map came out flat (the same value everywhere, all zeros after ReLU): it shows nothing."""


def gradients_of(grads: Tensor | None) -> Tensor:
    """``grads`` of a method that declared ``needs_gradients`` (never ``None`` there)."""
    if grads is None:
        raise RuntimeError("this method needs gradients but the pipeline computed none")
    return grads


def weighted_sum(acts: Tensor, weights: Tensor) -> Tensor:
    """``Σ_k w_k A_k``: activations ``(N, K, *s)``, weights ``(N, K)`` → ``(N, 1, *s)``."""
    w = weights.view(*weights.shape, *([1] * (acts.ndim - 2)))
    return (w * acts).sum(dim=1, keepdim=True)


class Method(MethodCall):
    """Base of every method: ``Method(model, **options)(inputs, target=None) -> Explanation``.

    Args:
        model: any ``nn.Module`` taking ``(N, C, *S)`` inputs (or a
            :class:`~evidencemap.models.LoadedModel`: its module).
        output_key: which element of a tuple/list/mapping output to explain (default: the
            first element / ``logits``).
        eval_mode: run the model in eval mode (every module's flag restored afterwards; with
            ``False``, BatchNorm running statistics are restored too).
        batch_size: explain at most this many inputs at a time (``None``: all at once, or as
            many as the run's memory budget holds, :mod:`evidencemap.methods.call`).
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    uses_layer: ClassVar[bool] = False
    """The method reads a layer (its constructor takes ``layer``)."""
    needs_gradients: ClassVar[bool] = True
    """The method backpropagates through the model."""
    needs_attention: ClassVar[bool] = False
    """The method reads a transformer's attention (it explains models with attention layers
    only; the registry tests run it on ViTs)."""
    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option(
            "output_key",
            "any",
            None,
            "which element of a tuple/list/dict model output to explain",
            other="an int index or a string key",
            nullable=True,
        ),
        Option("eval_mode", "bool", True, "run the model in eval mode (flags restored after)"),
        Option(
            "batch_size",
            "int",
            None,
            "explain at most this many inputs per pass",
            low=1,
            nullable=True,
            cost="chunk",
            reported=False,
        ),
    )
    pass_kind: ClassVar[str] = "input"
    """The kind of model pass the method's cost is counted in: ``"layer"``, ``"input"`` or
    ``"forward"`` (:mod:`evidencemap.methods.passes`)."""
    passes_per_call: ClassVar[float] = 1.0
    """Passes of that kind per call and class, times the value of the option declared with
    ``passes=True`` when there is one."""
    forwards_options_to: ClassVar[str] = ""
    """The option naming a wrapped method (SmoothGrad's ``method``), or ``""``: the method
    also takes that method's options, and each counted pass calls it once (its passes multiply
    the count, its kind replaces ``pass_kind``)."""
    wrap_aliases: ClassVar[tuple[str, ...]] = ()
    """Other options that name the wrapped method too (SmoothGrad's ``wrap``, for
    :func:`evidencemap.explain` whose own ``method`` argument names SmoothGrad); a value given
    to one of them replaces :attr:`forwards_options_to`'s."""

    @classmethod
    def unsupported(cls, model: nn.Module, *, compiled: bool = False) -> str | None:
        """Why this method cannot explain ``model``, or ``None`` when it can.

        A static check (no forward pass), used to offer only the methods that apply (the
        service's page, ``evidencemap evaluate``'s default methods). The default: a method that
        reads a layer through forward hooks (:attr:`uses_layer`) cannot explain a compiled
        (TorchScript) model, whose submodules run compiled code and never call the hooks.

        Args:
            model: the module to explain (``LoadedModel.module``).
            compiled: whether it is a TorchScript module.
        """
        if compiled and cls.uses_layer:
            return "it reads a layer through forward hooks, which TorchScript models never run"
        return None

    def __init__(
        self,
        model: nn.Module | ModelLike,
        *,
        output_key: OutputKey = None,
        eval_mode: bool = True,
        batch_size: int | None = None,
    ) -> None:
        self.model = check_model(model)
        self.output_key = output_key
        self.eval_mode = self.option("eval_mode", eval_mode)
        self.batch_size = self.option("batch_size", batch_size)

    @classmethod
    def option(cls, name: str, value: Any) -> Any:
        """``value`` of option ``name`` validated by its :class:`Option` description.

        Raises:
            TypeError / ValueError: naming the option, for a value it does not accept.
        """
        return options_of(cls)[name].check(value)

    @property
    def hooks_layers(self) -> bool:
        """Whether this instance reads a layer through forward hooks (not possible on
        TorchScript models, whose submodules run compiled code)."""
        return self.uses_layer

    def options(self) -> dict[str, Any]:
        """The options this method runs with (reported in :class:`Explanation`).

        Derived from the declarations: every option an ``OPTIONS`` of the class or a base
        describes with ``reported=True`` (:attr:`Option.reported`), base classes first, each
        read from the instance's attribute of the same name and written by
        :func:`~evidencemap.methods.options.report_value` (a tensor as ``"tensor"``, a set as a
        sorted list). Override to report differently.

        Raises:
            AttributeError: for a reported option the instance keeps no attribute of.
        """
        found: dict[str, Any] = {}
        for option in reported_options(type(self)):
            try:
                value = getattr(self, option.name)
            except AttributeError:
                raise AttributeError(
                    f"method {self.name!r} declares option {option.name!r} but keeps no "
                    f"attribute {option.name!r}: set it in __init__, declare the option with "
                    "reported=False, or override options()"
                ) from None
            found[option.name] = report_value(value)
        return found


class LayerMethod(Method):
    """A method that explains the activations ``A`` of one or more layers.

    Args:
        model: the model.
        layer: a module, a dotted name, a list of them (maps fused by their mean), or ``None``
            for the last module whose output has spatial axes (found in the same forward pass).
        relu: apply ``ReLU`` to the layer map (keep only positive evidence).
        gradient_noise: standard deviation σ of Gaussian noise added to the layer gradients
            ``g ← g + σ·ε`` (``ε ~ N(0, 1)``) before a method computes its weights, for
            robustness studies; 0 (default) adds nothing. Gradient methods only.
        noise_seed: seed of that noise (``None``: torch's global generator); every call with the
            same seed and batch draws the same noise.
        output_key / eval_mode / batch_size: see :class:`Method`.

    Raises:
        ValueError: for a negative or non-finite ``gradient_noise``, or noise asked of a method
            that uses no gradients.
    """

    uses_layer: ClassVar[bool] = True
    needs_gradients: ClassVar[bool] = True
    token_layers: ClassVar[bool] = True
    """Whether it explains token layers ``(N, T, C)`` (the pipeline turns them into grids); a
    method that reruns the network from the layer on its own says ``False``."""
    draws_noise: ClassVar[bool] = False
    """Whether the method draws noise of its own (Smooth Grad-CAM++, SS-CAM), seeded by
    ``noise_seed``: the seed is then always reported, and since one draw covers every input of
    the batch, a batch is not split."""
    pass_kind: ClassVar[str] = "layer"
    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option("relu", "bool", True, "keep only positive evidence (ReLU of the layer map)"),
        Option(
            "gradient_noise",
            "float",
            0.0,
            "σ of Gaussian noise added to the layer gradients (robustness studies)",
            low=0.0,
        ),
        Option("noise_seed", "int", None, "seed of that noise", nullable=True),
    )

    def __init__(
        self,
        model: nn.Module,
        layer: LayerSpec = None,
        *,
        relu: bool = True,
        gradient_noise: float = 0.0,
        noise_seed: int | None = None,
        output_key: OutputKey = None,
        eval_mode: bool = True,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(model, output_key=output_key, eval_mode=eval_mode, batch_size=batch_size)
        self.gradient_noise = _check_noise(gradient_noise, self.needs_gradients)
        self.noise_seed = noise_seed
        self.layers = resolve_layers(self.model, layer)
        self.relu = self.option("relu", relu)

    def options(self) -> dict[str, Any]:
        """The declared options (:meth:`Method.options`); the gradient noise and its seed only
        when noise is added (the seed always when the method :attr:`draws_noise`)."""
        options = super().options()
        if not self.gradient_noise:
            options.pop("gradient_noise", None)
            options.pop("noise_seed", None)
        if self.draws_noise:
            options["noise_seed"] = self.noise_seed
        return options

    def flat_map_reason(self) -> str:
        """Why this method's map may come out flat, for :class:`FlatMapWarning` (a method with
        a variant that often does, e.g. counterfactual Grad-CAM, says so)."""
        if self.relu:
            return (
                "every position of the layer map is <= 0, which ReLU sets to 0 (no positive "
                "evidence for the target at this layer)"
            )
        return "the layer map is constant"

    def check_result(self, explanation: Explanation) -> None:
        """Warn (:class:`FlatMapWarning`) when a sample's map is flat, and record it as FGVis
        does: ``extras["degenerate"]`` ``(N,)`` flags and ``extras["warning"]`` the message
        (:meth:`~evidencemap.Explanation.warning`). A flat map normalises to all zeros and
        shows nothing."""
        maps = explanation.maps.flatten(1)
        flat = (maps.amax(1) - maps.amin(1)) <= FLAT_EPS
        if not bool(flat.any()):
            return
        rows = [int(i) for i in flat.nonzero().flatten()]
        tries = "relu=False (the signed map), another layer" if self.relu else "another layer"
        message = (
            f"{self.name}: the map of sample{'s' if len(rows) > 1 else ''} "
            f"{', '.join(map(str, rows))} is flat (all zeros): {self.flat_map_reason()}; "
            f"try {tries} or another target"
        )
        explanation.extras.setdefault("degenerate", flat)
        explanation.extras.setdefault("warning", message)
        warnings.warn(message, FlatMapWarning, stacklevel=3)

    @property
    def batch_independent(self) -> bool:
        """Gradient noise, and the noise of a method that :attr:`draws_noise`, is drawn for the
        whole batch at once: a batch with it is not split."""
        return not self.gradient_noise and not self.draws_noise

    def input_bytes(self, x: Tensor) -> int:
        """What the pass keeps for its backward (see :meth:`Method.input_bytes`): nothing
        without gradients (the layer's activations are read in a forward pass without a graph),
        the graph from the layer on with one layer (found first on ``x[:1]``, as the run would,
        when none is named), else the whole graph."""
        if not self.needs_gradients:
            return 0
        one = x[:1]
        modules = self._layers_for(one)
        if not modules:
            with torch.no_grad():
                self.capture(one)
            modules = self._layers_for(one)
        if len(modules) != 1:
            return super().input_bytes(one)
        layer = modules[0]

        def from_layer(leaf: Tensor) -> Tensor:
            return _forward_from_layer(self, leaf, layer)[0]

        return graph_bytes(self, one, ("layer", id(layer)), from_layer)

    # -- what a method supplies ---------------------------------------------------------------
    def channel_weights(self, acts: Tensor, grads: Tensor | None, context: Context) -> Tensor:
        """Channel weights ``(N, K)`` for ``Σ_k w_k A_k``."""
        raise NotImplementedError

    def layer_map(self, acts: Tensor, grads: Tensor | None, context: Context) -> Tensor:
        """The map ``(N, 1, *s)`` of one layer; default ``Σ_k w_k A_k``."""
        return weighted_sum(acts, self.channel_weights(acts, grads, context))

    # -- the pipeline -------------------------------------------------------------------------
    def _layers_for(self, x: Tensor) -> list[nn.Module]:
        if self.layers:
            return self.layers
        cached = _AUTO_LAYERS.get(self.model, {}).get(x.ndim)
        if cached is not None and any(m is cached for m in self.model.modules()):
            return [cached]
        return []

    def capture(self, x: Tensor) -> tuple[Tensor, list[nn.Module], list[Tensor]]:
        """One forward pass recording the layers' outputs: ``(output, modules, activations)``.

        With one known layer and gradients needed, the part of the network before the layer
        runs without an autograd graph: the layer's output becomes a leaf that requires grad,
        so the backward pass and the graph's memory cover only what follows the layer.

        Raises:
            ValueError: for a layer whose output has neither the inputs' spatial axes nor a
                token grid (:mod:`evidencemap.tokens`).
        """
        output, modules, acts, _ = self._capture(x)
        return output, modules, acts

    def _capture(self, x: Tensor) -> tuple[Tensor, list[nn.Module], list[Tensor], list[GridLayout]]:
        """:meth:`capture` and the layout of each layer's output, worked out once."""
        modules = self._layers_for(x)
        if not modules:
            box: list[Tensor] = []

            def run(grad: bool = False) -> Tensor:
                with torch.set_grad_enabled(grad or torch.is_grad_enabled()):
                    box.append(self.forward(x if not grad else x.detach().requires_grad_(True)))
                return box[-1]

            module, act = find_spatial_layer(
                self.model, x.ndim, run, input_shape=tuple(x.shape), grad_forward=lambda: run(True)
            )
            _AUTO_LAYERS.setdefault(self.model, {})[x.ndim] = module
            output, modules, acts = box[-1], [module], [act]
        elif len(modules) == 1 and self.needs_gradients:
            output, act = _forward_from_layer(self, x, modules[0])
            acts = [act]
        else:
            with record_outputs(modules) as recorded:
                output = self.forward(x)
            missing = [m for m in modules if m not in recorded]
            if missing:
                raise ValueError(
                    f"layer {type(missing[0]).__name__} did not produce a tensor in the forward pass"
                )
            acts = [recorded[m] for m in modules]
        return output, modules, acts, self._grid_layouts(x, modules, acts)

    def _grid_layouts(
        self, x: Tensor, modules: list[nn.Module], acts: list[Tensor]
    ) -> list[GridLayout]:
        """The layout of each layer's output (:mod:`evidencemap.tokens`): named through
        ``Tokens`` in ``layer=``, else detected."""
        named = getattr(self.layers, "layouts", {})
        found: list[GridLayout] = []
        for module, act in zip(modules, acts, strict=True):
            layout = resolve_layout(tuple(act.shape), tuple(x.shape), named.get(module))
            if layout is None:
                raise ValueError(
                    f"layer {type(module).__name__} has output shape {tuple(act.shape)} without the "
                    f"spatial axes of the inputs {tuple(x.shape)} (nor a token grid); choose a "
                    "convolutional or token layer, or name its layout with Tokens(layer, ...)"
                )
            if layout.kind != "channels_first" and not self.token_layers:
                raise ValueError(
                    f"{self.name} cannot explain layer {type(module).__name__} with output shape "
                    f"{tuple(act.shape)} ({layout.kind} layout): it reruns the network from the "
                    "layer's raw output; choose a convolutional layer or another CAM"
                )
            found.append(layout)
        return found

    def explain_batch(self, inputs: Tensor, target: Target) -> Explanation:
        x = inputs.requires_grad_(self.needs_gradients)
        with torch.set_grad_enabled(self.needs_gradients):
            output, modules, acts, layouts = self._capture(x)
            resolved = resolve(target, output)
            scores = resolved.score(output)
            grads: list[Tensor | None] = [None] * len(acts)
            if self.needs_gradients:
                got = torch.autograd.grad(scores.sum(), acts, allow_unused=True)
                found = [
                    torch.zeros_like(a) if g is None else g for a, g in zip(acts, got, strict=False)
                ]
                if self.gradient_noise:
                    found = _add_noise(found, self.gradient_noise, self.noise_seed)
                grads = list(found)
        # Token / channels-last outputs as (N, C, *grid); the gradients (taken w.r.t. the real
        # outputs) go through the same linear index map, so they stay exact.
        acts = [to_grid(a, lay) for a, lay in zip(acts, layouts, strict=True)]
        grads = [
            None if g is None else to_grid(g, lay) for g, lay in zip(grads, layouts, strict=True)
        ]
        converted = [lay.describe() for lay in layouts if lay.kind != "channels_first"]
        context = Context(self.model, x.detach(), output.detach(), resolved, None, self.forward)
        raws: list[Tensor] = []
        ups: list[Tensor] = []
        for module, act, grad in zip(modules, acts, grads, strict=False):
            context.layer = module
            raw = self.layer_map(act.detach(), None if grad is None else grad.detach(), context)
            if self.relu:
                raw = raw.clamp(min=0)
            raws.append(raw)
            ups.append(upsample(raw, x.shape[2:]))
        maps = ups[0] if len(ups) == 1 else torch.stack([normalize(u) for u in ups]).mean(0)
        names = layer_names(self.model)
        layer: str | list[str] = [names[m] for m in modules]
        raws_out: Tensor | list[Tensor] = raws
        if len(modules) == 1:
            layer, raws_out = layer[0], raws[0]
        extras = (
            {"tokens": converted[0] if len(converted) == 1 else converted} if converted else None
        )
        return self.finish(raws_out, maps, context, scores, layer=layer, extras=extras)


# Automatically found layers, per model and input rank (weak keys: models are not kept alive).
_AUTO_LAYERS: WeakKeyDictionary[nn.Module, dict[int, nn.Module]] = WeakKeyDictionary()


def _forward_from_layer(method: Method, x: Tensor, layer: nn.Module) -> tuple[Tensor, Tensor]:
    """Forward ``x`` with autograd recording only from ``layer``'s output on.

    Returns ``(output, activation)`` where the activation is the layer's (last) output and
    requires grad. The first call of the layer turns grad mode on and hands the model a copy of
    a detached leaf (so in-place ops after the layer never touch the leaf).
    """
    owner = threading.get_ident()
    recorded: list[Tensor] = []

    def hook(_module: nn.Module, _args: Any, output: Any) -> Tensor | None:
        if threading.get_ident() != owner or not isinstance(output, Tensor):
            return None
        if recorded:  # a module reused in one forward: keep its last call
            recorded.append(output)
            return None
        torch.set_grad_enabled(True)
        leaf = output.detach().requires_grad_(True)
        recorded.append(leaf)
        return leaf.clone()

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():  # restores the caller's grad mode on exit
            output = method.forward(x)
    finally:
        handle.remove()
    if not recorded:
        raise ValueError(
            f"layer {type(layer).__name__} did not produce a tensor in the forward pass"
        )
    return output, recorded[-1]


def _check_noise(value: Any, needs_gradients: bool) -> float:
    """Validate ``gradient_noise`` (a finite float ≥ 0, only for gradient methods)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"gradient_noise must be a number, got {type(value).__name__}")
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"gradient_noise must be a finite number >= 0, got {value}")
    if value and not needs_gradients:
        raise ValueError("gradient_noise needs a method that uses gradients")
    return float(value)


def _add_noise(grads: list[Tensor], sigma: float, seed: int | None) -> list[Tensor]:
    """``g + σ·ε`` per layer, ``ε ~ N(0, 1)`` drawn on the CPU (same noise on every device)."""
    gen = None if seed is None else torch.Generator().manual_seed(int(seed))
    return [
        g + sigma * torch.randn(g.shape, generator=gen, dtype=g.dtype).to(g.device) for g in grads
    ]


@dataclass
class Attribution:
    """What an input-space method computed for one batch, before the shared packaging.

    Attributes:
        raw: ``(N, C, *S)`` per-channel attributions.
        output: the model's output on the inputs (detached).
        target: the resolved target.
        scores: ``(N,)`` the target's scores on the inputs.
        extras: method-specific results.
        layer: the layer a hybrid method (Guided Grad-CAM) read, or ``None``.
    """

    raw: Tensor
    output: Tensor
    target: ResolvedTarget
    scores: Tensor
    extras: dict[str, Any] = field(default_factory=dict)
    layer: str | list[str] | None = None


class InputMethod(Method):
    """A method whose ``raw`` is per-channel attributions ``(N, C, *S)`` in input space.

    The template: a subclass implements :meth:`attribute` (the attributions and the target it
    resolved on the way) and may override :meth:`reduce` (the channel reduction of the map);
    :meth:`explain_batch` packages the result the same way for all of them.
    """

    pass_kind: ClassVar[str] = "input"

    def attribute(self, x: Tensor, target: Target) -> Attribution:
        """The attributions of ``x`` ``(N, C, *S)`` for ``target``."""
        raise NotImplementedError

    def reduce(self, raw: Tensor) -> Tensor:
        """The map ``(N, 1, *S)`` of ``raw``; default ``max_c |raw_c|``."""
        return raw.abs().amax(dim=1, keepdim=True)

    def explain_batch(self, inputs: Tensor, target: Target) -> Explanation:
        x = inputs.detach()
        got = self.attribute(x, target)
        context = Context(self.model, x, got.output, got.target, None, self.forward)
        return self.finish(
            got.raw, self.reduce(got.raw), context, got.scores, layer=got.layer, extras=got.extras
        )

    def input_gradients(
        self, x: Tensor, target: Target, rule: AbstractContextManager[Any] | None = None
    ) -> Attribution:
        """``∂y/∂x`` with the target it resolved; the forward pass runs inside ``rule`` when one
        is given (a context that changes backward rules, e.g.
        :func:`evidencemap.methods.gradients.guided`)."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            with rule if rule is not None else nullcontext():
                output = self.forward(x)
            resolved = resolve(target, output)
            scores = resolved.score(output)
            (grads,) = torch.autograd.grad(scores.sum(), x)
        return Attribution(grads, output.detach(), resolved, scores.detach())
