"""A step's output folder and the CSV text written into it, shared by the steps of every stage that
write folders (data, evaluation, similarity); here in components/ itself, with errors and progress."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import StepError


def prepare_out(out: Path, marker: str, step: str) -> bool:
    """OUT must be new, empty, or an earlier output of STEP (recognised by its MARKER file).

    Creates OUT; returns True when it already held files (an earlier output to write over).
    """
    if out.exists() and not out.is_dir():
        raise StepError(f"output {out} exists and is not a folder")
    earlier = out.exists() and any(out.iterdir())
    if earlier and not (out / marker).is_file():
        raise StepError(
            f"output folder {out} is not empty and holds no {marker}: refusing to write into a folder "
            f"that was not made by 'shopvision {step}' (choose an empty or new folder)"
        )
    out.mkdir(parents=True, exist_ok=True)
    return earlier


def csv_text(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A header line and the rows as CSV with "\\n" line ends."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()
