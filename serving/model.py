"""The classifier the prediction server runs: load, preprocess, predict a batch, warm up.

KServe's custom-predictor split: this class knows photos, tensors and probabilities, and nothing of
HTTP, batching or the registry (`app.py`, `batcher.py` and `registry_watch.py` own those). Photos are
decoded by `components.images.decode_image` and preprocessed by `models.eval_transform`, the same
code evaluation and the MLflow pyfunc use, so the server answers what evaluation measured. The
forward pass itself runs in a runtime (`runtime.py`: PyTorch, or ONNX Runtime on the CPU).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from shopvision.components.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from shopvision.components.training.models import TTA_CHOICES, TTA_KEY, eval_transform, load_classifier

from .runtime import FlipRuntime, OnnxFiles, Runtime, choose_runtime, load_runtime
from .settings import DEFAULT_MAX_ASPECT_RATIO

log = logging.getLogger("shopvision.serving")

DEFAULT_THRESHOLD = 0.5  # when neither the registry nor the model spec carries one
THRESHOLD_TAG = "confidence_threshold"  # model version tag written by the evaluation step
MAX_TOP_K = 5


class InputError(ValueError):
    """A preprocessed tensor the model cannot take (wrong shape, not finite); a client mistake."""


@dataclass(frozen=True)
class Prediction:
    """The top categories for one photo, best first, and which model version said so."""

    labels: tuple[str, ...]
    probabilities: tuple[float, ...]
    confident: bool  # top probability at or above the threshold chosen at evaluation
    model_version: str


def pick_device(requested: str = "auto") -> torch.device:
    """`auto`: the first GPU when there is one, else the CPU; `cuda:N` picks a GPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} asked for, but torch sees no GPU")
    return device


