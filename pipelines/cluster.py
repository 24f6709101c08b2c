"""Compile the pipeline to IR YAML and submit it to a KFP backend."""

import json
import os
from pathlib import Path

from shopvision.components.errors import StepError

COMPILED = Path(__file__).resolve().parent / "compiled" / "training_pipeline.yaml"


def compile_pipeline(
    target: Path = COMPILED, image: str | None = None, image_digest: str | None = None
) -> Path:
    """Write the IR YAML; the component image is fixed at compile time (default: the released image).

    `image_digest` (sha256:…) pins the image, tag dropped, so a rebuild under the same tag is a new
    cache key; every task's source also carries the code version (code_version.py).
    """
    import importlib

    from kfp import compiler

    from .code_version import pinned_image

    if image or image_digest:
        from . import components

        os.environ["SHOPVISION_IMAGE"] = pinned_image(image or components.IMAGE, image_digest)
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


def taxonomy_argument(path: Path) -> str:
    """The pipeline's `taxonomy_csv` parameter from a file, checked now rather than after training."""
    from shopvision.components.evaluation.evaluate import read_taxonomy

    read_taxonomy(path)  # a clear StepError for a missing or malformed file
    return Path(path).read_text(encoding="utf-8-sig")


def pipeline_parameters() -> dict[str, str]:
    """{name: KFP type} of training_pipeline's parameters (String, Integer, Float, Boolean, Dict, List)."""
    from .training_pipeline import training_pipeline

    return {name: spec.type for name, spec in training_pipeline.component_spec.inputs.items()}


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _typed(key: str, kind: str, value: str):
    try:
        if kind == "Integer":
            return int(value)
        if kind == "Float":
            return float(value)
        if kind == "Boolean" and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        if kind in ("Dict", "List"):
            parsed = json.loads(value)
            if isinstance(parsed, dict if kind == "Dict" else list):
                return parsed
        if kind == "String":
            return value
    except (ValueError, json.JSONDecodeError):
        pass
    examples = {
        "Boolean": "true or false",
        "Dict": 'a JSON object, e.g. {"pool": "gpu"}',
        "List": "a JSON list",
    }
    raise StepError(f"pipeline argument {key}={value!r}: expected {examples.get(kind, kind.lower())}")


def parse_arguments(pairs: list[str]) -> dict:
    """KEY=VALUE pipeline arguments, each checked against the pipeline's parameters and typed by them
    (so `model_name=2024` stays a string), with a clear error before anything runs."""
    parameters = pipeline_parameters()
    arguments = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise StepError(f"pipeline argument {pair!r} is not KEY=VALUE")
        if key not in parameters:
            raise StepError(f"the pipeline has no parameter {key!r}; its parameters: {', '.join(parameters)}")
        arguments[key] = _typed(key, parameters[key], value)
    return arguments
