"""CPU seconds of one Grad-CAM call on the built-in Lite0, to compare two source trees.

Run it alternately against each tree in one session (CPU time, one thread, so the machine's
load moves it less than wall time)::

    PYTHONPATH=OLD/src python benchmarks/gradcam_cpu.py old
    PYTHONPATH=src python benchmarks/gradcam_cpu.py main

It prints the label, the median CPU seconds of 15 calls at batch 1 and at batch 8, and the
package file it measured.
"""

import sys
import time

import torch
from skimage import data

import evidencemap as em
from evidencemap import models

torch.set_num_threads(1)
model = models.load("efficientnet-lite0")
x1 = model.preprocess([data.chelsea()])
x8 = x1.repeat(8, 1, 1, 1)
for x in (x1, x8):
    em.explain(model, x, "gradcam")  # warm-up
medians = []
for x in (x1, x8):
    seconds = []
    for _ in range(15):
        start = time.process_time()
        em.explain(model, x, "gradcam")
        seconds.append(time.process_time() - start)
    seconds.sort()
    medians.append(seconds[len(seconds) // 2])
label = sys.argv[1] if len(sys.argv) > 1 else "this tree"
print(label, " ".join(f"{v:.4f}" for v in medians), em.__file__)
