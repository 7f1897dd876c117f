"""Synthetic Drift for evaluating drift scores: corrupted in-distribution images and unrelated images.

Everything works on uint8 grayscale arrays (N, H, W) at the model's input size, with numpy and PIL only.
Corruptions model faulty acquisitions a line actually produces (a defocused or noisy camera, wrong
exposure, an occluded or misplaced part), each at one fixed, clearly visible severity, in the spirit of
ImageNet-C (Hendrycks & Dietterich 2019) severity ~3. Far drift is "something else entirely": wafer
maps and printed digits, which no inspection classifier was trained on.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

Corruption = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def defocus_blur(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # A Gaussian of radius ~4% of the frame: structures of a few pixels at 64 px wash out.
    radius = max(1.5, 0.04 * img.shape[0])
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius)), dtype=np.uint8)


def gaussian_noise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _u8(img.astype(np.float64) + rng.normal(0.0, 0.15 * 255, img.shape))


def contrast_loss(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = img.astype(np.float64)
    return _u8((x - x.mean()) * 0.3 + x.mean())


def overexposure(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _u8(img.astype(np.float64) * 2.0 + 40)


def underexposure(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _u8(img.astype(np.float64) * 0.3)


def occlusion(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A black square of half the frame's side (a quarter of its area) at a random place."""
    h, w = img.shape
    sh, sw = max(1, h // 2), max(1, w // 2)
    y, x = rng.integers(0, h - sh + 1), rng.integers(0, w - sw + 1)
    out = img.copy()
    out[y:y + sh, x:x + sw] = 0
    return out


def _border_fill(img: np.ndarray) -> int:
    # Fill uncovered corners with the frame's own border level, so the test is the misplaced content,
    # not an easy black wedge.
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    return int(np.median(border))


def rotated_frame(img: np.ndarray, rng: np.random.Generator, degrees: float = 15.0) -> np.ndarray:
    pil = Image.fromarray(img)
    return np.asarray(pil.rotate(degrees, resample=Image.BILINEAR, fillcolor=_border_fill(img)), dtype=np.uint8)


def shifted_frame(img: np.ndarray, rng: np.random.Generator, fraction: float = 0.2) -> np.ndarray:
    """Content moved by ``fraction`` of the frame down and right; the uncovered edge repeats the border."""
    h, w = img.shape
    dy, dx = round(fraction * h), round(fraction * w)
    padded = np.pad(img, ((dy, 0), (dx, 0)), mode="edge")
    return np.ascontiguousarray(padded[:h, :w])


CORRUPTIONS: dict[str, Corruption] = {
    "defocus_blur": defocus_blur,
    "gaussian_noise": gaussian_noise,
    "contrast_loss": contrast_loss,
    "overexposure": overexposure,
    "underexposure": underexposure,
    "occlusion": occlusion,
    "rotated_frame": rotated_frame,
    "shifted_frame": shifted_frame,
}


def corrupt(images: np.ndarray, name: str, *, seed: int = 0) -> np.ndarray:
    """``images`` (N, H, W) uint8 with corruption ``name`` applied to each; same shape and dtype."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; valid: {', '.join(CORRUPTIONS)}")
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
    rng = np.random.default_rng(seed)
    fn = CORRUPTIONS[name]
    out = np.empty_like(images)
    for i, img in enumerate(images):
        out[i] = fn(img, rng)
    return out


def wafer_maps(n: int, size: int, *, seed: int = 0) -> np.ndarray:
    """``n`` synthetic wafer maps (uint8 (n, size, size)): a disc of dies, each 0 (no die), 1 (pass) or
    2 (fail) rendered as gray 0 / 128 / 255 like WM-811K maps, with random grid size and fail pattern."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size), dtype=np.uint8)
    for i in range(n):
        g = int(rng.integers(16, 48))
        yy, xx = np.mgrid[:g, :g] + 0.5 - g / 2
        r = np.hypot(yy, xx)
        dies = np.where(r <= g / 2, 1, 0)
        fail = rng.random((g, g)) < rng.uniform(0.02, 0.3)
        if rng.random() < 0.5:  # an edge ring or a centre cluster, as in the WM-811K classes
            fail |= (r > g * 0.4) if rng.random() < 0.5 else (r < g * 0.15)
        dies[(dies == 1) & fail] = 2
        gray = np.array([0, 128, 255], dtype=np.uint8)[dies]
        out[i] = np.asarray(Image.fromarray(gray).resize((size, size), Image.NEAREST))
    return out


def digit_glyphs(n: int, size: int, *, seed: int = 0) -> np.ndarray:
    """``n`` images of one to three random digits in PIL's default font, dark on light or the reverse."""
    rng = np.random.default_rng(seed)
    font = ImageFont.load_default()
    out = np.empty((n, size, size), dtype=np.uint8)
    for i in range(n):
        bg, fg = (235, 20) if rng.random() < 0.5 else (20, 235)
        canvas = Image.new("L", (24, 24), bg)
        text = "".join(str(d) for d in rng.integers(0, 10, int(rng.integers(1, 4))))
        ImageDraw.Draw(canvas).text((int(rng.integers(0, 6)), int(rng.integers(0, 10))), text, fill=fg, font=font)
        out[i] = np.asarray(canvas.resize((size, size), Image.BILINEAR))
    return out


FAR_DRIFT: dict[str, Callable[..., np.ndarray]] = {"wafer_maps": wafer_maps, "digit_glyphs": digit_glyphs}
