"""Safe image decoding, normalisation to RGB, shrinking and perceptual hashing.

Every step that opens a photo someone uploaded goes through `decode_image`, so the rules for
hostile files (decompression bombs, truncation, files that only pretend to be images) live in
one place and give the same verdicts in cleaning, training, evaluation and serving.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

# Truncated files must fail loudly instead of being padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_PIXELS = 64_000_000
JPEG_QUALITY = 90


class ImageDecodeError(ValueError):
    """A file that cannot become an RGB photo; `reason` is a short machine-readable verdict."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB
    source_format: str
    source_size: tuple[int, int]  # width, height as stored (before EXIF rotation)


def decode_image(
    data: bytes | io.BufferedIOBase,
    *,
    fit: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DecodedImage:
    """Fully decode `data` into an upright RGB image, or raise ImageDecodeError.

    `fit` lets JPEG decoding use DCT scaling (draft mode) when the result will be shrunk to fit
    a fit×fit box anyway: that is most of the speed of the clean step.

    `max_pixels` applies to this call only: the size is read from the header (a lazy open) and
    compared before anything is decoded. Pillow's process-wide `Image.MAX_IMAGE_PIXELS` and the
    warning filters are never touched, so decodes with different limits can run in parallel threads
    (the server's decoding pool next to a clean step in the same process) without seeing each
    other's limit. Pillow still applies its own default limit at open; a photo over it is refused
    here as `too_many_pixels` as well.
    """
    stream = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    try:
        return _decode(stream, fit, max_pixels)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Only over Pillow's own limit (or with warnings turned into errors): refused either way.
        raise ImageDecodeError(
            "too_many_pixels", f"exceeds the decoder's own limit of {_pillow_limit()}"
        ) from None
    except UnidentifiedImageError:
        if _has_image_signature(stream):
            raise ImageDecodeError("corrupt_image", "starts like an image but cannot be parsed") from None
        raise ImageDecodeError("not_an_image", "content is not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
        raise ImageDecodeError("corrupt_image", f"{type(exc).__name__}: {exc}") from None


def _pillow_limit() -> str:
    limit = Image.MAX_IMAGE_PIXELS
    return "none" if limit is None else f"{limit} pixels"


_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def _has_image_signature(stream: io.BufferedIOBase) -> bool:
    stream.seek(0)
    head = stream.read(16)
    return head.startswith(_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _decode(stream: io.BufferedIOBase, fit: int | None, max_pixels: int) -> DecodedImage:
    image = Image.open(stream)  # lazy: reads the header only
    source_format = image.format or "unknown"
    source_size = image.size
    if image.width * image.height > max_pixels:
        # Refuse before load() allocates anything (some plugins would only check then).
        raise ImageDecodeError("too_many_pixels", f"{image.width}x{image.height} exceeds {max_pixels} pixels")
    if fit and source_format == "JPEG":
        image.draft("RGB", (fit, fit))
    image.load()  # full decode: truncated and corrupt files fail here, not later
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # exif_transpose copies even when upright
        image = ImageOps.exif_transpose(image)
    return DecodedImage(to_rgb(image), source_format, source_size)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited over white, 16-bit is scaled."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.int64)
        # 16-bit modes always scale (a dark 16-bit photo stays dark); the generic 32-bit "I" mode only
        # scales when it holds values beyond 8 bits, and anything wider than 16 bits is clipped.
        wide = mode != "I" or array.max(initial=0) > 255
        array = np.clip(array, 0, 65535) >> 8 if wide else np.clip(array, 0, 255)
        return Image.fromarray(array.astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        array = np.nan_to_num(np.asarray(image, dtype=np.float64))
        low, high = float(array.min(initial=0.0)), float(array.max(initial=0.0))
        scaled = (array - low) / (high - low) * 255 if high > low else np.zeros_like(array)
        return Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")
    if mode == "P" or "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def shrink_to_fit(image: Image.Image, size: int) -> Image.Image:
    """Fit inside size×size keeping the aspect ratio; never enlarge.

    One bicubic resize (Pillow's own thumbnail filter) with reducing_gap, which shrinks big photos
    by cheap integer box reduction first; no intermediate copy.
    """
    width, height = image.size
    if width <= size and height <= size:
        return image
    scale = size / max(width, height)
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)


def encode_jpeg(image: Image.Image) -> bytes:
    """Deterministic JPEG bytes (no timestamps, fixed settings), so re-runs are byte-identical."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False)
    return buffer.getvalue()


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    matrix = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2 / n)
    matrix[0] /= np.sqrt(2)
    return matrix


_DCT32 = _dct_matrix(32)


def _grey(image: Image.Image) -> Image.Image:
    return image if image.mode == "L" else image.convert("L")


def perceptual_hash(image: Image.Image) -> int:
    """64-bit pHash: low DCT frequencies of a 32×32 grey thumbnail against their median.

    It survives re-encoding and resizing, which is what makes two listings the same photo.
    """
    grey = np.asarray(_grey(image).resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float64)
    coefficients = (_DCT32 @ grey @ _DCT32.T)[:8, :8].flatten()
    bits = coefficients > np.median(coefficients[1:])
    return int(sum(1 << i for i, bit in enumerate(bits) if bit))


def thumbnail_signature(image: Image.Image) -> bytes:
    """16×16 grey pixels: a second opinion that confirms a pHash match is the same picture."""
    return _grey(image).resize((16, 16), Image.Resampling.BILINEAR).tobytes()


def signature_distance(a: bytes, b: bytes) -> float:
    """Mean absolute grey difference (0–255) between two thumbnail signatures."""
    return float(np.mean(np.abs(np.frombuffer(a, np.uint8).astype(np.int16) - np.frombuffer(b, np.uint8))))
