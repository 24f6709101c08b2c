"""Drift against the registered baseline, on a real `shopvision serve` process with real sample photos.

The model is `probe_models.probe_model` (EfficientNet-Lite0 ImageNet features at 64 px, a head fitted
on half the photos); `evaluate` writes its baseline on a quarter of the photos it never saw, and the
server, serving evaluate's model folder, finds it there. The tests run in file order: each stream fills
the whole drift window (40 photos), so each reads the scores of its own photos only.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
import threading
import time

import pytest
import requests
from PIL import Image, ImageFilter
from probe_models import LABELS, cached_probe_model, held_out, sample_photos
from prometheus_client import CollectorRegistry
from test_serving import serve_process, wait_ready

from shopvision.components.evaluation.baseline import BASELINE_FILE, read_baseline
from shopvision.components.evaluation.evaluate import evaluate
from shopvision.serving.drift import DRIFT_THRESHOLDS, STATISTICS, TOP_CATEGORIES, DriftMonitor, WindowSpec
from shopvision.serving.prediction_log import PredictionLog

WINDOW = 40
MIN_PHOTOS = 30
SERVED_AS = "shopvision"  # a model folder is served under the default name


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """The probe model evaluated on held-out photos: OUT/drift_baseline.json and OUT/model/."""
    folder = tmp_path_factory.mktemp("drift")
    model = cached_probe_model(tmp_path_factory)
    test_dir = folder / "test"
    for path in held_out(1):
        (test_dir / path.parent.name).mkdir(parents=True, exist_ok=True)
        os.symlink(path, test_dir / path.parent.name / path.name)
    result = evaluate(model, test_dir, folder / "eval", device="cpu")
    return {"folder": folder, "eval": folder / "eval", "result": result}


@pytest.fixture(scope="module")
def server(evaluated):
    folder = evaluated["folder"]
    log_path = folder / "serve.log"
    args = [
        "--model", str(evaluated["eval"] / "model"), "--drift-window", str(WINDOW),
        "--drift-min-photos", str(MIN_PHOTOS), "--prediction-log", str(folder / "log" / "predictions.jsonl"),
        "--max-wait-ms", "2",
    ]  # fmt: skip
    with serve_process(*args, log_path=log_path) as (url, process):
        wait_ready(url, process, log_path)
        yield {"url": url, "log": log_path, "folder": folder, "sent": []}


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def send(server: dict, blobs: list[bytes], per_request: int = 10) -> list[dict]:
    """POST the photos to /predict, a few per request; returns every answer."""
    answers = []
    for start in range(0, len(blobs), per_request):
        files = [
            ("file", (f"p{i}.jpg", b, "image/jpeg")) for i, b in enumerate(blobs[start : start + per_request])
        ]
        response = requests.post(f"{server['url']}/predict", files=files, timeout=60)
        assert response.status_code == 200, response.text
        body = response.json()
        answers += [{**p, "model_version": body["model_version"]} for p in body["predictions"]]
    server["sent"] += answers
    return answers


def drift(server: dict) -> dict:
    response = requests.get(f"{server['url']}/v2/models/{SERVED_AS}/drift", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def metric_lines(url: str, name: str) -> dict[str, float]:
    """{labels text: value} of one metric's series in /metrics."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    return {m[1] or "": float(m[2]) for m in re.finditer(rf"^{name}(\{{[^}}]*\}})? (\S+)$", text, re.M)}


# --- the baseline -----------------------------------------------------------------------------------


def test_evaluate_writes_the_baseline_of_its_test_answers(evaluated):
    out = evaluated["eval"]
    baseline = read_baseline(out / BASELINE_FILE)
    assert read_baseline(out / "model" / BASELINE_FILE) == baseline  # served with the model copy
    rows = (out / "predictions.csv").read_text().splitlines()[1:]
    predicted = [row.split(",")[4] for row in rows]
    confidence = [float(row.split(",")[5]) for row in rows]
    assert baseline.photos == len(rows) == len(held_out(1))
    assert baseline.labels == LABELS
    assert baseline.category_counts == [predicted.count(c) for c in LABELS]
    assert sum(baseline.confidence_counts) == len(rows)
    assert baseline.confidence_counts[-1] == sum(c >= 0.9 for c in confidence)
    threshold = evaluated["result"].metrics["coverage"]["served_threshold"]
    assert baseline.threshold == threshold
    assert baseline.low_confidence == sum(c < threshold for c in confidence)


# --- drift on a real server ---------------------------------------------------------------------------


