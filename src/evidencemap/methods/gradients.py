"""Gradient methods in input space: saliency, guided backprop, Guided Grad-CAM, Integrated
Gradients, and SmoothGrad over any method of the library.

Notation: ``x ∈ R^{N×C×S}`` the inputs (``S`` = 2-D or 3-D spatial axes), ``y = F(x)`` the target
score of each sample (a logit by default). Every input-space method returns ``raw`` = per-channel
attributions ``(N, C, *S)`` and ``maps`` = a channel reduction ``(N, 1, *S)`` of them, min-max
normalised per sample:

==================  ==========================================  ===============================
method              ``raw``                                     ``maps`` (before normalising)
==================  ==========================================  ===============================
saliency            ``|∂y/∂x|`` (``abs=False``: ``∂y/∂x``)      ``max_c |∂y/∂x_c|``
guided_backprop     guided gradient ``R`` (below)               ``max_c |R_c|``
guided_gradcam      ``R ⊙ Up(Grad-CAM)``                        ``max_c |raw_c|``
integrated_grad.    ``IG`` (below)                              ``ReLU(Σ_c IG_c)`` or ``|Σ_c IG_c|``
smoothgrad          ``E_ε[raw_M(x + ε)]`` of a wrapped ``M``    ``M``'s map of that
smoothgrad_sq       ``E_ε[raw_M(x + ε)²]``                      ``M``'s map of that
vargrad             ``Var_ε[raw_M(x + ε)]``                     ``M``'s map of that
input_x_gradient    ``x ⊙ ∂y/∂x``                               ``ReLU(Σ_c raw_c)`` or ``|Σ_c raw_c|``
deconvnet           deconvnet gradient ``R`` (``max(R, 0)``)    ``max_c |R_c|``
deeplift            ``(x − r) ⊙ ∂̃y/∂x`` (rescale rule)         ``ReLU(Σ_c raw_c)`` or ``|Σ_c raw_c|``
gradient_shap       ``E[(x̃ − b) ⊙ ∇F(b + α(x̃ − b))]``         ``ReLU(Σ_c raw_c)`` or ``|Σ_c raw_c|``
==================  ==========================================  ===============================

Input × Gradient and GradientSHAP are in :mod:`evidencemap.methods.attribution`, Deconvnet in
:mod:`evidencemap.methods.deconvnet`, DeepLIFT in :mod:`evidencemap.methods.deeplift`. Signed
attributions stay in ``raw``; only the map takes a sign or an absolute value.

Guided backprop changes the backward rule per nonlinearity *call* through
:class:`evidencemap.capture.NonlinearityInterceptor` and :class:`~evidencemap.capture.GradientGate`
(nothing in torch or in the model is replaced): the gradient arriving at the output ``h`` of every
rectifier-type nonlinearity (:data:`GUIDED_NONLINEARITIES`) becomes ``1[h > 0]·max(R, 0)``, and
autograd then applies the nonlinearity's own derivative. For ReLU this is exactly Springenberg et
al.'s ``R^l = 1[f^l > 0]·1[R^{l+1} > 0]·R^{l+1}``; for ReLU6 it also zeroes the saturated region
(``x > 6``, derivative 0); for SiLU/GELU/Mish/… it keeps positive gradients where the output is
positive, scaled by the local derivative. Gating and squashing functions (sigmoid, tanh,
hardsigmoid) keep their ordinary gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from evidencemap import runtime
from evidencemap.capture import NONLINEARITIES, GradientGate, NonlinearityInterceptor
from evidencemap.checks import check_positive_int
from evidencemap.explanation import Explanation
from evidencemap.layers import LayerSpec
from evidencemap.maps import FLAT_EPS, normalize, upsample
from evidencemap.methods.base import Attribution, Context, InputMethod, LayerMethod, Method
from evidencemap.methods.call import graph_bytes
from evidencemap.methods.cam import GradCAM
from evidencemap.methods.options import BLUR_SIGMA, MEMORY_BUDGET, Option, batch_option
from evidencemap.methods.registry import build, register
from evidencemap.references import REFERENCES, check_reference, reference_image
from evidencemap.targets import ResolvedTarget, Target, resolve

__all__ = [
    "GUIDED_NONLINEARITIES",
    "IG_RULES",
    "Attribution",
    "GuidedBackprop",
    "GuidedGradCAM",
    "InputMethod",
    "IntegratedGradients",
    "Saliency",
    "SmoothGrad",
    "SmoothGradSquared",
    "VarGrad",
    "copy_bytes",
    "guided",
    "guided_rule",
    "path_points",
    "smoothgrad_noise",
]

GUIDED_NONLINEARITIES: frozenset[str] = frozenset(
    {
        "relu",
        "relu6",
        "hardtanh",
        "leaky_relu",
        "elu",
        "selu",
        "celu",
        "gelu",
        "silu",
        "mish",
        "hardswish",
        "softplus",
    }
)

IG_RULES = ("trapezoid", "midpoint")
AGGREGATES = ("mean", "square", "variance")
"""SmoothGrad's aggregations of the noisy copies' ``raw``: SmoothGrad, SmoothGrad², VarGrad."""
IG_SIGNS = ("positive", "absolute")


def guided_rule(h: Tensor, grad: Tensor) -> Tensor:
    """Guided backprop at a nonlinearity output ``h``: ``1[h > 0]·max(R, 0)``."""
    return grad.clamp(min=0) * (h > 0).to(grad.dtype)


@contextmanager
def guided(nonlinearities: Collection[str] = GUIDED_NONLINEARITIES) -> Iterator[None]:
    """Inside the block, forward passes use guided backprop's backward rule.

    Every call of a nonlinearity named in ``nonlinearities`` has its output wrapped in a
    :class:`GradientGate` with :func:`guided_rule`. Only forward passes inside the block are
    affected; their graph keeps the rule after the block ends (run the backward outside it).
    """
    names = frozenset(nonlinearities)

    def rule(_index: int, name: str, output: Tensor) -> Tensor:
        if name in names and output.requires_grad:
            return GradientGate.apply(output, guided_rule)
        return output

    with NonlinearityInterceptor(rule):
        yield


def _check_nonlinearities(value: Any) -> frozenset[str]:
    """Validate a collection of nonlinearity names (those the interceptor recognises)."""
    if isinstance(value, str) or not isinstance(value, Collection):
        raise TypeError(f"nonlinearities must be a collection of names, got {type(value).__name__}")
    names = frozenset(value)
    known = {n.rstrip("_") for n in NONLINEARITIES.values()}
    unknown = sorted(n for n in names if n not in known)
    if unknown:
        raise ValueError(f"unknown nonlinearities {unknown}; known: {sorted(known)}")
    return names


NONLINEARITIES_OPTION = Option(
    "nonlinearities",
    "any",
    GUIDED_NONLINEARITIES,
    "nonlinearities that get the guided rule",
    other="a list of nonlinearity names",
)


@register
class Saliency(InputMethod):
    """Vanilla gradient (Simonyan et al. 2014): ``raw = |∂y/∂x|``, ``map = max_c |∂y/∂x_c|``.

    Args:
        abs: report ``|∂y/∂x|`` in ``raw`` (default, as Captum's ``Saliency``) or the signed
            gradient.
    """

    name = "saliency"
    aliases: ClassVar[tuple[str, ...]] = ("gradient", "vanilla_gradient")
    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option("abs", "bool", True, "report |∂y/∂x| in raw (False: the signed gradient)"),
    )

    def __init__(self, model: nn.Module, *, abs: bool = True, **kw: Any) -> None:
        super().__init__(model, **kw)
        self.abs = self.option("abs", abs)

    def attribute(self, x: Tensor, target: Target) -> Attribution:
        got = self.input_gradients(x, target)
        if self.abs:
            got.raw = got.raw.abs()
        return got


class NonlinearityRuleMethod(InputMethod):
    """An input gradient whose rectifier-type nonlinearities get a replaced backward rule
    (guided backprop, Deconvnet): ``raw = R`` ``(N, C, *S)``, the gradient of ``y`` to the input
    with the rule applied at every call of the named nonlinearities; a subclass applies its rule
    in ``attribute``.

    Args:
        nonlinearities: names of the nonlinearities whose backward is replaced (default
            :data:`GUIDED_NONLINEARITIES`); a string or an unknown name raises.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        nonlinearities: Collection[str] = GUIDED_NONLINEARITIES,
        **kw: Any,
    ) -> None:
        super().__init__(model, **kw)
        self.nonlinearities = _check_nonlinearities(nonlinearities)


