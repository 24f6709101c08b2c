"""POST /similar on real `shopvision serve` processes on 127.0.0.1, asked over HTTP with real photos.

The catalogue is 12 sample photos (4 categories × 3) embedded by `extract_features` with a tiny
ResNet-18 at 32 px (random weights: pooled features still differ from photo to photo, which is all
exact search needs). The server classifies with a *different* model (another seed), so a query
embedded by the served model instead of the index's own would not find itself with the index's vector.
Two servers start side by side: one with `--similar-index`, one without.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from mlflow_server import free_port
from test_serving import metric, png_bytes, serve_process, shopvision_exe, wait_ready

from shopvision.components.similarity.features import extract_features
from shopvision.components.similarity.similar import find_similar
from shopvision.components.training.models import ModelSpec, build_model, save_classifier

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "raw"
CATEGORIES = ["Banana", "Kiwi", "Lemon", "Pineapple"]
PER_CATEGORY = 3
MAX_PIXELS = 1_000_000
MAX_BODY_MB = 1


def tiny_model(directory: Path, labels: list[str], seed: int) -> Path:
    spec = ModelSpec("resnet18", labels, image_size=32)
    torch.manual_seed(seed)
    save_classifier(directory, build_model(spec).eval(), spec)
    return directory


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> dict:
    """12 sample photos in DATA/<category>/, their index (made by the index model), and a served model."""
    folder = tmp_path_factory.mktemp("similar-serving")
    labels = sorted(p.name for p in SAMPLE.iterdir() if p.is_dir())
    data = folder / "catalogue"
    for category in CATEGORIES:
        (data / category).mkdir(parents=True)
        for source in sorted((SAMPLE / category).glob("*.jpg"))[:PER_CATEGORY]:
            shutil.copyfile(source, data / category / source.name)
    index_model = tiny_model(folder / "index-model", labels, seed=0)
    served_model = tiny_model(folder / "served-model", labels, seed=1)
    index = folder / "index"
    extract_features(index_model, data, index, device="cpu", show_progress=False)
    with (index / "index.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {
        "folder": folder,
        "data": data,
        "index": index,
        "rows": rows,
        "embeddings": np.load(index / "embeddings.npy"),
        "served_model": served_model,
    }


@pytest.fixture(scope="module")
def servers(catalogue) -> dict:
    """Two servers started together: `with_index` (--similar-index) and `without_index`."""
    folder = catalogue["folder"]
    common = ["--device", "cpu", "--model", str(catalogue["served_model"]), "--max-pixels", str(MAX_PIXELS)]
    logs = {"with_index": folder / "serve-index.log", "without_index": folder / "serve-plain.log"}
    with ExitStack() as stack:
        started = {
            "with_index": stack.enter_context(
                serve_process(
                    *common,
                    "--similar-index",
                    str(catalogue["index"]),
                    "--max-body-mb",
                    str(MAX_BODY_MB),
                    log_path=logs["with_index"],
                )
            ),
            "without_index": stack.enter_context(serve_process(*common, log_path=logs["without_index"])),
        }
        for name, (url, process) in started.items():
            wait_ready(url, process, logs[name])
        yield {
            name: {"url": url, "process": process, "log": logs[name]}
            for name, (url, process) in started.items()
        }


def ask(url: str, path: Path, **params) -> requests.Response:
    files = {"file": (path.name, path.read_bytes(), "image/jpeg")}
    return requests.post(f"{url}/similar", files=files, params=params, timeout=60)


def test_a_catalogue_photo_finds_itself_first_with_its_index_embedding(servers, catalogue):
    url = servers["with_index"]["url"]
    rows, embeddings = catalogue["rows"], catalogue["embeddings"]
    for position in (0, 4, 11):
        row = rows[position]
        query = catalogue["data"] / row["path"]
        response = ask(url, query, k=3, embedding="true")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["file"] == query.name and body["k"] == 3 and body["index_size"] == len(rows)
        first = body["neighbours"][0]
        assert (first["path"], first["category"], first["product_id"]) == (
            row["path"],
            row["category"],
            row["product_id"],
        )
        assert first["similarity"] == pytest.approx(1.0, abs=1e-5)
        # Embedded by the index's own model in fp32: the very vector `features` stored for this photo.
        assert np.allclose(body["embedding"], embeddings[position], atol=1e-5)
        assert [n["rank"] for n in body["neighbours"]] == [1, 2, 3]
        similarities = [n["similarity"] for n in body["neighbours"]]
        assert similarities == sorted(similarities, reverse=True)
        for n in body["neighbours"]:
            assert {k: n[k] for k in ("category", "product_id")} == {
                k: rows[[r["path"] for r in rows].index(n["path"])][k] for k in ("category", "product_id")
            }
        # The same answer as `shopvision similar` gives for that file.
        cli = find_similar(catalogue["index"], [query], k=3, device="cpu").queries[0].neighbours
        assert [Path(n.path).relative_to(catalogue["data"].resolve()).as_posix() for n in cli] == [
            n["path"] for n in body["neighbours"]
        ]
        assert np.allclose([n.similarity for n in cli], similarities, atol=1e-5)
        assert "embedding" not in ask(url, query, k=1).json()

    # One photo as the raw body answers the same as the multipart upload.
    query = catalogue["data"] / rows[4]["path"]
    raw = requests.post(
        f"{url}/similar",
        data=query.read_bytes(),
        headers={"Content-Type": "image/jpeg"},
        params={"k": 3},
        timeout=60,
    )
    assert raw.status_code == 200, raw.text
    assert raw.json()["file"] == "body"
    assert [n["path"] for n in raw.json()["neighbours"]] == [
        n["path"] for n in ask(url, query, k=3).json()["neighbours"]
    ]


def test_k_larger_than_the_index_returns_the_whole_index_ranked(servers, catalogue):
    url, size = servers["with_index"]["url"], len(catalogue["rows"])
    query = catalogue["data"] / catalogue["rows"][7]["path"]
    body = ask(url, query, k=500).json()
    assert body["k"] == size == len(body["neighbours"]) and body["index_size"] == size
    assert sorted(n["path"] for n in body["neighbours"]) == sorted(r["path"] for r in catalogue["rows"])
    assert [n["rank"] for n in body["neighbours"]] == list(range(1, size + 1))
    assert len(ask(url, query).json()["neighbours"]) == 10  # the default k
    for bad_k in (0, -1, 1001, "many"):
        response = ask(url, query, k=bad_k)
        assert response.status_code == 422 and "k" in response.json()["error"], (bad_k, response.text)


def test_bad_uploads_get_the_predict_route_errors_and_the_server_stays_up(servers, catalogue):
    url, process = servers["with_index"]["url"], servers["with_index"]["process"]
    jpeg = (catalogue["data"] / catalogue["rows"][0]["path"]).read_bytes()
    cases = [
        ("not an image", 415, {"files": {"file": ("notes.txt", b"just some text\n" * 20)}}),
        ("truncated JPEG", 400, {"files": {"file": ("cut.jpg", jpeg[: len(jpeg) // 3])}}),
        ("too many pixels", 413, {"files": {"file": ("huge.png", png_bytes(1200, 1000))}}),
        ("empty file", 400, {"files": {"file": ("empty.jpg", b"")}}),
        ("two photos", 400, {"files": [("file", ("a.jpg", jpeg)), ("file", ("b.jpg", jpeg))]}),
        ("no file field", 400, {"files": {"x": (None, "text only")}}),
        ("wrong content type", 415, {"json": {"image": "x"}}),
        ("raw body not an image", 415, {"data": b"plain text", "headers": {"Content-Type": "image/jpeg"}}),
        ("body too large", 413, {"files": {"file": ("big.jpg", os.urandom(MAX_BODY_MB * 2**20 + 1000))}}),
    ]
    failures = []
    for what, status, kwargs in cases:
        response = requests.post(f"{url}/similar", timeout=60, **kwargs)
        is_json = response.headers.get("content-type", "").startswith("application/json")
        if response.status_code != status or not (is_json and response.json().get("error")):
            failures.append(f"{what}: expected {status}, got {response.status_code} {response.text[:200]}")
    assert not failures, "\n".join(failures)
    assert process.poll() is None
    assert requests.get(f"{url}/v2/health/ready", timeout=10).status_code == 200
    good = ask(url, catalogue["data"] / catalogue["rows"][0]["path"], k=1)
    assert good.status_code == 200 and good.json()["neighbours"][0]["path"] == catalogue["rows"][0]["path"]
    assert 'shopvision_request_errors_total{code="5' not in requests.get(f"{url}/metrics", timeout=10).text


def test_similar_requests_are_in_the_metrics(servers, catalogue):
    url = servers["with_index"]["url"]
    ok = '{code="200",route="/similar"}'
    before = metric(url, "shopvision_requests_total", ok)
    queries_before = metric(url, "shopvision_similar_queries_total")
    assert ask(url, catalogue["data"] / catalogue["rows"][2]["path"], k=2).status_code == 200
    assert metric(url, "shopvision_requests_total", ok) == before + 1
    assert metric(url, "shopvision_similar_queries_total") == queries_before + 1
    assert metric(url, "shopvision_similar_seconds_count") >= 1
    assert metric(url, "shopvision_similar_index_size") == len(catalogue["rows"])
    assert "/similar" in requests.get(f"{url}/", timeout=10).json()["routes"]
    assert "/similar" in requests.get(f"{url}/openapi.json", timeout=10).json()["paths"]


def test_a_server_without_an_index_answers_404_on_similar(servers, catalogue):
    url = servers["without_index"]["url"]
    response = ask(url, catalogue["data"] / catalogue["rows"][0]["path"])
    assert response.status_code == 404 and "--similar-index" in response.json()["error"]
    assert metric(url, "shopvision_requests_total", '{code="404",route="/similar"}') == 1
    assert metric(url, "shopvision_similar_index_size") == 0
    assert "/similar" not in requests.get(f"{url}/", timeout=10).json()["routes"]
    files = {"file": ("a.jpg", (catalogue["data"] / catalogue["rows"][0]["path"]).read_bytes())}
    assert requests.post(f"{url}/predict", files=files, timeout=60).status_code == 200


def test_a_folder_that_is_not_an_index_is_one_clear_line(catalogue):
    command = [
        shopvision_exe(), "serve", "--port", str(free_port()), "--model", str(catalogue["served_model"]),
        "--similar-index", str(catalogue["data"]),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "not a finished embedding index" in done.stderr and "Traceback" not in done.stderr
