"""Where the raw photos come from: a local folder or an s3:// prefix (any S3 endpoint, MinIO too).

The pipeline's first task fingerprints the location without copying anything (cheap and never
cached), and the fetch task takes that fingerprint as an argument: the fetch and every later step
are served from the cache exactly when the photos are byte-for-byte the ones seen before.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import StepError
from ..progress import Progress
from .naming import link_or_copy


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
    """A content fingerprint: S3 ETags and sizes (no download), or file contents for a folder."""
    if location.startswith("s3://"):
        digest = hashlib.sha256()
        for item in _s3_objects(location, s3_endpoint_url):
            digest.update(f"{item['Key']}\0{item['Size']}\0{item['ETag']}\n".encode())
        return digest.hexdigest()
    from .fingerprint import data_fingerprint

    if not Path(location).is_dir():
        raise StepError(f"data location {location} is neither an s3:// prefix nor a folder")
    return data_fingerprint(Path(location))


def fetch_photos(location: str, dest: Path, s3_endpoint_url: str | None = None) -> int:
    """Copy (or hard-link) the photos under `location` into dest/<category>/...; returns the count."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if location.startswith("s3://"):
        import botocore.exceptions

        bucket, prefix = _split_s3(location)
        objects = _s3_objects(location, s3_endpoint_url)
        client = _s3(s3_endpoint_url)
        progress = Progress(len(objects), "fetch")
        for item in objects:
            relative = item["Key"][len(prefix) :]
            target = (dest / relative).resolve()
            if dest.resolve() not in target.parents:  # a key such as "../x" must not escape dest
                raise StepError(f"refusing S3 key {item['Key']!r}: it points outside the download folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                client.download_file(bucket, item["Key"], str(target))
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                raise StepError(f"cannot download s3://{bucket}/{item['Key']}: {exc}") from None
            progress.advance()
        progress.close()
        return len(objects)
    source = Path(location)
    if not source.is_dir():
        raise StepError(f"data location {location} is neither an s3:// prefix nor a folder")
    count, outside = 0, 0
    root = source.resolve()
    for path in sorted(source.rglob("*")):
        if path.is_symlink() and root not in path.resolve().parents:
            outside += 1  # the same rule as clean: links are followed only inside the data folder
        elif path.is_file():
            link_or_copy(path, dest / path.relative_to(source))
            count += 1
    if outside:
        print(f"fetch: skipped {outside} link(s) pointing outside {location}")
    return count
