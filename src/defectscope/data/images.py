"""Decode any inspection image (file, encoded bytes, PIL image or numpy array) to one 8-bit grey channel.

Only numpy and Pillow are imported here, never torch: the deployed predictor reuses this module on
machines without PyTorch.

Wafer maps (``.npy``/``.npz`` die grids, SEMI G85 ``.xml``, KLARF 1.2; see :mod:`defectscope.data.wafer`) decode to
their die states rendered as 0/128/255 and are always resized with nearest-neighbour.

Every file that cannot be used raises :class:`ImageDecodeError` (a ``ValueError``) naming the file and the
reason; no bare Pillow or ``OSError`` escapes. Files are opened read-only and never written.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from defectscope.data.wafer import WAFER_EXTENSIONS, WaferMapError, is_wafer_file, read_die_grid, render_die_states
from defectscope.errors import DefectscopeError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "INPUT_KINDS",
    "RESIZE_MODES",
    "ImageDecodeError",
    "decode_gray",
    "load_gray",
    "resize_gray",
]

DEFAULT_MAX_PIXELS = 200_000_000

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".pgm", ".ppm", ".pnm"}
) | WAFER_EXTENSIONS

# "image": arrays are pixel values. "wafer_map": arrays are die states 0/1/2, and everything is resized with
# nearest-neighbour; an exported wafer model says so in its spec (``input_kind``) so the predictor does the same.
INPUT_KINDS = ("image", "wafer_map")

# Pillow formats we let Image.open try (PPM covers .pgm/.ppm/.pnm; JPEG also opens MPO). Restricting them
# keeps odd plugins off untrusted input, e.g. EPS, which runs Ghostscript when decoded.
_PIL_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "DIB", "GIF", "WEBP", "PPM")

RESIZE_MODES = ("squash", "pad", "nearest")


class ImageDecodeError(DefectscopeError, ValueError):
    """A file that cannot be used as an image.

    ``path`` is the file name, or ``"<bytes>"``, ``"<array>"``, ``"<PIL image>"`` for in-memory sources;
    ``reason`` says what is wrong without repeating the path. ``str()`` gives ``"<path>: <reason>"``.
    """

    def __init__(self, path: str, reason: str) -> None:
        # Both values go to args so the exception pickles (worker processes send errors back that way).
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def decode_gray(source: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Return a new, writable 2-D uint8 array ``(H, W)``: one grey channel whatever came in.

    ``source`` is a path (``str`` / ``os.PathLike``), encoded file content (``bytes`` / ``bytearray``), a
    ``PIL.Image.Image`` or a numpy array. Other types raise ``TypeError``.

    Wafer-map files (``.npy``, ``.npz``, G85 ``.xml``, KLARF ``.klarf``/``.klf``/``.kla``) give their die
    states as 0/128/255, one pixel per die.

    Files and bytes: only the first frame of multi-frame files (multi-page TIFF, GIF) is used; EXIF
    orientation is applied; images with more than ``max_pixels`` pixels are refused from the header,
    before any pixel data is decoded. Pillow's own hard limit (``2 * Image.MAX_IMAGE_PIXELS``, about 179
    million pixels by default) still applies on top of ``max_pixels``; raise ``Image.MAX_IMAGE_PIXELS`` in
    the application to go beyond it. Pillow's lower ``DecompressionBombWarning`` threshold is superseded by
    ``max_pixels``. Corruption inside JPEG data is not detectable: libjpeg decodes it without an error.

    How modes become grey:

    * ``L`` as is; ``1`` -> 0/255.
    * colour (``RGB``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``) -> ITU-R 601 luma
      (``L = R*299/1000 + G*587/1000 + B*114/1000``, Pillow's ``convert("L")``).
    * alpha (``RGBA``, ``LA``, ``PA``, palettes with transparency) is dropped: the colour channels are used,
      not a composite over some background, so the pixels under a transparent area still count.
    * 16-bit (``I;16*``, and ``I`` with values in 0..65535) -> ``round(value / 257)`` (0 -> 0, 65535 -> 255).
      A fixed scale keeps absolute intensity comparable between images, which a per-image stretch would
      not: a dim defect-free image must not come out as bright as a bright one.
    * ``I`` with values outside 0..65535 and float ``F`` have no natural full scale, so they are stretched
      per image: min -> 0, max -> 255 (a constant image -> all 0).

    Arrays: ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA (alpha dropped). Values:
    bool -> 0/255; uint8 as is; uint16 and other integers within 0..65535 -> ``/ 257`` like 16-bit files
    (so ``np.array(pil_image)`` decodes like the image itself; cast 8-bit data held in wider integers to
    uint8 first); other integers -> per-image stretch; float within [0, 1] -> ``* 255`` else per-image
    stretch. Colour arrays are scaled to 8 bit first (jointly over R, G, B), then converted to luma.
    NaN/inf and zero-size images raise :class:`ImageDecodeError`.
    """
    if isinstance(source, np.ndarray):
        return _array_to_gray(source, "<array>")
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", "") or "<PIL image>"
        return _pil_to_gray(source, str(name), max_pixels)
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageDecodeError("<bytes>", "empty file (0 bytes)")
        return _decode_stream(io.BytesIO(source), "<bytes>", max_pixels)
    if isinstance(source, (str, os.PathLike)):
        return _decode_file(source, max_pixels)
    raise TypeError(
        "decode_gray expects a path, bytes, a PIL image or a numpy array, not " + type(source).__name__
    )


