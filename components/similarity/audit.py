"""The audit step: likely mislabelled listings and categories that mix, from an embedding index.

For each catalogue photo it takes the k nearest photos of *other* listings (the photo itself and
photos with the same product id are left out: a listing's own photos and their augmented or
oversampled copies would otherwise vouch for it), then:

- a photo whose neighbours are mostly (share >= min_share) in one other category is a likely
  mislabelled listing, and that category is the suggestion;
- each neighbour link between two categories counts for that pair; a pair's `mix` is its cross links
  over all links of both categories' photos, so big and small categories compare fairly. Pairs that
  mix most are candidates to merge (both directions high) or to split (one direction high: part
  of one category looks like the other).

    OUT/mislabelled.csv      one row per likely mislabelled photo, highest share first
    OUT/confusable_pairs.csv one row per category pair with at least one cross link, most mixed first
    OUT/report.md            the same, readable, with thumbnails from OUT/thumbs/

`find_mislabelled` and `confusable_pairs` work on a plain neighbour table, so they can be checked
on hand-made ones; `audit` adds the search, the files and the thumbnails.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import StepError
from ..evaluation.predict import pick_device
from ..progress import Progress
from ..step_output import prepare_out
from .audit_report import MISLABELLED_FILE, REPORT_FILE, THUMBS_DIR, write_report
from .embedding_index import EmbeddingIndex, load_index, search
from .findings import AuditResult, CategoryPair, MislabelledPhoto

DEFAULT_K = 10
DEFAULT_MIN_SHARE = 0.6
EXAMPLES = 3  # neighbour thumbnails per report row


def other_listing_neighbours(
    embeddings: np.ndarray,
    product_ids: Sequence[str],
    k: int,
    *,
    device: str = "cpu",
    progress: Progress | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per photo: the positions and similarities of its k nearest photos of other listings.

    One exact search for k + (the largest listing's photo count) neighbours is always enough: at
    most that many of them are the photo's own listing, itself included.
    """
    _, codes = np.unique(np.asarray(product_ids, dtype=object), return_inverse=True)
    largest = int(np.bincount(codes).max()) if len(codes) else 0
    scores, positions = search(embeddings, embeddings, k + largest, device=device, progress=progress)
    other = codes[positions] != codes[:, None]
    neighbours, similarities = [], []
    for row_positions, row_scores, keep in zip(positions, scores, other, strict=True):
        neighbours.append(row_positions[keep][:k])
        similarities.append(row_scores[keep][:k])
    return neighbours, similarities


def find_mislabelled(
    categories: Sequence[str],
    neighbours: Sequence[Sequence[int]],
    similarities: Sequence[Sequence[float]] | None = None,
    *,
    min_share: float = DEFAULT_MIN_SHARE,
) -> list[MislabelledPhoto]:
    """Photos whose neighbours are at least `min_share` in one other category, highest share first.

    The suggestion is the other category with the most neighbours (ties: the higher summed
    similarity, then the name).
    """
    found = []
    for position, row in enumerate(neighbours):
        if len(row) == 0:
            continue
        own = categories[position]
        row_similarities = similarities[position] if similarities is not None else [1.0] * len(row)
        counts: Counter[str] = Counter()
        summed: defaultdict[str, float] = defaultdict(float)
        for neighbour, similarity in zip(row, row_similarities, strict=True):
            category = categories[neighbour]
            counts[category] += 1
            summed[category] += float(similarity)
        others = [c for c in counts if c != own]
        if not others:
            continue
        best = min(others, key=lambda c: (-counts[c], -summed[c], c))
        if counts[best] / len(row) + 1e-9 < min_share:
            continue
        examples = tuple(int(n) for n in row if categories[n] == best)[:EXAMPLES]
        found.append(
            MislabelledPhoto(
                position,
                own,
                best,
                counts[best],
                counts[own],
                len(row),
                summed[best] / counts[best],
                examples,
            )
        )
    found.sort(key=lambda m: (-m.share, -m.mean_similarity, m.position))
    return found


