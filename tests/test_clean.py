"""The clean step against a hostile raw folder: every kind of file gets the verdict it deserves.

All pictures are real files made by tests/imagefactory.py (crops of the sample product photos or
textured patterns); nothing is mocked. The shared hostile run is built once per module.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import imagefactory as F
import numpy as np
import pytest
from PIL import Image, ImageFile

from shopvision.components.data.clean import REPORT_NAME, STAGING_NAME, CleanError, CleanResult, clean

SIZE = 64
MAX_PIXELS = 50_000_000
KEPT = ("kept", None)

# source (relative to RAW) → (status, reason). The builder below makes exactly these files.
EXPECTED: dict[str, tuple[str, str | None]] = {
    # every format, some deep inside sub-folders of their category
    "formats/a/b/deep_png.png": KEPT,
    "formats/jpeg_photo.jpg": KEPT,
    "formats/a/webp_photo.webp": KEPT,
    "formats/bmp_photo.bmp": KEPT,
    "formats/a/b/c/tiff_photo.tiff": KEPT,
    "formats/gif_photo.gif": KEPT,
    "formats/small_photo.png": KEPT,
    "formats/png_named.txt": KEPT,  # content decides, not the extension
    "formats/.DS_Store": ("dropped", "not_an_image"),
    # broken files
    "broken/text.jpg": ("dropped", "not_an_image"),
    "broken/truncated.jpg": ("dropped", "corrupt_image"),
    "broken/garbage_scan.jpg": ("dropped", "corrupt_image"),
    "broken/empty.jpg": ("dropped", "empty_file"),
    "broken/bomb_12000.png": ("dropped", "too_many_pixels"),
    "broken/bomb_7500.png": ("dropped", "too_many_pixels"),  # between 1× and 2× the limit
    # colour modes
    "modes/exif_rotated.jpg": KEPT,
    "modes/rgba.png": KEPT,
    "modes/palette_transparent.png": KEPT,
    "modes/la.png": KEPT,
    "modes/cmyk.jpg": KEPT,
    "modes/grey16.png": KEPT,
    "modes/grey_l.png": KEPT,
    "modes/animated.gif": KEPT,
    # duplicates
    "dups/exact_1.png": KEPT,
    "dups/exact_2.png": ("dropped", "duplicate"),
    "dups/sub/exact_0.png": ("dropped", "duplicate"),
    "dups/a_near_small.jpg": ("dropped", "duplicate"),
    "dups/near_big.jpg": KEPT,
    "conflict_a/same.jpg": ("dropped", "label_conflict"),
    "conflict_b/same_too.jpg": ("dropped", "label_conflict"),
    # links and special files
    "links/alias.jpg": KEPT,  # a link to links/target.jpg: same picture, ties → first path
    "links/target.jpg": ("dropped", "duplicate"),
    "links/outside.jpg": ("dropped", "link_outside_raw"),
    "links/broken.jpg": ("dropped", "broken_link"),
    "links/pipe.jpg": ("dropped", "not_a_regular_file"),
    "stray.jpg": ("dropped", "no_category"),
    # names
    "collide/x.png": KEPT,
    "collide/x.jpg": KEPT,
    "Crème brûlée/Café crème 01.png": KEPT,
    "Crème brûlée/日本 茶.webp": KEPT,
    "Crème brûlée/with space.jpg": KEPT,
}

# Valid format files: source → stored (width, height).
FORMAT_SIZES = {
    "formats/a/b/deep_png.png": (160, 100),
    "formats/jpeg_photo.jpg": (120, 160),
    "formats/a/webp_photo.webp": (150, 90),
    "formats/bmp_photo.bmp": (100, 140),
    "formats/a/b/c/tiff_photo.tiff": (130, 130),
    "formats/gif_photo.gif": (110, 70),
    "formats/small_photo.png": (40, 30),
    "formats/png_named.txt": (90, 120),
}


@dataclass
class HostileRaw:
    root: Path
    raw: Path
    fifo: Path
    exif_photo: Image.Image  # stored pixels of modes/exif_rotated.jpg (landscape)
    cmyk_photo: Image.Image  # RGB picture saved as modes/cmyk.jpg


def build_hostile_raw(root: Path) -> HostileRaw:
    raw = root / "raw"
    counter = iter(range(1000))

    def fresh(size: tuple[int, int]) -> Image.Image:
        return F.photo(next(counter), size)

    fmt_of = {".png": "PNG", ".jpg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tiff": "TIFF", ".gif": "GIF"}
    for source, size in FORMAT_SIZES.items():
        fmt = "PNG" if source.endswith(".txt") else fmt_of[Path(source).suffix]
        options = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
        F.write(raw / source, fresh(size), fmt, **options)
    F.write(raw / "formats/.DS_Store", b"\x00\x00\x00\x01Bud1" + bytes(200))

    F.write(raw / "broken/text.jpg", b"This is not a photo, just a text file.\n" * 20)
    jpeg = F.encode(fresh((200, 150)), "JPEG", quality=90)
    F.write(raw / "broken/truncated.jpg", jpeg[: len(jpeg) // 2])
    F.write(raw / "broken/garbage_scan.jpg", F.corrupt_scan_jpeg(fresh((200, 150)), seed=0))
    F.write(raw / "broken/empty.jpg", b"")
    F.write(raw / "broken/bomb_12000.png", F.png_bomb(12000, 12000))
    F.write(raw / "broken/bomb_7500.png", F.png_bomb(7500, 7500))

    exif_photo = fresh((120, 80))
    F.write(raw / "modes/exif_rotated.jpg", F.jpeg_with_orientation(exif_photo, 6))
    F.write(raw / "modes/rgba.png", F.rgba_half_transparent(next(counter)), "PNG")
    F.write(raw / "modes/palette_transparent.png", F.palette_with_transparency(next(counter)), "PNG")
    F.write(raw / "modes/la.png", F.la_half_transparent(next(counter)), "PNG")
    cmyk_photo = fresh((96, 64))
    F.write(raw / "modes/cmyk.jpg", cmyk_photo.convert("CMYK"), "JPEG", quality=95)
    F.write(raw / "modes/grey16.png", F.grey16(0, 65535), "PNG")
    F.write(raw / "modes/grey_l.png", fresh((80, 80)).convert("L"), "PNG")
    F.write(raw / "modes/animated.gif", F.animated_gif())

    exact = F.encode(fresh((100, 80)), "PNG")
    for source in ("dups/exact_1.png", "dups/exact_2.png", "dups/sub/exact_0.png"):
        F.write(raw / source, exact)
    original = fresh(None)  # a full 348-pixel sample photo
    F.write(raw / "dups/near_big.jpg", original, "JPEG", quality=95)
    smaller = original.resize((round(original.width * 0.6), round(original.height * 0.6)))
    F.write(raw / "dups/a_near_small.jpg", smaller, "JPEG", quality=40)
    same = F.encode(fresh((90, 90)), "JPEG", quality=90)
    F.write(raw / "conflict_a/same.jpg", same)
    F.write(raw / "conflict_b/same_too.jpg", same)

    F.write(raw / "links/target.jpg", fresh((90, 70)), "JPEG")
    os.symlink("target.jpg", raw / "links/alias.jpg")
    outside = F.write(root / "outside/photo.jpg", fresh((90, 70)), "JPEG")
    os.symlink(outside, raw / "links/outside.jpg")
    os.symlink("does-not-exist.jpg", raw / "links/broken.jpg")
    fifo = raw / "links/pipe.jpg"
    os.mkfifo(fifo)
    F.write(raw / "stray.jpg", fresh((70, 70)), "JPEG")

    F.write(raw / "collide/x.png", fresh((80, 60)), "PNG")
    F.write(raw / "collide/x.jpg", fresh((80, 60)), "JPEG")
    F.write(raw / "Crème brûlée/Café crème 01.png", fresh((80, 60)), "PNG")
    F.write(raw / "Crème brûlée/日本 茶.webp", fresh((80, 60)), "WEBP")
    F.write(raw / "Crème brûlée/with space.jpg", fresh((80, 60)), "JPEG")
    return HostileRaw(root, raw, fifo, exif_photo, cmyk_photo)


def run_clean(raw: Path, out: Path, **options) -> CleanResult:
    """clean() with the test defaults; any FIFO in RAW is released if clean wrongly opens it."""
    options = {"size": SIZE, "workers": 2, "max_pixels": MAX_PIXELS} | options
    fifos = [p for p in raw.rglob("*") if p.is_fifo()]
    if not fifos:
        return clean(raw, out, **options)
    with F.fifo_unblocker(fifos[0]):
        return clean(raw, out, **options)


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` → its bytes (None for folders)."""
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


