"""Perturbation methods side by side with their peers, in one run, on the built-in Lite0.

    python benchmarks/perturbation_speed.py [--masks 500] [--samples 200] [--repeats 1]
        [--photos 2] [--threads 2] [--cpu-time] [--only occlusion|lime|rise]

Same photos (scikit-image's chelsea, coffee and astronaut at 224 × 224), same threads
(``torch.set_num_threads(threads)``), the same model instance, each peer at the same settings:

* occlusion vs Captum ``Occlusion`` at the same window and stride (2-D on the photos; 3-D on
  a small volume through a tiny 3-D CNN), Captum at its default ``perturbations_per_eval=1``
  and at 32;
* LIME / KernelSHAP vs Captum ``Lime`` / ``KernelShap`` at the same number of samples and the
  same SLIC feature mask (Captum at ``perturbations_per_eval=32``; its default 1 is shown too);
* RISE vs a re-implementation of TorchRay's ``rise`` loop (TorchRay needs torchvision, which
  does not import here): masks regenerated per call in chunks of 32 with a Python loop for
  the shifts, one forward of 32 masked copies per image and chunk, a sigmoid and the saliency
  of all 1000 classes accumulated (its ``(classes, H·W)`` matmul), at the same number and size
  of masks (7 × 7 cells, p = 0.5); run interleaved round by round with ours at its default
  chunk and at TorchRay's 32, and with TorchRay's loop accumulating the explained class only.

On a shared machine use ``--threads 1 --cpu-time``: the CPU seconds of one thread measure the
work; the wall clock measures the other jobs, and with two threads the CPU time counts the
threads' spin-waiting.

Prints a Markdown table of seconds per image and per mask / sample.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import evidencemap as em

CLOCK = time.perf_counter
"""Wall-clock seconds; ``--cpu-time``: the process's CPU seconds (meaningful with one thread
on a shared machine, where other jobs stretch the wall clock)."""


def timed(fn: Callable[[], object], repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = CLOCK()
        fn()
        best = min(best, CLOCK() - start)
    return best


def interleaved(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """The best time of each function over ``repeats`` rounds, run one after the other in
    each round (so a change in the machine's load touches them alike)."""
    best = [math.inf] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = CLOCK()
            fn()
            best[i] = min(best[i], CLOCK() - start)
    return best


def torchray_style_rise(
    model: nn.Module,
    x: Tensor,
    num_masks: int,
    cells: int = 7,
    classes: list[int] | None = None,
) -> Tensor:
    """TorchRay's loop, re-implemented (its package cannot import here): see the module.
    ``classes`` (one per image): accumulate that class only instead of all of them (not
    TorchRay's; shows what the all-class product costs)."""
    with torch.no_grad():
        n, _, h, w = x.shape
        saliency = torch.zeros(n, model(x).shape[1], h, w)
        cell = (math.ceil(h / cells), math.ceil(w / cells))
        up = (h + cell[0], w + cell[1])
        gen_state = torch.get_rng_state()
        torch.manual_seed(0)
        for chunk in range(math.ceil(num_masks / 32)):
            bs = min(32, num_masks - 32 * chunk)
            grid = (torch.rand(bs, 1, cells, cells) < 0.5).float()
            pad = F.pad(grid, (1, 1, 1, 1), mode="reflect")
            size = [cell[i] * (cells + 2) for i in range(2)]
            big = F.interpolate(pad, size, mode="bilinear", align_corners=False)
            big = big[:, :, cell[0] : cell[0] + up[0], cell[1] : cell[1] + up[1]]
            masks = torch.empty(bs, 1, h, w)
            sx = torch.randint(0, cell[0], (bs,))
            sy = torch.randint(0, cell[1], (bs,))
            for i in range(bs):
                masks[i] = big[i, :, sx[i] : sx[i] + h, sy[i] : sy[i] + w]
            for i, inp in enumerate(x):
                out = torch.sigmoid(model(inp.unsqueeze(0) * masks))
                if classes is not None:
                    k = classes[i]
                    sal = out[:, k : k + 1].transpose(0, 1) @ masks.view(bs, h * w)
                    saliency[i, k] = saliency[i, k] + sal.view(h, w)
                    continue
                sal = out.transpose(0, 1) @ masks.view(bs, h * w)
                saliency[i] = saliency[i] + sal.view(-1, h, w)
        torch.set_rng_state(gen_state)
        return saliency / num_masks


class Tiny3D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv3d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool3d(1),
            nn.Flatten(),
            nn.Linear(32, 2),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--masks", type=int, default=500)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--photos", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-time", action="store_true", help="CPU seconds, not wall-clock")
    parser.add_argument(
        "--only", choices=("occlusion", "lime", "rise"), default=None, help="one comparison"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time
    from captum.attr import KernelShap, Lime, Occlusion
    from skimage import data

    from evidencemap import models
    from evidencemap.methods.surrogate import slic_features

    lite0 = models.load("efficientnet-lite0")
    model = lite0.module
    names = ["chelsea", "coffee", "astronaut"][: args.photos]
    x = torch.stack([lite0.preprocess(getattr(data, n)()) for n in names])
    with torch.no_grad():
        classes = model(x).argmax(1).tolist()
    rows: list[tuple[str, str, float, float, int]] = []

    def row(what: str, peer: str, ours: float, theirs: float, count: int) -> None:
        rows.append((what, peer, ours, theirs, count))
        print(f"{what}: ours {ours:.2f} s, {peer} {theirs:.2f} s", flush=True)

    per = len(names)
    if args.only in (None, "occlusion"):
        # occlusion 2-D: window 56, stride 28 → 7 × 7 = 49 windows per image
        ours = timed(
            lambda: em.explain(model, x, "occlusion", target=classes, window=56, stride=28),
            args.repeats,
        )
        occ = Occlusion(model)
        for ppe in (1, 32):
            theirs = timed(
                lambda ppe=ppe: [
                    occ.attribute(
                        x[i : i + 1],
                        sliding_window_shapes=(3, 56, 56),
                        strides=(3, 28, 28),
                        baselines=0,
                        target=classes[i],
                        perturbations_per_eval=ppe,
                    )
                    for i in range(per)
                ],
                args.repeats,
            )
            row(
                "occlusion 2-D 224², window 56, stride 28 (49 windows)",
                f"Captum ppe={ppe}",
                ours / per,
                theirs / per,
                49,
            )
        # occlusion 3-D
        vol_model = Tiny3D().eval()
        vol = torch.randn(2, 1, 32, 48, 48, generator=torch.Generator().manual_seed(0))
        ours = timed(
            lambda: em.explain(vol_model, vol, "occlusion", target=[0, 1], window=8, stride=8),
            args.repeats,
        )
        for ppe in (1, 32):
            theirs = (
                timed(
                    lambda ppe=ppe: [
                        occ3.attribute(
                            vol[i : i + 1],
                            sliding_window_shapes=(1, 8, 8, 8),
                            strides=(1, 8, 8, 8),
                            baselines=0,
                            target=i,
                            perturbations_per_eval=ppe,
                        )
                        for i in range(2)
                    ],
                    args.repeats,
                )
                if (occ3 := Occlusion(vol_model))
                else 0.0
            )
            row(
                "occlusion 3-D 32×48×48, window 8, stride 8 (144 windows)",
                f"Captum ppe={ppe}",
                ours / 2,
                theirs / 2,
                144,
            )
    if args.only in (None, "lime"):
        # LIME / KernelSHAP on the same SLIC superpixels
        ids = slic_features(x, 50)
        s = args.samples
        for name, cls in (("lime", Lime), ("kernel_shap", KernelShap)):
            ours = timed(
                lambda name=name: em.explain(
                    model, x, name, target=classes, samples=s, features=ids, score="logit"
                ),
                args.repeats,
            )
            peer = cls(model)
            theirs = timed(
                lambda peer=peer: [
                    peer.attribute(
                        x[i : i + 1],
                        target=classes[i],
                        feature_mask=ids[i : i + 1].unsqueeze(1),
                        n_samples=s,
                        perturbations_per_eval=32,
                        baselines=0,
                    )
                    for i in range(per)
                ],
                args.repeats,
            )
            row(f"{name}, {s} samples, SLIC 50", "Captum ppe=32", ours / per, theirs / per, s)
    # RISE, interleaved: ours (its CPU chunk by measurement), ours at TorchRay's chunk of 32,
    # TorchRay's loop
    if args.only in (None, "rise"):
        m = args.masks
        ours, ours32, theirs, theirs1 = interleaved(
            [
                lambda: em.explain(model, x, "rise", target=classes, masks=m),
                lambda: em.explain(
                    model, x, "rise", target=classes, masks=m, internal_batch_size=32
                ),
                lambda: torchray_style_rise(model, x, m),
                lambda: torchray_style_rise(model, x, m, classes=classes),
            ],
            args.repeats,
        )
        what = f"RISE, {m} masks 224², 7×7 cells"
        peer = "TorchRay loop (re-implemented)"
        row(what, peer, ours / per, theirs / per, m)
        row(what + ", ours at chunk 32", peer, ours32 / per, theirs / per, m)
        row(what, peer + ", the explained class only", ours / per, theirs1 / per, m)
        row(
            what + ", ours at chunk 32",
            peer + ", the explained class only",
            ours32 / per,
            theirs1 / per,
            m,
        )

    print()
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, photos: "
        f"{', '.join(names)}, {'CPU' if args.cpu_time else 'wall-clock'} seconds"
    )
    print()
    print("| method | peer | ours s/image | peer s/image | peer / ours | ours ms per pass |")
    print("|---|---|---:|---:|---:|---:|")
    for what, peer, a, b, count in rows:
        print(f"| {what} | {peer} | {a:.2f} | {b:.2f} | {b / a:.2f}× | {1000 * a / count:.1f} |")


if __name__ == "__main__":
    main()
