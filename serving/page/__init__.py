"""The photo-check page at `/` of the prediction server, for people with a browser.

Plain HTML, CSS and JavaScript shipped as package data beside this file: no build step, no CDN, no
process of its own. The page calls the server's own routes (`/` as JSON, `/v2/models/NAME`,
`/predict`, `/similar`) with relative URLs, so it works behind a path prefix too, and meets the same
limits as any client. A browser asking for `/` (Accept: text/html) gets the page; curl, probes and
scripts keep getting the JSON index.

`GET /similar/photo?path=P` gives a small JPEG of one photo of the `--similar-index`, so the page
can show the neighbours it lists. Only paths the index holds are served (never a path the client
makes up), decoded under the server's pixel limit on the decoding threads (only shrunk, so the
aspect-ratio bound is not needed), one photo admitted like any other.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, Response

from ..handling import ApiError, in_thread

if TYPE_CHECKING:
    from ..state import ServingState

HERE = Path(__file__).resolve().parent
ASSETS = {"page.css": "text/css; charset=utf-8", "page.js": "text/javascript; charset=utf-8"}
HTML_TYPES = ("text/html", "application/xhtml+xml")
THUMB_SIZE = 160
THUMB_MAX_FILE_BYTES = 64 * 2**20  # a catalogue file larger than this is not read for a thumbnail
THUMB_CACHE = 512  # thumbnails kept (~5 KB each): every page asking for a neighbour asks again
# The page loads only what this server serves; blob: shows the photos being checked before upload.
HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
    "script-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'self'",
    "x-content-type-options": "nosniff",
    "cache-control": "no-cache",
}


def _quality(accept: str, types: tuple[str, ...]) -> float:
    best = 0.0
    for item in accept.split(","):
        media, *params = (part.strip() for part in item.split(";"))
        if media.lower() not in types:
            continue
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        best = max(best, quality)
    return best


def wants_html(request: Request) -> bool:
    """True when the client prefers HTML to JSON (a browser); `*/*` (curl) and JSON clients do not."""
    accept = request.headers.get("accept", "")
    return _quality(accept, HTML_TYPES) > _quality(accept, ("application/json",))


def page_response() -> HTMLResponse:
    """The page itself (read per request: a few KB, and an edited page shows without a restart)."""
    return HTMLResponse((HERE / "index.html").read_text(encoding="utf-8"), headers=HEADERS)


def catalogue_thumbnail(path: Path, max_pixels: int) -> bytes | None:
    """A JPEG of at most THUMB_SIZE px of one catalogue photo; None when it is missing or unreadable
    here (an index built elsewhere carries its embeddings, not its photos)."""
    from shopvision.components.data.images import ImageDecodeError, decode_image, shrink_to_fit

    try:
        if path.stat().st_size > THUMB_MAX_FILE_BYTES:
            return None
        image = decode_image(path.read_bytes(), fit=THUMB_SIZE, max_pixels=max_pixels).image
    except (OSError, ImageDecodeError):
        return None
    buffer = io.BytesIO()
    shrink_to_fit(image, THUMB_SIZE).save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def add_page_routes(app: FastAPI, state: ServingState) -> None:
    """The page's own files and the catalogue thumbnails; `/` itself stays in app.py."""

    @app.get("/page/{name}", include_in_schema=False)
    async def page_asset(name: str) -> Response:
        if name not in ASSETS:
            raise ApiError(404, f"no page file {name!r}")
        return Response((HERE / name).read_bytes(), media_type=ASSETS[name], headers=HEADERS)

    positions: dict[str, int] = {}
    made: OrderedDict[int, bytes | None] = OrderedDict()

    @app.get(
        "/similar/photo",
        tags=["similar"],
        summary="A small JPEG of one catalogue photo of the similar-photo index (what /similar lists)",
        responses={
            404: {"description": "no index, a path the index does not hold, or a photo not readable here"}
        },
    )
    async def similar_photo(
        path: str = Query(..., max_length=4096, description="a `path` from a /similar answer"),
    ) -> Response:
        finder = state.similar
        if finder is None:
            raise ApiError(404, "this server has no similar-photo index (--similar-index)")
        if not positions:
            positions.update((p, i) for i, p in enumerate(finder.index.paths))
        position = positions.get(path)
        if position is None:
            raise ApiError(404, f"the similar-photo index holds no photo {path!r}")
        if position in made:
            made.move_to_end(position)
            thumbnail = made[position]
        else:
            with state.admission.admit(1):
                thumbnail = await in_thread(
                    state, catalogue_thumbnail, finder.index.photo_path(position), finder.max_pixels
                )
            made[position] = thumbnail
            while len(made) > THUMB_CACHE:
                made.popitem(last=False)
        if thumbnail is None:
            raise ApiError(404, f"the index lists {path!r}, but this server cannot read that photo")
        return Response(thumbnail, media_type="image/jpeg", headers={"cache-control": "max-age=3600"})
