"""Manifests: what split, balance and augment hand on, instead of folders of linked photos.

On one disk a hard link costs nothing, but in an object store (every KFP artifact on a cluster) each
link is a full copy: split, balance and augment used to store the cleaned photos three more times.
A manifest is one gzipped JSON-lines file, `manifest.jsonl.gz`, in the step's output folder:

    {"manifest": "shopvision", "version": 1, "step": "balance", "roots": {"cleaned": "/abs/CLEAN"}, "own_root": null}
    {"root": "cleaned", "path": "Apple/x.jpg", "category": "Apple", "split": "train", "group": "Apple/x",
     "copies": 3, "product_id": "x", "sha256": "..."}

A row names its photo by (root name, path relative to that root), never by an absolute path: on KFP
every artifact is mounted somewhere else in each pod. Roots are resolved when the manifest is read:
the folders the caller passes (`roots`, the CLI's `--root NAME=DIR`) win; rows under the manifest's
`own_root` (augment's new photos) lie in the manifest's own folder; otherwise the folder the root had
when the manifest was written (so `shopvision split CLEAN OUT; shopvision balance OUT BAL; shopvision
train BAL` works with no flags). A path that leaves its root or a root that cannot be found is a clear
StepError. `copies` is balance's oversampling: the row stands for that many training samples.

`sha256` is the raw photo's content hash as clean recorded it: all 64 hex digits in split's manifest
(promote matches the frozen evaluation set with them), the 64-bit prefix train logs in balance's and
augment's (the full hashes would double what those steps write), empty for a photo augment made.
Gzip because the hashes are most of a row: uncompressed, the rows of split alone are ~2% of 160 px
cleaned photos, against the goal of 1% for split and balance together.

Readers accept the folder layout too, DATA/<split>/<category>/<photo> (a user's own data, and
outputs written before manifests), and DATA/<split> of a manifest folder names that split.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from ..errors import StepError
from .dataset import SPLITS, category_photos
from .naming import atomic_write_bytes

MANIFEST_FILE = "manifest.jsonl.gz"
FORMAT = "shopvision"
VERSION = 1
HASH_PREFIX = 16  # hex digits of a content hash in balance's and augment's manifests (train logs these)
LAYOUT_ROOT = "data"  # the root name rows read from a folder layout get
COPY_MARK = ".copy"
# Names balance (`x.copy2.jpg`) and augment (`x.mirror.jpg`, `x.copy2.grain.jpg`) gave their outputs.
DERIVED_NAME = re.compile(r"\.(copy\d+|mirror|rot_cw|rot_ccw|grain)\.[^.]+$")


@dataclass(frozen=True)
class Entry:
    root: str
    path: str  # POSIX, relative to the root
    category: str
    split: str
    group: str = ""
    copies: int = 1
    product_id: str = ""
    sha256: str = ""  # the raw photo's content hash (or its prefix); "" for a photo a step made

    @property
    def file(self) -> str:
        """ "<category>/<name>": where the photo would lie in its split's folder."""
        return f"{self.category}/{PurePosixPath(self.path).name}"


@dataclass
class Manifest:
    folder: Path
    step: str
    roots: dict[str, str]  # root name -> the folder it was when written
    own_root: str | None = None  # rows under this root lie in `folder` itself
    entries: list[Entry] = field(default_factory=list)


@dataclass(frozen=True)
class Photo:
    """A photo to read: where it is, its category, and its name "<category>/<file>" in its split."""

    path: Path
    category: str
    name: str


def copy_name(name: str, k: int) -> str:
    """The name of a photo's k-th extra copy: 'x.jpg' → 'x.copy2.jpg' (balance's names before manifests)."""
    stem, dot, suffix = name.rpartition(".")
    return f"{stem}{COPY_MARK}{k}.{suffix}" if dot else f"{name}{COPY_MARK}{k}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def source_of_copy(name: str) -> str | None:
    """'x.copy3.jpg' → 'x.jpg'; None for a name that is not a copy."""
    stem, _, suffix = name.rpartition(".")
    base, mark, k = stem.rpartition(COPY_MARK)
    return f"{base}.{suffix}" if mark and k.isdigit() else None


# ------------------------------------------------------------------------------------ writing


