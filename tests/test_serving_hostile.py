"""The prediction server against hostile and careless requests (issue 13): real `shopvision serve`
processes on 127.0.0.1, asked over HTTP and raw sockets.

Two servers start side by side:
- `hostile`: a folder model (ResNet-18 at 32 px fitted to a few sample photos) with a similar-photo
  index and small limits, for the per-request bounds: photos per request on every route, pixels and
  aspect ratio of one photo, the JSON budget, and a table of malformed requests. Afterwards it must be
  ready, classify a real photo correctly, and its peak resident memory (VmHWM in /proc) must have
  grown by less than MEMORY_BOUND_MIB over what it held before the first hostile request.
- `bounded`: the same model from an MLflow registry as models:/NAME@champion (a file store: it opens
  in a second, where a fresh SQLite database takes ~10 s of migrations on 2 cores), for the model name
  default and the bounds shared by requests: the queue, the request deadline, `--max-concurrency` and
  uvicorn's `--max-connections`. A long `--max-wait-ms` keeps photos waiting for a forward pass until
  their batch is full, so requests stay in progress exactly as long as the test needs.
Plus in-process checks of the decoder's per-call pixel limit under parallel threads and of the CPU
quota read from cgroup files.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import mlflow
import pytest
import requests
from PIL import Image
from test_serving import metric, png_bytes, serve_process, wait_ready
from tiny_models import fitted_model

from shopvision.components.data.images import ImageDecodeError, decode_image
from shopvision.components.similarity.features import extract_features

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "raw"
CATEGORIES = ["Banana", "Kiwi", "Lemon", "Pineapple"]
NAME = "shopvision-hostile-test"  # the registered model `bounded` serves
MAX_PHOTOS = 8
MAX_PIXELS = 1_000_000
MAX_ASPECT = 10
MAX_BODY_MB = 4
JSON_BUDGET_MB = 32
MEMORY_BOUND_MIB = 200  # peak resident growth of `hostile` over all the hostile requests
TIMEOUT_S = 3  # `bounded`'s --request-timeout
BATCH = 4  # `bounded`'s --max-batch-size, --max-queue, --max-photos and --max-concurrency
CONNECTIONS = 12  # `bounded`'s --max-connections (uvicorn's limit_concurrency)


def photo(category: str, n: int = 1) -> Path:
    return sorted((SAMPLE / category).glob("*.jpg"))[n - 1]


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("hostile")
    labels = sorted(p.name for p in SAMPLE.iterdir() if p.is_dir())
    fitted = [photo(c, n) for c in CATEGORIES for n in (1, 2, 3)]
    model = fitted_model(folder / "model", labels, fitted, [p.parent.name for p in fitted], steps=200)
    catalogue = folder / "catalogue"
    for category in CATEGORIES:
        (catalogue / category).mkdir(parents=True)
        shutil.copyfile(photo(category), catalogue / category / photo(category).name)
    extract_features(model, catalogue, folder / "index", device="cpu", show_progress=False)
    hostile_args = [
        "--model", str(model), "--device", "cpu", "--similar-index", str(folder / "index"),
        "--max-photos", str(MAX_PHOTOS), "--max-pixels", str(MAX_PIXELS), "--max-aspect-ratio",
        str(MAX_ASPECT), "--max-body-mb", str(MAX_BODY_MB), "--json-budget-mb", str(JSON_BUDGET_MB),
        "--max-queue", "64", "--decode-threads", "2",
    ]  # fmt: skip
    with ExitStack() as stack:
        logs = {"hostile": folder / "hostile.log", "bounded": folder / "bounded.log"}
        hostile = stack.enter_context(serve_process(*hostile_args, log_path=logs["hostile"]))
        # The registry is made while `hostile` starts. Its version's source is the model folder.
        store = f"file://{folder / 'mlruns'}"
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        patch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this process and the server
        # The file registry reads versions through a default MlflowClient(), so the global tracking
        # URI must be the store too (else it creates ./mlflow.db); the previous one is put back.
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(store)
        try:
            client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
            client.create_registered_model(NAME)
            version = client.create_model_version(NAME, source=str(model))
            client.set_registered_model_alias(NAME, "champion", version.version)
        finally:
            mlflow.set_tracking_uri(previous)
        bounded_args = [
            "--model", f"models:/{NAME}@champion", "--tracking-uri", store, "--device", "cpu",
            "--max-batch-size", str(BATCH), "--max-wait-ms", "60000", "--max-queue", str(BATCH),
            "--max-photos", str(BATCH), "--max-concurrency", str(BATCH), "--max-connections",
            str(CONNECTIONS), "--request-timeout", str(TIMEOUT_S),
        ]  # fmt: skip
        bounded = stack.enter_context(serve_process(*bounded_args, log_path=logs["bounded"]))
        wait_ready(*hostile, logs["hostile"])
        wait_ready(*bounded, logs["bounded"])
        yield {
            "hostile": {"url": hostile[0], "process": hostile[1], "log": logs["hostile"]},
            "bounded": {"url": bounded[0], "process": bounded[1], "log": logs["bounded"]},
            "folder": folder,
        }


@pytest.fixture(scope="module")
def memory(servers) -> dict:
    """`hostile`'s resident memory before the first hostile request, after one good one; the peak
    (VmHWM) is reset there when the kernel allows it, so it measures the hostile requests only."""
    url, pid = servers["hostile"]["url"], servers["hostile"]["process"].pid
    assert top_label(upload(url, photo("Banana", 2))) == "Banana"
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    return {"pid": pid, "rss": proc_status(pid)["VmRSS"], "peak": proc_status(pid)["VmHWM"]}


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


# --- requests ------------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def v2_bytes(*blobs: bytes, shape: list[int] | None = None) -> dict:
    data = [b64(b) for b in blobs]
    return {"inputs": [{"name": "image", "shape": shape or [len(data)], "datatype": "BYTES", "data": data}]}


def infer(url: str, body=None, name: str = "shopvision", **kwargs) -> requests.Response:
    return requests.post(f"{url}/v2/models/{name}/infer", json=body, timeout=60, **kwargs)


def binary_infer(url: str, header: dict, raw: bytes, name: str = "shopvision") -> requests.Response:
    head = json.dumps(header).encode()
    return requests.post(
        f"{url}/v2/models/{name}/infer",
        data=head + raw,
        headers={
            "Inference-Header-Content-Length": str(len(head)),
            "Content-Type": "application/octet-stream",
        },
        timeout=60,
    )


def upload(url: str, *blobs: bytes | Path, route: str = "/predict") -> requests.Response:
    files = [
        ("file", (f"photo{i}.jpg", b.read_bytes() if isinstance(b, Path) else b)) for i, b in enumerate(blobs)
    ]
    return requests.post(f"{url}{route}", files=files, timeout=60)


def top_label(response: requests.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["predictions"][0]["top"][0]["label"]


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width×height and holds no pixel data: what a decompression bomb looks like
    to the size check (the pixels would only be allocated on load)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


LEAK_MARKERS = ("Traceback", "site-packages", "/tmp/", "Error:", "PIL", "torch", 'File "')


def refused(response: requests.Response, status: int, *words: str) -> str | None:
    """None when the answer is `status` with a JSON error message naming `words` and nothing of the
    server's internals; else what is wrong."""
    text = response.text
    is_json = response.headers.get("content-type", "").startswith("application/json")
    message = response.json().get("error") if is_json else None
    if response.status_code != status or not message:
        return f"expected {status} with a JSON error, got {response.status_code} {text[:200]}"
    if missing := [w for w in words if w not in message]:
        return f"the message does not name {missing}: {message[:200]}"
    if leaked := [m for m in LEAK_MARKERS if m in text]:
        return f"the answer shows {leaked}: {text[:200]}"
    return None


