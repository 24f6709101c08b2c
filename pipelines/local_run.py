"""Run the training pipeline on this machine with kfp.local, MLflow on a local SQLite file.

kfp.local's SubprocessRunner with use_venv=False runs each component in this Python environment,
where the project is installed (use_venv=True would build a fresh venv per task in which shopvision
cannot be imported). Artifacts land under WORKDIR/pipeline-root/<run>/<task>/<output>.
"""

import os
import time
from pathlib import Path

from shopvision.components.errors import StepError

# The embedded default: small enough to finish in minutes on 2 CPU cores. EfficientNet-Lite0 with
# its offline ImageNet weights and a frozen backbone is the one pretrained model available here;
# a ResNet from scratch would not learn 12 categories from ~170 photos in a few CPU minutes.
DEMO_ARGUMENTS = {
    "image_size": 160,
    "val_fraction": 0.15,
    "test_fraction": 0.15,
    "augmentations": "mirror",
    "arch": "efficientnet_lite0",
    "pretrained": "imagenet",
    "freeze_backbone": True,
    "epochs": 2,
    "batch_size": 32,
    "train_image_size": 112,
    "lr": 0.05,
    "launcher": "local",
    "gpus_per_node": 1,
    "deploy": False,
}


def run_locally(arguments: dict, workdir: Path, *, verbose: bool = False) -> dict:
    """Run the pipeline; returns where things are and the champion as the registry sees it.

    Prints one line per task as it finishes; kfp.local's whole log goes to WORKDIR/pipeline.log
    (`run_log`), and to the terminal as well with `verbose`.
    """
    from kfp import local

    from .kfp_local_compat import allow_oneof_artifacts
    from .run_log import RunLog
    from .training_pipeline import training_pipeline

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    arguments = {"launcher": "local", **arguments}  # the pipeline's default, trainjob, needs a cluster
    location = arguments.get("data_location", "data/sample/raw")
    if not location.startswith("s3://"):
        if not Path(location).is_dir():
            raise StepError(f"data location {location} is not a folder (nor an s3:// prefix)")
        arguments["data_location"] = str(Path(location).resolve())
    if arguments.get("launcher", "local") != "local":
        raise StepError("a local run trains on this machine: launcher must be 'local'")
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(workdir / "pipeline-root"),
        raise_on_error=True,
    )
    allow_oneof_artifacts()  # the cleaned photos come from one of two branches (clean_shards)
    started = time.monotonic()
    run_log = RunLog(workdir, verbose=verbose)
    run_log.say(f"pipeline: running under kfp.local; the full log is in {run_log.path}")
    try:
        with run_log:
            training_pipeline(**arguments)
    except RuntimeError as exc:  # kfp.local reports a failed task this way; its error lines are above
        failed = f"task {run_log.failed} failed" if run_log.failed else run_log.strip(str(exc))
        raise StepError(f"the pipeline failed: {failed}; the full log is in {run_log.path}") from None
    report = champion_report(arguments.get("model_name", "shopvision"), workdir, time.monotonic() - started)
    return {**report, "log": str(run_log.path)}


def champion_report(model_name: str, workdir: Path, seconds: float) -> dict:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    try:
        version = client.get_model_version_by_alias(model_name, "champion")
    except mlflow.exceptions.MlflowException:
        raise StepError(f"the pipeline ran but registered model {model_name!r} has no @champion") from None
    return {
        "model_name": model_name,
        "champion_version": str(version.version),
        "test_top1_accuracy": version.tags.get("test_top1_accuracy"),
        "test_top5_accuracy": version.tags.get("test_top5_accuracy"),
        "test_macro_category_accuracy": version.tags.get("test_macro_category_accuracy"),
        "test_images": version.tags.get("test_images"),
        "evaluation_photos": version.tags.get("promotion.evaluation_photos"),
        "promotion": version.tags.get("promotion.reason"),
        "confidence_threshold": version.tags.get("confidence_threshold"),
        "source_run": version.run_id,
        "tracking_uri": os.environ["MLFLOW_TRACKING_URI"],
        "artifacts": str(workdir / "pipeline-root"),
        "seconds": round(seconds, 1),
    }
