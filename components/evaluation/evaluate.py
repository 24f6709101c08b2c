"""The evaluate step: a model against a labelled test folder, with every number a reviewer asks for.

    OUT/predictions.csv      true category, product id, file, top-1 right?, predicted 1..k with probability
    OUT/metrics.json         top-1/top-5 accuracy, per-category precision/recall/F1/support, macro and
                             weighted averages, counts, top confusions, the confidence threshold,
                             macro-category accuracy (with a taxonomy)
    OUT/confusion_matrix.png row-normalised; names and per-cell values only while they stay legible
    OUT/confusions.csv       every off-diagonal cell, most photos first
    OUT/coverage.csv/.png    per threshold 0.00..0.99: share of photos at least that sure, accuracy on them
    OUT/model/               the evaluated model with spec.extra["confidence_threshold"] set
    OUT/drift_baseline.json  its answers' statistics on the test photos, for drift (also in OUT/model/)

`compute_metrics` turns predictions into the metrics dictionary without touching a file, so it can
be checked on hand-made predictions; `evaluate` adds the reading, writing and MLflow logging.

The test photos are the test rows of a data step's manifest (split's output: references into the
cleaned photos), SPLIT/test of one, the test/ folder of a split root in the folder layout, or a
folder of <category>/ sub-folders; `photo_sets.labelled_split` reads any of them.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.manifest import Photo, locate, photos_fingerprint
from ..data.naming import atomic_write_text, link_or_copy, product_id
from ..errors import StepError
from ..step_output import csv_text, prepare_out
from . import metrics as m
from .baseline import BASELINE_FILE, baseline_from_answers, write_baseline
from .outputs import (
    CONFUSION_PNG,
    CONFUSIONS_FILE,
    COVERAGE_FILE,
    COVERAGE_PNG,
    METRICS_FILE,
    MODEL_DIR,
    PREDICTIONS_FILE,
)
from .photo_sets import find_test_dir as find_test_dir  # re-exported: promote and the tests use it here
from .photo_sets import labelled_photos as labelled_photos
from .photo_sets import labelled_split as labelled_split
from .photo_sets import validation_photos
from .plots import plot_confusion_matrix, plot_coverage
from .predict import PhotoPrediction, UnreadablePhoto, pick_device, predict_files

THRESHOLD_KEY = "confidence_threshold"  # spec.extra key, metrics.json key, run tag, model version tag
DEFAULT_TARGET_ACCURACY = 0.95
DEFAULT_CONFIDENCE_THRESHOLD = 0.5  # what serving applies when a version carries none
MIN_THRESHOLD_PHOTOS = 30  # validation photos at the chosen threshold below which none is chosen
CHOOSE_HERE = object()  # compute_metrics: choose the threshold on the photos being scored
TOP_K = 5
TOP_CONFUSIONS_IN_JSON = 20


@dataclass
class EvaluationResult:
    out: Path
    metrics: dict
    model_dir: Path  # OUT/model, the evaluated model carrying the confidence threshold
    unreadable: list[UnreadablePhoto] = field(default_factory=list)
    run_id: str | None = None

    @property
    def confidence_threshold(self) -> float | None:
        return self.metrics[THRESHOLD_KEY]


def read_taxonomy(path: Path) -> dict[str, str]:
    """`category,macro_category` rows (a header line first) as {category: macro_category}."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise StepError(f"cannot read taxonomy {path}: {exc.strerror or exc}") from None
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or not {"category", "macro_category"} <= {f.strip() for f in reader.fieldnames}:
        raise StepError(f"taxonomy {path} needs a header line with the columns category,macro_category")
    taxonomy: dict[str, str] = {}
    for line, row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        category, macro = row["category"], row["macro_category"]
        if not category or not macro:
            raise StepError(f"taxonomy {path} line {line}: empty category or macro_category")
        if taxonomy.get(category, macro) != macro:
            raise StepError(
                f"taxonomy {path} line {line}: {category!r} is under both {taxonomy[category]!r} and {macro!r}"
            )
        taxonomy[category] = macro
    if not taxonomy:
        raise StepError(f"taxonomy {path} has no rows")
    return taxonomy


