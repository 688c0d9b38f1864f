"""The expected cost of each method (``evidencemap.server.costs``), without a model.

The counts of the built-in methods are pinned by hand: a change to a pinned method's cost shows
here. A new method needs no row: every registered method is checked for a well-formed cost.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

import evidencemap as em
from evidencemap.explanation import Explanation
from evidencemap.methods import (
    METHODS,
    PASS_KINDS,
    Context,
    LayerMethod,
    Method,
    Option,
    describe,
    register,
)
from evidencemap.methods.gradients import IntegratedGradients, SmoothGrad
from evidencemap.methods.passes import PASS_UNITS
from evidencemap.server.costs import Calibration, CostBook, pass_count
from evidencemap.targets import Target, resolve
from tiny import ConvGapFc, seeded

CHANNELS = 1280
"""Channels of Score-CAM's layer in these tests (Lite0's ``_head_act`` has 1280)."""

BUILT_IN = {  # name: (passes with the default options, kind, work option, at most)
    "attention_rollout": (1.0, "layer", None, False),
    "attention_gradient": (1.0, "layer", None, False),
    "gradcam": (1.0, "layer", None, False),
    "gradcam++": (1.0, "layer", None, False),
    "xgradcam": (1.0, "layer", None, False),
    "layercam": (1.0, "layer", None, False),
    "hirescam": (1.0, "layer", None, False),
    "cam": (1.0, "layer", None, False),
    "eigencam": (1.0, "layer", None, False),
    "cfcam": (1.0, "layer", None, False),
    "fgvis": (300.0, "input", "max_iterations", True),
    "scorecam": (float(CHANNELS), "forward", "top_k", True),  # top_k=None: every channel
    "saliency": (1.0, "input", None, False),
    "guided_backprop": (1.0, "input", None, False),
    "guided_gradcam": (2.0, "input", None, False),  # guided backprop and Grad-CAM
    "integrated_gradients": (50.0, "input", "steps", False),
    "smoothgrad": (25.0, "input", "samples", False),  # 25 noisy copies of saliency
    "smoothgrad_sq": (25.0, "input", "samples", False),
    "vargrad": (25.0, "input", "samples", False),
    "input_x_gradient": (1.0, "input", None, False),
    "deconvnet": (1.0, "input", None, False),
    "deeplift": (2.0, "input", None, False),  # the inputs and their references: 2N
    "gradient_shap": (5.0, "input", "samples", False),
    "ablationcam": (float(CHANNELS), "forward", "top_k", True),  # one ablated pass per channel
    "gradcam_elementwise": (1.0, "layer", None, False),
    "sscam": (35.0 * CHANNELS, "forward", "top_k", True),  # 35 noisy masks per channel
    "iscam": (10.0 * CHANNELS, "forward", "top_k", True),  # 10 scaled masks per channel
    "smoothgradcam++": (4.0, "layer", "samples", False),  # 4 noisy inputs
    "fullgrad": (1.0, "input", None, False),
    "occlusion": (169.0, "forward", None, False),  # 13 × 13 windows at 224 × 224
    "rise": (4000.0, "forward", "masks", False),
    "lime": (1000.0, "forward", "samples", False),
    "kernel_shap": (1000.0, "forward", "samples", False),
}
PER_CHANNEL = {"scorecam": 1.0, "ablationcam": 1.0, "sscam": 35.0, "iscam": 10.0}
"""Methods whose count is per channel of the layer (unknown without a model): passes per channel."""
SECONDS = {"layer": 0.5, "input": 0.25, "forward": 0.125}
"""A made-up calibration: seconds per pass of each kind."""


def test_every_pinned_method_is_registered():
    assert set(BUILT_IN) <= set(em.methods())


@pytest.mark.parametrize("name", em.methods())
def test_every_registered_method_declares_a_well_formed_cost(name):
    """Derived from the registry, so a new method is checked without a row in BUILT_IN."""
    passes, kind = pass_count(name, CHANNELS)
    assert kind in PASS_KINDS
    assert passes is None or passes > 0
    cost = CostBook().cost(name, (SECONDS, CHANNELS))
    assert cost["pass_kind"] == kind
    assert cost["passes"] == passes


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_pass_count_of_every_built_in_method(name):
    passes, kind, _, _ = BUILT_IN[name]
    assert pass_count(name, CHANNELS) == (passes, kind)
    for alias in describe(name).aliases:
        assert pass_count(alias, CHANNELS) == (passes, kind)
    if name in PER_CHANNEL:  # the channels are unknown without a model
        assert pass_count(name) == (None, kind)
        assert pass_count(name, 7) == (7.0 * PER_CHANNEL[name], kind)
    else:
        assert pass_count(name) == (passes, kind)


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_cost_entry_of_every_built_in_method(name):
    passes, kind, work, at_most = BUILT_IN[name]
    cost = CostBook().cost(name, (SECONDS, CHANNELS))
    assert cost == {
        "passes": passes,
        "pass_kind": kind,
        "work_option": work,
        "at_most": at_most,
        "seconds": pytest.approx(passes * SECONDS[kind]),
        "seconds_per_pass": SECONDS[kind],
        "last_seconds": None,
        "last_work": None,
    }
    unknown = CostBook().cost(name, None)  # the calibration failed: no seconds
    assert (unknown["seconds"], unknown["seconds_per_pass"]) == (None, None)
    assert unknown["passes"] == (None if name in PER_CHANNEL else passes)


def test_cost_book_records_the_latest_run_per_class_and_its_work():
    book = CostBook()
    book.record("fgvis", 6.0, 2, {"max_iterations": 7, "lr": 0.1})
    book.record("gradcam", 0.5, 1, {"relu": True})
    book.record("integrated_gradients", 4.0, 0, {})  # no class counted: as one
    fgvis = book.cost("fgvis", (SECONDS, CHANNELS))
    assert (fgvis["last_seconds"], fgvis["last_work"]) == (3.0, 7)
    assert fgvis["seconds"] == pytest.approx(300 * SECONDS["input"])  # the estimate stays
    gradcam = book.cost("gradcam", None)
    assert (gradcam["last_seconds"], gradcam["last_work"]) == (0.5, None)
    ig = book.cost("integrated_gradients", None)
    assert (ig["last_seconds"], ig["last_work"]) == (4.0, None)
    book.record("fgvis", 1.0, 1, {})
    assert book.cost("fgvis", None)["last_seconds"] == 1.0
    assert book.cost("fgvis", None)["last_work"] is None


# --------------------------------------------------------------------------- user methods


class ShiftedGradient(Method):
    """Test-only input method: ``|∂y/∂x|`` averaged over ``shifts`` copies of the input rolled
    by 0, 1, … pixels along its last axis (and the gradient rolled back): one forward and
    backward to the input per copy."""

    name = "test-shifted-gradient"
    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option("shifts", "int", 3, "rolled copies", low=1, cost="work", cap=64, passes=True),
    )

    def __init__(self, model: nn.Module, *, shifts: int = 3, **kw: Any) -> None:
        super().__init__(model, **kw)
        self.shifts = self.option("shifts", shifts)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "shifts": self.shifts}

    def explain_batch(self, inputs: Tensor, target: Target) -> Explanation:
        x = inputs.detach()
        total = torch.zeros_like(x)
        resolved = output = scores = None
        for shift in range(self.shifts):
            rolled = x.roll(shift, dims=-1).requires_grad_(True)
            with torch.enable_grad():
                out = self.forward(rolled)
                if resolved is None:  # the target of the unshifted input
                    resolved, output = resolve(target, out), out.detach()
                score = resolved.score(out)
                (grad,) = torch.autograd.grad(score.sum(), rolled)
            if scores is None:
                scores = score.detach()
            total += grad.roll(-shift, dims=-1).abs()
        if resolved is None or output is None or scores is None:
            raise RuntimeError("shifts must be at least 1")
        raw = total / self.shifts
        context = Context(self.model, x, output, resolved, None, self.forward)
        return self.finish(raw, raw.amax(dim=1, keepdim=True), context, scores)


class ActivationMap(LayerMethod):
    """Test-only layer method: the mean of the layer's channels (no gradients, no declaration)."""

    name = "test-activation-map"
    needs_gradients = False

    def channel_weights(self, acts: Tensor, grads: Tensor | None, context: Context) -> Tensor:
        return acts.new_full(acts.shape[:2], 1.0 / acts.shape[1])


