"""Reading photos and volumes, finding inputs, writing maps and JSON (evidencemap.io)."""

from __future__ import annotations

import io
import json
import re
import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from evidencemap.io import (
    IMAGE_SUFFIXES,
    VOLUME_SUFFIXES,
    find_inputs,
    is_volume_path,
    load_image,
    load_volume,
    normalise_volume,
    save_json,
    save_maps,
)

PHOTOS = {"chelsea": skdata.chelsea, "coffee": skdata.coffee, "astronaut": skdata.astronaut}


def _in_message(path: Path) -> str:
    return re.escape(str(path))


# --------------------------------------------------------------------------- photos


@pytest.mark.parametrize(
    ("photo", "suffix", "save_kwargs", "lossless"),
    [
        ("chelsea", ".png", {}, True),
        ("coffee", ".jpg", {"quality": 95}, False),
        ("astronaut", ".tiff", {}, True),
        ("chelsea", ".bmp", {}, True),
        ("coffee", ".webp", {"lossless": True}, True),
        ("astronaut", ".webp", {"quality": 90}, False),
    ],
)
def test_load_image_reads_each_format(tmp_path, photo, suffix, save_kwargs, lossless):
    pixels = PHOTOS[photo]()
    path = tmp_path / f"{photo}{suffix}"
    Image.fromarray(pixels).save(path, **save_kwargs)

    image = load_image(path)

    assert image.mode == "RGB"
    assert image.size == (pixels.shape[1], pixels.shape[0])
    loaded = np.asarray(image)
    if lossless:
        np.testing.assert_array_equal(loaded, pixels)
    else:
        assert np.abs(loaded.astype(int) - pixels.astype(int)).mean() < 4.0


def test_load_image_identifies_by_content_not_name(tmp_path):
    pixels = skdata.chelsea()
    path = tmp_path / "really_a_png.jpg"
    Image.fromarray(pixels).save(path, format="PNG")
    np.testing.assert_array_equal(np.asarray(load_image(path)), pixels)


def test_load_image_applies_exif_orientation(tmp_path):
    pixels = skdata.coffee()  # 400 × 600, landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)

    image = load_image(path)

    assert image.size == (400, 600)  # (width, height): now portrait
    with Image.open(path) as raw:
        assert raw.size == (600, 400)
        expected = np.asarray(raw.convert("RGB").transpose(Image.Transpose.ROTATE_270))
    np.testing.assert_array_equal(np.asarray(image), expected)


def test_load_image_turns_greyscale_into_rgb(tmp_path):
    grey = skdata.camera()
    path = tmp_path / "camera.png"
    Image.fromarray(grey).save(path)

    image = np.asarray(load_image(path))

    assert image.shape == (*grey.shape, 3)
    for channel in range(3):
        np.testing.assert_array_equal(image[..., channel], grey)


def test_load_image_composites_rgba_on_white(tmp_path):
    rgba = np.zeros((8, 10, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 30, 40)
    rgba[:, :5, 3] = 255  # left half opaque, right half fully transparent
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba).save(path)

    image = np.asarray(load_image(path))

    assert image.shape == (8, 10, 3)
    assert (image[:, :5] == (200, 30, 40)).all()
    assert (image[:, 5:] == 255).all()