def compute_metrics(
    labels: Sequence[str],
    true_categories: Sequence[str],
    predictions: Sequence[PhotoPrediction],
    *,
    target_accuracy: float = DEFAULT_TARGET_ACCURACY,
    taxonomy: Mapping[str, str] | None = None,
    threshold: float | None | object = None,
) -> tuple[dict, np.ndarray, list[str], list[m.CoveragePoint]]:
    """(metrics, confusion matrix, the matrix's category order, coverage curve) for the predictions.

    `threshold` is the confidence threshold chosen on other photos (validation; None: none was
    chosen, so the server's default applies); the coverage block reports these photos at the
    threshold that will be served. `CHOOSE_HERE` picks it on these very photos: only for a quick
    look, never for a number that is reported (that would be tuning on the test photos).

    `labels` are the model's categories (the index space of `PhotoPrediction.indices`). Test
    categories the model does not know are appended after them: their photos count as wrong.
    """
    if len(true_categories) != len(predictions):
        raise ValueError("one true category per prediction is needed")
    if not predictions:
        raise StepError("no readable test photos to evaluate")
    if not 0.0 < target_accuracy <= 1.0:
        raise StepError(f"target accuracy must be in (0, 1], got {target_accuracy}")
    unknown = sorted(set(true_categories) - set(labels))
    classes = list(labels) + unknown
    index = {c: i for i, c in enumerate(classes)}
    true_index = [index[c] for c in true_categories]
    ranked = [p.indices for p in predictions]
    top_k = len(ranked[0])
    matrix = m.confusion_matrix(true_index, [r[0] for r in ranked], len(classes))
    report = m.per_category_report(matrix, classes)
    correct = [t == r[0] for t, r in zip(true_index, ranked, strict=True)]
    curve = m.coverage_curve([p.probabilities[0] for p in predictions], correct)
    if threshold is CHOOSE_HERE:
        threshold = m.lowest_threshold(curve, target_accuracy)
    served = DEFAULT_CONFIDENCE_THRESHOLD if threshold is None else threshold
    at = next((p for p in curve if abs(p.threshold - served) < 1e-9), None)
    result = {
        "top1_accuracy": m.top_k_accuracy(true_index, ranked, 1),
        "top5_accuracy": m.top_k_accuracy(true_index, ranked, TOP_K),
        "top_k": top_k,
        "counts": {
            "images": len(predictions),
            "correct_top1": int(sum(correct)),
            "correct_top5": int(sum(t in r[:TOP_K] for t, r in zip(true_index, ranked, strict=True))),
            "test_categories": len(set(true_categories)),
            "model_categories": len(labels),
            "categories_unknown_to_model": unknown,
        },
        "macro_avg": report["macro_avg"],
        "weighted_avg": report["weighted_avg"],
        "per_category": report["per_category"],
        "top_confusions": m.top_confusions(matrix, classes, TOP_CONFUSIONS_IN_JSON),
        THRESHOLD_KEY: threshold,
        "coverage": {
            "target_accuracy": target_accuracy,
            THRESHOLD_KEY: threshold,
            "served_threshold": served,
            "covered": at.covered if at else 0,
            "coverage": at.coverage if at else 0.0,
            "accuracy": at.accuracy if at else None,
        },
    }
    if taxonomy is not None:
        predicted = [p.labels[0] for p in predictions]
        result["macro_category"] = m.macro_category_accuracy(true_categories, predicted, taxonomy)
    return result, matrix, classes, curve


def headline_metrics(metrics: Mapping) -> dict[str, float]:
    """The scalar results, named as they are logged to MLflow and tagged on model versions."""
    values = {
        "test_top1_accuracy": metrics["top1_accuracy"],
        "test_top5_accuracy": metrics["top5_accuracy"],
        "test_images": metrics["counts"]["images"],
    }
    for average in ("macro_avg", "weighted_avg"):
        for name, value in metrics[average].items():
            values[f"test_{average.removesuffix('_avg')}_{name}"] = value
    if "unreadable" in metrics.get("counts", {}):
        values["test_unreadable"] = metrics["counts"]["unreadable"]
    if metrics.get(THRESHOLD_KEY) is not None:
        values[f"test_{THRESHOLD_KEY}"] = metrics[THRESHOLD_KEY]
        values["test_coverage_at_threshold"] = metrics["coverage"]["coverage"]
    if "macro_category" in metrics:
        values["test_macro_category_accuracy"] = metrics["macro_category"]["accuracy"]
    return {k: float(v) for k, v in values.items()}


