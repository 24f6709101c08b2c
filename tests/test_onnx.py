"""The ONNX path: export and its check on real photos, int8, registration, and a real
`shopvision serve --runtime onnx` process that answers what `--runtime torch` answers.

The model is tests/tiny_models.py's fitted ResNet-18 at 32 px (answers differ from photo to photo);
the photos are the sample's JPEGs, a few per category, split into test/ and val/ folders.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
import requests
import torch
from mlflow_server import free_port, running_mlflow_server
from test_serving import SAMPLE, serve_process, shopvision_exe, wait_ready
from tiny_models import fitted_model

from shopvision.components.errors import StepError
from shopvision.components.registry.onnx_export import (
    CHECK_NAME,
    INT8_NAME,
    ONNX_NAME,
    SPEC_METADATA_KEY,
    check_onnx,
    export_onnx,
    load_photos,
)
from shopvision.components.registry.register import register
from shopvision.components.training.models import ModelSpec, load_classifier
from shopvision.components.training.tracking import log_classifier
from shopvision.serving.runtime import INT8_MAX_TOP1_FLIPPED, OnnxFiles, choose_runtime

NAME = "shopvision-onnx-test"
FITTED_ON = ["Banana", "Kiwi", "Lemon", "Pineapple"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A split folder: test/ and val/ with two different sample photos of each category."""
    root = tmp_path_factory.mktemp("photos")
    for category in sorted(p for p in SAMPLE.iterdir() if p.is_dir()):
        files = sorted(category.glob("*.jpg"))
        for split, chosen in (("test", files[:2]), ("val", files[2:4])):
            (root / split / category.name).mkdir(parents=True)
            for path in chosen:
                shutil.copy(path, root / split / category.name / path.name)
    return root


@pytest.fixture(scope="module")
def labels() -> list[str]:
    return sorted(p.name for p in SAMPLE.iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def exported(tmp_path_factory, photos, labels):
    """A tiny fitted model with model.onnx and model.int8.onnx beside it."""
    folder = tmp_path_factory.mktemp("model")
    train = [p for c in FITTED_ON for p in sorted((photos / "test" / c).glob("*.jpg"))]
    fitted_model(folder, labels, train, [p.parent.name for p in train], steps=150)
    return folder, export_onnx(folder, photos, quantize="int8")


def test_export_of_a_tiny_model_passes_its_check_and_carries_its_spec(exported):
    folder, result = exported
    assert result.check["photos"] == 24 and result.check["k"] == 5
    assert result.check["max_probability_difference"] <= 1e-4
    model = onnx.load(str(folder / ONNX_NAME))
    onnx.checker.check_model(model)
    spec = ModelSpec.from_json({p.key: p.value for p in model.metadata_props}[SPEC_METADATA_KEY])
    assert spec == ModelSpec.from_json((folder / "model_spec.json").read_text())
    (pixels,) = [i for i in model.graph.input]
    assert pixels.name == "pixels" and not pixels.type.tensor_type.shape.dim[0].HasField("dim_value")
    int8 = result.int8
    assert int8["test_photos"] == 24 and int8["calibrated_on"] == "val" and int8["calibration_photos"] == 24
    assert 0 <= int8["top1_flipped_percent"] <= 100
    assert int8["top1_accuracy_change_points"] == pytest.approx(
        int8["top1_accuracy_int8_percent"] - int8["top1_accuracy_fp32_percent"]
    )
    assert json.loads((folder / CHECK_NAME).read_text())["int8"] == int8
    tags = result.tags()
    assert tags["onnx"] == ONNX_NAME and tags["onnx_int8"] == INT8_NAME
    assert float(tags["onnx_int8_top1_change"]) == pytest.approx(
        int8["top1_accuracy_change_points"], abs=1e-3
    )


def test_a_tampered_or_broken_export_fails_with_the_difference(exported, photos, tmp_path):
    folder, _ = exported
    network, spec = load_classifier(folder, "cpu")
    pixels, _ = load_photos(photos / "test", spec, 8)
    model = onnx.load(str(folder / ONNX_NAME))
    (bias,) = [t for t in model.graph.initializer if tuple(t.dims) == (spec.num_classes,)]
    values = onnx.numpy_helper.to_array(bias).copy()
    values[spec.labels.index("Watermelon")] += 0.05  # a small shift: every probability moves a little
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, str(tampered))
    with pytest.raises(StepError, match=r"tampered.onnx does not answer as the PyTorch model on 8 real photos: "
                       r"probabilities differ by up to [0-9.e-]+ \(tolerance 0.0001\)"):  # fmt: skip
        check_onnx(tampered, network, pixels, 5)
    check_onnx(folder / ONNX_NAME, network, pixels, 5)  # the untouched file passes the same check
    broken = tmp_path / "broken.onnx"
    broken.write_bytes((folder / ONNX_NAME).read_bytes()[:5000])
    with pytest.raises(StepError, match="broken.onnx does not run in ONNX Runtime"):
        check_onnx(broken, network, pixels, 5)


