"""Evaluation report: every registered method × every metric on four real photos.

Run from the repository root (the one command behind the README's table)::

    nice -n 10 python benchmarks/evaluation_report.py

It saves the ``skimage.data`` photos chelsea, coffee, rocket and astronaut as PNG files in a
temporary folder, writes a boxes file (hand-drawn boxes of the object each photo shows, in photo
pixels), and runs ``evidencemap evaluate PHOTOS --boxes BOXES --quick`` on them with the built-in
EfficientNet-Lite0: every method that applies to the model, every metric, the quick protocol
exactly as the command runs it (no other settings). The tables, per-image numbers and curves go
to ``benchmarks/results/evaluation/``, with a ``README.md`` that states the command, the
settings, the machine load and the table (also printed on stdout).

Options: ``--methods a,b`` (default: every method that applies), ``--full`` (the full
protocol; the default is ``--quick``), ``--out DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data

from evidencemap.cli import main

PHOTOS = ("chelsea", "coffee", "rocket", "astronaut")

# Boxes of the object each photo shows, in photo pixels [x0, y0, x1, y1, class]: the cat's
# head (282 tiger cat), the cup (967 espresso), the rocket (657 missile). Astronaut has none
# (the model's top class, football helmet, is not in the photo).
BOXES = {
    "chelsea.png": [[40, 0, 390, 300, 282]],
    "coffee.png": [[170, 15, 420, 300, 967]],
    "rocket.png": [[300, 125, 340, 410, 657]],
}

OUT = Path(__file__).resolve().parent / "results" / "evaluation"


def main_report(argv: list[str] | None = None) -> int:
    """Run the report; returns the command's exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=None, help="default: every method that applies")
    parser.add_argument("--full", action="store_true", help="the full protocol (slow)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = []
        for name in PHOTOS:
            path = folder / f"{name}.png"
            Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB").save(path)
            paths.append(str(path))
        boxes = folder / "boxes.json"
        boxes.write_text(json.dumps(BOXES), encoding="utf-8")
        argv_cmd = [
            "evaluate",
            *paths,
            *([] if args.methods is None else ["--methods", args.methods]),
            "--boxes",
            str(boxes),
            "--out",
            str(args.out),
            "--threads",
            "2",
            "--quiet",
            *([] if args.full else ["--quick"]),
        ]
        start = time.perf_counter()
        saved = sys.stdout
        sys.stdout = sys.stderr  # the command's own table goes to stderr; ours to stdout
        try:
            status = main(argv_cmd)
        finally:
            sys.stdout = saved
        seconds = time.perf_counter() - start
    if status != 0:
        return status
    summary = (args.out / "summary.md").read_text(encoding="utf-8")
    body = summary.split("\n", 2)[2]  # drop the "# Evaluation" heading
    shown = ["evidencemap", *argv_cmd]
    shown[2 : 2 + len(PHOTOS)] = [f"{name}.png" for name in PHOTOS]
    shown[shown.index("--boxes") + 1] = "boxes.json"
    shown[shown.index("--out") + 1] = "benchmarks/results/evaluation"
    page = [
        "# Evaluation report\n",
        "Regenerate with `nice -n 10 python benchmarks/evaluation_report.py` (it runs "
        f"`{' '.join(shown)}` on the photos below).\n",
        f"Built-in EfficientNet-Lite0 on the photos {', '.join(PHOTOS)} (`skimage.data`), "
        f"{'full' if args.full else 'quick'} protocol, torch {torch.__version__} on "
        f"{platform.machine()} CPU, 2 threads; load average at start "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; {seconds / 60:.1f} min in all.\n",
        f"Boxes (photo pixels): `{json.dumps(BOXES)}`.\n",
        body,
        "\n![deletion and insertion](deletion_insertion.png)\n\n![ROAD](road.png)\n\n"
        "Per-image numbers: [per_image.csv](per_image.csv), [per_image.json](per_image.json); "
        "summary as CSV: [summary.csv](summary.csv).",
    ]
    text = "\n".join(page) + "\n"
    (args.out / "README.md").write_text(text, encoding="utf-8")
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_report())