def evaluate(
    model: str | Path,
    data: Path,
    out: Path,
    *,
    taxonomy: Path | None = None,
    target_accuracy: float = DEFAULT_TARGET_ACCURACY,
    threshold_data: Path | None = None,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    tta: str | None = None,
    roots: Mapping[str, Path] | None = None,
) -> EvaluationResult:
    """Predict every test photo of DATA, write the results to OUT, log them to RUN_ID if given.

    The confidence threshold is chosen on the validation photos (`threshold_data`, or the val split
    beside the test photos) and only reported on test; without them no threshold is chosen. `roots`
    says where the photos a manifest references lie here (default: where they were written).
    `tta` ("flip" or "none"; None keeps the model's own) is evaluated, thresholded and written into
    the model copy's spec, so the server answers with the same passes the threshold was chosen on.
    """
    from ..data.fingerprint import data_fingerprint
    from ..training.model_source import resolve_model_dir
    from ..training.models import (
        SPEC_NAME,
        TTA_CHOICES,
        TTA_KEY,
        WEIGHTS_NAME,
        load_classifier,
        with_test_time_augmentation,
    )
    from .report import write_evaluation_report

    if not 0.0 < target_accuracy <= 1.0:
        raise StepError(f"--target-accuracy must be in (0, 1], got {target_accuracy}")
    out = Path(out)
    photos, test_where = labelled_split(Path(data), "test", roots)
    val_photos = validation_photos(Path(data), threshold_data, roots)
    files, categories = [p.path for p in photos], [p.category for p in photos]
    mapping = read_taxonomy(taxonomy) if taxonomy else None
    model_dir = resolve_model_dir(model)
    target = pick_device(device)
    network, spec = load_classifier(model_dir, target)
    if tta is not None:
        if tta not in TTA_CHOICES:
            raise StepError(f"--tta {tta!r}: choose from {', '.join(TTA_CHOICES)}")
        spec.extra[TTA_KEY] = None if tta == "none" else tta
        network = with_test_time_augmentation(network, spec)
    if mapping is not None:  # fail before predicting, not after
        missing = sorted((set(categories) | set(spec.labels)) - set(mapping))
        if missing:
            raise StepError(
                f"taxonomy {taxonomy} has no macro category for {len(missing)} categories of the model or "
                f"the test data: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")
            )
    prepare_out(out, METRICS_FILE, "evaluate")  # new, empty, or an earlier evaluation
    predicted = predict_files(network, spec, files, top_k=TOP_K, batch_size=batch_size, progress=progress)
    category_of = dict(zip(files, categories, strict=True))
    name_of = {p.path: p.name for p in photos}
    true_categories = [category_of[p.path] for p in predicted.predictions]

    choice = choose_threshold(
        network, spec, val_photos, target_accuracy, batch_size=batch_size, progress=progress
    )
    metrics, matrix, classes, curve = compute_metrics(
        spec.labels,
        true_categories,
        predicted.predictions,
        target_accuracy=target_accuracy,
        taxonomy=mapping,
        threshold=choice["threshold"],
    )
    metrics["coverage"]["chosen_on"] = choice
    metrics["counts"]["files"] = len(files)
    metrics["counts"]["unreadable"] = len(predicted.unreadable)
    metrics["unreadable"] = [
        {"file": name_of[u.path], "reason": u.reason, "detail": u.detail} for u in predicted.unreadable
    ]
    metrics["model"] = str(model)
    metrics["arch"] = spec.arch
    metrics["test_time_augmentation"] = spec.extra.get(TTA_KEY) or "none"
    metrics["test_dir"] = test_where
    metrics["test_data_fingerprint"] = (
        data_fingerprint(Path(test_where)) if locate(Path(data)) is None else photos_fingerprint(photos)
    )
    if mapping is not None:
        metrics["taxonomy"] = str(taxonomy)

    _write_predictions(out / PREDICTIONS_FILE, name_of, true_categories, predicted.predictions)
    _write_confusions(out / CONFUSIONS_FILE, m.top_confusions(matrix, classes, limit=None))
    _write_coverage(out / COVERAGE_FILE, curve)
    plot_confusion_matrix(matrix, classes, out / CONFUSION_PNG)
    plot_coverage(curve, target_accuracy, metrics[THRESHOLD_KEY], out / COVERAGE_PNG)

    # The output copy of the model carries the threshold (None: no threshold reaches the target, so
    # a value from an earlier evaluation must not survive into this copy).
    spec.extra[THRESHOLD_KEY] = metrics[THRESHOLD_KEY]
    spec.extra["confidence_target_accuracy"] = target_accuracy
    if (out / MODEL_DIR).exists():
        shutil.rmtree(out / MODEL_DIR)
    link_or_copy(model_dir / WEIGHTS_NAME, out / MODEL_DIR / WEIGHTS_NAME)
    atomic_write_text(out / MODEL_DIR / SPEC_NAME, spec.to_json())
    # What the model's answers look like on held-out photos, at the threshold the server will apply:
    # the server's drift scores compare its live answers with it (serving/drift.py).
    baseline = baseline_from_answers(
        spec.labels,
        [p.labels[0] for p in predicted.predictions],
        [p.probabilities[0] for p in predicted.predictions],
        metrics["coverage"]["served_threshold"],
    )
    write_baseline(out / BASELINE_FILE, baseline)
    link_or_copy(out / BASELINE_FILE, out / MODEL_DIR / BASELINE_FILE)
    atomic_write_text(out / METRICS_FILE, json.dumps(metrics, indent=1) + "\n")
    write_evaluation_report(
        out, {p.name: p.path for p in photos}
    )  # report.html, logged to the run below with the rest of OUT

    if run_id:
        log_to_run(run_id, out, metrics, tracking_uri)
    return EvaluationResult(out, metrics, out / MODEL_DIR, list(predicted.unreadable), run_id)


