"""clean sharded: N shards then a merge publish exactly what one clean of the same folder publishes.

On the hostile folder of test_clean (broken files, bombs, links, a FIFO, duplicates across folders)
as plain functions, and on real sample photos as the pipeline's own tasks under kfp.local.
"""

from __future__ import annotations

import builtins
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import imagefactory as F
import pytest
from test_clean import MAX_PIXELS, SIZE, build_hostile_raw, snapshot

from shopvision.components.data.clean import CleanError, clean, summary
from shopvision.components.data.clean_shards import clean_shard, merge_shards, shard_of
from shopvision.components.data.corrections import parse_corrections

SHARDS = 3


def run_shards(raw: Path, work: Path, shards: int = SHARDS) -> list[Path]:
    folders = [work / f"shard-{i}" for i in range(shards)]
    with F.fifo_unblocker(next(raw.rglob("pipe.jpg"))):  # released if a shard wrongly opens it
        for i, folder in enumerate(folders):
            clean_shard(raw, folder, i, shards, size=SIZE, workers=2, max_pixels=MAX_PIXELS)
    return folders


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    built = build_hostile_raw(tmp_path_factory.mktemp("hostile"))
    work = tmp_path_factory.mktemp("sharded")
    with F.fifo_unblocker(built.fifo):
        single = clean(built.raw, work / "single", size=SIZE, workers=2, max_pixels=MAX_PIXELS)
    return built.raw, work, single, run_shards(built.raw, work)


def test_three_shards_merge_to_the_single_process_clean(hostile):
    raw, work, single, shards = hostile
    merged = merge_shards(shards, work / "merged")
    assert merged.to_json() == single.to_json()
    assert snapshot(work / "merged") == snapshot(work / "single")  # every photo byte-identical
    # The shards really split the work, and every file (decoded or a walk's verdict) is in one shard.
    counts = [len(json.loads((s / "shard.json").read_text())["records"]) for s in shards]
    walked = [len(json.loads((s / "shard.json").read_text())["verdicts"]) for s in shards]
    assert all(counts) and sum(counts) + sum(walked) == len(single.files)
    # Duplicates and label conflicts that straddle shards are still found by the merge.
    straddle = {
        shard_of("dups/exact_1.png", SHARDS),
        shard_of("dups/exact_2.png", SHARDS),
        shard_of("dups/sub/exact_0.png", SHARDS),
    }
    assert len(straddle) > 1
    verdicts = {f.source: f for f in merged.files}
    assert verdicts["conflict_b/same_too.jpg"].reason == "label_conflict"
    assert verdicts["dups/exact_1.png"].status == "kept"
    assert {verdicts[s].duplicate_of for s in ("dups/exact_2.png", "dups/sub/exact_0.png")} == {
        "dups/exact_1.png"
    }


def test_merge_applies_corrections_as_clean_does(hostile, tmp_path):
    raw, work, _, shards = hostile
    corrections = parse_corrections("photo,category,corrected_category\ncollide/x.jpg,collide,dups\n", "test")
    with F.fifo_unblocker(next(raw.rglob("pipe.jpg"))):
        single = clean(raw, tmp_path / "single", size=SIZE, max_pixels=MAX_PIXELS, corrections=corrections)
    merged = merge_shards(shards, tmp_path / "merged", corrections=corrections)
    assert single.corrections and merged.to_json() == single.to_json()
    assert snapshot(tmp_path / "merged") == snapshot(tmp_path / "single")


def test_shard_of_is_the_same_in_another_process():
    sources = [f"cat{i % 3}/photo {i}.jpg" for i in range(50)]
    here = [shard_of(s, 7) for s in sources]
    code = "import sys, json; from shopvision.components.data.clean_shards import shard_of; " + (
        "print(json.dumps([shard_of(s, 7) for s in json.load(sys.stdin)]))"
    )
    there = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(sources), capture_output=True, text=True, check=True
    )
    assert json.loads(there.stdout) == here and len(set(here)) == 7


