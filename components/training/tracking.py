"""MLflow helpers: is the tracking server there, and the classifier as an MLflow model.

Training calls these on rank 0 only (through `train_record.RunRecorder`); evaluation and registration
reuse them (which data a run saw is `data.fingerprint`). The classifier is logged as a pyfunc "from
code" (`pyfunc_model.py`), so loading it runs our reviewed code and reads weights with
`torch.load(weights_only=True)`; nothing is unpickled.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import tempfile
import threading
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit
from urllib.request import url2pathname

from ..errors import StepError

if TYPE_CHECKING:
    from mlflow.models.model import ModelInfo

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
CLASSIFIER_ARTIFACT = "classifier"  # the key pyfunc_model.py reads from context.artifacts
IMAGE_COLUMN = "image"
MAX_TOP_K = 5
# What the logged model needs besides the shopvision package itself (which the serving image installs;
# `mlflow models serve --env-manager local` uses the running environment as it is).
RUNTIME_PACKAGES = (
    "mlflow",
    "torch",
    "torchvision",
    "pillow",
    "numpy",
    "pandas",
    "efficientnet-lite-pytorch",
)


def check_tracking_server(uri: str | None = None, timeout: float = 5.0) -> str:
    """The tracking URI to use, after checking it can work; fails within about `timeout` seconds.

    http(s): GET <uri>/health must answer 200 within `timeout`, and the API must not refuse this host
    name (403, the server's --allowed-hosts check). sqlite:, file: or a plain path: the folder must be
    writable. Other schemes (databricks, postgresql, ...) are returned unchecked.
    """
    if not uri:
        import mlflow

        uri = os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        _check_health(uri, timeout)
    elif scheme == "sqlite":
        _check_sqlite(uri)
    elif scheme == "file" or (scheme == "" and uri):
        path = Path(url2pathname(parts.path)) if scheme == "file" else Path(uri)
        _check_writable_folder(path, uri)
    return uri


def _redacted(uri: str) -> str:
    """The URI without a password, for messages."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def _check_health(uri: str, timeout: float) -> None:
    parts = urlsplit(uri)
    # urllib cannot take user:password@ in a URL; /health needs no credentials anyway.
    base = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1])).rstrip("/")
    status, problem = _http_status(f"{base}/health", timeout)
    if problem is None and status != 200:
        problem = f"{base}/health answered HTTP {status}"
    if problem is not None:
        raise StepError(
            f"MLflow tracking server at {_redacted(uri)} is not reachable: {problem} — "
            "start it or set MLFLOW_TRACKING_URI"
        )
    # /health passes the server's Host check; the API does not. A server started with
    # --allowed-hosts that omits this host name answers every API call with 403.
    status, _ = _http_status(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", timeout)
    if status == 403:
        host = parts.hostname or ""
        raise StepError(
            f"MLflow tracking server at {_redacted(uri)} is up but refuses API calls for host name "
            f"{host!r} (HTTP 403): add '{host}:*' to the server's --allowed-hosts, or use a host name "
            "it allows"
        )


def _http_status(url: str, timeout: float) -> tuple[int | None, str | None]:
    """(HTTP status, None) or (None, why there was no answer), in about `timeout` seconds at most."""
    import urllib.error
    import urllib.request

    outcome: dict = {}

    def probe() -> None:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                outcome["status"] = response.status
        except urllib.error.HTTPError as exc:
            outcome["status"] = exc.code
        except Exception as exc:  # refused, timed out, unresolvable, TLS: all mean "no answer"
            outcome["error"] = f"{type(exc).__name__}: {getattr(exc, 'reason', None) or exc}"

    # A thread bounds the whole request, name resolution included (urlopen's timeout does not cover DNS).
    thread = threading.Thread(target=probe, name="mlflow-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    if thread.is_alive():
        return None, f"no answer from {url} within {timeout:g} s"
    return outcome.get("status"), outcome.get("error")


def _check_sqlite(uri: str) -> None:
    # sqlite:///relative.db or sqlite:////absolute.db; sqlite:// alone is an in-memory database.
    rest = uri.split("?", 1)[0].removeprefix("sqlite://")
    if not rest or rest == "/" or rest.endswith(":memory:"):
        return
    database = Path(url2pathname(rest[1:]))
    folder = database.resolve().parent
    if not folder.is_dir():
        raise StepError(
            f"MLflow tracking database {uri} cannot be created: folder {folder} does not exist — "
            "create it or set MLFLOW_TRACKING_URI"
        )
    if not os.access(folder, os.W_OK | os.X_OK) or (database.exists() and not os.access(database, os.W_OK)):
        raise StepError(
            f"MLflow tracking database {uri} is not writable (folder {folder}) — "
            "fix the permissions or set MLFLOW_TRACKING_URI"
        )


def _check_writable_folder(path: Path, uri: str) -> None:
    path = path.resolve()
    if path.exists() and not path.is_dir():
        raise StepError(f"MLflow tracking folder {uri} is a file, not a folder — set MLFLOW_TRACKING_URI")
    existing = next(p for p in (path, *path.parents) if p.exists())  # MLflow creates the rest
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StepError(
            f"MLflow tracking folder {uri} is not writable ({existing}) — "
            "fix the permissions or set MLFLOW_TRACKING_URI"
        )


def top_k(num_classes: int) -> int:
    """How many (label, probability) pairs the model returns per photo."""
    return min(MAX_TOP_K, num_classes)


def classifier_signature(num_classes: int):
    """Input: `image` (base64 text). Output: label_1..k (string), prob_1..k (double), best first."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    k = range(1, top_k(num_classes) + 1)
    outputs = [ColSpec("string", f"label_{i}") for i in k] + [ColSpec("double", f"prob_{i}") for i in k]
    return ModelSignature(inputs=Schema([ColSpec("string", IMAGE_COLUMN)]), outputs=Schema(outputs))


def example_image_base64(size: int = 32) -> str:
    """A small real JPEG (a colour gradient) as base64: the logged model's input example."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[::-1, None]), axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels), "RGB").save(buffer, format="JPEG", quality=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def pip_requirements() -> list[str]:
    """The installed versions of what the model runs on, pinned (the shopvision package is not on PyPI)."""
    pins = []
    for package in RUNTIME_PACKAGES:
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return pins


def log_classifier(
    model_dir: Path, *, name: str = "model", registered_model_name: str | None = None
) -> ModelInfo:
    """Log a saved classifier (model_spec.json + weights.pt) to the active run as a pyfunc from code.

    Returns MLflow's ModelInfo; `model_uri` is `models:/m-<id>` (MLflow 3 keeps logged models apart
    from run artifacts), and the same model is also reachable as `runs:/<run_id>/<name>`.
    """
    import mlflow
    import pandas as pd

    from .models import SPEC_NAME, WEIGHTS_NAME, ModelSpec

    model_dir = Path(model_dir)
    if not (model_dir / SPEC_NAME).is_file() or not (model_dir / WEIGHTS_NAME).is_file():
        raise StepError(f"{model_dir} is not a saved model: it needs {SPEC_NAME} and {WEIGHTS_NAME}")
    if mlflow.active_run() is None:
        raise StepError("log_classifier needs an active MLflow run: call it inside mlflow.start_run()")
    spec = ModelSpec.from_json((model_dir / SPEC_NAME).read_text())
    with tempfile.TemporaryDirectory(prefix="shopvision-log-") as staging:
        # Log exactly the two model files, whatever else the training folder holds.
        classifier = Path(staging) / CLASSIFIER_ARTIFACT
        classifier.mkdir()
        for file_name in (SPEC_NAME, WEIGHTS_NAME):
            shutil.copy2(model_dir / file_name, classifier / file_name)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(PYFUNC_CODE),
            artifacts={CLASSIFIER_ARTIFACT: str(classifier)},
            signature=classifier_signature(spec.num_classes),
            input_example=pd.DataFrame({IMAGE_COLUMN: [example_image_base64()]}),
            pip_requirements=pip_requirements(),
            registered_model_name=registered_model_name,
            metadata={"arch": spec.arch, "image_size": spec.image_size, "num_classes": spec.num_classes},
        )
