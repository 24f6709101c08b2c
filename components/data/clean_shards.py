"""clean across many pods: each shard decodes, shrinks and hashes its share of RAW, one merge publishes.

RAW → SHARD_i/{shard.json, photos/<n>.jpg} for i in 0..N-1 (the map), then SHARD_0..SHARD_N-1 → OUT
exactly as `clean(RAW, OUT)` writes it (the reduce).

Why it is built this way:
- a file's shard is a hash of its path relative to RAW, so the assignment does not depend on the
  order files are listed in, on which pod runs which shard, or on the other files;
- every shard walks the whole of RAW (a listing, no decoding) and keeps its share of the files and of
  the walk's own verdicts (broken links, files outside a category), so the union of the shards is one
  walk, each file in exactly one shard;
- duplicates are decided only in the merge, over all shards' records, by the same `reduce_records` a
  single-process clean calls after its own map: the photos and report are the same by construction.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .clean import (
    NEAR_DUPLICATE_BITS,
    CleanError,
    CleanResult,
    FileVerdict,
    PhotoRecord,
    category_folders,
    check_arguments,
    decode_files,
    discover,
    prepare_out,
    reduce_records,
)
from .corrections import Corrections, check_categories
from .images import DEFAULT_MAX_PIXELS

SHARD_RECORDS = "shard.json"
SHARD_PHOTOS = "photos"


def shard_of(source: str, shards: int) -> int:
    """The shard of a RAW-relative path: stable across runs, machines and Python processes."""
    return int.from_bytes(hashlib.sha256(source.encode("utf-8")).digest()[:8], "big") % shards


def check_shard(shard: int, shards: int) -> None:
    if shards < 1:
        raise CleanError(f"the number of clean shards must be at least 1, got {shards}")
    if not 0 <= shard < shards:
        raise CleanError(f"shard {shard} does not exist: shards are numbered 0 to {shards - 1}")


@dataclass
class ShardResult:
    shard: int
    shards: int
    files: int  # files of this shard (decoded or not) plus the walk's verdicts that fell to it
    decoded: int


def clean_shard(
    raw: Path,
    out: Path,
    shard: int,
    shards: int,
    *,
    size: int = 224,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ShardResult:
    """The map for one shard: its files decoded into OUT/photos, their records in OUT/shard.json."""
    raw, out = Path(raw), Path(out)
    check_shard(shard, shards)
    check_arguments(raw, size)
    if out.exists() and any(out.iterdir()):
        raise CleanError(f"shard output folder {out} is not empty: a shard writes into an empty folder")
    photos = out / SHARD_PHOTOS
    photos.mkdir(parents=True, exist_ok=True)
    candidates, verdicts = discover(raw)
    mine = [c for c in candidates if shard_of(c.source, shards) == shard]
    records = decode_files(
        mine, size, max_pixels, photos, workers or os.cpu_count() or 1, label=f"clean shard {shard}"
    )
    walk = [v for v in verdicts if shard_of(v.source, shards) == shard]
    document = {
        "step": "clean-shard",
        "raw": str(raw),
        "shard": shard,
        "shards": shards,
        "size": size,
        "categories": sorted(category_folders(raw)),
        "verdicts": [asdict(v) for v in walk],
        "records": [_record_json(r) for r in records],
    }
    (out / SHARD_RECORDS).write_text(json.dumps(document) + "\n", encoding="utf-8")
    return ShardResult(shard, shards, len(records) + len(walk), sum(1 for r in records if r.staged))


def merge_shards(
    shard_dirs: list[Path],
    out: Path,
    *,
    report: Path | None = None,
    near_duplicate_bits: int = NEAR_DUPLICATE_BITS,
    corrections: Corrections | None = None,
) -> CleanResult:
    """The reduce: every shard's records together, grouped and published as one clean of RAW would."""
    documents = [_read_shard(Path(d)) for d in shard_dirs]
    if not documents:
        raise CleanError("no clean shards to merge")
    shards = {d["shards"] for d in documents}
    sizes = {d["size"] for d in documents}
    if len(shards) > 1 or len(sizes) > 1:
        raise CleanError(f"the shards do not belong to one clean: shard counts {shards}, sizes {sizes}")
    (count,) = shards
    found = sorted(d["shard"] for d in documents)
    if found != list(range(count)):
        raise CleanError(f"expected shards 0 to {count - 1} once each, got {found}")
    if corrections:
        check_categories(corrections, documents[0]["categories"])
    records, verdicts, staged = [], [], {}
    for folder, document in zip(shard_dirs, documents, strict=True):
        verdicts += [FileVerdict(**v) for v in document["verdicts"]]
        for entry in document["records"]:
            record = _record_from_json(entry)
            records.append(record)
            if record.staged:
                staged[record.source] = Path(folder) / SHARD_PHOTOS / record.staged
    return reduce_records(
        documents[0]["raw"],
        prepare_out(Path(out)),
        sizes.pop(),
        records,
        verdicts,
        staged,
        move=False,  # a shard's folder is an upstream artifact: it stays as it is
        report=report,
        near_duplicate_bits=near_duplicate_bits,
        corrections=corrections,
    )


def _record_json(record: PhotoRecord) -> dict:
    entry = {k: v for k, v in asdict(record).items() if v is not None}
    if record.phash is not None:
        entry["phash"] = f"{record.phash:016x}"
    if record.signature is not None:
        entry["signature"] = record.signature.hex()
    return entry


def _record_from_json(entry: dict) -> PhotoRecord:
    entry = dict(entry)
    if "phash" in entry:
        entry["phash"] = int(entry["phash"], 16)
    if "signature" in entry:
        entry["signature"] = bytes.fromhex(entry["signature"])
    for key in ("source_size", "size"):
        if key in entry:
            entry[key] = tuple(entry[key])
    return PhotoRecord(**entry)


def _read_shard(folder: Path) -> dict:
    path = folder / SHARD_RECORDS
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CleanError(f"{folder} is not a clean shard (cannot read its {SHARD_RECORDS}: {exc})") from exc
    if document.get("step") != "clean-shard":
        raise CleanError(f"{path} is not a clean shard's record")
    return document


def shard_summary(result: ShardResult) -> str:
    return (
        f"clean: shard {result.shard + 1}/{result.shards}, {result.files} files, "
        f"{result.decoded} decoded and hashed"
    )


def shard_numbers(shards: int) -> list[int]:
    check_shard(0, shards)
    return list(range(shards))