def test_bad_shards_are_clear_errors(hostile, tmp_path):
    raw, _, _, shards = hostile
    with pytest.raises(CleanError, match="expected shards 0 to 2 once each, got \\[0, 2\\]"):
        merge_shards([shards[0], shards[2]], tmp_path / "a")
    with pytest.raises(CleanError, match="got \\[0, 1, 1, 2\\]"):
        merge_shards([*shards, shards[1]], tmp_path / "b")
    with pytest.raises(CleanError, match="is not a clean shard"):
        merge_shards([*shards[:2], raw], tmp_path / "c")
    with pytest.raises(CleanError, match="shard 3 does not exist: shards are numbered 0 to 2"):
        clean_shard(raw, tmp_path / "d", 3, 3)
    with pytest.raises(CleanError, match="at least 1, got 0"):
        clean_shard(raw, tmp_path / "e", 0, 0)
    with pytest.raises(CleanError, match="is not empty"):
        clean_shard(raw, shards[0], 0, 3)
    assert not (tmp_path / "a").exists()  # nothing written before the shards are checked


def _small_raw(sample_raw: Path, target: Path) -> Path:
    """4 categories × 4 real photos, an exact copy (a duplicate) and a photo filed twice (a conflict)."""
    categories = sorted(p for p in sample_raw.iterdir() if p.is_dir())[:4]
    for category in categories:
        for path in sorted(category.iterdir())[:4]:
            (target / category.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target / category.name / path.name)
    first = sorted((target / categories[0].name).iterdir())[0]
    shutil.copy(first, target / categories[0].name / "zz_copy.jpg")
    shutil.copy(first, target / categories[1].name / "filed_twice.jpg")
    return target


def test_sharded_clean_under_kfp_local_equals_one_clean(sample_raw, tmp_path):
    """The pipeline's own clean stage (clean_stage, as the training pipeline wires it) under kfp.local:
    3 shards in a ParallelFor and a merge publish the photos and report of a single clean, and one
    shard runs the one clean-photos task of before."""
    from kfp import local

    from shopvision.pipelines.kfp_local_compat import allow_oneof_artifacts
    from shopvision.pipelines.run_log import RunLog, step_summary
    from shopvision.pipelines.training_pipeline import clean_pipeline

    raw = _small_raw(sample_raw, tmp_path / "raw")
    reference = tmp_path / "reference"
    expected = step_summary("clean-merge-shards", summary(clean(raw, reference, size=48)))
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(tmp_path / "root"),
        raise_on_error=True,
    )
    allow_oneof_artifacts()
    published = {}
    own_print = builtins.print
    for shards in (SHARDS, 1):
        terminal = io.StringIO()
        before = set((tmp_path / "root").glob("*")) if (tmp_path / "root").exists() else set()
        (tmp_path / f"log-{shards}").mkdir()
        with RunLog(tmp_path / f"log-{shards}", terminal=terminal):
            clean_pipeline(data_location=str(raw), image_size=48, clean_shards=shards)
        (run,) = set((tmp_path / "root").glob("*")) - before
        tasks = sorted(p.name for p in run.rglob("*") if (p / "executor_output.json").is_file())
        published[shards] = (run, tasks, terminal.getvalue())
        # kfp.local swaps builtins.print per task, racily across the shards' threads; the run gives
        # the process its own back (once left behind, every later print in this process was indented)
        assert builtins.print is own_print
    run, tasks, shown = published[SHARDS]
    assert tasks == [
        "clean-merge-shards",
        *["clean-shard"] * SHARDS,
        "fetch-photos",
        "fingerprint-data",
        "plan-clean-shards",
    ]
    assert snapshot(run / "clean-merge-shards" / "cleaned") == snapshot(reference)
    # One line per task, each shard's with its own summary (kfp.local runs the shards in threads).
    lines = [line.split() for line in shown.splitlines()]
    assert sorted(" ".join(line[4:6]) for line in lines if line[0] == "clean-shard") == [
        f"shard {i}/{SHARDS}," for i in range(1, SHARDS + 1)
    ]
    assert next(line[4:] for line in lines if line[0] == "plan-clean-shards") == [
        "3",
        "shards",
        "for",
        "clean",
    ]
    assert next(" ".join(line[4:]) for line in lines if line[0] == "clean-merge-shards") == expected
    assert "dropped 3 label_conflict" in expected  # the copy filed twice reached the merge from its shards
    run, tasks, _ = published[1]
    assert tasks == ["clean-photos", "fetch-photos", "fingerprint-data"]
    assert snapshot(run / "clean-photos" / "cleaned") == snapshot(reference)
