"""`promote --require-shadow-agreement X`: the candidate must have agreed with the champion on live traffic.

A server started with `--shadow models:/NAME@challenger` reports, at GET /v2/models/NAME/drift, how
often the challenger's top-1 category agreed with the served one (`shadow.agreement_rate`, over its
last 1,000 compared photos). The gate reads that route from the URL given and refuses the promotion
(a REJECTED decision with the reason, like any other gate) unless the shadowed version is the
candidate, it was compared on at least `min_photos` live photos, and it agreed on at least X of them.

Agreement is a safety check, not a score: a better candidate disagrees exactly where the champion is
wrong, so X bounds how differently it may behave on real photos, not how good it is (that is the
frozen evaluation set's job).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from ..errors import StepError

DEFAULT_MIN_PHOTOS = 100


def read_shadow(url: str, timeout: float = 10.0) -> dict:
    """The `shadow` block of a server's drift route; a StepError when it cannot be had."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - an operator's URL
            body = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise StepError(f"--shadow-url {url}: cannot read the server's shadow report: {exc}") from None
    shadow = body.get("shadow") if isinstance(body, dict) else None
    if not isinstance(shadow, dict):
        raise StepError(f"--shadow-url {url}: the server runs no shadow challenger (start it with --shadow)")
    return shadow


def shadow_refusal(
    url: str, version: str, minimum: float, *, min_photos: int = DEFAULT_MIN_PHOTOS
) -> tuple[str | None, str]:
    """(why the candidate is refused, or None; a note for the decision) from the live shadow report."""
    if not 0.0 <= minimum <= 1.0:
        raise StepError(f"--require-shadow-agreement must be in [0, 1], got {minimum}")
    shadow = read_shadow(url)
    shadowed, rate, compared = shadow.get("version"), shadow.get("agreement_rate"), shadow.get("compared", 0)
    window = shadow.get("agreement_window", compared)
    note = f"shadow at {url}: version {shadowed}, agreement {rate} over {window} of {compared} live photos"
    if str(shadowed) != str(version):
        return f"the server shadows version {shadowed}, not the candidate {version}", note
    if compared < min_photos or rate is None:
        return (
            f"the shadow compared version {version} on {compared} live photos, fewer than the "
            f"{min_photos} required (--shadow-min-photos)"
        ), note
    if rate < minimum:
        return (
            f"version {version} agreed with the champion on {rate:.1%} of live photos, under the "
            f"{minimum:.1%} required (--require-shadow-agreement)"
        ), note
    return None, note