def load_strict(path: Path) -> Image.Image:
    """Fully decode a file, failing on truncation."""
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with Image.open(path) as image:
        image.load()
        return image.copy()


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b.resize(a.size), np.float64)).mean())


@dataclass
class HostileRun:
    built: HostileRaw
    out: Path
    result: CleanResult
    by_source: dict
    report: dict

    def output_image(self, source: str) -> Image.Image:
        verdict = self.by_source[source]
        assert verdict.status == "kept", verdict
        return load_strict(self.out / verdict.output)


@pytest.fixture
def hostile_raw(tmp_path) -> HostileRaw:
    return build_hostile_raw(tmp_path)


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory) -> HostileRun:
    built = build_hostile_raw(tmp_path_factory.mktemp("hostile"))
    out = built.root / "out"
    result = run_clean(built.raw, out)
    report = json.loads((out / REPORT_NAME).read_text(encoding="utf-8"))
    return HostileRun(built, out, result, {f.source: f for f in result.files}, report)


@pytest.fixture
def small_raw(tmp_path) -> Path:
    raw = tmp_path / "raw"
    for index in range(6):
        F.write(raw / ("Apple", "Banana")[index % 2] / f"p{index}.jpg", F.photo(index, (80, 60)), "JPEG")
    return raw


# ---------------------------------------------------------------- verdicts


