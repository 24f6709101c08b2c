"""The benchmarks still run: a tiny smoke run of each one that needs nothing outside the venv.

That is train_throughput.py, serve_vs_mlflow.py, near_duplicates.py, grocery_compare.py (on two tiny
models' evaluations) and grocery_probe.py (on sample photos renamed as the grocery set's lists).
clean_vs_imagemagick.py needs ImageMagick, and split_leakage.py and grocery_accuracy.sh the grocery-store set in ../shared (its
held-out `val_*` photos are the reference), and scale.py Debian's dataset-fashion-mnist and tens of
minutes, and artifact_bytes.py a whole kfp.local pipeline run, so they are run by hand. Speed is not asserted here (timed
unit tests lie on a shared CI machine); the ratios come from the benchmarks themselves, run by hand
(bench/README.md).
What is asserted is that each side of a comparison is measured the same way.
"""

import csv
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
# The venv-only ones, each run below.
BENCHES = {
    "train_throughput.py",
    "serve_vs_mlflow.py",
    "near_duplicates.py",
    "grocery_probe.py",
    "grocery_compare.py",
}


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_bench(script: Path, *args: str | Path, timeout: int = 120) -> subprocess.CompletedProcess:
    """A bench script as a user runs it: its own process, its output captured as text."""
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def test_every_bench_script_is_smoke_run_here_or_says_what_it_needs():
    scripts = {p.name for p in (REPO / "bench").iterdir() if p.suffix in {".py", ".sh"}}
    needs_more = {
        "clean_vs_imagemagick.py",
        "split_leakage.py",
        "grocery_accuracy.sh",
        "scale.py",
        "artifact_bytes.py",  # a whole pipeline run (minutes); its counting is checked below
        "grocery_levers.py",  # a finished grocery_accuracy.sh run's folder
    }
    assert scripts == BENCHES | needs_more
    tested = Path(__file__).read_text(encoding="utf-8")
    for script in BENCHES:
        assert f'"bench" / "{script}"' in tested, script


def test_train_throughput_reference_loop_keeps_its_loader_workers_as_ours_does(sample_raw, tmp_path):
    """Both loops warm up, then time their steps; a loader whose workers do not persist starts them
    again inside the timed steps, so both must keep them (or neither)."""
    import torch

    from shopvision.components.training.models import ModelSpec
    from shopvision.components.training.train_data import loaders

    data = tmp_path / "data"
    for category in sorted(p for p in sample_raw.iterdir() if p.is_dir())[:2]:
        for split in ("train", "val"):
            (data / split / category.name).mkdir(parents=True)
            for photo in sorted(category.glob("*.jpg"))[:2]:
                shutil.copy(photo, data / split / category.name / photo.name)
    labels = sorted(p.name for p in (data / "train").iterdir())
    spec = ModelSpec("resnet18", labels, image_size=32)
    ctx = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
    bench = _bench_module("train_throughput")
    for workers in (0, 2):
        ours, _, _ = loaders(data, spec, ctx, 4, workers, 0)
        args = SimpleNamespace(image_size=32, batch_size=4, workers=workers)
        reference = bench.reference_loader(data, args, ctx.device)
        assert (reference.num_workers, reference.persistent_workers) == (
            ours.num_workers,
            ours.persistent_workers,
        )
        assert reference.persistent_workers == (workers > 0)


def test_train_throughput_bench_measures_both_loops(sample_raw):
    done = _run_bench(
        REPO / "bench" / "train_throughput.py",
        *["--raw", sample_raw, "--depths", "18", "--image-size", "32", "--batch-size", "4"],
        *["--steps", "2", "--warmup", "1", "--workers", "0", "--device", "cpu"],
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"^model\s+batch\s+synthetic\s+decode cpu\s+decode gpu\s+reference$", done.stdout, re.M)
    row = re.search(r"^resnet18\s+4\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", done.stdout, re.MULTILINE)
    assert row, done.stdout
    assert all(float(rate) > 0 for rate in row.groups())  # images/s without loading, per decode, reference