def test_load_image_scales_16_bit_greyscale(tmp_path):
    values = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)

    image = np.asarray(load_image(path))

    expected = np.rint(values / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(image[..., 0], expected)
    assert image.min() == 0
    assert image.max() == 255


def test_load_image_rejects_truncated_jpeg(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(skdata.astronaut()).save(buffer, format="JPEG")
    path = tmp_path / "broken.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])

    with pytest.raises(ValueError, match=_in_message(path)):
        load_image(path)


def test_load_image_rejects_text_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n", encoding="utf-8")

    with pytest.raises(ValueError, match=_in_message(path)):
        load_image(path)


def test_load_image_missing_file(tmp_path):
    path = tmp_path / "nowhere.png"
    with pytest.raises(FileNotFoundError, match=_in_message(path)):
        load_image(path)


def test_load_image_rejects_directory(tmp_path):
    with pytest.raises(ValueError, match="directory"):
        load_image(tmp_path)


# --------------------------------------------------------------------------- finding inputs


def test_find_inputs_lists_images_and_volumes_recursively(tmp_path):
    names = [
        "b.png",
        "a.JPG",
        "scan.nii.gz",
        "sub/c.tiff",
        "sub/deeper/d.webp",
        "sub/volume.npy",
        "sub/image.nii",
        "notes.txt",
        "archive.gz",
        ".hidden.png",
        ".cache/e.png",
        "series/IM1.dcm",
        "series/IM2.dcm",
    ]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")

    found = find_inputs(tmp_path)

    expected = [
        "a.JPG",
        "b.png",
        "scan.nii.gz",
        "series",
        "sub/c.tiff",
        "sub/deeper/d.webp",
        "sub/image.nii",
        "sub/volume.npy",
    ]
    assert found == sorted(tmp_path / name for name in expected)


def test_find_inputs_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        find_inputs(tmp_path / "missing")
    file = tmp_path / "x.png"
    file.write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        find_inputs(file)


def test_is_volume_path(tmp_path):
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "1.dcm").write_bytes(b"")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "1.png").write_bytes(b"")

    assert is_volume_path("brain.nii.gz")
    assert is_volume_path(Path("brain.NII"))
    assert is_volume_path("volume.npy")
    assert is_volume_path(tmp_path / "series")
    assert not is_volume_path("cat.png")
    assert not is_volume_path("archive.gz")
    assert not is_volume_path(tmp_path / "photos")
    assert ".nii.gz" in VOLUME_SUFFIXES
    assert {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"} <= IMAGE_SUFFIXES


# --------------------------------------------------------------------------- NIfTI


@pytest.mark.parametrize(
    "affine",
    [
        np.diag([2.0, 3.0, 4.0, 1.0]),  # RAS
        np.diag([-0.5, -0.5, 1.5, 1.0]),  # LPS, as DICOM-derived files often are
        np.array([[0, 0, 1.2, 0], [-1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 1]]),  # permuted
    ],
)
def test_load_volume_nifti_round_trip(tmp_path, affine):
    affine = affine.copy()
    affine[:3, 3] = (-30.0, 12.0, 5.0)
    rng = np.random.default_rng(0)
    values = rng.normal(size=(5, 6, 7)).astype(np.float32)
    path = tmp_path / "volume.nii.gz"
    nib.save(nib.Nifti1Image(values, affine), path)

    volume, meta = load_volume(path)

    assert volume.dtype == torch.float32
    assert volume.shape[0] == 1
    assert sorted(volume.shape[1:]) == [5, 6, 7]
    assert meta["original_shape"] == (5, 6, 7)
    assert meta["format"] == "nifti"
    assert meta["source"] == str(path)
    new_affine = np.asarray(meta["affine"])
    assert nib.aff2axcodes(new_affine) == ("I", "P", "L")
    # every returned voxel sits at the same world point as the file's voxel with its value
    to_file = np.linalg.inv(affine) @ new_affine
    for index in np.ndindex(*volume.shape[1:]):
        i, j, k = np.rint(to_file @ (*index, 1.0))[:3].astype(int)
        assert volume[(0, *index)].item() == values[i, j, k]
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    assert sorted(meta["spacing"]) == pytest.approx(sorted(spacing))


def test_load_volume_nifti_ras_axes(tmp_path):
    values = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # (x: R, y: A, z: S)
    path = tmp_path / "ras.nii"
    nib.save(nib.Nifti1Image(values, np.diag([1.0, 2.0, 3.0, 1.0])), path)

    volume, meta = load_volume(path)

    expected = values[::-1, ::-1, ::-1].transpose(2, 1, 0)  # (S→I, A→P, R→L)
    np.testing.assert_array_equal(volume[0].numpy(), expected)
    assert meta["spacing"] == pytest.approx((3.0, 2.0, 1.0))
    assert meta["shape"] == (1, 4, 3, 2)


def test_load_volume_nifti_channels_and_scaling(tmp_path):
    # NIfTI keeps channels on its 5th axis (x, y, z, t = 1, c); the 4th is time
    values = np.arange(4 * 5 * 6 * 2, dtype=np.int16).reshape(4, 5, 6, 1, 2)
    image = nib.Nifti1Image(values, np.diag([-1.0, -1.0, 1.0, 1.0]))
    image.header.set_slope_inter(0.5, 10.0)
    path = tmp_path / "two_channels.nii.gz"
    nib.save(image, path)

    volume, meta = load_volume(path)

    assert volume.shape == (2, 6, 5, 4)
    assert meta["frames"] == 1
    assert meta["frame"] is None
    expected = values[..., 0, 1].astype(np.float32)[:, :, ::-1].transpose(2, 1, 0) * 0.5 + 10.0
    np.testing.assert_allclose(volume[1].numpy(), expected)


EXAMPLE_4D = Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz"


def test_load_volume_4d_nifti_needs_a_frame_and_reads_the_one_chosen():
    with pytest.raises(ValueError, match=r"4th axis \(time\) holds 2 frames") as caught:
        load_volume(EXAMPLE_4D)
    assert "frame=" in str(caught.value)
    assert "--frame" in str(caught.value)

    volume, meta = load_volume(EXAMPLE_4D, frame=1)

    image = nib.load(EXAMPLE_4D)
    assert image.shape == (128, 96, 24, 2)
    assert volume.shape == (1, 24, 96, 128)  # one frame, one channel: (S→I, A→P, R→L)
    assert meta["frame"] == 1
    assert meta["frames"] == 2
    assert meta["original_shape"] == (128, 96, 24, 2)
    frame = image.get_fdata(dtype=np.float32)[..., 1]
    to_file = np.linalg.inv(image.affine) @ np.asarray(meta["affine"])
    for index in [(0, 0, 0), (12, 40, 70), (23, 95, 127)]:
        i, j, k = np.rint(to_file @ (*index, 1.0))[:3].astype(int)
        assert volume[(0, *index)].item() == pytest.approx(frame[i, j, k])
    first, _ = load_volume(EXAMPLE_4D, frame=0)
    assert not torch.equal(first, volume)


def test_load_volume_frame_out_of_range_or_of_the_wrong_type(tmp_path):
    with pytest.raises(ValueError, match="frame 2 is out of range"):
        load_volume(EXAMPLE_4D, frame=2)
    with pytest.raises(TypeError, match="frame must be an int"):
        load_volume(EXAMPLE_4D, frame="1")  # type: ignore[arg-type]
    path = tmp_path / "three_d.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((3, 4, 5), np.float32), np.eye(4)), path)
    assert load_volume(path, frame=0)[0].shape == (1, 5, 4, 3)  # a 3-D volume is frame 0
    with pytest.raises(ValueError, match=r"one frame \(frame 0\)"):
        load_volume(path, frame=1)
    array = tmp_path / "volume.npy"
    np.save(array, np.ones((3, 4, 5), np.float32))
    with pytest.raises(ValueError, match="out of range"):
        load_volume(array, frame=3)


def test_load_volume_nifti_needs_nibabel(tmp_path, monkeypatch):
    path = tmp_path / "volume.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), path)
    monkeypatch.setitem(sys.modules, "nibabel", None)

    with pytest.raises(ImportError, match="pip install nibabel"):
        load_volume(path)


def test_load_volume_rejects_corrupt_nifti(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ValueError, match=_in_message(path)):
        load_volume(path)


# --------------------------------------------------------------------------- .npy


def test_load_volume_npy_3d(tmp_path):
    values = np.arange(3 * 4 * 5, dtype=np.int32).reshape(3, 4, 5)
    path = tmp_path / "volume.npy"
    np.save(path, values)

    volume, meta = load_volume(path)

    assert volume.dtype == torch.float32
    assert volume.shape == (1, 3, 4, 5)
    np.testing.assert_array_equal(volume[0].numpy(), values)
    assert meta == {
        "source": str(path),
        "format": "npy",
        "original_shape": (3, 4, 5),
        "shape": (1, 3, 4, 5),
        "frame": None,
        "frames": 1,
        "spacing": None,
        "affine": None,
    }


@pytest.mark.parametrize(
    ("shape", "channel_axis"), [((2, 6, 7, 8), 0), ((6, 7, 8, 3), -1), ((1, 6, 7, 8), 0)]
)
def test_load_volume_npy_channels(tmp_path, shape, channel_axis):
    values = np.random.default_rng(1).normal(size=shape)
    path = tmp_path / "channels.npy"
    np.save(path, values)

    volume, _ = load_volume(path)

    expected = np.moveaxis(values, channel_axis, 0).astype(np.float32)
    assert volume.shape == expected.shape
    np.testing.assert_array_equal(volume.numpy(), expected)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (np.zeros((4, 5)), "3-D or 4-D"),
        (np.zeros((2, 3, 4, 5, 6)), "3-D or 4-D"),
        (np.zeros((5, 6, 7, 8)), "channel axis"),
        (np.array([[[1.0, np.nan]]]), "NaN"),
        (np.array([[[1.0, np.inf]]]), "NaN or infinite"),
        (np.zeros((0, 3, 3)), "empty"),
        (np.zeros((2, 2, 2), dtype=np.complex64), "complex"),
        (np.array([[["a"]]]), "not real numbers"),
    ],
)
def test_load_volume_npy_rejects_bad_arrays(tmp_path, values, message):
    path = tmp_path / "bad.npy"
    np.save(path, values)
    with pytest.raises(ValueError, match=message):
        load_volume(path)


