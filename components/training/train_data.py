"""Photo folders as datasets and loaders for (distributed) training and validation.

Training has two data paths (`--decode`): `cpu`, where loader workers decode with Pillow and
augment, and `gpu`, where they read file bytes only and the training process decodes and augments
the batch (`gpu_decode`). Both draw each photo's crop and flip from (seed, epoch, photo index), so the
sampler hands the workers the epoch with every index.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..data.dataset import category_photos
from ..data.images import ImageDecodeError, decode_image
from ..data.manifest import Photo, has_split, split_categories, split_photos
from ..errors import StepError
from .distributed import Context
from .gpu_decode import (
    collate_bytes,
    crop_flip_for,
    crop_flip_resize,
    gpu_decodable,
    pillow_tensor,
)
from .models import ModelSpec, eval_transform
from .recipe import Augmentation, augment_crop


class PhotoFolder(Dataset):
    """Labelled photos with a fixed label list, so train and val agree on class indices.

    SOURCE is the photos of one split (`split_photos`) or a <category>/<photo> folder.
    """

    def __init__(self, source: Path | Sequence[Photo], labels: list[str], transform) -> None:
        index = {label: i for i, label in enumerate(labels)}
        if isinstance(source, str | Path):
            photos = [
                Photo(p, c, f"{c}/{p.name}")
                for c, files in category_photos(Path(source)).items()
                for p in files
            ]
            where = str(source)
        else:
            photos, where = list(source), "the data"
        self.samples: list[tuple[Path, int]] = []
        for photo in photos:
            if photo.category not in index:
                raise StepError(
                    f"{where}: {photo.category} is not a train category; every val category needs train photos"
                )
            self.samples.append((photo.path, index[photo.category]))
        if not self.samples:
            raise StepError(f"no photos in {where} (expected <category>/<photo>)")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            image = decode_image(path.read_bytes()).image
        except (ImageDecodeError, OSError) as exc:
            raise StepError(f"cannot read training photo {path}: {exc}") from None
        return self.transform(image), label


class TrainPhotos(PhotoFolder):
    """Training photos keyed by (index, epoch), as `EpochSampler` yields them.

    `decode="cpu"`: the augmented, normalised float32 photo (Pillow decode in the worker).
    `decode="gpu"`: the file bytes for the training process to decode, or, for a photo the GPU
    decoder should not take (a PNG, a CMYK JPEG...), the Pillow-decoded uint8 photo and the reason.
    """

    def __init__(
        self,
        root: Path | Sequence[Photo],
        labels: list[str],
        spec: ModelSpec,
        seed: int,
        decode: str,
        aug: Augmentation | None = None,
    ) -> None:
        super().__init__(root, labels, transform=None)
        self.spec, self.seed, self.decode = spec, seed, decode
        self.aug = aug or Augmentation(image_size=spec.image_size)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        path, label = self.samples[index]
        try:
            data = path.read_bytes()
            if self.decode == "gpu":
                reason = gpu_decodable(data)
                if reason is None:
                    return torch.frombuffer(bytearray(data), dtype=torch.uint8), None, index, epoch, label
                return pillow_tensor(data), reason, index, epoch, label
            image = pillow_tensor(data)
        except (ImageDecodeError, OSError) as exc:
            raise StepError(f"cannot read training photo {path}: {exc}") from None
        box = crop_flip_for(self.seed, epoch, index, *image.shape[1:])
        crop = crop_flip_resize(image, box, self.aug.size_for(epoch))
        return augment_crop(crop, self.aug, self.seed, epoch, index, self.spec.mean, self.spec.std), label


def train_labels(data: Path) -> list[str]:
    """The sorted train categories of DATA (a manifest folder or the folder layout): the class list."""
    labels = split_categories(data, "train")
    if not labels:
        raise StepError(
            f"no training photos: expected {data}/manifest.jsonl.gz (the data steps' output) or "
            f"{data}/train/<category>/*.jpg"
        )
    if not has_split(data, "val"):
        raise StepError(
            f"no validation photos: expected val rows in {data}'s manifest or {data}/val/<category>/*.jpg"
        )
    return labels


class ShardSampler(torch.utils.data.Sampler):
    """Rank r takes items r, r+W, r+2W...: no padding, so summed metrics count every photo once."""

    def __init__(self, size: int, ctx: Context) -> None:
        self.indices = list(range(ctx.rank, size, ctx.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class EpochSampler(DistributedSampler):
    """DistributedSampler that yields (index, epoch): persistent workers never see `set_epoch`, and
    the augmentation of a photo depends on both."""

    def __iter__(self):
        epoch = self.epoch
        return ((index, epoch) for index in super().__iter__())


def loaders(
    data: Path,
    spec: ModelSpec,
    ctx: Context,
    batch_size: int,
    workers: int,
    seed: int,
    decode: str = "cpu",
    aug: Augmentation | None = None,
    roots: Mapping[str, Path] | None = None,
):
    """Train and val loaders and the train sampler; `decode` is `cpu` or `gpu` (already resolved).
    `roots` says where the photos a manifest references lie here (default: where they were written)."""
    train_set = TrainPhotos(split_photos(data, "train", roots), spec.labels, spec, seed, decode, aug)
    val_set = PhotoFolder(split_photos(data, "val", roots), spec.labels, eval_transform(spec))
    sampler = EpochSampler(train_set, ctx.world_size, ctx.rank, shuffle=True, seed=seed, drop_last=False)
    common = {
        "num_workers": workers,
        "pin_memory": ctx.device.type == "cuda",
        "persistent_workers": workers > 0,
    }
    collate = {"collate_fn": collate_bytes} if decode == "gpu" else {}
    train_loader = DataLoader(
        train_set, batch_size=batch_size, sampler=sampler, drop_last=False, **collate, **common
    )
    val_loader = DataLoader(val_set, batch_size=batch_size, sampler=ShardSampler(len(val_set), ctx), **common)
    return train_loader, val_loader, sampler


def tensor_batches(ctx, channels_last: bool):
    """The `prepare` for loaders that yield (images, targets) tensors: move them to the device."""

    def prepare(batch):
        images, targets = batch
        images = images.to(ctx.device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets.to(ctx.device, non_blocking=True)

    return prepare