def resize_gray(image: np.ndarray, size: int, mode: str = "squash") -> np.ndarray:
    """Resize a 2-D uint8 image to a new uint8 ``(size, size)`` array.

    ``"squash"``: plain resize to the square, aspect ratio not kept. ``"pad"``: the long side is resized to
    ``size`` keeping the aspect ratio, then the image is centred on a square filled with the median of its
    edge pixels, so the padding continues the background instead of adding a new edge. Both use Pillow's
    BILINEAR filter, which antialiases when downscaling. ``"nearest"``: squash with nearest-neighbour, for
    images whose pixels are categories (wafer maps). Unknown modes raise ``ValueError``.
    """
    return _resize(image, size, mode, nearest=mode == "nearest")


def _resize(image: np.ndarray, size: int, mode: str, *, nearest: bool) -> np.ndarray:
    _check_resize_mode(mode)
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 2 or image.size == 0:
        got = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image)
        raise ValueError(f"resize_gray expects a non-empty 2-D uint8 array (see decode_gray), got {got}")
    _check_size(size)
    size = int(size)
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    pil = Image.fromarray(np.ascontiguousarray(image))
    if mode != "pad":
        return np.array(pil.resize((size, size), resample))

    h, w = image.shape
    scale = size / max(h, w)
    new_w, new_h = min(size, max(1, round(w * scale))), min(size, max(1, round(h * scale)))
    resized = np.array(pil.resize((new_w, new_h), resample))
    edges = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    out = np.full((size, size), int(np.rint(np.median(edges))), dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return out


def load_gray(
    source: Any, size: int, mode: str = "squash", *, max_pixels: int = DEFAULT_MAX_PIXELS,
    input_kind: str = "image",
) -> np.ndarray:
    """:func:`decode_gray` then :func:`resize_gray`: a uint8 ``(size, size)`` array.

    Wafer maps (a wafer-map file, or anything with ``input_kind="wafer_map"``, where arrays are die states
    0/1/2) are resized with nearest-neighbour whatever ``mode`` says (``"pad"`` still keeps the aspect ratio),
    so no die blurs into its neighbour.
    """
    _check_resize_mode(mode)  # before decoding, so a typo fails fast rather than after a large decode
    if input_kind not in INPUT_KINDS:
        raise ValueError(f"unknown input_kind {input_kind!r}; valid: {', '.join(INPUT_KINDS)}")
    wafer = input_kind == "wafer_map"
    if wafer and isinstance(source, np.ndarray):
        try:
            gray = render_die_states(source)
        except WaferMapError as exc:
            raise ImageDecodeError("<array>", str(exc)) from None
    else:
        wafer = wafer or (isinstance(source, (str, os.PathLike)) and is_wafer_file(source))
        gray = decode_gray(source, max_pixels=max_pixels)
    _check_size(size)
    if wafer:
        return _resize(gray, int(size), "pad" if mode == "pad" else "squash", nearest=True)
    return resize_gray(gray, size, mode)


def _check_size(size: Any) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")


def _check_resize_mode(mode: str) -> None:
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; valid modes: {', '.join(map(repr, RESIZE_MODES))}")


def _decode_file(path: str | os.PathLike, max_pixels: int) -> np.ndarray:
    name = os.fsdecode(path)
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise ImageDecodeError(name, "missing (no such file)") from None
    except OSError as exc:
        raise ImageDecodeError(name, f"cannot read: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(st.st_mode):
        raise ImageDecodeError(name, "not a file (it is a directory)")
    if not stat.S_ISREG(st.st_mode):
        # FIFOs and devices could block or never end.
        raise ImageDecodeError(name, "not a regular file")
    if st.st_size == 0:
        raise ImageDecodeError(name, "empty file (0 bytes)")
    if is_wafer_file(name):
        try:
            return render_die_states(read_die_grid(path, max_pixels=max_pixels))
        except WaferMapError as exc:
            raise ImageDecodeError(name, str(exc)) from None
        except OSError as exc:
            raise ImageDecodeError(name, f"cannot read: {exc.strerror or exc}") from exc
    try:
        with open(path, "rb") as fh:
            return _decode_stream(fh, name, max_pixels)
    except OSError as exc:  # only open() can raise it: decoding errors are ImageDecodeError by now
        raise ImageDecodeError(name, f"cannot read: {exc.strerror or exc}") from exc


def _decode_stream(fp: io.BufferedIOBase, name: str, max_pixels: int) -> np.ndarray:
    try:
        # Image.open reads only the header. Its DecompressionBombWarning is superseded by our max_pixels
        # check, so it is silenced locally. catch_warnings is not thread-safe (load_images decodes in
        # threads), but a race can only leave this same ignore-filter installed, which is harmless.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fp, formats=_PIL_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(name, f"too large, possible decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(name, "not an image (unrecognised or unsupported format)") from exc
    except MemoryError:
        raise
    except Exception as exc:  # Pillow raises many types for a broken header (OSError, SyntaxError, ...)
        raise ImageDecodeError(name, f"unreadable image header ({exc})") from exc
    with im:
        # Image.open leaves multi-frame files (multi-page TIFF, GIF) on their first frame.
        return _pil_to_gray(im, name, max_pixels)


def _pil_to_gray(im: Image.Image, name: str, max_pixels: int) -> np.ndarray:
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageDecodeError(name, f"zero-size image ({w}x{h})")
    if w * h > max_pixels:
        reason = f"too large: {w}x{h} = {w * h} pixels > max_pixels={max_pixels}"
        raise ImageDecodeError(name, reason + " (possible decompression bomb)")
    try:
        # load() forces the full decode, so truncated or corrupt data fails here, not later in the model.
        im.load()
        im = ImageOps.exif_transpose(im)  # returns an in-memory copy; the caller's image is not changed
    except MemoryError:
        raise
    except Exception as exc:  # OSError "image file is truncated", SyntaxError "broken PNG file", ...
        raise ImageDecodeError(name, f"truncated or corrupt image data ({exc})") from exc

    mode = im.mode
    if mode == "L":
        return np.array(im)
    if mode == "F":
        return _stretch(_finite(np.array(im), name))
    if mode == "I" or mode.startswith("I;16"):
        return _int_to_uint8(np.array(im))
    if mode in ("1", "LA", "RGB", "RGBA"):
        return np.array(im.convert("L"))  # '1' -> 0/255; LA and RGBA -> L ignores alpha
    try:
        # Palettes go through RGBA so those with transparency convert cleanly; RGBA -> L then drops alpha.
        return np.array(im.convert("RGBA" if mode in ("P", "PA") else "RGB").convert("L"))
    except ValueError as exc:
        raise ImageDecodeError(name, f"unsupported image mode {mode!r}") from exc


def _array_to_gray(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    elif arr.ndim == 3 and arr.shape[2] in (3, 4):
        arr = arr[:, :, :3]  # alpha dropped, as for files
    elif arr.ndim != 2:
        raise ImageDecodeError(
            name, f"unsupported array shape {arr.shape}; expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"
        )
    if arr.size == 0:
        raise ImageDecodeError(name, f"zero-size image (shape {arr.shape})")
    kind = arr.dtype.kind
    if kind == "b":
        gray = np.where(arr, 255, 0).astype(np.uint8)
    elif kind == "u" and arr.dtype.itemsize == 1:
        gray = arr.astype(np.uint8)  # a copy: the result never aliases the caller's array
    elif kind in "iu":
        gray = _int_to_uint8(arr)
    elif kind == "f":
        arr = _finite(arr, name)
        if arr.min() >= 0 and arr.max() <= 1:
            gray = np.rint(arr.astype(np.float64) * 255).astype(np.uint8)
        else:
            gray = _stretch(arr)
    else:
        raise ImageDecodeError(name, f"unsupported array dtype {arr.dtype}")
    if gray.ndim == 3:
        return np.array(Image.fromarray(np.ascontiguousarray(gray)).convert("L"))
    return gray


def _int_to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.min() >= 0 and arr.max() <= 65535:
        # round(v / 257) in integers: 257 * k -> k exactly, 65535 -> 255, no float copy of a large image.
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    return _stretch(arr)


def _stretch(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(arr.min()), float(arr.max())
    if hi == lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    scaled = (arr.astype(np.float64) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _finite(arr: np.ndarray, name: str) -> np.ndarray:
    if not np.isfinite(arr).all():
        raise ImageDecodeError(name, "contains NaN or infinite values")
    return arr
