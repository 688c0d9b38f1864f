"""Files in, tensors out; results back to disk.

The edge between the file system and the library: photos become RGB PIL images (which the
models' preprocessors turn into tensors), volumes become float32 tensors ``(C, D, H, W)``, and
maps and reports are written as ``.npz`` and JSON. The core library never imports this module.

Volume axes. NIfTI and DICOM volumes are reoriented so that the returned axes are
``D`` = superior → inferior, ``H`` = anterior → posterior and ``W`` = patient right → left
(the radiological display convention): ``volume[0, d]`` is an axial slice with the patient's
front at the top and right on the left, ``volume[0, :, h]`` a coronal one and
``volume[0, :, :, w]`` a sagittal one. The returned ``affine`` maps ``(d, h, w, 1)`` to RAS+
world millimetres. ``.npy`` arrays carry no geometry and are taken as ``(D, H, W)`` as they are.
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
import zlib
from collections.abc import Mapping
from itertools import permutations
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from evidencemap.models.preprocess import to_rgb_image

__all__ = [
    "IMAGE_SUFFIXES",
    "VOLUME_SUFFIXES",
    "ImageTooLargeError",
    "UnsupportedImageError",
    "find_inputs",
    "is_volume_path",
    "load_image",
    "load_image_bytes",
    "load_volume",
    "normalise_volume",
    "save_json",
    "save_maps",
    "to_jsonable",
]

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}
)
"""Suffixes (lower case) that :func:`find_inputs` takes for photos."""

VOLUME_SUFFIXES: frozenset[str] = frozenset({".nii", ".nii.gz", ".npy"})
"""Suffixes (lower case) of volume files; DICOM series are folders of ``*.dcm`` files."""

# Pillow plugins load_image may use: identification by content, restricted to these (the JPEG
# plugin also opens the multi-picture MPO files that many phone cameras write).
_IMAGE_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "DIB", "WEBP")

# Most channels a 4-D array may have on its leading or trailing axis.
_MAX_CHANNELS = 4

# Standard deviation below which a volume counts as constant in normalise_volume.
_FLAT_STD = 1e-8


# --------------------------------------------------------------------------- images


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Read a photo as an 8-bit RGB PIL image.

    The format is identified from the file's content (PNG, JPEG, TIFF, BMP or WebP), never from
    its name. The EXIF orientation is applied, so the image is upright as a viewer shows it.
    Greyscale becomes RGB; RGBA, LA and palette images are composited on white; 16-bit and
    floating-point greyscale is scaled to 8 bits first. Multi-frame files give their first frame.

    Args:
        path: the image file.

    Returns:
        The image in mode ``"RGB"``, fully loaded (no file handle is kept open).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when ``path`` is a directory, not an image of a supported format, or
            truncated/corrupt. The message names the file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not an image file")
    return _decode_image(path, str(path), max_pixels=None)


class UnsupportedImageError(ValueError):
    """The data is not an image of a supported format (identified by content)."""


class ImageTooLargeError(ValueError):
    """The image has more pixels than allowed."""


def load_image_bytes(
    data: bytes, *, max_pixels: int | None = None, name: str = "image data"
) -> Image.Image:
    """Decode a photo held in memory (e.g. an upload) as an 8-bit RGB PIL image.

    Exactly as :func:`load_image`: the format is identified from the bytes' content (PNG,
    JPEG, TIFF, BMP or WebP magic numbers, via Pillow), never from a name or declared type; EXIF
    orientation applied; converted to RGB. The pixel count is read from the header and checked
    *before* the pixels are decoded, so a small file that claims a huge image costs nothing.

    Args:
        data: the encoded file's bytes.
        max_pixels: the most pixels (``width × height``) accepted; ``None``: Pillow's own
            decompression-bomb limit only.
        name: how messages refer to the data.

    Returns:
        The image in mode ``"RGB"``.

    Raises:
        TypeError: when ``data`` is not bytes.
        ValueError: for empty data, or truncated/corrupt image data.
        UnsupportedImageError: when the data is not an image of a supported format.
        ImageTooLargeError: when the image has more than ``max_pixels`` pixels.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    if max_pixels is not None and (isinstance(max_pixels, bool) or max_pixels < 1):
        raise ValueError(f"max_pixels must be a positive int or None, got {max_pixels!r}")
    if len(data) == 0:
        raise ValueError(f"{name} is empty")
    return _decode_image(io.BytesIO(bytes(data)), name, max_pixels=max_pixels)