def choose_threshold(
    network, spec, val: list[Photo] | None, target_accuracy: float, *, batch_size: int = 64, progress=None
) -> dict:
    """The lowest confidence threshold whose validation photos reach the target accuracy.

    Chosen on validation, never on test: a threshold fitted to the photos it is then reported on
    promises an accuracy the server will not keep. Fewer than MIN_THRESHOLD_PHOTOS validation photos
    at the threshold is no evidence: no threshold is chosen (the server applies its default) and the
    warning says why.
    """
    choice: dict = {"photos": "val", "threshold": None, "warning": None}
    if val is None:
        choice["warning"] = (
            "no validation photos: no confidence threshold chosen (the server default "
            f"{DEFAULT_CONFIDENCE_THRESHOLD} applies)"
        )
        return choice
    files, categories = [p.path for p in val], [p.category for p in val]
    predicted = predict_files(network, spec, files, top_k=1, batch_size=batch_size, progress=progress)
    category_of = dict(zip(files, categories, strict=True))
    correct = [p.labels[0] == category_of[p.path] for p in predicted.predictions]
    curve = m.coverage_curve([p.probabilities[0] for p in predicted.predictions], correct)
    found = m.lowest_threshold(curve, target_accuracy)
    at = next((p for p in curve if p.threshold == found), None)
    choice.update(
        images=len(correct),
        candidate=found,
        covered=at.covered if at else 0,
        coverage=at.coverage if at else 0.0,
        accuracy=at.accuracy if at else None,
    )
    if found is None:
        choice["warning"] = (
            f"no confidence threshold reaches {target_accuracy:g} accuracy on the validation photos"
        )
    elif at.covered < MIN_THRESHOLD_PHOTOS:
        choice["warning"] = (
            f"only {at.covered} validation photo(s) at threshold {found:.2f} (fewer than "
            f"{MIN_THRESHOLD_PHOTOS}): too few to choose one; the server default "
            f"{DEFAULT_CONFIDENCE_THRESHOLD} applies"
        )
    else:
        choice["threshold"] = found
    return choice