def test_load_volume_rejects_pickled_npy(tmp_path):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=_in_message(path)):
        load_volume(path)


def test_load_volume_missing_and_unknown(tmp_path):
    missing = tmp_path / "nope.npy"
    with pytest.raises(FileNotFoundError, match=_in_message(missing)):
        load_volume(missing)
    other = tmp_path / "volume.txt"
    other.write_text("1 2 3")
    with pytest.raises(ValueError, match="not a volume"):
        load_volume(other)


# --------------------------------------------------------------------------- DICOM


class _Dataset:
    """Stands in for ``pydicom.Dataset``: attributes by keyword and ``"Keyword" in dataset``."""

    def __init__(self, **fields: object) -> None:
        self.__dict__.update(fields)

    def __contains__(self, keyword: str) -> bool:
        return keyword in self.__dict__


@pytest.fixture
def fake_pydicom(monkeypatch):
    """A minimal pydicom (``dcmread``, ``errors.InvalidDicomError``) reading JSON slice files."""
    errors = types.ModuleType("pydicom.errors")

    class InvalidDicomError(Exception):
        pass

    errors.InvalidDicomError = InvalidDicomError

    def dcmread(path):
        text = Path(path).read_text(encoding="utf-8")
        if not text.startswith("{"):
            raise InvalidDicomError(f"{path} has no DICOM header")
        fields = json.loads(text)
        fields["pixel_array"] = np.asarray(fields.pop("pixels"), dtype=np.uint16)
        fields["PixelData"] = b"..."
        return _Dataset(**fields)

    module = types.ModuleType("pydicom")
    module.errors = errors
    module.dcmread = dcmread
    monkeypatch.setitem(sys.modules, "pydicom", module)
    monkeypatch.setitem(sys.modules, "pydicom.errors", errors)


