"""Batch top-k prediction for photo files and folders with a saved classifier.

Photos are decoded with the same safe decoder as every other step (`data.images.decode_image`) and
preprocessed with the model's own `eval_transform`, so a photo gets the same answer here, in
evaluation and in serving. Decoding runs on a few threads (Pillow and the tensor transforms release
the GIL) while the network runs batched under `torch.inference_mode`, on the GPU when there is one.
A file that is not a usable photo is reported with its reason; the others are still classified.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.images import ImageDecodeError, decode_image
from ..errors import StepError
from ..training.models import ModelSpec, eval_transform, load_classifier

DEFAULT_TOP_K = 5
DEFAULT_BATCH_SIZE = 64


@dataclass(frozen=True)
class PhotoPrediction:
    path: Path
    indices: tuple[int, ...]  # category indices into the model's labels, most probable first
    labels: tuple[str, ...]
    probabilities: tuple[float, ...]  # softmax over all categories, so these sum to <= 1


@dataclass(frozen=True)
class UnreadablePhoto:
    path: Path
    reason: str  # short verdict: not_an_image, corrupt_image, too_many_pixels, cannot_read, ...
    detail: str


@dataclass
class PredictionResult:
    labels: list[str]  # the model's categories
    top_k: int
    device: str
    predictions: list[PhotoPrediction] = field(default_factory=list)
    unreadable: list[UnreadablePhoto] = field(default_factory=list)
    seconds: float = 0.0


def pick_device(device: str = "auto") -> torch.device:
    """'auto' is the GPU when torch sees one, else the CPU; 'cpu', 'cuda', 'cuda:1' are taken as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StepError(f"device {device!r} asked for, but torch sees no CUDA GPU")
    return torch.device(device)


