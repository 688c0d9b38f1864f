"""What the CT network's maps show on the real volumes that ship offline.

No chest CT ships offline, so the volumes are out of the network's domain: nibabel's example4d
(a brain fMRI frame), nilearn's MNI152 T1 template (a brain MRI) and dipy's ``S0_10slices``
(a diffusion MRI b0, 10 thick slices), each scaled to [0, 1] by its 99th percentile and
resampled to 64×64×48. For each map ``M ≥ 0`` (min-max normalised) and region ``R`` the table
gives the share of the map's mass in ``R``, ``Σ_R M / Σ M``, next to ``R``'s share of the volume:
a share no larger than the volume share means the map does not concentrate on ``R``.
Regions: ``head`` = voxels above 0.1 (the object against the background), and for MNI152
``brain`` = grey + white matter probability > 0.5 (nilearn's tissue maps of the template).

Needs ``pip install ".[ct]" nilearn dipy`` (the volumes ship in those wheels; nothing is
downloaded).

    python benchmarks/ct_volumes.py > benchmarks/results/ct_volumes.md
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

import evidencemap as em  # noqa: E402
from ct_helpers import raw_volume, resampled  # noqa: E402
from evidencemap import models, runtime  # noqa: E402
from evidencemap.models.i3resnet import FeatureNorm  # noqa: E402

METHODS: dict[str, dict] = {
    "gradcam": {"layer": "features"},
    "layercam": {"layer": "features"},
    "saliency": {},
    "smoothgrad": {"samples": 8},  # over saliency
}
VOLUMES = ("example4d", "mni152_t1", "dipy_s0")


def regions(name: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Boolean masks ``(X, Y, Z)`` of the regions of volume ``name`` (its resampled input)."""
    out = {"head": x[0, 0] > 0.1}
    if name == "mni152_t1":
        tissue = raw_volume("mni152_gm") + raw_volume("mni152_wm")  # probabilities × 255
        out["brain"] = resampled(tissue)[0, 0] * tissue.quantile(0.99) / 255 > 0.5
    return out


def main() -> None:
    torch.set_num_threads(2)
    model = models.load("ct-i3resnet152")
    print("# The CT network's maps on the volumes that ship offline\n")
    print(
        "I3ResNet-152, target ‖embedding‖₂, 64×64×48 inputs; share of the map's mass in a "
        "region vs the region's share of the volume (see the script's docstring). SmoothGrad: "
        "8 noisy copies over saliency, σ = 0.15, under a 1 GiB memory budget.\n"
    )
    print("| volume | method | seconds | region | volume share | map share | ratio |")
    print("|---|---|---:|---|---:|---:|---:|")
    for name in VOLUMES:
        x = resampled(raw_volume(name))
        masks = regions(name, x)
        for method, options in METHODS.items():
            start = time.perf_counter()
            with runtime.limits(memory_budget=2**30):
                exp = em.explain(model, x, method, target=FeatureNorm(), **options)
            seconds = time.perf_counter() - start
            m = exp.maps[0, 0].clamp(min=0)
            for region, mask in masks.items():
                vol = mask.float().mean().item()
                share = (m[mask].sum() / m.sum()).item()
                print(
                    f"| {name} | {method} | {seconds:.1f} | {region} | {vol:.3f} | "
                    f"{share:.3f} | {share / vol:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