def test_auto_serves_int8_only_within_the_bound(exported, tmp_path):
    folder, _ = exported
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    for name in ("model_spec.json", ONNX_NAME, INT8_NAME):
        shutil.copy(folder / name, tmp_path / name)
    check = json.loads((folder / CHECK_NAME).read_text())
    for flipped, expected in ((INT8_MAX_TOP1_FLIPPED, "onnx-int8"), (INT8_MAX_TOP1_FLIPPED + 0.1, "onnx")):
        check["int8"]["top1_flipped_percent"] = flipped
        (tmp_path / CHECK_NAME).write_text(json.dumps(check))
        assert choose_runtime("auto", cpu, OnnxFiles.beside(tmp_path))[0] == expected
    assert choose_runtime("auto", gpu, OnnxFiles.beside(tmp_path))[0] == "torch"
    (tmp_path / CHECK_NAME).unlink()  # int8 never measured: never chosen
    assert choose_runtime("auto", cpu, OnnxFiles.beside(tmp_path))[0] == "onnx"
    (tmp_path / ONNX_NAME).unlink()
    (tmp_path / INT8_NAME).unlink()
    assert choose_runtime("auto", cpu, OnnxFiles.beside(tmp_path)) == (
        "torch",
        "auto: PyTorch (this model has no model.onnx)",
    )
    with pytest.raises(ValueError, match="this model has no model.onnx: register it with --onnx-photos"):
        choose_runtime("onnx", cpu, OnnxFiles.beside(tmp_path))


def test_serve_onnx_without_an_onnx_file_is_one_clear_line(exported, tmp_path, labels):
    folder, _ = exported
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("model_spec.json", "weights.pt"):
        shutil.copy(folder / name, plain / name)
    command = [
        shopvision_exe(),
        "serve",
        "--port",
        str(free_port()),
        "--model",
        str(plain),
        "--runtime",
        "onnx",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "has no model.onnx" in done.stderr and "Traceback" not in done.stderr


def top5(url: str, served_as: str, paths: list[Path]) -> dict[str, list]:
    """(labels, probabilities) per photo through OIP v2 BYTES and /predict multipart."""
    import base64

    body = {
        "inputs": [
            {
                "name": "image",
                "shape": [len(paths)],
                "datatype": "BYTES",
                "data": [base64.b64encode(p.read_bytes()).decode() for p in paths],
            }
        ]
    }
    response = requests.post(f"{url}/v2/models/{served_as}/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text
    out = {o["name"]: o for o in response.json()["outputs"]}
    n, k = out["labels"]["shape"]
    v2 = [
        (out["labels"]["data"][i * k : (i + 1) * k], out["probabilities"]["data"][i * k : (i + 1) * k])
        for i in range(n)
    ]
    files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    response = requests.post(f"{url}/predict", files=files, timeout=60)
    assert response.status_code == 200, response.text
    upload = [
        ([t["label"] for t in p["top"]], [t["probability"] for t in p["top"]])
        for p in response.json()["predictions"]
    ]
    return {"v2": v2, "predict": upload}


def test_registered_onnx_serves_the_torch_answers_and_names_its_runtime(exported, photos, tmp_path):
    folder, _ = exported
    with running_mlflow_server(tmp_path / "mlflow") as (url, _process):
        mlflow.set_tracking_uri(url)
        mlflow.set_experiment("onnx-tests")
        with mlflow.start_run() as run:
            log_classifier(folder, name="model")
        result = register(run.info.run_id, NAME, tracking_uri=url, onnx_photos=photos, quantize="int8")
        assert result.version == "1" and "model.onnx checked on 24 photos" in result.onnx
        tags = mlflow.MlflowClient().get_model_version(NAME, "1").tags
        assert tags["onnx"] == ONNX_NAME and float(tags["onnx_max_probability_difference"]) <= 1e-4
        assert (
            -100 <= float(tags["onnx_int8_top1_change"]) <= 100 and "onnx_int8_top1_flipped_percent" in tags
        )

        common = ["--model", f"models:/{NAME}/1", "--tracking-uri", url, "--max-wait-ms", "2"]
        with (
            serve_process(*common, "--runtime", "onnx", log_path=tmp_path / "onnx.log") as (onnx_url, p1),
            serve_process(*common, "--runtime", "torch", log_path=tmp_path / "torch.log") as (torch_url, p2),
        ):
            wait_ready(onnx_url, p1, tmp_path / "onnx.log", seconds=180)
            wait_ready(torch_url, p2, tmp_path / "torch.log", seconds=180)
            paths = [sorted((photos / "test" / c).glob("*.jpg"))[0] for c in ("Banana", "Kiwi", "Avocado")]
            answers = {"onnx": top5(onnx_url, NAME, paths), "torch": top5(torch_url, NAME, paths)}
            metadata = {
                r: requests.get(f"{u}/v2/models/{NAME}").json()
                for r, u in (("onnx", onnx_url), ("torch", torch_url))
            }
            metrics = {
                r: requests.get(f"{u}/metrics").text for r, u in (("onnx", onnx_url), ("torch", torch_url))
            }

    assert [labels[0] for labels, _ in answers["torch"]["v2"][:2]] == ["Banana", "Kiwi"]  # fitted on these
    for route in ("v2", "predict"):
        for (labels, probs), (ref_labels, ref_probs) in zip(
            answers["onnx"][route], answers["torch"]["v2"], strict=True
        ):
            assert labels == ref_labels, route
            assert np.allclose(probs, ref_probs, atol=1e-4), route
    assert metadata["onnx"]["platform"] == "onnxruntime_onnx" and metadata["torch"]["platform"] == "pytorch"
    assert metadata["onnx"]["parameters"]["runtime"] == "onnx"
    assert metadata["onnx"]["parameters"]["threads_per_pass"] >= 1
    assert metadata["torch"]["parameters"]["runtime"] == "torch"
    for runtime, text in metrics.items():
        info = re.search(r"^shopvision_model_info\{(.*)\} 1.0$", text, re.MULTILINE)
        assert (
            info and f'runtime="{runtime}"' in info.group(1) and re.search(r'threads="[1-9]', info.group(1))
        )
    assert "runtime onnx (" in (tmp_path / "onnx.log").read_text()
