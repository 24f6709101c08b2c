"""evaluate's report.html: what an engineer deciding on promotion wants to see, in one file.

Built only from what `evaluate` already wrote to OUT (metrics.json, predictions.csv, coverage.csv,
confusion_matrix.png) plus thumbnails of the test photos, so it never disagrees with those files and
can be rebuilt for an old evaluation folder. Every number in its tables carries `data-metric` (the
key path into metrics.json, as JSON) and `data-value`, so a test can check it against metrics.json.

The file is self-contained (see `report_html`), so the MLflow UI shows it inline once `log_to_run`
logs it with the other files of OUT.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data.naming import atomic_write_text
from .outputs import (
    CONFUSION_PNG,
    COVERAGE_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
)
from .report_html import esc, figure_uri, img, page, percent, thumbnail_uri, top_list

REPORT_FILE = "report.html"
CONFUSED_PAIRS_SHOWN = 10
EXAMPLES_PER_PAIR = 4
WRONG_SHOWN = 24
LOWEST_SHOWN = 12
MATRIX_TABLE_UP_TO = 20  # categories; beyond, the PNG's heat map and the pair list say it better


@dataclass(frozen=True)
class TestPhoto:
    true_category: str
    file: str  # relative to the test folder
    top: tuple[tuple[str, float], ...]  # best first

    @property
    def correct(self) -> bool:
        return self.top[0][0] == self.true_category

    @property
    def confidence(self) -> float:
        return self.top[0][1]


def read_predictions(path: Path) -> list[TestPhoto]:
    """predictions.csv as evaluate writes it: true_category, product_id, file, correct, predicted_r, probability_r."""
    photos = []
    with Path(path).open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            top, rank = [], 1
            while row.get(f"predicted_{rank}"):
                top.append((row[f"predicted_{rank}"], float(row[f"probability_{rank}"])))
                rank += 1
            photos.append(TestPhoto(row["true_category"], row["file"], tuple(top)))
    return photos


def read_coverage(path: Path) -> list[tuple[float, float, float | None]]:
    """coverage.csv as (threshold, coverage, accuracy or None)."""
    with Path(path).open(newline="", encoding="utf-8") as handle:
        return [
            (float(r["threshold"]), float(r["coverage"]), float(r["accuracy"]) if r["accuracy"] else None)
            for r in csv.DictReader(handle)
        ]


def write_evaluation_report(out: Path, test_dir: Path | Mapping[str, Path]) -> Path:
    """OUT/report.html from the files evaluate wrote to OUT and the test photos; returns its path.

    TEST_DIR is the folder the predictions' file names are relative to, or {file name: photo} for
    photos that lie elsewhere (a manifest's references)."""
    out = Path(out)
    metrics = json.loads((out / METRICS_FILE).read_text(encoding="utf-8"))
    photos = read_predictions(out / PREDICTIONS_FILE)
    curve = read_coverage(out / COVERAGE_FILE)
    thumbs = _Thumbnails(test_dir if isinstance(test_dir, Mapping) else Path(test_dir))
    html = render_evaluation_report(metrics, photos, curve, figure_uri(out / CONFUSION_PNG), thumbs)
    atomic_write_text(out / REPORT_FILE, html)
    return out / REPORT_FILE


class _Thumbnails:
    """Thumbnails of test photos, each made once however many sections show it."""

    def __init__(self, test_dir: Path | Mapping[str, Path]) -> None:
        self.test_dir, self.made = test_dir, {}

    def __call__(self, file: str) -> str | None:
        if file not in self.made:
            if isinstance(self.test_dir, Mapping):
                path = self.test_dir.get(file)
                self.made[file] = thumbnail_uri(path) if path is not None else None
            else:
                self.made[file] = thumbnail_uri(self.test_dir / file)
        return self.made[file]


def _value(metrics: Mapping, keys: Sequence[str | int]):
    value = metrics
    for key in keys:
        value = value[key]
    return value


def _cell(metrics: Mapping, *keys: str | int, kind: str = "share") -> str:
    """A table cell showing metrics[k1][k2]..., tagged with its key path and exact value."""
    value = _value(metrics, keys)
    if value is None:
        text = "n/a"
    elif kind == "share":
        text = percent(value)
    elif kind == "threshold":
        text = f"{value:.2f}"
    else:
        text = str(value)
    return (
        f"<td class=\"num\" data-metric='{esc(json.dumps(list(keys)))}' "
        f"data-value='{esc(json.dumps(value))}'>{text}</td>"
    )


def render_evaluation_report(
    metrics: Mapping,
    photos: Sequence[TestPhoto],
    curve: Sequence[tuple[float, float, float | None]],
    confusion_png: str | None,
    thumb: Callable[[str], str | None],
) -> str:
    """The whole page; `thumb(file)` gives a test photo's data URI (or None)."""
    counts = metrics["counts"]
    served = metrics["coverage"]["served_threshold"]
    sections = [
        f"<h1>Evaluation: {esc(metrics.get('arch', 'model'))} on {counts['images']} test photos</h1>",
        '<p class="muted">model <code>'
        f"{esc(metrics.get('model', '?'))}</code> · test photos <code>{esc(metrics.get('test_dir', '?'))}"
        f"</code> · {counts['model_categories']} model categories, {counts['test_categories']} in the test "
        "set. Every photo with all its top-5 is in <code>predictions.csv</code>.</p>",
        _headline(metrics),
        _threshold(metrics, curve),
        _per_category(metrics),
        _confusion(metrics, photos, confusion_png, thumb),
        _photo_section(
            "Wrongly predicted test photos",
            "wrong",
            sorted((p for p in photos if not p.correct), key=lambda p: (-p.confidence, p.file)),
            WRONG_SHOWN,
            "most confident mistakes first: these are the ones the threshold does not catch",
            served,
            thumb,
        ),
        _photo_section(
            "Lowest-confidence test photos",
            "lowest",
            sorted(photos, key=lambda p: (p.confidence, p.file)),
            LOWEST_SHOWN,
            f"least sure first; under the served threshold {served:.2f} the server flags them not confident",
            served,
            thumb,
        ),
        _macro(metrics),
        _unreadable(metrics),
    ]
    return page(f"Evaluation report: {metrics.get('arch', '')}", "\n".join(s for s in sections if s))


def _headline(metrics: Mapping) -> str:
    rows = [
        ("top-1 accuracy", ("top1_accuracy",), "share"),
        ("top-5 accuracy", ("top5_accuracy",), "share"),
        ("macro F1", ("macro_avg", "f1"), "share"),
        ("macro precision", ("macro_avg", "precision"), "share"),
        ("macro recall", ("macro_avg", "recall"), "share"),
        ("weighted F1", ("weighted_avg", "f1"), "share"),
    ]
    if "macro_category" in metrics:
        rows.append(("macro-category accuracy", ("macro_category", "accuracy"), "share"))
    rows.append(("test photos", ("counts", "images"), "count"))
    if "unreadable" in metrics["counts"]:
        rows.append(("unreadable files (skipped)", ("counts", "unreadable"), "count"))
    body = "".join(f"<tr><th>{name}</th>{_cell(metrics, *keys, kind=kind)}</tr>" for name, keys, kind in rows)
    return f'<h2>Headline metrics</h2><table id="headline">{body}</table>'


def threshold_provenance(metrics: Mapping) -> tuple[str, bool]:
    """Where the served threshold comes from, in words; True when it is only the server's default."""
    coverage = metrics["coverage"]
    chosen = coverage.get("chosen_on") or {}
    if coverage.get("confidence_threshold") is not None:
        return (
            f"chosen on {chosen.get('images', '?')} validation photos: the lowest threshold at which the "
            f"{chosen.get('covered', '?')} of them at least that sure reach the target of "
            f"{percent(coverage['target_accuracy'])} top-1 accuracy "
            f"(they reach {percent(chosen.get('accuracy'))}); it travels with the model as "
            "confidence_threshold",
            False,
        )
    why = chosen.get("warning") or f"no threshold reaches {coverage['target_accuracy']:g} accuracy"
    return (f"the server default, since none was chosen on validation photos: {why}", True)


def _threshold(metrics: Mapping, curve) -> str:
    coverage = metrics["coverage"]
    text, default = threshold_provenance(metrics)
    table = (
        '<table id="coverage">'
        f"<tr><th>served threshold</th>{_cell(metrics, 'coverage', 'served_threshold', kind='threshold')}</tr>"
        f"<tr><th>target accuracy</th>{_cell(metrics, 'coverage', 'target_accuracy')}</tr>"
        f"<tr><th>test photos at least that sure</th>{_cell(metrics, 'coverage', 'covered', kind='count')}</tr>"
        f"<tr><th>coverage on test</th>{_cell(metrics, 'coverage', 'coverage')}</tr>"
        f"<tr><th>accuracy on them</th>{_cell(metrics, 'coverage', 'accuracy')}</tr></table>"
    )
    return (
        "<h2>Confidence threshold and coverage</h2>"
        f'<p class="note{" warn" if default else ""}" id="threshold-source">Threshold '
        f"<b>{coverage['served_threshold']:.2f}</b>: {esc(text)}. The server answers "
        "<code>confident: false</code> for a photo whose top probability is under it.</p>"
        f"{table}{coverage_svg(curve, coverage['target_accuracy'], coverage['served_threshold'])}"
        '<p class="muted">Measured on the test photos. Coverage: the share of test photos whose top '
        "probability reaches the threshold; accuracy: top-1 accuracy on those.</p>"
    )


def coverage_svg(curve, target_accuracy: float, threshold: float) -> str:
    """Coverage and accuracy against the threshold as an inline SVG, with the target and the served
    threshold marked: drawn here rather than embedded, so it stays sharp at any width."""
    if not curve:
        return ""
    width, height, left, bottom, top, right = 640, 300, 44, 36, 10, 14
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(t: float) -> float:
        return left + t * plot_w

    def y(v: float) -> float:
        return top + (1 - v) * plot_h

    def line(points, colour: str, name: str) -> str:
        path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in points)
        return f'<polyline class="{name}" fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>'

    grid = "".join(
        f'<line x1="{left}" x2="{width - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#e3e6ea"/>'
        f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.1f}</text>'
        for v in (0, 0.2, 0.4, 0.6, 0.8, 1.0)
    ) + "".join(
        f'<text x="{x(t):.1f}" y="{height - bottom + 16}" text-anchor="middle">{t:.1f}</text>'
        for t in (0, 0.2, 0.4, 0.6, 0.8, 1.0)
    )
    coverage_line = line([(t, c) for t, c, _ in curve], "#3b6fd8", "coverage")
    accuracy_line = line([(t, a) for t, _, a in curve if a is not None], "#d8683b", "accuracy")
    marks = (
        f'<line x1="{left}" x2="{width - right}" y1="{y(target_accuracy):.1f}" y2="{y(target_accuracy):.1f}" '
        'stroke="#777" stroke-dasharray="5 4"/>'
        f'<line x1="{x(threshold):.1f}" x2="{x(threshold):.1f}" y1="{top}" y2="{top + plot_h}" '
        'stroke="#b3261e" stroke-width="1.5" stroke-dasharray="2 3"/>'
        f'<text x="{x(threshold) + 4:.1f}" y="{top + plot_h - 6}" fill="#b3261e">threshold {threshold:.2f}</text>'
    )
    legend = (
        f'<text x="{left + 6}" y="{height - 4}"><tspan fill="#3b6fd8">━ coverage</tspan>  '
        '<tspan fill="#d8683b">━ accuracy on the covered photos</tspan>  '
        f'<tspan fill="#777">┄ target {target_accuracy:g}</tspan> · x: confidence threshold</text>'
    )
    return (
        f'<svg id="coverage-curve" viewBox="0 0 {width} {height}" width="100%" style="max-width:{width}px" '
        'role="img" aria-label="coverage and accuracy against the confidence threshold" '
        'font-size="11" font-family="system-ui, sans-serif">'
        f"{grid}{coverage_line}{accuracy_line}{marks}{legend}</svg>"
    )