# --- one cap on photos per request, checked before decoding ---------------------------------------


def test_every_route_caps_photos_per_request_before_decoding(servers, memory):
    url = servers["hostile"]["url"]
    tiny = png_bytes(1, 1)
    many = [tiny] * 20_000  # the request: ~2 MB of base64, under the body limit
    nine = [photo("Kiwi").read_bytes()] * (MAX_PHOTOS + 1)
    pixels = struct.pack("<f", 0.0) * (3 * 32 * 32)
    started = time.perf_counter()
    cases = {
        "v2 BYTES JSON, 20,000 photos": infer(url, v2_bytes(*many)),
        "v2 BYTES JSON, shape understates the data": infer(url, v2_bytes(*nine, shape=[1])),
        "v2 BYTES JSON, shape of 10^20 photos": infer(url, v2_bytes(tiny, shape=[10**20])),
        "v2 BYTES binary, 9 photos": binary_infer(
            url,
            {"inputs": [{"name": "image", "shape": [9], "datatype": "BYTES", "parameters": {"binary_data_size": 9 * (4 + len(tiny))}}]},
            b"".join(struct.pack("<I", len(tiny)) + tiny for _ in range(9)),
        ),
        "v2 FP32 JSON, 9 photos": infer(url, {"inputs": [{"name": "pixels", "shape": [9, 3, 32, 32], "datatype": "FP32", "data": [0.0]}]}),
        "v2 FP32 binary, 9 photos": binary_infer(
            url,
            {"inputs": [{"name": "pixels", "shape": [9, 3, 32, 32], "datatype": "FP32", "parameters": {"binary_data_size": 9 * len(pixels)}}]},
            pixels * 9,
        ),
        "v1, 20,000 instances": requests.post(
            f"{url}/v1/models/shopvision:predict", json={"instances": [{"image": {"b64": b64(tiny)}}] * 20_000}, timeout=60
        ),
        "/predict, 9 files": upload(url, *nine),
        "/similar, 9 files": upload(url, *nine, route="/similar"),
    }  # fmt: skip
    elapsed = time.perf_counter() - started
    failures = [
        f"{what}: {why}"
        for what, r in cases.items()
        if (why := refused(r, 413, str(MAX_PHOTOS), "--max-photos"))
    ]
    assert not failures, "\n".join(failures)
    # Nothing was decoded: nine refusals of up to 20,000 photos took less than two forward passes.
    assert elapsed < 10, f"{elapsed:.1f} s to refuse"
    assert metric(url, "shopvision_images_total") <= 1  # only the `memory` fixture's photo
    # At the cap, every route answers.
    eight = [photo("Kiwi").read_bytes()] * MAX_PHOTOS
    response = infer(url, v2_bytes(*eight))
    assert response.status_code == 200 and response.json()["outputs"][0]["shape"] == [MAX_PHOTOS, 5]
    assert upload(url, *eight).status_code == 200


