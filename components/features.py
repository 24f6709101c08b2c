"""Photo embeddings and exact nearest-neighbour search over a catalogue.

An embedding is the layer before the classifier (ResNet: the 512- or 2048-d average-pooled
features), L2-normalised, so the cosine similarity of two photos is the dot product of their rows.
`extract_features` writes an index folder:

    OUT/embeddings.npy   N×D float32, row i is the photo on line i of index.csv
    OUT/index.csv        path (relative to the data root), category, product_id
    OUT/features.json    model summary, dims, count, data root, unreadable files (written last:
                         a folder without it is not a finished index)
    OUT/model/           a copy of the model (spec + weights), so queries are embedded by the very
                         network that embedded the catalogue, wherever the index is moved

Photos go through the same decoder (`images.decode_image`) and preprocessing
(`models.eval_transform`) as classification; `embed_images` is the in-memory twin the server calls,
and both end in `_embed_batch`, so an uploaded photo and the same file in the index get the same
vector. Search is exact (matrix products in blocks of bounded size); docs/similarity.md says when an
approximate index is worth it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .dataset import SPLITS, category_photos
from .errors import StepError
from .images import to_rgb
from .models import (
    SPEC_NAME,
    WEIGHTS_NAME,
    ModelSpec,
    eval_transform,
    features_and_logits,
    load_classifier,
)
from .naming import atomic_write_bytes, atomic_write_text, link_or_copy, product_id
from .predict import UnreadablePhoto, _prepare, collect_files, pick_device
from .progress import Progress

EMBEDDINGS_FILE = "embeddings.npy"
INDEX_FILE = "index.csv"
FEATURES_FILE = "features.json"
MODEL_DIR = "model"
INDEX_COLUMNS = ("path", "category", "product_id")
FORMAT_VERSION = 1
DEFAULT_BATCH_SIZE = 64
DEFAULT_K = 10
# Similarity scores held at once by `search`: 2^22 float32 = 16 MiB per block, whatever the index size.
SEARCH_BLOCK = 1 << 22
QUERY_CHUNK = 1024


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
    parameters are). Give images decoded with `images.decode_image` so hostile uploads are refused
    there; other modes are converted to RGB here, exactly as the decoder would.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    transform = eval_transform(spec)
    dims = _feature_dims(model, spec)
    chunks = [np.empty((0, dims), dtype=np.float32)]
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(to_rgb(image)) for image in images[start : start + batch_size]])
        chunks.append(_embed_batch(model, spec.arch, batch, device))
    return np.concatenate(chunks)


def _feature_dims(model: torch.nn.Module, spec: ModelSpec) -> int:
    head = model.fc if spec.arch.startswith("resnet") else model._fc
    return int(head.in_features)


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
    network runs batched, as in `predict.predict_files`.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    transform = eval_transform(spec)
    chunks = [np.empty((0, _feature_dims(model, spec)), dtype=np.float32)]
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


def catalogue_photos(data: Path) -> list[tuple[Path, str]]:
    """(photo, category) for DATA/<category>/<photo>, or for every split of a split folder
    (DATA/{train,val,test}/<category>/<photo>), in a repeatable order."""
    data = Path(data)
    if not data.is_dir():
        raise StepError(f"data {data} does not exist or is not a folder")
    subfolders = {p.name for p in data.iterdir() if p.is_dir() and not p.name.startswith(".")}
    roots = (
        [data / s for s in SPLITS if s in subfolders] if subfolders and subfolders <= set(SPLITS) else [data]
    )
    photos = [
        (path, category)
        for root in roots
        for category, files in category_photos(root).items()
        for path in files
    ]
    if not photos:
        raise StepError(f"{data} holds no photos (expected {data}/<category>/<photo>)")
    return photos


def _prepare_out(out: Path) -> None:
    """OUT must be new, empty, or an earlier index (recognised by its features.json)."""
    if out.exists() and not out.is_dir():
        raise StepError(f"output {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not (out / FEATURES_FILE).is_file():
            raise StepError(
                f"output folder {out} is not empty and holds no {FEATURES_FILE}: refusing to write into a "
                "folder that was not made by 'shopvision features' (choose an empty or new folder)"
            )
        (out / FEATURES_FILE).unlink()  # from here on the folder is an unfinished index
        shutil.rmtree(out / MODEL_DIR, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def extract_features(
    model: str | Path,
    data: Path,
    out: Path,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
    show_progress: bool = True,
) -> FeaturesResult:
    """Embed every photo under DATA with MODEL (any form `resolve_model_dir` takes); write OUT."""
    from .model_source import resolve_model_dir

    data, out = Path(data), Path(out)
    photos = catalogue_photos(data)
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
        (path.relative_to(data).as_posix(), category_of[path], product_id(path.name))
        for path in embedded.files
    ]
    seconds = time.perf_counter() - started

    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(embedded.embeddings, dtype=np.float32), allow_pickle=False)
    atomic_write_bytes(out / EMBEDDINGS_FILE, buffer.getvalue())
    atomic_write_text(out / INDEX_FILE, _csv_text(INDEX_COLUMNS, rows))
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
        "data_root": str(data.resolve()),
        "per_category": per_category,
        "unreadable": [
            {"path": _relative(u.path, data), "reason": u.reason, "detail": u.detail}
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


def _csv_text(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def summary(result: FeaturesResult) -> str:
    text = (
        f"features: {result.count} photos in {len(result.per_category)} categories embedded "
        f"({result.dims}-d) on {result.device} in {result.seconds:.1f} s; index in {result.out}"
    )
    if result.unreadable:
        text += f"; {len(result.unreadable)} unreadable files skipped (listed in {FEATURES_FILE})"
    return text


@dataclass
class EmbeddingIndex:
    directory: Path
    embeddings: np.ndarray  # N×D float32, L2-normalised rows (memory-mapped from embeddings.npy)
    paths: list[str]  # relative to data_root
    categories: list[str]
    product_ids: list[str]
    info: dict  # features.json

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def dims(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def data_root(self) -> Path:
        return Path(self.info.get("data_root", "."))

    @property
    def model_dir(self) -> Path:
        return self.directory / MODEL_DIR

    def photo_path(self, position: int) -> Path:
        """Where the photo at `position` was read from (it may have moved since)."""
        return self.data_root / self.paths[position]


def load_index(directory: str | Path) -> EmbeddingIndex:
    """An index written by `extract_features`; the embeddings are memory-mapped, not read whole."""
    directory = Path(directory)
    if not (directory / FEATURES_FILE).is_file():
        raise StepError(
            f"{directory} is not a finished embedding index (no {FEATURES_FILE}; make one with "
            "'shopvision features')"
        )
    try:
        info = json.loads((directory / FEATURES_FILE).read_text())
        embeddings = np.load(directory / EMBEDDINGS_FILE, mmap_mode="r", allow_pickle=False)
        with (directory / INDEX_FILE).open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = tuple(next(reader, ()))
            rows = list(reader)
    except (OSError, ValueError) as exc:
        raise StepError(f"cannot read the index in {directory}: {type(exc).__name__}: {exc}") from None
    if header != INDEX_COLUMNS or any(len(r) != len(INDEX_COLUMNS) for r in rows):
        raise StepError(f"{directory / INDEX_FILE} does not have the columns {', '.join(INDEX_COLUMNS)}")
    if embeddings.ndim != 2 or embeddings.dtype != np.float32 or embeddings.shape[0] != len(rows):
        raise StepError(
            f"{directory / EMBEDDINGS_FILE} holds {embeddings.dtype} {embeddings.shape}, expected float32 "
            f"with one row per line of {INDEX_FILE} ({len(rows)})"
        )
    paths, categories, products = (
        (list(column) for column in zip(*rows, strict=True)) if rows else ([], [], [])
    )
    return EmbeddingIndex(directory, embeddings, paths, categories, products, info)


# ---------------------------------------------------------------------------------------------------
# Search


def search(
    index: EmbeddingIndex | np.ndarray,
    query_embeddings: np.ndarray,
    k: int,
    *,
    block: int = SEARCH_BLOCK,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine search: (similarities, positions), each Q×min(k, N) numpy arrays, best first.

    Rows of both sides must be L2-normalised. Queries go in chunks and the index in slices so that
    at most `block` scores exist at once (16 MiB by default), whatever N and Q; each slice's best k
    are merged into a running top k. The products and the top-k run in torch (multi-threaded
    selection, about twice numpy's argpartition for batches), on `device`: on a GPU the whole index
    is copied there once. Ties are broken by position, so results are repeatable.
    """
    matrix = index.embeddings if isinstance(index, EmbeddingIndex) else index
    queries = np.atleast_2d(np.asarray(query_embeddings, dtype=np.float32))
    if matrix.ndim != 2 or queries.ndim != 2 or queries.shape[1] != matrix.shape[1]:
        raise StepError(
            f"query embeddings of shape {tuple(queries.shape)} do not fit an index of shape {tuple(matrix.shape)}"
        )
    if k < 1:
        raise StepError(f"k must be at least 1, got {k}")
    n = matrix.shape[0]
    k = min(k, n)
    scores = np.empty((len(queries), k), dtype=np.float32)
    positions = np.empty((len(queries), k), dtype=np.int64)
    if k == 0 or len(queries) == 0:
        return scores, positions
    device = torch.device(device)
    with warnings.catch_warnings():
        # A loaded index is memory-mapped read-only; torch warns about that, but search only reads it.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        catalogue = torch.from_numpy(np.asarray(matrix, dtype=np.float32)).to(device)
    query_chunk = max(1, min(len(queries), QUERY_CHUNK, block // k))
    rows = max(k, block // query_chunk)
    with torch.inference_mode():
        for q0 in range(0, len(queries), query_chunk):
            q = torch.from_numpy(np.ascontiguousarray(queries[q0 : q0 + query_chunk])).to(device)
            best_scores = torch.empty((len(q), 0), dtype=torch.float32, device=device)
            best_positions = torch.empty((len(q), 0), dtype=torch.int64, device=device)
            for r0 in range(0, n, rows):
                part = q @ catalogue[r0 : r0 + rows].T
                top = part.topk(min(k, part.shape[1]), dim=1, sorted=False)
                best_scores = torch.cat([best_scores, top.values], dim=1)
                best_positions = torch.cat([best_positions, top.indices + r0], dim=1)
                if best_scores.shape[1] > k:
                    keep = best_scores.topk(k, dim=1, sorted=False)
                    best_scores, best_positions = keep.values, best_positions.gather(1, keep.indices)
            chunk_scores, chunk_positions = best_scores.cpu().numpy(), best_positions.cpu().numpy()
            order = np.lexsort((chunk_positions, -chunk_scores), axis=1)
            scores[q0 : q0 + len(q)] = np.take_along_axis(chunk_scores, order, axis=1)
            positions[q0 : q0 + len(q)] = np.take_along_axis(chunk_positions, order, axis=1)
            if progress is not None:
                progress.advance(len(q))
    return scores, positions


# ---------------------------------------------------------------------------------------------------
# Similar catalogue photos for query photos


@dataclass(frozen=True)
class Neighbour:
    rank: int
    similarity: float
    position: int  # row in the index
    path: Path  # where the catalogue photo was read from
    category: str
    product_id: str


@dataclass(frozen=True)
class QueryResult:
    query: Path
    neighbours: tuple[Neighbour, ...]


@dataclass
class SimilarResult:
    k: int  # neighbours per query: the k asked for, or the index size when that is smaller
    index_size: int
    device: str
    queries: list[QueryResult] = field(default_factory=list)
    unreadable: list[UnreadablePhoto] = field(default_factory=list)
    seconds: float = 0.0


def load_index_model(index: EmbeddingIndex, device: torch.device | str = "cpu"):
    """The model the index was built with (its copy in INDEX/model/), checked against the index dims."""
    network, spec = load_classifier(index.model_dir, device)
    if _feature_dims(network, spec) != index.dims:
        raise StepError(
            f"the model in {index.model_dir} gives {_feature_dims(network, spec)}-d features but the index "
            f"holds {index.dims}-d embeddings"
        )
    return network, spec


def neighbours_of(
    index: EmbeddingIndex, similarities: np.ndarray, positions: np.ndarray
) -> tuple[Neighbour, ...]:
    """One query's search row as catalogue records."""
    return tuple(
        Neighbour(
            rank,
            float(score),
            int(p),
            index.photo_path(int(p)),
            index.categories[int(p)],
            index.product_ids[int(p)],
        )
        for rank, (score, p) in enumerate(zip(similarities, positions, strict=True), start=1)
    )


def find_similar(
    index: str | Path | EmbeddingIndex,
    photos: Iterable[str | Path],
    *,
    k: int = DEFAULT_K,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
) -> SimilarResult:
    """The k most similar catalogue photos for each query photo; unreadable queries are listed apart.

    Folders among PHOTOS are walked; a named file that is missing or not a photo is reported in
    `unreadable` while the other queries are still answered.
    """
    if k < 1:
        raise StepError(f"k must be at least 1, got {k}")
    index = index if isinstance(index, EmbeddingIndex) else load_index(index)
    files: list[Path] = []
    for photo in photos:
        path = Path(photo)
        files.extend(collect_files([path]) if path.is_dir() else [path])
    if not files:
        raise StepError("no query photos given")
    target = pick_device(device)
    network, spec = load_index_model(index, target)
    started = time.perf_counter()
    embedded = embed_files(network, spec, files, batch_size=batch_size, device=target)
    scores, positions = search(index, embedded.embeddings, k)
    result = SimilarResult(min(k, len(index)), len(index), str(target), unreadable=list(embedded.unreadable))
    for path, row_scores, row_positions in zip(embedded.files, scores, positions, strict=True):
        result.queries.append(QueryResult(path, neighbours_of(index, row_scores, row_positions)))
    result.seconds = time.perf_counter() - started
    return result


SIMILAR_COLUMNS = ("query", "rank", "similarity", "category", "product_id", "path")


def similar_rows(result: SimilarResult) -> list[dict]:
    return [
        {
            "query": str(q.query),
            "rank": n.rank,
            "similarity": round(n.similarity, 6),
            "category": n.category,
            "product_id": n.product_id,
            "path": str(n.path),
        }
        for q in result.queries
        for n in q.neighbours
    ]


def format_similar(result: SimilarResult, output: str = "table") -> str:
    """`table` for the terminal, or `csv` / `json` for programs."""
    if output == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=SIMILAR_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(similar_rows(result))
        return buffer.getvalue().rstrip("\n")
    if output == "json":
        body = {
            "k": result.k,
            "index_size": result.index_size,
            "queries": [
                {
                    "query": str(q.query),
                    "neighbours": [
                        {
                            "rank": n.rank,
                            "similarity": round(n.similarity, 6),
                            "category": n.category,
                            "product_id": n.product_id,
                            "path": str(n.path),
                        }
                        for n in q.neighbours
                    ],
                }
                for q in result.queries
            ],
            "unreadable": [
                {"query": str(u.path), "reason": u.reason, "detail": u.detail} for u in result.unreadable
            ],
        }
        return json.dumps(body, indent=1)
    if output != "table":
        raise StepError(f"output must be table, csv or json, got {output!r}")
    blocks = []
    for q in result.queries:
        width = max([len("category")] + [len(n.category) for n in q.neighbours])
        lines = [f"{q.query}", f"  rank  similarity  {'category':<{width}}  photo"]
        lines += [
            f"  {n.rank:>4}  {n.similarity:>10.4f}  {n.category:<{width}}  {n.path}" for n in q.neighbours
        ]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def similar_summary(result: SimilarResult) -> str:
    text = (
        f"similar: {len(result.queries)} queries answered with the top {result.k} of {result.index_size} "
        f"catalogue photos on {result.device} in {result.seconds:.1f} s"
    )
    if result.unreadable:
        text += f"; {len(result.unreadable)} unreadable"
    return text
