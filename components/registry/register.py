"""The MLflow model registry: connect, aliases, and registering a run's model with its tags.

Which model serves is decided by aliases only (registry stages are deprecated in MLflow 3):

    @champion  the version serving reads (models:/NAME@champion)
    @previous  the champion it replaced, so `rollback` can restore it

`promotion` moves them (promote past a gate, roll back). The version tag `confidence_threshold`
(set at registration from the evaluation) is what serving reads to flag unsure answers.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import StepError
from ..evaluation.evaluate import THRESHOLD_KEY, headline_metrics, tag_value

TTA_TAG = "test_time_augmentation"  # training.models.TTA_KEY; a version tag, as evaluate chose it

CHAMPION = "champion"
PREVIOUS = "previous"
LOGGED_MODEL_NAME = "model"  # the name training logs the classifier under


# ----------------------------------------------------------------------------------------- helpers


def connect(tracking_uri: str | None = None):
    """(MlflowClient, URI) for --tracking-uri / $MLFLOW_TRACKING_URI / sqlite:///mlflow.db, checked first.

    The registry lives in the same store as the tracking data (as in the deployment).
    """
    from mlflow import MlflowClient

    from ..training.tracking import check_tracking_server
    from ..training.train_record import resolve_tracking_uri

    uri = check_tracking_server(resolve_tracking_uri(tracking_uri))
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _error_code(exc: Exception) -> str | None:
    return getattr(exc, "error_code", None)


def registered_model(client, name: str):
    """The registered model NAME; a clear StepError when it does not exist or cannot be read."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if _error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
            raise StepError(
                f"no registered model named {name!r} (register one with 'shopvision register')"
            ) from None
        raise StepError(f"cannot read registered model {name!r}: {first_line(exc)}") from None


