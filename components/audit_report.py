"""The audit's files: both tables as CSV (every row) and report.md, readable, with thumbnails of the
top rows. Kept apart from the analysis in `audit.py`, which works on plain neighbour tables."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .embedding_index import EmbeddingIndex
from .images import ImageDecodeError, decode_image, encode_jpeg, shrink_to_fit
from .naming import atomic_write_bytes, atomic_write_text
from .step_output import csv_text

if TYPE_CHECKING:
    from .audit import AuditResult, CategoryPair, MislabelledPhoto

MISLABELLED_FILE = "mislabelled.csv"
PAIRS_FILE = "confusable_pairs.csv"
REPORT_FILE = "report.md"
THUMBS_DIR = "thumbs"
THUMB_SIZE = 96
REPORT_MISLABELLED = 100  # rows in report.md (the CSVs have all of them)
REPORT_PAIRS = 25


def write_report(index: EmbeddingIndex, result: AuditResult) -> None:
    """OUT/mislabelled.csv, OUT/confusable_pairs.csv, OUT/thumbs/ and OUT/report.md, each atomically."""
    out = Path(result.out)
    atomic_write_text(out / MISLABELLED_FILE, _mislabelled_csv(index, result.mislabelled))
    atomic_write_text(out / PAIRS_FILE, _pairs_csv(result.pairs))
    thumbs = _write_thumbnails(index, out / THUMBS_DIR, _report_positions(result.mislabelled, result.pairs))
    atomic_write_text(out / REPORT_FILE, render_report(index, result, thumbs))


def _mislabelled_csv(index: EmbeddingIndex, found: Sequence[MislabelledPhoto]) -> str:
    header = (
        "path",
        "category",
        "product_id",
        "suggested_category",
        "share",
        "suggested_count",
        "own_count",
        "neighbours",
        "mean_similarity",
        "nearest_in_suggested",
    )
    rows = [
        (
            index.paths[m.position],
            m.category,
            index.product_ids[m.position],
            m.suggested_category,
            f"{m.share:.3f}",
            m.suggested_count,
            m.own_count,
            m.neighbours,
            f"{m.mean_similarity:.4f}",
            ";".join(index.paths[e] for e in m.examples),
        )
        for m in found
    ]
    return csv_text(header, rows)


def _pairs_csv(pairs: Sequence[CategoryPair]) -> str:
    header = (
        "category_a",
        "category_b",
        "photos_a",
        "photos_b",
        "links_a_to_b",
        "links_b_to_a",
        "cross_links",
        "mix",
        "share_a_to_b",
        "share_b_to_a",
    )
    rows = [
        (
            p.category_a,
            p.category_b,
            p.photos_a,
            p.photos_b,
            p.links_a_to_b,
            p.links_b_to_a,
            p.cross_links,
            f"{p.mix:.4f}",
            f"{p.share_a_to_b:.4f}",
            f"{p.share_b_to_a:.4f}",
        )
        for p in pairs
    ]
    return csv_text(header, rows)


def _report_positions(mislabelled: Sequence[MislabelledPhoto], pairs: Sequence[CategoryPair]) -> set[int]:
    positions = set()
    for m in mislabelled[:REPORT_MISLABELLED]:
        positions.add(m.position)
        positions.update(m.examples)
    for p in pairs[:REPORT_PAIRS]:
        for photo, neighbour, _ in p.examples:
            positions.update((photo, neighbour))
    return positions


def _write_thumbnails(index: EmbeddingIndex, folder: Path, positions: set[int]) -> dict[int, str]:
    """Small JPEGs of the photos the report shows; returns position -> path relative to OUT.

    A photo that has moved or no longer decodes since the index was built just has no thumbnail.
    """
    thumbs = {}
    for position in sorted(positions):
        try:
            image = decode_image(index.photo_path(position).read_bytes(), fit=THUMB_SIZE).image
        except (OSError, ImageDecodeError):
            continue
        name = f"{position}.jpg"
        atomic_write_bytes(folder / name, encode_jpeg(shrink_to_fit(image, THUMB_SIZE)))
        thumbs[position] = f"{THUMBS_DIR}/{name}"
    return thumbs


def _md(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    for char in "\\`*_[]<>|":
        text = text.replace(char, "\\" + char)
    return text


def _photo_cell(index: EmbeddingIndex, position: int, thumbs: dict[int, str], *, caption: bool = True) -> str:
    label = _md(index.paths[position])
    image = f"![{label}]({thumbs[position]})" if position in thumbs else "(no thumbnail)"
    return f"{image}<br>{label}" if caption else image


def render_report(index: EmbeddingIndex, result: AuditResult, thumbs: dict[int, str]) -> str:
    """report.md: the parameters, then both tables with thumbnails (the top rows; the CSVs hold all)."""
    model = index.info.get("model", {})
    lines = [
        "# Similarity audit",
        "",
        f"- index: `{index.directory}` ({result.photos} photos in {result.categories} categories, "
        f"{index.dims}-d embeddings from {_md(str(model.get('arch', '?')))} at {model.get('image_size', '?')} px)",
        f"- photos under: `{index.data_root}`",
        f"- neighbours per photo: k = {result.k}, photos of the same listing (product id) left out",
        f"- likely mislabelled: at least {result.min_share:.0%} of a photo's neighbours in one other category",
        "",
        f"## Likely mislabelled listings: {len(result.mislabelled)}",
        "",
    ]
    if result.mislabelled:
        shown = result.mislabelled[:REPORT_MISLABELLED]
        if len(result.mislabelled) > len(shown):
            lines += [f"The {len(shown)} with the highest share; all are in `{MISLABELLED_FILE}`.", ""]
        lines += [
            "| photo | filed under | suggested | share of neighbours | nearest in the suggested category |",
            "|---|---|---|---|---|",
        ]
        for m in shown:
            nearest = " ".join(_photo_cell(index, e, thumbs, caption=False) for e in m.examples)
            lines.append(
                f"| {_photo_cell(index, m.position, thumbs)} | {_md(m.category)} | **{_md(m.suggested_category)}** "
                f"| {m.share:.0%} ({m.suggested_count}/{m.neighbours}; own {m.own_count}) | {nearest} |"
            )
    else:
        lines.append("None: no photo has most of its neighbours in one other category.")
    lines += [
        "",
        f"## Categories that mix most: {len(result.pairs)} pairs linked",
        "",
        "`mix` = cross-category neighbour links / all neighbour links of both categories' photos. "
        "Both directions high: the two categories look alike (merge them, or the model cannot tell "
        "them apart). One direction high: part of one category looks like the other (a sub-group to "
        "split out, or misfiled listings).",
        "",
    ]
    if result.pairs:
        shown_pairs = result.pairs[:REPORT_PAIRS]
        if len(result.pairs) > len(shown_pairs):
            lines += [f"The {len(shown_pairs)} most mixed; all are in `{PAIRS_FILE}`.", ""]
        lines += [
            "| category A | category B | photos A / B | links A→B | links B→A | mix | most similar cross pairs |",
            "|---|---|---|---|---|---|---|",
        ]
        for p in shown_pairs:
            examples = " ".join(
                f"{_photo_cell(index, a, thumbs, caption=False)}{_photo_cell(index, b, thumbs, caption=False)}"
                f" {s:.3f}"
                for a, b, s in p.examples
            )
            lines.append(
                f"| {_md(p.category_a)} | {_md(p.category_b)} | {p.photos_a} / {p.photos_b} "
                f"| {p.links_a_to_b} ({p.share_a_to_b:.0%}) | {p.links_b_to_a} ({p.share_b_to_a:.0%}) "
                f"| {p.mix:.3f} | {examples} |"
            )
    else:
        lines.append("None: every photo's neighbours are in its own category.")
    return "\n".join(lines) + "\n"
