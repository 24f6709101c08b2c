"""Manifests, not copies, between the data steps (issue 19): split, balance and augment hand on
references into the cleaned photos; train, evaluate and features read them; the folder layout
stays accepted; the verdicts of split are those it gave when it wrote folders of links."""

import gzip
import json
import os
from collections import Counter
from pathlib import Path

import pytest

from shopvision.components.data.augment import augment
from shopvision.components.data.balance import balance
from shopvision.components.data.clean import clean
from shopvision.components.data.manifest import (
    MANIFEST_FILE,
    Entry,
    read_manifest,
    split_categories,
    split_photos,
    write_manifest,
)
from shopvision.components.data.split import read_split_photos, split
from shopvision.components.errors import StepError
from shopvision.components.training.train_data import PhotoFolder, train_labels

BEFORE = Path(__file__).parent / "data" / "split_sample_before.json.gz"


def _written(folder: Path) -> int:
    """Bytes under FOLDER with every hard link counted as a full copy (what an object store holds)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def cleaned_160(sample_raw, tmp_path_factory) -> Path:
    """The sample cleaned at the demo pipeline's size (160 px): photo sizes a catalogue would have."""
    out = tmp_path_factory.mktemp("manifests") / "clean"
    clean(sample_raw, out, size=160, workers=2)
    return out


def test_a_manifest_round_trips_byte_for_byte_and_expands_copies(tmp_path):
    photos = tmp_path / "photos"
    for name in ("Apple/a.jpg", "Apple/b.jpg", "Kiwi/k.jpg"):
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        (photos / name).write_bytes(b"x")
    rows = [
        Entry("cleaned", "Apple/a.jpg", "Apple", "train", "Apple/a", 3, "a", "f" * 64),
        Entry("cleaned", "Apple/b.jpg", "Apple", "val", "Apple/b", 1, "b", "e" * 64),
        Entry("cleaned", "Kiwi/k.jpg", "Kiwi", "train", "Kiwi/k", 1, "k", "d" * 64),
    ]
    write_manifest(tmp_path / "a", "balance", rows, {"cleaned": photos})
    write_manifest(tmp_path / "b", "balance", rows, {"cleaned": photos})
    assert (tmp_path / "a" / MANIFEST_FILE).read_bytes() == (tmp_path / "b" / MANIFEST_FILE).read_bytes()
    manifest = read_manifest(tmp_path / "a")
    assert manifest.entries == rows and manifest.roots == {"cleaned": str(photos.resolve())}
    train = split_photos(tmp_path / "a", "train")
    assert [p.name for p in train] == ["Apple/a.copy1.jpg", "Apple/a.copy2.jpg", "Apple/a.jpg", "Kiwi/k.jpg"]
    assert {p.path for p in train if p.category == "Apple"} == {photos.resolve() / "Apple" / "a.jpg"}
    assert split_categories(tmp_path / "a", "train") == ["Apple", "Kiwi"]
    # MANIFEST/<split> names one split of it, as SPLIT/val named a folder before manifests
    assert split_photos(tmp_path / "a" / "val", "val") == split_photos(tmp_path / "a", "val")


def _hand_made(folder: Path, rows: list[dict], roots: dict) -> None:
    header = {"manifest": "shopvision", "version": 1, "step": "split", "roots": roots, "own_root": None}
    lines = [json.dumps(header)] + [json.dumps(r) for r in rows]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST_FILE).write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))


@pytest.mark.parametrize("path", ["../outside.jpg", "Apple/../../outside.jpg", "/etc/passwd", "a\\..\\b.jpg"])
def test_a_reference_that_leaves_its_root_is_refused(tmp_path, path):
    (tmp_path / "root" / "Apple").mkdir(parents=True)
    (tmp_path / "outside.jpg").write_bytes(b"secret")
    row = {"root": "cleaned", "path": path, "category": "Apple", "split": "train"}
    _hand_made(tmp_path / "m", [row], {"cleaned": str(tmp_path / "root")})
    with pytest.raises(StepError, match="leaves its root"):
        split_photos(tmp_path / "m", "train")
    with pytest.raises(StepError, match="leaves its root"):
        write_manifest(
            tmp_path / "w", "split", [Entry("cleaned", path, "Apple", "train")], {"cleaned": tmp_path}
        )


def test_a_root_that_is_not_here_is_a_clear_error_and_roots_can_be_given(tmp_path):
    (tmp_path / "moved" / "Apple").mkdir(parents=True)
    (tmp_path / "moved" / "Apple" / "a.jpg").write_bytes(b"x")
    row = {"root": "cleaned", "path": "Apple/a.jpg", "category": "Apple", "split": "train"}
    _hand_made(tmp_path / "m", [row], {"cleaned": str(tmp_path / "gone")})
    with pytest.raises(StepError, match="pass --root cleaned=DIR"):
        split_photos(tmp_path / "m", "train")
    found = split_photos(tmp_path / "m", "train", {"cleaned": tmp_path / "moved"})
    assert [p.path for p in found] == [tmp_path / "moved" / "Apple" / "a.jpg"]
    _hand_made(tmp_path / "n", [dict(row, root="other")], {})
    with pytest.raises(StepError, match="root 'other' without a folder"):
        split_photos(tmp_path / "n", "train")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / MANIFEST_FILE).write_bytes(b"not gzip")
    with pytest.raises(StepError, match="cannot read the manifest"):
        split_photos(tmp_path / "bad", "train")