def test_train_throughput_bench_refuses_an_unknown_depth(sample_raw):
    done = _run_bench(REPO / "bench" / "train_throughput.py", "--raw", sample_raw, "--depths", "19")
    assert done.returncode == 2 and "unknown ResNet depth" in done.stderr and "Traceback" not in done.stderr


def test_serve_bench_measures_both_servers_on_the_same_model():
    done = _run_bench(
        REPO / "bench" / "serve_vs_mlflow.py",
        *["--seconds", "2", "--rounds", "2", "--warmup", "0.5", "--clients", "2"],
        *["--image-size", "32", "--photos", "4", "--device", "cpu", "--runtimes", "torch,onnx"],
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # Every server answered the same top category for the same photos before timing started.
    assert "same top category from all but int8" in done.stdout, done.stdout
    rows = {
        m.group(1): (int(m.group(2)), int(m.group(3)), float(m.group(4)))
        for m in re.finditer(
            r"^(shopvision [\w-]+|mlflow models serve)\s+(\d+)\s+(\d+)\s+([\d.]+)\s",
            done.stdout,
            re.MULTILINE,
        )
    }
    assert set(rows) == {"shopvision torch", "shopvision onnx", "mlflow models serve"}, done.stdout
    for requests, errors, per_second in rows.values():
        assert requests > 0 and errors == 0 and per_second > 0
    ratio = float(re.search(r"throughput: shopvision onnx is ([\d.]+)x", done.stdout).group(1))
    ours, theirs = rows["shopvision onnx"][2], rows["mlflow models serve"][2]
    assert ratio == pytest.approx(ours / theirs, rel=0.05, abs=0.02)


def test_near_duplicates_bench_prints_every_size_and_the_growth():
    done = _run_bench(REPO / "bench" / "near_duplicates.py", "--sizes", "2000", "4000", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for kind in ("uniform", "clustered"):
        assert re.search(rf"^{kind}\s+2000\s+[\d.]+\s+[\d.]+\s+\d+\s*$", done.stdout, re.M), done.stdout
        grown = re.search(rf"^{kind}\s+4000\s+[\d.]+\s+[\d.]+\s+(\d+)\s+([\d.]+)$", done.stdout, re.M)
        assert grown, done.stdout
        assert kind == "uniform" or int(grown[1]) > 0  # the clustered set really holds near pairs


def test_artifact_bytes_counts_a_hard_link_as_a_copy(tmp_path):
    """An object store holds a full copy of each hard link: the count must too."""
    import os

    bench = _bench_module("artifact_bytes")
    task = tmp_path / "run" / "clean-photos" / "cleaned"
    (task / "Apple").mkdir(parents=True)
    (task / "Apple" / "a.jpg").write_bytes(b"x" * 1000)
    os.link(task / "Apple" / "a.jpg", task / "Apple" / "b.jpg")
    (task / "clean_report.json").write_text("{}")
    row = bench.task_bytes(tmp_path / "run")["clean-photos"]
    assert row == {"files": 3, "bytes": 2002, "photo_bytes": 2000, "model_bytes": 0}


def _probe_bench(cleaned: Path, features: Path) -> subprocess.CompletedProcess:
    return _run_bench(
        REPO / "bench" / "grocery_probe.py",
        *[cleaned, "--features", features, "--backbones", "efficientnet_lite0:64", "--seeds", "1"],
        timeout=300,
    )


def test_grocery_probe_scores_validation_and_held_out_photos_and_reuses_its_features(sample_raw, tmp_path):
    cleaned = tmp_path / "cleaned"
    for category in sorted(p for p in sample_raw.iterdir() if p.is_dir())[:3]:
        (cleaned / category.name).mkdir(parents=True)
        for i, photo in enumerate(sorted(category.glob("*.jpg"))):
            name = photo.name if i % 3 else photo.name.replace("train_", "val_")
            shutil.copy(photo, cleaned / category.name / name)
    first = _probe_bench(cleaned, tmp_path / "features")
    assert first.returncode == 0, first.stderr[-2000:]
    row = re.search(r"^efficientnet_lite0@64\s+(\S+)\s+([\d.]+)±[\d.]+\s+([\d.]+)±", first.stdout, re.M)
    # Computed, so a number of seconds (not its value: a smoke run can take under half a second).
    assert row and float(row.group(1)) >= 0, first.stdout
    assert 0 <= float(row.group(2)) <= 1 and 0 <= float(row.group(3)) <= 1
    assert (tmp_path / "features" / "efficientnet_lite0_64.npy").is_file()
    again = _probe_bench(cleaned, tmp_path / "features")
    assert again.returncode == 0, again.stderr[-2000:]
    cached = re.search(r"^efficientnet_lite0@64\s+nan\s+(.*)$", again.stdout, re.M)
    assert cached and first.stdout.splitlines()[1].split()[2:] == cached.group(1).split(), again.stdout


def test_grocery_probe_refuses_a_folder_without_the_lists(tmp_path):
    done = _probe_bench(tmp_path, tmp_path / "features")
    assert (
        done.returncode == 2 and "no CATEGORY/train_*.jpg" in done.stderr and "Traceback" not in done.stderr
    )


def test_grocery_probe_refuses_an_unknown_backbone(tmp_path):
    done = _run_bench(REPO / "bench" / "grocery_probe.py", tmp_path, "--backbones", "resnet50:224")
    assert done.returncode == 2 and "--backbones" in done.stderr and "Traceback" not in done.stderr


def _compare_bench(*works: Path) -> subprocess.CompletedProcess:
    return _run_bench(REPO / "bench" / "grocery_compare.py", *works)


def test_grocery_compare_pairs_two_runs_on_the_photos_both_scored(sample_raw, tmp_path):
    from tiny_models import fitted_model

    from shopvision.components.evaluation.evaluate import evaluate

    labels, photos, categories, test = [], [], [], tmp_path / "test"
    for category in sorted(p for p in sample_raw.iterdir() if p.is_dir())[:3]:
        labels.append(category.name)
        files = sorted(category.glob("*.jpg"))
        photos += files[:2]
        categories += [category.name] * 2
        (test / category.name).mkdir(parents=True)
        for photo in files[2:8]:
            shutil.copy(photo, test / category.name / photo.name)
    rights = {}
    for name, seed in (("base", 0), ("other", 1)):
        model = fitted_model(tmp_path / f"model-{name}", labels, photos, categories, seed=seed, steps=30)
        evaluate(model, test, tmp_path / name / "eval")
        with (tmp_path / name / "eval" / "predictions.csv").open(newline="") as rows:
            rights[name] = {r["file"]: r["correct"] == "1" for r in csv.DictReader(rows)}
    done = _compare_bench(tmp_path / "base", tmp_path / "other")
    assert done.returncode == 0, done.stderr[-2000:]
    base_row, other_row = done.stdout.splitlines()[1:]
    assert base_row.startswith("base ") and "+0.000 [+0.000, +0.000] (+0/-0, McNemar p=1.000)" in base_row
    gained = sum(rights["other"][f] and not rights["base"][f] for f in rights["base"])
    lost = sum(rights["base"][f] and not rights["other"][f] for f in rights["base"])
    assert f"(+{gained}/-{lost}, McNemar p=" in other_row, done.stdout


def test_grocery_compare_refuses_a_folder_that_is_no_finished_run(tmp_path):
    done = _compare_bench(tmp_path, tmp_path)
    assert done.returncode == 2 and "eval/metrics.json" in done.stderr and "Traceback" not in done.stderr
