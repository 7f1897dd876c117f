"""Tests for defectscope.data.images: decoding every mode and source to 8-bit grey, errors, resizing."""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectscope.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    decode_gray,
    load_gray,
    resize_gray,
)
from defectscope.data.wafer import WAFER_EXTENSIONS

SRC = Path(__file__).resolve().parents[1] / "src"


def save(im: Image.Image, path: Path, **kwargs) -> Path:
    im.save(path, **kwargs)
    return path


def luma(rgb: tuple[int, int, int]) -> int:
    """What Pillow's RGB -> L gives for one colour (ITU-R 601)."""
    return Image.new("RGB", (1, 1), rgb).convert("L").getpixel((0, 0))


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height 8-bit grey pixels, with valid CRCs but almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


@pytest.fixture
def noise() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(48, 64), dtype=np.uint8)


@pytest.fixture
def noise_rgb() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, size=(6, 5, 3), dtype=np.uint8)


def assert_gray(out: np.ndarray, shape: tuple[int, int]) -> None:
    assert out.dtype == np.uint8
    assert out.shape == shape
    assert out.flags.writeable and out.flags.c_contiguous


# --- file modes -------------------------------------------------------------------------------------------


def test_l_png_is_unchanged(tmp_path, noise):
    out = decode_gray(save(Image.fromarray(noise), tmp_path / "a.png"))
    assert_gray(out, noise.shape)
    np.testing.assert_array_equal(out, noise)


def test_16bit_png_scales_by_257(tmp_path):
    values = np.array([[0, 257, 257 * 100, 65535], [128, 129, 257 * 200, 1000]], dtype=np.uint16)
    path = save(Image.fromarray(values), tmp_path / "a.png")
    with Image.open(path) as im:
        assert im.mode in ("I;16", "I")
    out = decode_gray(path)
    np.testing.assert_array_equal(out, [[0, 1, 100, 255], [0, 1, 200, 4]])


def test_16bit_big_endian_and_int32_modes():
    big = Image.frombytes("I;16B", (3, 1), struct.pack(">3H", 0, 257 * 7, 65535))
    np.testing.assert_array_equal(decode_gray(big), [[0, 7, 255]])
    small_i = Image.fromarray(np.array([[0, 257, 65535]], dtype=np.int32))
    assert small_i.mode == "I"
    np.testing.assert_array_equal(decode_gray(small_i), [[0, 1, 255]])
    # Beyond 16 bit there is no natural full scale: stretched per image.
    big_i = Image.fromarray(np.array([[-10, 0, 10, 100_000]], dtype=np.int32))
    out = decode_gray(big_i)
    assert out.min() == 0 and out.max() == 255
    assert list(out[0]) == sorted(out[0])


def test_float_mode_is_stretched_and_constant_is_zero():
    f = Image.fromarray(np.array([[0.25, 0.5, 0.75]], dtype=np.float32))
    assert f.mode == "F"
    np.testing.assert_array_equal(decode_gray(f), [[0, 128, 255]])
    flat = Image.fromarray(np.full((2, 3), 7.5, dtype=np.float32))
    np.testing.assert_array_equal(decode_gray(flat), np.zeros((2, 3)))


def test_palette_with_transparency_uses_colours(tmp_path):
    im = Image.new("P", (4, 2), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.paste(1, (2, 0, 4, 2))
    im.info["transparency"] = 0
    path = save(im, tmp_path / "p.png")
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info
    out = decode_gray(path)
    np.testing.assert_array_equal(out[:, :2], luma((255, 0, 0)))  # the transparent red still counts
    np.testing.assert_array_equal(out[:, 2:], luma((0, 0, 255)))


def test_rgb_is_itu601_luma(tmp_path, noise_rgb):
    out = decode_gray(save(Image.fromarray(noise_rgb), tmp_path / "c.png"))
    assert_gray(out, noise_rgb.shape[:2])
    r, g, b = (noise_rgb[..., i].astype(float) for i in range(3))
    assert np.abs(out - (r * 0.299 + g * 0.587 + b * 0.114)).max() <= 1


def test_rgba_alpha_is_ignored(tmp_path, noise_rgb):
    expected = decode_gray(Image.fromarray(noise_rgb))
    for alpha in (0, 128, 255):
        rgba = np.dstack([noise_rgb, np.full(noise_rgb.shape[:2], alpha, np.uint8)])
        path = save(Image.fromarray(rgba), tmp_path / f"a{alpha}.png")
        np.testing.assert_array_equal(decode_gray(path), expected)


def test_la_drops_alpha(tmp_path):
    path = save(Image.new("LA", (3, 2), (100, 0)), tmp_path / "la.png")
    np.testing.assert_array_equal(decode_gray(path), np.full((2, 3), 100))


def test_one_bit_becomes_0_and_255(tmp_path):
    im = Image.fromarray(np.array([[True, False], [False, True]]))
    assert im.mode == "1"
    out = decode_gray(save(im, tmp_path / "b.png"))
    np.testing.assert_array_equal(out, [[255, 0], [0, 255]])


def test_cmyk_jpeg(tmp_path):
    white = save(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), tmp_path / "w.jpg")
    black = save(Image.new("CMYK", (8, 8), (0, 0, 0, 255)), tmp_path / "k.jpg")
    with Image.open(white) as im:
        assert im.mode == "CMYK"
    assert decode_gray(white).min() >= 253
    assert decode_gray(black).max() <= 2


