"""FGVis' default schedule (``schedule="auto"``) on both networks: which schedule ran and why,
and whether its maps are usable.

Networks and images:

* the built-in EfficientNet-Lite0 (224×224): chelsea, coffee, astronaut, rocket, and two object
  crops pasted into known boxes of ``brick()`` (the cat of chelsea, the cup of coffee);
* the built-in VGG16 brain-MRI classifier (``vgg16-brain-mri``, 240×240, no batch norm, a bias
  on every convolution): axial MNI152 template slices (``MNI`` below; grey, so the mask is
  channel-shared automatically, and the black background equals the reference, so it carries
  no mask).

Per image, with the defaults except ``max_iterations`` (shared by the two stages of the
localising schedule): the schedule and its reason (the defence's pass share), p(e)/p(x), the
mean mask over the positions that can change e, ``map_spread``, the noise check
p(e + ε)/p(x) (8 draws, σ = 0.1), the map's concentration (its mass in the object's box —
the pasted object, the photo's object in ``PHOTO_BOXES`` — or in the brain — MRI — divided by
that region's share of the area; 1 = no concentration, at most 1 / (area share); the brain is
the part of the slice that differs from the reference), and
seconds per image. Then the deletion game with the defaults on the README photos, and the
generation game towards each image's least likely class with the default schedule (λ = 0,
with and without the defence; ``--only generation`` runs these rows alone).

Writes Markdown to stdout (row by row) and ``benchmarks/results/fgvis_auto.png``.
Run: ``python benchmarks/fgvis_auto.py > benchmarks/results/fgvis_auto.md``
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import matplotlib
import numpy as np
import torch
from skimage import data

import evidencemap as em
from evidencemap import models
from evidencemap.methods.fgvis import FGVisWarning

sys.path.insert(0, str(Path(__file__).parent))
from fgvis_localise import PASTED, PHOTOS, pasted_scene

matplotlib.use("Agg")
import matplotlib.pyplot as plt

FIGURE = Path(__file__).parent / "results" / "fgvis_auto.png"
SCENES = (PASTED[0], PASTED[2])  # cat on brick, cup on brick
# The object of each photo's class as a box (top, bottom, left, right) of the 224×224 input
# (shorter side resized to 256, centre crop): the cup of "espresso" (with its handle, without
# the saucer), the black helmet of "football helmet" (bottom right), the rocket of "missile".
# Chelsea's cat fills the frame: no box.
PHOTO_BOXES = {
    "coffee": (0, 170, 30, 182),
    "astronaut": (155, 224, 122, 224),
    "rocket": (40, 224, 95, 135),
}
BOXES = {
    **PHOTO_BOXES,
    **{name: (top, top + side, left, left + side) for name, *_, top, left, side in SCENES},
}


def lite0_inputs(model: models.LoadedModel) -> tuple[torch.Tensor, list[str], list]:
    pre = model.preprocess
    images = [pre(getattr(data, name)()) for name in PHOTOS]
    names: list[str] = list(PHOTOS)
    regions: list = []
    for name in PHOTOS:
        box = PHOTO_BOXES.get(name)
        region = None
        if box is not None:
            region = torch.zeros(224, 224, dtype=torch.bool)
            region[box[0] : box[1], box[2] : box[3]] = True
        regions.append(region)
    mean = torch.tensor(pre.mean).view(3, 1, 1)
    std = torch.tensor(pre.std).view(3, 1, 1)
    for name, photo, rows, cols, texture, top, left, side in SCENES:
        scene = pasted_scene(photo, rows, cols, texture, top, left, side)
        x = torch.from_numpy(scene).permute(2, 0, 1).float()
        images.append((x - mean) / std)
        names.append(name)
        region = torch.zeros(224, 224, dtype=torch.bool)
        region[top : top + side, left : left + side] = True
        regions.append(region)
    return torch.stack(images).contiguous(), names, regions


def concentration(raw: torch.Tensor, region: torch.Tensor | None) -> str:
    if region is None:
        return "–"
    mass = float(raw.sum())
    if mass <= 0:
        return "– (no mass)"
    share = float(raw[region].sum()) / mass
    return f"{share / (float(region.sum()) / region.numel()):.2f}"


def flush(text: str = "") -> None:
    print(text, flush=True)


def table(model, x, names, regions, labels, iterations, game="preserve"):
    start = time.perf_counter()
    exp = em.explain(
        model, x, "fgvis", game=game, max_iterations=iterations,
        progress=lambda it, info: print(it, file=sys.stderr, flush=True) if it % 10 == 0 else None,
    )  # fmt: skip
    seconds = (time.perf_counter() - start) / x.shape[0]
    e = exp.extras
    # Grad-CAM's map of the same class, as a reference for the concentration
    cam = em.explain(model, x, "gradcam", target=exp.targets).maps
    for i, name in enumerate(names):
        c = int(exp.targets[i])
        share = e.get("defence_pass_share")
        flush(
            f"| {name} | {c} {labels[c][:18]} | {e['schedule'][i]} "
            f"| {'–' if share is None else f'{float(share[i]):.4f}'} "
            f"| {float(e['score'][i] / e['image_score'][i]):.3f} "
            f"| {'yes' if bool(e['satisfied'][i]) else 'no'} "
            f"| {float(e['mask_mean'][i]):.3f} | {float(e['map_spread'][i]):.3f} "
            f"| {float(e['noise_ratio'][i]):.3f} | {concentration(exp.raw[i, 0], regions[i])} "
            f"| {concentration(cam[i, 0], regions[i])} "
            f"| {int(e['iterations'][i])} | {seconds:.1f} |"
        )
    return exp, seconds


HEADER = (
    "| image | class | schedule | pass share | p(e)/p(x) | met | mean mask | map spread | noise "
    "| concentration | Grad-CAM conc. | steps | s / image |"
    "\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


GENERATION_HEADER = (
    "| image | target (least likely) | p(x) | defence | schedule | p(e) | top-1 on e | s / image |"
    "\n|---|---|---|---|---|---|---|---|"
)


def generation(model, x, names, labels, iterations) -> None:
    """Generation towards each image's least likely class with the default schedule
    (``"auto"``: the generation game keeps the paper's rule), λ = 0, ``iterations`` steps,
    with and without the defence (the images of one network together)."""
    with torch.no_grad():
        least = model(x).argmin(1)
    for defence in (True, False):
        start = time.perf_counter()
        g = em.explain(
            model, x, "fgvis", target=least, lam=0.0, defence=defence, transfer="none",
            max_iterations=iterations, patience=iterations,
        )  # fmt: skip
        seconds = (time.perf_counter() - start) / x.shape[0]
        e = g.extras
        for i, name in enumerate(names):
            c, top = int(least[i]), int(e["top1"][i])
            flush(
                f"| {name} | {c} {labels[c][:20]} | {float(e['image_score'][i]):.2e} "
                f"| {'on' if defence else 'off'} | {e['schedule'][i]} "
                f"| {float(e['score'][i]):.3g} | {top} {labels[top][:20]} | {seconds:.1f} |"
            )


def generation_tables(args: argparse.Namespace) -> None:
    """The generation rows alone (``--only generation``): Lite0 on its six images, VGG16 on
    the MRI slices."""
    flush(
        "\n## Generation towards each image's least likely class (default schedule)\n\n"
        f"λ = 0, {args.gen_iterations} steps (no early stop), the default `schedule='auto'`.\n"
    )
    networks = args.gen_networks.split(",")
    if "lite0" in networks:
        lite0 = models.load("efficientnet-lite0")
        x, names, _ = lite0_inputs(lite0)
        flush("### EfficientNet-Lite0\n")
        flush(GENERATION_HEADER)
        generation(lite0, x, names, lite0.labels, args.gen_iterations)
    if "mri" in networks:
        vgg = models.load("vgg16-brain-mri")
        from evidencemap.models.vgg16_mri import mni152_slices

        indices = [int(s) for s in args.slices.split(",")]
        flush("\n### VGG16 brain MRI\n")
        flush(GENERATION_HEADER)
        generation(
            vgg, mni152_slices(indices).contiguous(), [f"MNI z{k}" for k in indices],
            vgg.labels, args.gen_iterations,
        )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--mri-iterations", type=int, default=100)
    parser.add_argument("--slices", default="62,82")
    parser.add_argument("--gen-iterations", type=int, default=100)
    parser.add_argument("--gen-networks", default="lite0,mri", help="networks of --only generation")
    parser.add_argument("--preserve-only", action="store_true", help="skip the deletion tables")
    parser.add_argument("--only", choices=("lite0", "mri", "generation"), default=None)
    args = parser.parse_args()
    if args.only == "generation":
        torch.set_num_threads(1)
        warnings.simplefilter("ignore", FGVisWarning)
        generation_tables(args)
        return
    if args.only == "mri":
        vgg, xm, mnames, mkeep, mdrop = mri(args)
        figure([(vgg, xm, mkeep, mdrop, mnames)], FIGURE.with_name("fgvis_auto_mri.png"))
        return
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", FGVisWarning)
    lite0 = models.load("efficientnet-lite0")
    x, names, regions = lite0_inputs(lite0)
    flush("# FGVis' default schedule on EfficientNet-Lite0 and VGG16\n")
    flush(
        f"torch {torch.__version__}, {platform.machine()}, 1 thread, load average at start "
        f"{tuple(round(v, 2) for v in os.getloadavg())} (a shared 2-core machine: seconds are "
        f"only comparable within a table). Defaults except `max_iterations` ({args.iterations} "
        f"on Lite0, {args.mri_iterations} on VGG16; the localising schedule shares them "
        "between its two stages). Images of one network are optimised together.\n"
    )
    flush("## Preservation, EfficientNet-Lite0 (224×224)\n")
    flush(HEADER)
    keep, _ = table(lite0, x, names, regions, lite0.labels, args.iterations)
    drop = None
    if not args.preserve_only:
        flush("\n## Deletion, EfficientNet-Lite0, the README photos\n")
        flush(HEADER)
        drop, _ = table(
            lite0, x[:4], names[:4], regions[:4], lite0.labels, args.iterations, "delete"
        )

    if args.only == "lite0":
        figure([(lite0, x, keep, drop, names)], FIGURE.with_name("fgvis_auto_lite0.png"))
        return
    vgg, xm, mnames, mkeep, mdrop = mri(args)
    generation_tables(args)
    figure([(lite0, x, keep, drop, names), (vgg, xm, mkeep, mdrop, mnames)], FIGURE)


def mri(args: argparse.Namespace) -> tuple:
    vgg = models.load("vgg16-brain-mri")
    from evidencemap.models.vgg16_mri import mni152_slices

    indices = [int(s) for s in args.slices.split(",")]
    xm = mni152_slices(indices).contiguous()
    mnames = [f"MNI z{k}" for k in indices]
    brain = [(xm[i] != 0).any(0) for i in range(len(indices))]
    flush("\n## Preservation, VGG16 brain MRI (240×240)\n")
    flush(HEADER)
    mkeep, _ = table(vgg, xm, mnames, brain, vgg.labels, args.mri_iterations)
    mdrop = None
    if not args.preserve_only:
        flush("\n## Deletion, VGG16 brain MRI\n")
        flush(HEADER)
        mdrop, _ = table(vgg, xm, mnames, brain, vgg.labels, args.mri_iterations, "delete")
    return vgg, xm, mnames, mkeep, mdrop


def figure(networks: list, path: Path) -> None:
    """Per image: the input, the preservation map (0–1), e, the deletion map (0–1)."""
    rows = [
        (model, inputs, keep, drop, i, names[i])
        for model, inputs, keep, drop, names in networks
        for i in range(len(names))
    ]
    fig, axes = plt.subplots(len(rows), 4, figsize=(12, 3 * len(rows)), squeeze=False)
    for r, (model, inputs, k, d, i, name) in enumerate(rows):
        ax = axes[r]
        ax[0].imshow((model.preprocess.to_pixels(inputs[i]) / 255).permute(1, 2, 0).cpu())
        ax[0].set_title(name)
        if name in BOXES:
            top, bottom, left, right = BOXES[name]
            ax[0].add_patch(
                plt.Rectangle((left, top), right - left, bottom - top, fill=False, color="lime")
            )
        ax[1].imshow(k.raw[i, 0], cmap="inferno", vmin=0, vmax=1)
        ax[1].set_title(f"keep map ({k.extras['schedule'][i]}), 0–1")
        shown = k.extras["explanation"][i]
        ax[2].imshow((model.preprocess.to_pixels(shown) / 255).permute(1, 2, 0).cpu())
        ax[2].set_title(f"e: p(e)/p(x) {float(k.extras['score'][i] / k.scores[i]):.2f}")
        if d is not None and i < d.raw.shape[0]:
            ax[3].imshow(d.raw[i, 0], cmap="inferno", vmin=0, vmax=1)
            ax[3].set_title(f"delete map ({d.extras['schedule'][i]}), 0–1")
    for a in axes.flat:
        a.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=55)
    flush(
        f"\nFigure: `{path.name}` (per image: the input, the preservation map on the fixed 0–1 "
        "scale, e, the deletion map)."
    )


if __name__ == "__main__":
    _ = np
    main()
