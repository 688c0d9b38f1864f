"""Extremal perturbation per iteration, side by side with TorchRay's loop, in one run on Lite0.

    python benchmarks/extremal_speed.py [--iterations 12] [--rounds 3] [--threads 1] [--wall]

TorchRay's ``extremal_perturbation`` needs torchvision, which does not import here, so its
per-iteration loop is re-implemented below from its published algorithm (one image per call,
all its areas as a batch): ``MaskGenerator.generate`` (``F.unfold`` of the padded parameters,
nearest upsampling, the precomputed ``(1, K², H', W')`` kernel, the softmax pooling over the
``K²`` channel axis, the crop of the margin), ``Perturbation.apply`` (two gathers from the
expanded 8-level blur pyramid), the jitter flip, the forward and backward pass, the sort of the
mask with its margin against the reference, and ``optim.SGD(momentum=0.9, dampening=0.9)``
with the clamp of the parameters.

Measured in the same process, interleaved round by round, the same model instance and photos
(chelsea, coffee, astronaut, rocket at 224²), the same threads:

* ours: ``em.explain(..., "extremal", max_iterations=T)``, each iteration timed between two
  progress reports (the run's set-up and the final scoring pass are not counted);
* TorchRay's loop, each iteration timed; at batch 4 it runs the four images one after the
  other (its function takes one image), so its time per iteration is the sum of four;
* a plain forward + backward pass to the input at the same batch.

Prints the median seconds per iteration over all rounds and the ratios. CPU seconds of the
process with one thread by default: on a shared machine the wall clock mostly measures the other
jobs, and with two threads the CPU time counts the threads' spin-waiting (a forward + backward
pass of one image took 0.39 CPU s with 2 threads and 0.063 s with 1 in the same minute).
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import evidencemap as em
from evidencemap import runtime
from evidencemap.filters import gaussian_filter

CLOCK = time.process_time
"""CPU seconds of the process (all its threads): the machine is shared, and the work each
loop does is what is compared; ``--wall`` switches to wall-clock seconds."""


class TorchRayLoop:
    """TorchRay's extremal perturbation for one image ``(1, C, H, W)``, re-implemented."""

    def __init__(
        self,
        model: nn.Module,
        x: Tensor,
        target: int,
        areas: list[float],
        step: int = 7,
        sigma: float = 21.0,
        levels: int = 8,
        max_blur: float = 20.0,
    ) -> None:
        self.model, self.target, self.areas = model, target, areas
        self.pyramid = torch.cat(
            [
                x
                if s == 1
                else gaussian_filter(
                    x, (1 - s) * max_blur, radius=math.ceil(4 * (1 - s) * max_blur), padding="zero"
                )
                for s in torch.linspace(0, 1, levels).tolist()
            ]
        )
        self.levels = levels
        h, w = x.shape[2:]
        self.step, self.sigma = step, sigma
        self.margin = sigma
        self.padding = 1 + math.ceil((self.margin + sigma) / step)
        self.radius = 1 + math.ceil(sigma / step)
        self.shape_in = [math.ceil(z / step) for z in (h, w)]
        k = 2 * self.radius + 1
        self.shape_mid = [z + 2 * self.padding - k + 1 for z in self.shape_in]
        self.shape_up = [step * z for z in self.shape_mid]
        self.shape_out = [z - step + 1 for z in self.shape_up]
        self.shape = (h, w)
        weight = torch.zeros(1, k * k, *self.shape_out)
        uy, ux = torch.meshgrid(
            torch.arange(self.shape_out[0], dtype=torch.float32),
            torch.arange(self.shape_out[1], dtype=torch.float32),
            indexing="ij",
        )
        inv = [m / u for m, u in zip(self.shape_mid, self.shape_up, strict=True)]
        for ky in range(k):
            for kx in range(k):
                iy = torch.floor(inv[0] * uy) + ky - self.padding
                ix = torch.floor(inv[1] * ux) + kx - self.padding
                d = torch.sqrt(
                    (uy - (self.margin + step * iy)) ** 2 + (ux - (self.margin + step * ix)) ** 2
                )
                weight[0, ky * k + kx] = torch.exp(-2 * ((d / sigma - 0.5).clamp(min=0) ** 2))
        self.weight = weight
        area_out = math.prod(self.shape_out)
        self.reference = torch.ones(len(areas), area_out)
        for i, a in enumerate(areas):
            self.reference[i, : int(area_out * (1 - a))] = 0
        self.pmask = torch.ones(len(areas), 1, *self.shape_in)
        self.optimizer = torch.optim.SGD([self.pmask], lr=0.01, momentum=0.9, dampening=0.9)
        self.regul_weight = 300.0
        self.t = 0

    def generate(self, pmask: Tensor) -> tuple[Tensor, Tensor]:
        k = 2 * self.radius + 1
        mask = F.unfold(pmask, (k, k), padding=(self.padding,) * 2)
        mask = mask.reshape(len(pmask), -1, *self.shape_mid)
        mask = F.interpolate(mask, size=self.shape_up, mode="nearest")
        mask = F.pad(mask, (0, -self.step + 1, 0, -self.step + 1))
        mask = self.weight * mask
        mask = (mask * F.softmax(20 * mask, dim=1)).sum(dim=1, keepdim=True)
        mask = mask.clamp(0, 1)
        m = round(self.margin)
        return mask[:, :, m : m + self.shape[0], m : m + self.shape[1]], mask

    def apply(self, mask: Tensor) -> Tensor:
        n = mask.shape[0]
        w = mask.reshape(n, 1, *mask.shape[1:]) * (self.levels - 1)
        k = w.floor()
        w = w - k
        k = k.long()
        y = self.pyramid[None].expand(n, *self.pyramid.shape)
        k = k.expand(n, 1, *y.shape[2:])
        y0 = torch.gather(y, 1, k)
        y1 = torch.gather(y, 1, torch.clamp(k + 1, max=self.levels - 1))
        return ((1 - w) * y0 + w * y1).squeeze(dim=1)

    def iteration(self) -> None:
        self.pmask.requires_grad_(True)
        cropped, full = self.generate(self.pmask)
        x = self.apply(cropped)
        if self.t % 2 == 0:
            x = torch.flip(x, dims=(3,))
        y = self.model(x)
        reward = y[:, self.target].reshape(len(self.areas), -1).mean(dim=1)
        ranked = full.reshape(len(self.areas), -1).sort(dim=1)[0]
        regul = -((ranked - self.reference) ** 2).mean(dim=1) * self.regul_weight
        energy = (reward + regul).sum()
        self.optimizer.zero_grad()
        (-energy).backward()
        self.optimizer.step()
        self.pmask.data = self.pmask.data.clamp(0, 1)
        self.regul_weight *= 1.0035
        self.t += 1


