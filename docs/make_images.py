"""Regenerate the pictures in docs/images from the README's first commands.

Run from the repository root: ``PYTHONPATH=src python docs/make_images.py``. It runs
``evidencemap explain examples/chelsea.jpg`` and ``evidencemap compare examples/chelsea.jpg`` into
a temporary folder, copies the overlay as it is and the (wide) comparison grid scaled to 1280 px
wide, so that each file stays under 300 KB.
"""

import shutil
import tempfile
from pathlib import Path

import torch
from PIL import Image

from evidencemap.cli import main

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"
GRID_WIDTH = 1280

torch.set_num_threads(2)
photo = str(ROOT / "examples" / "chelsea.jpg")
with tempfile.TemporaryDirectory() as out:
    if main(["explain", photo, "--out", out]) or main(["compare", photo, "--out", out]):
        raise SystemExit("evidencemap failed")
    IMAGES.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(out, "chelsea_gradcam.png"), IMAGES / "chelsea_gradcam.png")
    grid = Image.open(Path(out, "chelsea_compare.png"))
    size = (GRID_WIDTH, round(grid.height * GRID_WIDTH / grid.width))
    grid.resize(size, Image.Resampling.LANCZOS).save(IMAGES / "chelsea_compare.png", optimize=True)
for picture in sorted(IMAGES.glob("*.png")):
    print(f"{picture.relative_to(ROOT)}: {picture.stat().st_size // 1024} KB")
