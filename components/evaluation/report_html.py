"""What the HTML reports share (evaluate's `report.py` here, the audit's `similarity/audit_report.py`,
which sits above evaluation and imports it): one self-contained page (CSS inline, photos and figures as data URIs),
escaping, number formats, thumbnails and top-5 bars.

Self-contained because the MLflow UI shows an HTML artifact inside a sandboxed frame made from the
file's text alone: a relative `<img src="thumbs/1.jpg">` would not load there, an embedded one does.
Nothing here reaches the network (no CDN, no web font), so a report opens the same offline.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

from ..data.images import ImageDecodeError, decode_image, shrink_to_fit

THUMB_SIZE = 112  # pixels of the longer side: sharp at the 72 px shown on a 1.5x screen
THUMB_QUALITY = 70  # a report holds a hundred or more of them; they are for recognising, not judging

STYLE = """
:root { --ink: #1d2430; --muted: #5b6473; --line: #d9dde3; --bar: #3b6fd8; --bad: #b3261e;
  --ok: #1e7b34; --warn: #8a5a00; --soft: #f4f6f9; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
  margin: 0 auto; padding: 12px; max-width: 1180px; }
h1 { font-size: 1.45rem; margin: .3em 0; } h2 { font-size: 1.15rem; margin: 1.6em 0 .4em;
  border-bottom: 1px solid var(--line); padding-bottom: .2em; }
p, li { max-width: 75ch; } .muted { color: var(--muted); } code { font-size: .9em; overflow-wrap: anywhere; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: .4em 0; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
img.figure { max-width: 100%; height: auto; border: 1px solid var(--line); }
img.thumb { width: 72px; height: 72px; object-fit: cover; border-radius: 4px; border: 1px solid var(--line);
  background: var(--soft); }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr)); gap: 10px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 8px; display: flex; gap: 8px; }
.card .body { flex: 1; min-width: 0; } .file { font-size: .8em; color: var(--muted); word-break: break-all; }
ol.top { list-style: none; padding: 0; margin: 4px 0 0; }
ol.top li { display: grid; grid-template-columns: minmax(0, 1fr) 3.4em; gap: 0 6px; font-size: .85em; }
ol.top .name { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
ol.top .p { text-align: right; font-variant-numeric: tabular-nums; }
ol.top .bar { grid-column: 1 / 3; height: 4px; background: var(--soft); border-radius: 2px; margin-bottom: 3px; }
ol.top .bar span { display: block; height: 100%; background: var(--bar); border-radius: 2px; }
ol.top li.true .name { font-weight: 700; color: var(--ok); }
.badge { display: inline-block; font-size: .75em; padding: 0 6px; border-radius: 9px; border: 1px solid; }
.badge.bad { color: var(--bad); } .badge.ok { color: var(--ok); } .badge.warn { color: var(--warn); }
.note { background: var(--soft); border-left: 4px solid var(--bar); padding: 6px 10px; max-width: 90ch; }
.note.warn { border-color: var(--warn); }
"""


def esc(value: object) -> str:
    """Text safe in HTML content and in double-quoted attributes."""
    return html.escape(str(value), quote=True)


def percent(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value * 100:.{digits}f}%"


def data_uri(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def figure_uri(path: Path) -> str | None:
    """A PNG written next to the report, as a data URI (None when it is not there)."""
    try:
        return data_uri(Path(path).read_bytes(), "image/png")
    except OSError:
        return None


def thumbnail_uri(path: Path, size: int = THUMB_SIZE) -> str | None:
    """A small JPEG of a photo as a data URI; None for a photo that moved or no longer decodes (the
    report then shows its name only, rather than failing after all the work was done)."""
    try:
        image = decode_image(Path(path).read_bytes(), fit=size).image
    except (OSError, ImageDecodeError):
        return None
    buffer = io.BytesIO()
    shrink_to_fit(image, size).save(buffer, format="JPEG", quality=THUMB_QUALITY)
    return data_uri(buffer.getvalue(), "image/jpeg")


def img(uri: str | None, alt: str, css: str = "thumb") -> str:
    if uri is None:
        return f'<span class="{css} muted" title="{esc(alt)}">(no photo)</span>'
    return f'<img class="{css}" src="{uri}" alt="{esc(alt)}" title="{esc(alt)}">'


def top_list(top: Sequence[tuple[str, float]], true_category: str | None = None) -> str:
    """The top-k categories with probability bars; the true category, when among them, in bold."""
    items = []
    for label, probability in top:
        mark = ' class="true"' if label == true_category else ""
        width = max(0.0, min(100.0, probability * 100))
        items.append(
            f'<li{mark} data-label="{esc(label)}" data-probability="{probability:.6f}">'
            f'<span class="name">{esc(label)}</span><span class="p">{percent(probability)}</span>'
            f'<span class="bar"><span style="width:{width:.1f}%"></span></span></li>'
        )
    return f'<ol class="top">{"".join(items)}</ol>'


def page(title: str, body: str, script: str = "") -> str:
    """A whole HTML document: viewport for phones, the shared style, BODY, then SCRIPT if any."""
    tail = f"<script>\n{script}\n</script>\n" if script else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{STYLE}</style></head>\n"
        f"<body>\n{body}\n{tail}</body></html>\n"
    )