@register
class GuidedBackprop(NonlinearityRuleMethod):
    """Guided backpropagation (Springenberg et al. 2015); see the module docstring for the rule.

    Args:
        nonlinearities: names of the nonlinearities that get the guided rule (default
            :data:`GUIDED_NONLINEARITIES`).
    """

    name = "guided_backprop"
    aliases: ClassVar[tuple[str, ...]] = ("guided-backprop", "guidedbackprop")
    OPTIONS: ClassVar[tuple[Option, ...]] = (NONLINEARITIES_OPTION,)

    def attribute(self, x: Tensor, target: Target) -> Attribution:
        return self.input_gradients(x, target, guided(self.nonlinearities))


@register
class GuidedGradCAM(InputMethod):
    """Guided Grad-CAM (Selvaraju et al. 2017): ``raw = R ⊙ Up(L_GradCAM)`` per input channel.

    ``R`` is guided backprop, ``L_GradCAM`` the un-normalised Grad-CAM map of ``layer`` (after
    its ReLU), upsampled bilinearly/trilinearly to the input; with several layers their fused,
    normalised Grad-CAM map is used. ``map = max_c |raw_c|``. Two passes: a plain one for
    Grad-CAM and a guided one for ``R``.
    """

    name = "guided_gradcam"
    aliases: ClassVar[tuple[str, ...]] = ("guided-gradcam", "guided-grad-cam")
    uses_layer: ClassVar[bool] = True
    passes_per_call: ClassVar[float] = 2.0
    OPTIONS: ClassVar[tuple[Option, ...]] = (NONLINEARITIES_OPTION,)

    def __init__(
        self,
        model: nn.Module,
        layer: LayerSpec = None,
        *,
        nonlinearities: Collection[str] = GUIDED_NONLINEARITIES,
        **kw: Any,
    ) -> None:
        super().__init__(model, **kw)
        self.nonlinearities = _check_nonlinearities(nonlinearities)
        self.gradcam = GradCAM(model, layer, output_key=self.output_key, eval_mode=self.eval_mode)

    def attribute(self, x: Tensor, target: Target) -> Attribution:
        got = self.input_gradients(x, target, guided(self.nonlinearities))
        cam_target = got.target.classes if got.target.classes is not None else target
        cam = self.gradcam.explain_batch(x.detach().clone(), cam_target)
        cam_map = cam.maps if isinstance(cam.raw, list) else upsample(cam.raw, x.shape[2:])
        got.raw = got.raw * cam_map
        got.layer = cam.layer
        return got