def write_manifest(
    out: Path,
    step: str,
    entries: Iterable[Entry],
    roots: Mapping[str, Path | str],
    *,
    own_root: str | None = None,
) -> Path:
    """OUT/manifest.jsonl.gz, byte-identical for the same rows (gzip without a timestamp)."""
    entries = list(entries)
    for entry in entries:
        check_reference(entry.path)
        if entry.copies < 1:
            raise StepError(f"manifest row {entry.path}: copies must be at least 1, got {entry.copies}")
    header = {
        "manifest": FORMAT,
        "version": VERSION,
        "step": step,
        "roots": {name: str(Path(folder).resolve()) for name, folder in sorted(roots.items())},
        "own_root": own_root,
    }
    lines = [json.dumps(header, separators=(",", ":"))]
    lines += [json.dumps(asdict(e), separators=(",", ":"), ensure_ascii=False) for e in entries]
    target = Path(out) / MANIFEST_FILE
    atomic_write_bytes(target, gzip.compress(("\n".join(lines) + "\n").encode(), 9, mtime=0))
    return target


def check_reference(path: str) -> PurePosixPath:
    """A row's path must stay inside its root: relative, no '..', no backslashes, not empty."""
    pure = PurePosixPath(path)
    if not path or "\\" in path or pure.is_absolute() or ".." in pure.parts or pure.parts[:1] == (".",):
        raise StepError(f"manifest path {path!r} leaves its root (it must be relative, without '..')")
    return pure


# ------------------------------------------------------------------------------------ reading


def has_manifest(folder: Path) -> bool:
    return (Path(folder) / MANIFEST_FILE).is_file()


def read_manifest(folder: Path) -> Manifest:
    """The manifest in FOLDER; a file that is not one is a clear error, never a traceback."""
    folder = Path(folder)
    target = folder / MANIFEST_FILE
    try:
        lines = gzip.decompress(target.read_bytes()).decode("utf-8").splitlines()
        header = json.loads(lines[0])
        if header.get("manifest") != FORMAT or header.get("version") != VERSION:
            raise ValueError(f"not a version-{VERSION} shopvision manifest")
        entries = [Entry(**json.loads(line)) for line in lines[1:] if line]
    except (OSError, EOFError, ValueError, TypeError, IndexError, AttributeError) as exc:
        raise StepError(f"cannot read the manifest {target}: {type(exc).__name__}: {exc}") from None
    return Manifest(
        folder, str(header.get("step", "")), dict(header.get("roots") or {}), header.get("own_root"), entries
    )


def parse_roots(values: Sequence[str] | None) -> dict[str, Path]:
    """`NAME=DIR` texts (the CLI's --root) as {name: folder}."""
    roots: dict[str, Path] = {}
    for value in values or ():
        name, sep, folder = value.partition("=")
        if not sep or not name or not folder:
            raise StepError(f"--root {value!r}: expected NAME=DIR, e.g. cleaned=/data/cleaned")
        roots[name] = Path(folder)
    return roots


def root_folders(manifest: Manifest, roots: Mapping[str, Path | str] | None = None) -> dict[str, Path]:
    """Every root a row of MANIFEST names, as a folder here (given > own folder > as written)."""
    given = {name: Path(folder) for name, folder in (roots or {}).items()}
    folders: dict[str, Path] = {}
    for name in sorted({e.root for e in manifest.entries}):
        if name in given:
            folder = given[name]
        elif name == manifest.own_root:
            folder = manifest.folder
        elif name in manifest.roots:
            folder = Path(manifest.roots[name])
        else:
            raise StepError(
                f"the manifest in {manifest.folder} names root {name!r} without a folder: pass --root {name}=DIR"
            )
        if not folder.is_dir():
            raise StepError(
                f"root {name!r} of the manifest in {manifest.folder} is {folder}, which is not a folder here: "
                f"pass --root {name}=DIR (on the pipeline: the {name} artifact)"
            )
        folders[name] = folder
    return folders


def resolve(entry: Entry, folders: Mapping[str, Path]) -> Path:
    """Where ENTRY's photo lies, given `root_folders`; the path is checked against leaving its root."""
    return folders[entry.root] / check_reference(entry.path)


def locate(data: Path) -> tuple[Path, str | None] | None:
    """(manifest folder, None) for a manifest folder; (folder, split) for FOLDER/<split> of one; else None."""
    data = Path(data)
    if has_manifest(data):
        return data, None
    if data.name in SPLITS and not data.exists() and has_manifest(data.parent):
        return data.parent, data.name
    return None


def expand(entries: Iterable[Entry], folders: Mapping[str, Path]) -> list[Photo]:
    """One Photo per sample (a row with copies=3 is three), ordered by (category, name) as the folders
    of links were, so training sees the same sample order from a manifest as from the old layout."""
    photos = []
    for entry in entries:
        path, name = resolve(entry, folders), PurePosixPath(entry.path).name
        photos.append(Photo(path, entry.category, f"{entry.category}/{name}"))
        photos += [
            Photo(path, entry.category, f"{entry.category}/{copy_name(name, k)}")
            for k in range(1, entry.copies)
        ]
    return sorted(photos, key=lambda p: (p.category, p.name))


