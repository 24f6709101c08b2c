"""A model version as ONNX: export, the check on real photos, and optional static int8 quantization.

Why: ONNX Runtime serves our ResNets on a CPU 1.3-1.9x faster per photo than PyTorch, and the same
file is what Triton's and KServe's ONNX runtimes load. A file that answers differently from the
model that was evaluated would serve answers nobody measured, so every export is checked before it
is kept: on real photos its top-5 must equal the PyTorch model's and its probabilities agree to
EXPORT_TOLERANCE, else the export fails with the difference.

The files go beside the model's spec (model_spec.json, weights.pt), so one folder or one logged
MLflow model carries the network in both forms and the preprocessing that feeds them:

    model.onnx        fp32, input `pixels` N×3×S×S (dynamic N), output `logits` N×C; the spec JSON
                      is in its metadata (`shopvision_model_spec`) for tools that only see this file
    model.int8.onnx   with --quantize int8: QDQ int8, calibrated on validation photos
    onnx_check.json   what the checks measured; serving's `--runtime auto` reads the int8 part

int8 is judged on the test photos against the fp32 file: the share of photos whose top-1 answer
changed and the top-1 accuracy change (points). It is never a failure (it is expected to differ);
serving decides whether to use it (serving/runtime.py: INT8_MAX_TOP1_FLIPPED).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import StepError

ONNX_NAME = "model.onnx"  # the names serving/runtime.py looks for
INT8_NAME = "model.int8.onnx"
CHECK_NAME = "onnx_check.json"
INPUT_NAME, OUTPUT_NAME = "pixels", "logits"
SPEC_METADATA_KEY = "shopvision_model_spec"
EXPORT_TOLERANCE = 1e-4  # largest probability difference the fp32 export may show
TOP_K = 5
CHECK_PHOTOS = 64  # real photos the export is checked on
CALIBRATION_PHOTOS = 128  # validation photos int8 ranges are calibrated on
INT8_TEST_PHOTOS = 512  # test photos int8 is judged on
BATCH = 16
QUANTIZE_CHOICES = ("int8",)


@dataclass
class OnnxExport:
    """What was written and what its checks measured."""

    folder: Path
    check: dict  # photos, max_probability_difference, tolerance
    int8: dict | None = None  # test_photos, top1_flipped_percent, top1_accuracy_change_points, ...
    files: list[str] = field(default_factory=list)

    def tags(self) -> dict[str, str]:
        """The model version tags: what a reader of the registry needs without the files."""
        tags = {
            "onnx": ONNX_NAME,
            "onnx_check_photos": str(self.check["photos"]),
            "onnx_max_probability_difference": f"{self.check['max_probability_difference']:.3g}",
        }
        if self.int8 is not None:
            tags |= {
                "onnx_int8": INT8_NAME,
                "onnx_int8_test_photos": str(self.int8["test_photos"]),
                "onnx_int8_top1_flipped_percent": f"{self.int8['top1_flipped_percent']:.4g}",
                "onnx_int8_top1_change": f"{self.int8['top1_accuracy_change_points']:+.4g}",
            }
        return tags

    def summary(self) -> str:
        text = (
            f"{ONNX_NAME} checked on {self.check['photos']} photos: top-{self.check['k']} equal, "
            f"probabilities within {self.check['max_probability_difference']:.2g}"
        )
        if self.int8 is not None:
            text += (
                f"; {INT8_NAME}: top-1 changed on {self.int8['top1_flipped_percent']:.3g}% of "
                f"{self.int8['test_photos']} test photos, accuracy {self.int8['top1_accuracy_change_points']:+.3g} points"
            )
        return text


# ------------------------------------------------------------------------------------------ photos


def photo_folders(photos: Path, roots: Mapping[str, Path] | None = None) -> tuple[list, list]:
    """(test photos, calibration photos): a split output's test and val (a manifest, or test/ and
    val/ of the folder layout), or the photos of one <category>/ folder for both."""
    from ..evaluation.photo_sets import labelled_split, validation_photos

    test, _ = labelled_split(Path(photos), "test", roots)
    val = validation_photos(Path(photos), None, roots)
    return test, val or test


def load_photos(photos, spec, limit: int) -> tuple[np.ndarray, list[str]]:
    """Up to `limit` readable photos (a <category>/ folder, or `Photo`s), spread over the categories,
    preprocessed by the model's own eval transform: (N×3×S×S float32, categories)."""
    import torch

    from ..data.images import ImageDecodeError, decode_image
    from ..evaluation.photo_sets import labelled_split
    from ..training.models import eval_transform

    folder = photos if isinstance(photos, str | Path) else None
    chosen = labelled_split(Path(folder), "val")[0] if folder is not None else list(photos)
    files, categories = [p.path for p in chosen], [p.category for p in chosen]
    step = max(1, len(files) // limit)
    transform = eval_transform(spec)
    tensors, kept = [], []
    for path, category in list(zip(files, categories, strict=True))[::step][:limit]:
        try:
            tensors.append(transform(decode_image(path.read_bytes()).image))
        except (OSError, ImageDecodeError):
            continue
        kept.append(category)
    if not tensors:
        raise StepError(
            f"no readable photos under {folder or 'the data'}/<category>/ to check the ONNX export on"
        )
    return torch.stack(tensors).numpy(), kept


# ------------------------------------------------------------------------------------------ export


def write_onnx(network, spec, path: Path) -> None:
    """Export with torch.onnx's dynamo exporter, batch axis dynamic, one self-contained file."""
    import onnx
    import torch

    example = torch.zeros(2, 3, spec.image_size, spec.image_size)
    try:
        with torch.no_grad():  # inference_mode() fails inside the exporter
            torch.onnx.export(
                network.eval(),
                (example,),
                str(path),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                external_data=False,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many kinds; the first line says which op
        raise StepError(
            f"ONNX export of {spec.arch} failed: {type(exc).__name__}: {_first_line(exc)}"
        ) from None
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {SPEC_METADATA_KEY: spec.to_json()})
    onnx.save(model, str(path))


def onnx_logits(path: Path, pixels: np.ndarray) -> np.ndarray:
    """Logits of the ONNX file for N×3×S×S pixels, in batches; StepError when it cannot run."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.concatenate(
            [
                session.run([OUTPUT_NAME], {INPUT_NAME: pixels[i : i + BATCH]})[0]
                for i in range(0, len(pixels), BATCH)
            ]
        )
    except Exception as exc:  # onnxruntime's Fail, InvalidGraph, InvalidArgument...
        raise StepError(f"{path.name} does not run in ONNX Runtime: {_first_line(exc)}") from None


def torch_logits(network, pixels: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return np.concatenate(
            [
                network(torch.from_numpy(pixels[i : i + BATCH])).float().numpy()
                for i in range(0, len(pixels), BATCH)
            ]
        )


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def compare(reference: np.ndarray, candidate: np.ndarray, k: int, tolerance: float) -> dict:
    """How far the candidate's probabilities are from the reference's, and where their top-k differ.

    Two categories whose reference probabilities are within `tolerance` of each other are a tie: the
    order of a tie is float rounding, not a different answer.
    """
    if candidate.shape != reference.shape:
        return {"shape": list(candidate.shape), "expected_shape": list(reference.shape)}
    ref_p, cand_p = softmax(reference), softmax(candidate)
    ref_top = np.argsort(-ref_p, axis=1, kind="stable")[:, :k]
    cand_top = np.argsort(-cand_p, axis=1, kind="stable")[:, :k]
    rows = np.arange(len(ref_p))[:, None]
    ties = np.abs(ref_p[rows, ref_top] - ref_p[rows, cand_top]) <= tolerance
    differing = [int(i) for i in np.nonzero(((ref_top != cand_top) & ~ties).any(axis=1))[0]]
    return {
        "max_probability_difference": float(np.abs(ref_p - cand_p).max()),
        "top_k_differs": differing,
    }


def check_onnx(path: Path, network, pixels: np.ndarray, k: int, tolerance: float = EXPORT_TOLERANCE) -> dict:
    """The export check: StepError with the difference unless the ONNX file's top-k equals the
    network's on every photo and its probabilities agree to `tolerance`."""
    diff = compare(torch_logits(network, pixels), onnx_logits(path, pixels), k, tolerance)
    if "shape" in diff:
        raise StepError(
            f"{path.name} answers with shape {diff['shape']}, the model with {diff['expected_shape']}"
        )
    worst, differing = diff["max_probability_difference"], diff["top_k_differs"]
    if differing or worst > tolerance:
        raise StepError(
            f"{path.name} does not answer as the PyTorch model on {len(pixels)} real photos: probabilities "
            f"differ by up to {worst:.3g} (tolerance {tolerance:g}); top-{k} differs on "
            f"{len(differing)} photo(s){f' (photos {differing[:10]})' if differing else ''}"
        )
    return {"photos": len(pixels), "k": k, "max_probability_difference": worst, "tolerance": tolerance}


# -------------------------------------------------------------------------------------------- int8


def quantize_int8(fp32: Path, target: Path, calibration: np.ndarray) -> None:
    """Static QDQ quantization (int8 weights per channel, uint8 activations), calibrated by MinMax
    on the calibration photos."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Photos(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration[i : i + BATCH] for i in range(0, len(calibration), BATCH))

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    with tempfile.TemporaryDirectory(prefix="shopvision-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
            quantize_static(
                str(prepared),
                str(target),
                Photos(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
        except Exception as exc:
            raise StepError(f"int8 quantization failed: {type(exc).__name__}: {_first_line(exc)}") from None


def judge_int8(fp32: Path, int8: Path, pixels: np.ndarray, categories: list[str], labels: list[str]) -> dict:
    """int8 against fp32 on the test photos: the share whose top-1 changed, and the accuracy change."""
    reference, quantized = onnx_logits(fp32, pixels).argmax(1), onnx_logits(int8, pixels).argmax(1)
    truth = np.array([labels.index(c) if c in labels else -1 for c in categories])
    known = truth >= 0

    def accuracy(top: np.ndarray) -> float:
        return float((top[known] == truth[known]).mean() * 100) if known.any() else float("nan")

    return {
        "test_photos": len(pixels),
        "top1_flipped_percent": float((reference != quantized).mean() * 100),
        "top1_accuracy_fp32_percent": accuracy(reference),
        "top1_accuracy_int8_percent": accuracy(quantized),
        "top1_accuracy_change_points": accuracy(quantized) - accuracy(reference),
        "labelled_photos": int(known.sum()),
    }


# ------------------------------------------------------------------------------------------ driver


def export_onnx(
    model_dir: Path, photos: Path, *, quantize: str | None = None, roots: Mapping[str, Path] | None = None
) -> OnnxExport:
    """Write model.onnx (and model.int8.onnx) beside the model in `model_dir`, checked on `photos`
    (split's output: checked and judged on test, calibrated on val; or one folder of categories);
    `roots` says where the photos a manifest references lie here."""
    from ..training.models import load_classifier

    if quantize not in (None, *QUANTIZE_CHOICES):
        raise StepError(f"--quantize {quantize}: choose one of {', '.join(QUANTIZE_CHOICES)}")
    model_dir = Path(model_dir)
    network, spec = load_classifier(model_dir, "cpu")
    test_photos, calibration_photos = photo_folders(photos, roots)
    pixels, categories = load_photos(
        test_photos, spec, max(CHECK_PHOTOS, INT8_TEST_PHOTOS if quantize else 0)
    )
    fp32 = model_dir / ONNX_NAME
    write_onnx(network, spec, fp32)
    k = min(TOP_K, spec.num_classes)
    try:
        check = check_onnx(fp32, network, pixels[:: max(1, len(pixels) // CHECK_PHOTOS)][:CHECK_PHOTOS], k)
    except StepError:
        fp32.unlink(missing_ok=True)  # a file that failed its check is not left where serving looks
        raise
    result = OnnxExport(model_dir, check, files=[ONNX_NAME])
    if quantize == "int8":
        calibrated_on = "val" if calibration_photos is not test_photos else "test"
        calibration, _ = (
            load_photos(calibration_photos, spec, CALIBRATION_PHOTOS)
            if calibrated_on == "val"
            else (pixels[:CALIBRATION_PHOTOS], None)
        )
        quantize_int8(fp32, model_dir / INT8_NAME, calibration)
        result.int8 = judge_int8(fp32, model_dir / INT8_NAME, pixels, categories, spec.labels)
        result.int8 |= {"calibration_photos": len(calibration), "calibrated_on": calibrated_on}
        result.files.append(INT8_NAME)
    (model_dir / CHECK_NAME).write_text(json.dumps({"onnx": check, "int8": result.int8}, indent=2) + "\n")
    result.files.append(CHECK_NAME)
    return result


def attach_to_logged_model(
    client,
    source: str,
    model_id: str | None,
    photos: Path,
    quantize: str | None,
    roots: Mapping[str, Path] | None = None,
) -> OnnxExport:
    """Export the logged model `source` (models:/m-...) and upload the files beside its spec, so a
    download of any version registered from it holds them."""
    from ..training.model_source import download_mlflow_artifacts
    from ..training.models import SPEC_NAME, WEIGHTS_NAME

    if model_id is None:
        raise StepError(f"{source} is not a logged model with an id: cannot attach ONNX files to it")
    root = download_mlflow_artifacts(source)
    found = sorted(p.parent for p in root.rglob(SPEC_NAME) if (p.parent / WEIGHTS_NAME).is_file())
    if not found:
        raise StepError(f"{source} holds no shopvision model ({SPEC_NAME} + {WEIGHTS_NAME})")
    model_dir = found[0]  # the folder serving's download resolves to (model_source._download)
    result = export_onnx(model_dir, photos, quantize=quantize, roots=roots)
    with tempfile.TemporaryDirectory(prefix="shopvision-onnx-") as tmp:
        for name in result.files:
            shutil.copy2(model_dir / name, Path(tmp) / name)
        relative = model_dir.relative_to(root).as_posix()
        try:
            client.log_model_artifacts(model_id, tmp, artifact_path=None if relative == "." else relative)
        except Exception as exc:  # MLflow or the artifact store
            raise StepError(f"cannot upload the ONNX files to {source}: {_first_line(exc)}") from None
    return result


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
