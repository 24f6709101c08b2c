"""Where the raw photos come from: a local folder or an s3:// prefix (any S3 endpoint, MinIO too).

The pipeline's first task fingerprints the location without copying anything (cheap and never
cached), and the fetch task takes that fingerprint as an argument: the fetch and every later step
are served from the cache exactly when the photos are byte-for-byte the ones seen before. That only
holds if what fetch copies is what was fingerprinted, so fetch checks it: a folder's copy is
fingerprinted again; an S3 listing must match, and each download is conditional on the listed ETag
(If-Match), so a photo replaced between fingerprint and fetch is a clear error, not a cached run
over other photos.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from ..errors import StepError
from ..progress import Progress
from .naming import link_or_copy

_CHUNK = 1 << 20


def _s3(endpoint_url: str | None):
    import boto3

    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    return boto3.client("s3", endpoint_url=endpoint or None)


def _split_s3(location: str) -> tuple[str, str]:
    bucket, _, prefix = location.removeprefix("s3://").partition("/")
    if not bucket:
        raise StepError(f"{location!r} is not an s3://bucket/prefix location")
    return bucket, prefix.rstrip("/") + "/" if prefix else ""


def _s3_objects(location: str, endpoint_url: str | None) -> list[dict]:
    import botocore.exceptions

    bucket, prefix = _split_s3(location)
    try:
        pages = _s3(endpoint_url).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        objects = [o for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/")]
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise StepError(f"cannot list {location}: {exc}") from None
    if not objects:
        raise StepError(f"no photos under {location}")
    return sorted(objects, key=lambda o: o["Key"])


def fingerprint_location(location: str, s3_endpoint_url: str | None = None) -> str:
    """A content fingerprint: S3 ETags and sizes (no download), or the contents of the files fetch
    copies from a folder (data_fingerprint's sum, so it equals data_fingerprint of the copy)."""
    if location.startswith("s3://"):
        return _listing_fingerprint(_s3_objects(location, s3_endpoint_url))
    from .fingerprint import files_fingerprint

    return files_fingerprint(_folder_files(location)[0])


def _listing_fingerprint(objects: list[dict]) -> str:
    digest = hashlib.sha256()
    for item in objects:
        digest.update(f"{item['Key']}\0{item['Size']}\0{item['ETag']}\n".encode())
    return digest.hexdigest()


def _folder_files(location: str) -> tuple[list[tuple[str, Path]], int]:
    """(relative POSIX path, file) for every file fetch copies, and how many links it skips: links
    are followed only inside the data folder (the same rule as clean)."""
    source = Path(location)
    if not source.is_dir():
        raise StepError(f"data location {location} is neither an s3:// prefix nor a folder")
    files, outside = [], 0
    root = source.resolve()
    for path in sorted(source.rglob("*")):
        if path.is_symlink() and root not in path.resolve().parents:
            outside += 1
        elif path.is_file():
            files.append((path.relative_to(source).as_posix(), path))
    return files, outside


def _changed(location: str, expected: str, found: str) -> StepError:
    return StepError(
        f"the photos under {location} changed between the fingerprint task and fetch "
        f"(fingerprint {expected[:12]}…, fetched {found[:12]}…): run the pipeline again"
    )


def fetch_photos(
    location: str, dest: Path, s3_endpoint_url: str | None = None, expected_fingerprint: str | None = None
) -> int:
    """Copy (or hard-link) the photos under `location` into dest/<category>/...; returns the count.

    With `expected_fingerprint` (the fingerprint task's), what was copied must have that fingerprint.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if location.startswith("s3://"):
        import botocore.exceptions

        bucket, prefix = _split_s3(location)
        objects = _s3_objects(location, s3_endpoint_url)
        if expected_fingerprint and _listing_fingerprint(objects) != expected_fingerprint:
            raise _changed(location, expected_fingerprint, _listing_fingerprint(objects))
        client = _s3(s3_endpoint_url)
        progress = Progress(len(objects), "fetch")
        for item in objects:
            relative = item["Key"][len(prefix) :]
            target = (dest / relative).resolve()
            if dest.resolve() not in target.parents:  # a key such as "../x" must not escape dest
                raise StepError(f"refusing S3 key {item['Key']!r}: it points outside the download folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                # If-Match: the bytes listed (and fingerprinted), or an error, never a newer photo.
                body = client.get_object(Bucket=bucket, Key=item["Key"], IfMatch=item["ETag"])["Body"]
                with open(target, "wb") as handle:
                    shutil.copyfileobj(body, handle, _CHUNK)
            except botocore.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("412", "PreconditionFailed"):
                    raise StepError(
                        f"s3://{bucket}/{item['Key']} changed between the fingerprint task and fetch "
                        "(its ETag no longer matches): run the pipeline again"
                    ) from None
                raise StepError(f"cannot download s3://{bucket}/{item['Key']}: {exc}") from None
            except botocore.exceptions.BotoCoreError as exc:
                raise StepError(f"cannot download s3://{bucket}/{item['Key']}: {exc}") from None
            progress.advance()
        progress.close()
        return len(objects)
    files, outside = _folder_files(location)
    for relative, path in files:
        link_or_copy(path, dest / relative)
    if outside:
        print(f"fetch: skipped {outside} link(s) pointing outside {location}")
    if expected_fingerprint:
        from .fingerprint import data_fingerprint

        found = data_fingerprint(dest)
        if found != expected_fingerprint:
            raise _changed(location, expected_fingerprint, found)
    return len(files)
