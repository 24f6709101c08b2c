"""Compile the pipeline to IR YAML and submit it to a KFP backend."""

import json
import os
from pathlib import Path

from shopvision.components.errors import StepError

COMPILED = Path(__file__).resolve().parent / "compiled" / "training_pipeline.yaml"


def compile_pipeline(target: Path = COMPILED, image: str | None = None) -> Path:
    """Write the IR YAML; the component image is fixed at compile time (default: the released image)."""
    import importlib

    from kfp import compiler

    if image:
        os.environ["SHOPVISION_IMAGE"] = image
    from . import components, training_pipeline

    importlib.reload(components)
    importlib.reload(training_pipeline)
    target.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(training_pipeline.training_pipeline, str(target))
    return target


def submit(
    host: str,
    arguments: dict,
    *,
    experiment: str = "shopvision",
    run_name: str | None = None,
    namespace: str | None = None,
    package: Path = COMPILED,
    enable_caching: bool | None = None,
    service_account: str | None = "shopvision-pipeline",
) -> str:
    """Create a run on the KFP backend at HOST; returns the run's URL in the KFP UI."""
    import kfp

    if not package.is_file():
        raise StepError(f"{package} does not exist: run 'shopvision pipeline compile' first")
    try:
        client = kfp.Client(host=host, namespace=namespace)
        result = client.create_run_from_pipeline_package(
            str(package),
            arguments=arguments,
            run_name=run_name,
            experiment_name=experiment,
            namespace=namespace,
            enable_caching=enable_caching,
            service_account=service_account,
        )
    except Exception as exc:  # kfp wraps HTTP, auth and connection errors in many types
        raise StepError(
            f"cannot submit to KFP at {host}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        ) from None
    return f"{host.rstrip('/')}/#/runs/details/{result.run_id}"


def parse_arguments(pairs: list[str]) -> dict:
    """KEY=VALUE pipeline arguments; VALUE is read as JSON when it parses (numbers, booleans, lists)."""
    arguments = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise StepError(f"pipeline argument {pair!r} is not KEY=VALUE")
        try:
            arguments[key] = json.loads(value)
        except json.JSONDecodeError:
            arguments[key] = value
    return arguments