def torchray_seconds(
    model: nn.Module, x: Tensor, targets: list[int], iterations: int
) -> list[float]:
    """Per-iteration seconds of TorchRay's loop over the images of ``x`` one after the other
    (a batch's iteration = the sum of its images')."""
    loops = [TorchRayLoop(model, x[i : i + 1], targets[i], [0.1]) for i in range(len(x))]
    for p in model.parameters():
        p.requires_grad_(False)  # as TorchRay does
    out = []
    for _ in range(iterations):
        start = CLOCK()
        for loop in loops:
            loop.iteration()
        out.append(CLOCK() - start)
    for p in model.parameters():
        p.requires_grad_(True)
    return out[1:]  # the first iteration warms up


def our_seconds(model: nn.Module, x: Tensor, targets: list[int], iterations: int) -> list[float]:
    stamps: list[float] = []
    with runtime.limits(progress=lambda done, total, desc: stamps.append(CLOCK())):
        em.explain(model, x, "extremal", target=targets, max_iterations=iterations)
    return [b - a for a, b in itertools.pairwise(stamps[1:])]  # the first step warms up


def plain_seconds(model: nn.Module, x: Tensor, targets: list[int], iterations: int) -> list[float]:
    for p in model.parameters():
        p.requires_grad_(False)
    idx = torch.tensor(targets)
    out = []
    for _ in range(iterations):
        start = CLOCK()
        leaf = x.detach().clone().requires_grad_(True)
        y = model(leaf)
        torch.autograd.grad(y[torch.arange(len(x)), idx].sum(), leaf)
        out.append(CLOCK() - start)
    for p in model.parameters():
        p.requires_grad_(True)
    return out[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--wall", action="store_true", help="wall-clock instead of CPU seconds")
    args = parser.parse_args()
    global CLOCK
    if args.wall:
        CLOCK = time.perf_counter
    torch.set_num_threads(args.threads)
    from skimage import data

    from evidencemap import models

    lite0 = models.load("efficientnet-lite0")
    model = lite0.module.eval()
    photos = torch.stack(
        [lite0.preprocess(getattr(data, n)()) for n in ("chelsea", "coffee", "astronaut", "rocket")]
    )
    with torch.no_grad():
        targets = model(photos).argmax(1).tolist()
    runs = {"ours": our_seconds, "torchray": torchray_seconds, "plain": plain_seconds}
    times: dict[tuple[str, int], list[float]] = {(k, b): [] for k in runs for b in (1, 4)}
    for r in range(args.rounds):
        for batch in (1, 4):
            for name, fn in runs.items():
                got = fn(model, photos[:batch], targets[:batch], args.iterations)
                times[(name, batch)] += got
                print(
                    f"round {r} batch {batch} {name}: median {statistics.median(got):.3f} s",
                    flush=True,
                )
    print()
    print(
        f"torch {torch.__version__}, threads {args.threads}, Lite0 224², area 0.1, "
        f"{args.iterations - 1} timed iterations × {args.rounds} rounds, interleaved, "
        f"{'wall-clock' if args.wall else 'CPU'} seconds"
    )
    print()
    print(
        "| batch | ours s/iter | TorchRay loop s/iter | fwd+bwd s | TorchRay / ours | "
        "ours / fwd+bwd | TorchRay / fwd+bwd |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for batch in (1, 4):
        ours, theirs, plain = (statistics.median(times[(k, batch)]) for k in runs)
        print(
            f"| {batch} | {ours:.3f} | {theirs:.3f} | {plain:.3f} | {theirs / ours:.2f}× | "
            f"{ours / plain:.2f}× | {theirs / plain:.2f}× |"
        )


if __name__ == "__main__":
    main()