def confusable_pairs(
    categories: Sequence[str],
    neighbours: Sequence[Sequence[int]],
    similarities: Sequence[Sequence[float]] | None = None,
) -> list[CategoryPair]:
    """Every pair of categories with at least one neighbour link between them, most mixed first."""
    photos = Counter(categories)
    links_from: Counter[str] = Counter()
    links: Counter[tuple[str, str]] = Counter()  # (from, to)
    examples: defaultdict[tuple[str, str], list[tuple[int, int, float]]] = defaultdict(list)
    for position, row in enumerate(neighbours):
        own = categories[position]
        links_from[own] += len(row)
        row_similarities = similarities[position] if similarities is not None else [1.0] * len(row)
        for neighbour, similarity in zip(row, row_similarities, strict=True):
            other = categories[neighbour]
            if other != own:
                links[own, other] += 1
                examples[tuple(sorted((own, other)))].append((position, int(neighbour), float(similarity)))
    pairs = []
    for a, b in sorted({tuple(sorted(key)) for key in links}):
        # One photo pair linked both ways is one example, not two.
        unique: dict[frozenset, tuple[int, int, float]] = {}
        for example in sorted(examples[a, b], key=lambda e: (-e[2], e[0], e[1])):
            unique.setdefault(frozenset(example[:2]), example)
        pairs.append(
            CategoryPair(
                a,
                b,
                photos[a],
                photos[b],
                links[a, b],
                links[b, a],
                links_from[a],
                links_from[b],
                tuple(unique.values())[:EXAMPLES],
            )
        )
    pairs.sort(key=lambda p: (-p.mix, -p.cross_links, p.category_a, p.category_b))
    return pairs


def _prepare_out(out: Path) -> None:
    """OUT must be new, empty, or an earlier audit (recognised by its mislabelled.csv)."""
    if prepare_out(out, MISLABELLED_FILE, "audit"):
        shutil.rmtree(out / THUMBS_DIR, ignore_errors=True)


def audit(
    index: str | Path | EmbeddingIndex,
    out: Path,
    *,
    k: int = DEFAULT_K,
    min_share: float = DEFAULT_MIN_SHARE,
    device: str = "auto",
    show_progress: bool = True,
) -> AuditResult:
    """Search every photo of INDEX against the rest; write the CSVs, thumbnails and report to OUT.

    `device` runs the all-pairs search: auto is the GPU when there is one (the whole index is
    copied there once), else the CPU.
    """
    if k < 1:
        raise StepError(f"k must be at least 1, got {k}")
    if not 0.0 < min_share <= 1.0:
        raise StepError(f"min share must be in (0, 1], got {min_share}")
    index = index if isinstance(index, EmbeddingIndex) else load_index(index)
    out = Path(out)
    if out.resolve() == index.directory.resolve():
        raise StepError("the audit output folder must not be the index folder")
    target = pick_device(device)
    _prepare_out(out)
    started = time.perf_counter()
    progress = Progress(len(index), "audit") if show_progress else None
    neighbours, similarities = other_listing_neighbours(
        index.embeddings, index.product_ids, k, device=str(target), progress=progress
    )
    if progress is not None:
        progress.close()
    mislabelled = find_mislabelled(index.categories, neighbours, similarities, min_share=min_share)
    pairs = confusable_pairs(index.categories, neighbours, similarities)
    result = AuditResult(
        out,
        len(index),
        len(set(index.categories)),
        k,
        min_share,
        mislabelled,
        pairs,
        time.perf_counter() - started,
    )
    write_report(index, result)
    result.seconds = time.perf_counter() - started
    return result


def summary(result: AuditResult) -> str:
    text = (
        f"audit: {result.photos} photos in {result.categories} categories, k={result.k}: "
        f"{len(result.mislabelled)} likely mislabelled (share >= {result.min_share:g}), "
        f"{len(result.pairs)} category pairs linked"
    )
    if result.pairs:
        top = result.pairs[0]
        text += f" (most mixed: {top.category_a} / {top.category_b}, mix {top.mix:.3f})"
    return text + f"; report in {result.out / REPORT_FILE}"