def test_one_photo_costs_bounded_memory_whatever_its_shape(servers, memory):
    url = servers["hostile"]["url"]
    thin, wide = png_bytes(1, 900_000), png_bytes(900_000, 1)  # 0.9 Mpx, under the pixel limit
    # Without an aspect-ratio bound, preprocessing (shorter side to 36 px) would make the thin one
    # 36 × 32.4 million pixels: 3.5 GB as bytes, four times that as floats.
    failures = []
    for what, response in {
        "v2 thin": infer(url, v2_bytes(thin)),
        "v2 wide": infer(url, v2_bytes(wide)),
        "v1 thin": requests.post(f"{url}/v1/models/shopvision:predict", json={"instances": [{"image": {"b64": b64(thin)}}]}, timeout=60),
        "/predict wide": upload(url, wide),
        "/predict raw body thin": requests.post(f"{url}/predict", data=thin, headers={"Content-Type": "image/png"}, timeout=60),
        "/similar thin": upload(url, thin, route="/similar"),
    }.items():  # fmt: skip
        if why := refused(response, 422, "aspect-ratio", "--max-aspect-ratio"):
            failures.append(f"{what}: {why}")
    for what, response in {
        "pixels over the limit": infer(url, v2_bytes(png_bytes(1200, 1000))),
        "header claiming 12000x12000 (Pillow only warns)": infer(url, v2_bytes(png_header(12_000, 12_000))),
        "header claiming 20000x20000 (Pillow refuses)": infer(url, v2_bytes(png_header(20_000, 20_000))),
        "/similar, pixels over the limit": upload(url, png_bytes(1200, 1000), route="/similar"),
    }.items():  # fmt: skip
        if why := refused(response, 413, "pixels", "--max-pixels"):
            failures.append(f"{what}: {why}")
    assert not failures, "\n".join(failures)
    # At the limit, a thin photo is answered (and costs 36 × 360 pixels once resized).
    assert infer(url, v2_bytes(png_bytes(MAX_ASPECT, 1))).status_code == 200
    assert proc_status(memory["pid"])["VmHWM"] - memory["rss"] < MEMORY_BOUND_MIB * 2**20


