"""What runs the forward pass: PyTorch or ONNX Runtime, behind one small interface.

`PhotoClassifier` (model.py) decodes and preprocesses photos the same way whichever runtime serves,
and turns logits into top-k answers the same way; only `logits(batch)` differs. So every route gives
the same answers under every runtime, to the tolerance the export check holds the ONNX file to
(components/registry/onnx_export.py: top-5 equal, probabilities within 1e-4, on real photos).

Choosing (`--runtime`):
- `torch`: the PyTorch network (batch norms folded, channels_last; bf16 autocast on a GPU);
- `onnx`: `model.onnx` beside the model's spec, in ONNX Runtime on the CPU (measured on this 2-core
  AVX2 CPU: ResNet-18 1.3-1.9x faster per photo than PyTorch);
- `onnx-int8`: `model.int8.onnx`, the statically quantized copy (registered with `--quantize int8`);
- `auto`: PyTorch on a GPU; on the CPU `onnx-int8` when the export measured that at most
  INT8_MAX_TOP1_FLIPPED percent of the test photos change their top-1 answer, else `onnx`, else
  (a version registered without ONNX) `torch`, saying why in the log.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from shopvision.components.registry.onnx_export import (
    CHECK_NAME,
    INPUT_NAME,
    INT8_NAME,
    ONNX_NAME,
    OUTPUT_NAME,
)

from .settings import RUNTIMES

# `auto` serves int8 only when at most this share (percent) of the test photos changed their top-1
# answer against the fp32 model: an accuracy cost of at most one point, whatever the labels.
INT8_MAX_TOP1_FLIPPED = 1.0


class Runtime(Protocol):
    name: str  # torch, onnx or onnx-int8
    platform: str  # the Open Inference Protocol's platform name
    threads: int  # CPU threads one forward pass uses (0: not the CPU's to say, a GPU)

    def logits(self, batch: torch.Tensor) -> torch.Tensor: ...


class TorchRuntime:
    """The PyTorch network on its device, channels_last, with autocast when a dtype is given."""

    name = "torch"
    platform = "pytorch"

    def __init__(
        self, network: torch.nn.Module, device: torch.device, autocast_dtype: torch.dtype | None, threads: int
    ) -> None:
        self.device = device
        self.autocast_dtype = autocast_dtype
        # channels_last (NHWC) lets cuDNN pick tensor-core convolutions and oneDNN its blocked CPU
        # kernels (measured here: ResNet-18 at 224 px ~1.2-1.5x faster on the CPU, BN folding included).
        self.memory_format = torch.channels_last
        self.network = network.to(device, memory_format=self.memory_format).eval()
        self.threads = threads if device.type == "cpu" else 0

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        batch = batch.contiguous(memory_format=self.memory_format)
        with torch.inference_mode():
            if self.autocast_dtype is None:
                return self.network(batch).float()
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                return self.network(batch).float()


class FlipRuntime:
    """Horizontal-flip test-time augmentation over any runtime: the photos and their mirror images
    in one batch of 2N, logits averaged (what `evaluate --tta flip` measured and thresholded)."""

    def __init__(self, inner: Runtime) -> None:
        self.inner = inner
        self.name, self.platform, self.threads = inner.name, inner.platform, inner.threads

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        plain, mirrored = self.inner.logits(torch.cat([batch, batch.flip(-1)])).chunk(2)
        return (plain + mirrored) / 2


class OnnxRuntime:
    """An ONNX file in an ONNX Runtime CPU session.

    One session serves every forward worker: `run` is thread-safe, and with one intra-op thread it
    runs on the calling thread, so N workers keep N cores busy without a pool to fight over.
    """

    platform = "onnxruntime_onnx"

    def __init__(self, path: Path, *, name: str, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / RuntimeException
            raise ValueError(f"cannot load {path.name} in ONNX Runtime: {_first_line(exc)}") from None
        self.name = name
        self.threads = threads
        self.path = path

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        pixels = np.ascontiguousarray(batch.numpy(), dtype=np.float32)
        (out,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: pixels})
        return torch.from_numpy(out)


@dataclass(frozen=True)
class OnnxFiles:
    """The ONNX files beside a model's spec, and what their export measured."""

    fp32: Path | None
    int8: Path | None
    check: dict

    @classmethod
    def beside(cls, model_dir: Path) -> OnnxFiles:
        model_dir = Path(model_dir)
        fp32, int8 = model_dir / ONNX_NAME, model_dir / INT8_NAME
        try:
            check = json.loads((model_dir / CHECK_NAME).read_text())
        except (OSError, ValueError):
            check = {}
        return cls(fp32 if fp32.is_file() else None, int8 if int8.is_file() else None, check)

    def int8_flipped(self) -> float | None:
        """Percent of the test photos whose top-1 answer int8 changed, as measured at export."""
        value = (self.check.get("int8") or {}).get("top1_flipped_percent")
        return float(value) if isinstance(value, int | float) else None


def choose_runtime(requested: str, device: torch.device, files: OnnxFiles) -> tuple[str, str]:
    """(runtime, why): what `--runtime` means for this model on this device. ValueError when the
    runtime asked for cannot run here (no ONNX file, ONNX on a GPU)."""
    if requested not in RUNTIMES:
        raise ValueError(f"unknown runtime {requested!r}: choose one of {', '.join(RUNTIMES)}")
    if requested == "torch":
        return "torch", "asked for"
    if requested != "auto":
        if device.type != "cpu":
            raise ValueError(
                f"--runtime {requested} runs on the CPU; serve with --device cpu, or --runtime torch"
            )
        path = files.fp32 if requested == "onnx" else files.int8
        if path is None:
            option = "--onnx-photos" if requested == "onnx" else "--onnx-photos and --quantize int8"
            raise ValueError(
                f"this model has no {ONNX_NAME if requested == 'onnx' else INT8_NAME}: register it with "
                f"{option}, or serve with --runtime torch"
            )
        return requested, "asked for"
    if device.type != "cpu":
        return "torch", f"auto on {device.type}: PyTorch"
    flipped = files.int8_flipped()
    if files.int8 is not None and flipped is not None and flipped <= INT8_MAX_TOP1_FLIPPED:
        return "onnx-int8", f"auto: int8 changed {flipped:g}% of test answers (<= {INT8_MAX_TOP1_FLIPPED:g}%)"
    if files.fp32 is not None:
        why = "auto: ONNX Runtime on the CPU"
        if files.int8 is not None:
            shown = "unmeasured" if flipped is None else f"{flipped:g}%"
            why += f" (int8 not used: it changed {shown} of test answers, over {INT8_MAX_TOP1_FLIPPED:g}%)"
        return "onnx", why
    return "torch", f"auto: PyTorch (this model has no {ONNX_NAME})"


def load_runtime(
    chosen: str,
    files: OnnxFiles,
    network: torch.nn.Module,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    threads: int,
) -> Runtime:
    if chosen == "torch":
        return TorchRuntime(network, device, autocast_dtype, threads)
    path = files.fp32 if chosen == "onnx" else files.int8
    return OnnxRuntime(path, name=chosen, threads=threads)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
