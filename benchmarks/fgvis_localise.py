"""FGVis on EfficientNet-Lite0: does the preservation map localise? The paper's rule against the
experimental coarse schedule, on real photos and on objects pasted at known boxes.

Scenes: chelsea, coffee, astronaut, rocket (no box), and object crops pasted into a known box of
a texture (``skimage.data.brick()`` / ``grass()``): the cat of chelsea, the cup of coffee, the
rocket. All scenes are optimised together in one batch per rule. Per scene and rule:

* ``p(e)/p(x)``, the mean mask, ``map_spread`` (share of the map's mass in its top 10 % pixels;
  0.1 = flat), ``degenerate`` (the library's flag);
* box: (the map's mass inside the box / its total mass) / (box area / image area): 1 = the box
  gets its share by area only, larger = the map concentrates in the box;
* noise: mean ``p(e + ε)/p(x)`` over 8 draws ``ε ~ N(0, 0.1²)`` (fixed seed); transfer: ``p(e)/p(x)`` on
  EfficientNet-Lite1 and Lite2 (the same normalisation, any input size);
* the defence's diagnostics (``defence_pass_share``, ``units_out_of_bounds``);
* seconds per image (batch time / scenes).

And the defence's purpose: the generation game (fixed λ = 0) towards chelsea's least likely
class, under each rule: its probability on ``e``.

Writes Markdown to stdout and ``benchmarks/results/fgvis_localise.png``.
Run: ``python benchmarks/fgvis_localise.py > benchmarks/results/fgvis_localise.md``
(``--iterations`` sets ``max_iterations`` of every run, 150 by default to fit ~15 minutes on
2 cores; the library's default is 300).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from pathlib import Path

import matplotlib
import numpy as np
import torch
from skimage import data, transform

import evidencemap as em
from evidencemap import models
from evidencemap.methods.fgvis import FGVisDegenerateWarning
from evidencemap.methods.fgvis.diagnostics import noise_check, transfer_check

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
# (name, source photo, crop rows, crop cols, texture, box top, box left, box side)
PASTED = (
    ("cat on brick", "chelsea", (20, 290), (80, 350), "brick", 20, 90, 120),
    ("cat on grass", "chelsea", (20, 290), (80, 350), "grass", 90, 10, 120),
    ("cup on brick", "coffee", (40, 330), (130, 470), "brick", 80, 80, 128),
    ("rocket on grass", "rocket", (0, 427), (200, 440), "grass", 10, 120, 100),
)
FIGURE = Path(__file__).parent / "results" / "fgvis_localise.png"
SIDE = 224


def rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


def pasted_scene(
    photo: str,
    rows: tuple[int, int],
    cols: tuple[int, int],
    texture: str,
    top: int,
    left: int,
    side: int,
) -> np.ndarray:
    """A 224×224 uint8 RGB scene: the texture with the photo's crop resized into the box."""
    canvas = transform.resize(rgb(getattr(data, texture)()), (SIDE, SIDE), anti_aliasing=True)
    crop = rgb(getattr(data, photo)())[rows[0] : rows[1], cols[0] : cols[1]]
    crop = transform.resize(crop, (side, side), anti_aliasing=True)
    canvas[top : top + side, left : left + side] = crop
    return (canvas * 255).round().astype(np.uint8)


