"""Time and memory of every 3-D method on the real CT network (I3ResNet-152, 117 M parameters).

Needs ``pip install ".[ct]"``. One subprocess per method, so each peak resident memory is its
own: the table reports the peak RSS during the explanation over the process's RSS after loading
the model and the volume (the peak is reset after loading, ``/proc/self/clear_refs``, so the
loading's own peak does not hide the method's; Linux) and the wall time of one explanation,
optionally under a memory budget (:func:`evidencemap.runtime.limits`), on nibabel's
``example4d`` frame resampled to 64×64×48, target = the embedding's L2 norm, layer = the last
stage (``features``).

    python benchmarks/ct_methods.py > benchmarks/results/ct_methods.md
    python benchmarks/ct_methods.py gradcam smoothgrad    # only the runs of these methods
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (method, options, memory budget in MiB or None); Score-CAM: the 8 strongest of 2048
# channels, 8 volumes per forward; SmoothGrad: 4 noisy copies over saliency (its default method)
# and over Grad-CAM, with and without the service's default budget of 512 MiB
RUNS: list[tuple[str, dict, int | None]] = [
    ("gradcam", {}, None),
    ("gradcam++", {}, None),
    ("xgradcam", {}, None),
    ("layercam", {}, None),
    ("hirescam", {}, None),
    ("eigencam", {}, None),
    ("cfcam", {}, None),
    ("scorecam", {"top_k": 8, "batch_size": 8, "weighting": "channel_softmax"}, None),
    ("saliency", {}, None),
    ("guided_backprop", {}, None),
    ("guided_gradcam", {}, None),
    ("integrated_gradients", {"steps": 8}, None),
    ("integrated_gradients", {"steps": 8}, 512),
    ("smoothgrad", {"samples": 4}, None),
    ("smoothgrad", {"samples": 4}, 512),
    ("smoothgrad", {"wrap": "gradcam", "samples": 4}, None),
    ("smoothgrad", {"wrap": "gradcam", "samples": 4}, 512),
]
INPUT_METHODS = {"saliency", "guided_backprop", "integrated_gradients"}


def _status_mb(key: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak since the last reset) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def child(index: int) -> None:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    import evidencemap as em
    from ct_helpers import example_volume
    from evidencemap import models, runtime
    from evidencemap.models.i3resnet import FeatureNorm

    torch.set_num_threads(2)
    model = models.load("ct-i3resnet152")
    x = example_volume()
    method, options, budget_mb = RUNS[index]
    opts = dict(options)
    if method not in INPUT_METHODS and opts.get("wrap", "gradcam") == "gradcam":
        opts["layer"] = "features"
    if method == "smoothgrad" and "wrap" not in opts:
        opts.pop("layer")  # over saliency
    budget = None if budget_mb is None else budget_mb * 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak: the loading's peak must not hide the method's
    base = _status_mb("VmRSS")
    start = time.perf_counter()
    with runtime.limits(memory_budget=budget):
        exp = em.explain(model, x, method, target=FeatureNorm(), **opts)
    seconds = time.perf_counter() - start
    ok = bool(torch.isfinite(exp.maps).all())
    peak = _status_mb("VmHWM") - base
    print(json.dumps({"s": seconds, "peak": peak, "base": base, "finite": ok}))


def main(only: list[str]) -> None:
    rows = []
    for index in range(len(RUNS)):
        if only and RUNS[index][0] not in only:
            continue
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(index)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )
        rows.append((RUNS[index], json.loads(out.stdout.strip().splitlines()[-1])))
        print(RUNS[index], rows[-1][1], file=sys.stderr, flush=True)  # progress
    print("# Every 3-D method on the real CT network\n")
    print(
        f"I3ResNet-152 (117.4 M parameters, fp32), one 64×64×48 volume (nibabel example4d), "
        f"target ‖embedding‖₂, layer `features` (2×2×3). {platform.processor() or 'CPU'}, "
        f"torch threads 2; model + volume resident: {rows[0][1]['base']:.0f} MB.\n"
    )
    print("| method | options | memory budget | seconds | extra peak RSS (MB) | finite |")
    print("|---|---|---|---:|---:|:-:|")
    for (method, options, budget_mb), r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in options.items()) or "—"
        budget = "—" if budget_mb is None else f"{budget_mb} MiB"
        finite = "yes" if r["finite"] else "NO"
        print(f"| {method} | {opts} | {budget} | {r['s']:.1f} | {r['peak']:.0f} | {finite} |")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(int(sys.argv[2]))
    else:
        main(sys.argv[1:])
