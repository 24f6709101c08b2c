"""register, promote, rollback: the MLflow model registry with @champion / @previous aliases."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import add_root_flag, add_step, positive_int

ORDER = 35


def _run_register(args: argparse.Namespace) -> None:
    from shopvision.components.data.manifest import parse_roots
    from shopvision.components.registry.register import register, register_summary

    result = register(
        args.run_id,
        args.name,
        test_metrics=args.test_metrics,
        tracking_uri=args.tracking_uri,
        onnx_photos=args.onnx_photos,
        quantize=args.quantize,
        roots=parse_roots(args.roots),
    )
    print(register_summary(result))


def _run_promote(args: argparse.Namespace) -> None:
    from shopvision.components.data.manifest import parse_roots
    from shopvision.components.evaluation.predict import progress_printer
    from shopvision.components.registry.promotion import promote, promote_summary

    decision = promote(
        args.name,
        args.version,
        args.data,
        roots=parse_roots(args.roots),
        min_gain=args.min_gain,
        min_accuracy=args.min_accuracy,
        alpha=args.alpha,
        force=args.force,
        allow_unknown_training_data=args.allow_unknown_training_data,
        add_test_photos=args.add_test_photos,
        lease_seconds=args.lease_seconds,
        lease_wait=args.lease_wait,
        lease_settle=args.lease_settle,
        notify=_notify("promote"),
        tracking_uri=args.tracking_uri,
        batch_size=args.batch_size,
        device=args.device,
        progress=progress_printer("promote"),
        require_shadow_agreement=args.require_shadow_agreement,
        shadow_url=args.shadow_url,
        shadow_min_photos=args.shadow_min_photos,
    )
    print(promote_summary(decision))


def _run_rollback(args: argparse.Namespace) -> None:
    from shopvision.components.registry.rollback import rollback, rollback_summary

    result = rollback(
        args.name, tracking_uri=args.tracking_uri, lease_wait=args.lease_wait, lease_settle=args.lease_settle
    )
    print(rollback_summary(result))


def _lease_settle(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lease-settle",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="pause between writing the lease and reading it back to confirm it (default 1)",
    )


def _notify(step: str):
    def notify(message: str) -> None:
        print(f"{step}: {message}", file=sys.stderr, flush=True)

    return notify


def _lease_wait(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lease-wait",
        type=float,
        default=1800.0,
        metavar="SECONDS",
        help="how long to wait while another promote or rollback of this model holds its lease (default 1800)",
    )


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
    register.add_argument(
        "--onnx-photos",
        type=Path,
        metavar="DIR",
        help="also store the model as model.onnx (for 'serve --runtime onnx'), checked on these photos: "
        "the output of 'shopvision split' or a split folder (test checks, val calibrates int8) or DIR/<category>/<photo>; top-5 must "
        "equal PyTorch's and probabilities agree to 1e-4, else nothing is registered",
    )
    register.add_argument(
        "--quantize",
        choices=["int8"],
        help="with --onnx-photos: also model.int8.onnx, static int8 calibrated on val/, its top-1 "
        "change on test/ stored as tags (serve's --runtime auto uses it only if <= 1%% of answers change)",
    )
    add_root_flag(register)
    _tracking(register)

    promote = add_step(
        steps,
        "promote",
        "score a version and the current @champion on the model's frozen test photos; move @champion when "
        "the version is strictly better by at least --min-gain, significantly (exact McNemar, --alpha), "
        "reaches --min-accuracy, and neither model trained on those photos",
        _run_promote,
    )
    promote.add_argument("--name", required=True, help="registered model name")
    promote.add_argument("--version", required=True, help="the candidate version")
    promote.add_argument(
        "--data",
        type=Path,
        required=True,
        help="the output of 'shopvision split', a split folder (train/ val/ test/ and split.json), or a "
        "TEST_DIR/<category>/<photo>",
    )
    add_root_flag(promote)
    promote.add_argument(
        "--min-gain", type=float, default=0.0, help="top-1 accuracy the candidate must gain (default 0)"
    )
    promote.add_argument(
        "--min-accuracy", type=float, default=0.0, help="top-1 accuracy floor for any champion (default 0)"
    )
    promote.add_argument(
        "--alpha",
        type=float,
        default=0.05,
        help="significance level of the paired test against the champion (default 0.05)",
    )
    promote.add_argument(
        "--force",
        action="store_true",
        help="replace a champion that cannot be loaded, or compare with a champion that trained on the "
        "frozen test photos (the gate still applies)",
    )
    promote.add_argument(
        "--allow-unknown-training-data",
        action="store_true",
        help="accept versions whose run did not record its training photos (overlap then unchecked)",
    )
    promote.add_argument(
        "--no-add-test-photos",
        dest="add_test_photos",
        action="store_false",
        help="score on the frozen test photos only; do not add this data's new test photos to them",
    )
    promote.add_argument(
        "--lease-seconds",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="expiry of the promotion lease, renewed while scoring; a crashed promote blocks others "
        "at most this long (default 300)",
    )
    _lease_wait(promote)
    _lease_settle(promote)
    promote.add_argument(
        "--require-shadow-agreement",
        type=float,
        metavar="X",
        help="refuse unless a server shadowing this version (serve --shadow) saw it agree with the "
        "champion's top-1 on at least X of live photos (read from --shadow-url)",
    )
    promote.add_argument(
        "--shadow-url",
        metavar="URL",
        help="the shadowing server's drift route, http://HOST:PORT/v2/models/NAME/drift",
    )
    promote.add_argument(
        "--shadow-min-photos",
        type=positive_int,
        default=100,
        help="live photos the shadow must have compared (default 100)",
    )
    promote.add_argument("--batch-size", type=positive_int, default=64)
    promote.add_argument("--device", default="auto", help="auto (GPU when available), cpu or cuda")
    _tracking(promote)

    rollback = add_step(steps, "rollback", "move @champion back to @previous", _run_rollback)
    rollback.add_argument("--name", required=True, help="registered model name")
    _lease_wait(rollback)
    _lease_settle(rollback)
    _tracking(rollback)