def _write_slice(
    path: Path, pixels: np.ndarray, z: float, number: int, series: str = "1.2"
) -> None:
    fields = {
        "SeriesInstanceUID": series,
        "ImagePositionPatient": [-10.0, 20.0, z],
        "ImageOrientationPatient": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
        "PixelSpacing": [0.8, 0.6],
        "SliceThickness": 2.5,
        "InstanceNumber": number,
        "RescaleSlope": 2.0,
        "RescaleIntercept": -1024.0,
        "SamplesPerPixel": 1,
        "pixels": pixels.tolist(),
    }
    path.write_text(json.dumps(fields), encoding="utf-8")


def test_load_volume_dicom_series_sorted_by_position(tmp_path, fake_pydicom):
    rng = np.random.default_rng(2)
    planes = [rng.integers(0, 1000, size=(6, 5)) for _ in range(4)]
    folder = tmp_path / "series"
    folder.mkdir()
    # file names and instance numbers both disagree with the slice positions
    for name, k in zip(["a.dcm", "b.dcm", "c.dcm", "d.dcm"], [2, 0, 3, 1], strict=True):
        _write_slice(folder / name, planes[k], z=5.0 + 2.5 * k, number=k % 2)
    (folder / "README.txt").write_text("scanner export", encoding="utf-8")

    volume, meta = load_volume(folder)

    stacked = np.stack(planes).astype(np.float32) * 2.0 - 1024.0  # rescale slope/intercept
    assert volume.shape == (1, 4, 6, 5)
    # DICOM's z runs towards the head; D runs towards the feet, so the stack is reversed
    np.testing.assert_array_equal(volume[0].numpy(), stacked[::-1])
    assert meta["format"] == "dicom"
    assert meta["spacing"] == pytest.approx((2.5, 0.8, 0.6))
    affine = np.asarray(meta["affine"])
    assert nib.aff2axcodes(affine) == ("I", "P", "L")
    # voxel (0, 0, 0) is the top slice's first pixel: LPS (-10, 20, 12.5) → RAS (10, -20, 12.5)
    np.testing.assert_allclose(affine[:3, 3], (10.0, -20.0, 12.5))


