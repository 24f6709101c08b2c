import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from shopvision.components.errors import StepError
from shopvision.components.naming import product_id
from shopvision.components.split import split


def _photos(root: Path) -> dict[str, set[str]]:
    return {
        s: {p.relative_to(root / s).as_posix() for p in (root / s).rglob("*.jpg")}
        for s in ("train", "val", "test")
    }


def test_every_category_in_every_split_and_no_photo_in_two(cleaned_sample, tmp_path):
    result = split(cleaned_sample, tmp_path / "split", val=0.15, test=0.15, seed=3)
    photos = _photos(tmp_path / "split")
    assert not (photos["train"] & photos["val"]) and not (photos["train"] & photos["test"])
    assert not (photos["val"] & photos["test"])
    cleaned = {p.relative_to(cleaned_sample).as_posix() for p in cleaned_sample.rglob("*.jpg")}
    assert photos["train"] | photos["val"] | photos["test"] == cleaned  # nothing lost, nothing added
    for counts in result.counts.values():
        assert all(counts[s] >= 1 for s in ("train", "val", "test"))
    manifest = json.loads((tmp_path / "split" / "split.json").read_text())
    assert Counter(manifest["assignments"].values()) == {s: len(p) for s, p in photos.items()}


def test_fractions_are_respected_per_category(cleaned_sample, tmp_path):
    result = split(cleaned_sample, tmp_path / "split", val=0.2, test=0.2, seed=0)
    for category, counts in result.counts.items():
        total = sum(counts.values())
        assert abs(counts["test"] - round(0.2 * total)) <= 1, category
        assert abs(counts["val"] - round(0.2 * total)) <= 1, category


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
    assert any("tiny" in w and "at least 3 products" in w for w in result.warnings)


@pytest.mark.parametrize(("val", "test"), [(0.5, 0.5), (-0.1, 0.1), (0.1, 1.2)])
def test_bad_fractions_are_refused(cleaned_sample, tmp_path, val, test):
    with pytest.raises(StepError, match="fractions"):
        split(cleaned_sample, tmp_path / "split", val=val, test=test)


def test_empty_input_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StepError, match="no photos found"):
        split(tmp_path / "empty", tmp_path / "split")
