"""File naming rules shared by every step: product ids, safe output names, atomic writes.

It lives in data/, the first stage, because product ids are read from raw file names; every later
stage (training, evaluation, the registry, similarity) imports it from here, which runs downward.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

# Raw photos are named <product_id>[_<n>].<ext>; n is the photo's index within the listing
# (one or two digits). Longer digit runs are part of the id ("train_Banana_001" is one photo).
_PRODUCT_ID = re.compile(r"^(?P<product>.+?)(?:_\d{1,2})?$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]+")

IMAGE_SUFFIX = ".jpg"


def product_id(file_name: str) -> str:
    """The listing a photo belongs to, read from its name (derived names keep it before the first '.')."""
    stem = Path(file_name).name.split(".", 1)[0]
    match = _PRODUCT_ID.match(stem)
    return match.group("product") if match else stem


def source_product_id(source: str) -> str:
    """The listing of a raw photo from its path relative to RAW (`<category>/.../<file>`).

    A folder below the category is a listing (`RAW/<category>/<listing>/<n>.jpg`: every photo in it is
    one product, whatever the files are called); a photo directly in its category folder is named
    `<product_id>[_<n>]`. clean records this id per photo, and split groups by it.
    """
    parts = Path(source).parts
    if len(parts) > 2:
        return parts[1]
    return product_id(parts[-1])


def safe_stem(stem: str) -> str:
    """A file-system and URL safe stem that keeps letters, digits, '_' and '-' as they were."""
    cleaned = _UNSAFE.sub("-", stem).strip("-")
    return cleaned or "photo"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write so that readers see the old file or the whole new one, never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link when the file system allows it (no bytes copied), copy otherwise."""
    import shutil

    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
