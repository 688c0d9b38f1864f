"""Peak tensor memory of every registered method with and without a memory budget.

On the built-in EfficientNet-Lite0 and chelsea (224 × 224), each method runs with its costly
options at values that ask for a lot at once (``internal_batch_size=4096``, Score-CAM
``top_k=64``, 16 steps / samples, FGVis 5 iterations), first without limits, then under
``runtime.limits(memory_budget=...)``: at batch 1 under ``BUDGET``, and as the web service's
``top_k=5`` request (the photo five times, its five top classes) under ``TOP_K_BUDGET``, where
the batch is split into chunks within the budget. The peak is the most bytes of tensor storage
the call allocated that were alive at once (:class:`evidencemap.memory.PeakMemory`; the
model's weights and the input are not counted).

    PYTHONPATH=src python benchmarks/memory_budget.py > benchmarks/results/memory_budget.md
"""

from __future__ import annotations

import itertools
import time

import torch
from skimage import data

import evidencemap as em
from evidencemap import models, runtime
from evidencemap.memory import PeakMemory
from evidencemap.methods import describe
from evidencemap.methods.chunking import INPUTS_STEP

BUDGET = 64 * 2**20
TOP_K = 5
TOP_K_BUDGET = 256 * 2**20
OVERRIDES = {"top_k": 64, "max_iterations": 5, "patience": 5, "steps": 16, "samples": 16}


def options_for(name: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for option in describe(name).options.values():
        if option.name in OVERRIDES:
            out[option.name] = OVERRIDES[option.name]
        elif option.cost == "chunk" and option.name != "batch_size" and option.kind == "int":
            out[option.name] = 4096
    return out


def cnn_methods() -> list[str]:
    return [n for n in em.methods() if not getattr(describe(n).cls, "needs_attention", False)]


def batch_one(model: models.LoadedModel, x: torch.Tensor) -> None:
    print(
        f"## Batch 1, budget {BUDGET / 2**20:.0f} MiB\n\n"
        "| method | options | peak, no budget (MiB) | peak, budget (MiB) | s, budget |\n"
        "|---|---|---:|---:|---:|"
    )
    for name in cnn_methods():
        options = options_for(name)
        with PeakMemory() as free:
            em.explain(model, x, name, **options)
        began = time.perf_counter()
        try:
            with runtime.limits(memory_budget=BUDGET), PeakMemory() as limited:
                em.explain(model, x, name, **options)
            budgeted = f"{limited.peak / 2**20:.1f}"
        except runtime.BudgetExceededError:
            budgeted = "refused"
        seconds = time.perf_counter() - began
        shown = ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
        print(f"| {name} | {shown} | {free.peak / 2**20:.1f} | {budgeted} | {seconds:.1f} |")


def top_k(model: models.LoadedModel, x: torch.Tensor) -> None:
    with torch.no_grad():
        classes = model.module(x).topk(TOP_K).indices[0].tolist()
    batch = x.expand(TOP_K, *x.shape[1:])
    print(
        f"\n## Top-{TOP_K} batch (the photo {TOP_K} times, its {TOP_K} top classes), budget "
        f"{TOP_K_BUDGET / 2**20:.0f} MiB\n\n"
        "chunks: the inputs of each chunk the batch was split into under the budget (one: not "
        "split); max |Δ map|: the largest difference to the maps computed without a budget.\n\n"
        "| method | peak, no budget (MiB) | peak, budget (MiB) | chunks | max \\|Δ map\\| "
        "| s, no budget | s, budget |\n|---|---:|---:|---|---:|---:|---:|"
    )
    for name in cnn_methods():
        options = options_for(name)
        began = time.perf_counter()
        with PeakMemory() as free:
            whole = em.explain(model, batch, name, target=classes, **options)
        free_s = time.perf_counter() - began
        starts: list[int] = []

        def report(done: int, total: int, desc: str, starts: list[int] = starts) -> None:
            if desc == INPUTS_STEP and done < total:
                starts.append(done)

        began = time.perf_counter()
        try:
            with (
                runtime.limits(memory_budget=TOP_K_BUDGET, progress=report),
                PeakMemory() as limited,
            ):
                chunked = em.explain(model, batch, name, target=classes, **options)
            budgeted = f"{limited.peak / 2**20:.1f}"
            delta = f"{float((chunked.maps - whole.maps).abs().max()):.1e}"
            edges = [*starts, TOP_K] if starts else [0, TOP_K]
            chunks = " + ".join(str(b - a) for a, b in itertools.pairwise(edges))
        except runtime.BudgetExceededError:
            budgeted, delta, chunks = "refused", "", ""
        seconds = time.perf_counter() - began
        print(
            f"| {name} | {free.peak / 2**20:.1f} | {budgeted} | {chunks} | {delta} "
            f"| {free_s:.1f} | {seconds:.1f} |"
        )


def main() -> None:
    torch.set_num_threads(2)
    model = models.load("efficientnet-lite0")
    x = model.preprocess(data.chelsea())[None]
    em.explain(model, x, "gradcam")  # finds and caches the layer: not part of any peak below
    print("# Peak memory of every method, with and without a memory budget\n")
    print(
        "EfficientNet-Lite0, chelsea 224 × 224; peak = the most tensor bytes the call allocated "
        f"alive at once. torch {torch.__version__}, {torch.get_num_threads()} threads. Options "
        "that ask for a lot at once: "
        + "; ".join(
            f"{n} {', '.join(f'{k}={v}' for k, v in options_for(n).items())}"
            for n in cnn_methods()
            if options_for(n)
        )
        + ".\n"
    )
    batch_one(model, x)
    top_k(model, x)


if __name__ == "__main__":
    main()
