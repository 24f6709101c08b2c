import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from shopvision.components.data.clean import clean
from shopvision.components.data.manifest import split_photos
from shopvision.components.data.naming import product_id
from shopvision.components.data.split import (
    SplitPhoto,
    SplitResult,
    assign_splits,
    group_photos,
    read_split_photos,
    split,
    split_of,
)
from shopvision.components.errors import StepError


def _photos(root: Path) -> dict[str, set[str]]:
    """ "<category>/<name>" of each split's photos, read from split's manifest."""
    return {s: {p.name for p in split_photos(root, s)} for s in ("train", "val", "test")}


def test_every_category_trains_and_no_photo_is_in_two_splits(cleaned_sample, tmp_path):
    result = split(cleaned_sample, tmp_path / "split", val=0.15, test=0.15, seed=3)
    photos = _photos(tmp_path / "split")
    assert not (photos["train"] & photos["val"]) and not (photos["train"] & photos["test"])
    assert not (photos["val"] & photos["test"])
    cleaned = {p.relative_to(cleaned_sample).as_posix() for p in cleaned_sample.rglob("*.jpg")}
    assert photos["train"] | photos["val"] | photos["test"] == cleaned  # nothing lost, nothing added
    for counts in result.counts.values():
        assert counts["train"] >= 1  # val/test follow each group's hash: a small category may have none
    assert sum(c["test"] for c in result.counts.values()) >= 10
    recorded = read_split_photos(tmp_path / "split")
    assert Counter(p.split for p in recorded) == {s: len(p) for s, p in photos.items()}
    assert json.loads((tmp_path / "split" / "split.json").read_text())["photo_count"] == len(cleaned)


def test_each_group_follows_its_own_hash_and_the_fractions_hold_overall(cleaned_sample, tmp_path):
    result = split(cleaned_sample, tmp_path / "split", val=0.2, test=0.2, seed=0)
    forced = {w.split("'")[1] for w in result.warnings if "trains" in w or "needs at least" in w}
    for photo in result.photos:
        category, product = photo.group.split("/", 1)
        if category not in forced:
            assert photo.split == split_of(0, category, product, 0.2, 0.2), photo
    shares = Counter(p.split for p in result.photos)
    assert (
        0.1 < shares["test"] / len(result.photos) < 0.35 and 0.1 < shares["val"] / len(result.photos) < 0.35
    )


def _photo(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade, 255 - shade, 40)).save(path)


def test_photos_of_one_product_stay_together(tmp_path):
    raw = tmp_path / "clean"
    for product in range(10):
        for n in range(1, 4):  # three photos per listing: 1000_1.jpg, 1000_2.jpg, 1000_3.jpg
            _photo(raw / "shoes" / f"{1000 + product}_{n}.jpg", product * 20 + n)
    split(raw, tmp_path / "split", val=0.2, test=0.2)
    where = {}
    for s, names in _photos(tmp_path / "split").items():
        for name in names:
            assert where.setdefault(product_id(name), s) == s, (
                f"{name} is split across {s} and {where[product_id(name)]}"
            )
    assert set(where.values()) == {"train", "val", "test"}


def test_seed_changes_assignment_and_same_seed_repeats(cleaned_sample, tmp_path):
    a = split(cleaned_sample, tmp_path / "a", seed=1).assignments
    b = split(cleaned_sample, tmp_path / "b", seed=1).assignments
    c = split(cleaned_sample, tmp_path / "c", seed=2).assignments
    assert a == b and a != c


def test_too_small_category_goes_to_train_with_a_message(tmp_path):
    raw = tmp_path / "clean"
    for i in range(10):
        _photo(raw / "big" / f"b{i:03d}.jpg", i * 10)
    _photo(raw / "tiny" / "t001.jpg", 7)
    _photo(raw / "tiny" / "t002.jpg", 9)
    result = split(raw, tmp_path / "split", val=0.2, test=0.2)
    assert result.counts["tiny"] == {"train": 2, "val": 0, "test": 0}
    assert any("tiny" in w and "at least 3 groups" in w for w in result.warnings)


@pytest.mark.parametrize(("val", "test"), [(0.5, 0.5), (-0.1, 0.1), (0.1, 1.2)])
def test_bad_fractions_are_refused(cleaned_sample, tmp_path, val, test):
    with pytest.raises(StepError, match="fractions"):
        split(cleaned_sample, tmp_path / "split", val=val, test=test)


def test_empty_input_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StepError, match="no photos found"):
        split(tmp_path / "empty", tmp_path / "split")


