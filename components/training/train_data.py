"""Photo folders as datasets and loaders for (distributed) training and validation."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..data.dataset import category_photos
from ..data.images import ImageDecodeError, decode_image
from ..errors import StepError
from .distributed import Context


class PhotoFolder(Dataset):
    """<root>/<category>/<photo> with a fixed label list, so train and val agree on class indices."""

    def __init__(self, root: Path, labels: list[str], transform) -> None:
        index = {label: i for i, label in enumerate(labels)}
        self.samples: list[tuple[Path, int]] = []
        for category, files in category_photos(root).items():
            if category not in index:
                raise StepError(
                    f"{root}/{category} is not a train category; every val category needs train photos"
                )
            self.samples += [(path, index[category]) for path in files]
        if not self.samples:
            raise StepError(f"no photos in {root}/<category>/")
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


def train_labels(data: Path) -> list[str]:
    labels = (
        [c for c, files in category_photos(data / "train").items() if files]
        if (data / "train").is_dir()
        else []
    )
    if not labels:
        raise StepError(
            f"no training photos: expected {data}/train/<category>/*.jpg (the output of the data steps)"
        )
    if not (data / "val").is_dir():
        raise StepError(f"no validation photos: expected {data}/val/<category>/*.jpg")
    return labels


class ShardSampler(torch.utils.data.Sampler):
    """Rank r takes items r, r+W, r+2W...: no padding, so summed metrics count every photo once."""

    def __init__(self, size: int, ctx: Context) -> None:
        self.indices = list(range(ctx.rank, size, ctx.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def loaders(
    data: Path, labels: list[str], train_tf, val_tf, ctx: Context, batch_size: int, workers: int, seed: int
):
    train_set = PhotoFolder(data / "train", labels, train_tf)
    val_set = PhotoFolder(data / "val", labels, val_tf)
    sampler = DistributedSampler(
        train_set, ctx.world_size, ctx.rank, shuffle=True, seed=seed, drop_last=False
    )
    common = {
        "num_workers": workers,
        "pin_memory": ctx.device.type == "cuda",
        "persistent_workers": workers > 0,
    }
    train_loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, drop_last=False, **common)
    val_loader = DataLoader(val_set, batch_size=batch_size, sampler=ShardSampler(len(val_set), ctx), **common)
    return train_loader, val_loader, sampler
