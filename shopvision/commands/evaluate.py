"""classify, evaluate: top-k answers for photos, and a model measured on a labelled test folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import add_root_flag, add_step, positive_int

ORDER = 30


def use_tracking_uri(uri: str | None, model: str | None = None) -> None:
    """Point MLflow at --tracking-uri (or its default) when the model or the run lives there."""
    from shopvision.components.training.model_source import MLFLOW_SCHEMES

    if uri or (model and str(model).startswith(MLFLOW_SCHEMES)):
        import mlflow

        from shopvision.components.training.train_record import resolve_tracking_uri

        mlflow.set_tracking_uri(resolve_tracking_uri(uri))


def _run_classify(args: argparse.Namespace) -> None:
    from shopvision.components.errors import StepError
    from shopvision.components.evaluation.predict import (
        classify,
        format_table,
        progress_printer,
        summary,
        write_predictions,
    )

    use_tracking_uri(args.tracking_uri, args.model)
    result = classify(
        args.model,
        args.paths,
        top_k=args.top_k,
        batch_size=args.batch_size,
        device=args.device,
        progress=progress_printer("classify"),
    )
    if args.output:
        write_predictions(result, args.output)
        for u in result.unreadable:
            print(f"classify: unreadable {u.path}: {u.reason} ({u.detail})", file=sys.stderr)
    else:
        print(format_table(result))
    if not result.predictions:
        raise StepError(f"none of the {len(result.unreadable)} files is a readable photo")
    print(summary(result) + (f"; written to {args.output}" if args.output else ""), file=sys.stderr)


def _run_evaluate(args: argparse.Namespace) -> None:
    from shopvision.components.data.manifest import parse_roots
    from shopvision.components.evaluation.evaluate import evaluate, summary
    from shopvision.components.evaluation.predict import progress_printer

    use_tracking_uri(args.tracking_uri, args.model)
    result = evaluate(
        args.model,
        args.data,
        args.out,
        taxonomy=args.taxonomy,
        target_accuracy=args.target_accuracy,
        threshold_data=args.threshold_data,
        run_id=args.run_id,
        tracking_uri=args.tracking_uri,
        batch_size=args.batch_size,
        device=args.device,
        progress=progress_printer("evaluate"),
        tta=args.tta,
        roots=parse_roots(args.roots),
    )
    for u in result.unreadable:
        print(f"evaluate: unreadable {u.path}: {u.reason} ({u.detail})", file=sys.stderr)
    print(summary(result))


def _model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="training output folder, model folder, checkpoint, runs:/RUN/model, models:/NAME@ALIAS, "
        "models:/NAME/VERSION",
    )
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--device", default="auto", help="auto (GPU when available), cpu or cuda")
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"
    )


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def add_parser(steps) -> None:
    classify = add_step(
        steps, "classify", "top-k categories with probabilities for photo files or folders", _run_classify
    )
    classify.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="photos or folders of photos")
    _model_flags(classify)
    classify.add_argument("--top-k", type=positive_int, default=5, help="answers per photo (default 5)")
    classify.add_argument(
        "--output",
        type=Path,
        help="write x.csv or x.json instead of printing a table (unreadable files: stderr)",
    )

    evaluate = add_step(
        steps,
        "evaluate",
        "measure a model on a labelled test folder: predictions, metrics, confusion matrix, coverage, "
        "confidence threshold",
        _run_evaluate,
    )
    _model_flags(evaluate)
    evaluate.add_argument(
        "--data",
        type=Path,
        required=True,
        help="the output of 'shopvision split' (its test photos), TEST_DIR/<category>/<photo>, or a split "
        "folder (its test/)",
    )
    add_root_flag(evaluate)
    evaluate.add_argument("--out", type=Path, required=True, help="folder for the results and the model copy")
    evaluate.add_argument(
        "--taxonomy", type=Path, help="CSV category,macro_category: macro-category accuracy"
    )
    evaluate.add_argument(
        "--target-accuracy",
        type=_fraction,
        default=0.95,
        help="the confidence threshold is the lowest one whose validation photos reach this accuracy "
        "(default 0.95)",
    )
    evaluate.add_argument(
        "--tta",
        choices=["none", "flip"],
        help="test-time augmentation: flip averages each photo's logits with its mirror image's (one "
        "extra pass); evaluated, thresholded and written into the model copy, so serve uses it too "
        "(default: the model's own, none for a trained model)",
    )
    evaluate.add_argument(
        "--threshold-data",
        type=Path,
        help="validation photos VAL_DIR/<category>/, or split's output (its val photos; SPLIT/val names "
        "them too), to choose the threshold on (default: the val photos beside the test photos; never "
        "the test photos)",
    )
    evaluate.add_argument(
        "--run", dest="run_id", metavar="RUN_ID", help="also log metrics and files to this MLflow run"
    )