def test_a_listing_folder_is_one_product_from_clean_to_split(sample_raw, tmp_path):
    raw = tmp_path / "raw"
    photos = sorted((sample_raw / "Banana").glob("*.jpg"))[:24]
    for n, path in enumerate(photos):  # RAW/Banana/listing-<k>/<n>.jpg, three photos per listing
        (raw / "Banana" / f"listing-{n // 3}").mkdir(parents=True, exist_ok=True)
        (raw / "Banana" / f"listing-{n // 3}" / f"{n % 3 + 1}.jpg").write_bytes(path.read_bytes())
    cleaned = clean(raw, tmp_path / "clean", size=64, workers=1)
    ids = {v.source: v.product_id for v in cleaned.kept}
    assert ids["Banana/listing-3/2.jpg"] == "listing-3" and len(set(ids.values())) == 8
    result = split(tmp_path / "clean", tmp_path / "split", val=0.2, test=0.2, lookalike="none")
    by_output = {v.output: v.product_id for v in cleaned.kept}
    where: dict[str, set[str]] = {}
    for photo in result.photos:
        assert photo.product_id == by_output[photo.file]  # the id clean gave, not read from "2.jpg"
        where.setdefault(photo.product_id, set()).add(photo.split)
    assert all(len(splits) == 1 for splits in where.values()) and len(where) == 8


def _reshoot(source: Path, target: Path) -> None:
    """The same item photographed again: cropped, brighter, turned a few degrees."""
    with Image.open(source) as image:
        image = image.convert("RGB")
        w, h = image.size
        crop = (int(w * 0.06), int(h * 0.06), int(w * 0.958), int(h * 0.94))
        image = image.crop(crop).rotate(3, fillcolor=(255, 255, 255))
        image = image.point(lambda v: min(255, int(v * 1.12) + 8))
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target, quality=90)


def test_an_item_reshot_under_another_product_id_lands_in_the_same_split(sample_raw, tmp_path):
    raw = tmp_path / "raw"
    for category in ("Kiwi", "Banana"):
        (raw / category).mkdir(parents=True)
        for path in sorted((sample_raw / category).glob("*.jpg")):
            (raw / category / path.name).write_bytes(path.read_bytes())
    originals = sorted((raw / "Kiwi").glob("*.jpg"))[:6]
    for n, source in enumerate(originals):
        _reshoot(source, raw / "Kiwi" / f"seller2-{n:03d}.jpg")
    cleaned = clean(raw, tmp_path / "clean", size=128, workers=1)
    kept = {v.source for v in cleaned.kept}
    assert all(f"Kiwi/seller2-{n:03d}.jpg" in kept for n in range(6))  # beyond clean's duplicate radius
    result = split(tmp_path / "clean", tmp_path / "split", val=0.2, test=0.2, seed=0)
    split_of_file = {p.file: p for p in result.photos}
    for n, source in enumerate(originals):
        original, copy = split_of_file[f"Kiwi/{source.name}"], split_of_file[f"Kiwi/seller2-{n:03d}.jpg"]
        assert original.group == copy.group and original.split == copy.split, (original, copy)
    # Without look-alike grouping the same photos are grouped by product id only: some pairs straddle.
    plain = split(tmp_path / "clean", tmp_path / "plain", val=0.2, test=0.2, seed=0, lookalike="none")
    plain_of = {p.file: p.split for p in plain.photos}
    assert any(
        plain_of[f"Kiwi/{s.name}"] != plain_of[f"Kiwi/seller2-{n:03d}.jpg"] for n, s in enumerate(originals)
    )
    manifest = json.loads((tmp_path / "split" / "split.json").read_text())
    assert manifest["groups"]["groups"] == len({p.group for p in result.photos})
    recorded = read_split_photos(tmp_path / "split")
    assert {p.file: p.group for p in recorded} == {p.file: p.group for p in result.photos}


