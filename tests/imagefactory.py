"""Make real image files for tests: every helper writes bytes that Pillow (or a browser) could open.

Distinct pictures come from distinct product photos of the sample data set
(data/sample/raw/<category>/*.jpg, 348×348 or 348×464 real photos), or from textured synthetic
patterns. Plain solid colours are avoided for distinct files: they share a perceptual hash.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLE_RAW = Path(__file__).resolve().parents[1] / "data" / "sample" / "raw"


@cache
def sample_photos() -> tuple[Path, ...]:
    """Every sample photo, in a stable order that alternates categories (photo i and i+1 differ in kind)."""
    by_category = [sorted(d.glob("*.jpg")) for d in sorted(SAMPLE_RAW.iterdir()) if d.is_dir()]
    order: list[Path] = []
    for rank in range(max(len(files) for files in by_category)):
        order.extend(files[rank] for files in by_category if rank < len(files))
    return tuple(order)


@cache
def _sample_rgb(index: int) -> Image.Image:
    with Image.open(sample_photos()[index]) as image:
        return image.convert("RGB")


def photo(index: int, size: tuple[int, int] | None = None) -> Image.Image:
    """Sample photo number `index` (all distinct pictures), centre-cropped to the aspect of `size` and resized."""
    image = _sample_rgb(index % len(sample_photos())).copy()
    if size is None:
        return image
    width, height = size
    scale = min(image.width / width, image.height / height)
    crop_w, crop_h = round(width * scale), round(height * scale)
    left, top = (image.width - crop_w) // 2, (image.height - crop_h) // 2
    return image.crop((left, top, left + crop_w, top + crop_h)).resize(size, Image.Resampling.LANCZOS)


def pattern(seed: int, size: tuple[int, int] = (128, 96)) -> Image.Image:
    """A textured synthetic picture: smooth random blobs plus seed-dependent stripes (distinct per seed)."""
    rng = np.random.default_rng(seed)
    width, height = size
    coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse, "RGB").resize(size, Image.Resampling.BICUBIC), dtype=np.float64)
    y, x = np.mgrid[0:height, 0:width]
    angle = rng.uniform(0, np.pi)
    frequency = rng.uniform(0.05, 0.25)
    stripes = 60 * np.sin((x * np.cos(angle) + y * np.sin(angle)) * frequency)
    array = np.clip(base + stripes[..., None], 0, 255).astype(np.uint8)
    return Image.fromarray(array, "RGB")


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def write(path: Path, data: bytes | Image.Image, fmt: str | None = None, **options) -> Path:
    """Write bytes, or an image encoded as `fmt` (whatever the file's extension says)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, Image.Image):
        data = encode(data, fmt or "PNG", **options)
    path.write_bytes(data)
    return path


def jpeg_with_orientation(image: Image.Image, orientation: int) -> bytes:
    """JPEG whose pixels are stored as given, with an EXIF Orientation tag telling viewers to rotate."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif)


def rgba_half_transparent(index: int, size: tuple[int, int] = (96, 64)) -> Image.Image:
    """RGBA photo whose left half is fully transparent over black RGB (black shows if alpha is ignored)."""
    rgba = photo(index, size).convert("RGBA")
    array = np.array(rgba)
    array[:, : size[0] // 2] = (0, 0, 0, 0)
    return Image.fromarray(array, "RGBA")


def palette_with_transparency(index: int, size: tuple[int, int] = (96, 64)) -> Image.Image:
    """P-mode photo whose left half uses a palette entry marked transparent (that entry is black)."""
    quantized = photo(index, size).quantize(colors=200)
    palette = quantized.getpalette()[: 200 * 3] + [0, 0, 0] * 56
    array = np.array(quantized)
    array[:, : size[0] // 2] = 255
    image = Image.fromarray(array, "P")
    image.putpalette(palette)
    image.info["transparency"] = 255
    return image


def la_half_transparent(index: int, size: tuple[int, int] = (96, 64)) -> Image.Image:
    grey = np.array(photo(index, size).convert("L"))
    alpha = np.full_like(grey, 255)
    alpha[:, : size[0] // 2] = 0
    grey[:, : size[0] // 2] = 0
    return Image.fromarray(np.dstack([grey, alpha]), "LA")


def grey16(low: int, high: int, size: tuple[int, int] = (96, 64)) -> Image.Image:
    """16-bit grey (mode I;16): left half `low`, right half `high`, with a ramp band in the middle."""
    width, height = size
    array = np.full((height, width), low, dtype=np.uint16)
    array[:, width // 2 :] = high
    band = slice(height // 3, 2 * height // 3)
    array[band, :] = np.linspace(low, high, width).astype(np.uint16)
    image = Image.fromarray(array)
    assert image.mode == "I;16", image.mode
    return image


def animated_gif(size: tuple[int, int] = (96, 64)) -> bytes:
    """Two-frame GIF: frame 0 is red with white stripes, frame 1 is blue with the same stripes."""
    width, height = size
    stripes = (np.arange(width)[None, :] // 6 % 2).repeat(height, 0).astype(np.uint8)
    palette = [255, 0, 0, 255, 255, 255, 0, 0, 255] + [0, 0, 0] * 253
    frames = []
    for background in (0, 2):  # palette index 0 = red, 2 = blue, 1 = white
        frame = Image.fromarray(np.where(stripes == 1, 1, background).astype(np.uint8), "P")
        frame.putpalette(palette)
        frames.append(frame)
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of width×height, all black, streamed so that nothing large is allocated.

    12000×12000 (144 megapixels) compresses to about 20 kB.
    """

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")
    )


def corrupt_scan_jpeg(image: Image.Image, seed: int = 0) -> bytes:
    """A JPEG whose headers are intact but whose compressed scan data is replaced by random bytes."""
    data = encode(image, "JPEG", quality=90)
    start = data.find(b"\xff\xda")
    header_end = start + 2 + int.from_bytes(data[start + 2 : start + 4], "big")
    return data[:header_end] + np.random.default_rng(seed).bytes(len(data) - header_end)


def jfif_header_then_garbage(seed: int, length: int = 4000) -> bytes:
    """SOI + a well-formed JFIF APP0 segment, then random bytes: claims to be a JPEG, is not one."""
    app0 = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    return b"\xff\xd8" + app0 + np.random.default_rng(seed).bytes(length)


_UNBLOCKER = """
import os, sys, time
while True:
    try:
        os.close(os.open(sys.argv[1], os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader is waiting (ENXIO), or the FIFO is gone
        pass
    time.sleep(0.05)
"""


@contextmanager
def fifo_unblocker(fifo: Path) -> Iterator[None]:
    """While active, anything blocked opening `fifo` for reading is released (it reads end-of-file).

    A test that wrongly opens a FIFO then fails on its verdict instead of hanging forever. The helper
    is a separate process, not a thread, so that the clean step may fork its workers safely.
    """
    helper = subprocess.Popen([sys.executable, "-c", _UNBLOCKER, str(fifo)])
    try:
        yield
    finally:
        helper.kill()
        helper.wait()


def split_tree(root: Path, sample_raw: Path, categories: int = 3, per_category: int = 4) -> Path:
    """ROOT/{train,val}/<category>/ with the same first photos of the first sample categories in both:
    a training folder layout small enough for a few steps."""
    import shutil

    for category in sorted(p for p in sample_raw.iterdir() if p.is_dir())[:categories]:
        for split in ("train", "val"):
            (root / split / category.name).mkdir(parents=True)
            for photo in sorted(category.glob("*.jpg"))[:per_category]:
                shutil.copy(photo, root / split / category.name / photo.name)
    return root
