"""The prediction server as it runs: a real `shopvision serve` process on 127.0.0.1, serving
models:/NAME@champion from a real `mlflow server`, asked over HTTP with real product photos.

One registry, one server process and its models serve the whole module (about a minute on 2 cores):
- version 1: a ResNet-18 at 32 px whose classifier layer is fitted to a few sample photos (so answers
  differ from photo to photo and are confident on some), registered with `confidence_threshold` 0.7;
- version 2: one that answers "Watermelon" for everything, promoted while requests flow;
- version 3: a registered version holding no model, promoted to check that the server survives it.
The tests run in file order: the hot-swap tests come last.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
from mlflow_server import free_port, running_mlflow_server
from PIL import Image
from tiny_models import constant_model, fitted_model

from shopvision.components.data.images import decode_image
from shopvision.components.training.models import ModelSpec, eval_transform
from shopvision.components.training.tracking import log_classifier

NAME = "shopvision-serving-test"
SERVED_AS = NAME  # the OIP name defaults to the registered model's name
THRESHOLD = 0.7
MAX_PIXELS = 1_000_000
MAX_BODY_MB = 1
SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "raw"
CATEGORIES = ["Banana", "Kiwi", "Lemon", "Pineapple"]


def photo(category: str, n: int = 1) -> Path:
    return sorted((SAMPLE / category).glob("*.jpg"))[n - 1]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A real MLflow server with version 1 of NAME registered and @champion -> 1."""
    folder = tmp_path_factory.mktemp("registry")
    labels = sorted(p.name for p in SAMPLE.iterdir() if p.is_dir())
    photos = [photo(c, n) for c in CATEGORIES for n in (1, 2, 3)]
    v1 = fitted_model(folder / "v1", labels, photos, [p.parent.name for p in photos], steps=200)
    with running_mlflow_server(folder / "server") as (url, _process):
        mlflow.set_tracking_uri(url)
        # MLflow keeps the active experiment in a global: an earlier module's experiment id does not
        # exist on this server, so name ours explicitly.
        mlflow.set_experiment("serving-tests")
        client = mlflow.MlflowClient()
        register(v1, client)
        client.set_model_version_tag(NAME, "1", "confidence_threshold", str(THRESHOLD))
        client.set_registered_model_alias(NAME, "champion", "1")
        yield {"url": url, "client": client, "folder": folder, "labels": labels, "v1": v1}


def register(model_dir: Path, client) -> str:
    with mlflow.start_run():
        info = log_classifier(model_dir, name="model", registered_model_name=NAME)
    return str(info.registered_model_version)


def wait_ready(url: str, process: subprocess.Popen, log_path: Path, seconds: float = 90) -> None:
    """Until /v2/health/ready answers 200; fails with the server's log when it exits or times out."""
    deadline = time.monotonic() + seconds
    while True:
        assert process.poll() is None, f"serve exited early:\n{log_path.read_text()}"
        assert time.monotonic() < deadline, f"serve not ready:\n{log_path.read_text()}"
        try:
            if requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)


def shopvision_exe() -> str:
    return shutil.which("shopvision", path=str(Path(sys.executable).parent))


@contextmanager
def serve_process(*args: str, log_path: Path):
    """A `shopvision serve` process on a free port, logging to LOG_PATH; yields (url, process) at once
    (callers wait with `wait_ready`, so several servers can start side by side) and stops it after."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [shopvision_exe(), "serve", "--port", str(port), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        yield f"http://127.0.0.1:{port}", process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(registry):
    """`shopvision serve` for models:/NAME@champion, watching the alias every second."""
    log_path = registry["folder"] / "serve.log"
    args = [
        "--model", f"models:/{NAME}@champion",
        "--tracking-uri", registry["url"], "--watch-alias", "1", "--max-wait-ms", "25",
        "--max-batch-size", "16", "--max-pixels", str(MAX_PIXELS), "--max-body-mb", str(MAX_BODY_MB),
    ]  # fmt: skip
    with serve_process(*args, log_path=log_path) as (url, process):
        wait_ready(url, process, log_path)
        yield {"url": url, "log": log_path, "process": process}


def metric(url: str, name: str, labels: str = "") -> float:
    """The value of one series in /metrics (0 when absent)."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    pattern = (
        rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$"
        if labels
        else rf"^{re.escape(name)} ([0-9.e+-]+)$"
    )
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def v2_bytes_request(*paths: Path) -> dict:
    return {
        "inputs": [
            {"name": "image", "shape": [len(paths)], "datatype": "BYTES", "data": [b64(p) for p in paths]}
        ]
    }


