"""Photo embeddings: the layer before the classifier, and the step that embeds a whole catalogue.

An embedding is the layer before the classifier (ResNet: the 512- or 2048-d average-pooled
features), L2-normalised, so the cosine similarity of two photos is the dot product of their rows.
`extract_features` embeds every photo under a data folder and writes an index folder (the format,
reading it and searching it are in `embedding_index`; answering query photos in `similar`).

Photos go through the same decoder (`data.images.decode_image`) and preprocessing
(`training.models.eval_transform`) as classification; `embed_images` is the in-memory twin the server calls,
and both end in `_embed_batch`, so an uploaded photo and the same file in the index get the same
vector.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.dataset import SPLITS, category_photos
from ..data.images import to_rgb
from ..data.naming import atomic_write_bytes, atomic_write_text, link_or_copy, product_id
from ..errors import StepError
from ..evaluation.predict import UnreadablePhoto, _prepare, pick_device
from ..progress import Progress
from ..step_output import csv_text, prepare_out
from ..training.models import (
    SPEC_NAME,
    WEIGHTS_NAME,
    ModelSpec,
    eval_transform,
    features_and_logits,
    load_classifier,
)
from .embedding_index import (
    EMBEDDINGS_FILE,
    FEATURES_FILE,
    FORMAT_VERSION,
    INDEX_COLUMNS,
    INDEX_FILE,
    MODEL_DIR,
    feature_dims,
)

# serving/similar.py (the /similar route) imports load_index, load_index_model, neighbours_of and
# search from this module, next to embed_images; they live in embedding_index and are re-exported
# here (the `x as x` form marks a deliberate re-export) so that import keeps working.
from .embedding_index import load_index as load_index
from .embedding_index import load_index_model as load_index_model
from .embedding_index import neighbours_of as neighbours_of
from .embedding_index import search as search

DEFAULT_BATCH_SIZE = 64


# ---------------------------------------------------------------------------------------------------
# Embedding


def _embed_batch(model: torch.nn.Module, arch: str, batch: torch.Tensor, device: torch.device) -> np.ndarray:
    """Pooled features of a preprocessed N×3×S×S batch, L2-normalised, as float32 rows."""
    with torch.inference_mode():
        features, _ = features_and_logits(model, arch, batch.to(device, non_blocking=True))
        return torch.nn.functional.normalize(features.float(), dim=1).cpu().numpy()


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def embed_images(
    model: torch.nn.Module,
    spec: ModelSpec,
    images: Sequence[Image.Image],
    device: torch.device | str | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> np.ndarray:
    """L2-normalised embeddings (len(images)×D float32) of decoded photos, for the server.

    `model` comes from `load_classifier` (eval mode, already on `device`; default: where its
    parameters are). Give images decoded with `data.images.decode_image` so hostile uploads are refused
    there; other modes are converted to RGB here, exactly as the decoder would.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    transform = eval_transform(spec)
    dims = feature_dims(model, spec)
    chunks = [np.empty((0, dims), dtype=np.float32)]
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(to_rgb(image)) for image in images[start : start + batch_size]])
        chunks.append(_embed_batch(model, spec.arch, batch, device))
    return np.concatenate(chunks)


@dataclass
class EmbeddedFiles:
    embeddings: np.ndarray  # one row per readable file, in the order given
    files: list[Path]  # the readable files
    unreadable: list[UnreadablePhoto] = field(default_factory=list)


