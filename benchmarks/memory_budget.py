"""Peak tensor memory of every registered method with and without a memory budget.

On the built-in EfficientNet-Lite0 and chelsea (224 × 224, batch 1), each method runs with its
costly options at values that ask for a lot at once (``internal_batch_size=4096``, Score-CAM
``top_k=64``, 16 steps / samples, FGVis 5 iterations), first without limits, then under
``runtime.limits(memory_budget=BUDGET)``. The peak is the most bytes of tensor storage the call
allocated that were alive at once (:class:`evidencemap.memory.PeakMemory`; the model's weights
and the input are not counted).

    PYTHONPATH=src python benchmarks/memory_budget.py > benchmarks/results/memory_budget.md
"""

from __future__ import annotations

import time

import torch
from skimage import data

import evidencemap as em
from evidencemap import models, runtime
from evidencemap.memory import PeakMemory
from evidencemap.methods import describe

BUDGET = 64 * 2**20
OVERRIDES = {"top_k": 64, "max_iterations": 5, "patience": 5, "steps": 16, "samples": 16}


def options_for(name: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for option in describe(name).options.values():
        if option.name in OVERRIDES:
            out[option.name] = OVERRIDES[option.name]
        elif option.cost == "chunk" and option.name != "batch_size" and option.kind == "int":
            out[option.name] = 4096
    return out


def main() -> None:
    torch.set_num_threads(2)
    model = models.load("efficientnet-lite0")
    x = model.preprocess(data.chelsea())[None]
    em.explain(model, x, "gradcam")  # finds and caches the layer: not part of any peak below
    print("# Peak memory of every method, with and without a memory budget\n")
    print(
        f"EfficientNet-Lite0, chelsea 224 × 224, batch 1, budget {BUDGET / 2**20:.0f} MiB; peak "
        "= the most tensor bytes the call allocated alive at once. "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads.\n"
    )
    print("| method | options | peak, no budget (MiB) | peak, budget (MiB) | s, budget |")
    print("|---|---|---:|---:|---:|")
    for name in em.methods():
        if getattr(describe(name).cls, "needs_attention", False):
            continue
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


if __name__ == "__main__":
    main()
