"""MLflow helpers against a real `mlflow server` (SQLite store, proxied artifacts) and real photos.

One server and one logged model serve the whole module: a ResNet-18 with 3 categories at 32 px,
random weights (what is checked is that the logged model gives the same answers as the saved one).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest
import torch
from mlflow_server import free_port, running_mlflow_server

from shopvision.components.data.fingerprint import data_fingerprint
from shopvision.components.data.images import decode_image
from shopvision.components.errors import StepError
from shopvision.components.training.model_source import resolve_model_dir
from shopvision.components.training.models import (
    ModelSpec,
    build_model,
    eval_transform,
    load_classifier,
    save_classifier,
)
from shopvision.components.training.tracking import check_tracking_server, log_classifier

LABELS = ["Avocado", "Banana", "Kiwi"]
REGISTERED = "shopvision-test"
SAMPLE_RAW = Path(__file__).resolve().parents[1] / "data" / "sample" / "raw"
PHOTOS = [sorted((SAMPLE_RAW / category).glob("*.jpg"))[0] for category in ("Avocado", "Kiwi")]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    previous = mlflow.get_tracking_uri()
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow")) as (url, _process):
        mlflow.set_tracking_uri(url)
        try:
            yield url
        finally:
            mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def logged(tracking_server, tmp_path_factory):
    spec = ModelSpec(arch="resnet18", labels=LABELS, image_size=32)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    model_dir = tmp_path_factory.mktemp("model") / "model_best"
    save_classifier(model_dir, model, spec)
    mlflow.set_experiment("test-tracking")
    with mlflow.start_run() as run:
        info = log_classifier(model_dir, registered_model_name=REGISTERED)
    return SimpleNamespace(info=info, run_id=run.info.run_id, model=model, spec=spec, model_dir=model_dir)


def expected_top_k(model, spec, photo: Path) -> tuple[list[str], list[float]]:
    image = decode_image(photo.read_bytes()).image
    with torch.inference_mode():
        probs = torch.softmax(model(eval_transform(spec)(image)[None]), dim=1)[0]
    top = probs.topk(len(spec.labels))
    return [spec.labels[i] for i in top.indices], top.values.tolist()


def test_logged_model_predicts_top_k_for_real_photos(logged):
    pyfunc = mlflow.pyfunc.load_model(logged.info.model_uri)
    out = pyfunc.predict(pd.DataFrame({"image": [b64(p.read_bytes()) for p in PHOTOS]}))

    assert list(out.columns) == ["label_1", "label_2", "label_3", "prob_1", "prob_2", "prob_3"]
    assert len(out) == 2
    for row, photo in zip(out.itertuples(index=False), PHOTOS, strict=True):
        labels, probs = list(row[:3]), list(row[3:])
        assert sorted(labels) == sorted(LABELS)
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        want_labels, want_probs = expected_top_k(logged.model, logged.spec, photo)
        assert labels == want_labels
        assert probs == pytest.approx(want_probs, abs=1e-5)


def test_predict_accepts_raw_bytes_and_names_a_bad_row(logged):
    pyfunc = mlflow.pyfunc.load_model(logged.info.model_uri)
    photo = PHOTOS[0].read_bytes()
    assert len(pyfunc.predict(pd.DataFrame({"image": [photo]}))) == 1
    with pytest.raises(ValueError, match=r"row 1: not a usable image \(not_an_image"):
        pyfunc.predict(pd.DataFrame({"image": [b64(photo), b64(b"<html>not a photo</html>")]}))
    with pytest.raises(ValueError, match="row 0: `image` is not valid base64"):
        pyfunc.predict(pd.DataFrame({"image": ["%%%"]}))


def test_logged_model_is_code_and_weights_not_a_pickle(logged):
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=logged.info.model_uri))
    names = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert not any(name.endswith((".pkl", ".pickle")) for name in names)
    assert {
        "pyfunc_model.py",
        "artifacts/classifier/model_spec.json",
        "artifacts/classifier/weights.pt",
    } <= names
    assert "python_model.pkl" not in names
    flavor = logged.info.flavors["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert logged.info.signature.inputs.input_names() == ["image"]
    example = json.loads((local / "serving_input_example.json").read_text())
    assert decode_image(base64.b64decode(example["dataframe_split"]["data"][0][0])).source_format == "JPEG"


def test_a_model_logged_before_the_stage_folders_still_loads(logged, tracking_server, tmp_path, monkeypatch):
    """A registry keeps each version's own pyfunc_model.py; one logged before components/ had stage
    folders imports the flat components.tracking, .models and .images, and must still load and
    predict in a fresh process, as `mlflow models serve` loads it."""
    from shopvision.components.training import tracking

    old = tracking.PYFUNC_CODE.read_text(encoding="utf-8")
    for flat, staged in [
        ("tracking", "training.tracking"),
        ("models", "training.models"),
        ("images", "data.images"),
    ]:
        assert f"shopvision.components.{staged} import" in old
        old = old.replace(f"shopvision.components.{staged} import", f"shopvision.components.{flat} import")
    code = tmp_path / "pyfunc_model.py"
    code.write_text(old, encoding="utf-8")
    monkeypatch.setattr(tracking, "PYFUNC_CODE", code)
    with mlflow.start_run():
        info = log_classifier(logged.model_dir)
    script = (
        "import base64, sys, mlflow, pandas as pd\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "print(model.predict(pd.DataFrame({'image': [base64.b64encode(open(sys.argv[2], 'rb').read()).decode()]}))"
        ".iloc[0]['label_1'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, info.model_uri, str(PHOTOS[0])],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_server},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == expected_top_k(logged.model, logged.spec, PHOTOS[0])[0][0]


@pytest.mark.parametrize("form", ["logged model", "run artifact", "registered version"])
def test_resolve_model_dir_rebuilds_the_same_network(logged, form):
    uri = {
        "logged model": logged.info.model_uri,  # models:/m-<id>
        "run artifact": f"runs:/{logged.run_id}/model",
        "registered version": f"models:/{REGISTERED}/{logged.info.registered_model_version}",
    }[form]
    model, spec = load_classifier(resolve_model_dir(uri))
    assert spec == logged.spec
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(model(images), logged.model(images))


def test_log_classifier_needs_an_active_run(logged):
    with pytest.raises(StepError, match="active MLflow run"):
        log_classifier(logged.model_dir)


def test_check_tracking_server_passes_for_the_live_server(tracking_server):
    assert check_tracking_server(tracking_server) == tracking_server


def test_check_tracking_server_fails_fast_on_a_closed_port():
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(StepError, match=r"is not reachable: .*refused.* start it or set MLFLOW_TRACKING_URI"):
        check_tracking_server(url)
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("stage", ["connect", "reply"])
def test_check_tracking_server_fails_fast_when_nothing_answers(stage):
    # A socket that listens but never accepts. "reply": the connection is made, no answer comes (a hung
    # server). "connect": its one-slot backlog is already full, so Linux drops our SYNs and the connect
    # itself hangs, as for a non-routable host (here outbound traffic is intercepted, so 10.255.255.1
    # answers at once and cannot stand in for one).
    with socket.socket() as silent, socket.socket() as first:
        silent.bind(("127.0.0.1", 0))
        silent.listen(0)
        if stage == "connect":
            first.connect(silent.getsockname())
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(StepError, match="is not reachable: .*timed out"):
            check_tracking_server(url, timeout=1.0)
        assert time.monotonic() - start < 3


def test_check_tracking_server_explains_a_host_the_server_refuses(tracking_server):
    # 127.1 reaches 127.0.0.1, but the server's Host check only allows its own names.
    port = tracking_server.rsplit(":", 1)[1]
    with pytest.raises(StepError, match=r"HTTP 403\): add '127.1:\*' to the server's --allowed-hosts"):
        check_tracking_server(f"http://127.1:{port}")


def test_check_tracking_server_checks_local_stores(tmp_path, monkeypatch):
    assert check_tracking_server(f"sqlite:///{tmp_path}/mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(StepError, match="does not exist"):
        check_tracking_server(f"sqlite:///{tmp_path}/missing/mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    assert check_tracking_server() == (tmp_path / "mlruns").as_uri()


def test_data_fingerprint_follows_the_bytes_not_the_place(tmp_path):
    for root in (tmp_path / "a", tmp_path / "b"):
        for photo in PHOTOS:
            (root / photo.parent.name).mkdir(parents=True)
            (root / photo.parent.name / photo.name).write_bytes(photo.read_bytes())
    first = data_fingerprint(tmp_path / "a")
    assert data_fingerprint(tmp_path / "a") == first == data_fingerprint(tmp_path / "b")

    changed = next((tmp_path / "b").rglob("*.jpg"))
    data = bytearray(changed.read_bytes())
    data[len(data) // 2] ^= 0x01
    changed.write_bytes(bytes(data))
    assert data_fingerprint(tmp_path / "b") != first


def test_mlflow_models_serve_answers_with_the_registered_model(logged, tracking_server, tmp_path):
    mlflow.MlflowClient().set_registered_model_alias(
        REGISTERED, "champion", logged.info.registered_model_version
    )
    bin_dir = Path(sys.executable).parent
    port = free_port()
    env = dict(
        os.environ, MLFLOW_TRACKING_URI=tracking_server, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    )
    command = [str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{REGISTERED}@champion"]
    command += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                time.sleep(0.3)
        body = {"dataframe_split": {"columns": ["image"], "data": [[b64(PHOTOS[1].read_bytes())]]}}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            prediction = json.load(response)["predictions"][0]
        want_labels, want_probs = expected_top_k(logged.model, logged.spec, PHOTOS[1])
        assert [prediction[f"label_{i}"] for i in (1, 2, 3)] == want_labels
        assert [prediction[f"prob_{i}"] for i in (1, 2, 3)] == pytest.approx(want_probs, abs=1e-5)
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the serve command's group: it and its uvicorn worker
        server.wait(timeout=30)
