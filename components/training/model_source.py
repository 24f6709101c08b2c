"""Where a model comes from: a training folder, a checkpoint, a saved model folder or an MLflow URI.

Every command that takes `--model` resolves it here to a local folder holding model_spec.json and
weights.pt, then loads it with `models.load_classifier` (no arbitrary unpickling on any path).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import StepError
from .models import SPEC_NAME, WEIGHTS_NAME, ModelSpec, read_state_dict

MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/", "s3://", "file://")
BEST_DIR = "model_best"


def resolve_model_dir(model: str | Path) -> Path:
    """A local folder with model_spec.json and weights.pt for any accepted form of --model."""
    text = str(model)
    if text.startswith(MLFLOW_SCHEMES):
        return _download(text)
    path = Path(text)
    if path.is_dir():
        for candidate in (path, path / BEST_DIR):
            if (candidate / SPEC_NAME).is_file() and (candidate / WEIGHTS_NAME).is_file():
                return candidate
        raise StepError(
            f"{path} holds no model: expected {SPEC_NAME} and {WEIGHTS_NAME} in it or in {BEST_DIR}/"
        )
    if path.is_file():
        return _from_checkpoint(path)
    raise StepError(
        f"model {text!r} not found: give a training output folder, a checkpoint, or an MLflow URI"
    )


def _from_checkpoint(path: Path) -> Path:
    """A training checkpoint (epoch_k.pt, latest.pt, model_best.pt) carries its spec; export it."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise StepError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(checkpoint, dict) or "spec" not in checkpoint:
        raise StepError(f"{path} is not a shopvision checkpoint (it has no model spec)")
    target = scratch_dir()
    (target / SPEC_NAME).write_text(ModelSpec(**checkpoint["spec"]).to_json())
    torch.save(read_state_dict(path), target / WEIGHTS_NAME)
    return target


def scratch_dir() -> Path:
    """A private temporary folder for an exported or downloaded model, removed when the process exits."""
    path = tempfile.mkdtemp(prefix="shopvision-model-")
    atexit.register(shutil.rmtree, path, True)
    return Path(path)


def download_mlflow_artifacts(uri: str) -> Path:
    """Fetch an MLflow artifact URI to a local path, with one clear error for every way it fails."""
    import mlflow

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(scratch_dir())))
    except Exception as exc:  # MLflow raises its own and requests' exceptions
        raise StepError(f"cannot fetch {uri}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None


def _download(uri: str) -> Path:
    local = download_mlflow_artifacts(uri)
    found = sorted(p.parent for p in local.rglob(SPEC_NAME) if (p.parent / WEIGHTS_NAME).is_file())
    if not found:
        raise StepError(f"{uri} holds no shopvision model ({SPEC_NAME} + {WEIGHTS_NAME})")
    return found[0]
