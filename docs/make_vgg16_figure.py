"""Write docs/images/vgg16_mri_methods.png: several methods on the built-in brain-MRI VGG16.

Two axial slices of the MNI152 template (nilearn's bundled copy; z = −10 mm and +10 mm), each
explained for the model's top-1 class by Grad-CAM at the default layer (``block5_pool``, 7×7)
and at ``block5_relu3`` (15×15), LayerCAM, Score-CAM (64 channels), guided backpropagation,
Integrated Gradients (32 steps), SmoothGrad (16 samples) and FGVis' defended deletion game.
It also prints, per map, the share of its mass inside the brain (pixels brighter than 5/255)
and the seconds each method took.

Run: ``python docs/make_vgg16_figure.py`` (about 10 minutes on 2 CPU cores).
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import evidencemap as em
from evidencemap import models
from evidencemap.models.vgg16_mri import mni152_slices

SLICES = (62, 82)  # array indices; z = index − 72 mm
METHODS: tuple[tuple[str, str, dict[str, object]], ...] = (
    ("Grad-CAM (block5_pool, 7×7)", "gradcam", {}),
    ("Grad-CAM (block5_relu3, 15×15)", "gradcam", {"layer": "features.block5_relu3"}),
    ("LayerCAM", "layercam", {}),
    ("Score-CAM (64 channels)", "scorecam", {"top_k": 64}),
    ("guided backprop", "guided_backprop", {}),
    ("Integrated Gradients (32 steps)", "integrated_gradients", {"steps": 32}),
    ("SmoothGrad (16 samples)", "smoothgrad", {"samples": 16}),
    ("FGVis deletion (defended)", "fgvis", {"game": "delete", "max_iterations": 100}),
)


def main() -> None:
    torch.manual_seed(0)
    vgg = models.load("vgg16-brain-mri")
    x = mni152_slices(SLICES)
    with torch.no_grad():
        probs = vgg.predict(x)
    brain = (x[:, :1] > 5 / 255).float()  # (N, 1, H, W)
    columns = len(METHODS) + 1
    fig, axes = plt.subplots(len(SLICES), columns, figsize=(2.3 * columns, 2.6 * len(SLICES)))
    for row, index in enumerate(SLICES):
        top = int(probs[row].argmax())
        grey = x[row, 0].numpy()
        ax = axes[row, 0]
        ax.imshow(grey, cmap="gray", vmin=0, vmax=1)
        ax.set_title(
            f"z = {index - 72:+d} mm\n{vgg.labels[top]} {float(probs[row, top]):.3f}", fontsize=8
        )
        for col, (title, method, options) in enumerate(METHODS, start=1):
            start = time.perf_counter()
            exp = em.explain(vgg, x[row : row + 1], method, target=top, **options)
            seconds = time.perf_counter() - start
            heat = exp.maps[0, 0].detach()
            mass = float((heat * brain[row, 0]).sum() / heat.sum().clamp_min(1e-12))
            print(
                f"z={index - 72:+d} mm  {title:<32} in-brain mass {mass:.2f} "
                f"(brain area {float(brain[row].mean()):.2f})  {seconds:.1f} s"
            )
            ax = axes[row, col]
            ax.imshow(grey, cmap="gray", vmin=0, vmax=1)
            ax.imshow(heat.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            ax.set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    out = Path(__file__).parent / "images" / "vgg16_mri_methods.png"
    fig.savefig(out, dpi=100)
    print(out)


if __name__ == "__main__":
    main()
