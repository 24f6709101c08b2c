"""The KFP pipeline: compiled IR checks, and a whole real kfp.local run reading photos from S3.

The S3 endpoint is moto's server, a real HTTP S3 implementation started by the test on 127.0.0.1.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml

from shopvision.components.data.fetch import fetch_photos, fingerprint_location
from shopvision.components.data.split import read_split_photos
from shopvision.components.errors import StepError
from shopvision.components.training.launch import free_port
from shopvision.pipelines.cluster import COMPILED, compile_pipeline, parse_arguments
from shopvision.pipelines.local_run import run_locally

STEPS = [
    "fingerprint-data",
    "fetch-photos",
    "clean-photos",
    "frozen-test-set",
    "split-photos",
    "balance-photos",
    "augment-photos",
    "train-model",
    "evaluate-model",
    "register-model",
    "promote-model",
    "deploy-model",
]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3 endpoint (moto_server) on loopback, with credentials only it accepts."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            assert time.monotonic() < deadline and server.poll() is None, "moto_server did not start"
            time.sleep(0.2)
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=url,
    )
    try:
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _upload(s3_url: str, bucket: str, folder: Path, prefix: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_url)
    client.create_bucket(Bucket=bucket)
    for path in sorted(folder.rglob("*.jpg")):
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


def _small_raw(sample_raw: Path, target: Path, categories: int = 4, photos: int = 6) -> Path:
    for category in sorted(p for p in sample_raw.iterdir() if p.is_dir())[:categories]:
        for path in sorted(category.iterdir())[:photos]:
            (target / category.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target / category.name / path.name)
    return target


def test_compiled_yaml_is_up_to_date(tmp_path, monkeypatch):
    monkeypatch.delenv("SHOPVISION_IMAGE", raising=False)
    fresh = compile_pipeline(tmp_path / "pipeline.yaml")
    assert COMPILED.read_text() == fresh.read_text(), (
        "run 'shopvision pipeline compile' and commit the result"
    )


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    return list(yaml.safe_load_all(COMPILED.read_text()))


def test_every_step_is_a_component(compiled):
    spec = compiled[0]
    tasks = set(spec["root"]["dag"]["tasks"])
    nested = {t for task in spec["components"].values() for t in task.get("dag", {}).get("tasks", {})}
    assert set(STEPS) <= tasks | nested
    for executor in spec["deploymentSpec"]["executors"].values():
        container = executor["container"]
        assert container["image"] == "ghcr.io/shopvision/shopvision:0.1.0"
        assert "pip install" not in " ".join(container["command"])  # nothing installs at run time


def test_train_requests_a_gpu_and_node_placement_is_a_parameter(compiled):
    executors = compiled[0]["deploymentSpec"]["executors"]
    resources = executors["exec-train-model"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
    # The count is a parameter: a train task that only watches a TrainJob holds no GPU.
    assert "train_task_gpus" in resources["accelerator"]["resourceCount"]
    inputs = compiled[0]["root"]["inputDefinitions"]["parameters"]
    assert inputs["train_task_gpus"]["defaultValue"] == 0 and inputs["launcher"]["defaultValue"] == "trainjob"
    train = compiled[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train-model"]
    assert train["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"] == "node_selector"
    assert train["tolerations"][0]["tolerationJson"]["componentInputParameter"] == "tolerations"


def test_secrets_are_wired_by_reference(compiled):
    executors = compiled[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in ("exec-train-model", "exec-register-model", "exec-promote-model", "exec-fetch-photos"):
        wired = {
            (s["secretName"], kv["secretKey"], kv["envVar"])
            for s in executors[name]["secretAsEnv"]
            for kv in s["keyToEnv"]
        }
        assert ("shopvision-mlflow", "tracking-uri", "MLFLOW_TRACKING_URI") in wired, name
        assert ("shopvision-s3", "secret-access-key", "AWS_SECRET_ACCESS_KEY") in wired, name


# Credentials as a machine that compiles the pipeline may hold them; none may reach the IR YAML.
COMPILE_TIME_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIALEAKEDKEYID0001",
    "AWS_SECRET_ACCESS_KEY": "leaked-secret-access-key-0001",
    "AWS_ENDPOINT_URL": "http://leaked-endpoint.example:9000",
    "MLFLOW_TRACKING_URI": "http://leaked-user:leaked-password@mlflow.example:5000",
    "MLFLOW_TRACKING_USERNAME": "leaked-user",
    "MLFLOW_TRACKING_PASSWORD": "leaked-password",
    "MLFLOW_TRACKING_TOKEN": "leaked-token-0001",
}
CREDENTIAL_NAME = re.compile(r"KEY|SECRET|PASSWORD|TOKEN|TRACKING_URI|ENDPOINT", re.IGNORECASE)


def _literal_credentials(docs: list[dict]) -> list[str]:
    """Environment variables set to a literal value in a container that name a credential."""
    found = []
    for name, executor in docs[0]["deploymentSpec"]["executors"].items():
        for env in executor.get("container", {}).get("env", []):
            if CREDENTIAL_NAME.search(env["name"]):
                found.append(f"{name}: {env['name']}")
    return found


def test_no_credential_is_written_into_the_pipeline(compiled, tmp_path, monkeypatch):
    """The Secrets are wired by reference (above); here: no value from the compiling machine's
    environment appears anywhere in the YAML, and no container sets a credential to a literal."""
    monkeypatch.delenv("SHOPVISION_IMAGE", raising=False)
    for key, value in COMPILE_TIME_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    fresh = compile_pipeline(tmp_path / "pipeline.yaml").read_text()
    assert "leaked" not in fresh.lower() and "AKIALEAKED" not in fresh
    assert _literal_credentials(list(yaml.safe_load_all(fresh))) == []
    assert _literal_credentials(compiled) == []


def test_fingerprint_changes_exactly_when_photos_change(s3, sample_raw, tmp_path):
    raw = _small_raw(sample_raw, tmp_path / "raw", categories=2, photos=2)
    _upload(s3, "fingerprints", raw, "raw")
    folder_before, s3_before = fingerprint_location(str(raw)), fingerprint_location("s3://fingerprints/raw")
    assert fingerprint_location(str(raw)) == folder_before
    assert fingerprint_location("s3://fingerprints/raw") == s3_before
    photo = sorted(raw.rglob("*.jpg"))[0]
    photo.write_bytes(photo.read_bytes()[:-10] + b"0123456789")  # same size, other bytes
    _upload(s3, "fingerprints", raw, "raw")
    assert fingerprint_location(str(raw)) != folder_before
    assert fingerprint_location("s3://fingerprints/raw") != s3_before


def test_fetch_from_s3_keeps_the_layout(s3, sample_raw, tmp_path):
    raw = _small_raw(sample_raw, tmp_path / "raw", categories=2, photos=3)
    _upload(s3, "photos", raw, "catalogue/2026")
    count = fetch_photos("s3://photos/catalogue/2026/", tmp_path / "fetched")
    assert count == 6
    assert sorted(
        p.relative_to(tmp_path / "fetched") for p in (tmp_path / "fetched").rglob("*.jpg")
    ) == sorted(p.relative_to(raw) for p in raw.rglob("*.jpg"))


def test_fetch_from_s3_refuses_photos_changed_after_the_fingerprint(s3, sample_raw, tmp_path, monkeypatch):
    from shopvision.components.data import fetch

    raw = _small_raw(sample_raw, tmp_path / "raw", categories=2, photos=2)
    _upload(s3, "changing", raw, "raw")
    fingerprint = fingerprint_location("s3://changing/raw")
    photo = sorted(raw.rglob("*.jpg"))[0]
    photo.write_bytes(photo.read_bytes()[:-4] + b"edit")
    _upload(s3, "changing", raw, "raw")  # changed before fetch lists the prefix
    with pytest.raises(StepError, match="changed between the fingerprint task and fetch"):
        fetch_photos("s3://changing/raw", tmp_path / "a", expected_fingerprint=fingerprint)

    listed, fingerprint = fetch._s3_objects, fingerprint_location("s3://changing/raw")

    def listed_then_replaced(location, endpoint_url):  # a writer replaces a photo while fetch runs
        objects = listed(location, endpoint_url)
        photo.write_bytes(photo.read_bytes()[:-4] + b"more")
        _upload(s3, "changing", raw, "raw")
        return objects

    monkeypatch.setattr(fetch, "_s3_objects", listed_then_replaced)
    with pytest.raises(StepError, match="ETag no longer matches"):
        fetch_photos("s3://changing/raw", tmp_path / "b", expected_fingerprint=fingerprint)


def test_bad_locations_are_clear_errors(s3, tmp_path):
    import boto3

    boto3.client("s3", endpoint_url=s3).create_bucket(Bucket="empty-prefixes")
    with pytest.raises(StepError, match="no photos under"):
        fingerprint_location("s3://empty-prefixes/nothing-here")
    with pytest.raises(StepError, match="cannot list"):
        fingerprint_location("s3://no-such-bucket/x")
    with pytest.raises(StepError, match="neither an s3"):
        fingerprint_location(str(tmp_path / "missing"))
    with pytest.raises(StepError, match="KEY=VALUE"):
        parse_arguments(["epochs"])
    assert parse_arguments(
        ["epochs=3", "arch=resnet18", "deploy=false", "model_name=2024", "lr=1", 'node_selector={"a": "b"}']
    ) == {
        "epochs": 3,
        "arch": "resnet18",
        "deploy": False,
        "model_name": "2024",
        "lr": 1.0,
        "node_selector": {"a": "b"},
    }
    for bad, message in [
        ("bogus=1", "no parameter 'bogus'"),
        ("epochs=ten", "expected integer"),
        ("deploy=maybe", "expected true or false"),
        ("tolerations={}", "expected a JSON list"),
    ]:
        with pytest.raises(StepError, match=message):
            parse_arguments([bad])


# The smallest run in which a model learns: ImageNet EfficientNet-Lite0 features (shipped offline), a
# frozen backbone and a new head, as `make demo` trains. Chance on 4 categories is 0.25; a first
# promotion must pass this floor, so a model that learned nothing has no @champion and the run fails.
FLOOR = 0.5


def test_whole_pipeline_under_kfp_local_from_s3(s3, sample_raw, tmp_path, monkeypatch, capsys):
    raw = _small_raw(sample_raw, tmp_path / "raw", photos=8)
    _upload(s3, "catalogue", raw, "raw")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    arguments = {
        "data_location": "s3://catalogue/raw",
        "model_name": "pipeline-test",
        "image_size": 128,
        "val_fraction": 0.25,
        "test_fraction": 0.25,
        "augmentations": "mirror",
        "arch": "efficientnet_lite0",
        "pretrained": "imagenet",
        "freeze_backbone": True,
        "epochs": 3,
        "batch_size": 8,
        "train_image_size": 112,
        "lr": 0.05,
        "min_accuracy": FLOOR,
        "launcher": "local",
        "audit": True,
        "audit_k": 3,
    }
    report = run_locally(arguments, tmp_path / "work")
    _check_quiet_output(capsys.readouterr().out, tmp_path / "work")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("pipeline-test", "champion")
    assert champion.run_id == report["source_run"]
    # The first version passed a floor twice chance, on test photos it never trained on, and the
    # accuracy the registry shows is the one evaluate measured, photo by photo.
    assert report["champion_version"] == str(champion.version) == "1"
    assert champion.tags["promotion.decision"] == "promoted"
    assert float(champion.tags["promotion.min_accuracy"]) == FLOOR
    accuracy = float(champion.tags["test_top1_accuracy"])
    assert accuracy >= FLOOR
    run_root = next((tmp_path / "work" / "pipeline-root").iterdir())
    evaluation = run_root / "evaluate-model" / "evaluation"
    metrics = json.loads((evaluation / "metrics.json").read_text())
    rows = (evaluation / "predictions.csv").read_text().splitlines()[1:]
    split_photos = read_split_photos(run_root / "split-photos" / "splits")  # its manifest: no photo copied
    assert not list((run_root / "split-photos" / "splits").rglob("*.jpg"))
    test_photos = [p for p in split_photos if p.split == "test"]
    assert len(rows) == metrics["counts"]["images"] == len(test_photos) == int(champion.tags["test_images"])
    assert metrics["top1_accuracy"] == pytest.approx(accuracy)
    run = client.get_run(champion.run_id)
    assert run.data.params["arch"] == "efficientnet_lite0"
    assert "test_top1_accuracy" in run.data.metrics  # evaluation logged to the training run
    tasks = {p.name for p in next((tmp_path / "work" / "pipeline-root").iterdir()).iterdir()}
    assert {"clean-photos", "train-model", "evaluate-model", "promote-model", "audit-catalogue"} <= tasks
    audit_dir = next((tmp_path / "work" / "pipeline-root").iterdir()) / "audit-catalogue"
    assert (audit_dir / "report" / "report.md").is_file() and (
        audit_dir / "report" / "mislabelled.csv"
    ).is_file()
    assert "deploy-model" not in tasks  # deploy is off for local runs
    logged = {a.path for a in client.list_artifacts(champion.run_id, "audit")}
    assert "audit/report.html" in logged  # the review page beside the evaluation's report

    # The first promotion froze the test photos; the training run's own photos are not among them.
    frozen = {p.sha256 for p in split_photos if p.split == "test"}
    trained_on = {p.sha256[:16] for p in split_photos if p.split != "test"}
    registered = client.get_registered_model("pipeline-test")
    assert registered.tags["evaluation_set.photos"] == str(len(frozen)) and frozen
    listed = client.download_artifacts(champion.run_id, "data/training_photos.txt.gz", str(tmp_path / "dl"))
    with gzip.open(listed, "rt") as handle:
        assert set(handle.read().split()) == trained_on
    # A second run that re-splits with another seed keeps every frozen photo (and its group) in test,
    # and its gate scores on exactly that set.
    again = run_locally({**arguments, "split_seed": 5, "audit": False}, tmp_path / "work2")
    second_root = next((tmp_path / "work2" / "pipeline-root").iterdir())
    second = json.loads((second_root / "split-photos" / "splits" / "split.json").read_text())
    second_photos = read_split_photos(second_root / "split-photos" / "splits")
    assert {p.sha256 for p in second_photos if p.split == "test"} >= frozen
    assert second["frozen"] == {"photos": len(frozen), "found": len(frozen), "missing": 0}
    candidate = client.get_model_version("pipeline-test", "2")
    assert candidate.tags["promotion.evaluation_photos"] == str(len(frozen))
    # @champion is where the gate's recorded decision says it is.
    decided = candidate.tags["promotion.decision"]
    assert decided in ("promoted", "rejected")
    assert again["champion_version"] == ("2" if decided == "promoted" else "1")
    assert (
        str(client.get_model_version_by_alias("pipeline-test", "champion").version)
        == again["champion_version"]
    )
    if decided == "promoted":
        assert str(client.get_model_version_by_alias("pipeline-test", "previous").version) == "1"


def _check_quiet_output(out: str, workdir: Path) -> None:
    """`pipeline run` shows one line per task as it finishes; kfp.local's whole log is in the file."""
    lines = out.splitlines()
    log = workdir / "pipeline.log"
    assert lines[0] == f"pipeline: running under kfp.local; the full log is in {log.resolve()}"
    warnings = [line for line in lines[1:] if line.startswith("      warning: ")]  # a step's, under its task
    tasks = [
        re.match(r"^  (\S+)\s+SUCCESS\s+\d+\.\d s  (.+)$", line) for line in lines[1:] if line not in warnings
    ]
    assert all(tasks), out
    names = [m.group(1) for m in tasks]
    assert sorted(names) == sorted([*(s for s in STEPS if s != "deploy-model"), "audit-catalogue"])
    assert names.index("clean-photos") < names.index("split-photos") < names.index("train-model")
    summary = dict(m.groups() for m in tasks)
    assert summary["fetch-photos"] == "32 photos"
    assert summary["clean-photos"].startswith("32 files, ")  # clean's own summary, its name left out
    assert summary["promote-model"] == "PROMOTED: @champion -> version 1"
    assert "top-1 " in summary["evaluate-model"] and "test photos" in summary["evaluate-model"]
    full = log.read_text()
    assert "Got executor_input" in full and "Got executor_input" not in out  # the executor JSON
    for name in names:
        assert f"Executing task '{name}'" in full  # in the log, without the terminal's colours
    assert "\x1b[" not in full
    assert "non-Python base image" not in out + full  # kfp's warning for every task; said once instead
