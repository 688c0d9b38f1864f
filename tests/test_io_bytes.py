"""evidencemap.io.load_image_bytes: in-memory photos identified by content, pixel limit first."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data

from evidencemap.io import (
    ImageTooLargeError,
    UnsupportedImageError,
    load_image,
    load_image_bytes,
)


def encoded(pixels: np.ndarray, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **kw)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_formats_round_trip(fmt):
    pixels = data.chelsea()
    kw = {"lossless": True} if fmt == "WEBP" else {}
    image = load_image_bytes(encoded(pixels, fmt, **kw))
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), pixels)


def test_same_result_as_load_image(tmp_path):
    content = encoded(data.coffee(), "JPEG", quality=85)
    path = tmp_path / "coffee.bin"
    path.write_bytes(content)
    np.testing.assert_array_equal(
        np.asarray(load_image_bytes(content)), np.asarray(load_image(path))
    )


def test_accepts_bytearray_and_memoryview():
    content = encoded(data.astronaut(), "PNG")
    for view in (bytearray(content), memoryview(content)):
        assert load_image_bytes(view).size == (512, 512)


def test_pixel_limit_checked_from_the_header():
    content = encoded(data.chelsea(), "PNG")
    assert load_image_bytes(content, max_pixels=451 * 300).size == (451, 300)
    with pytest.raises(ImageTooLargeError, match="451 × 300 = 135300 pixels; the limit is 135299"):
        load_image_bytes(content, max_pixels=451 * 300 - 1)


@pytest.mark.parametrize(
    ("content", "error", "words"),
    [
        (b"plain text", UnsupportedImageError, "upload is not a readable PNG"),
        (b"GIF89a" + b"\x00" * 40, UnsupportedImageError, "upload is not a readable"),
        (b"", ValueError, "upload is empty"),
    ],
)
def test_bad_data(content, error, words):
    with pytest.raises(error, match=words):
        load_image_bytes(content, name="upload")


def test_truncated_data():
    content = encoded(data.chelsea(), "JPEG")
    with pytest.raises(ValueError, match="truncated or corrupt") as info:
        load_image_bytes(content[: len(content) // 3])
    assert not isinstance(info.value, (UnsupportedImageError, ImageTooLargeError))


def test_bad_arguments():
    with pytest.raises(TypeError, match="data must be bytes"):
        load_image_bytes("photo.png")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_pixels"):
        load_image_bytes(b"x", max_pixels=0)
