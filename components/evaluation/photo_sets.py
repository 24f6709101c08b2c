"""Which photos evaluate (and register's ONNX check) score: the test and val photos of DATA.

DATA is split's output (its manifest's test rows, the val rows beside them; SPLIT/test and SPLIT/val
name one split of it, as they named folders before manifests), a split root in the folder layout or
its test/ folder, or a plain <category>/ folder. A photo's `name` is its path in its split's folder,
<category>/<file>, as predictions.csv and the report name it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..data.dataset import SPLITS
from ..data.manifest import Photo, locate, split_photos
from ..errors import StepError
from .predict import collect_files


def find_test_dir(data: Path) -> Path:
    """TEST_DIR itself (category sub-folders), or the `test/` folder of a split root.

    A folder whose only sub-folders are split names (train, val, test) is a split root.
    """
    data = Path(data)
    if not data.is_dir():
        raise StepError(f"test data {data} does not exist or is not a folder")
    subfolders = {p.name for p in data.iterdir() if p.is_dir() and not p.name.startswith(".")}
    if subfolders and subfolders <= set(SPLITS):
        if "test" not in subfolders:
            raise StepError(f"{data} is a split folder without a test/ split")
        return data / "test"
    if not subfolders:
        raise StepError(f"{data} has no category sub-folders (expected {data}/<category>/<photo>)")
    return data


def labelled_split(
    data: Path, split: str = "test", roots: Mapping[str, Path] | None = None
) -> tuple[list[Photo], str]:
    """(photos, where they are as text) of SPLIT of DATA.

    DATA is a manifest folder (its SPLIT rows), MANIFEST_FOLDER/<split>, or a folder: for "test" a
    split root in the folder layout or its test/ folder (`find_test_dir`), else a <category>/ folder
    taken as it is. A photo's `name` is its path in its split's folder, <category>/<file>, as
    predictions.csv and the report name it.
    """
    data = Path(data)
    found = locate(data)
    if found is not None:
        folder, named = found
        photos = split_photos(folder, named or split, roots)
        if not photos:
            raise StepError(f"the manifest in {folder} has no {named or split} photos")
        return photos, str(folder / (named or split))
    chosen = find_test_dir(data) if split == "test" else data
    if not chosen.is_dir():
        raise StepError(f"{chosen} does not exist or is not a folder")
    files, categories = labelled_photos(chosen)
    photos = [Photo(f, c, f.relative_to(chosen).as_posix()) for f, c in zip(files, categories, strict=True)]
    return photos, str(chosen)


def validation_photos(
    data: Path, threshold_data: Path | None, roots: Mapping[str, Path] | None = None
) -> list[Photo] | None:
    """The photos the threshold is chosen on: THRESHOLD_DATA's (a manifest's val rows, or a folder),
    else the val split beside DATA's test photos; None when there are none to be had."""
    if threshold_data is not None:
        given = Path(threshold_data)
        if locate(given) is None and not given.is_dir():
            return None
        try:
            return labelled_split(given, "val", roots)[0]
        except StepError:  # a folder or manifest without val photos: no threshold reaches the target
            return []
    found = locate(Path(data))
    if found is not None:
        folder, named = found
        if named not in (None, "test"):
            return None
        return split_photos(folder, "val", roots) or None
    val_dir = _val_dir_beside(find_test_dir(Path(data)))
    if val_dir is None:
        return None
    try:
        return labelled_split(val_dir, "val")[0]
    except StepError:
        return []


def labelled_photos(test_dir: Path) -> tuple[list[Path], list[str]]:
    """Every non-hidden file under each category folder, with its category, sorted."""
    files, categories = [], []
    for category_dir in sorted(p for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = collect_files([category_dir])
        files.extend(found)
        categories.extend([category_dir.name] * len(found))
    if not files:
        raise StepError(f"no photos under {test_dir}/<category>/")
    return files, categories


def _val_dir_beside(test_dir: Path) -> Path | None:
    """The `val/` folder of the split root a test folder belongs to, if it has one."""
    if test_dir.name == "test" and (test_dir.parent / "val").is_dir():
        return test_dir.parent / "val"
    return None
