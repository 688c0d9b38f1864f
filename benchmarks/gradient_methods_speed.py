"""Input x Gradient, Deconvnet, DeepLIFT, GradientSHAP, VarGrad and SmoothGrad²: evidencemap
against Captum at the same settings, side by side in one run.

EfficientNet-Lite0 (built in) at 224×224 on scikit-image's chelsea, batch 1, target 282, the
same torch threads for both. Each row times one call of each library, alternating (ours,
Captum, ours, …) after one warm-up call each, and reports the medians and their ratio.
Captum's ``Deconvolution`` hooks only ``nn.ReLU`` modules, so it runs on a copy of the model
whose ``nn.ReLU6`` are an ``nn.ReLU`` subclass computing ``relu6`` (the same function; without
it Captum returns the plain gradient). Captum's ``DeepLift`` looks modules up by exact type in
its rule table, which has no ``nn.ReLU6``; the row "ReLU6 registered" adds ``nn.ReLU6`` to that
table with Captum's own rescale rule (then it computes the same DeepLIFT); the row "as shipped"
is Captum unchanged, which applies no rule to the ReLU6 (not DeepLIFT, less work). GradientSHAP gives Captum our draws (baselines, noise, path
points: the same inputs); it and the noise-tunnel variants use the same number of copies in
one batch (Captum's ``nt_samples_batch_size=None``; ours ``internal_batch_size``
at least the number of copies).

Run: ``THREADS=1 CLOCK=cpu REPEATS=7 python benchmarks/gradient_methods_speed.py > benchmarks/results/gradient_methods_speed.md``
(``THREADS`` torch threads, default 2; ``CLOCK=cpu`` for a shared machine; ``ONLY=name`` reruns rows).
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from captum.attr import Deconvolution, DeepLift, GradientShap, InputXGradient, NoiseTunnel
from captum.attr import Saliency as CaptumSaliency
from skimage import data
from torch import nn

import evidencemap as em
from evidencemap import models

REPEATS = int(os.environ.get("REPEATS", "5"))
CLOCK = time.thread_time if os.environ.get("CLOCK") == "cpu" else time.perf_counter
"""``CLOCK=cpu`` times the CPU time of the calling thread: with ``THREADS=1`` all of torch's work
runs on it, so other processes loading a shared machine barely move the numbers."""
"""Timed pairs per row of several copies; single-pass rows take ``3 × REPEATS`` (cheap, noisier)."""
SAMPLES = 8
TARGET = 282


class ReLU6AsReLU(nn.ReLU):
    """ReLU6 that Captum's Deconvolution hooks (an ``nn.ReLU`` subclass)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x)


def twin(model: nn.Module, make: Callable[[], nn.Module]) -> nn.Module:
    out = copy.deepcopy(model)
    for module in list(out.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU6):
                setattr(module, name, make())
    return out.eval()


def deeplift_relu6(
    model: nn.Module, x: torch.Tensor, zero: torch.Tensor, target: torch.Tensor
) -> object:
    """Captum's DeepLift with ``nn.ReLU6`` added to its rule table (Captum's rescale rule)."""
    import captum.attr._core.deep_lift as captum_deep_lift

    table = captum_deep_lift.SUPPORTED_NON_LINEAR
    table[nn.ReLU6] = captum_deep_lift.nonlinear
    try:
        return DeepLift(model).attribute(x, baselines=zero, target=target)
    finally:
        del table[nn.ReLU6]


def captum_gradient_shap(
    model: nn.Module, x: torch.Tensor, bases: torch.Tensor, target: torch.Tensor
) -> object:
    """Captum's GradientShap given our draws (the same path points: their cost depends on them,
    points near a constant baseline make subnormal activations, slow on a CPU)."""
    import numpy as np

    from evidencemap.methods.attribution import gradient_shap_draws

    span = x.flatten(1).amax(1) - x.flatten(1).amin(1)
    ((eps, index, alpha),) = gradient_shap_draws(x, SAMPLES, len(bases), 0.05 * span, 0, SAMPLES)
    normal, choice, uniform = torch.normal, np.random.choice, np.random.uniform
    torch.normal = lambda *a, **k: eps.reshape(-1, *x.shape[1:]).clone()  # type: ignore[assignment]
    np.random.choice = lambda *a, **k: index.numpy()  # type: ignore[assignment]
    np.random.uniform = lambda *a, **k: alpha.double().numpy()  # type: ignore[assignment]
    try:
        return GradientShap(model).attribute(
            x, baselines=bases, target=target, n_samples=SAMPLES, stdevs=1.0
        )
    finally:
        torch.normal, np.random.choice, np.random.uniform = normal, choice, uniform


def timed(fn: Callable[[], object]) -> float:
    start = CLOCK()
    fn()
    return CLOCK() - start


