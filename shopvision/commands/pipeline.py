"""shopvision pipeline compile | run | submit: the KFP pipeline, locally or on a cluster."""

import argparse
import json
from pathlib import Path

from . import add_step

ORDER = 90


def _compile(args: argparse.Namespace) -> None:
    from shopvision.pipelines.cluster import compile_pipeline

    print(f"pipeline: wrote {compile_pipeline(args.output, args.image, args.image_digest)}")


def _arguments(args: argparse.Namespace, defaults: dict) -> dict:
    """Pipeline parameters: defaults, then a `--arg preset=NAME`'s values, then --taxonomy, then every
    other --arg (the last word wins). A preset is expanded here, so the run records its values."""
    from shopvision.components.training.presets import pipeline_arguments
    from shopvision.pipelines.cluster import parse_arguments, taxonomy_argument

    arguments = dict(defaults)
    presets = [pair.partition("=")[2] for pair in args.arg if pair.startswith("preset=")]
    if presets:
        arguments.update(pipeline_arguments(presets[-1]))
    if args.taxonomy:
        arguments["taxonomy_csv"] = taxonomy_argument(args.taxonomy)
    return {**arguments, **parse_arguments([p for p in args.arg if not p.startswith("preset=")])}


def _run(args: argparse.Namespace) -> None:
    from shopvision.pipelines.local_run import DEMO_ARGUMENTS, run_locally

    defaults = {**(DEMO_ARGUMENTS if args.demo else {}), "data_location": args.data}
    report = run_locally(_arguments(args, defaults), args.workdir, verbose=args.verbose)
    scores = ", ".join(
        f"{label} {report[key]}"
        for key, label in (
            ("test_top1_accuracy", "test top-1 accuracy"),
            ("test_top5_accuracy", "top-5"),
            ("test_macro_category_accuracy", "macro-category"),
        )
        if report.get(key) is not None
    )
    photos = report.get("evaluation_photos") or report.get("test_images")
    threshold = report.get("confidence_threshold")
    print(
        f"pipeline: champion {report['model_name']} version {report['champion_version']} "
        f"({scores}) after {report['seconds']} s\n"
        + (
            f"  judged on: {int(float(photos))} test photos, kept apart from training by look-alike group "
            "(the registered model's frozen evaluation set)\n"
            if photos
            else ""
        )
        + (f"  gate:      {report['promotion']}\n" if report.get("promotion") else "")
        + (
            f"  threshold: {threshold} (chosen on validation photos)\n"
            if threshold
            else "  threshold: the server default 0.5 (none chosen on the validation photos: see evaluate's warning)\n"
        )
        + f"  MLflow:    {report['tracking_uri']}\n  artifacts: {report['artifacts']}"
    )
    (Path(args.workdir) / "champion.json").write_text(json.dumps(report, indent=1) + "\n")


def _submit(args: argparse.Namespace) -> None:
    from shopvision.pipelines.cluster import submit

    url = submit(
        args.host,
        _arguments(args, {}),
        experiment=args.experiment,
        run_name=args.run_name,
        namespace=args.namespace,
        package=args.package,
        service_account=args.service_account,
    )
    print(f"pipeline: submitted {url}")


def _parameter_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a pipeline parameter; preset=product-photos sets the documented recipe's parameters",
    )
    parser.add_argument(
        "--taxonomy",
        type=Path,
        help="category,macro_category CSV: evaluation adds macro-category accuracy (parameter taxonomy_csv)",
    )


def add_parser(steps) -> None:
    from shopvision.pipelines.cluster import COMPILED

    pipeline = steps.add_parser(
        "pipeline", help="compile, run locally (kfp.local) or submit the training pipeline"
    )
    actions = pipeline.add_subparsers(dest="action", required=True, metavar="ACTION")

    compile_ = add_step(actions, "compile", "write the pipeline's IR YAML", _compile)
    compile_.add_argument("--output", type=Path, default=COMPILED)
    compile_.add_argument(
        "--image",
        help="project image for every component (default: the released image); repo@sha256:… pins it",
    )
    compile_.add_argument(
        "--image-digest",
        metavar="sha256:HEX",
        help="pin the image (--image or the released one) at this digest, so a rebuilt tag misses the cache",
    )

    run = add_step(
        actions, "run", "run the whole pipeline on this machine with kfp.local and local MLflow", _run
    )
    run.add_argument(
        "--data", default="data/sample/raw", help="raw photos: a folder or an s3://bucket/prefix"
    )
    run.add_argument("--workdir", type=Path, default=Path("pipeline-output"), help="artifacts and mlflow.db")
    run.add_argument("--demo", action="store_true", help="the small, fast settings of `make demo`")
    run.add_argument(
        "--verbose",
        action="store_true",
        help="stream kfp.local's whole log (every task's output) here too, not only to WORKDIR/pipeline.log",
    )
    _parameter_options(run)

    submit = add_step(actions, "submit", "submit the compiled pipeline to a KFP backend", _submit)
    submit.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://ml-pipeline-ui.kubeflow")
    submit.add_argument("--experiment", default="shopvision")
    submit.add_argument("--run-name")
    submit.add_argument("--namespace")
    submit.add_argument(
        "--service-account",
        default="shopvision-pipeline",
        help="the run's ServiceAccount (manifests/base/rbac.yaml grants it what training needs)",
    )
    submit.add_argument("--package", type=Path, default=COMPILED)
    _parameter_options(submit)