def test_no_scores_until_the_window_holds_the_minimum(server):
    send(server, [p.read_bytes() for p in held_out(3)[: MIN_PHOTOS - 1]])
    body = drift(server)
    assert body["window"]["photos"] == MIN_PHOTOS - 1
    assert body["scores"] == dict.fromkeys(STATISTICS)
    assert metric_lines(server["url"], "shopvision_drift_score") == {}


def test_in_distribution_photos_stay_under_every_threshold(server):
    unseen = [p.read_bytes() for p in held_out(3)]
    assert len(unseen) >= WINDOW
    send(server, unseen)
    body = drift(server)
    assert body["window"] == {
        "kind": "photos", "size": WINDOW, "photos": WINDOW, "min_photos": MIN_PHOTOS,
        "photos_since_start": MIN_PHOTOS - 1 + len(unseen),
    }  # fmt: skip
    assert body["baseline"]["photos"] == len(held_out(1)) and body["baseline_problem"] is None
    print(f"drift scores, unseen photos: {body['scores']}")
    for statistic in STATISTICS:
        assert body["scores"][statistic] < DRIFT_THRESHOLDS[statistic], (statistic, body["scores"])
    assert body["drifting"] == []
    # /metrics says the same, labelled by statistic only.
    scores = metric_lines(server["url"], "shopvision_drift_score")
    assert scores == {f'{{statistic="{s}"}}': pytest.approx(body["scores"][s]) for s in STATISTICS}


def test_metrics_carry_a_confidence_histogram_and_bounded_category_labels(server):
    url = server["url"]
    buckets = metric_lines(url, "shopvision_top1_confidence_bucket")
    assert buckets['{le="+Inf"}'] == len(server["sent"])
    assert buckets['{le="1.0"}'] == len(server["sent"]) and len(buckets) == 11
    above = sum(p["top"][0]["probability"] > 0.9 for p in server["sent"])
    assert buckets['{le="1.0"}'] - buckets['{le="0.9"}'] == above
    body = drift(server)
    window = server["sent"][-WINDOW:]
    low = sum(not p["confident"] for p in window) / WINDOW
    assert metric_lines(url, "shopvision_low_confidence_rate") == {"": pytest.approx(low)}
    assert body["live"]["low_confidence_rate"] == pytest.approx(low)
    shares = metric_lines(url, "shopvision_predicted_category_share")
    assert len(LABELS) > TOP_CATEGORIES  # so the bound is what is tested
    assert 1 < len(shares) <= TOP_CATEGORIES + 1 and '{category="other"}' in shares
    assert sum(shares.values()) == pytest.approx(1.0)
    predicted = [p["top"][0]["label"] for p in window]
    for labels, share in shares.items():
        category = labels.split('"')[1]
        if category != "other":
            assert share == pytest.approx(predicted.count(category) / WINDOW)


def test_heavily_blurred_photos_push_the_confidence_score_over(server):
    blurred = [jpeg(Image.open(p).filter(ImageFilter.GaussianBlur(40))) for p in held_out(3)[:WINDOW]]
    send(server, blurred)
    body = drift(server)
    print(f"drift scores, heavily blurred: {body['scores']}")
    assert body["scores"]["confidence"] > DRIFT_THRESHOLDS["confidence"], body["scores"]
    assert "confidence" in body["drifting"]


def test_photos_of_two_categories_push_the_category_score_over_and_only_it(server):
    two = [p for c in ("Banana", "Carrots") for p in sample_photos(c)[1::2]]
    mirrored = [jpeg(Image.open(p).transpose(Image.Transpose.FLIP_LEFT_RIGHT)) for p in two]
    send(server, ([p.read_bytes() for p in two] + mirrored)[:WINDOW])
    body = drift(server)
    print(f"drift scores, two categories: {body['scores']}")
    assert body["scores"]["category"] > DRIFT_THRESHOLDS["category"], body["scores"]
    assert body["scores"]["confidence"] < DRIFT_THRESHOLDS["confidence"], body["scores"]
    assert body["drifting"] == ["category"]
    assert {row["category"] for row in body["live"]["top_categories"] if row["share"] > 0.2} <= {
        "Banana",
        "Carrots",
    }


def test_the_prediction_log_holds_every_answer_and_never_the_photo(server):
    url, sent = server["url"], server["sent"]
    path = server["folder"] / "log" / "predictions.jsonl"
    deadline = time.monotonic() + 10
    while metric_lines(url, "shopvision_prediction_log_records_total").get("", 0) < len(sent):
        assert time.monotonic() < deadline, "the prediction log did not catch up"
        time.sleep(0.1)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == len(sent)
    for record, answer in zip(records, sent, strict=True):
        assert set(record) == {"time", "model", "model_version", "top", "confidence", "confident"}
        assert record["model"] == SERVED_AS and record["model_version"] == answer["model_version"]
        assert [t["label"] for t in record["top"]] == [t["label"] for t in answer["top"]]
        assert record["confidence"] == pytest.approx(answer["top"][0]["probability"], abs=1e-6)
        assert record["confident"] == answer["confident"]
    assert "p0.jpg" not in path.read_text()  # not even the client's file name
    assert metric_lines(url, "shopvision_prediction_log_dropped_total") == {"": 0.0}
    assert drift(server)["prediction_log"]["written"] == len(sent)