def test_parsed_json_is_counted_against_the_json_budget(servers, memory):
    url = servers["hostile"]["url"]
    # ~1 million floats in 4 MiB of JSON: ~70 MB once parsed, over the 32 MiB budget: refused unparsed.
    values = (MAX_BODY_MB * 2**20 - 200) // 4
    body = b'{"inputs":[{"name":"pixels","shape":[1,3,32,32],"datatype":"FP32","data":[' + b"0.0," * (values - 1) + b"0.0]}]}"  # fmt: skip
    response = requests.post(
        f"{url}/v2/models/shopvision/infer",
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert (why := refused(response, 413, "--json-budget-mb", "binary")) is None, why
    # A real FP32 request (one preprocessed photo) fits and answers what the photo's bytes answer.
    from shopvision.components.training.models import ModelSpec, eval_transform

    spec = ModelSpec.from_json((servers["folder"] / "model" / "model_spec.json").read_text())
    pixels = eval_transform(spec)(decode_image(photo("Lemon", 2).read_bytes()).image).numpy()
    tensor = {
        "name": "pixels",
        "shape": [1, *pixels.shape],
        "datatype": "FP32",
        "data": pixels.ravel().tolist(),
    }
    as_floats = infer(url, {"inputs": [tensor]})
    as_bytes = infer(url, v2_bytes(photo("Lemon", 2).read_bytes()))
    assert as_floats.status_code == 200 and as_bytes.status_code == 200, as_floats.text
    assert as_floats.json()["outputs"][0]["data"] == as_bytes.json()["outputs"][0]["data"]
    assert as_floats.json()["outputs"][0]["data"][0] == "Lemon"
    assert metric(url, "shopvision_json_budget_used_bytes") == 0


def test_malformed_requests_get_a_clear_4xx_and_nothing_of_the_internals(servers, memory):
    url = servers["hostile"]["url"]
    infer_url = f"{url}/v2/models/shopvision/infer"
    as_json = {"Content-Type": "application/json"}
    jpeg = photo("Banana").read_bytes()

    def post(body: bytes, headers: dict | None = None) -> requests.Response:
        return requests.post(infer_url, data=body, headers=headers or as_json, timeout=60)

    def pixels_input(**fields) -> dict:
        return {"inputs": [{"name": "pixels", "shape": [1, 3, 32, 32], "datatype": "FP32", **fields}]}

    def oversized():
        yield from (b" " * 2**20 for _ in range(MAX_BODY_MB + 1))

    deep = b"[" * 100_000 + b"]" * 100_000
    cases = [
        ("malformed JSON", 400, lambda: post(b'{"inputs": [{"name": ')),
        ("not JSON at all", 400, lambda: post(b"\xff\xfe\x00garbage")),
        ("deeply nested data", 400, lambda: post(b'{"inputs":[{"name":"pixels","shape":[1],"datatype":"FP32","data":' + deep + b"}]}")),
        ("deeply nested parameters", 400, lambda: post(b'{"parameters":{"a":' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001 + b',"inputs":[]}')),
        ("inputs is not a list", 422, lambda: infer(url, {"inputs": {"name": "image"}})),
        ("no inputs", 422, lambda: infer(url, {"inputs": []})),
        ("two inputs", 400, lambda: infer(url, {"inputs": v2_bytes(jpeg)["inputs"] * 2})),
        ("datatype is a number", 422, lambda: infer(url, {"inputs": [{"name": "image", "shape": [1], "datatype": 5, "data": [b64(jpeg)]}]})),
        ("shape is a string", 422, lambda: infer(url, {"inputs": [{"name": "image", "shape": "1", "datatype": "BYTES", "data": [b64(jpeg)]}]})),
        ("shape of floats", 422, lambda: infer(url, {"inputs": [{"name": "image", "shape": [1.5], "datatype": "BYTES", "data": [b64(jpeg)]}]})),
        ("unknown datatype", 400, lambda: infer(url, {"inputs": [{"name": "image", "shape": [1], "datatype": "INT64", "data": [1]}]})),
        ("negative shape", 400, lambda: infer(url, v2_bytes(jpeg, shape=[-1]))),
        ("empty shape", 400, lambda: infer(url, {"inputs": [{"name": "image", "shape": [], "datatype": "BYTES", "data": [b64(jpeg)]}]})),
        ("zero photos", 400, lambda: infer(url, {"inputs": [{"name": "image", "shape": [0], "datatype": "BYTES", "data": []}]})),
        ("shape and data disagree", 400, lambda: infer(url, v2_bytes(jpeg, shape=[3]))),
        ("BYTES element a number", 400, lambda: infer(url, {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [7]}]})),
        ("not base64", 400, lambda: infer(url, {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]})),
        ("empty photo", 400, lambda: infer(url, v2_bytes(b""))),
        ("truncated photo", 400, lambda: infer(url, v2_bytes(jpeg[: len(jpeg) // 3]))),
        ("truncated PNG", 400, lambda: infer(url, v2_bytes(png_bytes(64, 64)[:-30]))),
        ("not a photo", 415, lambda: infer(url, v2_bytes(b"just some text, not a photo"))),
        ("FP32 wrong photo shape", 400, lambda: infer(url, {"inputs": [{"name": "pixels", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.0] * 192}]})),
        ("FP32 huge declared shape", 400, lambda: infer(url, {"inputs": [{"name": "pixels", "shape": [1, 3, 10**9, 10**9], "datatype": "FP32", "data": [0.0]}]})),
        ("FP32 negative shape", 400, lambda: infer(url, {"inputs": [{"name": "pixels", "shape": [-1, 3, 32, 32], "datatype": "FP32", "data": [0.0]}]})),
        ("FP32 too few values", 400, lambda: infer(url, pixels_input(data=[0.0] * 100))),
        ("FP32 ragged", 400, lambda: infer(url, pixels_input(data=[[0.0] * 3072, [0.0]]))),
        ("FP32 strings", 400, lambda: infer(url, pixels_input(data=["a"] * 3072))),
        ("FP32 objects", 400, lambda: infer(url, pixels_input(data=[{}] * 3072))),
        ("FP32 infinite", 400, lambda: infer(url, pixels_input(data=[1e39] * 3072))),
        ("FP32 no data", 400, lambda: infer(url, pixels_input())),
        ("binary: header length over the body", 400, lambda: requests.post(infer_url, data=b"{}", headers={"Inference-Header-Content-Length": "99999999999"}, timeout=60)),
        ("binary: negative header length", 400, lambda: requests.post(infer_url, data=b"{}", headers={"Inference-Header-Content-Length": "-2"}, timeout=60)),
        ("binary: size overruns the body", 400, lambda: binary_infer(url, pixels_input(parameters={"binary_data_size": 10**12}), b"\x00" * 16)),
        ("binary: negative size", 400, lambda: binary_infer(url, pixels_input(parameters={"binary_data_size": -4}), b"")),
        ("binary: element overruns", 400, lambda: binary_infer(url, {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 8}}]}, struct.pack("<I", 2**31) + b"abcd")),
        ("binary: bytes belong to no input", 400, lambda: binary_infer(url, v2_bytes(jpeg), b"leftover")),
        ("wrong content type", 415, lambda: post(b"inputs=1", {"Content-Type": "text/plain"})),
        ("body over the limit, with Content-Length", 413, lambda: post(b" " * (MAX_BODY_MB * 2**20 + 1))),
        ("body over the limit, chunked (no Content-Length)", 413, lambda: requests.post(infer_url, data=oversized(), headers=as_json, timeout=60)),
        ("v1 malformed", 400, lambda: requests.post(f"{url}/v1/models/shopvision:predict", data=b'{"instances": [', headers=as_json, timeout=60)),
        ("v1 wrong shape", 422, lambda: requests.post(f"{url}/v1/models/shopvision:predict", json={"instances": [{"image": "x"}]}, timeout=60)),
        ("v1 empty photo", 400, lambda: requests.post(f"{url}/v1/models/shopvision:predict", json={"instances": [{"image": {"b64": ""}}]}, timeout=60)),
        ("/predict truncated", 400, lambda: upload(url, jpeg[:500])),
        ("/predict empty", 400, lambda: upload(url, b"")),
        ("/predict malformed multipart", 400, lambda: requests.post(f"{url}/predict", data=b"--x\r\nnot a part", headers={"Content-Type": "multipart/form-data; boundary=x"}, timeout=60)),
        ("/similar two photos", 400, lambda: upload(url, jpeg, jpeg, route="/similar")),
        ("/similar bad k", 422, lambda: requests.post(f"{url}/similar?k=99999999999999999999", files={"file": ("a.jpg", jpeg)}, timeout=60)),
    ]  # fmt: skip
    failures = [f"{what}: {why}" for what, status, send in cases if (why := refused(send(), status))]
    assert not failures, "\n".join(failures)
    assert 'shopvision_request_errors_total{code="5' not in requests.get(f"{url}/metrics", timeout=10).text


