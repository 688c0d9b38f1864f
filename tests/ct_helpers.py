"""Real volumes that ship offline, as ``(1, 1, X, Y, Z)`` inputs in [0, 1].

nibabel's example4d (an fMRI run, first frame) is always there (the ``volumes`` and ``test``
extras); nilearn's MNI152 T1 template and dipy's ``S0_10slices`` ship in those packages' wheels
(``pip install nilearn dipy``; read from the installed files, nothing is downloaded).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

SIZE = (64, 64, 48)

VOLUME_FILES = {
    "example4d": ("nibabel", "tests/data/example4d.nii.gz"),
    "mni152_t1": ("nilearn", "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"),
    "mni152_gm": ("nilearn", "datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"),
    "mni152_wm": ("nilearn", "datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"),
    "dipy_s0": ("dipy", "data/files/S0_10slices.nii.gz"),
}


def volume_path(name: str) -> Path:
    """The installed file of volume ``name`` (a key of :data:`VOLUME_FILES`)."""
    package, relative = VOLUME_FILES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"volume {name!r} ships with {package}: pip install {package}")
    return Path(next(iter(spec.submodule_search_locations))) / relative


def raw_volume(name: str) -> Tensor:
    """Volume ``name`` as stored (a 4-D file: its first frame), float32 ``(X, Y, Z)``."""
    import nibabel as nib

    data = torch.from_numpy(nib.load(volume_path(name)).get_fdata()).float()
    return data[..., 0] if data.ndim == 4 else data


def resampled(v: Tensor, size: tuple[int, int, int] = SIZE) -> Tensor:
    """``(X, Y, Z)`` → ``(1, 1, *size)``, scaled to [0, 1] by its 99th percentile, trilinear."""
    v = (v / v.quantile(0.99)).clamp(0, 1)[None, None]
    return F.interpolate(v, size=size, mode="trilinear", align_corners=False)


def example_volume(size: tuple[int, int, int] = SIZE) -> Tensor:
    """nibabel's ``example4d.nii.gz`` frame 0 (128×96×24, 2×2×2.2 mm), intensities scaled to
    [0, 1] by the 99th percentile and resampled trilinearly to ``size``: ``(1, 1, *size)``."""
    return resampled(raw_volume("example4d"), size)
