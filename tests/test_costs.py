"""The expected cost of each method (``evidencemap.server.costs``), without a model.

The counts of every built-in method are pinned by hand: a change to a method's cost shows here.
"""

from __future__ import annotations

import pytest

import evidencemap as em
from evidencemap.methods import describe
from evidencemap.server.costs import CostBook, pass_count

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
}
SECONDS = {"layer": 0.5, "input": 0.25, "forward": 0.125}
"""A made-up calibration: seconds per pass of each kind."""


def test_every_built_in_method_is_pinned():
    assert set(BUILT_IN) == set(em.methods())


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_pass_count_of_every_built_in_method(name):
    passes, kind, _, _ = BUILT_IN[name]
    assert pass_count(name, CHANNELS) == (passes, kind)
    for alias in describe(name).aliases:
        assert pass_count(alias, CHANNELS) == (passes, kind)
    if name == "scorecam":  # the channels are unknown without a model
        assert pass_count(name) == (None, kind)
        assert pass_count(name, 7) == (7.0, kind)
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
    assert unknown["passes"] == (None if name == "scorecam" else passes)


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