def pick_precision(device: torch.device, requested: str = "auto") -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32.

    `auto` is bf16 on a GPU that has it (no overflow risk: bf16 keeps fp32's exponent), fp16 on older
    GPUs, and fp32 on the CPU, where reduced precision is slower without AMX and changes answers.
    """
    if requested == "fp32" or (requested == "auto" and device.type != "cuda"):
        return None
    if requested == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type != "cuda" and requested == "fp16":
        raise ValueError("fp16 is only offered on a GPU; use fp32 or bf16 on the CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[requested]


def confidence_threshold(tag_value: str | None, spec_extra: dict) -> tuple[float, str]:
    """The threshold under which an answer is flagged `confident: false`, and where it came from.

    Order: the model version tag `confidence_threshold` (set by the evaluation step), then
    `confidence_threshold` in the model spec's `extra`, then 0.5. A value that is not a number in
    [0, 1] is skipped with a warning rather than failing the load.
    """
    for source, value in (("model version tag", tag_value), ("model spec", spec_extra.get(THRESHOLD_TAG))):
        if value is None:
            continue
        try:
            threshold = float(value)
        except (TypeError, ValueError):
            threshold = math.nan
        if 0.0 <= threshold <= 1.0:
            return threshold, source
        log.warning("ignoring %s %s=%r: not a number between 0 and 1", source, THRESHOLD_TAG, value)
    return DEFAULT_THRESHOLD, "default"


def fold_batch_norms(network: torch.nn.Module) -> torch.nn.Module:
    """Fold each eval-mode batch norm into the convolution before it (torchvision ResNets).

    The same function to float rounding, with one pass over the activations fewer per layer. Done on
    the modules themselves, not by tracing: torch.fx tracing patches nn.Module globally, which breaks
    a model serving on another thread while a new version is prepared.
    """
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for module in list(network.modules()):
        for conv_name, norm_name in (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")):
            conv, norm = getattr(module, conv_name, None), getattr(module, norm_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, norm))
                setattr(module, norm_name, nn.Identity())
        if (  # a ResNet shortcut: Sequential(Conv2d, BatchNorm2d)
            isinstance(module, nn.Sequential)
            and len(module) == 2
            and isinstance(module[0], nn.Conv2d)
            and isinstance(module[1], nn.BatchNorm2d)
        ):
            module[0] = fuse_conv_bn_eval(module[0], module[1])
            module[1] = nn.Identity()
    return network


def check_aspect_ratio(image: Image.Image, limit: float) -> Image.Image:
    """The image, or ImageDecodeError("aspect_ratio") when its longer side is over `limit` times the
    shorter one.

    Preprocessing resizes the shorter side to the model's resize size (`eval_transform`), so a thin
    photo grows with its aspect ratio: a 1×60,000 one (under any pixel limit) would become
    256×15 million pixels. With the ratio bounded, one photo costs at most resize² × limit pixels.
    """
    width, height = image.size
    if max(width, height) > limit * min(width, height):
        raise ImageDecodeError(
            "aspect_ratio",
            f"{width}x{height} is over the aspect-ratio limit of {limit:g}:1 (--max-aspect-ratio)",
        )
    return image


def torch_threads(count: int) -> Callable[[], None]:
    """A thread initialiser: torch operations called from that thread use `count` CPU threads."""

    def init() -> None:
        torch.set_num_threads(count)

    return init


class PhotoClassifier:
    """One loaded model version, ready to classify batches of photos."""

    def __init__(
        self,
        model_dir: Path,
        *,
        version: str = "local",
        device: str = "auto",
        precision: str = "auto",
        threshold_tag: str | None = None,
        tta_tag: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
        runtime: str = "torch",
        threads: int = 1,
    ) -> None:
        """`runtime` is `--runtime` (see runtime.py; `auto` picks per device and model); `threads` the
        CPU threads of one forward pass, what each forward worker's share of the cores is.
        `tta_tag` is the version's `test_time_augmentation` tag (else the spec's): with `flip` every
        runtime answers with the flip-averaged logits the evaluation chose its threshold on."""
        self.version = str(version)
        device_type = pick_device(device)
        network, self.spec = load_classifier(Path(model_dir), "cpu")
        network = getattr(network, "inner", network)  # the flip is applied over the runtime below
        self.tta = tta_tag or self.spec.extra.get(TTA_KEY) or "none"
        if self.tta not in TTA_CHOICES:
            raise ValueError(f"test-time augmentation {self.tta!r}: choose from {', '.join(TTA_CHOICES)}")
        onnx_files = OnnxFiles.beside(model_dir)
        self.runtime_name, self.runtime_reason = choose_runtime(runtime, device_type, onnx_files)
        if self.runtime_name != "torch" and precision not in ("auto", "fp32"):
            raise ValueError(f"--precision {precision} is PyTorch autocast: serve with --runtime torch")
        self.device = device_type if self.runtime_name == "torch" else torch.device("cpu")
        self.autocast_dtype = pick_precision(self.device, precision) if self.runtime_name == "torch" else None
        if self.runtime_name == "torch" and self.spec.arch.startswith("resnet"):
            network = fold_batch_norms(network)
        self.runtime: Runtime = load_runtime(
            self.runtime_name, onnx_files, network, self.device, self.autocast_dtype, threads
        )
        if self.tta == "flip":
            self.runtime = FlipRuntime(self.runtime)
        self.transform = eval_transform(self.spec)
        self.max_pixels = max_pixels
        self.max_aspect_ratio = max_aspect_ratio
        self.k = min(MAX_TOP_K, self.spec.num_classes)
        self.threshold, self.threshold_source = confidence_threshold(threshold_tag, self.spec.extra)

    @property
    def labels(self) -> list[str]:
        return self.spec.labels

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The shape of one preprocessed photo: channels, height, width."""
        return (3, self.spec.image_size, self.spec.image_size)

    @property
    def precision(self) -> str:
        if self.runtime_name == "onnx-int8":
            return "int8"
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]

    @property
    def threads(self) -> int:
        """CPU threads of one forward pass (0 on a GPU)."""
        return self.runtime.threads

    @property
    def platform(self) -> str:
        """The Open Inference Protocol's name for the runtime: pytorch or onnxruntime_onnx."""
        return self.runtime.platform

    def preprocess(self, data: bytes) -> torch.Tensor:
        """Encoded image bytes to a normalised 3×S×S tensor; raises ImageDecodeError for bad files,
        and for photos whose pixels or aspect ratio would cost more memory than the server allows."""
        image = decode_image(data, max_pixels=self.max_pixels).image
        return self.transform(check_aspect_ratio(image, self.max_aspect_ratio))

    def check_pixels(self, array: np.ndarray) -> list[torch.Tensor]:
        """An N×3×S×S float array a client preprocessed itself, as one tensor per photo."""
        if array.ndim != 4 or tuple(array.shape[1:]) != self.input_shape:
            expected = "×".join(str(d) for d in self.input_shape)
            raise InputError(f"expected a tensor of shape N×{expected}, got {list(array.shape)}")
        if not np.isfinite(array).all():
            raise InputError("the tensor holds NaN or infinite values")
        return list(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)))

    def predict(self, batch: torch.Tensor) -> list[Prediction]:
        """Top-k categories for an N×3×S×S batch, in one forward pass of the runtime."""
        top = torch.softmax(self.runtime.logits(batch), dim=1).topk(self.k, dim=1)
        values, indices = top.values.cpu().tolist(), top.indices.cpu().tolist()
        labels = self.spec.labels
        return [
            Prediction(
                labels=tuple(labels[i] for i in row_indices),
                probabilities=tuple(row_values),
                confident=row_values[0] >= self.threshold,
                model_version=self.version,
            )
            for row_values, row_indices in zip(values, indices, strict=True)
        ]

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Forward passes on blank batches, so the first real request pays no start-up cost
        (CUDA context and kernels, oneDNN primitives, allocator pools)."""
        for size in sorted(set(batch_sizes)):
            self.predict(torch.zeros(size, *self.input_shape))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def describe(self) -> str:
        return (
            f"{self.spec.arch} {self.spec.image_size}px, {self.spec.num_classes} categories, version "
            f"{self.version}, {self.runtime_name} on {self.device} {self.precision}"
            f"{f', {self.threads} thread(s) per pass' if self.threads else ''} ({self.runtime_reason}), "
            f"{'flip test-time augmentation, ' if self.tta == 'flip' else ''}"
            f"threshold {self.threshold:g} ({self.threshold_source})"
        )