def infer(url: str, body, **kwargs) -> requests.Response:
    return requests.post(f"{url}/v2/models/{SERVED_AS}/infer", json=body, timeout=60, **kwargs)


def upload(url: str, *paths: Path) -> requests.Response:
    files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    return requests.post(f"{url}/predict", files=files, timeout=60)


# --- each route ------------------------------------------------------------------------------------


def test_health_metadata_docs_and_metrics_routes(server):
    url = server["url"]
    assert requests.get(f"{url}/v2/health/live").json() == {"live": True}
    assert requests.get(f"{url}/v2/health/ready").json() == {"ready": True}
    assert requests.get(f"{url}/v2").json()["extensions"] == ["binary_tensor_data"]
    assert requests.get(f"{url}/v2/models/{SERVED_AS}/ready").json() == {"name": SERVED_AS, "ready": True}
    assert requests.get(f"{url}/v1/models/{SERVED_AS}").json() == {"name": SERVED_AS, "ready": True}
    meta = requests.get(f"{url}/v2/models/{SERVED_AS}").json()
    assert meta["versions"] == ["1"]
    assert {i["name"]: i["datatype"] for i in meta["inputs"]} == {"image": "BYTES", "pixels": "FP32"}
    assert meta["inputs"][1]["shape"] == [-1, 3, 32, 32]
    assert [o["name"] for o in meta["outputs"]] == ["labels", "probabilities", "confident"]
    assert meta["parameters"]["confidence_threshold"] == THRESHOLD
    assert meta["parameters"]["confidence_threshold_source"] == "model version tag"
    assert len(meta["parameters"]["labels"]) == 12
    docs = requests.get(f"{url}/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = requests.get(f"{url}/openapi.json").json()
    assert {"/predict", "/v2/models/{name}/infer", "/v1/models/{name}:predict"} <= set(spec["paths"])
    assert "InferenceRequest" in spec["components"]["schemas"]
    text = requests.get(f"{url}/metrics").text
    assert 'shopvision_model_info{device="cpu"' in text and 'version="1"' in text
    assert metric(url, "shopvision_model_version") == 1
    # The alias was resolved to a concrete version at start, and the log says so.
    assert f"models:/{NAME}@champion -> version 1" in server["log"].read_text()


def test_the_same_photo_gets_the_same_answer_through_every_route(server, registry):
    url = server["url"]
    paths = [photo("Banana", 1), photo("Kiwi", 2), photo("Pineapple", 3)]
    answers: dict[str, list[tuple[list[str], list[float], bool]]] = {}

    response = upload(url, *paths)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == "1" and body["confidence_threshold"] == THRESHOLD
    assert [p["file"] for p in body["predictions"]] == [p.name for p in paths]
    answers["predict multipart"] = [
        ([t["label"] for t in p["top"]], [t["probability"] for t in p["top"]], p["confident"])
        for p in body["predictions"]
    ]
    answers["predict raw body"] = []
    for path in paths:
        response = requests.post(
            f"{url}/predict", data=path.read_bytes(), headers={"Content-Type": "image/jpeg"}
        )
        top = response.json()["predictions"][0]
        answers["predict raw body"].append(
            ([t["label"] for t in top["top"]], [t["probability"] for t in top["top"]], top["confident"])
        )

    def from_v2(body: dict) -> list:
        out = {o["name"]: o for o in body["outputs"]}
        n, k = out["labels"]["shape"]
        assert out["labels"]["datatype"] == "BYTES" and out["probabilities"]["datatype"] == "FP32"
        labels, probs = out["labels"]["data"], out["probabilities"]["data"]
        return [
            (labels[i * k : (i + 1) * k], probs[i * k : (i + 1) * k], out["confident"]["data"][i])
            for i in range(n)
        ]

    response = infer(url, {"id": "r1", **v2_bytes_request(*paths)})
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "r1" and response.json()["model_version"] == "1"
    answers["v2 BYTES base64"] = from_v2(response.json())

    # Binary tensor data extension: JSON header, then each photo as a 4-byte length and its bytes.
    raw = b"".join(struct.pack("<I", len(p.read_bytes())) + p.read_bytes() for p in paths)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [3],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    response = requests.post(
        f"{url}/v2/models/{SERVED_AS}/infer",
        data=header + raw,
        headers={
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header)),
        },
    )
    assert response.status_code == 200, response.text
    answers["v2 BYTES binary"] = from_v2(response.json())

    # FP32: the client preprocesses with the model's own recipe (spec from the metadata route).
    spec = ModelSpec.from_json((registry["v1"] / "model_spec.json").read_text())
    pixels = np.stack([eval_transform(spec)(decode_image(p.read_bytes()).image).numpy() for p in paths])
    response = infer(
        url,
        {
            "inputs": [
                {
                    "name": "pixels",
                    "shape": list(pixels.shape),
                    "datatype": "FP32",
                    "data": pixels.ravel().tolist(),
                }
            ]
        },
    )
    assert response.status_code == 200, response.text
    answers["v2 FP32 tensor"] = from_v2(response.json())
    response = requests.post(
        f"{url}/v2/models/{SERVED_AS}/infer",
        data=(h := json.dumps({"inputs": [{"name": "pixels", "shape": list(pixels.shape), "datatype": "FP32", "parameters": {"binary_data_size": pixels.nbytes}}]}).encode()) + pixels.astype("<f4").tobytes(),
        headers={"Inference-Header-Content-Length": str(len(h))},
    )  # fmt: skip
    assert response.status_code == 200, response.text
    answers["v2 FP32 binary"] = from_v2(response.json())

    response = requests.post(
        f"{url}/v1/models/{SERVED_AS}:predict",
        json={"instances": [{"image": {"b64": b64(p)}} for p in paths]},
    )
    assert response.status_code == 200, response.text
    answers["v1 predict"] = [
        (p["labels"], p["probabilities"], p["confident"]) for p in response.json()["predictions"]
    ]

    reference = answers["predict multipart"]
    assert [labels[0] for labels, _, _ in reference] == ["Banana", "Kiwi", "Pineapple"]  # fitted on these
    for route, answer in answers.items():
        assert len(answer) == 3, route
        for (labels, probs, confident), (ref_labels, ref_probs, ref_confident) in zip(
            answer, reference, strict=True
        ):
            assert labels == ref_labels, route
            # Batches of different sizes may take different CPU kernels: equal to float rounding.
            assert np.allclose(probs, ref_probs, atol=1e-5), route
            assert confident == ref_confident == (probs[0] >= THRESHOLD), route
            assert len(labels) == 5 and probs == sorted(probs, reverse=True)


