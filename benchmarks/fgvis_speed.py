"""Cost of FGVis per iteration and per image, against plain forward+backward passes.

Per-iteration cost: one FGVis step (forward of ``e = m·x``, gradient of φ to the mask, the
defence's gates when on, the mask update) against one plain forward + backward to the input of
the same batch (``torch.autograd.grad(score.sum(), x)``), at 224×224, batch 1 and 8, with and
without the defence. Each step is timed inside the run, between consecutive calls of the run's
progress callback, so the per-run costs (the clean pass that records the bounds, the final
scoring pass) are not spread over the steps; they are in the per-image table. Per repeat the
median over the ``STEPS`` steps (and over ``STEPS`` consecutive plain passes); min over
interleaved repeats (fixed λ, no early stop, so every run does exactly ``STEPS`` steps).

Per image: a default run (``lam="auto"``, early stopping) on chelsea, its iterations to
convergence and seconds, next to the time of the same number of plain forward+backward passes.

Two estimates of each ratio: the ratio of the minima over the repeats, and the median over the
repeats of the ratio within a repeat (plain passes and the run timed back to back), which is
less sensitive to load that changes between repeats on a shared machine; the range of the
per-repeat ratios is printed with it.

Run: ``python benchmarks/fgvis_speed.py > benchmarks/results/fgvis_speed.md``
"""

from __future__ import annotations

import itertools
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from skimage import data

import evidencemap as em
from evidencemap import models

STEPS = 20
REPEATS = 7


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = models.load("efficientnet-lite0")
    photo = model.preprocess(data.chelsea())
    print("# FGVis speed (EfficientNet-Lite0, 224×224)\n")
    print(
        f"torch {torch.__version__}, {platform.machine()}, 2 threads, load average at start "
        f"{tuple(round(v, 2) for v in os.getloadavg())}. Per step: median over the {STEPS} steps "
        f"of a run (fixed λ, no early stop), each timed between the run's progress callbacks; "
        f"plain: median of {STEPS} consecutive passes; min over {REPEATS} interleaved repeats; "
        "per-repeat ratio: median (range) over the repeats of the step's time over the plain "
        "passes of the same repeat.\n"
    )
    print(
        "| batch | plain fwd+bwd (s) | step, defence off (s) | ratio | step, defence on (s) "
        "| ratio | per-repeat ratio, off | per-repeat ratio, on |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for batch in (1, 8):
        x = photo[None].repeat(batch, 1, 1, 1)

        def plain(x: torch.Tensor = x) -> float:
            return statistics.median(timed(lambda: _plain(model, x)) for _ in range(STEPS))

        def run(defense: bool, x: torch.Tensor = x) -> float:
            stamps: list[float] = []

            def stamp(it: int, _info: dict[str, torch.Tensor]) -> None:
                if it >= 0:
                    stamps.append(time.perf_counter())

            em.explain(
                model,
                x,
                "fgvis",
                lam=1.0,
                defense=defense,
                max_iterations=STEPS,
                patience=STEPS,
                progress=stamp,
            )
            # Step k runs between callbacks k-1 and k (the clean pass comes before step 0).
            steps = [b - a for a, b in itertools.pairwise(stamps)]
            if len(steps) != STEPS - 1:
                raise RuntimeError("the run did not report every step")
            return statistics.median(steps)

        _plain(model, x)
        times: dict[str, list[float]] = {"plain": [], "off": [], "on": []}
        for _ in range(REPEATS):
            times["plain"].append(plain())
            times["off"].append(run(False))
            times["on"].append(run(True))
        base, off, on = (min(times[k]) for k in ("plain", "off", "on"))
        spreads = []
        for key in ("off", "on"):
            ratios = [t / p for t, p in zip(times[key], times["plain"], strict=True)]
            spreads.append(
                f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f})"
            )
        print(
            f"| {batch} | {base:.3f} | {off:.3f} | {off / base:.2f}× | {on:.3f} | {on / base:.2f}× "
            f"| {spreads[0]} | {spreads[1]} |"
        )
    print()

    print("## Iterations to convergence and seconds per image (defaults, chelsea)\n")
    print("| game | iterations | FGVis (s) | same number of plain fwd+bwd (s) | ratio |")
    print("|---|---|---|---|---|")
    x = photo[None]
    base = min(timed(lambda: _plain(model, x)) for _ in range(REPEATS))
    for game in ("preserve", "delete"):
        start = time.perf_counter()
        exp = em.explain(model, x, "fgvis", game=game)
        seconds = time.perf_counter() - start
        iterations = int(exp.extras["iterations"][0])
        print(
            f"| {game} | {iterations} | {seconds:.1f} | {iterations * base:.1f} "
            f"| {seconds / (iterations * base):.2f}× |"
        )


def _plain(model: torch.nn.Module, x: torch.Tensor) -> None:
    inp = x.clone().requires_grad_(True)
    torch.autograd.grad(model(inp)[:, 0].sum(), inp)


if __name__ == "__main__":
    main()
