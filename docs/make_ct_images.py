"""Slice montages of the CT network's maps on a real volume (needs ``pip install ".[ct]"``).

PYTHONPATH=src python docs/make_ct_images.py   # writes docs/images/ct_*.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import evidencemap as em  # noqa: E402
from ct_helpers import example_volume  # noqa: E402
from evidencemap import models, viz  # noqa: E402
from evidencemap.models.i3resnet import FeatureNorm  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    model = models.load("ct-i3resnet152")
    x = example_volume()
    for method in ("gradcam", "layercam"):
        exp = em.explain(model, x, method, target=FeatureNorm(), layer="features")
        # The model's volumes are (X, Y, Z); the montage's axes are (D, H, W): show Z as depth.
        volume = x[0, 0].permute(2, 1, 0)
        heat = exp.maps[0, 0].permute(2, 1, 0)
        image = viz.montage(
            volume,
            heat,
            title=f"{method} · I3ResNet-152 · ‖embedding‖ · nibabel example4d",
            spacing=(2.2 * 24 / 48, 2.0 * 96 / 64, 2.0 * 128 / 64),
        )
        viz.save_png(image, ROOT / "docs" / "images" / f"ct_{method}_montage.png")


if __name__ == "__main__":
    main()
