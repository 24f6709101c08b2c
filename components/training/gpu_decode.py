"""Training augmentation shared by both data paths, and the `--decode gpu` path's batched decode.

Why: a CPU core decodes and augments only a few hundred 224 px JPEGs a second, so feeding a GPU at
3,000 images/s from Pillow needs ~10 cores doing nothing else. With `--decode gpu` the loader
workers only read file bytes (and a header peek); the training process decodes the whole batch with
torchvision's batched `decode_jpeg(device="cuda")` and augments it there: random resized crop, flip,
normalise, channels_last, bf16.

Both paths draw the augmentation of a photo from the same place: `crop_flip_for(seed, epoch,
index, height, width)`, a `random.Random` keyed by (seed, epoch, photo index). So the same seed
gives the same crop box and flip in either path, with any number of loader workers, on any rank,
and again after a resume. The crop box follows torchvision's `RandomResizedCrop.get_params`
(scale 0.08–1, aspect ratio 3/4–4/3, ten tries, then the centre crop); both paths then crop, resize
with antialiased bilinear interpolation in float32 (`crop_flip_resize`) and normalise, so their
outputs differ only where the JPEG decoders do.

Photos the GPU decoder cannot take fall back to Pillow (the CPU path's decoder) one by one: in the
worker when the header says the photo is not a baseline-friendly JPEG (another format, CMYK, an
EXIF rotation), in the training process when nvJPEG refuses the bytes. `DecodeStats` counts them;
each is logged once.

Without CUDA, `--decode gpu` runs this same bytes path with torchvision's CPU `decode_jpeg` in the
training process: slow, but it is how the path is tested on a CPU.
"""

from __future__ import annotations

import io
import math
import random
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..data.images import ImageDecodeError, decode_image
from ..errors import StepError
from .recipe import augment_crop

SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop defaults
RATIO = (3 / 4, 4 / 3)
DECODE_MODES = ("cpu", "gpu", "auto")
JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class CropFlip:
    top: int
    left: int
    height: int
    width: int
    flip: bool


def crop_flip_for(seed: int, epoch: int, index: int, height: int, width: int) -> CropFlip:
    """The augmentation of photo `index` in `epoch`: the one place both data paths draw it from."""
    return sample_crop_flip(random.Random(f"{seed}/{epoch}/{index}"), height, width)