def test_no_answer_metadata_or_metric_shows_a_local_path(servers):
    url, folder = servers["hostile"]["url"], str(servers["folder"])
    meta = requests.get(f"{url}/v2/models/shopvision", timeout=10).json()
    assert meta["name"] == "shopvision" and meta["versions"] == ["unregistered"]
    assert meta["parameters"]["source"] == "local"
    assert meta["parameters"]["limits"]["max_photos_per_request"] == MAX_PHOTOS
    for route in ("/v2/models/shopvision", "/metrics", "/", "/v2", "/openapi.json"):
        text = requests.get(f"{url}{route}", timeout=10).text
        assert folder not in text and "/tmp/" not in text, route
    assert 'source="local"' in requests.get(f"{url}/metrics", timeout=10).text


# --- bounds shared by requests (the `bounded` server) ---------------------------------------------


def in_background(send) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(send()))
    thread.start()
    return thread, out


def wait_for(url: str, name: str, value: float, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while metric(url, name) != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}: {metric(url, name)}"
        time.sleep(0.05)


def test_the_registered_name_is_the_default_model_name(servers):
    url = servers["bounded"]["url"]
    meta = requests.get(f"{url}/v2/models/{NAME}", timeout=10)
    assert meta.status_code == 200 and meta.json()["name"] == NAME and meta.json()["versions"] == ["1"]
    assert meta.json()["parameters"]["source"] == f"models:/{NAME}@champion"
    missing = requests.get(f"{url}/v2/models/shopvision", timeout=10)
    assert missing.status_code == 404 and NAME in missing.json()["error"]
    assert requests.get(f"{url}/v1/models/{NAME}", timeout=10).json() == {"name": NAME, "ready": True}
    text = requests.get(f"{url}/metrics", timeout=10).text
    assert f'model="{NAME}"' in text and str(servers["folder"]) not in text


