"""Corrections from a catalogue review: photos to file under another category, applied by clean.

corrections.csv is what the audit report's page builds when a reviewer ticks listings:

    photo,category,corrected_category
    Kiwi/IMG_0412.jpg,Kiwi,Banana

- `photo` names a photo as the audit lists it: its path in clean's output (`<category>/<name>.jpg`,
  what an index of the cleaned photos holds), the same under a split folder (`test/<category>/...`),
  or its path under RAW (clean_report.json's `source`);
- `category` is where it is filed now: a file made from another version of the catalogue, where the
  photo has moved since, is refused rather than applied to the wrong photo;
- `corrected_category` must be one of RAW's categories: a typo must not create a category.

Clean applies them after duplicates are decided and before anything is published. Every row is
checked first and all problems are reported together; one bad row applies nothing. A moved photo keeps
its name in its new category (a short hash of its source path when the name is taken there) and its
verdict records `corrected_from`, so the clean report says what moved.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

from ..errors import StepError
from .naming import IMAGE_SUFFIX, safe_stem

CORRECTIONS_HEADER = ("photo", "category", "corrected_category")
SPLIT_FOLDERS = ("train", "val", "test")
PROBLEMS_SHOWN = 10


class FileVerdict(Protocol):
    """What corrections read and change of clean's verdict on one file (`clean.FileVerdict`).

    Named here rather than imported, so that clean uses corrections and corrections knows nothing of
    clean: no import circle.
    """

    source: str
    category: str | None
    status: str
    reason: str | None
    output: str | None
    duplicate_of: str | None
    corrected_from: str | None


class CorrectionsError(StepError):
    """A corrections file that cannot be applied as a whole."""


@dataclass(frozen=True)
class Correction:
    photo: str  # as the audit lists it (see the module docstring)
    category: str  # where the photo is filed now
    corrected_category: str
    line: int = 0  # in the file, for messages


@dataclass(frozen=True)
class Corrections:
    """The rows of one corrections file, and what to call it in messages."""

    rows: tuple[Correction, ...]
    source: str = "corrections"

    def __len__(self) -> int:
        return len(self.rows)


def _fail(source: str, problems: Sequence[str]) -> CorrectionsError:
    shown = "; ".join(problems[:PROBLEMS_SHOWN])
    more = f"; and {len(problems) - PROBLEMS_SHOWN} more" if len(problems) > PROBLEMS_SHOWN else ""
    count = f"{len(problems)} problems" if len(problems) > 1 else "1 problem"
    return CorrectionsError(f"{source}: {count}, nothing applied: {shown}{more}")


def _clean_photo(text: str) -> str | None:
    """A relative POSIX path with no '..' (None for anything else)."""
    path = PurePosixPath(text.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return None
    return path.as_posix()


def parse_corrections(text: str, source: str = "corrections") -> Corrections:
    """The rows of a corrections CSV (header line first; other columns are ignored). Raises
    CorrectionsError naming every bad line: missing columns, empty fields, a path that leaves its
    folder, one photo sent to two categories, or no rows at all."""
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    columns = {(name or "").strip() for name in reader.fieldnames or ()}
    if not set(CORRECTIONS_HEADER) <= columns:
        raise CorrectionsError(
            f"{source}: the first line must name the columns {','.join(CORRECTIONS_HEADER)} "
            f"(as the audit report's corrections.csv does)"
        )
    problems: list[str] = []
    found: dict[str, Correction] = {}
    try:
        rows = [(reader.line_num, row) for row in reader]  # line_num: blank lines are skipped, not counted
    except csv.Error as exc:
        raise CorrectionsError(f"{source}: not readable as CSV: {exc}") from None
    for line, row in rows:
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items() if isinstance(v, str | None)}
        values = [row.get(name, "") for name in CORRECTIONS_HEADER]
        if not any(values):
            continue  # a blank line
        if not all(values):
            missing = [n for n, v in zip(CORRECTIONS_HEADER, values, strict=True) if not v]
            problems.append(f"line {line}: empty {', '.join(missing)}")
            continue
        photo = _clean_photo(values[0])
        if photo is None:
            problems.append(f"line {line}: photo {values[0]!r} must be a relative path inside the catalogue")
            continue
        correction = Correction(photo, values[1], values[2], line)
        earlier = found.get(photo)
        if earlier is not None and earlier.corrected_category != correction.corrected_category:
            problems.append(
                f"line {line}: {photo!r} is sent to {correction.corrected_category!r} here and to "
                f"{earlier.corrected_category!r} on line {earlier.line}"
            )
        found.setdefault(photo, correction)
    if problems:
        raise _fail(source, problems)
    if not found:
        raise CorrectionsError(f"{source}: no corrections in the file (only its header line)")
    return Corrections(tuple(found.values()), source)


def read_corrections(path: str | Path) -> Corrections:
    """`parse_corrections` of a file, with unreadable files as a CorrectionsError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CorrectionsError(f"cannot read corrections {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CorrectionsError(f"corrections {path} is not UTF-8 text (expected a CSV file)") from None
    return parse_corrections(text, f"corrections {path}")


def corrections_csv(corrections: Iterable[Correction]) -> str:
    """The CSV text of corrections, as the audit report's page writes it."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CORRECTIONS_HEADER)
    writer.writerows((c.photo, c.category, c.corrected_category) for c in corrections)
    return buffer.getvalue()


def check_categories(corrections: Corrections, categories: Iterable[str]) -> None:
    """Every category a correction names must be one of RAW's: checked before any photo is decoded."""
    known = set(categories)
    problems = []
    for c in corrections.rows:
        for column, name in (("category", c.category), ("corrected_category", c.corrected_category)):
            if name not in known:
                problems.append(f"line {c.line}: {column} {name!r} is not a category of the raw photos")
    if problems:
        shown = ", ".join(sorted(known)[:8]) + (" ..." if len(known) > 8 else "")
        raise _fail(corrections.source, [*problems, f"the categories are: {shown}"])


def _find(correction: Correction, by_output: dict, by_source: dict) -> FileVerdict | None:
    photo = correction.photo
    if photo in by_output:
        return by_output[photo]
    head, _, rest = photo.partition("/")
    if head in SPLIT_FOLDERS and rest in by_output:  # an index of a split folder
        return by_output[rest]
    return by_source.get(photo)


def apply_corrections(files: Sequence[FileVerdict], corrections: Corrections) -> list[dict]:
    """Refile the kept photos the corrections name (verdicts changed in place: category, output,
    corrected_from); returns one record per moved photo. Nothing changes unless every row applies."""
    kept = [v for v in files if v.status == "kept"]
    by_output = {v.output: v for v in kept}
    by_source = {v.source: v for v in files}
    problems, moves = [], []
    target_of: dict[str, Correction] = {}
    for c in corrections.rows:
        verdict = _find(c, by_output, by_source)
        if verdict is None:
            problems.append(f"line {c.line}: no photo {c.photo!r} in the raw photos or in clean's output")
        elif verdict.status != "kept":
            why = verdict.reason + (f" of {verdict.duplicate_of}" if verdict.duplicate_of else "")
            problems.append(
                f"line {c.line}: {c.photo!r} is not kept by clean ({why}): correct the kept photo"
            )
        elif verdict.category != c.category:
            problems.append(
                f"line {c.line}: {c.photo!r} is filed under {verdict.category!r}, not {c.category!r} "
                "(the file was made from another version of the catalogue)"
            )
        elif verdict.category == c.corrected_category:
            problems.append(f"line {c.line}: {c.photo!r} is already filed under {c.corrected_category!r}")
        elif (
            verdict.source in target_of
            and target_of[verdict.source].corrected_category != c.corrected_category
        ):
            first = target_of[verdict.source]
            problems.append(f"line {c.line}: the photo of line {first.line} is sent to two categories")
        else:
            if verdict.source not in target_of:
                moves.append((verdict, c))
            target_of[verdict.source] = c
    if problems:
        raise _fail(corrections.source, problems)
    taken = {v.output for v in kept} - {v.output for v, _ in moves}
    records = []
    for verdict, c in sorted(moves, key=lambda move: move[0].source):
        output = f"{c.corrected_category}/{PurePosixPath(verdict.output).name}"
        if output in taken:
            suffix = hashlib.sha256(verdict.source.encode()).hexdigest()[:8]
            output = f"{c.corrected_category}/{safe_stem(PurePosixPath(verdict.source).stem)}.{suffix}{IMAGE_SUFFIX}"
        taken.add(output)
        records.append(
            {
                "source": verdict.source,
                "from": verdict.category,
                "to": c.corrected_category,
                "previous_output": verdict.output,
                "output": output,
                "line": c.line,
            }
        )
        verdict.corrected_from, verdict.category, verdict.output = (
            verdict.category,
            c.corrected_category,
            output,
        )
    return records


def corrections_parameter(text: str) -> Corrections | None:
    """The pipeline parameter `corrections`: the CSV's text (a KFP parameter carries text, not a file
    on the submitting machine, as `taxonomy_csv` does); empty means no corrections."""
    return parse_corrections(text, "the pipeline parameter corrections") if text.strip() else None