def test_growing_the_catalogue_moves_no_assigned_photo(cleaned_sample, tmp_path):
    first = tmp_path / "first"
    categories = sorted(p.name for p in cleaned_sample.iterdir() if p.is_dir())
    for category in categories[:8]:
        photos = sorted((cleaned_sample / category).glob("*.jpg"))
        (first / category).mkdir(parents=True)
        for path in photos[: len(photos) // 2 + 1]:
            (first / category / path.name).write_bytes(path.read_bytes())
    # By product: a photo's split is its product's hash and the seed, nothing else.
    small = split(first, tmp_path / "a", val=0.2, test=0.2, seed=4, lookalike="none")
    after = split(cleaned_sample, tmp_path / "b", val=0.2, test=0.2, seed=4, lookalike="none").assignments
    assert len(after) > 1.5 * len(small.photos)  # new photos, new products and four new categories
    # (the one exception: a category none of whose groups hashed to train had one sent to train)
    forced = {w.split("'")[1] for w in small.warnings if w.endswith("trains")}
    before = {f: s for f, s in small.assignments.items() if f.split("/")[0] not in forced}
    assert len(forced) <= 2 and {f: s for f, s in after.items() if f in before} == before
    # With look-alike groups, only a group that a new photo joined may move (it follows its first-ranked
    # product); every group that did not change keeps every photo where it was.
    old = split(first, tmp_path / "c", val=0.2, test=0.2, seed=4)
    new = split(cleaned_sample, tmp_path / "d", val=0.2, test=0.2, seed=4)
    old_groups = {p.file: p.group for p in old.photos}
    members: dict[str, set[str]] = {}
    for photo in new.photos:
        members.setdefault(photo.group, set()).add(photo.file)
    unchanged = {g for g, files in members.items() if all(f in old_groups for f in files)}
    unchanged = {g for g in unchanged if len({old_groups[f] for f in members[g]}) == 1}
    now = {p.file: p for p in new.photos}
    forced = {w.split("'")[1] for w in old.warnings if w.endswith("trains")}
    kept = [p for p in old.photos if now[p.file].group in unchanged and p.category not in forced]
    assert len(kept) > len(old.photos) / 2
    assert all(now[p.file].split == p.split for p in kept)


def test_the_frozen_set_stays_in_test_under_a_new_seed(cleaned_sample, tmp_path):
    first = split(cleaned_sample, tmp_path / "a", val=0.1, test=0.1, seed=0)
    frozen = {p.sha256: p.category for p in first.photos if p.split == "test"}
    (tmp_path / "frozen.json").write_text(json.dumps({"photos": frozen}))
    second = split(cleaned_sample, tmp_path / "b", val=0.1, test=0.1, seed=7, frozen=tmp_path / "frozen.json")
    unfrozen = split(cleaned_sample, tmp_path / "c", val=0.1, test=0.1, seed=7)
    assert {p.sha256 for p in second.photos if p.split == "test"} >= set(frozen)
    assert any(
        p.split != "test" for p in unfrozen.photos if p.sha256 in frozen
    )  # the seed alone would move them
    frozen_groups = {p.group for p in second.photos if p.sha256 in frozen}
    assert all(p.split == "test" for p in second.photos if p.group in frozen_groups)
    assert second.frozen == {"photos": len(frozen), "found": len(frozen), "missing": 0}
    # the manifest carries every photo's hash, so train can list exactly its train and val photos
    test_photos = read_split_photos(tmp_path / "b", ("test",))
    assert {p.sha256 for p in test_photos} >= set(frozen)
    assert all(p.path.is_file() for p in split_photos(tmp_path / "b", "test"))


def test_large_groups_are_no_likelier_to_be_tested_than_small_ones():
    # 3,000 photos in 60 categories; in each, ten groups of five look-alikes and no lone photos.
    photos = [
        SplitPhoto(f"c{c}/p{c}-{i}.jpg", f"c{c}", f"p{c}-{i}", f"{c:04d}{i:060d}")
        for c in range(60)
        for i in range(50)
    ]
    links = [(0.9, k, k + 1) for k in range(len(photos) - 1) if (k % 50) % 5 != 4]
    groups, refused = group_photos(photos, links, seed=0, max_group_share=0.5)
    assert not refused and len(set(groups.values())) == 600
    result = SplitResult(0, {}, {})
    assign_splits(photos, groups, result, val=0.1, test=0.2, seed=0, frozen=set())
    shares = Counter(p.split for p in result.photos)
    assert 0.15 < shares["test"] / 3000 < 0.25 and 0.06 < shares["val"] / 3000 < 0.14


def test_a_group_never_swallows_its_category():
    # Ten photos of one category all alike (a chain of strong links): at most half may form one group.
    photos = [SplitPhoto(f"c/p{i}.jpg", "c", f"p{i}", f"{i:064d}") for i in range(10)]
    links = [(0.99 - i / 100, i, i + 1) for i in range(9)]
    groups, refused = group_photos(photos, links, seed=0, max_group_share=0.5)
    sizes = Counter(groups.values())
    assert max(sizes.values()) == 5 and refused == {"c": 1}
    # the strongest links are kept: photos 0..4 (links 0.99..0.96) are together
    assert len({groups[i] for i in range(5)}) == 1