def test_the_queue_bound_is_checked_before_decoding_and_says_what_waits(servers):
    url = servers["bounded"]["url"]
    kiwi, lemon = photo("Kiwi").read_bytes(), photo("Lemon").read_bytes()
    # Two single-photo requests wait for a full batch (4) ...
    waiting = [in_background(lambda: infer(url, v2_bytes(kiwi), name=NAME)) for _ in range(2)]
    wait_for(url, "shopvision_photos_in_progress", 2)
    # ... so 3 more photos are over the queue of 4: refused at once, saying what is in progress.
    response = infer(url, v2_bytes(lemon, lemon, lemon), name=NAME)
    assert (
        why := refused(response, 503, "2 photos are already in progress", "brings 3", "--max-queue")
    ) is None, why
    # Two more fill the batch: every request in progress is answered, none lost to the refusal.
    filler = infer(url, v2_bytes(lemon, lemon), name=NAME)
    assert filler.status_code == 200 and filler.json()["outputs"][0]["data"][0] == "Lemon"
    for thread, out in waiting:
        thread.join(timeout=30)
        assert out[0].status_code == 200 and out[0].json()["outputs"][0]["data"][0] == "Kiwi", out[0].text
    assert metric(url, "shopvision_photos_in_progress") == 0


def test_deadline_and_concurrency_limits_answer_and_free_the_photos(servers):
    url = servers["bounded"]["url"]
    kiwi = photo("Kiwi").read_bytes()
    started = time.monotonic()
    # Three single-photo requests wait for a batch that never fills; a fourth client trickles its body.
    waiting = [in_background(lambda: infer(url, v2_bytes(kiwi), name=NAME)) for _ in range(3)]
    trickle = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=30)
    trickle.sendall(
        f"POST /v2/models/{NAME}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        'Content-Length: 1000\r\n\r\n{"inputs": '.encode()
    )
    wait_for(url, "shopvision_requests_in_progress", BATCH)
    # A request is in progress from its headers on, its photo from when its body is parsed: wait for
    # the three photos too (well inside the deadline), rather than read the gauge at once.
    wait_for(url, "shopvision_photos_in_progress", 3, seconds=TIMEOUT_S / 2)
    # A fifth POST is over --max-concurrency: a JSON 503 at once; health and metrics still answer.
    response = infer(url, v2_bytes(kiwi), name=NAME)
    assert (why := refused(response, 503, "--max-concurrency")) is None, why
    assert requests.get(f"{url}/v2/health/ready", timeout=10).status_code == 200
    # At the deadline each of the four gets its own 504 ...
    for thread, out in waiting:
        thread.join(timeout=30)
        assert (why := refused(out[0], 504, "--request-timeout")) is None, why
    answer = b""
    while chunk := trickle.recv(4096):  # headers and body may come apart; the 504 closes the connection
        answer += chunk
    trickle.close()
    answer = answer.decode(errors="replace")
    assert answer.startswith("HTTP/1.1 504") and "--request-timeout" in answer, answer
    assert TIMEOUT_S - 0.5 < time.monotonic() - started < TIMEOUT_S + 5
    # ... and their photos left the queue at once (none waits for a batch any more).
    for name in (
        "shopvision_photos_in_progress",
        "shopvision_queued_images",
        "shopvision_requests_in_progress",
    ):
        wait_for(url, name, 0, seconds=1)
    full = infer(url, v2_bytes(kiwi, kiwi, kiwi, kiwi), name=NAME)
    assert full.status_code == 200 and full.json()["outputs"][0]["data"][::5] == ["Kiwi"] * 4
    text = requests.get(f"{url}/metrics", timeout=10).text
    timed_out = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('shopvision_requests_total{code="504"')
    ]
    assert (
        sum(timed_out) == 4
    )  # the trickled body is counted as route "unmatched": it never reached the router