@pytest.mark.parametrize("source", sorted(EXPECTED))
def test_verdict(hostile_run, source):
    verdict = hostile_run.by_source.get(source)
    assert verdict is not None, f"{source} is missing from the report"
    assert (verdict.status, verdict.reason) == EXPECTED[source], verdict
    if verdict.status == "kept":
        assert verdict.output and (hostile_run.out / verdict.output).is_file()
    else:
        assert verdict.output is None


def test_report_lists_every_input_exactly_once(hostile_run):
    sources = [f["source"] for f in hostile_run.report["files"]]
    assert len(sources) == len(set(sources))
    assert set(sources) == set(EXPECTED)
    assert [f.source for f in hostile_run.result.files] == sources


def test_report_totals_match_counts(hostile_run):
    report = hostile_run.report
    files = report["files"]
    kept = [f for f in files if f["status"] == "kept"]
    dropped = Counter(f["reason"] for f in files if f["status"] == "dropped")
    assert report["step"] == "clean" and report["size"] == SIZE
    assert report["totals"] == {
        "files": len(files),
        "kept": len(kept),
        "dropped": dict(sorted(dropped.items())),
    }
    assert report["totals"]["files"] == len(EXPECTED)
    assert report["totals"]["kept"] == sum(1 for v in EXPECTED.values() if v == KEPT)
    for category, row in report["categories"].items():
        members = [f for f in files if f.get("category") == category]
        assert row["files"] == len(members)
        assert row["kept"] == sum(f["status"] == "kept" for f in members)
        assert row["kept"] + sum(row["dropped"].values()) == row["files"]
    assert sum(row["files"] for row in report["categories"].values()) == len(files) - dropped["no_category"]
    assert (hostile_run.out / REPORT_NAME).read_text(encoding="utf-8") == hostile_run.result.to_json()


def test_out_holds_exactly_the_kept_photos(hostile_run):
    on_disk = {p.relative_to(hostile_run.out).as_posix() for p in hostile_run.out.rglob("*") if p.is_file()}
    assert on_disk == {v.output for v in hostile_run.result.kept} | {REPORT_NAME}


def test_every_output_is_an_rgb_jpeg_that_fits(hostile_run):
    for verdict in hostile_run.result.kept:
        image = load_strict(hostile_run.out / verdict.output)
        with Image.open(hostile_run.out / verdict.output) as opened:
            assert opened.format == "JPEG", verdict.source
        assert image.mode == "RGB", verdict.source
        assert max(image.size) <= SIZE, verdict.source
        assert list(image.size) == verdict.size, verdict.source


