"""classify and evaluate on the real sample photos with tiny real models (see tiny_models.py)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import constant_model, fitted_model

from shopvision.cli import main
from shopvision.components.errors import StepError
from shopvision.components.evaluation.evaluate import evaluate, find_test_dir, summary
from shopvision.components.evaluation.plots import plot_confusion_matrix
from shopvision.components.evaluation.predict import classify, collect_files, format_table, write_predictions
from shopvision.components.training.models import ModelSpec, load_classifier

REPO = Path(__file__).resolve().parents[1]
TAXONOMY = REPO / "data" / "sample" / "taxonomy.csv"


def shopvision(capsys, *args: str) -> subprocess.CompletedProcess:
    """The command line in-process (the same parser and error handling, without a new interpreter)."""
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse rejects a flag value
        code = exc.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["shopvision", *args], code, captured.out, captured.err)


@pytest.fixture(scope="module")
def split_root(sample_raw, tmp_path_factory) -> Path:
    """A split folder whose test/ holds every sample photo plus two files that are not photos."""
    root = tmp_path_factory.mktemp("evaluate-data") / "split"
    for category_dir in sorted(sample_raw.iterdir()):
        target = root / "test" / category_dir.name
        target.mkdir(parents=True)
        for photo in sorted(category_dir.iterdir()):
            os.link(photo, target / photo.name)
    banana = next((sample_raw / "Banana").iterdir()).read_bytes()
    (root / "test" / "Banana" / "cut_1.jpg").write_bytes(banana[: len(banana) // 3])  # truncated JPEG
    (root / "test" / "Kiwi" / "notes.txt").write_text("not a photo\n")
    (root / "split.json").write_text("{}\n")
    return root


@pytest.fixture(scope="module")
def labels(sample_raw) -> list[str]:
    return sorted(p.name for p in sample_raw.iterdir())


@pytest.fixture(scope="module")
def fitted(sample_raw, labels, tmp_path_factory) -> Path:
    """Fitted on every other photo of each category: right on those, often wrong on the rest."""
    photos, categories = [], []
    for category in labels:
        for photo in sorted((sample_raw / category).iterdir())[::2]:
            photos.append(photo)
            categories.append(category)
    return fitted_model(tmp_path_factory.mktemp("fitted") / "model", labels, photos, categories)


def test_find_test_dir_accepts_a_split_root_or_the_test_folder(split_root, tmp_path):
    assert find_test_dir(split_root) == split_root / "test"
    assert find_test_dir(split_root / "test") == split_root / "test"
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(StepError, match="without a test/ split"):
        find_test_dir(tmp_path)
    with pytest.raises(StepError, match="does not exist"):
        find_test_dir(tmp_path / "missing")


def test_classify_reports_unreadable_files_and_classifies_the_rest(fitted, split_root, sample_raw, tmp_path):
    folder = split_root / "test"
    result = classify(fitted, [folder], top_k=3, batch_size=16, device="cpu")
    readable = sum(len(list(p.iterdir())) for p in sample_raw.iterdir())
    assert len(result.predictions) == readable and result.top_k == 3
    unreadable = {u.path.name: u.reason for u in result.unreadable}
    assert unreadable == {"cut_1.jpg": "corrupt_image", "notes.txt": "not_an_image"}
    first = result.predictions[0]
    assert len(first.labels) == 3 and list(first.probabilities) == sorted(first.probabilities, reverse=True)
    assert 0 < sum(first.probabilities) <= 1 + 1e-6
    # The same photos one by one give the same answers as in a batch (batching changes nothing).
    single = classify(fitted, [first.path], top_k=3, device="cpu").predictions[0]
    assert single.labels == first.labels
    assert single.probabilities == pytest.approx(first.probabilities, abs=1e-5)
    assert "UNREADABLE (corrupt_image" in format_table(result)
    write_predictions(result, tmp_path / "p.json")
    body = json.loads((tmp_path / "p.json").read_text())
    assert len(body["predictions"]) == readable and len(body["unreadable"]) == 2
    write_predictions(result, tmp_path / "p.csv")
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == readable and set(rows[0]) == {
        "file",
        "label_1",
        "prob_1",
        "label_2",
        "prob_2",
        "label_3",
        "prob_3",
    }
    with pytest.raises(StepError, match="does not exist"):
        collect_files([tmp_path / "nowhere"])


def test_classify_command_prints_a_table_and_reports_unreadable_files(fitted, split_root, tmp_path, capsys):
    kiwi = split_root / "test" / "Kiwi"
    done = shopvision(capsys, "classify", "--model", str(fitted), "--device", "cpu", str(kiwi))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    photos = len(list(kiwi.glob("*.jpg")))
    assert len(lines) == photos + 1 and "UNREADABLE (not_an_image" in lines[-1]
    assert f"{photos} photos classified (top-5)" in done.stderr and "1 unreadable" in done.stderr
    out = tmp_path / "kiwi.csv"
    done = shopvision(
        capsys, "classify", "--model", str(fitted), "--top-k", "2", "--output", str(out), str(kiwi)
    )
    assert done.returncode == 0, done.stderr
    assert "unreadable" in done.stderr and "notes.txt" in done.stderr
    assert len(out.read_text().splitlines()) == photos + 1
    done = shopvision(capsys, "classify", "--model", str(fitted), str(kiwi / "notes.txt"))
    assert done.returncode == 2 and "none of the 1 files is a readable photo" in done.stderr


def test_evaluate_writes_consistent_results_and_the_threshold_into_the_model_copy(
    fitted, split_root, tmp_path
):
    out = tmp_path / "eval"
    val = tmp_path / "val"  # the photos the model was not fitted on: its threshold is chosen here
    for category_dir in sorted((split_root / "test").iterdir()):
        (val / category_dir.name).mkdir(parents=True)
        for photo in sorted(category_dir.glob("*.jpg"))[1::2]:
            os.link(photo, val / category_dir.name / photo.name)
    result = evaluate(
        fitted, split_root, out, taxonomy=TAXONOMY, target_accuracy=0.6, threshold_data=val, device="cpu"
    )
    names = {p.name for p in out.iterdir()}
    assert {
        "predictions.csv",
        "metrics.json",
        "confusion_matrix.png",
        "confusions.csv",
        "coverage.csv",
        "coverage.png",
        "model",
    } <= names
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result.metrics))
    assert (
        metrics["counts"]["unreadable"] == 2 and metrics["counts"]["files"] == metrics["counts"]["images"] + 2
    )
    assert {u["file"] for u in metrics["unreadable"]} == {"Banana/cut_1.jpg", "Kiwi/notes.txt"}

    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == metrics["counts"]["images"]
    assert list(rows[0])[:6] == [
        "true_category",
        "product_id",
        "file",
        "correct",
        "predicted_1",
        "probability_1",
    ]
    assert list(rows[0])[-2:] == ["predicted_5", "probability_5"]
    assert rows[0]["product_id"] == "train_Avocado_001" and rows[0]["file"] == "Avocado/train_Avocado_001.jpg"
    top1 = np.mean([r["true_category"] == r["predicted_1"] for r in rows])
    top5 = np.mean([r["true_category"] in [r[f"predicted_{k}"] for k in range(1, 6)] for r in rows])
    assert metrics["top1_accuracy"] == pytest.approx(top1) and metrics["top5_accuracy"] == pytest.approx(top5)
    # Fitted on half of each category's photos: clearly better than chance, clearly not perfect.
    assert 0.4 < metrics["top1_accuracy"] < 1.0
    assert sum(r["support"] for r in metrics["per_category"].values()) == len(rows)
    assert metrics["macro_category"]["accuracy"] >= metrics["top1_accuracy"]  # apples merge into one

    coverage = list(csv.DictReader((out / "coverage.csv").open()))
    assert [r["threshold"] for r in coverage][:3] == ["0.00", "0.01", "0.02"] and len(coverage) == 100
    assert float(coverage[0]["coverage"]) == 1.0
    assert float(coverage[0]["accuracy"]) == pytest.approx(metrics["top1_accuracy"])
    # The threshold is the lowest that reaches the target on the validation photos (their own coverage
    # curve, written when they are evaluated as a test folder), not on the test photos.
    evaluate(fitted, val, tmp_path / "on-val", target_accuracy=0.6, threshold_data=val, device="cpu")
    val_curve = list(csv.DictReader((tmp_path / "on-val" / "coverage.csv").open()))
    reaching = [float(r["threshold"]) for r in val_curve if r["accuracy"] and float(r["accuracy"]) >= 0.6]
    on_test = [float(r["threshold"]) for r in coverage if r["accuracy"] and float(r["accuracy"]) >= 0.6]
    assert metrics["confidence_threshold"] == reaching[0] == result.confidence_threshold != on_test[0]
    assert (
        metrics["coverage"]["chosen_on"]["covered"] >= 30
        and metrics["coverage"]["chosen_on"]["warning"] is None
    )
    # Recompute the test coverage at the threshold from predictions.csv.
    sure = [r for r in rows if float(r["probability_1"]) >= reaching[0]]
    assert metrics["coverage"]["covered"] == len(sure)
    assert metrics["coverage"]["accuracy"] == pytest.approx(np.mean([r["correct"] == "1" for r in sure]))

    confusions = list(csv.DictReader((out / "confusions.csv").open()))
    assert sum(int(c["count"]) for c in confusions) == len(rows) - sum(r["correct"] == "1" for r in rows)
    assert metrics["top_confusions"][0]["count"] == int(confusions[0]["count"])

    copy_model, copy_spec = load_classifier(out / "model")
    assert copy_spec.extra["confidence_threshold"] == metrics["confidence_threshold"]
    assert copy_spec.extra["confidence_target_accuracy"] == 0.6
    assert "confidence_threshold" not in ModelSpec.from_json((fitted / "model_spec.json").read_text()).extra
    original, _ = load_classifier(fitted)
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(copy_model(x), original(x))
    for png in ("confusion_matrix.png", "coverage.png"):
        with Image.open(out / png) as image:
            assert image.format == "PNG" and image.width >= 600
    assert "threshold 0.79 (chosen on validation)" in summary(result).replace(f"{reaching[0]:.2f}", "0.79")


def test_a_stale_threshold_is_cleared_when_no_threshold_reaches_the_target(labels, split_root, tmp_path):
    model = constant_model(tmp_path / "banana", labels, "Banana")
    spec = ModelSpec.from_json((model / "model_spec.json").read_text())
    spec.extra["confidence_threshold"] = 0.5  # from some earlier evaluation
    (model / "model_spec.json").write_text(spec.to_json())
    # (the same photos stand in as validation photos: no threshold can reach 0.95 on them)
    result = evaluate(
        model,
        split_root / "test",
        tmp_path / "eval",
        target_accuracy=0.95,
        threshold_data=split_root / "test",
    )
    assert result.metrics["confidence_threshold"] is None
    assert result.metrics["per_category"]["Banana"]["recall"] == 1.0
    assert result.metrics["top1_accuracy"] == pytest.approx(24 / result.metrics["counts"]["images"])
    copy = ModelSpec.from_json((tmp_path / "eval" / "model" / "model_spec.json").read_text())
    assert copy.extra["confidence_threshold"] is None
    assert "no confidence threshold reaches 0.95 accuracy on the validation photos" in summary(result)
    assert "the server default" in summary(result)
    # A second evaluation may overwrite its own output folder, but not a folder it did not make.
    evaluate(model, split_root, tmp_path / "eval", device="cpu")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(StepError, match="not empty"):
        evaluate(model, split_root, tmp_path / "other", device="cpu")
    # A taxonomy that misses categories is refused before any photo is classified or file written.
    (tmp_path / "partial.csv").write_text("category,macro_category\nBanana,Banana\n")
    with pytest.raises(StepError, match="no macro category for 11 categories"):
        evaluate(model, split_root, tmp_path / "never", taxonomy=tmp_path / "partial.csv", device="cpu")
    assert not (tmp_path / "never").exists()


def test_evaluate_command_on_a_split_root(fitted, split_root, tmp_path, capsys):
    out = tmp_path / "eval"
    done = shopvision(
        capsys,
        "evaluate",
        "--model",
        str(fitted),
        "--data",
        str(split_root),
        "--out",
        str(out),
        "--taxonomy",
        str(TAXONOMY),
        "--device",
        "cpu",
    )
    assert done.returncode == 0, done.stderr
    assert "evaluate: 174 photos in 12 categories (2 unreadable, skipped): top-1" in done.stdout
    assert "macro-category" in done.stdout and "cut_1.jpg: corrupt_image" in done.stderr
    assert json.loads((out / "metrics.json").read_text())["coverage"]["target_accuracy"] == 0.95
    done = shopvision(
        capsys,
        "evaluate",
        "--model",
        str(fitted),
        "--data",
        str(split_root),
        "--out",
        str(out),
        "--target-accuracy",
        "1.5",
    )
    assert done.returncode == 2 and "must be in (0, 1]" in done.stderr


@pytest.mark.parametrize("categories", [10, 200])
def test_confusion_matrix_png_stays_readable(categories, tmp_path):
    rng = np.random.default_rng(categories)
    true = rng.integers(0, categories, categories * 20)
    predicted = np.where(rng.random(true.size) < 0.7, true, rng.integers(0, categories, true.size))
    matrix = np.zeros((categories, categories), dtype=np.int64)
    np.add.at(matrix, (true, predicted), 1)
    labels = [f"category-{i:03d}" for i in range(categories)]
    target = tmp_path / "cm.png"
    plot_confusion_matrix(matrix, labels, target)
    with Image.open(target) as image:
        # Small: ~7 inches; 200 categories: capped at 17.5 × 16 inches at 100 dpi, ≥ 6 px per cell.
        assert image.width <= 1800 and image.height <= 1600
        if categories == 200:
            assert image.height >= 1200


def test_too_few_validation_photos_choose_no_threshold(fitted, split_root, sample_raw, tmp_path):
    val = tmp_path / "val"  # two photos per category that the model was fitted on: all right, but 24 photos
    for category_dir in sorted(sample_raw.iterdir()):
        (val / category_dir.name).mkdir(parents=True)
        for photo in sorted(category_dir.iterdir())[:4:2]:
            os.link(photo, val / category_dir.name / photo.name)
    result = evaluate(
        fitted, split_root, tmp_path / "eval", target_accuracy=0.9, threshold_data=val, device="cpu"
    )
    chosen = result.metrics["coverage"]["chosen_on"]
    assert chosen["candidate"] is not None and chosen["covered"] < 30  # one would reach 0.9 on 24 photos
    assert result.confidence_threshold is None and "too few to choose one" in chosen["warning"]
    assert result.metrics["coverage"]["served_threshold"] == 0.5
    assert "warning: only" in summary(result) and "the server default" in summary(result)