def smooth_preset(name: str, wrapped: str, samples: int) -> type[SmoothGrad]:
    """Test-only preset: SmoothGrad of ``wrapped`` over ``samples`` noisy copies."""

    class Preset(SmoothGrad):
        __doc__ = f"Test-only preset: SmoothGrad of {wrapped} over {samples} noisy copies."
        aliases = ()
        OPTIONS: ClassVar[tuple[Option, ...]] = (
            Option("method", "str", wrapped, "the wrapped method", other="a Method"),
            Option(
                "samples", "int", samples, "noisy copies", low=1, cost="work", cap=200, passes=True
            ),
        )

        def __init__(
            self, model: nn.Module, layer: Any = None, *, method: Any = wrapped, **kw: Any
        ) -> None:
            kw.setdefault("samples", samples)
            super().__init__(model, layer, method=method, **kw)

    Preset.name = name
    Preset.__name__ = Preset.__qualname__ = name.title().replace("-", "")
    return Preset


SmoothGuidedGradCAM = smooth_preset("test-smooth-guided-gradcam", "guided_gradcam", 10)
SmoothScoreCAM = smooth_preset("test-smooth-scorecam", "scorecam", 2)


USER_METHODS = (ShiftedGradient, ActivationMap, SmoothGuidedGradCAM, SmoothScoreCAM)


@pytest.fixture
def user_methods() -> Iterator[None]:
    """The user methods above registered with ``register`` for one test."""
    for cls in USER_METHODS:
        register(cls)
    try:
        yield
    finally:
        for cls in USER_METHODS:
            METHODS.pop(cls.name, None)