def _per_category(metrics: Mapping) -> str:
    rows = []
    for category, row in metrics["per_category"].items():
        if not row["support"] and not row.get("predicted"):
            continue
        cells = "".join(
            _cell(metrics, "per_category", category, key, kind="share" if key != "support" else "count")
            for key in ("precision", "recall", "f1", "support")
        )
        rows.append(f"<tr><th>{esc(category)}</th>{cells}</tr>")
    return (
        '<h2>Per category</h2><div class="scroll"><table id="per-category"><tr><th>category</th>'
        '<th class="num">precision</th><th class="num">recall</th><th class="num">F1</th>'
        f'<th class="num">test photos</th></tr>{"".join(rows)}</table></div>'
    )


def _confusion(metrics: Mapping, photos: Sequence[TestPhoto], confusion_png: str | None, thumb) -> str:
    parts = ["<h2>Confusion matrix</h2>"]
    if confusion_png:
        parts.append(img(confusion_png, "confusion matrix, row-normalised", "figure"))
    parts.append(_matrix_table(photos))
    pairs = metrics.get("top_confusions", [])[:CONFUSED_PAIRS_SHOWN]
    parts.append("<h2>Most confused category pairs</h2>")
    if not pairs:
        parts.append("<p>None: every test photo's top-1 is its own category.</p>")
        return "".join(parts)
    rows = []
    for i, pair in enumerate(pairs):
        true, predicted = pair["true_category"], pair["predicted_category"]
        examples = [p for p in photos if p.true_category == true and p.top[0][0] == predicted]
        shown = " ".join(img(thumb(p.file), p.file) for p in examples[:EXAMPLES_PER_PAIR])
        rows.append(
            f"<tr><td>{esc(true)}</td><td>{esc(predicted)}</td>"
            f"{_cell(metrics, 'top_confusions', i, 'count', kind='count')}"
            f"{_cell(metrics, 'top_confusions', i, 'share')}<td>{shown}</td></tr>"
        )
    parts.append(
        '<div class="scroll"><table id="confused-pairs"><tr><th>true category</th><th>taken for</th>'
        '<th class="num">photos</th><th class="num">share of the true category</th><th>examples</th></tr>'
        f"{''.join(rows)}</table></div>"
    )
    return "".join(parts)