def path_points(steps: int, rule: str = "trapezoid") -> tuple[Tensor, Tensor]:
    """Riemann points ``α`` and weights ``w`` (float64, ``(steps,)``) on [0, 1], ``Σ w = 1``.

    ``"trapezoid"``: ``α_i = i/(m−1)``, ``w = 1/(m−1)`` halved at both ends (``m ≥ 2``; exact for
    linear integrands). ``"midpoint"``: ``α_i = (i + ½)/m``, ``w = 1/m`` (``m ≥ 1``).

    Raises:
        ValueError: for an unknown rule or too few steps.
    """
    steps = check_positive_int(steps, "steps")
    if rule not in IG_RULES:
        raise ValueError(f"rule must be one of {IG_RULES}, got {rule!r}")
    if rule == "midpoint":
        alphas = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
        return alphas, torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    if steps < 2:
        raise ValueError(f"steps must be >= 2 for the trapezoid rule, got {steps}")
    alphas = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    weights = torch.full((steps,), 1.0 / (steps - 1), dtype=torch.float64)
    weights[0] /= 2
    weights[-1] /= 2
    return alphas, weights


def copy_bytes(method: Method, x: Tensor, budget: int | None, backward: bool = True) -> int:
    """Memory of one more copy of the batch ``x`` in a chunk of ``method``'s forward passes.

    ``2·|x|`` (the perturbed inputs and their noise, path step or gradient) plus, when
    ``backward`` and a memory budget is in force (the run's or ``budget``), what autograd saves
    for the backward pass of one copy: ``N`` times that of one input
    (:func:`evidencemap.methods.call.graph_bytes`: one extra forward pass of one input, only
    made when a budget needs the number, once per model and input shape). On a deep network
    the latter dominates: 175 MB against 1.5 MB for a 64×64×48 volume through a 3-D ResNet-152.
    """
    inputs = 2 * x.numel() * x.element_size()
    if not backward or (budget is None and runtime.current().memory_budget is None):
        return inputs
    return inputs + x.shape[0] * graph_bytes(method, x, ("input",), method.forward)


