"""The MLflow pyfunc for a shopvision classifier, logged as code (MLflow "models from code").

MLflow copies this file into the logged model and executes it at load time, so loading a model never
unpickles a Python object: the network is rebuilt from model_spec.json + weights.pt by
`load_classifier`. The file runs as a standalone module, not as part of the package, hence the
absolute imports. The model knows photos and probabilities only; HTTP belongs to the server.

Input: a DataFrame with an `image` column of base64-encoded image bytes (raw bytes also work when
calling `predict` directly). Output: one row per photo with `label_1..k` and `prob_1..k` (softmax,
highest first, k = min(5, number of categories)).
"""

from __future__ import annotations

import base64
import binascii
import math
from pathlib import Path

import mlflow
import pandas as pd

from shopvision.components.training.tracking import IMAGE_COLUMN, top_k

BATCH_SIZE = 32


def image_bytes(value, row: int) -> bytes:
    """The bytes of one `image` cell: base64 text (optionally a data: URL) or raw bytes."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise ValueError(f"row {row}: `{IMAGE_COLUMN}` is missing")
    if not isinstance(value, str):
        raise ValueError(f"row {row}: `{IMAGE_COLUMN}` must be base64 text, got {type(value).__name__}")
    text = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"row {row}: `{IMAGE_COLUMN}` is not valid base64: {exc}") from None


class PhotoClassifierModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import torch

        from shopvision.components.training.models import (
            SPEC_NAME,
            WEIGHTS_NAME,
            eval_transform,
            load_classifier,
        )

        root = Path(context.artifacts["classifier"])
        found = sorted(p.parent for p in root.rglob(SPEC_NAME) if (p.parent / WEIGHTS_NAME).is_file())
        if not found:
            raise FileNotFoundError(f"{root} holds no {SPEC_NAME} + {WEIGHTS_NAME}")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.spec = load_classifier(found[0], self.device)
        self.transform = eval_transform(self.spec)
        self.k = top_k(self.spec.num_classes)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        import torch

        from shopvision.components.data.images import ImageDecodeError, decode_image

        if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input.columns:
            raise ValueError(f"expected a DataFrame with an `{IMAGE_COLUMN}` column")
        tensors = []
        for row, value in enumerate(model_input[IMAGE_COLUMN].tolist()):
            try:
                image = decode_image(image_bytes(value, row)).image
            except ImageDecodeError as exc:
                raise ValueError(f"row {row}: not a usable image ({exc})") from None
            tensors.append(self.transform(image))
        probs, indices = [], []
        with torch.inference_mode():
            for start in range(0, len(tensors), BATCH_SIZE):
                batch = torch.stack(tensors[start : start + BATCH_SIZE]).to(self.device)
                top = torch.softmax(self.model(batch).float(), dim=1).topk(self.k, dim=1)
                probs.append(top.values.cpu())
                indices.append(top.indices.cpu())
        prob = torch.cat(probs).double() if probs else torch.empty(0, self.k, dtype=torch.float64)
        index = torch.cat(indices) if indices else torch.empty(0, self.k, dtype=torch.long)
        labels = self.spec.labels
        out = {
            f"label_{j}": pd.Series([labels[i] for i in index[:, j - 1].tolist()], dtype=str)
            for j in range(1, self.k + 1)
        }
        out |= {f"prob_{j}": prob[:, j - 1].numpy() for j in range(1, self.k + 1)}
        return pd.DataFrame(out)


mlflow.models.set_model(PhotoClassifierModel())
