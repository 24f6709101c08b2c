"""The folder layout shared by the data steps: <root>/<split>/<category>/<photo>.jpg.

clean writes <root>/<category>/<photo>.jpg; split, balance and augment write a manifest that
references those photos instead of folders of links (`manifest.py`), and every reader still accepts
this layout for a user's own data, through `category_photos` and `SPLITS` from here.

Each data step writes a new folder (a KFP artifact) and leaves a JSON record of what it did at the
top of its output.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import StepError
from ..step_output import prepare_out

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