def test_concurrent_requests_share_forward_passes(server):
    url = server["url"]
    passes_before = metric(url, "shopvision_forward_passes_total")
    images_before = metric(url, "shopvision_images_total")
    body = v2_bytes_request(photo("Lemon", 4))
    barrier = threading.Barrier(50)

    def one(_):
        barrier.wait()
        return infer(url, body)

    with ThreadPoolExecutor(max_workers=50) as pool:
        responses = list(pool.map(one, range(50)))
    assert [r.status_code for r in responses] == [200] * 50
    answers = [r.json()["outputs"] for r in responses]  # one photo: one answer (to float rounding)
    assert all(a[0]["data"] == answers[0][0]["data"] for a in answers)
    assert all(np.allclose(a[1]["data"], answers[0][1]["data"], atol=1e-5) for a in answers)
    passes = metric(url, "shopvision_forward_passes_total") - passes_before
    assert metric(url, "shopvision_images_total") - images_before == 50
    assert passes < 50, f"{passes:g} forward passes for 50 concurrent requests: no batching"
    assert metric(url, "shopvision_batch_size_bucket", '{le="1.0"}') < metric(
        url, "shopvision_batch_size_count"
    )


# --- bad input -------------------------------------------------------------------------------------


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def bad_requests(url: str) -> list[tuple[str, int, Callable[[], requests.Response]]]:
    jpeg = photo("Banana").read_bytes()
    truncated = jpeg[: len(jpeg) // 3]
    huge = png_bytes(1200, 1000)  # 1.2 million pixels, over --max-pixels, a few kB as PNG
    infer_url = f"{url}/v2/models/{SERVED_AS}/infer"
    json_headers = {"Content-Type": "application/json"}

    def v2_of(data: bytes) -> dict:
        return {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1],
                    "datatype": "BYTES",
                    "data": [base64.b64encode(data).decode()],
                }
            ]
        }

    def post(path: str, **kwargs):
        return lambda: requests.post(f"{url}{path}", timeout=60, **kwargs)

    return [
        ("upload: not an image", 415, post("/predict", files={"file": ("notes.txt", b"just some text\n" * 20)})),
        ("upload: truncated JPEG", 400, post("/predict", files={"file": ("cut.jpg", truncated)})),
        ("upload: too many pixels", 413, post("/predict", files={"file": ("huge.png", huge)})),
        ("upload: empty file", 400, post("/predict", files={"file": ("empty.jpg", b"")})),
        ("upload: no file field", 400, post("/predict", files={"x": (None, "text only")})),
        ("upload: wrong content type", 415, post("/predict", json={"image": "x"})),
        ("upload: body too large", 413, post("/predict", files={"file": ("big.jpg", os.urandom(MAX_BODY_MB * 2**20 + 1000))})),
        ("v2: not an image", 415, lambda: infer(url, v2_of(b"GIF? no, plain text"))),
        ("v2: truncated", 400, lambda: infer(url, v2_of(truncated))),
        ("v2: too many pixels", 413, lambda: infer(url, v2_of(huge))),
        ("v2: not base64", 400, lambda: infer(url, {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]})),
        ("v2: shape and data disagree", 400, lambda: infer(url, {**v2_of(jpeg), "inputs": [{**v2_of(jpeg)["inputs"][0], "shape": [2]}]})),
        ("v2: FP32 of the wrong size", 400, lambda: infer(url, {"inputs": [{"name": "pixels", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.0] * 192}]})),
        ("v2: FP32 not numbers", 400, lambda: infer(url, {"inputs": [{"name": "pixels", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": ["a"] * 3072}]})),
        ("v2: unknown datatype", 400, lambda: infer(url, {"inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": [1]}]})),
        ("v2: unknown output", 400, lambda: infer(url, {**v2_of(jpeg), "outputs": [{"name": "logits"}]})),
        ("v2: malformed JSON", 400, lambda: requests.post(infer_url, data=b'{"inputs": [', headers=json_headers)),
        ("v2: JSON of the wrong shape", 422, lambda: infer(url, {"input": []})),
        ("v2: wrong content type", 415, lambda: requests.post(infer_url, data=b"inputs=1", headers={"Content-Type": "text/plain"})),
        ("v2: bad binary header length", 400, lambda: requests.post(infer_url, data=b"{}", headers={"Inference-Header-Content-Length": "99"})),
        ("v2: body too large", 413, lambda: requests.post(infer_url, data=b" " * (MAX_BODY_MB * 2**20 + 1), headers=json_headers)),
        ("v2: unknown model", 404, lambda: requests.post(f"{url}/v2/models/nope/infer", json=v2_of(jpeg))),
        ("v2: unknown model metadata", 404, lambda: requests.get(f"{url}/v2/models/nope")),
        ("v1: malformed JSON", 400, post(f"/v1/models/{SERVED_AS}:predict", data=b"{", headers=json_headers)),
        ("v1: wrong shape", 422, post(f"/v1/models/{SERVED_AS}:predict", json={"instances": [{"b64": "x"}]})),
        ("v1: not an image", 415, post(f"/v1/models/{SERVED_AS}:predict", json={"instances": [{"image": {"b64": base64.b64encode(b"hello").decode()}}]})),
        ("v1: unknown model", 404, post("/v1/models/nope:predict", json={"instances": [{"image": {"b64": ""}}]})),
        ("unknown route", 404, lambda: requests.get(f"{url}/v3/whatever")),
        ("wrong method", 405, lambda: requests.get(infer_url)),
    ]  # fmt: skip


def test_every_bad_input_gets_a_4xx_with_a_message_and_the_server_stays_up(server):
    url = server["url"]
    failures = []
    for what, status, send in bad_requests(url):
        response = send()
        message = (
            response.json().get("error")
            if response.headers.get("content-type", "").startswith("application/json")
            else None
        )
        if response.status_code != status or not message:
            failures.append(
                f"{what}: expected {status} with an error message, got {response.status_code} {response.text[:200]}"
            )
    assert not failures, "\n".join(failures)
    assert 'shopvision_request_errors_total{code="5' not in requests.get(f"{url}/metrics").text
    assert server["process"].poll() is None
    assert requests.get(f"{url}/v2/health/ready").status_code == 200
    response = upload(url, photo("Banana"))
    assert response.status_code == 200 and response.json()["predictions"][0]["top"][0]["label"] == "Banana"


def test_a_model_that_cannot_be_served_is_one_clear_line_not_a_traceback(registry, tmp_path):
    def serve(*args: str) -> subprocess.CompletedProcess:
        command = [
            shopvision_exe(),
            "serve",
            "--port",
            str(free_port()),
            "--tracking-uri",
            registry["url"],
            *args,
        ]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    done = serve("--model", f"models:/{NAME}@no-such-alias")
    assert done.returncode == 2 and "cannot resolve" in done.stderr and "Traceback" not in done.stderr
    done = serve("--model", str(tmp_path), "--watch-alias", "5")
    assert done.returncode == 2 and "--watch-alias needs" in done.stderr
    done = serve("--model", str(tmp_path))
    assert done.returncode == 2 and "holds no model" in done.stderr and "Traceback" not in done.stderr


# --- hot swap ----------------------------------------------------------------------------------------


def test_promoting_a_new_champion_swaps_without_a_failed_request(server, registry):
    url, client = server["url"], registry["client"]
    v2 = constant_model(registry["folder"] / "v2", registry["labels"], "Watermelon")
    assert register(v2, client) == "2"
    seen: list[tuple[str, str]] = []  # (version, top label) in the order answered
    failed: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        body = v2_bytes_request(photo("Kiwi", 2))
        while not stop.is_set():
            try:
                response = infer(url, body)
            except requests.RequestException as exc:
                failed.append(repr(exc))
                continue
            if response.status_code != 200:
                failed.append(f"{response.status_code} {response.text[:200]}")
                continue
            seen.append((response.json()["model_version"], response.json()["outputs"][0]["data"][0]))

    clients = [threading.Thread(target=traffic) for _ in range(4)]
    for thread in clients:
        thread.start()
    try:
        time.sleep(1.0)
        client.set_registered_model_alias(NAME, "champion", "2")
        deadline = time.monotonic() + 60
        while not (seen and seen[-1][0] == "2") and time.monotonic() < deadline and not failed:
            time.sleep(0.2)
        time.sleep(1.0)  # keep requests flowing on the new version for a moment
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=60)
    assert not failed, failed[:3]
    versions = [v for v, _ in seen]
    assert versions[0] == "1" and versions[-1] == "2", f"versions answered: {versions}"
    switch = versions.index("2")
    assert set(versions[switch:]) == {"2"}, "a request went back to the old version after the swap"
    assert {label for v, label in seen if v == "1"} == {"Kiwi"}
    assert {label for v, label in seen if v == "2"} == {"Watermelon"}
    assert metric(url, "shopvision_model_swaps_total") == 1
    assert metric(url, "shopvision_model_version") == 2
    assert requests.get(f"{url}/v2/models/{SERVED_AS}").json()["versions"] == ["2"]
    # Version 2 has no confidence_threshold tag and none in its spec: the default applies.
    assert requests.get(f"{url}/v2/models/{SERVED_AS}").json()["parameters"]["confidence_threshold"] == 0.5


def test_a_champion_that_cannot_load_leaves_the_old_one_serving(server, registry):
    url, client = server["url"], registry["client"]
    with mlflow.start_run() as run:
        mlflow.log_text("not a model\n", "junk/README.txt")
    version = client.create_model_version(
        NAME, source=f"{run.info.artifact_uri}/junk", run_id=run.info.run_id
    )
    client.set_registered_model_alias(NAME, "champion", version.version)
    deadline = time.monotonic() + 30
    while metric(url, "shopvision_model_swap_failures_total") < 1 and time.monotonic() < deadline:
        response = upload(url, photo("Kiwi"))
        assert response.status_code == 200 and response.json()["model_version"] == "2"
        time.sleep(0.3)
    assert metric(url, "shopvision_model_swap_failures_total") >= 1
    assert metric(url, "shopvision_model_version") == 2
    assert requests.get(f"{url}/v2/health/ready").status_code == 200
    assert f"version {version.version} of {NAME} could not be loaded" in server["log"].read_text()
    client.set_registered_model_alias(NAME, "champion", "2")  # roll the alias back


# --- in-process pieces: the batcher and the GPU code path's autocast, on the CPU ----------------------


class RecordingModel:
    """Stands in for a PhotoClassifier: remembers each batch it ran and answers its own name."""

    def __init__(self, name: str, seconds: float = 0.0) -> None:
        self.name, self.seconds, self.batches = name, seconds, []

    def predict(self, batch):
        self.batches.append(len(batch))
        time.sleep(self.seconds)
        return [self.name] * len(batch)


def test_batcher_fills_batches_up_to_the_limit_and_never_mixes_models():
    import asyncio

    import torch

    from shopvision.serving.batcher import DynamicBatcher

    async def scenario():
        batcher = DynamicBatcher(max_batch_size=4, max_wait_ms=50)
        batcher.start()
        old, new = RecordingModel("old", 0.05), RecordingModel("new")
        photo_tensor = torch.zeros(3, 2, 2)
        # 10 single-photo requests for the old model and 3 for the new one, all at once.
        answers = await asyncio.gather(
            *(batcher.submit(old, [photo_tensor]) for _ in range(10)),
            *(batcher.submit(new, [photo_tensor]) for _ in range(3)),
            batcher.submit(old, [photo_tensor] * 3),  # one request, three photos
        )
        await batcher.stop()
        return answers, old.batches, new.batches

    answers, old_batches, new_batches = asyncio.run(scenario())
    assert answers[:10] == [["old"]] * 10 and answers[10:13] == [["new"]] * 3 and answers[13] == ["old"] * 3
    assert sum(old_batches) == 13 and sum(new_batches) == 3
    assert max(old_batches + new_batches) <= 4 and len(old_batches) < 13


def test_a_lone_photo_waits_at_most_max_wait():
    import asyncio

    import torch

    from shopvision.serving.batcher import DynamicBatcher

    async def scenario():
        batcher = DynamicBatcher(max_batch_size=32, max_wait_ms=30)
        batcher.start()
        started = time.perf_counter()
        await batcher.submit(RecordingModel("m"), [torch.zeros(1)])
        elapsed = time.perf_counter() - started
        await batcher.stop()
        return elapsed

    assert 0.025 <= asyncio.run(scenario()) < 1.0


def test_reduced_precision_path_gives_the_fp32_answers(registry):
    """The GPU's autocast path (here bf16 on the CPU) picks the same top category as fp32."""
    import torch

    from shopvision.serving.model import PhotoClassifier

    fp32 = PhotoClassifier(registry["v1"], device="cpu", precision="fp32")
    bf16 = PhotoClassifier(registry["v1"], device="cpu", precision="bf16")
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    batch = torch.stack([fp32.preprocess(photo(c, 2).read_bytes()) for c in CATEGORIES])
    assert (
        [p.labels[0] for p in bf16.predict(batch)] == [p.labels[0] for p in fp32.predict(batch)] == CATEGORIES
    )
    for a, b in zip(bf16.predict(batch), fp32.predict(batch), strict=True):
        assert abs(a.probabilities[0] - b.probabilities[0]) < 0.05
