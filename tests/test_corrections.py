"""clean --corrections: a reviewer's corrections.csv refiles photos, all rows or none, on real sample photos."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_evaluate import shopvision

from shopvision.components.data.clean import clean
from shopvision.components.data.corrections import (
    CorrectionsError,
    corrections_csv,
    parse_corrections,
    read_corrections,
)

CATEGORIES = ("Banana", "Kiwi", "Lemon")


@pytest.fixture(scope="module")
def raw(sample_raw, tmp_path_factory) -> Path:
    """3 categories × 3 sample photos, plus an exact duplicate (dropped by clean) and a name that is
    in two categories (Banana/same.jpg, Kiwi/same.jpg: different photos)."""
    root = tmp_path_factory.mktemp("corrections") / "raw"
    for category in CATEGORIES:
        (root / category).mkdir(parents=True)
        for photo in sorted((sample_raw / category).glob("*.jpg"))[:3]:
            shutil.copyfile(photo, root / category / photo.name)
    first_lemon = sorted((root / "Lemon").iterdir())[0]
    shutil.copyfile(first_lemon, root / "Lemon" / "zz_copy.jpg")
    shutil.copyfile(sorted((sample_raw / "Banana").glob("*.jpg"))[5], root / "Banana" / "same.jpg")
    shutil.copyfile(sorted((sample_raw / "Kiwi").glob("*.jpg"))[5], root / "Kiwi" / "same.jpg")
    return root


@pytest.fixture(scope="module")
def cleaned(raw, tmp_path_factory) -> tuple[Path, dict]:
    """RAW cleaned without corrections, and its report (what an audit of it would list)."""
    out = tmp_path_factory.mktemp("corrections") / "clean"
    clean(raw, out, size=48, workers=1)
    return out, json.loads((out / "clean_report.json").read_text())


def kept(report: dict) -> dict[str, dict]:
    return {f["source"]: f for f in report["files"] if f["status"] == "kept"}


def tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_parse_reads_what_the_report_page_writes():
    text = (
        "\ufeffphoto,category,corrected_category,note\n"
        "Kiwi/a.jpg,Kiwi,Banana,looks yellow\n"
        "\n"
        '"Lemon/with, comma.jpg",Lemon,Kiwi,\n'
        "Kiwi/a.jpg,Kiwi,Banana,ticked twice\n"
        "./test\\Lemon/b.jpg,Lemon,Banana,\n"
    )
    corrections = parse_corrections(text, "review.csv")
    assert [(c.photo, c.category, c.corrected_category, c.line) for c in corrections.rows] == [
        ("Kiwi/a.jpg", "Kiwi", "Banana", 2),
        ("Lemon/with, comma.jpg", "Lemon", "Kiwi", 4),
        ("test/Lemon/b.jpg", "Lemon", "Banana", 6),
    ]
    again = parse_corrections(corrections_csv(corrections.rows))
    assert again.rows == tuple(c.__class__(c.photo, c.category, c.corrected_category, i) for i, c in
                               enumerate(corrections.rows, start=2))  # fmt: skip


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (
            "path,category\nKiwi/a.jpg,Kiwi\n",
            "first line must name the columns photo,category,corrected_category",
        ),
        ("photo,category,corrected_category\n", "no corrections in the file"),
        ("photo,category,corrected_category\nKiwi/a.jpg,,Banana\n", "line 2: empty category"),
        ("photo,category,corrected_category\n../a.jpg,Kiwi,Banana\n", "must be a relative path inside"),
        ("photo,category,corrected_category\n/etc/a.jpg,Kiwi,Banana\n", "must be a relative path inside"),
        (
            "photo,category,corrected_category\nKiwi/a.jpg,Kiwi,Banana\nKiwi/a.jpg,Kiwi,Lemon\n",
            "line 3: 'Kiwi/a.jpg' is sent to 'Lemon' here and to 'Banana' on line 2",
        ),
    ],
)
def test_parse_refuses_bad_files_with_the_line(text, says):
    with pytest.raises(CorrectionsError, match="review.csv") as caught:
        parse_corrections(text, "review.csv")
    assert says in str(caught.value)


def test_read_refuses_a_missing_or_binary_file(tmp_path):
    with pytest.raises(CorrectionsError, match="cannot read corrections"):
        read_corrections(tmp_path / "absent.csv")
    (tmp_path / "photo.csv").write_bytes(b"\xff\xd8\xff\xe0 not text")
    with pytest.raises(CorrectionsError, match="not UTF-8 text"):
        read_corrections(tmp_path / "photo.csv")


def test_clean_moves_the_corrected_photos_and_records_them(raw, cleaned, tmp_path):
    first, report = cleaned
    before = kept(report)
    banana = sorted(s for s in before if s.startswith("Banana/") and "same" not in s)
    by_output = before[banana[0]]["output"]  # as an index of the cleaned photos lists it
    kiwi_source = sorted(s for s in before if s.startswith("Kiwi/") and "same" not in s)[0]  # a RAW path
    lemon_output = before[sorted(s for s in before if s.startswith("Lemon/"))[0]]["output"]
    text = (
        "photo,category,corrected_category\n"
        f"{by_output},Banana,Kiwi\n"
        f"{kiwi_source},Kiwi,Lemon\n"
        f"test/{lemon_output},Lemon,Banana\n"  # an index of a split folder
        "Banana/same.jpg,Banana,Kiwi\n"  # Kiwi/same.jpg is taken
    )
    out = tmp_path / "corrected"
    result = clean(raw, out, size=48, workers=1, corrections=parse_corrections(text))
    after = kept(json.loads((out / "clean_report.json").read_text()))

    moved = {m["source"]: m for m in result.corrections}
    assert set(moved) == {
        banana[0],
        kiwi_source,
        sorted(s for s in before if s.startswith("Lemon/"))[0],
        "Banana/same.jpg",
    }
    assert moved[banana[0]]["output"] == "Kiwi/" + Path(by_output).name
    assert (
        moved["Banana/same.jpg"]["output"].startswith("Kiwi/same.")
        and moved["Banana/same.jpg"]["output"] != "Kiwi/same.jpg"
    )
    for source, move in moved.items():
        assert after[source]["category"] == move["to"] and after[source]["corrected_from"] == move["from"]
        assert after[source]["output"] == move["output"] and (out / move["output"]).is_file()
        assert not (out / move["previous_output"]).exists() or move["previous_output"] in {
            v["output"] for v in after.values()
        }
        assert (out / move["output"]).read_bytes() == (first / move["previous_output"]).read_bytes()
    untouched = set(before) - set(moved)
    assert all(after[s]["output"] == before[s]["output"] for s in untouched)  # names stay stable
    assert json.loads((out / "clean_report.json").read_text())["corrections"] == result.corrections
    assert len(tree(out)) == len(tree(first))  # nothing lost, nothing doubled


def test_a_bad_row_applies_nothing(raw, cleaned, tmp_path):
    first, report = cleaned
    out = tmp_path / "out"
    shutil.copytree(first, out)
    snapshot = tree(out)
    good = next(f["output"] for f in report["files"] if f["status"] == "kept" and f["category"] == "Banana")
    dropped = next(f["source"] for f in report["files"] if f["status"] == "dropped")
    cases = {
        f"{good},Banana,Bananna\n": "corrected_category 'Bananna' is not a category of the raw photos",
        f"{good},Banana,Kiwi\nKiwi/nothing.jpg,Kiwi,Lemon\n": "no photo 'Kiwi/nothing.jpg' in the raw photos",
        f"{good},Kiwi,Lemon\n": "is filed under 'Banana', not 'Kiwi'",
        f"{good},Banana,Banana\n": "is already filed under 'Banana'",
        f"{dropped},Lemon,Kiwi\n": "is not kept by clean (duplicate of Lemon/",
    }
    for rows, says in cases.items():
        with pytest.raises(CorrectionsError, match="nothing applied") as caught:
            clean(
                raw,
                out,
                size=48,
                workers=1,
                corrections=parse_corrections("photo,category,corrected_category\n" + rows),
            )
        assert says in str(caught.value)
        assert tree(out) == snapshot  # the earlier output is as it was


def test_clean_command_takes_corrections(raw, cleaned, tmp_path, capsys):
    _, report = cleaned
    good = next(f["output"] for f in report["files"] if f["status"] == "kept" and f["category"] == "Kiwi")
    (tmp_path / "corrections.csv").write_text(f"photo,category,corrected_category\n{good},Kiwi,Banana\n")
    done = shopvision(capsys, "clean", str(raw), str(tmp_path / "out"), "--size", "48", "--workers", "1",
                      "--corrections", str(tmp_path / "corrections.csv"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "corrected    1" in done.stdout
    (tmp_path / "bad.csv").write_text("photo,category,corrected_category\nKiwi/none.jpg,Kiwi,Banana\n")
    refused = shopvision(
        capsys, "clean", str(raw), str(tmp_path / "out2"), "--corrections", str(tmp_path / "bad.csv")
    )
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if "error:" in line]  # (stderr has progress too)
    assert len(errors) == 1 and "error: corrections" in errors[0] and "Traceback" not in refused.stderr
    assert not (tmp_path / "out2").exists()  # a folder this run made is gone again
    missing = shopvision(
        capsys, "clean", str(raw), str(tmp_path / "out3"), "--corrections", str(tmp_path / "no.csv")
    )
    assert missing.returncode == 2 and "cannot read corrections" in missing.stderr
