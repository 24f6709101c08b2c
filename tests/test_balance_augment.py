import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shopvision.components.data.augment import augment, rotate_edge_filled
from shopvision.components.data.balance import balance, balance_target, source_of_copy
from shopvision.components.data.manifest import MANIFEST_FILE, read_manifest, split_photos
from shopvision.components.data.split import split
from shopvision.components.errors import StepError


def _textured(path: Path, seed: int, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)


def _split_dir(root: Path, counts: dict[str, int]) -> Path:
    for c, (category, n) in enumerate(counts.items()):
        for i in range(n):
            _textured(root / "train" / category / f"{category}{i:03d}.jpg", 1000 * c + i)
        _textured(root / "val" / category / f"{category}-val.jpg", 5000 + c)
        _textured(root / "test" / category / f"{category}-test.jpg", 6000 + c)
    return root


def test_target_is_the_percentile_rounded_up():
    # sorted [2, 5, 10, 10, 100]: p98 sits at rank 0.98 × 4 = 3.92 → 10 + 0.92 × 90 = 92.8 → 93
    assert balance_target([10, 2, 100, 5, 10], 98) == 93
    assert balance_target([10, 2, 100, 5, 10], 50) == 10
    assert balance_target([7, 7, 7], 98) == 7


def test_balance_raises_small_categories_by_copy_counts_not_copies(tmp_path):
    source = _split_dir(tmp_path / "split", {"rare": 3, "mid": 10, "big": 40})
    result = balance(source, tmp_path / "balanced", percentile=50)
    assert result.target == 10
    assert result.categories["rare"] == {"count": 3, "added": 7, "factor": round(10 / 3, 4)}
    assert result.categories["mid"]["added"] == 0 and result.categories["big"]["added"] == 0
    # balance writes its record and a manifest, no photo and no link
    assert sorted(p.name for p in (tmp_path / "balanced").iterdir()) == ["balance.json", MANIFEST_FILE]
    rare = [p for p in split_photos(tmp_path / "balanced", "train") if p.category == "rare"]
    assert len(rare) == 10
    # every original is repeated evenly (3 photos → 4, 3, 3 uses), under the names the links had
    uses = Counter(source_of_copy(p.name.split("/")[1]) or p.name.split("/")[1] for p in rare)
    assert sorted(uses.values()) == [3, 3, 4]
    for p in rare:  # each sample is its original photo, read where split found it
        name = p.name.split("/")[1]
        assert p.path == source / "train" / "rare" / (source_of_copy(name) or name)
    assert "rare/rare000.copy3.jpg" in {p.name for p in rare}
    assert len([p for p in split_photos(tmp_path / "balanced", "train") if p.category == "big"]) == 40
    for split_name in ("val", "test"):  # untouched
        assert len(split_photos(tmp_path / "balanced", split_name)) == 3
    manifest = json.loads((tmp_path / "balanced" / "balance.json").read_text())
    assert manifest["target"] == 10 and manifest["categories"]["rare"]["added"] == 7


def test_balance_refuses_input_without_train(tmp_path):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(StepError, match="no train photos"):
        balance(tmp_path / "nothing", tmp_path / "out")


def _bar_image(width=120, height=90) -> Image.Image:
    """Grey background, a red horizontal bar through the centre, a green block at the top left."""
    pixels = np.full((height, width, 3), 200, dtype=np.uint8)
    pixels[height // 2 - 2 : height // 2 + 2, 10:-10] = (255, 0, 0)
    pixels[5:25, 5:25] = (0, 255, 0)
    return Image.fromarray(pixels)


def _red_slope(image: Image.Image) -> float:
    """Slope of the red bar in image coordinates (y down): > 0 when its right end is lower."""
    pixels = np.asarray(image).astype(int)
    ys, xs = np.nonzero((pixels[..., 0] > 180) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80))
    return float(np.polyfit(xs, ys, 1)[0])


def test_rotation_direction_angle_and_edge_filled_corners():
    image = _bar_image()
    clockwise = rotate_edge_filled(image, -15)
    anticlockwise = rotate_edge_filled(image, 15)
    assert clockwise.size == image.size
    # clockwise on screen lowers the right end of the bar
    assert _red_slope(clockwise) == pytest.approx(math.tan(math.radians(15)), abs=0.03)
    assert _red_slope(anticlockwise) == pytest.approx(-math.tan(math.radians(15)), abs=0.03)
    for corner in [(0, 0), (119, 0), (0, 89), (119, 89)]:
        assert min(clockwise.getpixel(corner)) > 100, f"corner {corner} is dark: not filled from the edge"


