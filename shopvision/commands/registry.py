"""register, promote, rollback: the MLflow model registry with @champion / @previous aliases."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import add_step, positive_int

ORDER = 35


def _run_register(args: argparse.Namespace) -> None:
    from shopvision.components.registry import register, register_summary

    result = register(args.run_id, args.name, test_metrics=args.test_metrics, tracking_uri=args.tracking_uri)
    print(register_summary(result))


def _run_promote(args: argparse.Namespace) -> None:
    from shopvision.components.predict import progress_printer
    from shopvision.components.promotion import promote, promote_summary

    decision = promote(
        args.name,
        args.version,
        args.data,
        min_gain=args.min_gain,
        min_accuracy=args.min_accuracy,
        force=args.force,
        tracking_uri=args.tracking_uri,
        batch_size=args.batch_size,
        device=args.device,
        progress=progress_printer("promote"),
    )
    print(promote_summary(decision))


def _run_rollback(args: argparse.Namespace) -> None:
    from shopvision.components.promotion import rollback, rollback_summary

    print(rollback_summary(rollback(args.name, tracking_uri=args.tracking_uri)))


def _tracking(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking and registry URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )


def add_parser(steps) -> None:
    register = add_step(
        steps,
        "register",
        "register a training run's model as a new version, tagged with its data, metrics, code and threshold",
        _run_register,
    )
    register.add_argument(
        "--run", dest="run_id", required=True, metavar="RUN_ID", help="the training run (run.json: run_id)"
    )
    register.add_argument("--name", required=True, help="registered model name")
    register.add_argument(
        "--test-metrics", type=Path, help="metrics.json from 'shopvision evaluate' (test scores, threshold)"
    )
    _tracking(register)

    promote = add_step(
        steps,
        "promote",
        "score a version and the current @champion on the same test photos; move @champion when the "
        "version is strictly better by at least --min-gain and reaches --min-accuracy",
        _run_promote,
    )
    promote.add_argument("--name", required=True, help="registered model name")
    promote.add_argument("--version", required=True, help="the candidate version")
    promote.add_argument(
        "--data", type=Path, required=True, help="TEST_DIR/<category>/<photo>, or a split folder (its test/)"
    )
    promote.add_argument(
        "--min-gain", type=float, default=0.0, help="top-1 accuracy the candidate must gain (default 0)"
    )
    promote.add_argument(
        "--min-accuracy", type=float, default=0.0, help="top-1 accuracy floor for any champion (default 0)"
    )
    promote.add_argument(
        "--force",
        action="store_true",
        help="replace a champion that cannot be loaded (the gate still applies)",
    )
    promote.add_argument("--batch-size", type=positive_int, default=64)
    promote.add_argument("--device", default="auto", help="auto (GPU when available), cpu or cuda")
    _tracking(promote)

    rollback = add_step(steps, "rollback", "move @champion back to @previous", _run_rollback)
    rollback.add_argument("--name", required=True, help="registered model name")
    _tracking(rollback)