@pytest.mark.parametrize("mode", ["YCbCr", "HSV", "LAB"])
def test_other_colour_modes_match_rgb(noise_rgb, mode):
    rgb = Image.fromarray(noise_rgb)
    converted = rgb.convert(mode) if mode != "LAB" else Image.new("LAB", (5, 6), (128, 128, 128))
    expected = decode_gray(rgb) if mode != "LAB" else np.full((6, 5), 119)  # L* 50 is sRGB grey 119
    assert np.abs(decode_gray(converted).astype(int) - expected).max() <= 3


@pytest.mark.parametrize(("orientation", "dark"), [(6, "top"), (8, "bottom")])
def test_exif_orientation_is_applied(tmp_path, orientation, dark):
    arr = np.full((10, 40), 255, np.uint8)
    arr[:, :20] = 0  # dark left half
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(Image.fromarray(arr), tmp_path / "r.jpg", exif=exif, quality=95)
    out = decode_gray(path)
    assert out.shape == (40, 10)
    top, bottom = out[:20].mean(), out[20:].mean()
    assert (top < bottom) == (dark == "top")  # 6 turns the left side to the top, 8 to the bottom


def test_multipage_tiff_uses_first_frame(tmp_path):
    frames = [Image.new("L", (4, 3), v) for v in (10, 200)]
    path = save(frames[0], tmp_path / "m.tif", save_all=True, append_images=frames[1:])
    with Image.open(path) as im:
        assert im.n_frames == 2
    np.testing.assert_array_equal(decode_gray(path), np.full((3, 4), 10))


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("L", (4, 3), v) for v in (30, 220)]
    path = save(frames[0], tmp_path / "m.gif", save_all=True, append_images=frames[1:])
    with Image.open(path) as im:
        assert im.n_frames == 2
    np.testing.assert_array_equal(decode_gray(path), np.full((3, 4), 30))


# --- other sources ----------------------------------------------------------------------------------------


def test_bytes_and_bytearray(tmp_path, noise):
    data = save(Image.fromarray(noise), tmp_path / "a.png").read_bytes()
    np.testing.assert_array_equal(decode_gray(data), noise)
    np.testing.assert_array_equal(decode_gray(bytearray(data)), noise)
    np.testing.assert_array_equal(decode_gray(str(tmp_path / "a.png")), noise)


def test_pil_input_is_not_modified(noise_rgb):
    im = Image.fromarray(noise_rgb)
    before = im.tobytes()
    out = decode_gray(im)
    assert_gray(out, noise_rgb.shape[:2])
    assert im.mode == "RGB" and im.tobytes() == before


@pytest.mark.parametrize(
    ("arr", "expected"),
    [
        (np.array([[0, 7, 255]], np.uint8), [[0, 7, 255]]),
        (np.array([[0, 257, 65535]], np.uint16), [[0, 1, 255]]),
        (np.array([[0, 257, 65535]], ">u2"), [[0, 1, 255]]),
        (np.array([[0, 257, 65535]], np.int32), [[0, 1, 255]]),
        (np.array([[-5, 0, 5]], np.int64), [[0, 128, 255]]),
        (np.array([[True, False]]), [[255, 0]]),
        (np.array([[0.0, 0.5, 1.0]], np.float32), [[0, 128, 255]]),
        (np.array([[-1.0, 0.0, 3.0]]), [[0, 64, 255]]),
        (np.full((1, 3), 5.0), [[0, 0, 0]]),
        (np.array([[[3], [9]]], np.uint8), [[3, 9]]),
    ],
    ids=[
        "uint8",
        "uint16",
        "uint16-big-endian",
        "int32",
        "int64-stretch",
        "bool",
        "float01",
        "float-stretch",
        "float-constant",
        "HxWx1",
    ],
)
def test_array_dtypes(arr, expected):
    out = decode_gray(arr)
    assert_gray(out, np.asarray(expected).shape)
    np.testing.assert_array_equal(out, expected)


