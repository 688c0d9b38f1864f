"""FGVis on the built-in EfficientNet-Lite0 (real photos) and VGG16 (an MRI slice): both games
and the defence.

For each photo (chelsea, coffee, astronaut, rocket), optimised together in one batch with the
library's defaults (``lam="auto"``, defence on):

* preservation: the target's probability on the image and on ``e = m·x``, the mean mask, λ,
  iterations, seconds (of the whole batched run, divided by the batch size);
* deletion: the probability on ``e``, the removed fraction ``mean(1 − m)``, λ, iterations;
* the defence: the generation game (preservation-style, fixed λ = 0) towards the class the model
  gives the *lowest* probability on chelsea, with and without the defence;
* why the games behave as they do on this network: under uniform dimming ``e = α·x`` (a flat
  mask α), the target's probability, the fraction of gated units whose activation leaves its
  bounds, and the norm of the defended gradient ``∂φ/∂m`` relative to the undefended one; and
  the preservation game without the defence.

Writes a Markdown table to stdout and the figure ``benchmarks/results/fgvis_report.png``.
Run: ``python benchmarks/fgvis_report.py > benchmarks/results/fgvis_report.md``
(``--size 128`` for a faster run at a reduced resolution).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import matplotlib
import torch
import torch.nn.functional as F
from skimage import data

import evidencemap as em
from evidencemap import models
from evidencemap.capture import NonlinearityInterceptor
from evidencemap.methods.fgvis import DefenceRule, record_bounds

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
FIGURE = Path(__file__).parent / "results" / "fgvis_report.png"


def pixels(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(3, H, W)`` model input → ``(H, W, 3)`` floats in [0, 1] for ``imshow``."""
    return (model.preprocess.to_pixels(x) / 255).permute(1, 2, 0).cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="input side (default 224)")
    parser.add_argument(
        "--defence-iterations", type=int, default=100, help="steps of the generation game"
    )
    parser.add_argument("--iterations", type=int, default=150, help="max_iterations on Lite0")
    parser.add_argument(
        "--mri-iterations", type=int, default=50, help="max_iterations on VGG16 (all games)"
    )
    parser.add_argument("--slice", type=int, default=62, help="axial MNI152 slice for VGG16")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = models.load("efficientnet-lite0")
    labels = model.labels
    x = torch.stack([model.preprocess(getattr(data, name)()) for name in PHOTOS])
    if args.size != 224:
        x = F.interpolate(x, size=(args.size, args.size), mode="bilinear", antialias=True)
    n = len(PHOTOS)

    print("# FGVis on EfficientNet-Lite0 and real photos\n")
    print(
        f"torch {torch.__version__}, {platform.machine()}, 2 threads, input {args.size}×{args.size}, "
        f"load average at start {tuple(round(v, 2) for v in os.getloadavg())}. "
        "Defaults: `lam='auto'`, `similarity='ce'`, `lr=0.05`, `momentum=0.9`, "
        f"`max_iterations={args.iterations}`, `patience=40`, defence on, `schedule='auto'`, "
        "reference 0 (normalised space). All four photos are optimised together in one batch; "
        "seconds = batch time / 4. Then VGG16 (brain MRI) on one MNI152 slice.\n"
    )
    results = {}
    for game in ("preserve", "delete"):
        start = time.perf_counter()
        exp = em.explain(model, x, "fgvis", game=game, max_iterations=args.iterations)
        seconds = time.perf_counter() - start
        results[game] = exp
        e = exp.extras
        if game == "preserve":
            print("## Preservation game (criterion: p(e) ≥ 0.99·p(x))\n")
            head = "| photo | class | p(x) | p(e) | p(e)/p(x) | top-1 on e | mean mask | map std |"
        else:
            print("## Deletion game (criterion: p(e) ≤ 0.1·p(x))\n")
            head = "| photo | class | p(x) | p(e) | p(e)/p(x) | top-1 on e | removed |"
        print(head + " λ | iterations | met | s / image |")
        print("|" + "---|" * (head.count("|") + 3))
        for i, name in enumerate(PHOTOS):
            c = int(exp.targets[i])
            size = float(e["mask_mean"][i]) if game == "preserve" else 1 - float(e["mask_mean"][i])
            spread = f" {float(exp.raw[i].std()):.3f} |" if game == "preserve" else ""
            ratio = float(e["score"][i]) / float(e["image_score"][i])
            print(
                f"| {name} | {c} {labels[c]} | {float(e['image_score'][i]):.3f} "
                f"| {float(e['score'][i]):.3f} | {ratio:.3f} | {int(e['top1'][i])} "
                f"| {size:.3f} |{spread} {float(e['lambda'][i]):.3g} | {int(e['iterations'][i])} "
                f"| {'yes' if bool(e['satisfied'][i]) else 'NO'} | {seconds / n:.1f} |"
            )
        print()

    # Sparser localised masks that meet the same criterion: binary masks (all channels) over the
    # top-k pixels of Grad-CAM's map. The preservation game's mask is compared with them by its
    # mean, the L1 size it minimises.
    cam = em.explain(model, x, "gradcam", target=results["preserve"].targets).maps
    fractions = (0.05, 0.1, 0.2, 0.3, 0.5)
    print(
        "## Localised masks that also meet the preservation criterion\n\n"
        "Binary masks keeping the top-k fraction of pixels of Grad-CAM's map (all channels, the "
        "rest set to the reference): p(e) for each k, and the smallest k meeting "
        "p(e) ≥ 0.99·p(x), to set against the preservation game's mean mask above.\n"
    )
    print("| photo | " + " | ".join(f"k = {k}" for k in fractions) + " | smallest k met |")
    print("|---|" + "---|" * (len(fractions) + 1))
    for i, name in enumerate(PHOTOS):
        c = int(results["preserve"].targets[i])
        flat = cam[i].flatten()
        scores, met = [], "none"
        for k in fractions:
            keep_k = (cam[i] >= flat.topk(max(1, int(k * flat.numel()))).values[-1]).to(x.dtype)
            with torch.no_grad():
                p = float(model((x[i] * keep_k)[None]).softmax(1)[0, c])
            scores.append(p)
            if met == "none" and p >= 0.99 * float(results["preserve"].scores[i]):
                met = str(k)
        print(f"| {name} | " + " | ".join(f"{p:.3f}" for p in scores) + f" | {met} |")
    print()

    # The defence: generation game towards the least likely class of chelsea.
    x1 = x[:1]
    with torch.no_grad():
        least = model(x1).argmin(1)
    runs = {}
    print(
        "## The defence: generation game towards the least likely class\n\n"
        f"chelsea, target {int(least)} {labels[int(least)]} (the class with the lowest "
        f"probability on the image); fixed λ = 0, {args.defence_iterations} steps, "
        "same options otherwise.\n"
    )
    print("| defence | p(x) | p(e) | top-1 on e | mean abs(e − x) | s |")
    print("|---|---|---|---|---|---|")
    for defence in (True, False):
        start = time.perf_counter()
        exp = em.explain(
            model,
            x1,
            "fgvis",
            target=least,
            lam=0.0,
            defence=defence,
            max_iterations=args.defence_iterations,
            patience=args.defence_iterations,
        )
        seconds = time.perf_counter() - start
        runs[defence] = exp
        e = exp.extras
        top = int(e["top1"][0])
        print(
            f"| {'on' if defence else 'off'} | {float(e['image_score'][0]):.2e} "
            f"| {float(e['score'][0]):.3g} | {top} {labels[top]} "
            f"| {float((e['explanation'] - x1).abs().mean()):.4f} | {seconds:.1f} |"
        )
    print()

    dimming(model, x, results["preserve"], cam)
    mri = mri_section(args)

    cols = (
        "image",
        "preserve: mean m",
        "mean m, stretched",
        "preserve: e = m·x",
        "delete: mean (1−m)",
        "deleted x·(1−m)",
    )
    fig, axes = plt.subplots(n + 2, 6, figsize=(18, 3 * (n + 2)))
    keep, drop = results["preserve"], results["delete"]
    for i, name in enumerate(PHOTOS):
        row = axes[i]
        pk, pd = keep.extras, drop.extras
        row[0].imshow(pixels(model, x[i]))
        row[0].set_title(
            f"{name}: {labels[int(keep.targets[i])]} {float(pk['image_score'][i]):.2f}"
        )
        row[1].imshow(keep.raw[i, 0], cmap="inferno", vmin=0, vmax=1)
        row[1].set_title(f"mean mask {float(pk['mask_mean'][i]):.3f}")
        low, high = (float(v) for v in keep.raw[i, 0].quantile(torch.tensor([0.01, 0.99])))
        row[2].imshow(keep.raw[i, 0], cmap="inferno", vmin=low, vmax=high)
        row[2].set_title(f"{low:.3f} – {high:.3f}")
        row[3].imshow(pixels(model, pk["explanation"][i]))
        row[3].set_title(f"p(e) = {float(pk['score'][i]):.3f}")
        row[4].imshow(drop.raw[i, 0], cmap="inferno", vmin=0, vmax=1)
        row[4].set_title(f"removed {1 - float(pd['mask_mean'][i]):.3f}")
        row[5].imshow(pixels(model, pd["deleted"][i]))
        row[5].set_title(f"p(x·m) = {float(pd['score'][i]):.3f}")
    row = axes[n]
    row[0].imshow(pixels(model, x1[0]))
    row[0].set_title(f"generation: {labels[int(least)][:24]}")
    for j, defence in enumerate((True, False)):
        e = runs[defence].extras
        row[1 + 2 * j].imshow(pixels(model, e["explanation"][0]))
        row[1 + 2 * j].set_title(
            f"defence {'on' if defence else 'off'}: p = {float(e['score'][0]):.3f}"
        )
        diff = (e["explanation"][0] - x1[0]).abs().mean(0)
        row[2 + 2 * j].imshow(diff, cmap="gray")
        row[2 + 2 * j].set_title(f"|e − x|, defence {'on' if defence else 'off'}")
    mri_row(axes[n + 1], *mri)
    for ax in axes.flat:
        ax.axis("off")
    for j, title in enumerate(cols):
        axes[0, j].text(0.5, 1.18, title, transform=axes[0, j].transAxes, ha="center", fontsize=12)
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=70)
    print(
        f"Figure: `{FIGURE.name}` (rows: photos, the defence experiment, then VGG16 on the MRI "
        "slice with the same columns)."
    )


