"""Cost of FGVis per iteration and per image, against plain forward+backward passes.

Per-iteration cost: one FGVis step of the paper's rule (``schedule="fine"``: forward of
``e = m·x``, gradient of φ to the mask, the defence's gates when on, the mask update) against one plain forward + backward to the input of
the same batch (``torch.autograd.grad(score.sum(), x)``), at 224×224, batch 1 and 8, with and
without the defence. Each step is timed inside the run, between consecutive calls of the run's
progress callback, so the per-run costs (the clean pass that records the bounds, the final
scoring pass) are not spread over the steps; they are in the per-image table. The design is
paired: each callback also times one plain pass right after the step it closes (and the next
step's clock starts after that pass), so every step is compared with a plain pass measured
within a tenth of a second of it. Load on a shared machine that changes over seconds moves
both members of a pair; the median of the per-pair ratios, with its quartiles and 5th–95th
percentiles, is the estimate (fixed λ, no early stop, so every run does exactly ``STEPS``
steps; ``REPEATS`` runs with and without the defence, alternating).

Per image: a default run (``lam="auto"``, early stopping) on chelsea, its iterations to
convergence and seconds, next to the time of the same number of plain forward+backward passes.

Where the defence's time goes: one gradient pass of the step built up piece by piece, each
piece timed round robin with the plain pass (every round runs each piece once): the mask
product ``e = m·x`` with the gradient to ``m``; the interceptor observing every torch call of the forward pass (gating
nothing); one identity gate per nonlinearity call whose backward returns the gradient unchanged;
the defence's rule in that gate (the full defended pass).

Run: ``python benchmarks/fgvis_speed.py > benchmarks/results/fgvis_speed.md``; options
``--model vgg16-brain-mri`` (240×240), ``--threads``, ``--batches``, ``--repeats``, ``--steps``,
``--rounds`` and ``--no-per-image`` size the run (the defaults are the committed run's).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from skimage import data

import evidencemap as em
from evidencemap import models
from evidencemap.capture import GradientGate, NonlinearityInterceptor
from evidencemap.methods.fgvis import DefenceRule, record_bounds

STEPS = 20
REPEATS = 7
ROUNDS = 60


class GeneralRule(DefenceRule):
    """The defence without the fused ReLU / ReLU6 node: every call through GradientGate with
    ``NonlinearityBounds.rule`` (the path other nonlinearities take; the same gradient)."""

    def __call__(self, index: int, name: str, h: torch.Tensor) -> torch.Tensor:
        return super().__call__(index, name, h)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--no-per-image", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = models.load(args.model)
    photo = model.preprocess(data.chelsea())
    side = photo.shape[-1]
    print(f"# FGVis speed ({args.model}, {side}×{side})\n")
    print(
        f"torch {torch.__version__}, {platform.machine()}, {args.threads} threads, nice "
        f"{os.nice(0)}, load average at start {tuple(round(v, 2) for v in os.getloadavg())}. "
        f"Paired design: inside each run (fixed λ, no early stop, {args.steps} steps) every "
        "step is timed between the run's progress callbacks, and each callback times one plain "
        "forward+backward pass to the input of the same batch right after it, so each step has "
        f"its own plain pass measured back to back; {args.repeats} runs with the defence and "
        f"{args.repeats} without, alternating. Times are medians over all steps (plain: over "
        "all plain passes); the ratio is the median of the per-pair ratios with its quartiles "
        "and the 5th–95th percentiles.\n"
    )
    print(
        "| batch | plain fwd+bwd (s) | step, defence off (s) | ratio off | step, defence on (s) "
        "| ratio on | ratio on, quartiles | ratio on, 5th–95th pct | pairs |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for batch in args.batches:
        x = photo[None].repeat(batch, 1, 1, 1)
        _plain(model, x)
        pairs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for _ in range(args.repeats):
            for defence in (False, True):
                pairs[defence].extend(_paired_run(model, x, defence, args.steps))
        plain = statistics.median(p for d in (False, True) for _, p in pairs[d])
        step = {d: statistics.median(t for t, _ in pairs[d]) for d in (False, True)}
        ratios = {d: [t / p for t, p in pairs[d]] for d in (False, True)}
        quartiles = statistics.quantiles(ratios[True], n=4, method="inclusive")
        tails = statistics.quantiles(ratios[True], n=20, method="inclusive")
        print(
            f"| {batch} | {plain:.3f} | {step[False]:.3f} | {statistics.median(ratios[False]):.2f}× "
            f"| {step[True]:.3f} | **{quartiles[1]:.2f}×** "
            f"| {quartiles[0]:.2f}–{quartiles[2]:.2f}× "
            f"| {tails[0]:.2f}–{tails[-1]:.2f}× | {len(ratios[True])} |"
        )
    print()

    print("## Where the defence's time goes (one gradient pass, no mask update)\n")
    print(
        f"{args.rounds} rounds, each running every piece once; median pass time, median and "
        "quartiles of the per-round ratio to the plain pass.\n\n"
        "| batch | piece added | pass (s) | ratio to plain | ratio, quartiles |\n"
        "|---|---|---|---|---|"
    )
    for batch in args.batches:
        x = photo[None].repeat(batch, 1, 1, 1)
        for label, seconds, ratio, spread in _decomposition(model, x, args.rounds):
            print(f"| {batch} | {label} | {seconds:.3f} | {ratio:.2f}× | {spread} |")
    print()
    if args.no_per_image:
        return

    print("## Iterations to convergence and seconds per image (defaults, chelsea)\n")
    print("| game | iterations | FGVis (s) | same number of plain fwd+bwd (s) | ratio |")
    print("|---|---|---|---|---|")
    x = photo[None]
    base = statistics.median(timed(lambda: _plain(model, x)) for _ in range(args.steps))
    for game in ("preserve", "delete"):
        start = time.perf_counter()
        exp = em.explain(model, x, "fgvis", game=game)
        seconds = time.perf_counter() - start
        iterations = int(exp.extras["iterations"][0])
        print(
            f"| {game} | {iterations} | {seconds:.1f} | {iterations * base:.1f} "
            f"| {seconds / (iterations * base):.2f}× |"
        )


def _paired_run(
    model: torch.nn.Module, x: torch.Tensor, defence: bool, steps: int
) -> list[tuple[float, float]]:
    """``(step seconds, plain pass seconds)`` for every step of one run but the first."""
    pairs: list[tuple[float, float]] = []
    started: list[float] = []

    def stamp(it: int, _info: dict[str, torch.Tensor]) -> None:
        if it < 0:
            return
        now = time.perf_counter()
        step = now - started[-1] if started else None
        plain = timed(lambda: _plain(model, x))
        if step is not None:
            pairs.append((step, plain))
        started.append(time.perf_counter())

    em.explain(
        model,
        x,
        "fgvis",
        lam=1.0,
        defence=defence,
        max_iterations=steps,
        patience=steps,
        schedule="fine",
        progress=stamp,
    )
    if len(pairs) != steps - 1:
        raise RuntimeError("the run did not report every step")
    return pairs


def _decomposition(
    model: torch.nn.Module, x: torch.Tensor, rounds: int
) -> list[tuple[str, float, float, str]]:
    """``(piece, median seconds, median per-round ratio, its quartiles)`` for each piece."""
    with torch.no_grad():
        output, bounds = record_bounds(model, x)
    classes = output.argmax(1, keepdim=True)
    start = torch.full_like(x, 0.9)

    def gated(rule: object) -> None:
        mask = start.clone().requires_grad_(True)
        e = mask * x
        if rule is None:
            logits = model(e)
        else:
            with NonlinearityInterceptor(rule):  # type: ignore[arg-type]
                logits = model(e)
        phi = -logits.log_softmax(1).gather(1, classes).sum()
        torch.autograd.grad(phi, mask)

    def observe(_index: int, _name: str, h: torch.Tensor) -> torch.Tensor:
        return h

    def identity_gate(_index: int, _name: str, h: torch.Tensor) -> torch.Tensor:
        return GradientGate.apply(h, lambda _h, grad: grad)

    pieces: dict[str, Callable[[], object]] = {
        "plain fwd+bwd to the input": lambda: _plain(model, x),
        "+ e = m·x, gradient to m": lambda: gated(None),
        "+ interceptor (observes, gates nothing)": lambda: gated(observe),
        "+ an identity gate per call": lambda: gated(identity_gate),
        "+ the rule in that gate (general path)": lambda: gated(GeneralRule(bounds)),
        "defence as it runs (fused ReLU/ReLU6 gate)": lambda: gated(DefenceRule(bounds)),
    }
    times: dict[str, list[float]] = {label: [] for label in pieces}
    for fn in pieces.values():
        fn()
    # Round robin: every round runs each piece once, so each ratio compares passes timed
    # within a fraction of a second of each other.
    for _ in range(rounds):
        for label, fn in pieces.items():
            times[label].append(timed(fn))
    plain = times["plain fwd+bwd to the input"]
    rows = []
    for label, values in times.items():
        ratios = [t / p for t, p in zip(values, plain, strict=True)]
        low, mid, high = statistics.quantiles(ratios, n=4, method="inclusive")
        rows.append((label, statistics.median(values), mid, f"{low:.2f}–{high:.2f}×"))
    return rows


def _plain(model: torch.nn.Module, x: torch.Tensor) -> None:
    inp = x.clone().requires_grad_(True)
    torch.autograd.grad(model(inp)[:, 0].sum(), inp)


if __name__ == "__main__":
    main()