def pixels(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (model.preprocess.to_pixels(x) / 255).permute(1, 2, 0).cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=150)
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore", FGVisDegenerateWarning)
    model = models.load("efficientnet-lite0")
    labels = model.labels
    pre = model.preprocess
    images = [pre(getattr(data, name)()) for name in PHOTOS]
    boxes: list[tuple[int, int, int] | None] = [None] * len(PHOTOS)
    names = list(PHOTOS)
    for name, photo, rows, cols, texture, top, left, side in PASTED:
        scene = pasted_scene(photo, rows, cols, texture, top, left, side)
        # The scene already is 224×224: normalise it without the resize-and-crop.
        x = torch.from_numpy(scene).permute(2, 0, 1).float()
        mean = torch.tensor(pre.mean).view(3, 1, 1)
        std = torch.tensor(pre.std).view(3, 1, 1)
        images.append((x - mean) / std)
        boxes.append((top, left, side))
        names.append(name)
    x = torch.stack(images).contiguous()
    n = len(names)
    others = [
        (name, models.load(name))
        for name in ("efficientnet-lite1", "efficientnet-lite2")
        if name in models.available()
    ]

    print("# FGVis: localising the preservation map on EfficientNet-Lite0\n")
    print(
        f"torch {torch.__version__}, {platform.machine()}, 2 threads, input {SIDE}×{SIDE}, load "
        f"average at start {tuple(round(v, 2) for v in os.getloadavg())}. Preservation game, "
        f"`lam='auto'`, defence on, `max_iterations={args.iterations}` for every run (the "
        "library's default is 300; fewer here to fit the run in ~15 minutes on 2 cores), other "
        f"options at their defaults; the coarse schedule with `coarse_size=7`. {n} scenes "
        "optimised together per rule; s / image = batch time / scenes. Noise check: 8 draws, σ = 0.1 "
        "(normalised space), transfer to " + ", ".join(name for name, _ in others) + ".\n"
    )
    runs = {}
    seconds = {}
    for rule, options in (("paper", {}), ("coarse", {"schedule": "coarse"})):
        start = time.perf_counter()
        runs[rule] = em.explain(model, x, "fgvis", max_iterations=args.iterations, **options)
        seconds[rule] = (time.perf_counter() - start) / n

    print(
        "| scene | class | rule | p(e)/p(x) | mean mask | map spread | degenerate | box "
        "concentration | noise | "
        + " | ".join(f"transfer {k[-5:]}" for k, _ in others)
        + " | pass share | units out | s / image |"
    )
    print("|" + "---|" * (12 + len(others) - 1))
    for i, name in enumerate(names):
        for rule, exp in runs.items():
            e = exp.extras
            c = int(exp.targets[i])
            ratio = float(e["score"][i] / e["image_score"][i])
            if "noise_ratio" in e:
                noise = e["noise_ratio"][i]
                transfer = e["transfer_ratio"][i]
            else:
                noise = noise_check(
                    model,
                    e["explanation"][i : i + 1],
                    exp.targets[i : i + 1],
                    e["image_score"][i : i + 1],
                )[0]
                transfer = transfer_check(
                    [m for _, m in others],
                    x[i : i + 1],
                    e["explanation"][i : i + 1],
                    exp.targets[i : i + 1],
                )[0]
            box = "–"
            if boxes[i] is not None:
                top, left, side = boxes[i]
                raw = exp.raw[i, 0]
                inside = float(raw[top : top + side, left : left + side].sum())
                share = inside / max(float(raw.sum()), 1e-30)
                box = f"{share / (side * side / raw.numel()):.2f}"
            cells = " | ".join(f"{float(v):.3f}" for v in transfer)
            print(
                f"| {name} | {c} {labels[c][:18]} | {rule} | {ratio:.3f} "
                f"| {float(e['mask_mean'][i]):.3f} | {float(e['map_spread'][i]):.3f} "
                f"| {'yes' if bool(e['degenerate'][i]) else 'no'} | {box} | {float(noise):.3f} "
                f"| {cells} | {float(e['defence_pass_share'][i]):.4f} "
                f"| {float(e['units_out_of_bounds'][i]):.3f} | {seconds[rule]:.1f} |"
            )
    print()

    x1 = x[:1]
    with torch.no_grad():
        least = model(x1).argmin(1)
    print(
        "## The defence's purpose: generation game towards chelsea's least likely class\n\n"
        f"Target {int(least)} {labels[int(least)]}; fixed λ = 0, {args.iterations} steps per "
        "stage.\n"
    )
    print("| rule | defence | p(x) | p(e) | top-1 on e | s |")
    print("|---|---|---|---|---|---|")
    for rule, options in (
        ("paper", {}),
        ("coarse", {"schedule": "coarse", "transfer": "none"}),
        ("paper", {"defence": False}),
    ):
        start = time.perf_counter()
        g = em.explain(
            model,
            x1,
            "fgvis",
            target=least,
            lam=0.0,
            max_iterations=args.iterations,
            patience=args.iterations,
            **options,
        )
        top = int(g.extras["top1"][0])
        print(
            f"| {rule} | {'off' if options.get('defence') is False else 'on'} "
            f"| {float(g.extras['image_score'][0]):.2e} | {float(g.extras['score'][0]):.3g} "
            f"| {top} {labels[top][:20]} | {time.perf_counter() - start:.1f} |"
        )
    print()

    fig, axes = plt.subplots(n, 5, figsize=(15, 3 * n))
    for i, name in enumerate(names):
        row = axes[i]
        row[0].imshow(pixels(model, x[i]))
        row[0].set_title(name)
        if boxes[i] is not None:
            top, left, side = boxes[i]
            row[0].add_patch(plt.Rectangle((left, top), side, side, fill=False, color="lime"))
        for j, rule in enumerate(("paper", "coarse")):
            exp = runs[rule]
            row[1 + 2 * j].imshow(
                exp.raw[i, 0], cmap="inferno", vmin=0, vmax=max(float(exp.raw[i].max()), 1e-6)
            )
            row[1 + 2 * j].set_title(
                f"{rule}: mean {float(exp.extras['mask_mean'][i]):.3f}, "
                f"spread {float(exp.extras['map_spread'][i]):.2f}"
            )
            shown = exp.extras["explanation"][i]
            lo, hi = float(shown.min()), float(shown.max())
            row[2 + 2 * j].imshow(((shown - lo) / max(hi - lo, 1e-6)).permute(1, 2, 0))
            row[2 + 2 * j].set_title(
                f"e, stretched; p(e)/p(x) {float(exp.extras['score'][i] / exp.scores[i]):.2f}"
            )
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=60)
    print(
        f"Figure: `{FIGURE.name}` (per scene: the image with its box, then per rule the map on "
        "its own 0–max scale and e stretched to its range)."
    )


if __name__ == "__main__":
    main()
