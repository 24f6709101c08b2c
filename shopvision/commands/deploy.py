"""deploy: roll the serving Deployment (or KServe InferenceService) to the model an MLflow alias names."""

from __future__ import annotations

import argparse

from . import add_step

ORDER = 80


def _positive_seconds(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _run(args: argparse.Namespace) -> None:
    from shopvision.components.cluster.deploy import deploy, summary

    result = deploy(
        args.name,
        args.alias,
        namespace=args.namespace,
        target=args.deployment,
        kind=args.kind,
        timeout=args.timeout,
        tracking_uri=args.tracking_uri,
    )
    print(summary(result))


def add_parser(steps) -> None:
    p = add_step(
        steps,
        "deploy",
        "resolve models:/NAME@ALIAS to a version, roll the serving workload to it, wait until ready, "
        "roll back if it does not become ready in time",
        _run,
    )
    p.add_argument("--name", required=True, help="registered model name in MLflow (e.g. shopvision)")
    p.add_argument("--alias", default="champion", help="alias to deploy (default: champion)")
    p.add_argument("--namespace", required=True, help="Kubernetes namespace of the serving workload")
    p.add_argument(
        "--deployment",
        default="shopvision-serving",
        help="name of the Deployment, or of the InferenceService with --kind inferenceservice "
        "(default: shopvision-serving)",
    )
    p.add_argument(
        "--kind",
        choices=["deployment", "inferenceservice"],
        default="deployment",
        help="what serves the model: a Deployment (default) or a KServe InferenceService",
    )
    p.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=600.0,
        help="seconds to wait for the rollout before rolling back (default: 600)",
    )
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking server (default: $MLFLOW_TRACKING_URI)",
    )