def _slice_scores(resolved: ResolvedTarget, n: int) -> Callable[[Tensor], Tensor]:
    """Score of an output holding whole copies of an ``n``-sample batch, copy by copy."""

    def score(output: Tensor) -> Tensor:
        return torch.cat([resolved.score(part) for part in output.split(n)])

    return score


@register
class IntegratedGradients(InputMethod):
    """Integrated Gradients (Sundararajan et al. 2017).

    ``IG_i = (x_i − x'_i) · Σ_s w_s ∂F(x' + α_s (x − x'))/∂x_i`` with the Riemann points of
    :func:`path_points`. Completeness ``Σ_i IG_i ≈ F(x) − F(x')`` is checked and reported in
    ``extras``: ``completeness_gap = Σ IG − (F(x) − F(x'))`` (absolute, per sample),
    ``completeness_relative = |gap| / |F(x) − F(x')|`` and ``baseline_score = F(x')``.

    Args:
        baseline: ``"zero"`` (0 in the model's normalised input space; also ``None``), ``"blur"``
            (the input blurred by a Gaussian of ``blur_sigma`` pixels, mirror padding), or a
            tensor of shape ``(N, C, *S)``, ``(1, C, *S)`` or ``(C, *S)``.
        steps: number of gradient evaluations ``m``.
        rule: ``"trapezoid"`` (default) or ``"midpoint"``.
        blur_sigma: standard deviation of the ``"blur"`` baseline, in pixels.
        internal_batch_size: path points per forward/backward pass; a chunk holds whole copies
            of the batch, so at least ``N`` points (use ``batch_size`` to bound ``N``).
        memory_budget: bytes one chunk of path inputs may take, with what their backward pass
            holds (``None``: no limit of its own; :func:`copy_bytes`).
        sign: the map is ``ReLU(Σ_c IG_c)`` (``"positive"``, evidence for the target) or
            ``|Σ_c IG_c|`` (``"absolute"``).

    Raises:
        ValueError / TypeError: for a bad baseline, steps, rule, sigma or sign.
    """

    name = "integrated_gradients"
    aliases: ClassVar[tuple[str, ...]] = ("ig", "integrated-gradients")
    sizes_own_chunks: ClassVar[bool] = True
    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option(
            "baseline",
            "str",
            "zero",
            "the path's start x' (evidencemap.references)",
            choices=REFERENCES,
            other="a number or a tensor (N | 1, C, *S) / (C, *S)",
            nullable=True,
        ),
        Option(
            "steps",
            "int",
            50,
            "gradient evaluations along the path",
            low=1,
            cost="work",
            cap=512,
            passes=True,
        ),
        Option("rule", "str", "trapezoid", "Riemann rule", choices=IG_RULES),
        BLUR_SIGMA,
        batch_option(32, "path points per forward/backward pass"),
        MEMORY_BUDGET,
        Option("sign", "str", "positive", "map of ReLU(ΣIG) or |ΣIG|", choices=IG_SIGNS),
    )

    def __init__(
        self,
        model: nn.Module,
        *,
        baseline: Tensor | str | float | None = "zero",
        steps: int = 50,
        rule: str = "trapezoid",
        blur_sigma: float = 10.0,
        internal_batch_size: int = 32,
        memory_budget: int | None = None,
        sign: str = "positive",
        **kw: Any,
    ) -> None:
        super().__init__(model, **kw)
        baseline = self.option("baseline", baseline)
        self.baseline = "zero" if baseline is None else check_reference(baseline, "baseline")
        self.steps = self.option("steps", steps)
        self.rule = self.option("rule", rule)
        self.alphas, self.weights = path_points(self.steps, rule)
        self.blur_sigma = self.option("blur_sigma", blur_sigma)
        self.internal_batch_size = self.option("internal_batch_size", internal_batch_size)
        self.memory_budget = self.option("memory_budget", memory_budget)
        self.sign = self.option("sign", sign)

    def reduce(self, raw: Tensor) -> Tensor:
        total = raw.sum(dim=1, keepdim=True)
        return total.clamp(min=0) if self.sign == "positive" else total.abs()

    def baseline_for(self, x: Tensor) -> Tensor:
        """The baseline ``x'`` ``(N, C, *S)`` for inputs ``x`` (:mod:`evidencemap.references`)."""
        return reference_image(x, self.baseline, blur_sigma=self.blur_sigma, name="baseline")

    def attribute(self, x: Tensor, target: Target) -> Attribution:
        n = x.shape[0]
        base = self.baseline_for(x)
        with torch.no_grad():
            output = self.forward(x)
            resolved = resolve(target, output)
            scores = resolved.score(output)
            base_scores = resolved.score(self.forward(base))
        score = _slice_scores(resolved, n)
        # whole copies of the batch per chunk: ≤ internal_batch_size inputs, ≤ the memory budget
        # (the path inputs, their gradients and what the backward pass saves, counted before any
        # work by one forward pass under a budget; the first copy's peak is measured as well)
        per_copy = copy_bytes(self, x, self.memory_budget)
        shape = (-1, *([1] * x.ndim))
        diff = x - base
        total = torch.zeros_like(x)
        # cast on the CPU first: devices such as MPS have no float64
        alphas = self.alphas.to(x.dtype).to(x.device)
        weights = self.weights.to(x.dtype).to(x.device)

        def step(start: int, stop: int) -> None:
            runtime.checkpoint(start, self.steps, "integrated_gradients")
            a = alphas[start:stop].view(shape)
            path = (base + a * diff).reshape(-1, *x.shape[1:]).requires_grad_(True)
            with torch.enable_grad():
                (grads,) = torch.autograd.grad(score(self.forward(path)).sum(), path)
            w = weights[start:stop].view(shape)
            total.add_((w * grads.view(-1, *x.shape)).sum(0))

        requested = max(1, self.internal_batch_size // n)
        runtime.run_chunked(
            self.steps, per_copy, requested, step, "path batches", self.memory_budget
        )
        attributions = diff * total
        delta = scores - base_scores
        gap = attributions.flatten(1).sum(1) - delta
        extras = {
            "completeness_gap": gap,
            "completeness_relative": gap.abs() / delta.abs().clamp(min=FLAT_EPS),
            "baseline_score": base_scores,
        }
        return Attribution(attributions, output.detach(), resolved, scores, extras)


def smoothgrad_noise(
    x: Tensor, samples: int, sigma: Tensor, seed: int | None, chunk: int | None = None
) -> Iterator[Tensor]:
    """Noise draws ``ε ~ N(0, σ_n²)`` per sample ``n``, ``chunk`` draws ``(k, N, C, *S)`` at a time.

    Copy ``i`` of every sample uses the same standard-normal draw ``z_i`` (of one sample's
    shape ``(C, *S)``), scaled by that sample's ``σ_n``: a sample gets the noise it gets when
    explained alone, whatever else is in its batch, so a batch can be split (by a memory budget,
    ``batch_size``) without changing any map. Drawn on the CPU one draw after the other from
    one generator (so the noise is the same on every device and for every chunking), then
    moved to ``x``'s device. Only one chunk exists at a time.
    """
    gen = None if seed is None else torch.Generator().manual_seed(int(seed))
    chunk = samples if chunk is None else max(1, chunk)
    scale = sigma.view(1, -1, *([1] * (x.ndim - 1)))
    for start in range(0, samples, chunk):
        k = min(chunk, samples - start)
        draws = torch.stack(
            [torch.randn(x.shape[1:], generator=gen, dtype=x.dtype) for _ in range(k)]
        )
        yield draws.to(x.device).unsqueeze(1) * scale


@register
class SmoothGrad(Method):
    """SmoothGrad (Smilkov et al. 2017) over any method of the library.

    ``M̂(x) = normalise((1/n) Σ_i M(x + ε_i))``, ``ε_i ~ N(0, σ²)``, ``σ = sigma·(max x − min x)``
    per sample. ``M`` is the wrapped method's *un-normalised* output: its ``raw`` is averaged
    over the noisy copies (per-channel attributions for input methods, the layer map for CAMs)
    and the map is then made from the average as the method does it (channel reduction,
    resp. upsampling) and normalised. The target is resolved once on the clean inputs (noisy
    copies explain the same class). Noisy copies are stacked and the wrapped method runs once
    per chunk of ``internal_batch_size`` inputs (whole copies of the batch, fewer when the run's
    memory budget asks for it); the noise is drawn chunk by chunk.

    Args:
        model: the model.
        layer: the layer of a wrapped layer method (``None``: its default).
        method: a method name (built with ``**method_options``) or a :class:`Method` instance on
            the same model.
        wrap: the same as ``method``, for :func:`evidencemap.explain` (whose own ``method``
            argument names SmoothGrad): ``explain(model, x, "smoothgrad", wrap="gradcam")``.
        samples: number of noisy copies ``n``.
        sigma: noise level as a fraction of each input's value range (0 → the wrapped method).
        seed: seed of the noise (``None``: torch's global generator).
        internal_batch_size: noisy inputs per call of the wrapped method.
        memory_budget: bytes one chunk may take: the noisy inputs and, for a wrapped method
            that backpropagates, what its backward pass holds (``None``: no limit of its own;
            the run's budget applies too, :func:`copy_bytes`).
        aggregate: how the copies' ``raw`` are combined: ``"mean"`` (SmoothGrad,
            ``E[raw]``), ``"square"`` (SmoothGrad², ``E[raw²]``) or ``"variance"`` (VarGrad,
            ``E[raw²] − E[raw]²``, population variance); the map is made from the result as
            from the mean. Registered as ``smoothgrad_sq`` and ``vargrad`` with that default.

    Raises:
        TypeError / ValueError: for a bad method, samples, sigma or a layer given to a method
            that takes none.
    """

    name = "smoothgrad"
    aliases: ClassVar[tuple[str, ...]] = ("smooth-grad",)
    uses_layer: ClassVar[bool] = True
    forwards_options_to: ClassVar[str] = "method"
    wrap_aliases: ClassVar[tuple[str, ...]] = ("wrap",)
    sizes_own_chunks: ClassVar[bool] = True
    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option(
            "method",
            "str",
            "saliency",
            "the method averaged over noisy copies (its options are accepted too)",
            other="a Method instance",
        ),
        Option(
            "wrap",
            "str",
            None,
            "the same as method",
            other="a Method instance",
            nullable=True,
            reported=False,
        ),
        Option("samples", "int", 25, "noisy copies", low=1, cost="work", cap=200, passes=True),
        Option("sigma", "float", 0.15, "noise σ as a fraction of the input's range", low=0.0),
        Option("seed", "int", 0, "seed of the noise", nullable=True),
        batch_option(32, "noisy inputs per call of the wrapped method"),
        MEMORY_BUDGET,
        Option(
            "aggregate",
            "str",
            "mean",
            "mean of the copies' raw, mean of its square (SmoothGrad²) or its variance (VarGrad)",
            choices=AGGREGATES,
        ),
    )

    def __init__(
        self,
        model: nn.Module,
        layer: LayerSpec = None,
        *,
        method: str | Method = "saliency",
        wrap: str | Method | None = None,
        samples: int = 25,
        sigma: float = 0.15,
        seed: int | None = 0,
        internal_batch_size: int = 32,
        memory_budget: int | None = None,
        aggregate: str = "mean",
        output_key: Any = None,
        eval_mode: bool = True,
        batch_size: int | None = None,
        **method_options: Any,
    ) -> None:
        super().__init__(model, output_key=output_key, eval_mode=eval_mode, batch_size=batch_size)
        if wrap is not None:
            if method != "saliency":
                raise ValueError("pass the wrapped method as method= or wrap=, not both")
            method = wrap
        if isinstance(method, Method):
            if method.model is not self.model:
                raise ValueError("method must be an instance built on the same model")
            if layer is not None or method_options:
                raise ValueError("pass layer and options to the method instance, not to SmoothGrad")
            self.method = method
        elif isinstance(method, str):
            common = {"output_key": output_key, "eval_mode": eval_mode, **method_options}
            self.method = build(method, model, layer, **common)
        else:
            raise TypeError(
                f"method must be a method name or a Method, got {type(method).__name__}"
            )
        if isinstance(self.method, SmoothGrad):
            raise ValueError("SmoothGrad cannot wrap SmoothGrad")
        self.output_key = self.method.output_key
        self.samples = self.option("samples", samples)
        self.sigma = self.option("sigma", sigma)
        self.seed = self.option("seed", seed)
        self.internal_batch_size = self.option("internal_batch_size", internal_batch_size)
        self.memory_budget = self.option("memory_budget", memory_budget)
        self.aggregate = self.option("aggregate", aggregate)

    @property
    def hooks_layers(self) -> bool:
        """Whether the wrapped method reads a layer through hooks."""
        return self.method.hooks_layers

    @property
    def batch_independent(self) -> bool:
        """Each sample's noise does not depend on its batch (:func:`smoothgrad_noise`), so a
        batch can be split when the wrapped method's batch can."""
        return self.method.batch_independent

    def options(self) -> dict[str, Any]:
        """The declared options, with the wrapped method's name and its own report."""
        return {
            **super().options(),
            "method": self.method.name,
            "method_options": self.method.options(),
        }

    def map_of(self, raw: Tensor | list[Tensor], x: Tensor) -> Tensor:
        """The wrapped method's un-normalised map ``(N, 1, *S)`` made from (averaged) ``raw``."""
        if isinstance(self.method, LayerMethod):
            layers = raw if isinstance(raw, list) else [raw]
            ups = [upsample(r, x.shape[2:]) for r in layers]
            return ups[0] if len(ups) == 1 else torch.stack([normalize(u) for u in ups]).mean(0)
        if isinstance(self.method, InputMethod) and isinstance(raw, Tensor):
            return self.method.reduce(raw)
        if isinstance(raw, Tensor) and raw.shape == (x.shape[0], 1, *x.shape[2:]):
            return raw
        raise TypeError(
            f"SmoothGrad cannot make a map from the raw output of method {self.method.name!r}"
        )

    def explain_batch(self, inputs: Tensor, target: Target) -> Explanation:
        x = inputs.detach()
        n = x.shape[0]
        with torch.no_grad():
            output = self.forward(x)
        resolved = resolve(target, output)
        scores = resolved.score(output).detach()
        class_target = target is None or not callable(target)
        span = x.flatten(1).amax(1) - x.flatten(1).amin(1)
        noise_sigma = self.sigma * span
        # a chunk: k whole copies of the batch (the noise, the noisy inputs and what the wrapped
        # method's backward pass saves, counted before any work by one forward pass under a
        # budget; the first copy's peak is measured as well), ≤ internal_batch_size inputs,
        # ≤ the memory budget
        backward = self.method.needs_gradients
        per_copy = copy_bytes(self, x, self.memory_budget, backward)
        draws = smoothgrad_noise(x, self.samples, noise_sigma, self.seed, 1)
        total: Any = None
        squares: Any = None
        layer: str | list[str] | None = None

        def step(start: int, stop: int) -> None:
            nonlocal total, squares, layer
            runtime.checkpoint(start, self.samples, "smoothgrad")
            k = stop - start
            eps = torch.cat([next(draws) for _ in range(k)])
            noisy = (x.unsqueeze(0) + eps).reshape(-1, *x.shape[1:])
            chunk_target: Target = (
                resolved.classes.repeat(k)
                if class_target and resolved.classes is not None
                else _slice_scores(resolved, n)
            )
            exp = self.method(noisy, chunk_target)
            layer = exp.layer
            summed = _sum_copies(exp.raw, k, n)
            total = summed if total is None else _add(total, summed)
            if self.aggregate != "mean":
                sq = _sum_copies(_square(exp.raw), k, n)
                squares = sq if squares is None else _add(squares, sq)

        requested = max(1, self.internal_batch_size // n)
        runtime.run_chunked(
            self.samples,
            per_copy,
            requested,
            step,
            "noisy batches",
            self.memory_budget,
        )
        mean = _aggregate(total, squares, self.samples, self.aggregate)
        maps = self.map_of(mean, x)
        context = Context(self.model, x, output.detach(), resolved, None, self.forward)
        return self.finish(
            mean, maps, context, scores, layer=layer, extras={"noise_sigma": noise_sigma}
        )


def _square(raw: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
    return [r * r for r in raw] if isinstance(raw, list) else raw * raw


def _aggregate(total: Any, squares: Any, samples: int, aggregate: str) -> Any:
    """``E[raw]``, ``E[raw²]`` or ``E[raw²] − E[raw]²`` (clamped at 0) from the sums."""
    if isinstance(total, list):
        parts = squares if squares is not None else [None] * len(total)
        return [_aggregate(t, q, samples, aggregate) for t, q in zip(total, parts, strict=True)]
    mean = total / samples
    if aggregate == "mean":
        return mean
    if aggregate == "square":
        return squares / samples
    return (squares / samples - mean * mean).clamp(min=0)


@register
class SmoothGradSquared(SmoothGrad):
    """SmoothGrad² (Hooker et al. 2019; Captum's ``NoiseTunnel(nt_type="smoothgrad_sq")``):
    ``raw = (1/n) Σ_i raw(x + ε_i)²``, SmoothGrad with ``aggregate="square"`` (its docstring).
    """

    name = "smoothgrad_sq"
    aliases: ClassVar[tuple[str, ...]] = ("smoothgrad2", "smoothgrad-sq", "smoothgrad_squared")
    OPTIONS: ClassVar[tuple[Option, ...]] = tuple(
        replace(o, default="square") if o.name == "aggregate" else o for o in SmoothGrad.OPTIONS
    )

    def __init__(
        self, model: nn.Module, layer: LayerSpec = None, *, aggregate: str = "square", **kw: Any
    ) -> None:
        super().__init__(model, layer, aggregate=aggregate, **kw)


@register
class VarGrad(SmoothGrad):
    """VarGrad (Adebayo et al. 2018; Captum's ``NoiseTunnel(nt_type="vargrad")``): the variance
    over the noisy copies ``raw = (1/n) Σ_i raw(x + ε_i)² − ((1/n) Σ_i raw(x + ε_i))²``
    (population variance, as Captum), SmoothGrad with ``aggregate="variance"``.
    """

    name = "vargrad"
    aliases: ClassVar[tuple[str, ...]] = ("var-grad", "var_grad")
    OPTIONS: ClassVar[tuple[Option, ...]] = tuple(
        replace(o, default="variance") if o.name == "aggregate" else o for o in SmoothGrad.OPTIONS
    )

    def __init__(
        self, model: nn.Module, layer: LayerSpec = None, *, aggregate: str = "variance", **kw: Any
    ) -> None:
        super().__init__(model, layer, aggregate=aggregate, **kw)


def _sum_copies(raw: Tensor | list[Tensor], k: int, n: int) -> Tensor | list[Tensor]:
    if isinstance(raw, list):
        return [r.view(k, n, *r.shape[1:]).sum(0) for r in raw]
    return raw.view(k, n, *raw.shape[1:]).sum(0)


def _add(a: Tensor | list[Tensor], b: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
    if isinstance(a, list) and isinstance(b, list):
        return [x + y for x, y in zip(a, b, strict=True)]
    return a + b  # type: ignore[operator]