def test_uvicorn_refuses_connections_beyond_max_connections(servers):
    url = servers["bounded"]["url"]
    port = int(url.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(CONNECTIONS)]
    try:
        time.sleep(0.2)
        response = requests.get(f"{url}/v2/health/live", timeout=10)
        assert response.status_code == 503, response.text
    finally:
        for connection in idle:
            connection.close()
    deadline = time.monotonic() + 10
    while requests.get(f"{url}/v2/health/ready", timeout=10).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)


# --- afterwards ---------------------------------------------------------------------------------


def test_after_all_that_both_serve_real_photos_within_the_memory_bound(servers, memory):
    for server in ("hostile", "bounded"):
        assert servers[server]["process"].poll() is None, server
        assert requests.get(f"{servers[server]['url']}/v2/health/ready", timeout=10).status_code == 200
    url = servers["hostile"]["url"]
    assert top_label(upload(url, photo("Pineapple", 2))) == "Pineapple"
    similar = upload(url, photo("Kiwi"), route="/similar")
    assert similar.status_code == 200 and similar.json()["neighbours"][0]["category"] == "Kiwi"
    peak = proc_status(memory["pid"])["VmHWM"]
    growth = (peak - memory["rss"]) / 2**20
    print(f"hostile server: {memory['rss'] / 2**20:.0f} MiB resident before, peak {peak / 2**20:.0f} MiB")
    assert growth < MEMORY_BOUND_MIB, f"peak resident memory grew by {growth:.0f} MiB"
    log = servers["hostile"]["log"].read_text()
    assert "Traceback" not in log and "internal error" not in log


