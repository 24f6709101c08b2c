"""The embedding index folder: its format, reading it, and exact nearest-neighbour search over it.

`features.extract_features` writes the folder:

    OUT/embeddings.npy   N×D float32, row i is the photo on line i of index.csv
    OUT/index.csv        path (relative to the data root), category, product_id
    OUT/features.json    model summary, dims, count, data root, unreadable files (written last:
                         a folder without it is not a finished index)
    OUT/model/           a copy of the model (spec + weights), so queries are embedded by the very
                         network that embedded the catalogue, wherever the index is moved

Rows are L2-normalised, so the cosine similarity of two photos is the dot product of their rows.
Search is exact (matrix products in blocks of bounded size); docs/similarity.md says when an
approximate index is worth it.
"""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import StepError
from ..progress import Progress
from ..training.models import ModelSpec, load_classifier

EMBEDDINGS_FILE = "embeddings.npy"
INDEX_FILE = "index.csv"
FEATURES_FILE = "features.json"
MODEL_DIR = "model"
INDEX_COLUMNS = ("path", "category", "product_id")
FORMAT_VERSION = 1
# Similarity scores held at once by `search`: 2^22 float32 = 16 MiB per block, whatever the index size.
SEARCH_BLOCK = 1 << 22
QUERY_CHUNK = 1024


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


def feature_dims(model: torch.nn.Module, spec: ModelSpec) -> int:
    """Width of the embeddings MODEL gives: the input width of its classifier head."""
    model = getattr(model, "inner", model)  # FlipAveraged: features are of the photo as it is
    head = model.fc if spec.arch.startswith("resnet") else model._fc
    return int(head.in_features)


def load_index_model(index: EmbeddingIndex, device: torch.device | str = "cpu"):
    """The model the index was built with (its copy in INDEX/model/), checked against the index dims."""
    network, spec = load_classifier(index.model_dir, device)
    if feature_dims(network, spec) != index.dims:
        raise StepError(
            f"the model in {index.model_dir} gives {feature_dims(network, spec)}-d features but the index "
            f"holds {index.dims}-d embeddings"
        )
    return network, spec


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


@dataclass(frozen=True)
class Neighbour:
    rank: int
    similarity: float
    position: int  # row in the index
    path: Path  # where the catalogue photo was read from
    category: str
    product_id: str


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
