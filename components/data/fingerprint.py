"""Which photos are these: a content fingerprint of a folder, the same wherever the folder lives.

fetch fingerprints the raw photos (the pipeline's cache key), training logs the fingerprint of its
data to MLflow, evaluation and promotion record the test set's, so a number names the photos behind it.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import StepError

_CHUNK = 1 << 20


def data_fingerprint(folder: Path) -> str:
    """sha256 over every file under `folder`: sorted relative paths, sizes and content hashes.

    Two folders get the same fingerprint exactly when they hold the same files with the same bytes,
    wherever they live. Files are streamed and hashed on a few threads (hashlib releases the GIL).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise StepError(f"cannot fingerprint {folder}: it is not a folder")
    files = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        files.extend(Path(root, name) for name in names)
    return files_fingerprint([(p.relative_to(folder).as_posix(), p) for p in files if p.is_file()])


def files_fingerprint(files: list[tuple[str, Path]]) -> str:
    """data_fingerprint's sum over (relative POSIX path, file) pairs: what fetch uses to fingerprint
    the files it will copy, so the fingerprint of the copy can be checked against it."""
    files = sorted(files)
    with ThreadPoolExecutor(max_workers=4) as pool:
        digests = list(pool.map(_hash_file, [path for _, path in files]))
    total = hashlib.sha256()
    for (relative, _), (size, digest) in zip(files, digests, strict=True):
        total.update(os.fsencode(relative) + b"\0")
        total.update(f"{size}\0{digest}\n".encode())
    return total.hexdigest()


def _hash_file(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()