@pytest.mark.parametrize("source", sorted(FORMAT_SIZES))
def test_formats_keep_aspect_ratio_and_are_never_enlarged(hostile_run, source):
    verdict = hostile_run.by_source[source]
    category, stem = source.split("/")[0], Path(source).stem
    assert verdict.output == f"{category}/{stem}.jpg"
    width, height = FORMAT_SIZES[source]
    assert verdict.source_size == [width, height]
    scale = min(1.0, SIZE / max(width, height))
    out_w, out_h = hostile_run.output_image(source).size
    assert abs(out_w - width * scale) <= 1 and abs(out_h - height * scale) <= 1, (out_w, out_h)
    if max(width, height) <= SIZE:
        assert (out_w, out_h) == (width, height)


def test_output_content_is_the_source_picture(hostile_run):
    """The decoded pixels are the photo, not a grey placeholder: compare against the source file."""
    for source in FORMAT_SIZES:
        with Image.open(hostile_run.built.raw / source) as original:
            expected = original.convert("RGB")
        assert mean_abs_diff(hostile_run.output_image(source), expected) < 12, source


# ---------------------------------------------------------------- colour modes and orientation


def test_exif_orientation_6_turns_landscape_into_portrait(hostile_run):
    verdict = hostile_run.by_source["modes/exif_rotated.jpg"]
    assert verdict.source_size == [120, 80]  # as stored
    output = hostile_run.output_image("modes/exif_rotated.jpg")
    assert output.height > output.width
    upright = hostile_run.built.exif_photo.transpose(Image.Transpose.ROTATE_270)
    wrong_way = hostile_run.built.exif_photo.transpose(Image.Transpose.ROTATE_90)
    assert mean_abs_diff(output, upright) < 12
    assert mean_abs_diff(output, upright) < mean_abs_diff(output, wrong_way) / 2