def split_photos(data: Path, split: str, roots: Mapping[str, Path | str] | None = None) -> list[Photo]:
    """The samples of SPLIT: from a manifest folder (copies expanded), FOLDER/<split> of one, or the
    layout DATA/<split>/<category>/<photo>; empty when the split has none."""
    found = locate(data)
    if found is not None:
        folder, named = found
        if named is not None and named != split:
            raise StepError(f"{data} is the {named} split of {folder}, not its {split} split")
        manifest = read_manifest(folder)
        rows = [e for e in manifest.entries if e.split == split]
        return expand(
            rows,
            root_folders(Manifest(folder, manifest.step, manifest.roots, manifest.own_root, rows), roots),
        )
    folder = Path(data) / split
    if not folder.is_dir():
        return []
    return [Photo(p, c, f"{c}/{p.name}") for c, files in category_photos(folder).items() for p in files]


def split_categories(data: Path, split: str, roots: Mapping[str, Path | str] | None = None) -> list[str]:
    """Sorted categories with at least one photo in SPLIT (train's labels: their indices are the classes)."""
    found = locate(data)
    if found is not None:
        return sorted({e.category for e in read_manifest(found[0]).entries if e.split == split})
    folder = Path(data) / split
    if not folder.is_dir():
        return []
    return [c for c, files in category_photos(folder).items() if files]


def has_split(data: Path, split: str) -> bool:
    """Whether DATA holds SPLIT at all (a manifest with rows for it, or a DATA/<split>/ folder)."""
    found = locate(data)
    if found is not None:
        return any(e.split == split for e in read_manifest(found[0]).entries)
    return (Path(data) / split).is_dir()


def photos_fingerprint(photos: Sequence[Photo]) -> str:
    """data_fingerprint's sum over the photos by name: the same as a folder of them had."""
    from .fingerprint import files_fingerprint

    return files_fingerprint(sorted({(p.name, p.path) for p in photos}))


# ------------------------------------------------------------------------------------ a step's input


def input_manifest(data: Path) -> Manifest:
    """What balance and augment read: a manifest, or a folder layout turned into one.

    A layout's rows are under root "data" (DATA itself) with paths `<split>/<category>/<photo>`; a
    photo named as a copy of a sibling (x.copy2.jpg from balance before manifests) is folded into
    that sibling's `copies`. Content hashes come from DATA/split.json when it lists them (an output
    written before manifests), else from the files' bytes (a user's own photos); copies and photos a
    step made (augment's `x.mirror.jpg`) get none, as train's photo log never counted them.
    """
    data = Path(data)
    if has_manifest(data):
        return read_manifest(data)
    known = _split_json_hashes(data)
    entries: list[Entry] = []
    for split in SPLITS:
        if not (data / split).is_dir():
            continue
        for category, files in category_photos(data / split).items():
            names = {p.name for p in files}
            copies = {p.name: 1 for p in files}
            for p in files:
                source = source_of_copy(p.name)
                if source in names:
                    copies[source] += 1
                    del copies[p.name]
            for p in files:
                if p.name not in copies:
                    continue
                file = f"{category}/{p.name}"
                derived = DERIVED_NAME.search(p.name) is not None
                sha = "" if derived else known.get((split, file)) or file_sha256(p)
                entries.append(
                    Entry(LAYOUT_ROOT, f"{split}/{file}", category, split, "", copies[p.name], "", sha)
                )
    if not entries:
        raise StepError(
            f"no photos in {data}: expected {data}/{MANIFEST_FILE} or {data}/<split>/<category>/<photo>"
        )
    return Manifest(data, "layout", {LAYOUT_ROOT: str(data.resolve())}, None, entries)


def _split_json_hashes(data: Path) -> dict[tuple[str, str], str]:
    target = data / "split.json"
    if not target.is_file():
        return {}
    try:
        photos = json.loads(target.read_text()).get("photos", [])
        return {(p["split"], p["file"]): p["sha256"] for p in photos if isinstance(p, dict)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def carried_roots(manifest: Manifest, roots: Mapping[str, Path | str] | None = None) -> dict[str, Path | str]:
    """The roots a manifest derived from MANIFEST records: as given here, else as MANIFEST had them
    (its own root, if rows of it are carried, is its folder)."""
    carried: dict[str, Path | str] = dict(manifest.roots)
    if manifest.own_root:
        carried[manifest.own_root] = manifest.folder
    carried.update(roots or {})
    return carried
