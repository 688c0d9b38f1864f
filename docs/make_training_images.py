"""Write docs/images/fer_astronaut.png: the built-in FER model's Grad-CAM and FGVis maps.

Run: ``python docs/make_training_images.py``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from skimage import data

import evidencemap as em
from evidencemap import models

FACE = (slice(50, 180), slice(175, 305))  # the astronaut's face, tight like a detector's box


def main() -> None:
    torch.manual_seed(0)
    fer = models.load("fer")
    x = fer.preprocess(data.astronaut()[FACE])[None]
    with torch.no_grad():
        scores = fer.predict(x)[0]
    top = int(scores.argmax())
    grey = fer.preprocess.to_pixels(x)[0, 0].numpy() / 255
    panels = [("input (48×48 grey)", None)]
    for method in ("gradcam", "fgvis"):
        maps = em.explain(fer, x, method, target=top).maps[0, 0].detach().numpy()
        panels.append((f"{method} — {fer.labels[top]} ({float(scores[top]):.2f})", maps))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    for ax, (title, heat) in zip(axes, panels, strict=True):
        ax.imshow(grey, cmap="gray", vmin=0, vmax=1)
        if heat is not None:
            ax.imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    out = Path(__file__).parent / "images" / "fer_astronaut.png"
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