@pytest.mark.parametrize("source", ["modes/rgba.png", "modes/palette_transparent.png", "modes/la.png"])
def test_transparent_pixels_become_white(hostile_run, source):
    array = np.asarray(hostile_run.output_image(source), np.float64)
    width = array.shape[1]
    left = array[:, : width // 2 - 3]  # margin for resampling and JPEG blocks at the edge
    assert left.min() >= 235 and left.mean() >= 250, source
    right = array[:, width // 2 + 3 :]
    assert right.mean() < 235, "the opaque half is the photo, not white"


def test_cmyk_jpeg_keeps_its_colours(hostile_run):
    assert hostile_run.by_source["modes/cmyk.jpg"].source_format == "JPEG"
    assert mean_abs_diff(hostile_run.output_image("modes/cmyk.jpg"), hostile_run.built.cmyk_photo) < 12


def test_16_bit_grey_is_scaled_to_8_bit(hostile_run):
    array = np.asarray(hostile_run.output_image("modes/grey16.png"), np.float64)
    height, width = array.shape[:2]
    top = array[: height // 3 - 3]
    assert top[:, : width // 2 - 3].max() <= 8  # 0 → black
    assert top[:, width // 2 + 3 :].min() >= 247  # 65535 → white
    # the middle band ramps 0 → 65535 across the width: scaled, not clipped at 255
    ramp = array[height // 2, :, 0]
    assert abs(ramp[width // 4] - 64) <= 16 and abs(ramp[width // 2] - 128) <= 16, ramp


def test_plain_grey_becomes_grey_rgb(hostile_run):
    array = np.asarray(hostile_run.output_image("modes/grey_l.png"), np.int16)
    assert np.abs(array[..., 0] - array[..., 1]).max() <= 2
    assert np.abs(array[..., 1] - array[..., 2]).max() <= 2
    assert array.std() > 10  # a picture, not a flat fill


def test_animated_gif_keeps_the_first_frame(hostile_run):
    red, green, blue = (
        np.asarray(hostile_run.output_image("modes/animated.gif"), np.float64).reshape(-1, 3).mean(0)
    )
    # frame 0: red and white stripes (mean ≈ 255, 128, 128); frame 1 is blue and white
    assert red > 220 and blue < 170 and abs(green - blue) < 20, (red, green, blue)


# ---------------------------------------------------------------- duplicates and conflicts


def test_exact_duplicates_keep_the_first_source_path(hostile_run):
    by_source = hostile_run.by_source
    for source in ("dups/exact_2.png", "dups/sub/exact_0.png"):
        assert by_source[source].duplicate_of == "dups/exact_1.png"
        assert by_source[source].sha256 == by_source["dups/exact_1.png"].sha256
    assert by_source["dups/exact_1.png"].output == "dups/exact_1.jpg"


def test_near_duplicate_keeps_the_larger_original(hostile_run):
    small = hostile_run.by_source["dups/a_near_small.jpg"]
    big = hostile_run.by_source["dups/near_big.jpg"]
    assert small.duplicate_of == "dups/near_big.jpg"  # resolution wins over the path order
    assert "near" in small.detail
    assert small.sha256 != big.sha256
    assert big.source_size[0] * big.source_size[1] > small.source_size[0] * small.source_size[1]


def test_same_photo_in_two_categories_is_a_label_conflict(hostile_run):
    a = hostile_run.by_source["conflict_a/same.jpg"]
    b = hostile_run.by_source["conflict_b/same_too.jpg"]
    assert a.duplicate_of == "conflict_b/same_too.jpg" and b.duplicate_of == "conflict_a/same.jpg"
    assert "conflict_a" in a.detail and "conflict_b" in a.detail
    assert not (hostile_run.out / "conflict_a").exists() and not (hostile_run.out / "conflict_b").exists()


def test_link_inside_raw_is_followed_and_becomes_a_duplicate(hostile_run):
    alias = hostile_run.by_source["links/alias.jpg"]
    target = hostile_run.by_source["links/target.jpg"]
    assert alias.sha256 == target.sha256  # the link was read through
    kept = [v for v in (alias, target) if v.status == "kept"]
    dropped = [v for v in (alias, target) if v.status == "dropped"]
    assert len(kept) == 1 and len(dropped) == 1
    assert dropped[0].duplicate_of == kept[0].source


def test_link_outside_raw_names_its_target(hostile_run):
    verdict = hostile_run.by_source["links/outside.jpg"]
    assert verdict.category == "links"
    assert str(hostile_run.built.root.resolve() / "outside") in verdict.detail


def test_file_directly_in_raw_has_no_category(hostile_run):
    assert hostile_run.by_source["stray.jpg"].category is None
    assert hostile_run.by_source["stray.jpg"].reason == "no_category"


def test_fifo_is_not_opened(hostile_run):
    assert hostile_run.built.fifo.is_fifo()
    assert hostile_run.by_source["links/pipe.jpg"].sha256 is None  # never read


# ---------------------------------------------------------------- names


def test_same_stem_in_one_category_gets_distinct_names(hostile_run):
    outputs = [hostile_run.by_source[s].output for s in ("collide/x.jpg", "collide/x.png")]
    assert len(set(outputs)) == 2
    assert all(o.startswith("collide/x") and o.endswith(".jpg") for o in outputs), outputs
    assert "collide/x.jpg" in outputs
    pictures = [hostile_run.output_image(s) for s in ("collide/x.jpg", "collide/x.png")]
    assert mean_abs_diff(*pictures) > 10  # two different photos, neither overwrote the other


def test_unicode_and_space_names(hostile_run):
    outputs = [hostile_run.by_source[s].output for s in EXPECTED if s.startswith("Crème brûlée/")]
    assert len(set(outputs)) == 3
    for output in outputs:
        category, name = output.split("/")
        assert category == "Crème brûlée"
        assert re.fullmatch(r"[A-Za-z0-9_\-]+(\.[0-9a-f]{8})?\.jpg", name), name
        load_strict(hostile_run.out / output)
    assert hostile_run.by_source["Crème brûlée/with space.jpg"].output == "Crème brûlée/with-space.jpg"


# ---------------------------------------------------------------- reruns, refusals, crash safety


def test_rerun_is_byte_identical(hostile_raw):
    out = hostile_raw.root / "out"
    first = run_clean(hostile_raw.raw, out, workers=2)
    before = snapshot(out)
    second = run_clean(hostile_raw.raw, out, workers=1)  # worker count must not matter either
    assert snapshot(out) == before
    assert first.to_json() == second.to_json()


def test_rerun_after_deleting_raw_files_removes_their_outputs(hostile_raw):
    raw, out = hostile_raw.raw, hostile_raw.root / "out"
    run_clean(raw, out)
    assert (out / "formats/bmp_photo.jpg").is_file()
    (raw / "formats/bmp_photo.bmp").unlink()
    (raw / "dups/exact_1.png").unlink()  # the kept copy of an exact duplicate group
    (raw / "conflict_b/same_too.jpg").unlink()  # ends the label conflict
    result = run_clean(raw, out)
    by_source = {f.source: f for f in result.files}
    assert "formats/bmp_photo.bmp" not in by_source
    assert not (out / "formats/bmp_photo.jpg").exists()
    assert not (out / "dups/exact_1.jpg").exists()
    assert by_source["dups/exact_2.png"].status == "kept"
    assert by_source["dups/sub/exact_0.png"].duplicate_of == "dups/exact_2.png"
    assert by_source["conflict_a/same.jpg"].status == "kept"
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert on_disk == {v.output for v in result.kept} | {REPORT_NAME}
    fresh_out = hostile_raw.root / "fresh"
    run_clean(raw, fresh_out)
    assert snapshot(out) == snapshot(fresh_out)


def test_refuses_a_non_empty_folder_that_is_not_a_clean_output(small_raw, tmp_path):
    out = tmp_path / "precious"
    F.write(out / "notes.txt", b"do not delete")
    F.write(out / "Apple/mine.jpg", F.photo(30, (50, 50)), "JPEG")
    before = snapshot(out)
    with pytest.raises(CleanError, match="not empty"):
        clean(small_raw, out, size=SIZE, workers=1)
    assert snapshot(out) == before


def test_refuses_bad_output_places(small_raw, tmp_path):
    raw_before = snapshot(small_raw)
    a_file = F.write(tmp_path / "a_file", b"x")
    with pytest.raises(CleanError):
        clean(small_raw, a_file, size=SIZE, workers=1)
    assert a_file.read_bytes() == b"x"
    with pytest.raises(CleanError, match="must be separate"):
        clean(small_raw, small_raw / "Apple" / "out", size=SIZE, workers=1)
    with pytest.raises(CleanError):
        clean(small_raw, tmp_path / "out", size=8, workers=1)
    with pytest.raises(CleanError):
        clean(tmp_path / "missing", tmp_path / "out", size=SIZE, workers=1)
    assert snapshot(small_raw) == raw_before


def test_refuses_to_clean_a_folder_into_itself(small_raw, tmp_path):
    previous = tmp_path / "previous"
    clean(small_raw, previous, size=SIZE, workers=1)  # a clean output, reused as RAW
    F.write(previous / "Apple/kept_by_hand.jpg", b"not a picture")
    before = snapshot(previous)
    try:
        with pytest.raises(CleanError):
            clean(previous, previous, size=32, workers=1)
    finally:
        assert snapshot(previous) == before, "the raw folder was modified"


def test_no_partial_or_staging_files_remain(hostile_run):
    leftovers = [
        p.relative_to(hostile_run.out).as_posix()
        for p in hostile_run.out.rglob("*")
        if p.name.endswith(".tmp") or STAGING_NAME in p.parts or p.name.startswith(".")
    ]
    assert leftovers == []
    for verdict in hostile_run.result.kept:
        load_strict(hostile_run.out / verdict.output)  # complete files only


def test_leftovers_of_a_crashed_run_are_swept(small_raw, tmp_path):
    out = tmp_path / "out"
    clean(small_raw, out, size=SIZE, workers=1)
    reference = snapshot(out)
    F.write(out / STAGING_NAME / "3.jpg", b"\xff\xd8\xff half a photo")
    F.write(out / f".{REPORT_NAME}.abc123.tmp", b'{"step": "cl')
    F.write(out / "Apple/stale_from_old_run.jpg", F.photo(40, (50, 50)), "JPEG")
    clean(small_raw, out, size=SIZE, workers=1)
    assert snapshot(out) == reference


# A child process that runs clean and dies (os._exit, like a kill -9) after `limit` renames.
_CRASHING_CHILD = textwrap.dedent(
    """
    import os, sys
    from shopvision.components.data.clean import clean

    raw, out, size, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    real_replace, calls = os.replace, [0]

    def replace_then_die(src, dst):
        calls[0] += 1
        if calls[0] > limit:
            os._exit(17)
        real_replace(src, dst)

    os.replace = replace_then_die
    clean(raw, out, size=size, workers=1)
    """
)


def crash_clean(raw: Path, out: Path, size: int, renames: int) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _CRASHING_CHILD, str(raw), str(out), str(size), str(renames)],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 17, done.stderr.decode()


def assert_category_files_complete(out: Path) -> list[Path]:
    photos = [p for p in out.glob("*/*") if p.parent.name != STAGING_NAME]
    for path in photos:
        assert not path.name.endswith(".tmp"), path
        load_strict(path)
    return photos


def test_crash_during_a_rerun_leaves_only_complete_photos(small_raw, tmp_path):
    out = tmp_path / "out"
    clean(small_raw, out, size=32, workers=1)
    crash_clean(small_raw, out, size=48, renames=3)  # dies while publishing the 48-pixel photos
    sizes = Counter(max(load_strict(p).size) for p in assert_category_files_complete(out))
    assert sizes == {48: 3, 32: 3}, sizes  # old and new photos mixed, but each one whole
    clean(small_raw, out, size=48, workers=1)
    reference = tmp_path / "reference"
    clean(small_raw, reference, size=48, workers=1)
    assert snapshot(out) == snapshot(reference)


def test_rerun_after_a_crashed_first_run_recovers(small_raw, tmp_path):
    out = tmp_path / "out"
    crash_clean(small_raw, out, size=SIZE, renames=3)
    assert len(assert_category_files_complete(out)) == 3
    clean(small_raw, out, size=SIZE, workers=1)
    reference = tmp_path / "reference"
    clean(small_raw, reference, size=SIZE, workers=1)
    assert snapshot(out) == snapshot(reference)


def test_report_may_also_be_written_elsewhere(small_raw, tmp_path):
    out, report = tmp_path / "out", tmp_path / "reports" / "clean.json"
    report.parent.mkdir()
    result = clean(small_raw, out, size=SIZE, workers=1, report=report)
    assert report.read_text(encoding="utf-8") == result.to_json()
    assert (out / REPORT_NAME).read_text(encoding="utf-8") == result.to_json()


# ---------------------------------------------------------------- known misclassifications


def test_jpeg_header_followed_by_garbage_is_corrupt(tmp_path):
    raw = tmp_path / "raw"
    for seed in range(8):
        F.write(raw / "broken" / f"garbage_{seed}.jpg", F.jfif_header_then_garbage(seed))
    result = clean(raw, tmp_path / "out", size=SIZE, workers=1)
    assert Counter(f.reason for f in result.files) == {"corrupt_image": 8}


def test_dark_16_bit_grey_stays_dark(tmp_path):
    raw = tmp_path / "raw"
    F.write(raw / "modes/dark16.png", F.grey16(0, 255), "PNG")
    result = clean(raw, tmp_path / "out", size=SIZE, workers=1)
    (verdict,) = result.files
    array = np.asarray(load_strict(tmp_path / "out" / verdict.output))
    assert array.max() <= 8  # 255 / 65535 of full scale is black


def test_folder_link_to_another_category_does_not_relabel_it(tmp_path):
    raw = tmp_path / "raw"
    for index, source in enumerate(["Apple/a1.jpg", "Apple/a2.jpg", "Banana/b1.jpg", "Banana/b2.jpg"]):
        F.write(raw / source, F.photo(index, (80, 60)), "JPEG")
    os.symlink("../Banana", raw / "Apple" / "more")
    result = clean(raw, tmp_path / "out", size=SIZE, workers=1)
    by_source = {f.source: f for f in result.files}
    for source in ("Banana/b1.jpg", "Banana/b2.jpg"):
        assert source in by_source, f"{source} is missing from the report: {sorted(by_source)}"
        assert by_source[source].category == "Banana"
    assert "Banana" in {f.category for f in result.kept}
    assert not any(f.category == "Apple" and "/b" in f.source and f.status == "kept" for f in result.files)


# ---------------------------------------------------------------- the real sample data


def test_sample_data_keeps_every_category(tmp_path):
    out = tmp_path / "out"
    result = clean(F.SAMPLE_RAW, out, size=SIZE, workers=2)
    categories = sorted(d.name for d in F.SAMPLE_RAW.iterdir() if d.is_dir())
    assert len(categories) == 12
    assert result.totals()["files"] == 174
    per_category = result.per_category()
    assert sorted(per_category) == categories
    for category in categories:
        assert per_category[category]["kept"] > 0, category
        assert any((out / category).glob("*.jpg")), category
    assert all(max(load_strict(out / v.output).size) <= SIZE for v in result.kept)
