"""The clean step: every raw file becomes a JPEG that fits size×size, or a reasoned drop.

RAW/<category>/**/<file> → OUT/<category>/<name>.jpg plus OUT/clean_report.json.

Why it is built this way:
- decoding runs in worker processes and writes into a hidden staging folder inside OUT, so the
  parent never holds millions of photos in memory and a crash leaves no half-written photo in a
  category folder (staged files only reach their final name by an atomic rename);
- duplicates are decided after every file is hashed, so the photo kept does not depend on the
  order in which workers finished;
- names, the kept photo of a duplicate group and the report depend only on the input, so a rerun
  gives byte-identical output.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..errors import StepError
from ..progress import Progress
from .corrections import Corrections, CorrectionsError, apply_corrections, check_categories
from .images import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    decode_image,
    encode_jpeg,
    perceptual_hash,
    shrink_to_fit,
    thumbnail_signature,
)
from .naming import IMAGE_SUFFIX, atomic_write_text, safe_stem, source_product_id
from .near_duplicates import group_duplicates

REPORT_NAME = "clean_report.json"
STAGING_NAME = ".clean-staging"
MARKER_NAME = ".shopvision-clean"
# Near duplicates: pHash within this many bits AND thumbnails this close (mean grey difference).
# On the 2,936 grocery photos this flags 7 pairs at 2–6 bits, all burst shots of the same frame
# (which would otherwise leak across splits); re-encoded or resized copies sit at 0–2 bits.
NEAR_DUPLICATE_BITS = 6
NEAR_DUPLICATE_GREY = 8.0


class CleanError(StepError):
    """Bad arguments or an output folder we must not touch."""


@dataclass
class FileVerdict:
    source: str  # path relative to RAW, POSIX style
    category: str | None
    status: str  # "kept" | "dropped"
    reason: str | None = None
    detail: str | None = None
    output: str | None = None  # path relative to OUT
    product_id: str | None = None
    duplicate_of: str | None = None
    corrected_from: str | None = None  # the category RAW files it under, when a correction moved it
    sha256: str | None = None
    phash: str | None = None
    source_format: str | None = None
    source_size: list[int] | None = None
    size: list[int] | None = None


@dataclass
class CleanResult:
    raw: str
    out: str
    size: int
    files: list[FileVerdict] = field(default_factory=list)
    corrections: list[dict] = field(default_factory=list)  # photos moved by --corrections

    @property
    def kept(self) -> list[FileVerdict]:
        return [f for f in self.files if f.status == "kept"]

    def totals(self) -> dict:
        dropped = Counter(f.reason for f in self.files if f.status == "dropped")
        return {"files": len(self.files), "kept": len(self.kept), "dropped": dict(sorted(dropped.items()))}

    def per_category(self) -> dict[str, dict]:
        table: dict[str, dict] = {}
        for verdict in self.files:
            if verdict.category is None:
                continue
            row = table.setdefault(verdict.category, {"files": 0, "kept": 0, "dropped": {}})
            row["files"] += 1
            if verdict.status == "kept":
                row["kept"] += 1
            else:
                row["dropped"][verdict.reason] = row["dropped"].get(verdict.reason, 0) + 1
        return dict(sorted(table.items()))

    def to_json(self) -> str:
        report = {
            "step": "clean",
            "size": self.size,
            "totals": self.totals(),
            "categories": self.per_category(),
            "files": [{k: v for k, v in asdict(f).items() if v is not None} for f in self.files],
        }
        if self.corrections:
            report["corrections"] = self.corrections
        return json.dumps(report, indent=1, sort_keys=False) + "\n"


@dataclass(frozen=True)
class _Candidate:
    index: int
    path: str
    source: str
    category: str


@dataclass(frozen=True)
class PhotoRecord:
    """What decoding one raw file found (clean's map half): its hashes and sizes and the name of its
    shrunk JPEG in a staging folder, or why it could not be decoded. Duplicates are decided over all
    records at once (the reduce half), so records can come from one process or from many shards."""

    source: str
    category: str
    staged: str | None = None  # file name of the shrunk JPEG in its staging folder
    sha256: str | None = None
    phash: int | None = None
    signature: bytes | None = None
    source_format: str | None = None
    source_size: tuple[int, int] | None = None
    size: tuple[int, int] | None = None
    error_reason: str | None = None
    error_detail: str | None = None


def discover(raw: Path) -> tuple[list[_Candidate], list[FileVerdict]]:
    """Every regular file under RAW/<category>/, following links only while they stay inside RAW."""
    raw_real = Path(os.path.realpath(raw))
    candidates: list[_Candidate] = []
    verdicts: list[FileVerdict] = []
    visited_dirs: set[str] = set()

    def inside_raw(path: str) -> bool:
        real = os.path.realpath(path)
        return real == str(raw_real) or real.startswith(str(raw_real) + os.sep)

    def walk(directory: Path, relative: str, category: str | None) -> None:
        real_dir = os.path.realpath(directory)
        if real_dir in visited_dirs:  # a link loop or a second link to the same folder
            return
        visited_dirs.add(real_dir)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            verdicts.append(FileVerdict(relative or ".", category, "dropped", "unreadable", str(exc)))
            return
        for entry in entries:
            if entry.name in (REPORT_NAME,) and category is None:
                continue
            source = f"{relative}/{entry.name}" if relative else entry.name
            path = os.path.join(directory, entry.name)
            if entry.is_symlink():
                if not os.path.exists(path):
                    verdicts.append(
                        FileVerdict(source, category, "dropped", "broken_link", os.readlink(path))
                    )
                    continue
                if not inside_raw(path):
                    target = os.path.realpath(path)
                    verdicts.append(
                        FileVerdict(source, category, "dropped", "link_outside_raw", f"points to {target}")
                    )
                    continue
                if os.path.isdir(path):
                    # Its target is inside RAW and is cleaned from its own place, under its own category;
                    # following it would file those photos a second time under this folder's category.
                    target = os.path.relpath(os.path.realpath(path), raw_real)
                    verdicts.append(
                        FileVerdict(
                            source,
                            category,
                            "dropped",
                            "folder_link_inside_raw",
                            f"links to {target}, which is cleaned where it is",
                        )
                    )
                    continue
            try:
                mode = os.stat(path).st_mode
            except OSError as exc:
                verdicts.append(FileVerdict(source, category, "dropped", "unreadable", str(exc)))
                continue
            if stat.S_ISDIR(mode):
                walk(Path(path), source, category if category is not None else entry.name)
            elif not stat.S_ISREG(mode):
                verdicts.append(
                    FileVerdict(source, category, "dropped", "not_a_regular_file", "device, pipe or socket")
                )
            elif category is None:
                verdicts.append(
                    FileVerdict(
                        source, None, "dropped", "no_category", "files must be inside RAW/<category>/"
                    )
                )
            else:
                candidates.append(_Candidate(len(candidates), path, source, category))

    walk(raw, "", None)
    return candidates, verdicts


def _decode_one(job: tuple[_Candidate, int, int, str]) -> PhotoRecord:
    candidate, size, max_pixels, staging = job
    record = PhotoRecord(candidate.source, candidate.category)
    try:
        with open(candidate.path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        return replace(record, error_reason="unreadable", error_detail=str(exc))
    record = replace(record, sha256=hashlib.sha256(data).hexdigest())
    if not data:
        return replace(record, error_reason="empty_file", error_detail="0 bytes")
    try:
        decoded = decode_image(data, fit=size, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        return replace(record, error_reason=exc.reason, error_detail=exc.detail)
    except MemoryError:
        return replace(record, error_reason="too_many_pixels", error_detail="out of memory")
    image = shrink_to_fit(decoded.image, size)
    staged = f"{candidate.index}{IMAGE_SUFFIX}"
    (Path(staging) / staged).write_bytes(encode_jpeg(image))
    return replace(
        record,
        staged=staged,
        phash=perceptual_hash(grey := image.convert("L")),
        signature=thumbnail_signature(grey),
        source_format=decoded.source_format,
        source_size=decoded.source_size,
        size=image.size,
    )


def decode_files(
    candidates: list[_Candidate],
    size: int,
    max_pixels: int,
    staging: Path,
    workers: int,
    label: str = "clean",
) -> list[PhotoRecord]:
    """Clean's map: decode, shrink and hash each candidate, writing its JPEG into `staging`."""
    jobs = [(c, size, max_pixels, str(staging)) for c in candidates]
    progress = Progress(len(jobs), label)
    results: list[PhotoRecord] = []
    if workers <= 1 or len(jobs) < 2:
        for job in jobs:
            results.append(_decode_one(job))
            progress.advance()
    else:
        chunk = max(1, min(64, len(jobs) // (workers * 8)))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for result in pool.map(_decode_one, jobs, chunksize=chunk):
                results.append(result)
                progress.advance()
    progress.close()
    return results


def _output_names(kept: list[PhotoRecord]) -> dict[str, str]:
    """OUT-relative names by source: the raw stem made safe; a collision gets a short hash of its source."""
    by_name: dict[tuple[str, str], list[PhotoRecord]] = defaultdict(list)
    for record in kept:
        by_name[(record.category, safe_stem(Path(record.source).stem))].append(record)
    names: dict[str, str] = {}
    for (category, stem), members in by_name.items():
        for rank, record in enumerate(sorted(members, key=lambda r: r.source)):
            suffix = "" if rank == 0 else "." + hashlib.sha256(record.source.encode()).hexdigest()[:8]
            names[record.source] = f"{category}/{stem}{suffix}{IMAGE_SUFFIX}"
    return names


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


@dataclass(frozen=True)
class OutputFolder:
    """OUT, made ready; what it was before, so a refused corrections file can leave it as it was."""

    path: Path
    created: bool
    marked: bool


def prepare_out(out: Path) -> OutputFolder:
    if out.exists() and not out.is_dir():
        raise CleanError(f"output {out} exists and is not a folder")
    ours = (out / REPORT_NAME).exists() or (out / MARKER_NAME).exists()
    if out.exists() and any(out.iterdir()) and not ours:
        raise CleanError(
            f"output folder {out} is not empty and holds no {REPORT_NAME}: refusing to write into a folder "
            "that was not made by 'shopvision clean' (choose an empty or new folder)"
        )
    folder = OutputFolder(out, not out.exists(), (out / MARKER_NAME).exists())
    out.mkdir(parents=True, exist_ok=True)
    # Written before anything else, so a rerun after a crash recognises the folder as ours.
    (out / MARKER_NAME).write_text("made by shopvision clean\n")
    return folder


def check_arguments(raw: Path, size: int) -> None:
    if not raw.is_dir():
        raise CleanError(f"raw folder {raw} does not exist or is not a folder")
    if size < 16:
        raise CleanError(f"--size must be at least 16 pixels, got {size}")


def clean(
    raw: Path,
    out: Path,
    *,
    size: int = 224,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    report: Path | None = None,
    near_duplicate_bits: int = NEAR_DUPLICATE_BITS,
    corrections: Corrections | None = None,
) -> CleanResult:
    """One process: the map (decode_files) over every file, then the reduce (reduce_records); a sharded
    clean (clean_shards.py) runs the same two functions, the map once per shard."""
    raw, out = Path(raw), Path(out)
    check_arguments(raw, size)
    if _overlaps(Path(os.path.realpath(raw)), Path(os.path.realpath(out))):
        raise CleanError(
            "the raw and output folders must be separate: neither may be, or be inside, the other"
        )
    if corrections:  # a wrong category fails before anything is decoded or written
        check_categories(corrections, category_folders(raw))
    folder = prepare_out(out)
    workers = workers or os.cpu_count() or 1

    candidates, verdicts = discover(raw)
    staging = out / STAGING_NAME
    shutil.rmtree(staging, ignore_errors=True)  # leftovers of a crashed run
    staging.mkdir()
    try:
        records = decode_files(candidates, size, max_pixels, staging, workers)
        staged = {r.source: staging / r.staged for r in records if r.staged}
        return reduce_records(
            str(raw),
            folder,
            size,
            records,
            verdicts,
            staged,
            move=True,
            report=report,
            near_duplicate_bits=near_duplicate_bits,
            corrections=corrections,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def reduce_records(
    raw: str,
    folder: OutputFolder,
    size: int,
    records: list[PhotoRecord],
    verdicts: list[FileVerdict],
    staged: dict[str, Path],
    *,
    move: bool,
    report: Path | None = None,
    near_duplicate_bits: int = NEAR_DUPLICATE_BITS,
    corrections: Corrections | None = None,
) -> CleanResult:
    """Clean's reduce: duplicates over all records, corrections, then the kept photos (their staged
    JPEGs, moved or copied) and the report published in OUT. `staged` maps a source to its JPEG."""
    out = folder.path
    result = _decide(raw, str(out), size, records, verdicts, near_duplicate_bits)
    if corrections:  # all rows apply, or none: nothing is published before this
        try:
            result.corrections = apply_corrections(result.files, corrections)
        except CorrectionsError:  # leave OUT as it was: no marker this run added, no new folder
            if not folder.marked:
                (out / MARKER_NAME).unlink(missing_ok=True)
            if folder.created:
                shutil.rmtree(out / STAGING_NAME, ignore_errors=True)
                out.rmdir()
            raise
    _publish(out, result, staged, move)
    atomic_write_text(report or out / REPORT_NAME, result.to_json())
    if report and report != out / REPORT_NAME:
        atomic_write_text(out / REPORT_NAME, result.to_json())
    (out / MARKER_NAME).unlink(missing_ok=True)  # the report marks the folder from now on
    return result


def category_folders(raw: Path) -> set[str]:
    """RAW's category names, as `discover` finds them: its folders (links to folders are not walked)."""
    return {entry.name for entry in os.scandir(raw) if entry.is_dir(follow_symlinks=False)}


def walk_order(source: str) -> tuple[str, ...]:
    """The order `discover` walks RAW in (sorted names, depth first), from a source path alone, so
    records that come from several shards line up as one walk would have found them."""
    return tuple(source.split("/"))


def _decide(raw, out, size, records, verdicts, bits) -> CleanResult:
    result = CleanResult(str(raw), str(out), size)
    verdicts = list(verdicts)
    images: list[PhotoRecord] = []
    for record in sorted(records, key=lambda r: walk_order(r.source)):
        if record.error_reason:
            verdicts.append(
                FileVerdict(
                    record.source,
                    record.category,
                    "dropped",
                    record.error_reason,
                    record.error_detail,
                    sha256=record.sha256,
                )
            )
        else:
            images.append(record)
    groups, why = group_duplicates(images, bits, NEAR_DUPLICATE_GREY)
    dropped: dict[int, FileVerdict] = {}
    for members in groups.values():
        group = [images[m] for m in members]
        categories = sorted({r.category for r in group})
        if len(categories) > 1:
            detail = "the same photo is filed under " + ", ".join(categories)
            for position, record in zip(members, group, strict=True):
                others = [r.source for r in group if r is not record]
                dropped[position] = FileVerdict(
                    record.source,
                    record.category,
                    "dropped",
                    "label_conflict",
                    detail,
                    duplicate_of=others[0],
                )
            continue
        # Keep the best original: most source pixels, then the first source path.
        keeper = min(members, key=lambda m: (-_area(images[m]), images[m].source))
        for position in members:
            if position == keeper:
                continue
            kind = "exact" if images[position].sha256 == images[keeper].sha256 else "near"
            pair = why.get((min(position, keeper), max(position, keeper)), kind)
            dropped[position] = FileVerdict(
                images[position].source,
                images[position].category,
                "dropped",
                "duplicate",
                f"{pair} duplicate of {images[keeper].source}",
                duplicate_of=images[keeper].source,
            )
    names = _output_names([r for p, r in enumerate(images) if p not in dropped])
    for position, record in enumerate(images):
        verdict = dropped.get(position) or FileVerdict(
            record.source,
            record.category,
            "kept",
            output=names[record.source],
            product_id=source_product_id(record.source),
        )
        verdict.sha256 = record.sha256
        verdict.phash = f"{record.phash:016x}"
        verdict.source_format = record.source_format
        verdict.source_size = list(record.source_size)
        verdict.size = list(record.size) if verdict.status == "kept" else None
        verdicts.append(verdict)
    result.files = sorted(verdicts, key=lambda v: v.source)
    return result


def _area(record: PhotoRecord) -> int:
    return record.source_size[0] * record.source_size[1]


def _publish(out: Path, result: CleanResult, staged: dict[str, Path], move: bool) -> None:
    """Put kept photos at their names (a staged JPEG moved, or copied from a shard's folder, which
    stays as it is), then remove what a previous run left that this one did not make."""
    wanted = {v.output for v in result.kept}
    for verdict in result.kept:
        target = out / verdict.output
        target.parent.mkdir(parents=True, exist_ok=True)
        if move:
            os.replace(staged[verdict.source], target)
        else:  # through a temporary name, so OUT never holds half a photo under its final name
            partial = target.with_name(f".{target.name}.tmp")
            shutil.copyfile(staged[verdict.source], partial)
            os.replace(partial, target)
    for path in sorted(out.rglob("*"), reverse=True):
        relative = path.relative_to(out).as_posix()
        if relative.startswith(STAGING_NAME) or relative in (REPORT_NAME, MARKER_NAME):
            continue
        if path.is_file() and relative not in wanted:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def summary(result: CleanResult) -> str:
    totals = result.totals()
    lines = [
        f"clean: {totals['files']} files, {totals['kept']} kept in {len(result.per_category())} categories"
    ]
    for reason, count in totals["dropped"].items():
        lines.append(f"  dropped {count:>6}  {reason}")
    if result.corrections:
        lines.append(f"  corrected {len(result.corrections):>4}  moved to the category a review gave them")
    return "\n".join(lines)