def embed_files(
    model: torch.nn.Module,
    spec: ModelSpec,
    files: Sequence[Path],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | str | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> EmbeddedFiles:
    """Embeddings of photo files; a file that is not a usable photo is reported, not fatal.

    Decoding runs on a few threads (Pillow and the tensor transforms release the GIL) while the
    network runs batched, as in `evaluation.predict.predict_files`.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    transform = eval_transform(spec)
    chunks = [np.empty((0, feature_dims(model, spec)), dtype=np.float32)]
    result = EmbeddedFiles(chunks[0], [])  # embeddings are filled in at the end
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(files), batch_size):
            chunk = list(files[start : start + batch_size])
            tensors = []
            for path, prepared in zip(chunk, pool.map(lambda p: _prepare(p, transform), chunk), strict=True):
                if isinstance(prepared, UnreadablePhoto):
                    result.unreadable.append(prepared)
                else:
                    tensors.append(prepared)
                    result.files.append(path)
            if tensors:
                chunks.append(_embed_batch(model, spec.arch, torch.stack(tensors), device))
            if progress is not None:
                progress.advance(len(chunk))
    result.embeddings = np.concatenate(chunks)
    return result


# ---------------------------------------------------------------------------------------------------
# The index folder


@dataclass
class FeaturesResult:
    out: Path
    count: int
    dims: int
    device: str
    per_category: dict[str, int]
    unreadable: list[UnreadablePhoto] = field(default_factory=list)
    seconds: float = 0.0


def catalogue_photos(
    data: Path, roots: Mapping[str, Path] | None = None
) -> tuple[list[tuple[Path, str]], Path]:
    """((photo, category) in a repeatable order, the folder the index names them relative to) for
    DATA/<category>/<photo>, every split of a split folder (DATA/{train,val,test}/<category>/<photo>),
    or every photo a data step's manifest references, once each (balance's copies are one photo).

    A manifest's photos lie elsewhere: they are named relative to the deepest folder holding them all
    (the cleaned folder for split's output, so the audit names them as clean's corrections expect).
    """
    from ..data.manifest import has_manifest, read_manifest, resolve, root_folders

    data = Path(data)
    if has_manifest(data):
        manifest = read_manifest(data)
        folders = root_folders(manifest, roots)
        seen: dict[tuple[str, str], tuple[Path, str]] = {}
        for entry in sorted(manifest.entries, key=lambda e: (e.category, e.file, e.root, e.path)):
            seen.setdefault((entry.root, entry.path), (resolve(entry, folders), entry.category))
        photos = list(seen.values())
        if not photos:
            raise StepError(f"the manifest in {data} lists no photos")
        common = Path(os.path.commonpath([str(p.parent) for p, _ in photos]))
        return photos, common
    if not data.is_dir():
        raise StepError(f"data {data} does not exist or is not a folder")
    subfolders = {p.name for p in data.iterdir() if p.is_dir() and not p.name.startswith(".")}
    folders_in = (
        [data / s for s in SPLITS if s in subfolders] if subfolders and subfolders <= set(SPLITS) else [data]
    )
    photos = [
        (path, category)
        for root in folders_in
        for category, files in category_photos(root).items()
        for path in files
    ]
    if not photos:
        raise StepError(f"{data} holds no photos (expected {data}/<category>/<photo>)")
    return photos, data


def _prepare_out(out: Path) -> None:
    """OUT must be new, empty, or an earlier index (recognised by its features.json)."""
    if prepare_out(out, FEATURES_FILE, "features"):
        (out / FEATURES_FILE).unlink()  # from here on the folder is an unfinished index
        shutil.rmtree(out / MODEL_DIR, ignore_errors=True)


def extract_features(
    model: str | Path,
    data: Path,
    out: Path,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
    show_progress: bool = True,
    roots: Mapping[str, Path] | None = None,
) -> FeaturesResult:
    """Embed every photo under DATA (or that DATA's manifest references; `roots` says where those
    lie here) with MODEL (any form `resolve_model_dir` takes); write OUT."""
    from ..training.model_source import resolve_model_dir

    data, out = Path(data), Path(out)
    photos, data_root = catalogue_photos(data, roots)
    model_dir = resolve_model_dir(model)
    target = pick_device(device)
    network, spec = load_classifier(model_dir, target)
    _prepare_out(out)

    started = time.perf_counter()
    progress = Progress(len(photos), "features") if show_progress else None
    embedded = embed_files(
        network, spec, [p for p, _ in photos], batch_size=batch_size, device=target, progress=progress
    )
    if progress is not None:
        progress.close()
    if not embedded.files:
        raise StepError(f"none of the {len(photos)} files under {data} is a readable photo")
    category_of = dict(photos)
    rows = [
        (path.relative_to(data_root).as_posix(), category_of[path], product_id(path.name))
        for path in embedded.files
    ]
    seconds = time.perf_counter() - started

    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(embedded.embeddings, dtype=np.float32), allow_pickle=False)
    atomic_write_bytes(out / EMBEDDINGS_FILE, buffer.getvalue())
    atomic_write_text(out / INDEX_FILE, csv_text(INDEX_COLUMNS, rows))
    link_or_copy(model_dir / WEIGHTS_NAME, out / MODEL_DIR / WEIGHTS_NAME)
    atomic_write_text(out / MODEL_DIR / SPEC_NAME, spec.to_json())

    per_category = dict(sorted(Counter(r[1] for r in rows).items()))
    record = {
        "step": "features",
        "format": FORMAT_VERSION,
        "count": len(rows),
        "dims": int(embedded.embeddings.shape[1]),
        "dtype": "float32",
        "normalisation": "l2",
        "similarity": "cosine: the dot product of two rows",
        "model": {
            "source": str(model),
            "arch": spec.arch,
            "image_size": spec.image_size,
            "resize_size": spec.resize_size,
            "num_classes": spec.num_classes,
            "copy": MODEL_DIR,
        },
        "data_root": str(data_root.resolve()),
        "per_category": per_category,
        "unreadable": [
            {"path": _relative(u.path, data_root), "reason": u.reason, "detail": u.detail}
            for u in embedded.unreadable
        ],
        "device": str(target),
        "seconds": round(seconds, 2),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    atomic_write_text(out / FEATURES_FILE, json.dumps(record, indent=1) + "\n")
    return FeaturesResult(
        out, len(rows), record["dims"], str(target), per_category, list(embedded.unreadable), seconds
    )


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def summary(result: FeaturesResult) -> str:
    text = (
        f"features: {result.count} photos in {len(result.per_category)} categories embedded "
        f"({result.dims}-d) on {result.device} in {result.seconds:.1f} s; index in {result.out}"
    )
    if result.unreadable:
        text += f"; {len(result.unreadable)} unreadable files skipped (listed in {FEATURES_FILE})"
    return text
