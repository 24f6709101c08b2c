"""The frozen evaluation set of a registered model, and the training photos each version saw.

A gate is only as good as its test photos. If every pipeline run re-split the data, the champion
and the candidate would each be scored on photos the other may have trained on, and a "better"
candidate could just be one that saw more of the test set. So:

- The first promotion of a registered model that reaches a decision (promoted or not) freezes the
  content hashes (SHA-256 of the raw photo, as `split.json` lists them) of the test photos it was
  scored on (less any a model there trained on), with their categories, in a JSON
  file `{"model", "created_version", "fingerprint", "photos": {sha256: category}}`. It is logged to
  the candidate version's source run (`evaluation_set/<fingerprint[:16]>/frozen_test_set.json`, a new
  path per content, so a stored file never changes) and the registered model's tags point to it:
  `evaluation_set.uri`, `evaluation_set.fingerprint` (sha256 over the sorted hashes, one per line),
  `evaluation_set.photos`, `evaluation_set.created_version`, `evaluation_set.updated_version`.
- Later promotions score on those photos wherever the given data holds them (any split: a split
  that ignored the set is caught by the training-overlap check instead); photos of the set that are
  not in the data are counted as missing and reported. The stored category is the label.
- New test photos of the data are added to the set (never removed from it) unless the promotion
  says not to, and only those that neither model trained on; when a model's training photos are
  unknown nothing is added, since nothing can be checked.
- `fetch_frozen_set` writes the current set to a file for `split`, which keeps those photos in test.

Training photos: the train step logs `data/training_photos.txt.gz` on every training run (gzip
text, the first 16 hex characters of each train and val photo's content hash, sorted, unique);
`training_prefixes` reads it back through the version's `source_run_id`. 16 hex digits (64 bits)
make an accidental collision among a few million photos a ~1e-7 event while keeping the file small.
A version whose run has no such file (trained before this record existed, or outside the pipeline)
has unknown training photos; the gate refuses it unless told otherwise (see promotion.py).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import StepError

FROZEN_SET_FILE = "frozen_test_set.json"
FROZEN_SET_DIR = "evaluation_set"
TRAINING_PHOTOS_ARTIFACT = "data/training_photos.txt.gz"
PREFIX_LENGTH = 16
TAG_URI = "evaluation_set.uri"
TAG_FINGERPRINT = "evaluation_set.fingerprint"
TAG_PHOTOS = "evaluation_set.photos"
TAG_CREATED = "evaluation_set.created_version"
TAG_UPDATED = "evaluation_set.updated_version"
ORPHAN_EXPERIMENT = "shopvision-evaluation-sets"  # for a version registered without a run


def set_fingerprint(hashes: Iterable[str]) -> str:
    """sha256 over the sorted content hashes, one per line (no trailing newline)."""
    return hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()


def prefix(sha256: str) -> str:
    return sha256[:PREFIX_LENGTH].lower()


# ------------------------------------------------------------------------------ the frozen set


@dataclass
class FrozenSet:
    model: str
    created_version: str
    photos: dict[str, str] = field(default_factory=dict)  # content hash -> category

    @property
    def fingerprint(self) -> str:
        return set_fingerprint(self.photos)

    def to_json(self) -> str:
        body = {
            "model": self.model,
            "created_version": self.created_version,
            "fingerprint": self.fingerprint,
            "photos": dict(sorted(self.photos.items())),
        }
        return json.dumps(body, indent=1) + "\n"


def read_frozen_set(path: Path) -> FrozenSet | None:
    """The set in a file written by `fetch_frozen_set` or the gate; None for an empty `{}` file."""
    try:
        body = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise StepError(f"cannot read the frozen evaluation set {path}: {exc}") from None
    if not body:
        return None
    try:
        frozen = FrozenSet(str(body["model"]), str(body["created_version"]), dict(body["photos"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise StepError(f"{path} is not a frozen evaluation set: {type(exc).__name__}: {exc}") from None
    if body.get("fingerprint") and body["fingerprint"] != frozen.fingerprint:
        raise StepError(f"{path}: the photos do not match the stored fingerprint (the file was changed)")
    return frozen


def load_frozen_set(client, name: str, tracking_uri: str) -> FrozenSet | None:
    """The registered model's current set, checked against its fingerprint tag; None before the first.

    A set the tags point to but that cannot be read is an error, never "no set yet": starting a new
    set then would silently unfreeze the old one.
    """
    import mlflow

    tags = client.get_registered_model(name).tags or {}
    uri = tags.get(TAG_URI)
    if not uri:
        return None
    with tempfile.TemporaryDirectory(prefix="shopvision-evalset-") as scratch:
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=scratch, tracking_uri=tracking_uri
            )
        except Exception as exc:  # MLflow, requests and OS errors all mean "cannot fetch"
            raise StepError(
                f"{name}'s frozen evaluation set {uri} cannot be fetched ({type(exc).__name__}); "
                "refusing to score on anything else"
            ) from None
        frozen = read_frozen_set(Path(local))
    if frozen is None or frozen.fingerprint != tags.get(TAG_FINGERPRINT):
        raise StepError(f"{name}'s frozen evaluation set {uri} does not match its tag {TAG_FINGERPRINT}")
    return frozen


def store_frozen_set(client, name: str, frozen: FrozenSet, version: str, run_id: str | None) -> str:
    """Log the set to the version's source run (or a run of its own) and point the model's tags at it."""
    if not run_id:
        experiment = client.get_experiment_by_name(ORPHAN_EXPERIMENT)
        experiment_id = (
            experiment.experiment_id if experiment else client.create_experiment(ORPHAN_EXPERIMENT)
        )
        run_id = client.create_run(experiment_id, run_name=f"{name}-evaluation-set").info.run_id
    folder = f"{FROZEN_SET_DIR}/{frozen.fingerprint[:16]}"
    with tempfile.TemporaryDirectory(prefix="shopvision-evalset-") as scratch:
        path = Path(scratch) / FROZEN_SET_FILE
        path.write_text(frozen.to_json())
        client.log_artifact(run_id, str(path), folder)
    uri = f"runs:/{run_id}/{folder}/{FROZEN_SET_FILE}"
    # The fingerprint is written before the URI: a reader between the two sees the new fingerprint
    # with the old file and refuses, rather than trusting a mismatched pair.
    for key, value in (
        (TAG_FINGERPRINT, frozen.fingerprint),
        (TAG_URI, uri),
        (TAG_PHOTOS, str(len(frozen.photos))),
        (TAG_CREATED, frozen.created_version),
        (TAG_UPDATED, version),
    ):
        client.set_registered_model_tag(name, key, value)
    return uri


def fetch_frozen_set(name: str, dest: Path, tracking_uri: str | None = None) -> Path | None:
    """Write NAME's current frozen set to DEST and return DEST; write `{}` and return None when the
    registered model or its set does not exist yet (the pipeline runs this before its first model)."""
    from mlflow.exceptions import MlflowException

    from .register import connect

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    client, uri = connect(tracking_uri)
    try:
        frozen = load_frozen_set(client, name, uri)
    except MlflowException as exc:
        if getattr(exc, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
            raise StepError(f"cannot read registered model {name!r}: {exc}") from None
        frozen = None
    dest.write_text(frozen.to_json() if frozen else "{}\n")
    return dest if frozen else None


# ------------------------------------------------------------------------------ training photos


def write_training_photos(path: Path, hashes: Iterable[str]) -> Path:
    """The compact record of a run's train and val photos (what train logs as TRAINING_PHOTOS_ARTIFACT)."""
    lines = sorted({prefix(h) for h in hashes})
    with gzip.open(path, "wt", encoding="ascii") as handle:
        handle.write("".join(f"{line}\n" for line in lines))
    return Path(path)