def _augmented(tmp_path: Path, **kwargs) -> Path:
    source = _split_dir(tmp_path / "split", {"rare": 2, "big": 4})
    balance(source, tmp_path / "balanced", percentile=100)
    augment(tmp_path / "balanced", tmp_path / "aug", workers=2, **kwargs)
    return tmp_path / "aug"


def test_augment_outputs_geometry_and_names(tmp_path):
    split_root = tmp_path / "split"
    (split_root / "train" / "shapes").mkdir(parents=True)
    (split_root / "val" / "shapes").mkdir(parents=True)
    _bar_image().save(split_root / "train" / "shapes" / "123_1.png")
    augment(split_root, tmp_path / "aug", workers=1)
    folder = tmp_path / "aug" / "train" / "shapes"
    assert sorted(p.name for p in folder.iterdir()) == [  # the new photos only: the source is referenced
        "123_1.grain.png",
        "123_1.mirror.png",
        "123_1.rot_ccw.png",
        "123_1.rot_cw.png",
    ]
    samples = sorted(p.name for p in split_photos(tmp_path / "aug", "train"))
    assert samples == sorted(["shapes/123_1.png"] + [f"shapes/{p.name}" for p in folder.iterdir()])
    mirrored = np.asarray(Image.open(folder / "123_1.mirror.png"))
    assert mirrored[15, 110, 1] > 200 and mirrored[15, 15, 1] < 230  # the green block moved to the right
    assert _red_slope(Image.open(folder / "123_1.rot_cw.png")) > 0.2
    assert _red_slope(Image.open(folder / "123_1.rot_ccw.png")) < -0.2
    grain = np.asarray(Image.open(folder / "123_1.grain.png").convert("RGB")).astype(int)
    original = np.asarray(_bar_image()).astype(int)
    assert 3 < np.std(grain - original) < 40 and abs(np.mean(grain - original)) < 3


def test_augment_keeps_balance_proportions_and_repeats_deterministic_outputs(tmp_path):
    out = _augmented(tmp_path)
    per_category = Counter(p.category for p in split_photos(out, "train"))
    assert per_category == {"rare": 4 * 5, "big": 4 * 5}
    rows = {e.path: e for e in read_manifest(out).entries if e.root == "augmented"}
    assert rows["train/rare/rare000.mirror.jpg"].copies == 2  # same pixels for both copies: one file
    assert not (out / "train" / "rare" / "rare000.copy1.mirror.jpg").exists()
    rare = out / "train" / "rare"
    assert (rare / "rare000.copy1.grain.jpg").read_bytes() != (rare / "rare000.grain.jpg").read_bytes()
    assert not (out / "val").exists() and not (out / "test").exists()
    assert len(split_photos(out, "test")) == 2 and not any(
        "grain" in p.name for p in split_photos(out, "val")
    )


def test_augment_is_deterministic_for_a_seed(tmp_path):
    a = _augmented(tmp_path / "a", seed=5)
    b = _augmented(tmp_path / "b", seed=5)
    c = _augmented(tmp_path / "c", seed=6)
    name = "train/big/big001.grain.jpg"
    assert (a / name).read_bytes() == (b / name).read_bytes() != (c / name).read_bytes()
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*.jpg"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_operations_can_be_switched_off(tmp_path):
    out = _augmented(tmp_path, operations=["mirror"])
    names = [p.name for p in (out / "train" / "big").iterdir()]
    assert len(names) == 4 and all(n.endswith(".mirror.jpg") for n in names)
    assert len([p for p in split_photos(out, "train") if p.category == "big"]) == 8


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"operations": ["blur"]}, "unknown augmentation"),
        ({"angle": 90}, "--angle"),
        ({"grain": 0}, "--grain"),
    ],
)
def test_bad_augment_options_are_refused(tmp_path, kwargs, message):
    source = _split_dir(tmp_path / "split", {"a": 2})
    with pytest.raises(StepError, match=message):
        augment(source, tmp_path / "aug", **kwargs)


def test_augment_reports_a_photo_it_cannot_read(tmp_path):
    source = _split_dir(tmp_path / "split", {"a": 2})
    (source / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    with pytest.raises(StepError, match="cannot augment .*broken.jpg"):
        augment(source, tmp_path / "aug", workers=2)


def test_whole_data_chain_on_the_sample(cleaned_sample, tmp_path):
    split(cleaned_sample, tmp_path / "split", val=0.15, test=0.15)
    result = balance(tmp_path / "split", tmp_path / "balanced")
    augment(tmp_path / "balanced", tmp_path / "aug", workers=2)
    train_counts = Counter(p.category for p in split_photos(tmp_path / "aug", "train"))
    for category, row in result.categories.items():
        assert train_counts[category] == 5 * (row["count"] + row["added"])
    assert min(r["count"] + r["added"] for r in result.categories.values()) == result.target
