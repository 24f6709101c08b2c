"""The audit's files: both tables as CSV (every row), report.md with thumbnails of the top rows, and
report.html, where a person reviews the likely mislabelled listings. Kept apart from the analysis in
`audit.py`, which works on plain neighbour tables.

report.html is self-contained (thumbnails embedded) so the MLflow UI shows it inline. A reviewer ticks
the listings whose suggested category is right and the page itself builds `corrections.csv`
(`data.corrections.CORRECTIONS_HEADER`), which `shopvision clean --corrections` applies: the review needs
no server that writes anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..data.images import ImageDecodeError, decode_image, encode_jpeg, shrink_to_fit
from ..data.naming import atomic_write_bytes, atomic_write_text
from ..evaluation.report_html import data_uri, esc, img, page
from ..step_output import csv_text
from .embedding_index import EmbeddingIndex
from .findings import AuditResult, CategoryPair, MislabelledPhoto

MISLABELLED_FILE = "mislabelled.csv"
PAIRS_FILE = "confusable_pairs.csv"
REPORT_FILE = "report.md"
HTML_REPORT_FILE = "report.html"
THUMBS_DIR = "thumbs"
THUMB_SIZE = 96
REPORT_MISLABELLED = 100  # rows in report.md (the CSVs have all of them)
REPORT_PAIRS = 25
REVIEW_ROWS = 1000  # mislabelled rows a reviewer can tick in report.html (thumbnails for the first 100)


def write_report(index: EmbeddingIndex, result: AuditResult) -> None:
    """OUT/mislabelled.csv, OUT/confusable_pairs.csv, OUT/thumbs/, OUT/report.md and OUT/report.html,
    each atomically."""
    out = Path(result.out)
    atomic_write_text(out / MISLABELLED_FILE, _mislabelled_csv(index, result.mislabelled))
    atomic_write_text(out / PAIRS_FILE, _pairs_csv(result.pairs))
    thumbs = _write_thumbnails(index, out / THUMBS_DIR, _report_positions(result.mislabelled, result.pairs))
    atomic_write_text(out / REPORT_FILE, render_report(index, result, thumbs))
    embedded = {
        position: data_uri((out / path).read_bytes(), "image/jpeg") for position, path in thumbs.items()
    }
    atomic_write_text(out / HTML_REPORT_FILE, render_html_report(index, result, embedded))


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


# --- report.html -----------------------------------------------------------------------------------

REVIEW_SCRIPT = r"""
(function () {
  // Builds corrections.csv from the ticked rows; nothing leaves the page.
  var boxes = Array.prototype.slice.call(document.querySelectorAll("input.fix"));
  var text = document.getElementById("corrections-text");
  var count = document.getElementById("ticked");
  var button = document.getElementById("download");
  function field(value) {
    return /[",\r\n]/.test(value) ? '"' + value.replace(/"/g, '""') + '"' : value;
  }
  function csv() {
    var lines = ["photo,category,corrected_category"];
    boxes.forEach(function (box) {
      if (!box.checked) return;
      var row = box.closest("tr").dataset;
      lines.push([row.photo, row.category, row.suggested].map(field).join(","));
    });
    return lines.join("\n") + "\n";
  }
  function update() {
    var ticked = boxes.filter(function (box) { return box.checked; }).length;
    count.textContent = ticked + (ticked === 1 ? " listing" : " listings") + " ticked";
    text.value = csv();
    button.disabled = ticked === 0;
  }
  boxes.forEach(function (box) { box.addEventListener("change", update); });
  document.getElementById("tick-none").addEventListener("click", function () {
    boxes.forEach(function (box) { box.checked = false; });
    update();
  });
  button.addEventListener("click", function () {
    var url = URL.createObjectURL(new Blob([csv()], { type: "text/csv" }));
    var link = document.createElement("a");
    link.href = url;
    link.download = "corrections.csv";
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(function () { URL.revokeObjectURL(url); }, 60000);
  });
  update();
})();
"""

REVIEW_STYLE = """<style>
.review { position: sticky; top: 0; background: #fff; padding: 6px 0; border-bottom: 1px solid var(--line);
  display: flex; flex-wrap: wrap; gap: 8px; align-items: center; z-index: 1; }
.review button { font: inherit; padding: 6px 12px; }
textarea#corrections-text { width: 100%; max-width: 90ch; height: 6em; font: 12px monospace; }
td.tick input { width: 22px; height: 22px; }
</style>"""


def render_html_report(index: EmbeddingIndex, result: AuditResult, thumbs: dict[int, str]) -> str:
    """report.html: the parameters, the mislabelled listings to review (tick, download
    corrections.csv), the categories that mix; `thumbs` maps index positions to data URIs."""
    model = index.info.get("model", {})

    def photo(position: int, caption: bool = True) -> str:
        name = index.paths[position]
        picture = img(thumbs.get(position), name)
        return f'{picture}<div class="file">{esc(name)}</div>' if caption else picture

    parts = [
        REVIEW_STYLE,
        "<h1>Catalogue audit: likely mislabelled listings</h1>",
        f'<p class="muted">{result.photos} photos in {result.categories} categories under '
        f"<code>{esc(index.data_root)}</code>, {index.dims}-d embeddings from "
        f"{esc(model.get('arch', '?'))} at {esc(model.get('image_size', '?'))} px. A photo is listed when "
        f"at least {result.min_share:.0%} of its {result.k} nearest photos of other listings are in one "
        "other category, which is suggested.</p>",
        f"<h2>Likely mislabelled listings: {len(result.mislabelled)}</h2>",
    ]
    shown = result.mislabelled[:REVIEW_ROWS]
    if not shown:
        parts.append("<p>None: no photo has most of its neighbours in one other category.</p>")
    else:
        if len(result.mislabelled) > len(shown):
            parts.append(f"<p>The {len(shown)} with the highest share; all are in {MISLABELLED_FILE}.</p>")
        parts.append(
            '<p class="note">Tick the listings whose suggested category is right, then download '
            "<code>corrections.csv</code> and apply it with <code>shopvision clean RAW OUT --corrections "
            "corrections.csv</code>. If the download "
            "is blocked (the MLflow UI shows this page in a sandbox), download the report file itself and "
            "open it, or copy the text under the table.</p>"
            '<div class="review"><span id="ticked">0 listings ticked</span>'
            '<button type="button" id="download">Download corrections.csv</button>'
            '<button type="button" id="tick-none">Untick all</button></div>'
        )
        rows = []
        for number, m in enumerate(shown):
            nearest = " ".join(photo(e, caption=False) for e in m.examples)
            rows.append(
                f'<tr data-photo="{esc(index.paths[m.position])}" data-category="{esc(m.category)}" '
                f'data-suggested="{esc(m.suggested_category)}"><td class="tick"><input type="checkbox" '
                f'class="fix" id="fix-{number}" aria-label="move to {esc(m.suggested_category)}"></td>'
                f"<td>{photo(m.position)}</td><td>{esc(m.category)}</td>"
                f"<td><b>{esc(m.suggested_category)}</b></td>"
                f'<td class="num">{m.share:.0%}<div class="file">{m.suggested_count}/{m.neighbours}; '
                f"own {m.own_count}</div></td><td>{nearest}</td></tr>"
            )
        parts.append(
            '<div class="scroll"><table id="mislabelled"><tr><th>right?</th><th>photo</th><th>filed under</th>'
            "<th>suggested</th><th>share of neighbours</th><th>nearest in the suggested category</th></tr>"
            f"{''.join(rows)}</table></div>"
            '<p><label for="corrections-text">corrections.csv</label></p>'
            '<textarea id="corrections-text" readonly></textarea>'
        )
    parts.append(f"<h2>Categories that mix most: {len(result.pairs)} pairs linked</h2>")
    if result.pairs:
        rows = []
        for p in result.pairs[:REPORT_PAIRS]:
            examples = " ".join(
                f"{photo(a, caption=False)}{photo(b, caption=False)} {s:.3f}" for a, b, s in p.examples
            )
            rows.append(
                f"<tr><td>{esc(p.category_a)}</td><td>{esc(p.category_b)}</td>"
                f'<td class="num">{p.photos_a} / {p.photos_b}</td>'
                f'<td class="num">{p.links_a_to_b} ({p.share_a_to_b:.0%})</td>'
                f'<td class="num">{p.links_b_to_a} ({p.share_b_to_a:.0%})</td>'
                f'<td class="num">{p.mix:.3f}</td><td>{examples}</td></tr>'
            )
        parts.append(
            '<p class="muted">mix: cross-category links over all links of both categories. Both directions '
            "high: the two look alike (merge them). One direction high: part of one looks like the other "
            "(a sub-group to split out, or misfiled listings).</p>"
            '<div class="scroll"><table id="pairs"><tr><th>category A</th><th>category B</th><th>photos A / B'
            "</th><th>links A→B</th><th>links B→A</th><th>mix</th><th>most similar cross pairs</th></tr>"
            f"{''.join(rows)}</table></div>"
        )
    else:
        parts.append("<p>None: every photo's neighbours are in its own category.</p>")
    return page("Catalogue audit", "\n".join(parts), REVIEW_SCRIPT if shown else "")


def log_audit_report(run_id: str, out: Path, tracking_uri: str | None = None) -> None:
    """The audit's files (report.html, report.md, both CSVs) to an MLflow run, under `audit/`, so the
    MLflow UI shows report.html inline next to the evaluation's report."""
    from mlflow import MlflowClient

    from ..errors import StepError
    from ..training.tracking import check_tracking_server
    from ..training.train_record import resolve_tracking_uri

    uri = check_tracking_server(resolve_tracking_uri(tracking_uri))
    client = MlflowClient(tracking_uri=uri)
    try:
        client.get_run(run_id)
    except Exception as exc:
        raise StepError(f"MLflow run {run_id} not found at {uri}: {str(exc).splitlines()[0]}") from None
    for name in (HTML_REPORT_FILE, REPORT_FILE, MISLABELLED_FILE, PAIRS_FILE):
        if (Path(out) / name).is_file():
            client.log_artifact(run_id, str(Path(out) / name), artifact_path="audit")
