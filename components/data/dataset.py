"""The on-disk layout shared by the data steps: <root>/<split>/<category>/<photo>.jpg.

Training, evaluation and the registry read folders in this layout too, through `category_photos`
and `SPLITS` from here.

Each data step reads one such folder and writes a new one (a KFP artifact), linking photos it does
not change, and leaves a JSON record of what it did at the top of its output.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import StepError
from ..step_output import prepare_out
from .naming import link_or_copy

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def category_photos(folder: Path) -> dict[str, list[Path]]:
    """Photos per category in a <folder>/<category>/ tree, sorted by name so every step is repeatable."""
    if not folder.is_dir():
        raise StepError(f"{folder} does not exist or is not a folder")
    photos: dict[str, list[Path]] = {}
    for category_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(
            p
            for p in category_dir.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
        )
        photos[category_dir.name] = files
    return photos


def prepare_output(out: Path, marker: str, step: str) -> None:
    """An output folder must be new, empty, or this step's earlier output (whose splits are replaced)."""
    if prepare_out(out, marker, step):
        for split in SPLITS:
            _remove_tree(out / split)


def _remove_tree(path: Path) -> None:
    import shutil

    if path.exists():
        shutil.rmtree(path)


SPLIT_MANIFEST = "split.json"  # written by split; carried by balance and augment for train and promote


def carry_split_manifest(source_root: Path, out: Path) -> None:
    """Bring split's per-photo record (groups, content hashes) along into a later step's output."""
    if (source_root / SPLIT_MANIFEST).is_file():
        link_or_copy(source_root / SPLIT_MANIFEST, out / SPLIT_MANIFEST)


def link_split(source_root: Path, out: Path, split: str) -> int:
    """Carry a split a step does not change into its output by hard links; returns the photo count."""
    count = 0
    source = source_root / split
    if not source.is_dir():
        return 0
    for category, files in category_photos(source).items():
        for path in files:
            link_or_copy(path, out / split / category / path.name)
            count += 1
    return count