def _decode_image(source: Path | io.BytesIO, name: str, *, max_pixels: int | None) -> Image.Image:
    """Open, check the size of, decode and convert one image; errors name ``name``."""
    try:
        # PIL warns (several lines, once per file) about images between its pixel limit and
        # twice that; the size is checked here and over twice the limit PIL refuses anyway.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(source, formats=_IMAGE_FORMATS)
        with opened:
            if max_pixels is not None and opened.width * opened.height > max_pixels:
                raise ImageTooLargeError(
                    f"{name} has {opened.width} × {opened.height} = "
                    f"{opened.width * opened.height} pixels; the limit is {max_pixels}"
                )
            opened.load()
            image = _upright(opened)
            image = to_rgb_image(_to_8bit(image))
    except UnidentifiedImageError as err:
        raise UnsupportedImageError(
            f"{name} is not a readable PNG, JPEG, TIFF, BMP or WebP image"
        ) from err
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"{name} is too large to load safely: {err}") from err
    except (PermissionError, ImageTooLargeError):
        raise
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{name} is truncated or corrupt: {err}") from err
    return image


def _upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation says; unchanged when the EXIF is unusable."""
    try:
        turned = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError):
        return image
    return image if turned is None else turned


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer and float greyscale images to mode ``"L"``; others unchanged.

    16-bit data maps ``0 … 65535`` onto ``0 … 255``; float data in [0, 1] is multiplied by 255;
    any other range is min-max scaled.
    """
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image
    values = np.asarray(image, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if image.mode == "F" and low >= 0.0 and high <= 1.0:
        scaled = values * 255.0
    elif image.mode != "F" and low >= 0.0 and high <= 65535.0:
        scaled = values / 257.0 if high > 255.0 else values
    else:
        scaled = (values - low) * (255.0 / (high - low)) if high > low else values * 0.0
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


# --------------------------------------------------------------------------- finding inputs


def _has_suffix(path: Path, suffixes: frozenset[str]) -> bool:
    name = path.name.lower()
    return any(name.endswith(suffix) for suffix in suffixes)


def _is_dicom_folder(path: Path) -> bool:
    return path.is_dir() and any(
        child.suffix.lower() == ".dcm" and child.is_file() for child in path.iterdir()
    )


def is_volume_path(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a volume: a ``.nii``, ``.nii.gz`` or ``.npy`` file (by name), or a
    folder holding ``*.dcm`` files (a DICOM series).

    Args:
        path: a file or folder; only folders are looked into.

    Returns:
        ``True`` for a volume, ``False`` otherwise (photos included).
    """
    path = Path(path)
    if path.is_dir():
        return _is_dicom_folder(path)
    return _has_suffix(path, VOLUME_SUFFIXES)


def find_inputs(directory: str | os.PathLike[str]) -> list[Path]:
    """Every photo and volume under ``directory``, recursively, chosen by suffix.

    Files with a suffix in :data:`IMAGE_SUFFIXES` or :data:`VOLUME_SUFFIXES` (case-insensitive)
    are listed, and each folder holding ``*.dcm`` files is listed once as a DICOM series (its
    files are not listed separately). Hidden files and folders (name starting with ``.``) are
    skipped; symbolic links to folders are not followed.

    Args:
        directory: the folder to search.

    Returns:
        The paths, sorted.

    Raises:
        FileNotFoundError: when ``directory`` does not exist.
        NotADirectoryError: when it is not a folder.
    """
    root = Path(directory)
    if not root.exists():
        raise FileNotFoundError(f"input folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder")
    found: list[Path] = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        visible = [Path(folder, name) for name in files if not name.startswith(".")]
        if any(path.suffix.lower() == ".dcm" for path in visible):
            found.append(Path(folder))
        found.extend(
            path
            for path in visible
            if _has_suffix(path, IMAGE_SUFFIXES) or _has_suffix(path, VOLUME_SUFFIXES)
        )
    return sorted(found)


# --------------------------------------------------------------------------- volumes


def load_volume(path: str | os.PathLike[str]) -> tuple[Tensor, dict[str, Any]]:
    """Read a 3-D volume as a float32 tensor ``(C, D, H, W)``.

    NIfTI (``.nii``, ``.nii.gz``; needs nibabel) and DICOM series (a folder; needs pydicom) are
    reoriented to the axes described in the module docstring; ``.npy`` arrays are taken as they
    are. A 3-D array gives ``C = 1``; a 4-D array whose leading (preferred) or trailing axis has
    at most 4 entries is read as channels. NIfTI intensity scaling and DICOM rescale
    slope/intercept are applied.

    Args:
        path: a ``.nii``/``.nii.gz``/``.npy`` file or a folder of DICOM slices.

    Returns:
        ``(volume, metadata)``. ``metadata`` has ``source`` (the path as a string), ``format``
        (``"nifti"``, ``"npy"`` or ``"dicom"``), ``original_shape`` (the array's shape in the
        file), ``shape`` (the returned tensor's shape), ``spacing`` (voxel size in mm along
        ``D, H, W``, or ``None``) and ``affine`` (4×4 nested list mapping ``(d, h, w, 1)`` to RAS+
        mm, or ``None``).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ImportError: when nibabel (NIfTI) or pydicom (DICOM) is needed but not installed; the
            message gives the ``pip install`` command.
        ValueError: for an unknown suffix, an unreadable file, an array that is not 3-D/4-D, one
            with more than 4 channels, an empty, non-numeric or non-finite array, or a
            DICOM folder with no slices, several series or slices of different sizes.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"volume not found: {path}")
    affine: np.ndarray | None = None
    if path.is_dir():
        fmt = "dicom"
        data, affine = _read_dicom(path)
    elif _has_suffix(path, frozenset({".nii", ".nii.gz"})):
        fmt = "nifti"
        data, affine = _read_nifti(path)
    elif path.suffix.lower() == ".npy":
        fmt = "npy"
        data = _read_npy(path)
    else:
        raise ValueError(f"{path} is not a volume: expected .nii, .nii.gz, .npy or a DICOM folder")
    original_shape = tuple(int(s) for s in data.shape)
    data = _channels_first(data, path, channels_last=fmt != "npy")
    if affine is not None:
        data, affine = _reorient(data, affine)
    volume = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    if not bool(torch.isfinite(volume).all()):
        raise ValueError(f"{path} holds NaN or infinite values")
    spacing = None
    if affine is not None:
        spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    metadata = {
        "source": str(path),
        "format": fmt,
        "original_shape": original_shape,
        "shape": tuple(volume.shape),
        "spacing": spacing,
        "affine": None if affine is None else affine.tolist(),
    }
    return volume, metadata


def _read_npy(path: Path) -> np.ndarray:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"{path} is not a readable .npy array: {err}") from err
    return _check_numeric(data, path)