def test_a_user_method_is_estimated_from_its_own_declaration(user_methods):
    assert pass_count("test-shifted-gradient") == (3.0, "input")  # Method's default kind
    assert pass_count("test-activation-map") == (1.0, "layer")  # LayerMethod's default kind
    assert pass_count("test-smooth-guided-gradcam") == (20.0, "input")  # 10 × 2
    assert pass_count("test-smooth-scorecam", 64) == (128.0, "forward")  # 2 × 64 channels
    assert pass_count("test-smooth-scorecam") == (None, "forward")
    book = CostBook()
    shifted = book.cost("test-shifted-gradient", (SECONDS, CHANNELS))
    assert shifted["work_option"] == "shifts"
    assert not shifted["at_most"]
    assert shifted["seconds"] == pytest.approx(3 * SECONDS["input"])
    smooth = book.cost("test-smooth-scorecam", (SECONDS, 64))
    assert (smooth["work_option"], smooth["at_most"]) == ("samples", True)  # Score-CAM's bound
    assert smooth["seconds"] == pytest.approx(128 * SECONDS["forward"])
    book.record("test-shifted-gradient", 2.0, 1, {"shifts": 8})
    assert book.cost("test-shifted-gradient", None)["last_work"] == 8
    assert describe("test-shifted-gradient").to_json()["passes"] == {
        "kind": "input",
        "per_call": 1.0,
        "option": "shifts",
        "at_most": False,
        "if_none": None,
        "wraps": None,
    }


def test_a_user_method_costs_the_passes_it_declares(user_methods):
    """The declared count is what the method runs: forwards counted on a tiny model."""
    model = seeded(ConvGapFc())
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        exp = em.explain(model, x, "test-shifted-gradient", shifts=5)
        assert exp.maps.shape == (2, 1, 8, 8)
        assert len(calls) == 5
        calls.clear()
        em.explain(model, x, "test-shifted-gradient")  # the default: 3
        assert len(calls) == pass_count("test-shifted-gradient")[0] == 3
        calls.clear()
        assert em.explain(model, x, "test-activation-map").maps.shape == (2, 1, 8, 8)
        assert len(calls) == pass_count("test-activation-map")[0] == 1
    finally:
        handle.remove()
    # the service's calibration on the same model: seconds = declared passes × one pass
    seconds, channels = Calibration(model, x[:1]).measure()
    assert channels == 6  # ConvGapFc's last spatial layer
    assert set(seconds) == set(PASS_KINDS)
    cost = CostBook().cost("test-smooth-scorecam", (seconds, channels))
    assert cost["passes"] == 2 * 6
    assert cost["seconds"] == pytest.approx(12 * seconds["forward"])


def test_bad_cost_declarations_are_refused():
    with pytest.raises(ValueError, match="passes=True needs cost='work'"):
        Option("n", "int", 3, "doc", passes=True)
    with pytest.raises(ValueError, match="need passes=True"):
        Option("n", "int", 3, "doc", cost="work", at_most=True)
    with pytest.raises(ValueError, match="passes_if_none"):
        Option("n", "int", 3, "doc", cost="work", passes=True, passes_if_none="pixels")

    class BadKind(ShiftedGradient):
        pass_kind = "backward"

    class BadCount(ShiftedGradient):
        passes_per_call = 0

    class TwoCounts(ShiftedGradient):
        OPTIONS: ClassVar[tuple[Option, ...]] = (
            Option("rounds", "int", 2, "more", cost="work", passes=True),
        )

    class BadWrap(ShiftedGradient):
        forwards_options_to = "inner"

    with pytest.raises(ValueError, match=r"BadKind.pass_kind must be one of"):
        describe(BadKind)
    with pytest.raises(ValueError, match=r"BadCount.passes_per_call must be a positive number"):
        describe(BadCount)
    with pytest.raises(
        ValueError, match="more than one option with passes=True: 'rounds', 'shifts'"
    ):
        describe(TwoCounts)
    with pytest.raises(ValueError, match="names no option of the method: 'inner'"):
        describe(BadWrap)

    class SmoothItself(SmoothGrad):
        name = "test-smooth-itself"
        aliases = ()
        OPTIONS: ClassVar[tuple[Option, ...]] = (
            Option("method", "str", "test-smooth-itself", "the wrapped method", other="a Method"),
        )

    register(SmoothItself)
    try:
        with pytest.raises(ValueError, match="cycle: test-smooth-itself → test-smooth-itself"):
            pass_count("test-smooth-itself")
    finally:
        METHODS.pop(SmoothItself.name)


def test_passes_per_call_multiplies_the_counting_option():
    class TwoPerStep(IntegratedGradients):
        passes_per_call = 2.0

    assert describe(TwoPerStep).pass_count() == (100.0, "input", False)  # 2 × 50 steps


def test_the_pass_units_are_the_pass_kinds():
    assert tuple(PASS_UNITS) == PASS_KINDS
    for name in PASS_UNITS.values():  # each unit is one pass of its own kind
        if name:
            assert describe(name).pass_count() == (1.0, describe(name).passes.kind, False)
