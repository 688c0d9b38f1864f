"""Files in, tensors out; results back to disk.

The edge between the file system and the library: photos become RGB PIL images (which the
models' preprocessors turn into tensors), volumes become float32 tensors ``(C, D, H, W)``, and
maps and reports are written as ``.npz`` (one schema, :data:`MAPS_SCHEMA`), NIfTI and JSON. The
core library never imports this module.

Volume axes. NIfTI and DICOM volumes are reoriented so that the returned axes are
``D`` = superior → inferior, ``H`` = anterior → posterior and ``W`` = patient right → left
(the radiological display convention): ``volume[0, d]`` is an axial slice with the patient's
front at the top and right on the left, ``volume[0, :, h]`` a coronal one and
``volume[0, :, :, w]`` a sagittal one. The returned ``affine`` maps ``(d, h, w, 1)`` to RAS+
world millimetres. ``.npy`` arrays carry no geometry and are taken as ``(D, H, W)`` as they are. A 4-D NIfTI's
fourth axis is time (frames, e.g. fMRI volumes): one frame is read, chosen with ``frame=``.
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import permutations
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from evidencemap.explanation import Explanation
from evidencemap.models.preprocess import to_rgb_image

__all__ = [
    "IMAGE_SUFFIXES",
    "MAPS_SCHEMA",
    "MAPS_VERSION",
    "VOLUME_SUFFIXES",
    "ImageTooLargeError",
    "SavedMaps",
    "UnsupportedImageError",
    "explanation_npz_bytes",
    "find_inputs",
    "is_volume_path",
    "load_image",
    "load_image_bytes",
    "load_maps",
    "load_volume",
    "normalise_volume",
    "save_explanation",
    "save_json",
    "save_maps",
    "save_nifti",
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


def load_volume(
    path: str | os.PathLike[str], *, frame: int | None = None
) -> tuple[Tensor, dict[str, Any]]:
    """Read a 3-D volume as a float32 tensor ``(C, D, H, W)``.

    NIfTI (``.nii``, ``.nii.gz``; needs nibabel) and DICOM series (a folder; needs pydicom) are
    reoriented to the axes described in the module docstring; ``.npy`` arrays are taken as they
    are. A 3-D array gives ``C = 1``; a 4-D ``.npy`` array whose leading (preferred) or trailing
    axis has at most 4 entries is read as channels. A NIfTI file's 4th axis is time (the NIfTI
    standard): a file with several frames there needs ``frame`` (only that frame is read from
    disk); its 5th axis, if any, holds channels. NIfTI intensity scaling and DICOM rescale
    slope/intercept are applied.

    Args:
        path: a ``.nii``/``.nii.gz``/``.npy`` file or a folder of DICOM slices.
        frame: the frame (0-based index along a 4-D NIfTI's 4th axis) to read; a volume
            without frames has only frame 0. ``None``: the only frame, an error when there
            are several.

    Returns:
        ``(volume, metadata)``. ``metadata`` has ``source`` (the path as a string), ``format``
        (``"nifti"``, ``"npy"`` or ``"dicom"``), ``original_shape`` (the array's shape in the
        file), ``shape`` (the returned tensor's shape), ``frame`` (the frame read, or ``None``
        when the file has none), ``frames`` (how many the file has; 1 without a time axis),
        ``spacing`` (voxel size in mm along ``D, H, W``, or ``None``) and ``affine`` (4×4
        nested list mapping ``(d, h, w, 1)`` to RAS+ mm, or ``None``; :func:`save_nifti`
        writes a map back with it).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ImportError: when nibabel (NIfTI) or pydicom (DICOM) is needed but not installed; the
            message gives the ``pip install`` command.
        TypeError: when ``frame`` is not an int.
        ValueError: for an unknown suffix, an unreadable file, an array that is not 3-D/4-D, one
            with more than 4 channels, an empty, non-numeric or non-finite array, a 4-D NIfTI
            with several frames and no ``frame`` (the message names the 4th axis and how to
            pick one), a frame out of range, or a DICOM folder with no slices, several series
            or slices of different sizes.
    """
    path = Path(path)
    if frame is not None and (isinstance(frame, bool) or not isinstance(frame, int)):
        raise TypeError(f"frame must be an int or None, got {type(frame).__name__}")
    if not path.exists():
        raise FileNotFoundError(f"volume not found: {path}")
    affine: np.ndarray | None = None
    frames = 1
    if path.is_dir():
        fmt = "dicom"
        data, affine = _read_dicom(path)
    elif _has_suffix(path, frozenset({".nii", ".nii.gz"})):
        fmt = "nifti"
        data, affine, frames, original_shape = _read_nifti(path, frame)
    elif path.suffix.lower() == ".npy":
        fmt = "npy"
        data = _read_npy(path)
    else:
        raise ValueError(f"{path} is not a volume: expected .nii, .nii.gz, .npy or a DICOM folder")
    if fmt != "nifti":
        original_shape = tuple(int(s) for s in data.shape)
        _check_frame(frame, 1, path, original_shape)
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
        "frame": frame if frames > 1 else None,
        "frames": frames,
        "spacing": spacing,
        "affine": None if affine is None else affine.tolist(),
    }
    return volume, metadata


def _check_frame(frame: int | None, frames: int, path: Path, shape: tuple[int, ...]) -> int:
    """The frame to read of ``frames``; ``None`` only when there is one."""
    if frame is None:
        if frames > 1:
            raise ValueError(
                f"{path} is a 4-D volume of shape {shape} whose 4th axis (time) holds {frames} "
                f"frames; pick one with frame=i (load_volume(path, frame=0)) or, on the command "
                f"line, --frame i, for i in 0 … {frames - 1}"
            )
        return 0
    if not 0 <= frame < frames:
        which = f"frames 0 … {frames - 1}" if frames > 1 else "one frame (frame 0)"
        raise ValueError(f"frame {frame} is out of range: {path} of shape {shape} has {which}")
    return frame


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


def _read_nifti(
    path: Path, frame: int | None
) -> tuple[np.ndarray, np.ndarray, int, tuple[int, ...]]:
    """``(data (x, y, z[, c]), affine, frames, shape in the file)``: one frame of the time axis."""
    try:
        import nibabel  # optional dependency, imported only when needed
    except ImportError as err:
        raise ImportError(
            f"reading NIfTI volumes ({path}) needs nibabel: pip install nibabel "
            "(or pip install 'evidencemap[volumes]')"
        ) from err
    errors = (
        OSError,
        ValueError,
        EOFError,
        zlib.error,
        nibabel.filebasedimages.ImageFileError,
        nibabel.spatialimages.HeaderDataError,
    )
    try:
        image: Any = nibabel.load(path)
        if image.get_data_dtype().kind not in "biuf":
            raise ValueError(f"voxels of type {image.get_data_dtype()} are not real numbers")
        shape = tuple(int(s) for s in image.shape)
    except errors as err:
        raise ValueError(f"{path} is not a readable NIfTI file: {err}") from err
    frames = shape[3] if len(shape) >= 4 else 1
    chosen = _check_frame(frame, frames, path, shape)
    try:
        if len(shape) >= 4:  # read only the chosen frame; dataobj applies the scaling
            scaled = np.asarray(image.dataobj[:, :, :, chosen], dtype=np.float32)
        else:
            scaled = image.get_fdata(dtype=np.float32)
    except errors as err:
        raise ValueError(f"{path} is not a readable NIfTI file: {err}") from err
    scaled = _check_numeric(scaled, path)
    # drop singleton axes after the third (e.g. x, y, z, c with c = 1)
    while scaled.ndim > 3 and 1 in scaled.shape[3:]:
        scaled = np.squeeze(scaled, axis=3 + scaled.shape[3:].index(1))
    return scaled, np.asarray(image.affine, dtype=np.float64), frames, shape


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
    data = np.flip(data, axis=tuple(flips)) if flips else data
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
    np.savez_compressed(out, **converted)  # type: ignore[arg-type]
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


# --------------------------------------------------------------------------- maps as NIfTI


def save_nifti(
    path: str | os.PathLike[str],
    volume_map: Tensor | np.ndarray,
    affine: Any,
    *,
    shape: tuple[int, int, int] | None = None,
) -> Path:
    """Write a 3-D map as NIfTI with the input volume's affine, so that it lies on the scan in
    ITK-SNAP, 3D Slicer, FSLeyes or any NIfTI viewer (load it as an overlay/segmentation).

    The map is in the axes of :func:`load_volume` (``D, H, W``) and ``affine`` is the
    ``metadata["affine"]`` that :func:`load_volume` returned for the input (voxel
    ``(d, h, w, 1)`` → RAS+ mm): the file stores the array in that order with that affine,
    which viewers apply, so no reorientation back to the file's own order is needed. A map of
    another size (the model's input size) is first resized trilinearly
    (``align_corners=False``, as the input was resized) to ``shape``, the volume's ``(D, H, W)``.

    Args:
        path: the target; ``.nii.gz`` (compressed) or ``.nii``; another name gets ``.nii.gz``.
        volume_map: ``(D, H, W)`` or ``(1, D, H, W)`` (also ``(1, 1, D, H, W)``), finite.
        affine: 4×4 nested list or array (``metadata["affine"]``).
        shape: the input volume's ``(D, H, W)`` (``metadata["shape"][1:]``); ``None``: as is.

    Returns:
        The path written (float32 voxels, ``qform``/``sform`` set to the affine, code 1
        "scanner").

    Raises:
        ImportError: without nibabel.
        ValueError: for a map that is not 3-D, non-finite values, an affine that is not an
            invertible 4×4 matrix, or a bad ``shape``.
    """
    try:
        import nibabel  # optional dependency, imported only when needed
    except ImportError as err:
        raise ImportError(
            "writing NIfTI needs nibabel: pip install nibabel (or pip install 'evidencemap[volumes]')"
        ) from err
    values = (
        volume_map.detach().cpu().float()
        if isinstance(volume_map, Tensor)
        else torch.as_tensor(np.asarray(volume_map, dtype=np.float32))
    )
    while values.ndim > 3 and values.shape[0] == 1:
        values = values[0]
    if values.ndim != 3 or values.numel() == 0:
        raise ValueError(f"volume_map must be (D, H, W) or (1, D, H, W), got {tuple(values.shape)}")
    if not bool(torch.isfinite(values).all()):
        raise ValueError("volume_map holds NaN or infinite values")
    matrix = np.asarray(affine, dtype=np.float64)
    if (
        matrix.shape != (4, 4)
        or not np.isfinite(matrix).all()
        or abs(np.linalg.det(matrix)) < 1e-12
    ):
        raise ValueError(f"affine must be an invertible 4×4 matrix, got {matrix.tolist()}")
    if shape is not None:
        size = tuple(int(s) for s in shape)
        if len(size) != 3 or min(size) < 1:
            raise ValueError(f"shape must be the volume's (D, H, W), got {shape}")
        if tuple(values.shape) != size:
            values = torch.nn.functional.interpolate(
                values[None, None], size=size, mode="trilinear", align_corners=False
            )[0, 0]
    out = Path(path)
    if not out.name.lower().endswith((".nii", ".nii.gz")):
        out = out.with_name(out.name + ".nii.gz")
    image = nibabel.Nifti1Image(values.numpy().astype(np.float32), matrix)
    image.set_qform(matrix, code=1)
    image.set_sform(matrix, code=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(image, out)
    return out


# --------------------------------------------------------------------------- maps as .npz

MAPS_VERSION = 1
"""The version of the ``.npz`` schema that :func:`save_explanation` writes."""

MAPS_SCHEMA: dict[str, str] = {
    "version": "int64, () — the schema version, 1",
    "maps": "float32, (N, 1, *S) — the maps at input resolution, in [0, 1] (FGVis: its mask)",
    "raw": "float32, (N, C, *s) — before normalisation, at the layer's resolution "
    "(input-space methods: (N, C, *S) per channel); several layers: raw_0, raw_1, … instead",
    "scores": "float32, (N,) — the model's target score on the inputs",
    "targets": "int64, (N,) — the class indices; absent when the target was not a class",
    "method": "str, () — the method's registered name",
    "label": "str, () — the method with its variant, e.g. 'counterfactual gradcam'",
    "layers": "str, (L,) — the explained layers' dotted names; (0,) for input-space methods",
    "options": "str, () — the options the method ran with, as JSON",
}
"""The one ``.npz`` schema for saved maps: key → ``"dtype, shape — meaning"``. Every value is
a plain array (``numpy.load(path)`` works without ``allow_pickle``); ``N`` samples, ``S``
the input's spatial shape, ``s`` the layer's."""


def _npz_arrays(explanation: Explanation, rows: slice | Any) -> dict[str, np.ndarray]:
    def rows_of(value: Tensor) -> np.ndarray:
        picked = value.detach()[rows]
        return picked.cpu().to(torch.float32).numpy()

    arrays: dict[str, np.ndarray] = {
        "version": np.asarray(MAPS_VERSION, dtype=np.int64),
        "maps": rows_of(explanation.maps),
        "scores": rows_of(explanation.scores).reshape(-1),
    }
    if isinstance(explanation.raw, list):
        for j, part in enumerate(explanation.raw):
            arrays[f"raw_{j}"] = rows_of(part)
    else:
        arrays["raw"] = rows_of(explanation.raw)
    if explanation.targets is not None:
        arrays["targets"] = explanation.targets.detach()[rows].cpu().to(torch.int64).numpy()
    layer = explanation.layer
    layers = [] if layer is None else [layer] if isinstance(layer, str) else list(layer)
    arrays["method"] = np.asarray(explanation.method)
    arrays["label"] = np.asarray(explanation.label)
    arrays["layers"] = np.asarray(layers, dtype=str).reshape(len(layers))
    options = json.dumps(to_jsonable(explanation.options), sort_keys=True, allow_nan=False)
    arrays["options"] = np.asarray(options)
    return arrays


def _rows(explanation: Explanation, rows: int | slice | None) -> slice:
    count = len(explanation)
    if rows is None:
        return slice(0, count)
    if isinstance(rows, bool) or not isinstance(rows, (int, slice)):
        raise TypeError(f"rows must be an int, a slice or None, got {type(rows).__name__}")
    if isinstance(rows, int):
        if not -count <= rows < count:
            raise ValueError(f"rows {rows} is outside the batch of {count}")
        start = rows % count
        return slice(start, start + 1)
    if len(range(count)[rows]) == 0:
        raise ValueError(f"rows {rows} selects no sample of the batch of {count}")
    return rows


def save_explanation(
    path: str | os.PathLike[str] | IO[bytes],
    explanation: Explanation,
    rows: int | slice | None = None,
) -> Path | None:
    """Write an explanation's maps as a compressed ``.npz`` of the one schema,
    :data:`MAPS_SCHEMA` (read it back with :func:`load_maps`).

    The command line writes ``NAME_METHOD.npz`` with it and the web page's download is the same
    file for one sample (:func:`explanation_npz_bytes`).

    Args:
        path: the target file (``.npz`` appended when missing; the folder is created) or a
            binary file object (e.g. ``io.BytesIO``).
        explanation: the result of a method.
        rows: the samples to write: an index (kept as a batch of one), a slice, or ``None``
            for all.

    Returns:
        The path written, or ``None`` for a file object.

    Raises:
        TypeError / ValueError: for ``rows`` that are not an int/slice or select nothing.
    """
    arrays = _npz_arrays(explanation, _rows(explanation, rows))
    if not isinstance(path, (str, os.PathLike)):
        np.savez_compressed(path, **arrays)  # type: ignore[arg-type]
        return None
    out = Path(path)
    if out.suffix.lower() != ".npz":
        out = out.with_name(out.name + ".npz")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)  # type: ignore[arg-type]
    return out


def explanation_npz_bytes(explanation: Explanation, rows: int | slice | None = None) -> bytes:
    """The bytes of :func:`save_explanation`'s ``.npz`` (e.g. a web download)."""
    buffer = io.BytesIO()
    save_explanation(buffer, explanation, rows)
    return buffer.getvalue()


@dataclass
class SavedMaps:
    """Maps read back by :func:`load_maps` (NumPy arrays; keys of :data:`MAPS_SCHEMA`).

    ``raw`` is one array, or a list for several layers; ``targets`` is ``None`` when the
    target was not a class; ``version`` is 0 for files written before the schema (the
    command line's ``maps``/``raw``/``targets``/``scores`` files and the web page's
    ``map``/``raw``/``target`` download), whose ``method``, ``label`` and ``options`` are not
    known (``""``, ``""`` and ``{}``).
    """

    maps: np.ndarray
    raw: np.ndarray | list[np.ndarray]
    scores: np.ndarray | None
    targets: np.ndarray | None
    method: str = ""
    label: str = ""
    layers: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    version: int = MAPS_VERSION

    def __len__(self) -> int:
        return int(self.maps.shape[0])

    def __repr__(self) -> str:
        raw = [r.shape for r in self.raw] if isinstance(self.raw, list) else self.raw.shape
        targets = None if self.targets is None else self.targets.tolist()[:4]
        return (
            f"SavedMaps(method={self.label or self.method!r}, layers={self.layers}, "
            f"maps={self.maps.shape}, raw={raw}, targets={targets}, version={self.version})"
        )


def load_maps(path: str | os.PathLike[str] | IO[bytes]) -> SavedMaps:
    """Read a maps ``.npz`` of :data:`MAPS_SCHEMA` (also the two older layouts, as version 0).

    Args:
        path: the file, or a binary file object.

    Returns:
        The :class:`SavedMaps`.

    Raises:
        ValueError: for a file that is not such an ``.npz`` or has a newer version.
    """
    name = path if isinstance(path, (str, os.PathLike)) else "maps data"
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{name} is not a readable .npz file: {err}") from err
    raws = sorted((k for k in arrays if k.startswith("raw_")), key=lambda k: int(k[4:]))
    raw: np.ndarray | list[np.ndarray] | None = (
        [arrays[k] for k in raws] if raws else arrays.get("raw")
    )
    if "version" not in arrays:
        return _legacy_maps(arrays, raw, name)
    version = int(arrays["version"])
    if version > MAPS_VERSION:
        raise ValueError(
            f"{name} has maps schema version {version}; this reads up to {MAPS_VERSION}"
        )
    missing = [k for k in ("maps", "scores", "method", "options") if k not in arrays]
    if missing or raw is None:
        raise ValueError(f"{name} lacks {missing or ['raw']} of the maps schema")
    return SavedMaps(
        maps=arrays["maps"],
        raw=raw,
        scores=arrays["scores"],
        targets=arrays.get("targets"),
        method=str(arrays["method"]),
        label=str(arrays.get("label", arrays["method"])),
        layers=[str(v) for v in arrays.get("layers", np.asarray([], dtype=str))],
        options=json.loads(str(arrays["options"])),
        version=version,
    )


def _legacy_maps(
    arrays: dict[str, np.ndarray], raw: np.ndarray | list[np.ndarray] | None, name: Any
) -> SavedMaps:
    """Version 0: the command line's ``maps``/``raw``/``scores``/``targets`` or the page's
    ``map`` ``(H, W)``/``raw``/``target`` (one sample)."""
    if "maps" in arrays and raw is not None:
        return SavedMaps(
            arrays["maps"], raw, arrays.get("scores"), arrays.get("targets"), version=0
        )
    if "map" in arrays and raw is not None:

        def batch_of_one(value: np.ndarray) -> np.ndarray:
            return value.reshape(1, 1, *value.shape)

        target = arrays.get("target")
        return SavedMaps(
            batch_of_one(arrays["map"]),
            [batch_of_one(r) for r in raw] if isinstance(raw, list) else batch_of_one(raw),
            None,
            None if target is None else np.asarray(target, dtype=np.int64).reshape(1),
            version=0,
        )
    raise ValueError(f"{name} is not a maps .npz (no 'version', 'maps' or 'map' array)")