def collect_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files named on the command line as given; folders walked recursively, hidden entries skipped.

    Inside folders every file is a candidate whatever its extension: the decoder, not the name,
    decides what a photo is (files that are not images are then reported, not silently dropped).
    """
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files.extend(Path(root, n) for n in sorted(names) if not n.startswith("."))
        else:
            raise StepError(f"{path} does not exist (give photo files or folders of photos)")
    return files


def _prepare(path: Path, transform) -> torch.Tensor | UnreadablePhoto:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return UnreadablePhoto(path, "cannot_read", f"{type(exc).__name__}: {exc.strerror or exc}")
    try:
        return transform(decode_image(data).image)
    except ImageDecodeError as exc:
        return UnreadablePhoto(path, exc.reason, exc.detail)


def predict_files(
    model: torch.nn.Module,
    spec: ModelSpec,
    files: Sequence[Path],
    *,
    top_k: int = DEFAULT_TOP_K,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | str | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PredictionResult:
    """Top-k categories with probabilities for each readable file, in the order given.

    `model` must already be on `device` (default: where its parameters are) and in eval mode, as
    `load_classifier` returns it. `progress(done, total)` is called after each batch.
    """
    if top_k < 1:
        raise StepError(f"top-k must be at least 1, got {top_k}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    k = min(top_k, spec.num_classes)
    transform = eval_transform(spec)
    result = PredictionResult(labels=list(spec.labels), top_k=k, device=str(device))
    started = time.perf_counter()
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool, torch.inference_mode():
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            tensors, paths = [], []
            for path, prepared in zip(chunk, pool.map(lambda p: _prepare(p, transform), chunk), strict=True):
                if isinstance(prepared, UnreadablePhoto):
                    result.unreadable.append(prepared)
                else:
                    tensors.append(prepared)
                    paths.append(path)
            if tensors:
                batch = torch.stack(tensors).to(device, non_blocking=True)
                top = torch.softmax(model(batch).float(), dim=1).topk(k, dim=1)
                for path, probs, indices in zip(
                    paths, top.values.cpu().tolist(), top.indices.cpu().tolist(), strict=True
                ):
                    result.predictions.append(
                        PhotoPrediction(
                            path, tuple(indices), tuple(spec.labels[i] for i in indices), tuple(probs)
                        )
                    )
            if progress is not None:
                progress(min(start + batch_size, len(files)), len(files))
    result.seconds = time.perf_counter() - started
    return result


def classify(
    model: str | Path,
    paths: Iterable[str | Path],
    *,
    top_k: int = DEFAULT_TOP_K,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> PredictionResult:
    """Resolve and load MODEL (folder, checkpoint or MLflow URI), then predict every photo under PATHS."""
    from ..training.model_source import resolve_model_dir

    files = collect_files(paths)
    if not files:
        raise StepError("no files to classify under the given paths")
    target = pick_device(device)
    network, spec = load_classifier(resolve_model_dir(model), target)
    return predict_files(
        network, spec, files, top_k=top_k, batch_size=batch_size, device=target, progress=progress
    )


def prediction_rows(result: PredictionResult) -> list[dict]:
    """One flat record per readable photo: file, label_1..k, prob_1..k."""
    rows = []
    for p in result.predictions:
        row: dict = {"file": str(p.path)}
        for rank, (label, prob) in enumerate(zip(p.labels, p.probabilities, strict=True), start=1):
            row[f"label_{rank}"] = label
            row[f"prob_{rank}"] = round(prob, 6)
        rows.append(row)
    return rows


def write_predictions(result: PredictionResult, target: Path) -> None:
    """`.csv`: one row per photo (unreadable files are left out, the summary names them);
    `.json`: {"predictions": [...], "unreadable": [{"file", "reason", "detail"}], ...}."""
    from ..data.naming import atomic_write_text

    target = Path(target)
    suffix = target.suffix.lower()
    rows = prediction_rows(result)
    if suffix == ".json":
        body = {
            "top_k": result.top_k,
            "predictions": [
                {
                    "file": str(p.path),
                    "top": [
                        {"label": label, "probability": round(prob, 6)}
                        for label, prob in zip(p.labels, p.probabilities, strict=True)
                    ],
                }
                for p in result.predictions
            ],
            "unreadable": [
                {"file": str(u.path), "reason": u.reason, "detail": u.detail} for u in result.unreadable
            ],
        }
        atomic_write_text(target, json.dumps(body, indent=1) + "\n")
    elif suffix == ".csv":
        columns = ["file"] + [f"{kind}_{r}" for r in range(1, result.top_k + 1) for kind in ("label", "prob")]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(target, buffer.getvalue())
    else:
        raise StepError(f"--output must end in .csv or .json, got {target.name!r}")


def format_table(result: PredictionResult, width: int = 40) -> str:
    """A plain-text table for the terminal: one line per photo, `label prob` pairs best first."""
    lines = []
    for p in result.predictions:
        name = str(p.path)
        if len(name) > width:
            name = "…" + name[-(width - 1) :]
        answers = "  ".join(
            f"{label} {prob:.3f}" for label, prob in zip(p.labels, p.probabilities, strict=True)
        )
        lines.append(f"{name:<{width}}  {answers}")
    for u in result.unreadable:
        lines.append(f"{str(u.path):<{width}}  UNREADABLE ({u.reason}: {u.detail})")
    return "\n".join(lines)


def progress_printer(step: str, every_s: float = 5.0) -> Callable[[int, int], None]:
    """A `progress` callback that prints `step: done/total photos` to stderr at most every few seconds."""
    import sys

    last = [time.monotonic()]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] >= every_s:
            last[0] = now
            print(f"{step}: {done}/{total} photos", file=sys.stderr, flush=True)

    return report


def summary(result: PredictionResult) -> str:
    text = (
        f"classify: {len(result.predictions)} photos classified (top-{result.top_k}) on {result.device} "
        f"in {result.seconds:.1f} s"
    )
    if result.unreadable:
        text += f"; {len(result.unreadable)} unreadable files skipped"
    return text