def test_splits_verdicts_are_those_it_gave_when_it_wrote_link_folders(cleaned_sample, tmp_path):
    # tests/data/split_sample_before.json.gz: split.json of the sample (cleaned as conftest cleans it,
    # val 0.15, test 0.15, seed 0) written by split before manifests (commit e72bf21).
    before = json.loads(gzip.decompress(BEFORE.read_bytes()))
    for mode, kwargs in (("none", {"lookalike": "none"}), ("embedding", {})):
        out = tmp_path / mode
        split(cleaned_sample, out, val=0.15, test=0.15, seed=0, **kwargs)
        record = json.loads((out / "split.json").read_text())
        old = before[mode]
        old_photos = old.pop("photos")
        assert {k: v for k, v in record.items() if k not in ("photo_count", "manifest")} == old, mode
        now = sorted((vars(p) for p in read_split_photos(out)), key=lambda p: p["file"])
        assert now == sorted(old_photos, key=lambda p: p["file"]), mode
        assert record["photo_count"] == len(old_photos)


def test_split_and_balance_write_under_one_percent_of_the_cleaned_bytes(cleaned_160, tmp_path):
    split(cleaned_160, tmp_path / "split", val=0.15, test=0.15, lookalike="none")
    balance(tmp_path / "split", tmp_path / "balanced")
    cleaned = _written(cleaned_160)
    written = _written(tmp_path / "split") + _written(tmp_path / "balanced")
    assert written < 0.01 * cleaned, (
        f"split + balance wrote {written} bytes, {written / cleaned:.2%} of {cleaned}"
    )
    assert not any(p.suffix == ".jpg" for p in (tmp_path / "split").rglob("*"))
    assert not any(p.suffix == ".jpg" for p in (tmp_path / "balanced").rglob("*"))


def test_augment_writes_only_the_photos_it_makes(cleaned_160, tmp_path):
    split(cleaned_160, tmp_path / "split", val=0.15, test=0.15, lookalike="none")
    balance(tmp_path / "split", tmp_path / "balanced")
    augment(tmp_path / "balanced", tmp_path / "aug", operations=["mirror", "grain"], workers=2)
    made = {e.path for e in read_manifest(tmp_path / "aug").entries if e.root == "augmented"}
    photos = {p.relative_to(tmp_path / "aug").as_posix() for p in (tmp_path / "aug").rglob("*.jpg")}
    assert photos == made
    cleaned_inodes = {p.stat().st_ino for p in cleaned_160.rglob("*.jpg")}
    assert not {(tmp_path / "aug" / p).stat().st_ino for p in photos} & cleaned_inodes  # no link, no copy
    train = split_photos(tmp_path / "aug", "train")
    balanced = split_photos(tmp_path / "balanced", "train")
    assert len(train) == 3 * len(balanced)  # each balanced sample, its mirror and its own grain
    assert sum(1 for p in train if p.path.is_relative_to(cleaned_160.resolve())) == len(balanced)


def test_the_folder_layout_reads_as_the_manifest_it_replaces(cleaned_sample, tmp_path):
    split(cleaned_sample, tmp_path / "split", val=0.15, test=0.15, lookalike="none")
    balance(tmp_path / "split", tmp_path / "balanced")
    layout = tmp_path / "layout"  # what balance wrote before manifests: links named <stem>.copy<k>.jpg
    for split_name in ("train", "val", "test"):
        for photo in split_photos(tmp_path / "balanced", split_name):
            (layout / split_name / photo.name).parent.mkdir(parents=True, exist_ok=True)
            os.link(photo.path, layout / split_name / photo.name)
    assert train_labels(layout) == train_labels(tmp_path / "balanced")
    labels = train_labels(layout)
    from_layout = PhotoFolder(layout / "train", labels, None).samples
    from_manifest = PhotoFolder(split_photos(tmp_path / "balanced", "train"), labels, None).samples
    assert [(Path(p).stat().st_ino, c) for p, c in from_layout] == [
        (Path(p).stat().st_ino, c) for p, c in from_manifest
    ]  # the same photos, in the same order, with the same class indices
    # balance on that layout gives the same copy counts as on the manifest
    balance(layout, tmp_path / "rebalanced")
    again = Counter((p.category, p.path.name) for p in split_photos(tmp_path / "rebalanced", "train"))
    first = Counter((p.category, p.path.name) for p in split_photos(tmp_path / "balanced", "train"))
    assert again == first
