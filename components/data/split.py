"""The split step: train / val / test by look-alike group, on cleaned photos, before any copying.

A number is only worth the photos behind it, so split keeps together every photo that would let a
model recognise a test photo instead of classifying it:

- photos of one product (the id clean recorded from the raw path: `<product_id>[_<n>].jpg`, or the
  listing folder of `RAW/<category>/<listing>/<n>.jpg`);
- photos that look alike beyond clean's duplicate radius: the same shelf shot again, the same item
  re-photographed under another id. Photos are embedded with the ImageNet EfficientNet-Lite0 that
  ships offline (`lookalike.py`) and linked when their cosine similarity reaches `similarity`; the
  linked photos of a category form one group (single linkage, strongest links first). A link that
  would make a group hold more than `max_group_share` of its category is refused and counted: past
  that size a "session" is the category itself and splitting it would leave nothing to test.

A group's split depends only on its key (the group member whose seeded hash ranks first) and the seed,
never on the other groups, so adding photos, products or categories does not move the photos that
were already assigned. Two exceptions, both stated in the summary: a group a new photo joins follows
its first-ranked product (look-alikes must stay together, so a grown group can move), and a category
none of whose groups hashed to train has its first-ranked group sent to train (a model cannot learn
a category it never sees). Photos of the frozen evaluation set (content hashes from the registry) and
their whole groups always go to test, whatever the hash says.

Split copies no photo: it writes a manifest (`manifest.py`), one row per photo with its reference
into the cleaned folder (root "cleaned"), category, split, group, product id and content hash (the
raw file's SHA-256 from clean's report), and `split.json`, the record of the run (fractions, counts,
groups, warnings). `read_split_photos` gives the hashes to the steps that check overlaps (train,
promote).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import StepError
from .dataset import SPLITS, category_photos, prepare_output
from .manifest import (
    DERIVED_NAME,
    HASH_PREFIX,
    MANIFEST_FILE,
    Entry,
    file_sha256,
    has_manifest,
    read_manifest,
    write_manifest,
)
from .naming import atomic_write_text, product_id
from .near_duplicates import UnionFind

MANIFEST = "split.json"
CLEAN_REPORT = "clean_report.json"
DEFAULT_SIMILARITY = 0.82
DEFAULT_MAX_GROUP_SHARE = 0.5
LOOKALIKE_MODES = ("embedding", "none")
CLEANED_ROOT = "cleaned"  # the root name split's manifest rows refer to


@dataclass
class SplitPhoto:
    file: str  # "<category>/<name>", relative to the split folder of `split`
    category: str
    product_id: str
    sha256: str  # content hash: the raw photo's SHA-256 (clean report), else this file's
    group: str = ""
    split: str = ""

    def path(self, root: Path) -> Path:
        """Where the photo lies under a split root in the folder layout (split's output before manifests)."""
        return Path(root) / self.split / self.file

    def entry(self) -> Entry:
        """Its row in split's manifest: a reference into the cleaned folder, not a copy."""
        return Entry(
            CLEANED_ROOT, self.file, self.category, self.split, self.group, 1, self.product_id, self.sha256
        )


@dataclass
class SplitResult:
    seed: int
    fractions: dict[str, float]
    lookalike: dict
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # category -> split -> photos
    photos: list[SplitPhoto] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    frozen: dict = field(default_factory=dict)

    @property
    def assignments(self) -> dict[str, str]:
        return {p.file: p.split for p in self.photos}

    def group_sizes(self) -> dict[str, int]:
        return dict(Counter(p.group for p in self.photos))

    def groups_summary(self) -> dict:
        sizes = self.group_sizes()
        histogram = Counter(sizes.values())
        largest = sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
        return {
            "groups": len(sizes),
            "photos_in_shared_groups": sum(n for n in sizes.values() if n > 1),
            "size_histogram": {str(k): v for k, v in sorted(histogram.items())},
            "largest": [{"group": g, "photos": n} for g, n in largest],
        }

    def to_json(self) -> str:
        body = {
            "step": "split",
            "seed": self.seed,
            "fractions": self.fractions,
            "lookalike": self.lookalike,
            "counts": self.counts,
            "groups": self.groups_summary(),
            "frozen": self.frozen,
            "warnings": self.warnings,
            "photo_count": len(self.photos),
            "manifest": MANIFEST_FILE,  # each photo's split, group and hash: one row each, gzipped
        }
        return json.dumps(body, indent=1) + "\n"


# ------------------------------------------------------------------------------------ reading


def _clean_records(clean_dir: Path) -> dict[str, dict]:
    """{"<category>/<name>": report entry} of the photos clean kept; empty without a report."""
    report = clean_dir / CLEAN_REPORT
    if not report.is_file():
        return {}
    try:
        files = json.loads(report.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StepError(f"cannot read {report}: {exc}") from None
    return {f["output"]: f for f in files if f.get("status") == "kept" and f.get("output")}


def cleaned_photos(clean_dir: Path) -> list[SplitPhoto]:
    """Every photo of a cleaned folder with its category, product id and content hash.

    Product ids and hashes come from clean's report (so a listing folder keeps its id after clean
    flattened it); photos the report does not name (a user's own folder) are read from their names.
    """
    records = _clean_records(clean_dir)
    photos = []
    for category, files in category_photos(clean_dir).items():
        for path in files:
            file = f"{category}/{path.name}"
            record = records.get(file)
            if record and record.get("sha256"):
                photos.append(
                    SplitPhoto(
                        file, category, record.get("product_id") or product_id(path.name), record["sha256"]
                    )
                )
            else:
                photos.append(SplitPhoto(file, category, product_id(path.name), file_sha256(path)))
    return photos


def read_split_photos(root: Path, splits: Iterable[str] = SPLITS) -> list[SplitPhoto]:
    """The original photos of the given splits under ROOT, with content hashes and groups.

    ROOT is a step's output with a manifest (split, balance, augment: rows with a content hash are
    originals; balance's copies are a count and augment's new photos have no hash), or a folder
    layout: with a split.json that lists photos (split's output before manifests) those photos, else
    ROOT/<split>/<category>/ files hashed as they are (a ROOT that is itself a `<category>/` folder
    counts as the test split; balance copies and augment outputs are not originals and are skipped).
    No photo is opened for a manifest: the hashes are in it.
    """
    root = Path(root)
    wanted = set(splits)
    if has_manifest(root):
        return [
            SplitPhoto(e.file, e.category, e.product_id, e.sha256, e.group, e.split)
            for e in read_manifest(root).entries
            if e.split in wanted and e.sha256
        ]
    manifest = root / MANIFEST
    if manifest.is_file():
        try:
            body = json.loads(manifest.read_text())
            entries = body["photos"]
            return [SplitPhoto(**entry) for entry in entries if entry["split"] in wanted]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StepError(f"{manifest} is not a split manifest with photos: {exc}") from None
    subfolders = (
        {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
        if root.is_dir()
        else set()
    )
    if not subfolders:
        raise StepError(f"{root} holds no photos (expected {root}/<split>/<category>/<photo>)")
    layout = {s: root / s for s in SPLITS if s in subfolders} if subfolders <= set(SPLITS) else {"test": root}
    photos = []
    for split_name, folder in layout.items():
        if split_name not in wanted:
            continue
        for category, files in category_photos(folder).items():
            for path in files:
                if DERIVED_NAME.search(path.name):  # balance copies and augment outputs are not originals
                    continue
                photos.append(
                    SplitPhoto(
                        f"{category}/{path.name}",
                        category,
                        product_id(path.name),
                        file_sha256(path),
                        "",
                        split_name,
                    )
                )
    return photos


# HASH_PREFIX (16): hex characters of a content hash kept in a run's training photo list (64 bits)


def write_hash_prefixes(root: Path, splits: Iterable[str], target: Path) -> int:
    """Write the sorted unique hash prefixes of ROOT's photos in SPLITS as gzip text; returns the count.

    64 bits per photo: a million photos make an 8 MB list, and two different photos share a prefix
    with odds of about one in 2^40 at that size.
    """
    import gzip

    prefixes = sorted({p.sha256[:HASH_PREFIX] for p in read_split_photos(root, splits)})
    target.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(target, "wt", encoding="ascii") as handle:
        handle.writelines(f"{prefix}\n" for prefix in prefixes)
    return len(prefixes)


def read_frozen_hashes(path: Path | None) -> set[str]:
    """Content hashes of a frozen evaluation set file (`{"photos": {sha256: category}}`), or none."""
    if path is None:
        return set()
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return set()
    try:
        body = json.loads(path.read_text())
        return {str(h) for h in body.get("photos", {})}
    except (OSError, ValueError, AttributeError) as exc:
        raise StepError(f"cannot read the frozen evaluation set {path}: {exc}") from None


# ------------------------------------------------------------------------------------ grouping


def rank(seed: int, category: str, product: str) -> str:
    return hashlib.sha256(f"{seed}\0{category}\0{product}".encode()).hexdigest()


def split_of(seed: int, category: str, product: str, val: float, test: float) -> str:
    """The split of a group from its key alone: a point in [0, 1) against the fractions.

    The point is a second hash, not the rank that chose the key: the key is the group's smallest
    rank, and a minimum of many ranks is small, which would send every large group to test.
    """
    digest = hashlib.sha256(f"{seed}\0split\0{category}\0{product}".encode()).hexdigest()
    point = int(digest[:15], 16) / 16**15
    if point < test:
        return "test"
    if point < test + val:
        return "val"
    return "train"


def group_photos(
    photos: list[SplitPhoto],
    links: Iterable[tuple[float, int, int]],
    *,
    seed: int,
    max_group_share: float,
) -> tuple[dict[int, str], dict[str, int]]:
    """Each photo's group key ("<category>/<product>" of its first-ranked product) and refused links per category.

    Photos of one (category, product) are one group; `links` (similarity, i, j) join groups,
    strongest first, unless the joined group would hold more than `max_group_share` of the category.
    """
    union = UnionFind(len(photos))
    first_of: dict[tuple[str, str], int] = {}
    for i, photo in enumerate(photos):
        j = first_of.setdefault((photo.category, photo.product_id), i)
        if j != i:
            union.union(i, j)
    per_category = Counter(p.category for p in photos)
    refused: Counter[str] = Counter()
    for _, i, j in sorted(links, key=lambda link: -link[0]):
        category = photos[i].category
        if photos[j].category != category:
            continue  # across categories a look-alike is a label conflict, which clean already drops
        ri, rj = union.find(i), union.find(j)
        if ri == rj:
            continue
        cap = max(2, int(max_group_share * per_category[category]))
        if union.size[ri] + union.size[rj] > cap:
            refused[category] += 1
            continue
        union.union(ri, rj)
    best: dict[int, tuple[str, str]] = {}
    for i, photo in enumerate(photos):
        root = union.find(i)
        candidate = (rank(seed, photo.category, photo.product_id), photo.product_id)
        if root not in best or candidate < best[root]:
            best[root] = candidate
    return {i: f"{photo.category}/{best[union.find(i)][1]}" for i, photo in enumerate(photos)}, dict(refused)


# ------------------------------------------------------------------------------------ the step


def split(
    clean_dir: Path,
    out: Path,
    *,
    val: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
    lookalike: str = "embedding",
    similarity: float = DEFAULT_SIMILARITY,
    max_group_share: float = DEFAULT_MAX_GROUP_SHARE,
    frozen: Path | Collection[str] | None = None,
    progress=None,
) -> SplitResult:
    clean_dir, out = Path(clean_dir), Path(out)
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise StepError(
            f"--val and --test must be fractions in [0, 1) that sum below 1, got {val} and {test}"
        )
    if lookalike not in LOOKALIKE_MODES:
        raise StepError(f"--lookalike must be one of {', '.join(LOOKALIKE_MODES)}, got {lookalike!r}")
    if not 0 < similarity <= 1:
        raise StepError(f"--similarity must be in (0, 1], got {similarity}")
    if not 0 < max_group_share <= 1:
        raise StepError(f"--max-group-share must be in (0, 1], got {max_group_share}")
    frozen_hashes = (
        set(frozen)
        if isinstance(frozen, Collection) and not isinstance(frozen, str | Path)
        else read_frozen_hashes(frozen)
    )
    photos = cleaned_photos(clean_dir)
    if not photos:
        raise StepError(f"no photos found in {clean_dir}: expected {clean_dir}/<category>/<photo>.jpg")
    prepare_output(out, MANIFEST, "split")
    links: list[tuple[float, int, int]] = []
    if lookalike == "embedding":
        from ..progress import Progress
        from .lookalike import lookalike_links

        bar = Progress(len(photos), "split: look-alike embeddings")
        done = [0]

        def advance(count: int, _total: int) -> None:
            bar.advance(count - done[0])
            done[0] = count

        links = lookalike_links(
            [clean_dir / p.file for p in photos],
            [p.category for p in photos],
            similarity,
            progress=progress or advance,
        )
        bar.close()
    groups, refused = group_photos(photos, links, seed=seed, max_group_share=max_group_share)
    result = SplitResult(
        seed,
        {"train": round(1 - val - test, 6), "val": val, "test": test},
        {
            "mode": lookalike,
            "similarity": similarity,
            "max_group_share": max_group_share,
            "links": len(links),
            "refused_links": sum(refused.values()),
        },
    )
    assign_splits(photos, groups, result, val=val, test=test, seed=seed, frozen=frozen_hashes)
    if refused:
        worst = sorted(refused.items(), key=lambda kv: (-kv[1], kv[0]))
        shown = ", ".join(f"{c} {n}" for c, n in worst[:8]) + (", ..." if len(worst) > 8 else "")
        result.warnings.append(
            f"{sum(refused.values())} look-alike link(s) in {len(refused)} categories refused because the "
            f"group would hold more than {max_group_share:.0%} of its category (its look-alikes may straddle "
            f"splits): {shown}"
        )
    write_manifest(out, "split", [p.entry() for p in result.photos], {CLEANED_ROOT: clean_dir})
    atomic_write_text(out / MANIFEST, result.to_json())
    return result


def assign_splits(
    photos: list[SplitPhoto],
    groups: dict[int, str],
    result: SplitResult,
    *,
    val: float,
    test: float,
    seed: int,
    frozen: set[str],
) -> None:
    """Set each photo's group and split (its group's own hash; frozen groups to test) into RESULT."""
    members: dict[str, list[int]] = defaultdict(list)
    for i in range(len(photos)):
        members[groups[i]].append(i)
    wanted_splits = 1 + (val > 0) + (test > 0)
    by_category: dict[str, list[str]] = defaultdict(list)
    for key in members:
        by_category[key.split("/", 1)[0]].append(key)
    frozen_found = 0
    for category, keys in sorted(by_category.items()):
        chosen: dict[str, str] = {}
        for key in keys:
            if any(photos[i].sha256 in frozen for i in members[key]):
                chosen[key] = "test"
            elif len(keys) < wanted_splits:
                chosen[key] = "train"
            else:
                chosen[key] = split_of(seed, category, key.split("/", 1)[1], val, test)
        if len(keys) < wanted_splits:
            result.warnings.append(
                f"category {category!r} has {sum(len(members[k]) for k in keys)} photo(s) in {len(keys)} "
                f"look-alike group(s): it needs at least {wanted_splits} groups to appear in every split, "
                "so its photos go to train"
            )
        if "train" not in chosen.values():
            # A model cannot learn a category it never sees: the first-ranked group that is not frozen trains.
            spare = sorted(
                (k for k in keys if not _is_frozen(k, members, photos, frozen)),
                key=lambda k: rank(seed, category, k.split("/", 1)[1]),
            )
            if spare:
                chosen[spare[0]] = "train"
                result.warnings.append(f"category {category!r}: no group hashed to train; {spare[0]} trains")
        counts = dict.fromkeys(SPLITS, 0)
        for key in keys:
            for i in members[key]:
                photo = photos[i]
                photo.group, photo.split = key, chosen[key]
                counts[chosen[key]] += 1
                frozen_found += photo.sha256 in frozen
        result.counts[category] = counts
    result.photos = sorted(photos, key=lambda p: p.file)
    if frozen:
        result.frozen = {"photos": len(frozen), "found": frozen_found, "missing": len(frozen) - frozen_found}
        if frozen_found < len(frozen):
            result.warnings.append(
                f"{len(frozen) - frozen_found} photo(s) of the frozen evaluation set are not in this data"
            )


def _is_frozen(key, members, photos, frozen) -> bool:
    return any(photos[i].sha256 in frozen for i in members[key])


def summary(result: SplitResult) -> str:
    totals = {s: sum(c[s] for c in result.counts.values()) for s in SPLITS}
    groups = result.groups_summary()
    lines = [
        f"split: {len(result.counts)} categories; "
        + ", ".join(f"{s} {n}" for s, n in totals.items())
        + f"; {groups['groups']} look-alike groups ({groups['photos_in_shared_groups']} photos share one)"
    ]
    if result.frozen:
        lines.append(
            f"  frozen evaluation set: {result.frozen['found']} of {result.frozen['photos']} photos kept in test"
        )
    lines += [f"  warning: {w}" for w in result.warnings]
    return "\n".join(lines)