def sample_crop_flip(rng: random.Random, height: int, width: int) -> CropFlip:
    """torchvision's RandomResizedCrop box (same algorithm and defaults), plus a horizontal flip."""
    area = height * width
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            return CropFlip(top, left, h, w, rng.random() < 0.5)
    ratio = width / height  # ten misses: the whole photo, cut to the widest allowed aspect ratio
    if ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif ratio > RATIO[1]:
        w, h = int(round(height * RATIO[1])), height
    else:
        w, h = width, height
    return CropFlip((height - h) // 2, (width - w) // 2, h, w, rng.random() < 0.5)


def crop_flip_resize(image: torch.Tensor, box: CropFlip, size: int) -> torch.Tensor:
    """uint8 CHW → float32 CHW size×size in 0–255: crop, antialiased bilinear resize, flip."""
    patch = image[:, box.top : box.top + box.height, box.left : box.left + box.width]
    out = F.interpolate(
        patch[None].float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )[0]
    return out.flip(-1) if box.flip else out


def pillow_tensor(data: bytes) -> torch.Tensor:
    """Decode with the CPU path's decoder (Pillow via `decode_image`): uint8 CHW RGB."""
    image = decode_image(data).image
    return (
        torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        .view(image.height, image.width, 3)
        .permute(2, 0, 1)
        .contiguous()
    )


def gpu_decodable(data: bytes) -> str | None:
    """None when nvJPEG should take these bytes, else why not (from the header only: no decode)."""
    if not data.startswith(JPEG_MAGIC):
        return "not a JPEG"
    from PIL import ExifTags, Image

    try:
        with Image.open(io.BytesIO(data)) as image:  # lazy: reads the header
            if image.mode not in ("RGB", "L"):
                return f"JPEG in {image.mode} mode"
            if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
                return "EXIF rotation"
    except Exception:  # noqa: BLE001 - any header Pillow cannot read: let Pillow say why, on the CPU
        return "unreadable JPEG header"
    return None


def resolve_decode(mode: str, device: torch.device) -> str:
    """`auto` is `gpu` on CUDA and `cpu` otherwise; anything else is a clear error."""
    if mode not in DECODE_MODES:
        raise StepError(f"--decode {mode!r}: choose from {', '.join(DECODE_MODES)}")
    if mode == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    return mode


@dataclass
class DecodeStats:
    """How many photos each decoder took this epoch; fallbacks are logged once per photo."""

    on_device: int = 0
    fallback: int = 0
    logged: set = field(default_factory=set)

    def new_epoch(self) -> None:
        self.on_device = self.fallback = 0

    def fell_back(self, path, reason: str) -> None:
        self.fallback += 1
        if path not in self.logged:
            self.logged.add(path)
            print(
                f"train: {path}: {reason}; decoded on the CPU (Pillow) instead", file=sys.stderr, flush=True
            )


def collate_bytes(items: list) -> tuple:
    """Batches of bytes-path items stay lists: the photos differ in size until they are cropped."""
    payloads, fallbacks, indices, epochs, labels = zip(*items, strict=True)
    return list(payloads), list(fallbacks), list(indices), epochs[0], torch.tensor(labels)


class BytesBatchPreparer:
    """A `collate_bytes` batch → (images, targets) on the device, ready for the model.

    A payload is the file's bytes, or, where `fallbacks` names a reason, the photo the worker
    already decoded with Pillow (uint8 CHW).
    """

    def __init__(self, dataset, spec, seed: int, device: torch.device, dtype, channels_last: bool) -> None:
        self.dataset, self.spec, self.seed, self.device = dataset, spec, seed, device
        self.aug = dataset.aug
        self.dtype, self.channels_last = dtype, channels_last
        self.mean = torch.tensor(spec.mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(spec.std, dtype=torch.float32, device=device)
        self.stats = DecodeStats()

    def __call__(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        payloads, fallbacks, indices, epoch, targets = batch
        decoded = self.decode(payloads, fallbacks, indices)
        size = self.aug.size_for(epoch)
        images = torch.stack(
            [
                augment_crop(
                    crop_flip_resize(image, crop_flip_for(self.seed, epoch, index, *image.shape[1:]), size),
                    self.aug,
                    self.seed,
                    epoch,
                    index,
                    self.mean,
                    self.std,
                )
                for image, index in zip(decoded, indices, strict=True)
            ]
        ).to(self.dtype)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets.to(self.device, non_blocking=True)

    def decode(self, payloads, fallbacks, indices) -> list[torch.Tensor]:
        """uint8 CHW RGB photos on the device: the JPEGs in one batched call, the rest as the workers
        decoded them; a JPEG the batched decoder refuses goes to Pillow on its own."""
        from torchvision.io import ImageReadMode, decode_jpeg

        out: list[torch.Tensor | None] = [None] * len(payloads)
        jpegs = [i for i, reason in enumerate(fallbacks) if reason is None]
        for i, reason in enumerate(fallbacks):
            if reason is not None:
                self.stats.fell_back(self._path(indices[i]), reason)
                out[i] = payloads[i].to(self.device, non_blocking=True)
        if jpegs:
            data = [payloads[i] for i in jpegs]  # the decoder reads host bytes, also for device="cuda"
            try:
                images = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:  # one bad photo fails the batched call: find it photo by photo
                images = [self._decode_one(decode_jpeg, ImageReadMode.RGB, d) for d in data]
            for i, image in zip(jpegs, images, strict=True):
                if image is None:
                    path = self._path(indices[i])
                    self.stats.fell_back(path, "the JPEG decoder refused it")
                    image = self._pillow(path, payloads[i]).to(self.device, non_blocking=True)
                else:
                    self.stats.on_device += 1
                out[i] = image
        return out

    def _decode_one(self, decode_jpeg, mode, data):
        try:
            return decode_jpeg(data, mode=mode, device=self.device)
        except RuntimeError:
            return None

    def _path(self, index: int):
        return self.dataset.samples[index][0]

    @staticmethod
    def _pillow(path, payload: torch.Tensor) -> torch.Tensor:
        try:
            return pillow_tensor(payload.numpy().tobytes())
        except ImageDecodeError as exc:
            raise StepError(f"cannot read training photo {path}: {exc}") from None