def model_version(client, name: str, version: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise StepError(f"{name} version {version} not found: {first_line(exc)}") from None


def aliases(client, name: str) -> dict[str, str]:
    """{alias: version} of a registered model (a missing alias is simply absent)."""
    return {alias: str(version) for alias, version in (registered_model(client, name).aliases or {}).items()}


def set_version_tags(client, name: str, version: str, tags: Mapping[str, str]) -> None:
    """Set many tags on a model version, a few requests at a time.

    MLflow has no batch call for version tags and each one costs two requests (the client checks the
    model is not a prompt first): twenty decision tags one after another take seconds.
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=4) as pool:
        done = [pool.submit(client.set_model_version_tag, name, version, k, v) for k, v in tags.items()]
    for future in done:
        future.result()  # the first failure, if any, is raised here


def code_version() -> str:
    """shopvision.__version__, plus +g<commit> (and .dirty) when the package runs from a git checkout."""
    from shopvision import __version__

    commit, dirty = git_commit()
    if not commit:
        return __version__
    return f"{__version__}+g{commit[:12]}" + (".dirty" if dirty else "")


def git_commit() -> tuple[str | None, bool]:
    """(commit, has uncommitted changes) of the checkout the package is imported from; (None, False) if none."""
    import shopvision

    package = Path(shopvision.__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(package), *args], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    # An installed copy inside some other repository (a venv in a checkout) is not that repository's code.
    if git("ls-files", "--error-unmatch", "__init__.py") is None:
        return None, False
    commit = git("rev-parse", "HEAD")
    if not commit:
        return None, False
    return commit, bool(git("status", "--porcelain", "--untracked-files=no"))


# ---------------------------------------------------------------------------------------- register


@dataclass
class RegisterResult:
    name: str
    version: str
    run_id: str
    source: str  # models:/m-<id>, the run's logged model
    tags: dict[str, str] = field(default_factory=dict)
    onnx: str | None = None  # what the ONNX export wrote and measured, when it ran

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def _logged_model(client, run) -> tuple[str, str | None]:
    """(source URI, model id) of the classifier the run logged: the newest READY one named 'model'."""
    run_id = run.info.run_id
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    ready = [lm for lm in found if str(getattr(lm.status, "value", lm.status)) == "READY"]
    named = [lm for lm in ready if lm.name == LOGGED_MODEL_NAME] or ready
    if named:
        newest = max(named, key=lambda lm: lm.creation_timestamp or 0)
        return newest.model_uri, newest.model_id
    raise StepError(
        f"run {run_id} has no logged model (training logs one when it finishes with a model_best): "
        "nothing to register"
    )


def _best_val_metrics(client, run) -> dict[str, float]:
    """val_* metrics at the best epoch (the run's `best_epoch` tag), else their last values."""
    keys = sorted(k for k in run.data.metrics if k.startswith("val_"))
    best_epoch = run.data.tags.get("best_epoch")
    values = {}
    for key in keys:
        value = run.data.metrics[key]
        if best_epoch is not None and best_epoch.isdigit():
            at_best = [
                x.value for x in client.get_metric_history(run.info.run_id, key) if x.step == int(best_epoch)
            ]
            value = at_best[-1] if at_best else value
        values[key] = float(value)
    return values


def read_test_metrics(path: Path | None) -> dict | None:
    if path is None:
        return None
    try:
        body = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise StepError(f"cannot read test metrics {path}: {exc}") from None
    if not isinstance(body, dict) or "top1_accuracy" not in body:
        raise StepError(f"{path} is not a metrics.json written by 'shopvision evaluate'")
    return body


def log_drift_baseline(
    client, model_id: str | None, test_metrics: Path | str | Mapping | None
) -> dict[str, str]:
    """Log the evaluation's drift_baseline.json (beside its metrics.json) with the logged model, so
    `models:/NAME/VERSION/drift_baseline.json` is the version's baseline the server compares live
    answers with; the tag `drift_baseline` says it is there. Nothing without one."""
    from ..evaluation.baseline import BASELINE_FILE, read_baseline

    if not isinstance(test_metrics, str | Path) or model_id is None:
        return {}
    path = Path(test_metrics).parent / BASELINE_FILE
    if not path.is_file():
        return {}
    read_baseline(path)  # a malformed one is an error now, not a silent server without drift scores
    try:
        client.log_model_artifact(model_id, str(path))
    except Exception as exc:  # MLflow's and the artifact store's own errors
        raise StepError(f"cannot log {path} with model {model_id}: {first_line(exc)}") from None
    return {"drift_baseline": BASELINE_FILE}


def registration_tags(client, run, test_metrics: Mapping | None) -> dict[str, str]:
    """Everything a version carries: source run, data fingerprint, val/test metrics, code, threshold."""
    params, run_tags = run.data.params, run.data.tags
    tags: dict[str, str] = {"source_run_id": run.info.run_id, "code_version": code_version()}
    commit, _ = git_commit()
    if commit:
        tags["git_commit"] = commit
    for key in ("data_fingerprint", "arch", "image_size", "num_classes"):
        if params.get(key):
            tags[key] = params[key]
    if run_tags.get("best_epoch") is not None:
        tags["best_epoch"] = run_tags["best_epoch"]
    tags.update({k: tag_value(v) for k, v in _best_val_metrics(client, run).items()})
    threshold = run_tags.get(THRESHOLD_KEY) or None  # set on the run by `evaluate --run`
    if test_metrics is not None:
        tags.update({k: tag_value(v) for k, v in headline_metrics(test_metrics).items()})
        if test_metrics.get("test_data_fingerprint"):
            tags["test_data_fingerprint"] = test_metrics["test_data_fingerprint"]
        if "coverage" in test_metrics:
            tags["confidence_target_accuracy"] = tag_value(float(test_metrics["coverage"]["target_accuracy"]))
        if test_metrics.get(THRESHOLD_KEY) is not None:
            threshold = tag_value(float(test_metrics[THRESHOLD_KEY]))
        else:
            threshold = None  # this evaluation found none: an older run tag must not stand in for it
    if threshold:
        tags[THRESHOLD_KEY] = threshold
    else:
        tags.pop(f"test_{THRESHOLD_KEY}", None)
    if (test_metrics or {}).get(TTA_TAG, "none") != "none":  # the passes the threshold was chosen on
        tags[TTA_TAG] = test_metrics[TTA_TAG]
    return tags


def register(
    run_id: str,
    name: str,
    *,
    test_metrics: Path | Mapping | None = None,
    tracking_uri: str | None = None,
    onnx_photos: Path | None = None,
    quantize: str | None = None,
    roots: Mapping[str, Path] | None = None,
) -> RegisterResult:
    """A new version of registered model NAME from the model logged by RUN_ID, with its tags.

    With `onnx_photos` the logged model also gets model.onnx (and with `quantize="int8"`
    model.int8.onnx), checked on those photos before the version exists (onnx_export.py): a failed
    check registers nothing. `roots` says where the photos of a manifest in `onnx_photos` lie here."""
    from mlflow.exceptions import MlflowException

    client, _ = connect(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise StepError(f"MLflow run {run_id} not found: {first_line(exc)}") from None
    metrics = read_test_metrics(test_metrics) if isinstance(test_metrics, str | Path) else test_metrics
    source, model_id = _logged_model(client, run)
    tags = registration_tags(client, run, metrics)
    tags.update(log_drift_baseline(client, model_id, test_metrics))
    exported = None
    if onnx_photos is not None:
        from .onnx_export import attach_to_logged_model

        exported = attach_to_logged_model(client, source, model_id, Path(onnx_photos), quantize, roots)
        tags.update(exported.tags())
    elif quantize is not None:
        raise StepError("--quantize needs --onnx-photos: int8 is calibrated and judged on photos")
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
            raise StepError(f"cannot create registered model {name!r}: {first_line(exc)}") from None
    try:
        version = client.create_model_version(name, source, run_id=run_id, tags=tags, model_id=model_id)
    except MlflowException as exc:
        raise StepError(f"cannot register {source} as {name}: {first_line(exc)}") from None
    return RegisterResult(
        name, str(version.version), run_id, source, tags, exported.summary() if exported else None
    )


def register_summary(result: RegisterResult) -> str:
    shown = ", ".join(
        f"{k}={result.tags[k]}"
        for k in ("val_top1_error", "test_top1_accuracy", THRESHOLD_KEY, "code_version")
        if k in result.tags
    )
    return (
        f"register: {result.name} version {result.version} from run {result.run_id} ({result.source})"
        + (f"; {shown}" if shown else "")
        + (f"; {result.onnx}" if result.onnx else "")
    )