def read_training_photos(path: Path) -> set[str]:
    try:
        with gzip.open(path, "rt", encoding="ascii") as handle:
            return {prefix(line.strip()) for line in handle if line.strip()}
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise StepError(f"cannot read training photos {path}: {exc}") from None


def training_prefixes(client, run_id: str | None, tracking_uri: str) -> set[str] | None:
    """The hash prefixes of the run's train/val photos, or None when the run recorded none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    folder = TRAINING_PHOTOS_ARTIFACT.rsplit("/", 1)[0]
    try:
        listed = {a.path for a in client.list_artifacts(run_id, folder)}
    except MlflowException:
        return None  # the run is gone: nothing recorded that can be checked
    if TRAINING_PHOTOS_ARTIFACT not in listed:
        return None
    with tempfile.TemporaryDirectory(prefix="shopvision-trained-") as scratch:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id,
                artifact_path=TRAINING_PHOTOS_ARTIFACT,
                dst_path=scratch,
                tracking_uri=tracking_uri,
            )
        except Exception as exc:  # listed but not fetchable: an error, not "unknown"
            raise StepError(f"cannot fetch {TRAINING_PHOTOS_ARTIFACT} of run {run_id}: {exc}") from None
        return read_training_photos(Path(local))


# ------------------------------------------------------------------------------ scoring photos


@dataclass(frozen=True)
class EvaluationPhoto:
    sha256: str
    category: str
    path: Path


@dataclass
class DataPhotos:
    """The photos of the data given to promote, by content hash (first seen wins, test split first)."""

    root: Path
    by_hash: dict[str, EvaluationPhoto]
    test_hashes: list[str]  # the data's own test split, sorted


def data_photos(data: Path, roots: Mapping[str, Path] | None = None) -> DataPhotos:
    """Read split's output (a manifest), a split root in the folder layout (with or without
    split.json), its test/ folder, or a plain <category>/ folder.

    Given the test/ folder of a split root that has a split.json (or SPLIT/test of a manifest), the
    root's record is read: its hashes are the raw photos', which a cleaned file's own hash would not
    match. `roots` says where the photos a manifest references lie here.
    """
    from ..data.dataset import SPLITS
    from ..data.manifest import locate
    from ..data.split import MANIFEST, read_split_photos

    data = Path(data)
    found = locate(data)
    if found is not None:
        return _manifest_photos(found[0], roots)
    if not data.is_dir():
        raise StepError(f"test data {data} does not exist or is not a folder")
    root = data
    if not (data / MANIFEST).is_file() and data.name in SPLITS and (data.parent / MANIFEST).is_file():
        root = data.parent
    rows = []
    for photo in read_split_photos(root, SPLITS):
        path = photo.path(root)
        if not path.is_file():
            path = root / photo.file  # a plain <category>/ folder read as the test split
        rows.append((photo.sha256, photo.category, photo.split, photo.file, path))
    return _by_content(rows, root, str(data))


def _by_content(rows: list[tuple[str, str, str, str, Path]], root: Path, where: str) -> DataPhotos:
    """DataPhotos from (sha256, category, split, file, path) rows: the first photo on disk of each
    content hash, test rows first, so a photo in test and elsewhere counts as test."""
    by_hash: dict[str, EvaluationPhoto] = {}
    test: set[str] = set()
    for sha256, category, split, _, path in sorted(rows, key=lambda r: (r[2] != "test", r[2], r[3])):
        if sha256 in by_hash or not path.is_file():
            continue
        by_hash[sha256] = EvaluationPhoto(sha256, category, path)
        if split == "test":
            test.add(sha256)
    if not by_hash:
        raise StepError(f"no photos found in {where}")
    return DataPhotos(root, by_hash, sorted(test))


def _manifest_photos(folder: Path, roots: Mapping[str, Path] | None) -> DataPhotos:
    """DataPhotos of a manifest: its originals by full content hash (test rows first)."""
    from ..data.manifest import read_manifest, resolve, root_folders

    manifest = read_manifest(folder)
    originals = [e for e in manifest.entries if e.sha256]
    if any(len(e.sha256) != 64 for e in originals):
        raise StepError(
            f"the manifest in {folder} ({manifest.step}'s output) holds hash prefixes, not the full content "
            "hashes the frozen evaluation set is matched on: give split's output"
        )
    folders = root_folders(manifest, roots)
    rows = [(e.sha256, e.category, e.split, e.file, resolve(e, folders)) for e in originals]
    return _by_content(rows, folder, f"the manifest in {folder}")


@dataclass
class EvaluationSet:
    photos: list[EvaluationPhoto]  # what both models are scored on
    frozen: FrozenSet  # the set after this promotion
    stored: FrozenSet | None  # the set the registry held before
    missing: int = 0  # photos of the stored set not in the data
    added: int = 0  # new test photos added to the set
    excluded: int = 0  # new test photos left out because a model trained on them
    relabelled: int = 0  # photos whose category in the data differs from the frozen one
    not_extended: str | None = None  # why new test photos were not considered

    @property
    def changed(self) -> bool:
        return self.stored is None or self.stored.fingerprint != self.frozen.fingerprint


def scoring_pool(data: DataPhotos, stored: FrozenSet | None) -> list[EvaluationPhoto]:
    """Every photo an evaluation set could hold here: the stored photos found, then new test photos.

    Models are scored once on this pool; the evaluation set is a subset, so a re-check against a
    new champion (whose training photos may exclude other new photos) needs no re-scoring.
    """
    frozen = stored.photos if stored else {}
    found = [
        EvaluationPhoto(h, category, data.by_hash[h].path)
        for h, category in sorted(frozen.items())
        if h in data.by_hash
    ]
    return found + [data.by_hash[h] for h in data.test_hashes if h not in frozen]


def evaluation_set(
    name: str,
    version: str,
    data: DataPhotos,
    stored: FrozenSet | None,
    *,
    trained_on: Mapping[str, set[str] | None],
    add_new: bool = True,
) -> EvaluationSet:
    """The photos to score on and the set to store, from the stored set, the data and the models'
    training photos (`trained_on`: version -> hash prefixes, None when unknown)."""
    frozen = dict(stored.photos) if stored else {}
    photos = [p for p in scoring_pool(data, stored) if p.sha256 in frozen]
    result = EvaluationSet(
        photos, FrozenSet(name, stored.created_version if stored else version, frozen), stored
    )
    result.missing = sum(1 for h in frozen if h not in data.by_hash)
    result.relabelled = sum(1 for p in photos if data.by_hash[p.sha256].category != p.category)
    unknown = sorted(v for v, prefixes in trained_on.items() if prefixes is None)
    if stored is not None and not add_new:
        result.not_extended = "new test photos not added (--no-add-test-photos)"
    elif stored is not None and unknown:
        result.not_extended = (
            f"new test photos not added: the training photos of v{', v'.join(unknown)} are unknown"
        )
    else:
        known = set().union(*(p for p in trained_on.values() if p is not None))
        for h in data.test_hashes:
            if h in frozen:
                continue
            if prefix(h) in known:
                result.excluded += 1
                continue
            frozen[h] = data.by_hash[h].category
            photos.append(data.by_hash[h])
            result.added += 1
    if not photos:
        trained = f"; {result.excluded} test photos were left out as trained on" if result.excluded else ""
        raise StepError(
            f"nothing to score: none of the {len(frozen) or len(data.test_hashes)} photos of {name}'s "
            f"evaluation set are in {data.root}{trained}"
        )
    return result
