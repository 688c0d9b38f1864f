"""A real volume that ships offline: nibabel's example4d (an fMRI run, first frame)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor


def example_volume(size: tuple[int, int, int] = (64, 64, 48)) -> Tensor:
    """nibabel's ``example4d.nii.gz`` frame 0 (128×96×24, 2×2×2.2 mm), intensities scaled to
    [0, 1] by the 99th percentile and resampled trilinearly to ``size``: ``(1, 1, *size)``."""
    import nibabel as nib

    path = Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz"
    v = torch.from_numpy(nib.load(path).get_fdata()[..., 0]).float()
    v = (v / v.quantile(0.99)).clamp(0, 1)[None, None]
    return F.interpolate(v, size=size, mode="trilinear", align_corners=False)
