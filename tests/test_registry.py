"""Every registered method, found through the registry: the invariants a new method gets for free.

Nothing here lists methods by hand: a method registered with ``@register`` is checked for its
option description, for leaving the model exactly as found, for 2-D and 3-D inputs, for the
memory budget and for the factory's errors.
"""

from __future__ import annotations

import inspect
import re
import threading

import pytest
import torch

import evidencemap as em
from evidencemap import runtime
from evidencemap.methods import OptionError, describe
from tiny import ConvGapFc, assert_unchanged, seeded, snapshot

CNN_METHODS = [n for n in em.methods() if not getattr(describe(n).cls, "needs_attention", False)]


def fast_options(name: str) -> dict[str, object]:
    """Every costly ``int`` option at a small value (4, or its default when smaller)."""
    out: dict[str, object] = {}
    for option in describe(name).options.values():
        if option.cost == "work" and option.kind == "int" and option.default is not None:
            out[option.name] = min(int(option.default), max(4, int(option.low or 1)))
    return out


@pytest.mark.parametrize("name", em.methods())
def test_options_describe_the_constructor_exactly(name):
    spec = describe(name)
    assert all(o.doc != "(not described)" for o in spec.options.values()), [
        o.name for o in spec.options.values() if o.doc == "(not described)"
    ]
    params: dict[str, object] = {}
    for klass in spec.cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        sig = inspect.signature(init).parameters.values()
        for p in sig:
            if p.name in ("self", "model", "layer") or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                continue
            params.setdefault(p.name, p.default)
        if not any(p.kind is p.VAR_KEYWORD for p in sig):
            break
    # a former name of a renamed option stays a constructor keyword (default None), nothing else
    former = {old for o in spec.options.values() for old in o.renamed_from}
    assert former <= set(params)
    assert all(params.pop(old) is None for old in former)
    assert not former & set(spec.options)
    assert set(spec.options) == set(params)
    for option_name, default in params.items():
        described = spec.options[option_name].default
        assert described == default or repr(described) == repr(default), option_name
        # the described default passes its own check
        spec.options[option_name].check(default)
    assert spec.summary
    assert spec.to_json()["name"] == spec.name


@pytest.mark.parametrize("name", CNN_METHODS)
@pytest.mark.parametrize("dims", [2, 3])
def test_every_method_leaves_the_model_as_found_in_2d_and_3d(name, dims):
    model = seeded(ConvGapFc(dims=dims, inplace=True))
    model.train()
    model.features[0].weight.requires_grad_(False)
    model.fc.weight.grad = torch.full_like(model.fc.weight, 7.0)
    before = snapshot(model)
    spatial = (8, 8) if dims == 2 else (4, 6, 6)
    x = torch.randn(2, 3, *spatial, generator=torch.Generator().manual_seed(1))
    exp = em.explain(model, x, name, **fast_options(name))
    assert exp.maps.shape == (2, 1, *spatial)
    assert torch.isfinite(exp.maps).all()
    assert float(exp.maps.min()) >= 0
    assert float(exp.maps.max()) <= 1
    assert exp.method == name
    assert_unchanged(model, before)
    assert model.training


@pytest.mark.parametrize("name", CNN_METHODS)
def test_every_method_respects_cancellation(name):
    model = seeded(ConvGapFc())
    x = torch.randn(1, 3, 8, 8)
    before = snapshot(model)
    event = threading.Event()
    event.set()
    method = em.build(name, model, **fast_options(name))
    try:
        with runtime.limits(cancel=event):
            method(x)
    except runtime.RunCancelledError:
        pass  # methods with a loop stop at their first checkpoint
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", em.methods())
def test_factory_errors(name):
    model = seeded(ConvGapFc())
    spec = describe(name)
    with pytest.raises(
        OptionError, match=re.escape(f"method '{spec.name}' takes no option 'no_such'")
    ):
        em.build(name, model, no_such=1)
    if not spec.uses_layer:
        with pytest.raises(ValueError, match="takes no layer"):
            em.build(name, model, "features.0")
    for option in spec.options.values():
        if option.cost and option.cap is not None:
            with pytest.raises(OptionError, match="cap"):
                em.build(name, model, caps={}, **{option.name: int(option.cap) + 1})


def hungry_options(name: str) -> dict[str, object]:
    """Every costly option set to ask for a lot at once: ``work`` ints at 8 (iterations,
    samples, steps), ``chunk`` ints other than ``batch_size`` at 4096 (one chunk for all)."""
    out: dict[str, object] = {}
    for option in describe(name).options.values():
        if option.kind != "int" or (option.default is None and option.cost != "chunk"):
            continue
        if option.cost == "work":
            out[option.name] = 8
        elif option.cost == "chunk" and option.name != "batch_size":
            out[option.name] = 4096
    return out


def test_peak_memory_counts_what_a_block_allocates_by_hand():
    from evidencemap.memory import PeakMemory

    before = torch.zeros(1000)  # not counted: made outside
    with PeakMemory() as meter:
        a = torch.zeros(250)  # 1000 B
        b = torch.zeros(500)  # 2000 B: 3000 B live
        del a  # 2000 B live
        view = b.view(10, 50)  # shares b's storage: nothing more
        c = b + before[:500]  # 2000 B more: 4000 B live
        del b, c, view
    assert meter.peak == 4000
    assert meter.live == 0


MEMORY_BUDGET = 1536 * 1024
"""Bytes per chunk in the memory test: one pass of its batch of two 32 × 32 inputs fits (the
most, FGVis, measured 1.1 MiB), the un-chunked loops exceed it with the one-pass allowance
(0.5 MiB): Score-CAM's 16 channels 4.8 MiB, Integrated Gradients' 8 steps 4.3, SmoothGrad's
8 samples 4.6 MiB; chunked, 1.6 / 1.1 / 1.2 MiB."""


@pytest.mark.parametrize("name", CNN_METHODS)
def test_every_method_stays_within_the_memory_budget_or_refuses(name):
    from evidencemap.memory import PeakMemory

    model = seeded(ConvGapFc(width=16))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    options = hungry_options(name)
    # The budget bounds each chunk; besides its chunks a method holds what one pass of the
    # batch takes (the clean forward it reads): allowed once, measured as Grad-CAM's peak.
    with PeakMemory() as one_pass:
        em.explain(model, x, "gradcam")
    try:
        with runtime.limits(memory_budget=MEMORY_BUDGET), PeakMemory() as meter:
            budgeted = em.explain(model, x, name, **options)
    except runtime.BudgetExceededError:
        return  # refusing is allowed; running over the budget is not
    allowed = MEMORY_BUDGET + one_pass.peak
    assert meter.peak <= allowed, (
        f"{name}: peak {meter.peak / 2**20:.2f} MiB > {allowed / 2**20:.2f}"
    )
    assert budgeted.maps.shape == (2, 1, 32, 32)