# --- in-process: the decoder's pixel limit is per call; the CPU quota ------------------------------


def test_parallel_decodes_with_different_pixel_limits_do_not_share_them():
    big, small = png_bytes(300, 200), png_bytes(20, 10)  # 60,000 and 200 pixels
    limits = [250, 1_000, 60_000, 10**6] * 50
    limit_before = Image.MAX_IMAGE_PIXELS

    def decode(limit: int) -> tuple[int, bool, bool]:
        try:
            decode_image(big, max_pixels=limit)
            big_ok = True
        except ImageDecodeError as exc:
            assert exc.reason == "too_many_pixels"
            big_ok = False
        return limit, big_ok, decode_image(small, max_pixels=limit).image.size == (20, 10)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(decode, limits))
    assert all(big_ok == (limit >= 60_000) and small_ok for limit, big_ok, small_ok in results)
    assert limit_before == Image.MAX_IMAGE_PIXELS  # never set, not even for a moment


def test_cores_come_from_the_cgroup_quota(tmp_path):
    from shopvision.serving.registry_watch import public_source, served_name
    from shopvision.serving.settings import available_cores

    pinned = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cores(tmp_path) == pinned
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert available_cores(tmp_path) == 1
    (tmp_path / "cpu.max").write_text(f"{100000 * (pinned + 8)} 100000\n")
    assert available_cores(tmp_path) == pinned  # never more than the cores it may run on
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cores(v1) == min(2, pinned)
    assert available_cores(tmp_path / "none") == pinned
    assert served_name("models:/shop@champion", None) == "shop" == served_name("models:/shop/3", None)
    assert served_name("models:/shop@champion", "other") == "other"
    assert served_name("/srv/model", None) == "shopvision"
    assert public_source("/srv/models/v7") == public_source("s3://bucket/private/model") == "local"
    assert public_source("models:/shop@champion") == "models:/shop@champion"
