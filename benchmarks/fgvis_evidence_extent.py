"""Is the class evidence of coffee ("espresso") and astronaut ("football helmet") spread over
the image, or on the object? Forward passes only, on the built-in EfficientNet-Lite0.

Per photo, with the object box of ``fgvis_auto.PHOTO_BOXES`` (the cup; the black helmet):

* ``p(e)/p(x)`` of masks that keep the box at full contrast and the rest at contrast ``a``
  (``e = m·x``, the reference 0 of FGVis' preservation game), and the minimum over the 4 fixed
  noise draws (σ = 0.1, seed 1) of ``p(e + ε)/p(x)``, as the localising schedule judges it;
* uniform dimming ``e = a·x``;
* the concentration of Grad-CAM's and RISE's maps of the same class on the box (mass in the box
  over its area share; at most 1 / area share).

Run: ``python benchmarks/fgvis_evidence_extent.py > benchmarks/results/fgvis_evidence_extent.md``
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from skimage import data

import evidencemap as em
from evidencemap import models

sys.path.insert(0, str(Path(__file__).parent))
from fgvis_auto import PHOTO_BOXES

CONTRASTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)


def main() -> None:
    torch.set_num_threads(1)
    lite0 = models.load("efficientnet-lite0")
    model = lite0.module.eval()
    names = ["coffee", "astronaut"]
    x = torch.stack([lite0.preprocess(getattr(data, n)()) for n in names])
    draws = torch.randn(4, *x.shape[1:], generator=torch.Generator().manual_seed(1))
    print("# Where the class evidence of coffee and astronaut lies (EfficientNet-Lite0)\n")
    with torch.no_grad():
        classes = model(x).argmax(1)
    cams = {
        "Grad-CAM": em.explain(lite0, x, "gradcam", target=classes).maps,
        "RISE (1000 masks)": em.explain(lite0, x, "rise", target=classes, masks=1000).maps,
    }
    for i, name in enumerate(names):
        c = int(classes[i])
        top, bottom, left, right = PHOTO_BOXES[name]
        box = torch.zeros(x.shape[2:], dtype=torch.bool)
        box[top:bottom, left:right] = True
        share = float(box.float().mean())
        print(
            f"## {name}: {c} {lite0.labels[c]}, box {PHOTO_BOXES[name]} ({share:.0%} of the area)\n"
        )
        print(
            "| contrast a outside the box | mean mask | p(e)/p(x) | min over 4 draws | uniform a·x: p/p(x) | min over 4 draws |"
        )
        print("|---|---|---|---|---|---|")
        with torch.no_grad():
            px = model(x[i : i + 1]).softmax(1)[0, c]
            for a in CONTRASTS:
                rows = []
                for mask in (torch.where(box, 1.0, a), torch.full(box.shape, a)):
                    e = mask * x[i]
                    p = model(e[None]).softmax(1)[0, c] / px
                    q = model(e + 0.1 * draws).softmax(1)[:, c].min() / px
                    rows.append((float(mask.mean()), float(p), float(q)))
                (mean, p, q), (_, pu, qu) = rows
                print(f"| {a} | {mean:.2f} | {p:.3f} | {q:.3f} | {pu:.3f} | {qu:.3f} |")
        print()
        for label, maps in cams.items():
            raw = maps[i, 0].clamp(min=0)
            print(
                f"- {label}: concentration {float(raw[box].sum() / raw.sum()) / share:.2f} "
                f"(at most {1 / share:.2f})"
            )
        print()


if __name__ == "__main__":
    main()