def test_array_result_does_not_alias_input():
    arr = np.zeros((2, 2), np.uint8)
    decode_gray(arr)[0, 0] = 9
    assert arr[0, 0] == 0


def test_colour_arrays(noise_rgb):
    expected = np.array(Image.fromarray(noise_rgb).convert("L"))
    np.testing.assert_array_equal(decode_gray(noise_rgb), expected)
    rgba = np.dstack([noise_rgb, np.zeros(noise_rgb.shape[:2], np.uint8)])
    np.testing.assert_array_equal(decode_gray(rgba), expected)
    np.testing.assert_array_equal(decode_gray(noise_rgb / 255.0), expected)
    np.testing.assert_array_equal(decode_gray(noise_rgb.astype(np.uint16) * 257), expected)


@pytest.mark.parametrize(
    ("arr", "reason"),
    [
        (np.zeros((2, 2, 2), np.uint8), "shape"),
        (np.zeros((4,), np.uint8), "shape"),
        (np.zeros((1, 2, 3, 4), np.uint8), "shape"),
        (np.zeros((0, 5), np.uint8), "zero-size"),
        (np.zeros((5, 0, 3), np.uint8), "zero-size"),
        (np.array([[0.0, np.nan]]), "NaN"),
        (np.array([[0.0, np.inf]]), "NaN"),
        (np.zeros((2, 2), complex), "dtype"),
        (np.zeros((2, 2), object), "dtype"),
    ],
)
def test_bad_arrays(arr, reason):
    with pytest.raises(ImageDecodeError, match=reason) as info:
        decode_gray(arr)
    assert info.value.path == "<array>"


def test_zero_size_pil_image():
    with pytest.raises(ImageDecodeError, match="zero-size"):
        decode_gray(Image.new("L", (0, 5)))


def test_unsupported_source_type():
    with pytest.raises(TypeError, match="int"):
        decode_gray(123)


# --- bad files ---------------------------------------------------------------------------------------------


def _expect_error(source, reason: str, name: str | None = None) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as info:
        decode_gray(source)
    err = info.value
    assert type(err) is ImageDecodeError and isinstance(err, ValueError)
    assert reason in err.reason
    name = name or str(source)
    assert err.path == name and str(err) == f"{name}: {err.reason}"
    return err


def _expect_error_kw(path: Path, **kwargs) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as info:
        decode_gray(path, **kwargs)
    assert info.value.path == str(path)
    return info.value


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "nope.png", "missing")
    _expect_error(tmp_path / "nodir" / "nope.png", "missing")


def test_directory(tmp_path):
    _expect_error(tmp_path, "not a file")


def test_empty_file(tmp_path):
    path = tmp_path / "e.png"
    path.write_bytes(b"")
    _expect_error(path, "empty file")
    _expect_error(b"", "empty file", "<bytes>")


def test_text_file(tmp_path):
    path = tmp_path / "t.png"
    path.write_text("hello, this is not an image\n")
    _expect_error(path, "not an image")
    _expect_error(b"not an image either", "not an image", "<bytes>")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_fifo_is_refused_without_blocking(tmp_path):
    path = tmp_path / "f.png"
    os.mkfifo(path)
    _expect_error(path, "not a regular file")


# No zeroed-middle JPEG: libjpeg decodes corrupt entropy data without an error, so there is nothing to detect.
@pytest.mark.parametrize(
    ("fmt", "damage"),
    [
        ("png", "first-half"),
        ("png", "header-only"),
        ("png", "zeroed-middle"),
        ("jpg", "first-half"),
        ("jpg", "header-only"),
    ],
)
def test_truncated_or_corrupt(tmp_path, noise, fmt, damage):
    data = save(Image.fromarray(noise), tmp_path / f"ok.{fmt}", quality=95).read_bytes()
    half = len(data) // 2
    if damage == "zeroed-middle":
        data = data[:half] + bytes(50) + data[half + 50 :]
    else:
        data = data[: half if damage == "first-half" else 20]
    path = tmp_path / f"bad.{fmt}"
    path.write_bytes(data)
    err = _expect_error(path, "")
    assert any(word in err.reason for word in ("truncated", "corrupt", "not an image", "unreadable"))


def test_max_pixels_is_checked(tmp_path):
    path = save(Image.new("L", (20, 20)), tmp_path / "s.png")
    assert decode_gray(path, max_pixels=400).shape == (20, 20)
    err = _expect_error_kw(path, max_pixels=399)
    assert "400 pixels > max_pixels=399" in err.reason