def mri_section(args: argparse.Namespace) -> tuple:
    """VGG16 (brain MRI) on one axial MNI152 slice: both games with the default schedule and
    the generation game towards the least likely class with and without the defence."""
    from evidencemap.models.vgg16_mri import mni152_slices

    vgg = models.load("vgg16-brain-mri")
    xm = mni152_slices([args.slice]).contiguous()
    it = args.mri_iterations
    print(
        f"## VGG16 brain MRI, MNI152 axial slice z{args.slice} (240×240)\n\n"
        f"`max_iterations={it}` (the games share it between the localising schedule's "
        "stages), defaults otherwise; a template is out of the model's domain (see "
        "docs/vgg16-mri.md).\n"
    )
    print("| run | class | schedule | p(x) | p(e) | p(e)/p(x) | mask | spread | noise | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    runs = {}
    with torch.no_grad():
        least = vgg(xm).argmin(1)
    for label, options in (
        ("preserve", {}),
        ("delete", {"game": "delete"}),
        ("generation, defence on", {"target": least, "lam": 0.0, "patience": it}),
        (
            "generation, defence off",
            {"target": least, "lam": 0.0, "patience": it, "defence": False},
        ),
    ):
        start = time.perf_counter()
        exp = em.explain(vgg, xm, "fgvis", max_iterations=it, transfer="none", **options)
        seconds = time.perf_counter() - start
        runs[label] = exp
        e = exp.extras
        c = int(exp.targets[0])
        print(
            f"| {label} | {c} {vgg.labels[c]} | {e['schedule'][0]} "
            f"| {float(e['image_score'][0]):.3g} | {float(e['score'][0]):.3g} "
            f"| {float(e['score'][0] / e['image_score'][0]):.3g} "
            f"| {float(e['mask_mean'][0]):.3f} | {float(e['map_spread'][0]):.3f} "
            f"| {float(e['noise_ratio'][0]):.3f} | {seconds:.1f} |"
        )
    print()
    return vgg, xm, runs["preserve"], runs["delete"], args.slice


def mri_row(row, vgg, xm, keep, drop, index) -> None:
    """The figure's VGG16 row, in the photos' columns."""
    pk, pd = keep.extras, drop.extras
    c = int(keep.targets[0])
    row[0].imshow(pixels(vgg, xm[0]))
    row[0].set_title(f"MNI z{index}: {vgg.labels[c]} {float(pk['image_score'][0]):.2f}")
    row[1].imshow(keep.raw[0, 0], cmap="inferno", vmin=0, vmax=1)
    row[1].set_title(f"mean mask {float(pk['mask_mean'][0]):.3f} ({pk['schedule'][0]})")
    low, high = (float(v) for v in keep.raw[0, 0].quantile(torch.tensor([0.01, 0.99])))
    row[2].imshow(keep.raw[0, 0], cmap="inferno", vmin=low, vmax=max(high, low + 1e-6))
    row[2].set_title(f"{low:.3f} – {high:.3f}")
    row[3].imshow(pixels(vgg, pk["explanation"][0]))
    row[3].set_title(f"p(e) = {float(pk['score'][0]):.3f}")
    row[4].imshow(drop.raw[0, 0], cmap="inferno", vmin=0, vmax=1)
    row[4].set_title(f"removed {1 - float(pd['mask_mean'][0]):.3f}")
    row[5].imshow(pixels(vgg, pd["deleted"][0]))
    row[5].set_title(f"p(x·m) = {float(pd['score'][0]):.3f}")


def dimming(
    model: torch.nn.Module, x: torch.Tensor, keep: em.Explanation, cam: torch.Tensor
) -> None:
    """The network's response to a flat mask ``m = α`` (uniform dimming), and what the
    preservation mask ``keep`` adds to dimming: its probability against a flat mask with the
    same channel means, and its correlation with Grad-CAM's map ``cam``."""
    classes = keep.targets
    alphas = (1.0, 0.999, 0.99, 0.9, 0.5, 0.2, 0.1, 0.05)
    with torch.no_grad():
        _, bounds = record_bounds(model, x)
    gated = [b for b in bounds if b is not None]

    def gradient(m: torch.Tensor, defence: bool) -> torch.Tensor:
        m = m.detach().requires_grad_(True)
        with torch.enable_grad():
            if defence:
                with NonlinearityInterceptor(DefenceRule(bounds)):
                    logits = model(m * x)
            else:
                logits = model(m * x)
            phi = -logits.log_softmax(1).gather(1, classes[:, None]).sum()
            (g,) = torch.autograd.grad(phi, m)
        return g.flatten(1).norm(dim=1)

    print(
        "## Why: the network under uniform dimming\n\n"
        "A flat mask m = α gives e = α·x (the image at lower contrast towards the reference 0). "
        "Per α: the target's p(e)/p(x) per photo; the fraction of gated units (all "
        f"{len(gated)} nonlinearity calls, all photos) whose activation on e leaves its bounds "
        "[min(0, h(x)), max(0, h(x))]; and ‖∂φ/∂m‖ with the defence over ‖∂φ/∂m‖ without it "
        "(mean over photos).\n"
    )
    print(
        "| α | "
        + " | ".join(f"p(e)/p(x) {name}" for name in PHOTOS)
        + " | units out of bounds | defended / undefended gradient |"
    )
    print("|---|" + "---|" * (len(PHOTOS) + 2))
    with torch.no_grad():
        p_x = model(x).softmax(1).gather(1, classes[:, None]).squeeze(1)
    for alpha in alphas:
        m = torch.full_like(x, alpha)
        seen: list[torch.Tensor] = []

        def observe(
            _index: int, _name: str, h: torch.Tensor, seen: list[torch.Tensor] = seen
        ) -> torch.Tensor:
            seen.append(h)
            return h

        with torch.no_grad(), NonlinearityInterceptor(observe):
            p_e = model(m * x).softmax(1).gather(1, classes[:, None]).squeeze(1)
        out, total = 0, 0
        for b, h in zip(bounds, seen, strict=True):
            if b is None:
                continue
            inside = b.rule(h, torch.ones_like(h))  # the gate's own indicator
            out += h.numel() - int(inside.sum())
            total += h.numel()
        ratio = gradient(m, True) / gradient(m, False)
        cells = " | ".join(f"{float(v):.3f}" for v in p_e / p_x)
        print(f"| {alpha} | {cells} | {out / total:.3f} | {float(ratio.mean()):.2g} |")
    print()
    mask = keep.extras["mask"]
    flat = mask.mean(dim=(2, 3), keepdim=True).expand_as(mask)
    with torch.no_grad():
        p_flat = model(flat * x).softmax(1).gather(1, classes[:, None]).squeeze(1)
    corr = [
        float(torch.corrcoef(torch.stack([keep.raw[i].flatten(), cam[i].flatten()]))[0, 1])
        for i in range(len(PHOTOS))
    ]
    print(
        "What the preservation mask adds to dimming: p(e)/p(x) of its e "
        + " / ".join(f"{float(v):.3f}" for v in keep.extras["score"] / p_x)
        + "; of a flat mask with the same per-channel means "
        + " / ".join(f"{float(v):.3f}" for v in p_flat / p_x)
        + "; Pearson correlation of the mean mask with Grad-CAM's map "
        + " / ".join(f"{v:.2f}" for v in corr)
        + f" ({', '.join(PHOTOS)}).\n"
    )
    start = time.perf_counter()
    exp = em.explain(model, x, "fgvis", defence=False)
    seconds = time.perf_counter() - start
    e = exp.extras
    print(
        "The preservation game without the defence (defaults otherwise): mean mask "
        + " / ".join(f"{float(v):.4f}" for v in e["mask_mean"])
        + ", p(e)/p(x) "
        + " / ".join(f"{float(v):.3f}" for v in e["score"] / e["image_score"])
        + f" ({', '.join(PHOTOS)}; {seconds / len(PHOTOS):.1f} s / image).\n"
    )


if __name__ == "__main__":
    main()