def _write_predictions(target, name_of: Mapping[Path, str], true_categories, predictions) -> None:
    k = len(predictions[0].indices) if predictions else TOP_K
    header = ["true_category", "product_id", "file", "correct"]
    header += [f"{kind}_{r}" for r in range(1, k + 1) for kind in ("predicted", "probability")]
    rows = []
    for true, p in zip(true_categories, predictions, strict=True):
        row = [
            true,
            product_id(p.path.name),
            name_of[p.path],
            int(p.labels[0] == true),
        ]
        for label, prob in zip(p.labels, p.probabilities, strict=True):
            row += [label, f"{prob:.6f}"]
        rows.append(row)
    atomic_write_text(target, csv_text(header, rows))


def _write_confusions(target: Path, cells: list[dict]) -> None:
    rows = [[c["true_category"], c["predicted_category"], c["count"], f"{c['share']:.6f}"] for c in cells]
    atomic_write_text(target, csv_text(["true_category", "predicted_category", "count", "share"], rows))


def _write_coverage(target: Path, curve: Sequence[m.CoveragePoint]) -> None:
    rows = [
        [
            f"{p.threshold:.2f}",
            p.covered,
            f"{p.coverage:.6f}",
            "" if p.accuracy is None else f"{p.accuracy:.6f}",
        ]
        for p in curve
    ]
    atomic_write_text(target, csv_text(["threshold", "covered", "coverage", "accuracy"], rows))


def log_to_run(run_id: str, out: Path, metrics: Mapping, tracking_uri: str | None = None) -> None:
    """The headline metrics, the threshold as a run tag and the files (not the weights copy) to the run."""
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    from ..training.tracking import check_tracking_server
    from ..training.train_record import resolve_tracking_uri

    uri = check_tracking_server(resolve_tracking_uri(tracking_uri))
    client = MlflowClient(tracking_uri=uri)
    try:
        client.get_run(run_id)
    except Exception as exc:
        raise StepError(f"MLflow run {run_id} not found at {uri}: {str(exc).splitlines()[0]}") from None
    now = int(time.time() * 1000)
    threshold = metrics.get(THRESHOLD_KEY)
    client.log_batch(
        run_id,
        metrics=[Metric(key, value, now, 0) for key, value in headline_metrics(metrics).items()],
        tags=[RunTag(THRESHOLD_KEY, "" if threshold is None else tag_value(threshold))],
    )
    for path in sorted(out.iterdir()):
        if path.is_file():
            client.log_artifact(run_id, str(path), artifact_path="evaluation")
    client.log_artifact(run_id, str(out / MODEL_DIR / "model_spec.json"), artifact_path="evaluation/model")


def tag_value(value) -> str:
    """Tag text: floats with 10 significant digits (0.37 → '0.37', 4/38 → '0.1052631579'), else str()."""
    return f"{value:.10g}" if isinstance(value, float) else str(value)


def summary(result: EvaluationResult) -> str:
    metrics = result.metrics
    counts = metrics["counts"]
    text = (
        f"evaluate: {counts['images']} photos in {counts['test_categories']} categories"
        + (f" ({counts['unreadable']} unreadable, skipped)" if counts.get("unreadable") else "")
        + f": top-1 {metrics['top1_accuracy']:.4f}, top-{metrics['top_k']} {metrics['top5_accuracy']:.4f}, "
        f"macro F1 {metrics['macro_avg']['f1']:.4f}"
    )
    if "macro_category" in metrics:
        text += f", macro-category {metrics['macro_category']['accuracy']:.4f}"
    coverage = metrics["coverage"]
    chosen = coverage.get("chosen_on") or {}
    if chosen.get("warning"):
        text += f"\nevaluate: warning: {chosen['warning']}"
    elif coverage[THRESHOLD_KEY] is None:
        text += f"\nevaluate: no confidence threshold reaches {coverage['target_accuracy']:g} top-1 accuracy"
    accuracy = "no photo" if coverage["accuracy"] is None else f"{coverage['accuracy']:.4f} accuracy"
    source = "chosen on validation" if coverage[THRESHOLD_KEY] is not None else "the server default"
    text += (
        f"\nevaluate: at the served threshold {coverage['served_threshold']:.2f} ({source}) the test photos "
        f"are {coverage['coverage']:.1%} covered at {accuracy} (target {coverage['target_accuracy']:g})"
    )
    text += f"\nevaluate: results in {result.out}; model with its threshold in {result.model_dir}"
    if result.run_id:
        text += f"\nevaluate: logged to MLflow run {result.run_id}"
    return text