def _check_numeric(data: np.ndarray, path: Path) -> np.ndarray:
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == np.bool_):
        raise ValueError(f"{path} holds {data.dtype} data, not real numbers")
    if np.iscomplexobj(data):
        raise ValueError(f"{path} holds complex data, not real numbers")
    if data.size == 0:
        raise ValueError(f"{path} holds an empty array of shape {data.shape}")
    return data


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        import nibabel  # optional dependency, imported only when needed
    except ImportError as err:
        raise ImportError(
            f"reading NIfTI volumes ({path}) needs nibabel: pip install nibabel "
            "(or pip install 'evidencemap[volumes]')"
        ) from err
    try:
        image = nibabel.load(path)
        if image.get_data_dtype().kind not in "biuf":
            raise ValueError(f"voxels of type {image.get_data_dtype()} are not real numbers")
        scaled = image.get_fdata(dtype=np.float32)
    except (
        OSError,
        ValueError,
        EOFError,
        zlib.error,
        nibabel.filebasedimages.ImageFileError,
        nibabel.spatialimages.HeaderDataError,
    ) as err:
        raise ValueError(f"{path} is not a readable NIfTI file: {err}") from err
    scaled = _check_numeric(scaled, path)
    # NIfTI keeps spatial axes first; drop singleton axes after the third (e.g. x, y, z, 1, c).
    while scaled.ndim > 4 and 1 in scaled.shape[3:]:
        scaled = np.squeeze(scaled, axis=3 + scaled.shape[3:].index(1))
    return scaled, np.asarray(image.affine, dtype=np.float64)


