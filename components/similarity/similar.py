"""The similar step: the k catalogue photos most like each query photo, as a table, CSV or JSON.

Query photos are embedded by the index's own model (`embedding_index.load_index_model`) with
`features.embed_files`, then looked up with the exact `embedding_index.search`.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import StepError
from ..evaluation.predict import UnreadablePhoto, collect_files, pick_device
from .embedding_index import EmbeddingIndex, Neighbour, load_index, load_index_model, neighbours_of, search
from .features import DEFAULT_BATCH_SIZE, embed_files

DEFAULT_K = 10
SIMILAR_COLUMNS = ("query", "rank", "similarity", "category", "product_id", "path")


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


def _neighbour_record(n: Neighbour) -> dict:
    return {
        "rank": n.rank,
        "similarity": round(n.similarity, 6),
        "category": n.category,
        "product_id": n.product_id,
        "path": str(n.path),
    }


def similar_rows(result: SimilarResult) -> list[dict]:
    return [{"query": str(q.query), **_neighbour_record(n)} for q in result.queries for n in q.neighbours]


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
                {"query": str(q.query), "neighbours": [_neighbour_record(n) for n in q.neighbours]}
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