def test_load_volume_dicom_rejects_mixed_series(tmp_path, fake_pydicom):
    folder = tmp_path / "mixed"
    folder.mkdir()
    _write_slice(folder / "1.dcm", np.zeros((2, 2)), z=0.0, number=1, series="1.2")
    _write_slice(folder / "2.dcm", np.zeros((2, 2)), z=1.0, number=2, series="3.4")
    with pytest.raises(ValueError, match="2 DICOM series"):
        load_volume(folder)


def test_load_volume_dicom_empty_folder(tmp_path, fake_pydicom):
    (tmp_path / "notes.txt").write_text("nothing here", encoding="utf-8")
    with pytest.raises(ValueError, match="no DICOM images"):
        load_volume(tmp_path)


def test_load_volume_dicom_needs_pydicom(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(ImportError, match="pip install pydicom"):
        load_volume(tmp_path)


# --------------------------------------------------------------------------- normalising


def test_normalise_volume_zscore_per_channel():
    rng = torch.Generator().manual_seed(0)
    volume = torch.stack(
        [torch.randn(8, 9, 10, generator=rng) * 50 + 300, torch.rand(8, 9, 10, generator=rng)]
    )

    scaled = normalise_volume(volume)

    assert scaled.dtype == torch.float32
    assert scaled.shape == volume.shape
    means = scaled.mean(dim=(1, 2, 3))
    stds = scaled.std(dim=(1, 2, 3), correction=0)
    torch.testing.assert_close(means, torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(stds, torch.ones(2), atol=1e-5, rtol=0)


def test_normalise_volume_constant_gives_zeros():
    scaled = normalise_volume(torch.full((1, 4, 4, 4), 7.0))
    assert torch.equal(scaled, torch.zeros(1, 4, 4, 4))


def test_normalise_volume_window():
    volume = torch.tensor([-2000.0, -1000.0, -300.0, 400.0, 3000.0]).view(1, 1, 5)

    scaled = normalise_volume(volume, window=(-1000, 400))

    torch.testing.assert_close(scaled.flatten(), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


@pytest.mark.parametrize(
    ("volume", "window", "message"),
    [
        (torch.zeros(4, 4), None, "at least 3 axes"),
        (torch.tensor([[[float("nan")]]]), None, "NaN"),
        (torch.zeros(2, 2, 2), (5.0, 5.0), "low < high"),
        (torch.zeros(2, 2, 2), (1.0, float("inf")), "low < high"),
    ],
)
def test_normalise_volume_rejects(volume, window, message):
    with pytest.raises(ValueError, match=message):
        normalise_volume(volume, window)


# --------------------------------------------------------------------------- writing


def test_save_maps_round_trip(tmp_path):
    gradcam = torch.rand(1, 1, 7, 9, requires_grad=True)
    fgvis = torch.rand(1, 1, 7, 9, dtype=torch.float64)
    half = torch.rand(4, 4).to(torch.bfloat16)

    written = save_maps(tmp_path / "out" / "maps", gradcam=gradcam, fgvis=fgvis, half=half)

    assert written == tmp_path / "out" / "maps.npz"
    with np.load(written) as stored:
        assert set(stored.files) == {"gradcam", "fgvis", "half"}
        np.testing.assert_array_equal(stored["gradcam"], gradcam.detach().numpy())
        np.testing.assert_array_equal(stored["fgvis"], fgvis.numpy())
        assert stored["fgvis"].dtype == np.float64
        np.testing.assert_array_equal(stored["half"], half.float().numpy())


def test_save_maps_rejects(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        save_maps(tmp_path / "maps.npz")
    with pytest.raises(TypeError, match="scores"):
        save_maps(tmp_path / "maps.npz", scores=[0.1, 0.2])


def test_save_json_converts_tensors_and_numpy(tmp_path):
    report = {
        "label": "tiger cat — 猫",
        "score": torch.tensor(0.25),
        "top": torch.tensor([3, 1]),
        "mean": np.float32(0.5),
        "count": np.int64(3),
        "grid": np.arange(4).reshape(2, 2),
        "shape": (1, 2),
        "path": Path("a") / "b.png",
        "missing": float("nan"),
        1: "key",
    }

    path = save_json(tmp_path / "report.json", report)

    text = path.read_text(encoding="utf-8")
    assert "tiger cat — 猫" in text  # written as UTF-8, not \u escapes
    assert '\n  "score": 0.25' in text  # indented
    assert json.loads(text) == {
        "label": "tiger cat — 猫",
        "score": 0.25,
        "top": [3, 1],
        "mean": 0.5,
        "count": 3,
        "grid": [[0, 1], [2, 3]],
        "shape": [1, 2],
        "path": str(Path("a") / "b.png"),
        "missing": None,
        "1": "key",
    }


def test_save_json_rejects_unknown_objects(tmp_path):
    with pytest.raises(TypeError, match="object"):
        save_json(tmp_path / "bad.json", {"thing": object()})


# --------------------------------------------------------------------------- maps as NIfTI


def test_save_nifti_keeps_the_inputs_affine_and_world_positions(tmp_path):
    from evidencemap.io import save_nifti

    volume, meta = load_volume(EXAMPLE_4D, frame=0)
    peak = (10, 50, 60)
    heat = torch.zeros(volume.shape[1:])
    heat[peak] = 1.0

    path = save_nifti(tmp_path / "frame0_gradcam", heat, meta["affine"])

    assert path.name == "frame0_gradcam.nii.gz"
    saved = nib.load(path)
    np.testing.assert_allclose(saved.affine, np.asarray(meta["affine"]), atol=1e-5)
    assert saved.header.get_sform(coded=True)[1] == 1
    assert saved.get_data_dtype() == np.float32
    # the hot voxel lies at the same point in millimetres as the input voxel it explains
    original = nib.load(EXAMPLE_4D)
    world = saved.affine @ (*np.argwhere(saved.get_fdata() == 1.0)[0], 1.0)
    voxel = np.rint(np.linalg.inv(original.affine) @ world)[:3].astype(int)
    expected = np.linalg.inv(original.affine) @ np.asarray(meta["affine"]) @ (*peak, 1.0)
    np.testing.assert_array_equal(voxel, np.rint(expected[:3]).astype(int))
    assert nib.aff2axcodes(saved.affine) == ("I", "P", "L")
    # read back by the library itself: the same map, on the same grid
    again, again_meta = load_volume(path)
    torch.testing.assert_close(again[0], heat)
    np.testing.assert_allclose(again_meta["affine"], meta["affine"], atol=1e-5)


def test_save_nifti_resizes_a_model_resolution_map_to_the_volume(tmp_path):
    from evidencemap.io import save_nifti

    small = torch.rand(1, 4, 6, 8)
    path = save_nifti(tmp_path / "map.nii", small, np.diag([2.0, 2.0, 2.0, 1.0]), shape=(8, 12, 16))
    assert nib.load(path).shape == (8, 12, 16)
    assert path.suffix == ".nii"
    with pytest.raises(ValueError, match="affine must be an invertible"):
        save_nifti(tmp_path / "bad", small, np.zeros((4, 4)))
    with pytest.raises(ValueError, match="volume_map must be"):
        save_nifti(tmp_path / "bad", torch.rand(4, 6), np.eye(4))


# --------------------------------------------------------------------------- maps as .npz


def _explanation(layers: int = 1, targets: bool = True):
    from evidencemap.explanation import Explanation

    raw = torch.rand(3, 1, 4, 5)
    return Explanation(
        maps=torch.rand(3, 1, 16, 20),
        raw=[raw, torch.rand(3, 1, 8, 10)] if layers == 2 else raw,
        targets=torch.tensor([5, 1, 7]) if targets else None,
        scores=torch.tensor([1.5, -0.5, 2.0]),
        method="gradcam",
        layer=["a.0", "b.1"] if layers == 2 else "a.0",
        options={"relu": True, "counterfactual": True, "eval_mode": True},
    )


@pytest.mark.parametrize(("layers", "targets"), [(1, True), (2, True), (1, False)])
def test_npz_schema_round_trips_through_the_reader(tmp_path, layers, targets):
    from evidencemap.io import MAPS_SCHEMA, MAPS_VERSION, load_maps, save_explanation

    explanation = _explanation(layers, targets)

    path = save_explanation(tmp_path / "cat_gradcam", explanation)
    saved = load_maps(path)

    assert path is not None
    assert path.name == "cat_gradcam.npz"
    assert saved.version == MAPS_VERSION == 1
    assert len(saved) == 3
    np.testing.assert_array_equal(saved.maps, explanation.maps.numpy())
    np.testing.assert_array_equal(saved.scores, explanation.scores.numpy())
    assert saved.method == "gradcam"
    assert saved.label == "counterfactual gradcam"
    assert saved.options == explanation.options
    if layers == 2:
        assert saved.layers == ["a.0", "b.1"]
        assert isinstance(saved.raw, list)
        for got, want in zip(saved.raw, explanation.raw, strict=True):
            np.testing.assert_array_equal(got, want.numpy())
    else:
        assert saved.layers == ["a.0"]
        np.testing.assert_array_equal(saved.raw, explanation.raw.numpy())
    if targets:
        assert saved.targets.dtype == np.int64
        assert saved.targets.tolist() == [5, 1, 7]
    else:
        assert saved.targets is None
    with np.load(path) as data:  # plain arrays: no pickles needed
        keys = set(data.files)
        assert data["maps"].dtype == np.float32
        assert data["scores"].dtype == np.float32
        assert data["version"].shape == ()
    documented = set(MAPS_SCHEMA) - {"raw"} - (set() if targets else {"targets"})
    assert documented <= keys
    assert "tensor(" not in repr(saved)


def test_npz_bytes_of_one_sample_are_the_same_schema():
    from evidencemap.io import explanation_npz_bytes, load_maps

    explanation = _explanation()

    data = explanation_npz_bytes(explanation, 1)
    saved = load_maps(io.BytesIO(data))

    assert data.startswith(b"PK")
    assert saved.maps.shape == (1, 1, 16, 20)
    np.testing.assert_array_equal(saved.maps[0], explanation.maps[1].numpy())
    assert saved.targets.tolist() == [1]
    with pytest.raises(ValueError, match="outside the batch"):
        explanation_npz_bytes(explanation, 3)


def test_load_maps_reads_the_two_older_layouts_and_refuses_newer(tmp_path):
    from evidencemap.io import load_maps

    cli = tmp_path / "cli.npz"
    np.savez_compressed(
        cli,
        maps=np.zeros((2, 1, 4, 4), np.float32),
        raw=np.ones((2, 1, 2, 2), np.float32),
        scores=np.ones(2, np.float32),
        targets=np.array([3, 4]),
    )
    page = tmp_path / "page.npz"
    np.savez(page, map=np.zeros((4, 4), np.float32), raw=np.ones((2, 2), np.float32), target=7)
    newer = tmp_path / "newer.npz"
    np.savez(newer, version=np.asarray(2), maps=np.zeros((1, 1, 2, 2)))

    old = load_maps(cli)
    one = load_maps(page)

    assert old.version == one.version == 0
    assert old.targets.tolist() == [3, 4]
    assert one.maps.shape == (1, 1, 4, 4)
    assert one.raw.shape == (1, 1, 2, 2)
    assert one.targets.tolist() == [7]
    with pytest.raises(ValueError, match="version 2"):
        load_maps(newer)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_maps(tmp_path / "junk.npz")