def test_the_drift_route_names_the_served_model(server):
    response = requests.get(f"{server['url']}/v2/models/other/drift", timeout=10)
    assert response.status_code == 404 and "not found" in response.json()["error"]


# --- the pieces on their own ----------------------------------------------------------------------


class Answer:
    def __init__(self, label: str, confidence: float, version: str = "1") -> None:
        self.labels, self.probabilities = (label,), (confidence,)
        self.confident, self.model_version = confidence >= 0.5, version


def test_a_minutes_window_forgets_what_is_older():
    now = [0.0]
    monitor = DriftMonitor(WindowSpec(photos=None, minutes=2, min_photos=1), clock=lambda: now[0])
    monitor.switch("1", ["a", "b"], 0.5, None)
    monitor.observe([Answer("a", 0.9)] * 5)
    now[0] = 61.0
    monitor.observe([Answer("b", 0.3)] * 3 + [Answer("a", 0.9, version="0")])  # the old version's is ignored
    assert monitor.photos == 8 and monitor.snapshot_low_rate() == pytest.approx(3 / 8)
    now[0] = 121.0  # the first five are now over two minutes old
    assert monitor.snapshot()["window"]["photos"] == 3 and monitor.snapshot_low_rate() == 1.0


def test_the_prediction_log_rotates_within_its_bound(tmp_path):
    log = PredictionLog(tmp_path / "p.jsonl", CollectorRegistry(), max_bytes=2048, backups=2, queue_size=1000)
    log.start()
    log.offer("m", [Answer("Banana", 0.8)] * 300)
    log.stop()
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["p.jsonl", "p.jsonl.1", "p.jsonl.2"]
    assert all(f.stat().st_size <= 2048 for f in files)
    assert log.counts["written"] == 300 and log.counts["dropped"] == 0
    newest = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert newest and all(r["top"] == [{"label": "Banana", "probability": 0.8}] for r in newest)


def test_a_stalled_disk_never_blocks_a_request_it_drops_and_counts(tmp_path):
    """A FIFO nobody reads stalls the writer on its first open, as a hung network disk would."""
    fifo = tmp_path / "stalled.jsonl"
    os.mkfifo(fifo)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    log = PredictionLog(fifo, CollectorRegistry(), queue_size=100)
    log.start()
    started = time.perf_counter()
    for _ in range(200):
        log.offer("m", [Answer("Kiwi", 0.7)] * 50)
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0  # 10,000 answers handed over without waiting for the disk
    assert log.counts["dropped"] >= 10_000 - 101 and log.counts["written"] == 0
    # Unstall it: a reader lets the writer drain the queue and stop.
    drained = threading.Thread(target=lambda: fifo.read_bytes(), daemon=True)
    drained.start()
    log.stop()
    drained.join(10)
    assert log.counts["written"] + log.counts["dropped"] == 10_000


def test_register_logs_the_baseline_with_the_version_and_the_server_finds_it(evaluated, tmp_path):
    import mlflow

    from shopvision.components.registry.register import register
    from shopvision.components.training.tracking import log_classifier
    from shopvision.serving.live_quality import find_baseline
    from shopvision.serving.registry_watch import resolve

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("drift", artifact_location=str(tmp_path / "artifacts"))
        with mlflow.start_run(experiment_id=experiment) as run:
            log_classifier(evaluated["eval"] / "model", name="model")
        metrics = evaluated["eval"] / "metrics.json"
        registered = register(run.info.run_id, "drifty", test_metrics=metrics, tracking_uri=uri)
        assert registered.tags["drift_baseline"] == BASELINE_FILE
        found = find_baseline(resolve(f"models:/drifty/{registered.version}"))
        expected = read_baseline(evaluated["eval"] / BASELINE_FILE)
        assert found is not None and found.model_version == registered.version
        found.model_version = None
        assert found == expected
        # A version registered without an evaluation has none, and the server says so (no scores).
        bare = register(run.info.run_id, "drifty", tracking_uri=uri)
        assert "drift_baseline" not in bare.tags
    finally:
        mlflow.set_tracking_uri(previous)