@pytest.mark.parametrize(
    ("width", "height", "max_pixels"), [(100_000, 100_000, DEFAULT_MAX_PIXELS), (20_000, 5_000, 1_000_000)]
)
def test_crafted_bomb_header_is_refused_fast(tmp_path, width, height, max_pixels):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_with_header(width, height))
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        err = _expect_error_kw(path, max_pixels=max_pixels)
        assert time.perf_counter() - start < 1.0
    assert "decompression bomb" in err.reason
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert limit == Image.MAX_IMAGE_PIXELS  # the global limit was not touched
    if max_pixels == DEFAULT_MAX_PIXELS:
        _expect_error(path.read_bytes(), "decompression bomb", "<bytes>")


def test_source_file_is_not_changed(tmp_path, noise):
    exif = Image.Exif()
    exif[0x0112] = 6
    for path in (
        save(Image.fromarray(noise), tmp_path / "a.png"),
        save(Image.fromarray(noise), tmp_path / "a.jpg", exif=exif),
    ):
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
        before = (path.read_bytes(), path.stat().st_mtime_ns)
        decode_gray(path)
        assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg", "a.png"]


def test_error_pickles_and_names_file():
    err = pickle.loads(pickle.dumps(ImageDecodeError("x.png", "empty file (0 bytes)")))
    assert (err.path, err.reason) == ("x.png", "empty file (0 bytes)")
    assert str(err) == "x.png: empty file (0 bytes)"


# --- resizing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["squash", "pad"])
@pytest.mark.parametrize("shape", [(10, 40), (40, 10), (7, 7), (1, 300)])
def test_resize_shapes(mode, shape):
    out = resize_gray(np.full(shape, 90, np.uint8), 16, mode)
    assert_gray(out, (16, 16))
    assert (out == 90).all()


def test_squash_antialiases_on_downscale():
    checker = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)
    out = resize_gray(checker, 8)
    assert np.abs(out.astype(int) - 128).max() <= 2


@pytest.mark.parametrize("size", [40, 20])
def test_pad_keeps_aspect_and_centres(size):
    arr = np.full((10, 40), 255, np.uint8)  # white block on a dark frame: the edge median is 20
    arr[0, :] = arr[-1, :] = arr[:, 0] = arr[:, -1] = 20
    out = resize_gray(arr, size, "pad")
    new_h = 10 * size // 40
    top = (size - new_h) // 2
    assert (out[:top] == 20).all() and (out[top + new_h :] == 20).all()
    white_rows = np.flatnonzero(out.max(axis=1) > 200)
    assert abs(white_rows.mean() - (size - 1) / 2) <= 0.5  # centred vertically
    white_cols = np.flatnonzero(out.max(axis=0) > 200)
    assert white_cols.min() <= 2 and white_cols.max() >= size - 3  # long side fills the width
    np.testing.assert_array_equal(resize_gray(arr.T.copy(), size, "pad"), out.T)


def test_resize_rejects_bad_arguments():
    img = np.zeros((4, 4), np.uint8)
    with pytest.raises(ValueError, match="'squash', 'pad'"):
        resize_gray(img, 8, "crop")
    for size in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="size"):
            resize_gray(img, size)
    for bad in (img.astype(np.uint16), np.zeros((4, 4, 3), np.uint8), np.zeros((0, 4), np.uint8)):
        with pytest.raises(ValueError, match="2-D uint8"):
            resize_gray(bad, 8)


def test_load_gray(tmp_path, noise):
    path = save(Image.fromarray(noise), tmp_path / "a.png")
    assert_gray(load_gray(path, 32), (32, 32))
    assert_gray(load_gray(path, 32, "pad"), (32, 32))
    np.testing.assert_array_equal(load_gray(path, 32), resize_gray(noise, 32))
    # An unknown mode fails before decoding: a plain ValueError, not a complaint about the missing file.
    with pytest.raises(ValueError, match="unknown resize mode") as info:
        load_gray(tmp_path / "missing.png", 32, "crop")
    assert not isinstance(info.value, ImageDecodeError)


# --- module hygiene ---------------------------------------------------------------------------------------


def test_image_extensions():
    expected = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".pgm", ".ppm", ".pnm"}
    assert isinstance(IMAGE_EXTENSIONS, frozenset)
    assert expected <= IMAGE_EXTENSIONS
    assert all(e == e.lower() and e.startswith(".") for e in IMAGE_EXTENSIONS)


def test_every_extension_decodes(tmp_path, noise):
    for ext in sorted(IMAGE_EXTENSIONS - WAFER_EXTENSIONS):  # wafer maps: tests/test_wafer.py
        path = save(Image.fromarray(noise), tmp_path / f"a{ext}")
        out = decode_gray(path)
        assert out.shape == noise.shape, ext


def test_import_does_not_need_torch():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    code = "import sys; sys.modules['torch'] = None; import defectscope.data.images"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