def _matrix_table(photos: Sequence[TestPhoto]) -> str:
    """Counts, rows true and columns predicted (top-1), when few enough categories fit a screen."""
    categories = sorted({p.true_category for p in photos} | {p.top[0][0] for p in photos})
    if len(categories) > MATRIX_TABLE_UP_TO:
        return ""
    cells = Counter((p.true_category, p.top[0][0]) for p in photos)
    head = "".join(f'<th class="num" title="{esc(c)}">{esc(c[:10])}</th>' for c in categories)
    rows = []
    for true in categories:
        row = "".join(
            f'<td class="num"{" style=font-weight:700" if true == predicted else ""}>'
            f"{cells.get((true, predicted), 0) or ''}</td>"
            for predicted in categories
        )
        rows.append(f"<tr><th>{esc(true)}</th>{row}</tr>")
    return (
        '<div class="scroll"><table id="confusion-counts"><tr><th>true ↓ / predicted →</th>'
        f"{head}</tr>{''.join(rows)}</table></div>"
    )


def _photo_section(title, key, photos, limit, why, threshold, thumb) -> str:
    if not photos:
        return f"<h2>{esc(title)}</h2><p>None.</p>"
    shown = photos[:limit]
    more = f" The {len(photos) - limit} others are in predictions.csv." if len(photos) > limit else ""
    cards = []
    for p in shown:
        verdict = (
            '<span class="badge ok">right</span>' if p.correct else '<span class="badge bad">wrong</span>'
        )
        if p.confidence < threshold:
            verdict += ' <span class="badge warn">not confident</span>'
        cards.append(
            f'<div class="card" data-file="{esc(p.file)}">{img(thumb(p.file), p.file)}<div class="body">'
            f'<div>{esc(p.true_category)} {verdict}</div><div class="file">{esc(p.file)}</div>'
            f"{top_list(p.top, p.true_category)}</div></div>"
        )
    return (
        f'<h2>{esc(title)}: {len(photos)}</h2><p class="muted">{esc(why)}; the true category in bold '
        f'when it is among the top-5.{more}</p><div class="cards" id="{key}">{"".join(cards)}</div>'
    )