def _channels_first(data: np.ndarray, path: Path, *, channels_last: bool) -> np.ndarray:
    """``(D, H, W)`` → ``(1, D, H, W)``; 4-D arrays with a channel axis → ``(C, D, H, W)``.

    With ``channels_last`` (NIfTI, DICOM) only a trailing channel axis is accepted.
    """
    if data.ndim == 3:
        return data[None]
    if data.ndim == 4:
        if not channels_last and data.shape[0] <= _MAX_CHANNELS:
            return data
        if data.shape[-1] <= _MAX_CHANNELS:
            return np.moveaxis(data, -1, 0)
        raise ValueError(
            f"{path}: a 4-D volume needs a channel axis of at most {_MAX_CHANNELS} entries "
            f"{'last' if channels_last else 'first or last'}, got shape {data.shape}"
        )
    raise ValueError(f"{path}: expected a 3-D or 4-D array, got shape {data.shape}")


def _reorient(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permute and flip the spatial axes of ``(C, i, j, k)`` data to (S→I, A→P, R→L).

    ``affine`` maps voxel ``(i, j, k, 1)`` to RAS+ mm; the returned affine does the same for the
    new axes. Oblique volumes go to the closest such orientation (no resampling).
    """
    directions = affine[:3, :3] / np.maximum(np.linalg.norm(affine[:3, :3], axis=0), 1e-12)
    # world axis of each voxel axis: the permutation that best matches the direction cosines
    world = max(
        permutations(range(3)),
        key=lambda p: sum(abs(directions[p[a], a]) for a in range(3)),
    )
    sizes = data.shape[1:]
    to_old = np.zeros((4, 4))  # old voxel index = to_old @ new voxel index
    to_old[3, 3] = 1.0
    order = [0, 0, 0]
    flips = []
    for axis in range(3):
        new_axis = 2 - world[axis]  # world x (R) → W, y (A) → H, z (S) → D
        order[new_axis] = axis + 1
        if directions[world[axis], axis] > 0:  # index runs towards +R/+A/+S: turn it round
            flips.append(axis + 1)
            to_old[axis, new_axis] = -1.0
            to_old[axis, 3] = sizes[axis] - 1
        else:
            to_old[axis, new_axis] = 1.0
    data = np.flip(data, axis=flips) if flips else data
    return np.transpose(data, (0, *order)), affine @ to_old


def _read_dicom(folder: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Stack a DICOM series folder into ``(D, H, W)`` (slices sorted along their normal)."""
    try:
        import pydicom  # optional dependency, imported only when needed
        from pydicom.errors import InvalidDicomError
    except ImportError as err:
        raise ImportError(
            f"reading DICOM series ({folder}) needs pydicom: pip install pydicom "
            "(or pip install 'evidencemap[dicom]')"
        ) from err
    files = sorted(
        child
        for child in folder.iterdir()
        if child.is_file() and not child.name.startswith(".") and child.name != "DICOMDIR"
    )
    slices = []
    for file in files:
        try:
            dataset = pydicom.dcmread(file)
        except InvalidDicomError:
            continue  # not a DICOM file (e.g. a README next to the slices)
        except (OSError, ValueError, EOFError) as err:
            raise ValueError(f"{file} is not a readable DICOM file: {err}") from err
        if "PixelData" in dataset:
            slices.append(dataset)
    if not slices:
        raise ValueError(f"{folder} holds no DICOM images")
    series = {str(getattr(s, "SeriesInstanceUID", "")) for s in slices}
    if len(series) > 1:
        raise ValueError(f"{folder} holds {len(series)} DICOM series; put each in its own folder")
    geometry = all(
        hasattr(s, "ImagePositionPatient") and hasattr(s, "ImageOrientationPatient") for s in slices
    )
    if geometry:
        normal = _slice_normal(slices[0])
        slices.sort(key=lambda s: float(np.dot(normal, np.asarray(s.ImagePositionPatient, float))))
    else:
        slices.sort(key=lambda s: int(getattr(s, "InstanceNumber", 0)))
    try:
        planes = [_rescaled(s) for s in slices]
    except (AttributeError, RuntimeError, ValueError, NotImplementedError) as err:
        raise ValueError(f"{folder}: cannot decode the DICOM pixel data: {err}") from err
    if len(planes) == 1 and planes[0].ndim == 3:  # one multi-frame file
        return planes[0], None
    if any(p.ndim != 2 for p in planes) or len({p.shape for p in planes}) != 1:
        raise ValueError(f"{folder}: DICOM slices must all be 2-D greyscale of the same size")
    volume = np.stack(planes)
    return volume, _dicom_affine(slices) if geometry else None


def _slice_normal(dataset: Any) -> np.ndarray:
    cosines = np.asarray(dataset.ImageOrientationPatient, dtype=np.float64)
    return np.cross(cosines[:3], cosines[3:])


def _rescaled(dataset: Any) -> np.ndarray:
    if int(getattr(dataset, "SamplesPerPixel", 1)) != 1:
        raise ValueError("colour DICOM images are not supported")
    pixels = np.asarray(dataset.pixel_array, dtype=np.float32)
    slope = float(getattr(dataset, "RescaleSlope", 1.0))
    intercept = float(getattr(dataset, "RescaleIntercept", 0.0))
    return pixels * slope + intercept


def _dicom_affine(slices: list[Any]) -> np.ndarray:
    """Affine of sorted slices ``(k, row, column)`` → RAS+ mm (DICOM itself uses LPS)."""
    first = slices[0]
    cosines = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    row_spacing, column_spacing = (float(v) for v in getattr(first, "PixelSpacing", (1.0, 1.0)))
    origin = np.asarray(first.ImagePositionPatient, dtype=np.float64)
    if len(slices) > 1:
        last = np.asarray(slices[-1].ImagePositionPatient, dtype=np.float64)
        step = (last - origin) / (len(slices) - 1)
    else:
        step = _slice_normal(first) * float(getattr(first, "SliceThickness", 1.0) or 1.0)
    affine = np.eye(4)
    affine[:3, 0] = step
    affine[:3, 1] = cosines[3:] * row_spacing  # down the rows
    affine[:3, 2] = cosines[:3] * column_spacing  # along a row
    affine[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # LPS → RAS


def normalise_volume(volume: Tensor, window: tuple[float, float] | None = None) -> Tensor:
    """Scale intensities for a 3-D CNN: z-score per volume, or a clipped window to [0, 1].

    Without ``window``: ``(v − mean) / std`` over the last three (spatial) axes, so each channel
    of ``(C, D, H, W)`` and each volume of ``(N, C, D, H, W)`` gets zero mean and unit standard
    deviation; a constant volume becomes zeros. With ``window = (low, high)`` (e.g. a CT window
    in Hounsfield units such as ``(-1000, 400)``): ``(clip(v, low, high) − low) / (high − low)``.

    Args:
        volume: a tensor with at least three axes.
        window: optional ``(low, high)`` with ``low < high``.

    Returns:
        A float32 tensor of the same shape.

    Raises:
        ValueError: for fewer than three axes, non-finite values or a window with
            ``low >= high``.
    """
    if volume.ndim < 3:
        raise ValueError(f"volume must have at least 3 axes (D, H, W), got {tuple(volume.shape)}")
    values = volume.detach().to(torch.float64)
    if not bool(torch.isfinite(values).all()):
        raise ValueError("volume holds NaN or infinite values")
    if window is not None:
        low, high = (float(v) for v in window)
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"window must be (low, high) with low < high, got {window}")
        return ((values.clamp(low, high) - low) / (high - low)).to(torch.float32)
    axes = (-3, -2, -1)
    mean = values.mean(dim=axes, keepdim=True)
    std = values.std(dim=axes, keepdim=True, correction=0)
    scaled = (values - mean) / std.clamp_min(_FLAT_STD)
    return scaled.where(std > _FLAT_STD, torch.zeros_like(scaled)).to(torch.float32)


# --------------------------------------------------------------------------- writing results


def save_maps(path: str | os.PathLike[str], **arrays: Tensor | np.ndarray) -> Path:
    """Write arrays losslessly to a compressed ``.npz`` file (``np.savez_compressed``).

    Tensors are detached and copied to the CPU; bfloat16/float16 tensors are stored as float32.
    The parent folder is created when missing.

    Args:
        path: target file; ``.npz`` is appended when the name does not end with it.
        **arrays: the arrays by name, e.g. ``save_maps("maps.npz", gradcam=m1, fgvis=m2)``.

    Returns:
        The path written.

    Raises:
        ValueError: when no arrays are given.
        TypeError: for a value that is neither a tensor nor a NumPy array.
    """
    if not arrays:
        raise ValueError("save_maps needs at least one array, e.g. save_maps(path, gradcam=m)")
    out = Path(path)
    if out.suffix.lower() != ".npz":
        out = out.with_name(out.name + ".npz")
    converted = {}
    for name, value in arrays.items():
        if isinstance(value, Tensor):
            value = value.detach().cpu()
            if value.dtype in (torch.bfloat16, torch.float16):
                value = value.to(torch.float32)
            converted[name] = value.numpy()
        elif isinstance(value, np.ndarray):
            converted[name] = value
        else:
            raise TypeError(f"{name} must be a tensor or NumPy array, got {type(value).__name__}")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **converted)
    return out


