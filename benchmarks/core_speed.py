"""Cost of the CAM family relative to a plain inference forward of the same batch.

Grad-CAM: the forward before the target layer runs without an autograd graph and the backward
stops at the layer, so its cost should be close to one inference forward. Score-CAM: the cost of
its masked forward passes (timed alone, the same number of inputs through the model under
``inference_mode``) against the whole method.

Run: ``python benchmarks/core_speed.py`` (2 threads; min of several repeats).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable

import torch

import evidencemap as em
from evidencemap import models


def best(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = models.load("efficientnet-lite0")
    rows = []
    for batch in (1, 8):
        x = torch.randn(batch, 3, 224, 224)

        def forward(x: torch.Tensor = x) -> None:
            with torch.inference_mode():
                model(x)

        t_fwd = best(forward, 7)
        for name in ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "eigencam", "cam"):
            t = best(lambda name=name, x=x: em.explain(model, x, name), 7)
            rows.append((name, batch, t, t / t_fwd, "plain inference forward"))
        # Score-CAM with its top-64 channels: 64·batch masked inputs.
        k = 64
        scorecam = em.ScoreCAM(model, top_k=k, batch_size=32)
        t_sc = best(lambda x=x, sc=scorecam: sc(x), 2)
        # the same kind of inputs: the batch times smooth [0, 1] masks (upsampled 7×7 noise)
        masks = torch.nn.functional.interpolate(
            torch.rand(k * batch, 1, 7, 7), size=(224, 224), mode="bilinear", align_corners=False
        )
        masked = x.repeat(k, 1, 1, 1) * masks

        def masked_forwards(masked: torch.Tensor = masked) -> None:
            with torch.inference_mode():
                for chunk in masked.split(32):
                    model(chunk)

        t_masked = best(masked_forwards, 2)
        rows.append(
            ("scorecam (top 64)", batch, t_sc, t_sc / t_masked, f"its {k * batch} masked forwards")
        )
        rows.append(("forward (inference)", batch, t_fwd, 1.0, "itself"))

    print(f"# CAM family cost on EfficientNet-Lite0, 224×224, {torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}\n")
    print("| method | batch | seconds | ratio | relative to |")
    print("|---|---:|---:|---:|---|")
    for name, batch, t, ratio, ref in rows:
        print(f"| {name} | {batch} | {t:.4f} | {ratio:.2f}× | {ref} |")


if __name__ == "__main__":
    main()