def compare(
    ours: Callable[[], object], theirs: Callable[[], object], repeats: int
) -> tuple[float, float, list[float]]:
    """Medians of ours and theirs, and the quartiles of the per-pair ratios (load on a shared
    machine that changes over seconds moves both members of a pair)."""
    ours(), theirs()  # warm-up
    a, b = [], []
    for i in range(repeats):  # alternate which goes first
        if i % 2:
            b.append(timed(theirs))
            a.append(timed(ours))
        else:
            a.append(timed(ours))
            b.append(timed(theirs))
    ratios = [p / q for p, q in zip(a, b, strict=True)]
    return statistics.median(a), statistics.median(b), statistics.quantiles(ratios, n=4)


def main() -> None:
    threads = int(os.environ.get("THREADS", "2"))
    torch.set_num_threads(threads)
    model = models.load("efficientnet-lite0")
    x = model.preprocess(data.chelsea()).unsqueeze(0)
    target = torch.tensor([TARGET])
    zero = torch.zeros_like(x)
    deconv_twin = twin(model, ReLU6AsReLU)
    bases = torch.stack([torch.zeros_like(x[0]), x[0].mean() * torch.ones_like(x[0])])
    rows: list[tuple[str, str, Callable[[], object], Callable[[], object]]] = [
        (
            "input_x_gradient",
            "InputXGradient",
            lambda: em.explain(model, x, "input_x_gradient", target=target),
            lambda: InputXGradient(model).attribute(x, target=target),
        ),
        (
            "deconvnet",
            "Deconvolution (ReLU6 as nn.ReLU)",
            lambda: em.explain(model, x, "deconvnet", target=target),
            lambda: Deconvolution(deconv_twin).attribute(x, target=target),
        ),
        (
            "deeplift",
            "DeepLift as shipped (no rule on ReLU6)",
            lambda: em.explain(model, x, "deeplift", target=target),
            lambda: DeepLift(model).attribute(x, baselines=zero, target=target),
        ),
        (
            "deeplift",
            "DeepLift, ReLU6 registered",
            lambda: em.explain(model, x, "deeplift", target=target),
            lambda: deeplift_relu6(model, x, zero, target),
        ),
        (
            f"gradient_shap, {SAMPLES} copies, 2 baselines",
            f"GradientShap, n_samples={SAMPLES}",
            lambda: em.explain(
                model,
                x,
                "gradient_shap",
                target=target,
                baselines=bases,
                samples=SAMPLES,
                sigma=0.05,
            ),
            lambda: captum_gradient_shap(model, x, bases, target),
        ),
        (
            f"vargrad, {SAMPLES} copies",
            f"NoiseTunnel(Saliency) vargrad, nt_samples={SAMPLES}",
            lambda: em.explain(model, x, "vargrad", target=target, samples=SAMPLES),
            lambda: NoiseTunnel(CaptumSaliency(model)).attribute(
                x, nt_type="vargrad", nt_samples=SAMPLES, stdevs=0.6, target=target
            ),
        ),
        (
            f"smoothgrad_sq, {SAMPLES} copies",
            f"NoiseTunnel(Saliency) smoothgrad_sq, nt_samples={SAMPLES}",
            lambda: em.explain(model, x, "smoothgrad_sq", target=target, samples=SAMPLES),
            lambda: NoiseTunnel(CaptumSaliency(model)).attribute(
                x, nt_type="smoothgrad_sq", nt_samples=SAMPLES, stdevs=0.6, target=target
            ),
        ),
    ]
    import captum

    print("# Gradient methods: evidencemap against Captum\n")
    print(
        f"EfficientNet-Lite0, 224×224, chelsea, batch 1, {threads} torch threads, "
        f"medians of alternating calls after a warm-up (ratio: per pair of consecutive calls); torch {torch.__version__}, "
        f"captum {captum.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs (shared machine); clock: "
        f"{'CPU time of the calling thread' if CLOCK is time.thread_time else 'wall'}.\n"
    )
    print(
        "| evidencemap | Captum | pairs | ours (s) | Captum (s) | ratio ours / Captum: "
        "median [quartiles] |"
    )
    print("|---|---|---:|---:|---:|---:|")
    only = os.environ.get("ONLY", "")  # rerun the rows whose name contains it
    for ours_name, their_name, ours, theirs in rows:
        if only not in ours_name:
            continue
        repeats = REPEATS if "copies" in ours_name else 3 * REPEATS
        a, b, (q1, q2, q3) = compare(ours, theirs, repeats)
        print(
            f"| {ours_name} | {their_name} | {repeats} | {a:.3f} | {b:.3f} | "
            f"{q2:.2f} [{q1:.2f}, {q3:.2f}] |"
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