def to_jsonable(obj: Any) -> Any:
    """``obj`` with tensors, NumPy values and paths made JSON-ready.

    Tensors and arrays become (nested) lists, 0-d ones and NumPy scalars plain numbers, paths
    strings, tuples lists, mapping keys strings; NaN and ±inf become ``None`` (JSON has no such
    numbers).

    Raises:
        TypeError: for a value JSON cannot represent.
    """
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Tensor):
        value = obj.detach().cpu()
        if value.dtype in (torch.bfloat16, torch.float16):
            value = value.to(torch.float32)
        return to_jsonable(value.tolist())
    if isinstance(obj, (np.ndarray, np.generic)):
        return to_jsonable(obj.tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        return {str(key): to_jsonable(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=str) if isinstance(obj, (set, frozenset)) else obj
        return [to_jsonable(value) for value in items]
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def save_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented UTF-8 JSON (see :func:`to_jsonable` for what is converted).

    The parent folder is created when missing.

    Args:
        path: target file.
        obj: dicts, lists, numbers, strings, tensors, NumPy values, paths.

    Returns:
        The path written.

    Raises:
        TypeError: for a value JSON cannot represent.
    """
    out = Path(path)
    text = json.dumps(to_jsonable(obj), indent=2, ensure_ascii=False, allow_nan=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n", encoding="utf-8")
    return out