def _macro(metrics: Mapping) -> str:
    if "macro_category" not in metrics:
        return (
            '<h2>Macro-category accuracy</h2><p class="muted">No taxonomy was given '
            "(<code>--taxonomy CSV</code>).</p>"
        )
    rows = "".join(
        f"<tr><th>{esc(macro)}</th>"
        f"{_cell(metrics, 'macro_category', 'per_macro_category', macro, 'support', kind='count')}"
        f"{_cell(metrics, 'macro_category', 'per_macro_category', macro, 'correct', kind='count')}"
        f"{_cell(metrics, 'macro_category', 'per_macro_category', macro, 'accuracy')}</tr>"
        for macro in metrics["macro_category"]["per_macro_category"]
    )
    return (
        "<h2>Macro-category accuracy</h2><p>A mistake inside one macro category (one apple for another) "
        f"counts as right here: {percent(metrics['macro_category']['accuracy'])} overall.</p>"
        '<div class="scroll"><table id="macro-category"><tr><th>macro category</th><th class="num">photos'
        '</th><th class="num">right</th><th class="num">accuracy</th></tr>'
        f"{rows}</table></div>"
    )


def _unreadable(metrics: Mapping) -> str:
    files = metrics.get("unreadable") or []
    if not files:
        return ""
    items = "".join(f"<li><code>{esc(u['file'])}</code>: {esc(u['reason'])}</li>" for u in files[:50])
    return f"<h2>Unreadable test files: {len(files)}</h2><ul>{items}</ul>"
