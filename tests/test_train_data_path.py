"""The training data paths (`--decode cpu|gpu`) and the loop's every-N-steps host reads, on a CPU.

The GPU decoder itself needs CUDA; here `--decode gpu` runs the same bytes path with torchvision's
CPU `decode_jpeg`, which shows the geometry, the fallbacks and the accounting. Photos are real
sample photos or small drawn ones at 32 px; the loop tests train a two-layer network (this shared
machine runs a ResNet-18 step in seconds when loaded), the end-to-end run a ResNet-18.
"""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from imagefactory import split_tree
from PIL import Image
from torch import nn

from shopvision.components.errors import StepError
from shopvision.components.training.gpu_decode import (
    RATIO,
    SCALE,
    BytesBatchPreparer,
    collate_bytes,
    crop_flip_for,
    resolve_decode,
    sample_crop_flip,
)
from shopvision.components.training.models import ModelSpec
from shopvision.components.training.train import (
    TrainConfig,
    _Preemption,
    autocast_factory,
    run,
    train_one_epoch,
)
from shopvision.components.training.train_data import TrainPhotos, loaders

CPU = SimpleNamespace(rank=0, world_size=1, distributed=False, device=torch.device("cpu"))


def _asymmetric_photo(path: Path, width: int = 72, height: int = 40) -> None:
    """Four colour blocks of unequal size and a diagonal ramp: no flip or shift maps it onto itself."""
    image = Image.new("RGB", (width, height))
    pixels = image.load()
    for x in range(width):
        for y in range(height):
            block = (x < width // 3) + 2 * (y < height // 4)
            pixels[x, y] = ((60 * block + 3 * x) % 256, (5 * y + x) % 256, (200 - 40 * block) % 256)
    image.save(path, quality=95)


def test_crop_boxes_follow_torchvision_random_resized_crop_limits():
    rng, flips = random.Random(0), 0
    for _ in range(500):
        box = sample_crop_flip(rng, 40, 72)
        assert box.top >= 0 and box.top + box.height <= 40 and box.left >= 0 and box.left + box.width <= 72
        flips += box.flip
        area = box.height * box.width / (40 * 72)
        assert SCALE[0] * 0.8 <= area <= SCALE[1]  # rounding to whole pixels moves the area a little
        assert RATIO[0] * 0.85 <= box.width / box.height <= RATIO[1] / 0.85
    assert 150 < flips < 350
    assert crop_flip_for(0, 1, 7, 40, 72) == crop_flip_for(0, 1, 7, 40, 72)
    assert len({crop_flip_for(0, epoch, 7, 40, 72) for epoch in range(20)}) > 15  # a new box each epoch


def test_gpu_path_gives_the_cpu_path_geometry_on_an_asymmetric_photo(tmp_path):
    (tmp_path / "train" / "shape").mkdir(parents=True)
    _asymmetric_photo(tmp_path / "train" / "shape" / "photo.jpg")
    spec = ModelSpec("resnet18", ["shape"], image_size=32)
    cpu_path = TrainPhotos(tmp_path / "train", spec.labels, spec, seed=3, decode="cpu")
    bytes_path = TrainPhotos(tmp_path / "train", spec.labels, spec, seed=3, decode="gpu")
    prepare = BytesBatchPreparer(bytes_path, spec, 3, torch.device("cpu"), torch.float32, False)
    flips = set()
    for epoch in range(12):
        expected, _ = cpu_path[(0, epoch)]
        images, targets = prepare(collate_bytes([bytes_path[(0, epoch)]]))
        assert images.shape == (1, 3, 32, 32) and targets.tolist() == [0]
        assert torch.allclose(images[0], expected, atol=1e-5), epoch
        # The photo is asymmetric enough that a flipped or shifted crop would not pass the check above.
        assert (expected - expected.flip(-1)).abs().mean() > 0.2
        flips.add(crop_flip_for(3, epoch, 0, 40, 72).flip)
    assert flips == {True, False}
    assert prepare.stats.on_device == 12 and prepare.stats.fallback == 0
    other_seed, _ = TrainPhotos(tmp_path / "train", spec.labels, spec, seed=4, decode="cpu")[(0, 0)]
    assert not torch.allclose(other_seed, cpu_path[(0, 0)][0])


def test_png_in_a_jpeg_folder_falls_back_to_pillow_and_is_counted(tmp_path, sample_raw, capsys):
    data = split_tree(tmp_path, sample_raw, categories=1, per_category=3)
    category = next((data / "train").iterdir())
    png = category / "drawn.png"
    _asymmetric_photo(tmp_path / "drawn.jpg")
    Image.open(tmp_path / "drawn.jpg").save(png)
    spec = ModelSpec("resnet18", [category.name], image_size=32)
    train_loader, _, sampler = loaders(data, spec, CPU, 4, 0, seed=0, decode="gpu")
    sampler.set_epoch(2)
    prepare = BytesBatchPreparer(train_loader.dataset, spec, 0, torch.device("cpu"), torch.float32, False)
    batch = next(iter(train_loader))
    images, _ = prepare(batch)
    assert images.shape == (4, 3, 32, 32)
    assert (prepare.stats.fallback, prepare.stats.on_device) == (1, 3)
    assert f"{png}: not a JPEG" in capsys.readouterr().err
    # The fallback photo is decoded and augmented exactly as the CPU path does it.
    index = [p for p, _ in train_loader.dataset.samples].index(png)
    cpu_path = TrainPhotos(data / "train", spec.labels, spec, seed=0, decode="cpu")
    assert torch.equal(images[batch[2].index(index)], cpu_path[(index, 2)][0])


def test_a_jpeg_no_decoder_reads_is_a_clear_error(tmp_path, sample_raw):
    data = split_tree(tmp_path, sample_raw, categories=1, per_category=1)
    photo = next((data / "train").rglob("*.jpg"))
    whole = photo.read_bytes()
    photo.write_bytes(whole[: len(whole) // 2])  # the header reads; the batched decoder refuses it
    spec = ModelSpec("resnet18", [photo.parent.name], image_size=32)
    dataset = TrainPhotos(data / "train", spec.labels, spec, seed=0, decode="gpu")
    prepare = BytesBatchPreparer(dataset, spec, 0, torch.device("cpu"), torch.float32, False)
    with pytest.raises(StepError, match="cannot read training photo"):
        prepare(collate_bytes([dataset[(0, 0)]]))
    assert prepare.stats.fallback == 1


def test_decode_auto_picks_cpu_without_cuda_and_unknown_modes_are_refused():
    assert resolve_decode("auto", torch.device("cpu")) == "cpu"
    assert resolve_decode("auto", torch.device("cuda", 0)) == "gpu"
    assert resolve_decode("gpu", torch.device("cpu")) == "gpu"
    with pytest.raises(StepError, match="choose from cpu, gpu, auto"):
        resolve_decode("dali", torch.device("cpu"))


def _tiny_net(classes: int) -> nn.Module:
    """The same initial weights every call: convolution, batch norm, pooling, classifier."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, classes),
    )  # fmt: skip


def _epoch(data: Path, decode: str, sync_every: int | None, steps: int = 6, **cfg_extra):
    """One epoch at 32 px from the same initial weights; returns metrics, curve and model."""
    labels = sorted(p.name for p in (data / "train").iterdir())
    spec = ModelSpec("resnet18", labels, image_size=32)
    model = _tiny_net(len(labels))
    cfg = TrainConfig(
        data=str(data), out="", batch_size=4, workers=0, image_size=32, decode=decode,
        sync_every=sync_every, max_steps_per_epoch=steps, **cfg_extra,
    )  # fmt: skip
    loader, _, sampler = loaders(data, spec, CPU, cfg.batch_size, 0, 0, decode)
    sampler.set_epoch(1)
    prepare = (
        BytesBatchPreparer(loader.dataset, spec, 0, CPU.device, torch.float32, False)
        if decode == "gpu"
        else None
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    curve: list = []
    # aot_eager: Dynamo and AOTAutograd trace the model as `--compile` does, without inductor's C++
    # build, which takes minutes on this machine.
    net = torch.compile(model, backend="aot_eager") if cfg.compile else model
    metrics = train_one_epoch(
        net, loader, optimizer, nn.CrossEntropyLoss(), CPU, autocast_factory(cfg, CPU), cfg,
        SimpleNamespace(requested=False), prepare, curve,
    )  # fmt: skip
    return metrics, curve, model


def _per_step_reference(data: Path, steps: int = 6):
    """The loop as it was: loss.item() and the accuracy read on the host after every step."""
    labels = sorted(p.name for p in (data / "train").iterdir())
    spec = ModelSpec("resnet18", labels, image_size=32)
    model = _tiny_net(len(labels)).train()
    loader, _, sampler = loaders(data, spec, CPU, 4, 0, 0, "cpu")
    sampler.set_epoch(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_sum, correct, seen, means = 0.0, 0, 0, []
    for step, (images, targets) in enumerate(loader):
        if step >= steps:
            break
        logits = model(images)
        loss = nn.functional.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(targets)
        correct += int(logits.argmax(1).eq(targets).sum())
        seen += len(targets)
        means.append(loss_sum / seen)
    return loss_sum / seen, 1 - correct / seen, means, model


def test_every_n_steps_accounting_equals_per_step_accounting(tmp_path, sample_raw):
    data = split_tree(tmp_path, sample_raw, per_category=8)  # 24 photos: 6 steps of 4
    loss, error, means, reference = _per_step_reference(data)
    per_step, curve1, model1 = _epoch(data, "cpu", 1)
    every4, curve4, model4 = _epoch(data, "cpu", 4)
    assert per_step["train_loss"] == every4["train_loss"] == pytest.approx(loss, rel=1e-12)
    assert per_step["train_top1_error"] == every4["train_top1_error"] == pytest.approx(error, abs=1e-12)
    # The curve read every step is the per-step loop's running mean; every 4th step, the same points.
    assert [s for s, _ in curve1] == list(range(1, 7)) and [s for s, _ in curve4] == [4, 6]
    assert [m for _, m in curve1] == pytest.approx(means, rel=1e-12)
    assert dict(curve4) == pytest.approx({s: m for s, m in curve1 if s in (4, 6)}, rel=1e-12)
    for a, b, c in zip(reference.parameters(), model1.parameters(), model4.parameters(), strict=True):
        assert torch.equal(a, b) and torch.equal(b, c)


def test_gpu_decode_path_trains_like_the_cpu_path(tmp_path, sample_raw):
    data = split_tree(tmp_path, sample_raw, per_category=8)
    cpu, cpu_curve, _ = _epoch(data, "cpu", 2)
    gpu, gpu_curve, _ = _epoch(data, "gpu", 2)
    assert gpu["train_loss"] == pytest.approx(cpu["train_loss"], rel=1e-4)
    assert [s for s, _ in gpu_curve] == [s for s, _ in cpu_curve]
    assert (gpu["decode_fallbacks"], gpu["decoded_on_device"]) == (0, 24)


def test_sigterm_stops_the_loop_within_sync_every_steps(tmp_path, sample_raw):
    data = split_tree(tmp_path, sample_raw, categories=2, per_category=12)
    labels = sorted(p.name for p in (data / "train").iterdir())
    spec = ModelSpec("resnet18", labels, image_size=32)
    loader, _, _ = loaders(data, spec, CPU, 2, 0, 0, "cpu")

    class SignalAtBatch5:
        dataset = loader.dataset

        def __iter__(self):
            for i, batch in enumerate(loader):
                if i == 5:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield batch

    preemption = _Preemption()
    try:
        model = _tiny_net(len(labels))
        cfg = TrainConfig(data=str(data), out="", sync_every=4, max_steps_per_epoch=None)
        curve: list = []
        result = train_one_epoch(
            model, SignalAtBatch5(), torch.optim.SGD(model.parameters(), lr=0.01), nn.CrossEntropyLoss(),
            CPU, autocast_factory(cfg, CPU), cfg, preemption, None, curve,
        )  # fmt: skip
    finally:
        preemption.restore()
    assert result == {"interrupted": True}
    assert [s for s, _ in curve] == [4, 8]  # SIGTERM before step 5; the read at step 8 stopped it


def test_runs_with_sync_every_1_and_2_log_the_same_history(tmp_path, sample_raw):
    data = split_tree(tmp_path / "data", sample_raw, categories=2, per_category=4)  # 2 steps per epoch
    histories = []
    for every in (1, 2):
        out = tmp_path / f"out{every}"
        cfg = TrainConfig(
            data=str(data), out=str(out), arch="resnet18", epochs=2, batch_size=4, workers=0, lr=0.05,
            image_size=32, sync_every=every, decode="gpu",
            tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="tests",
        )  # fmt: skip
        run(cfg)
        lines = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
        drop = ("images_per_second",)
        histories.append([{k: v for k, v in h.items() if k not in drop} for h in lines])
    assert histories[0] == histories[1]
    assert [h["epoch"] for h in histories[0]] == [0, 1]
    assert all(h["decode_fallbacks"] == 0 for h in histories[0])


def test_compiled_model_trains_like_eager_with_every_n_reads(tmp_path, sample_raw):
    """--compile wraps the model only; the device counters and the bytes path sit outside it, so the
    compiled model (traced by Dynamo/AOTAutograd) gives the eager losses with reads every 2 steps."""
    data = split_tree(tmp_path, sample_raw, per_category=4)  # 12 photos: 3 steps of 4
    eager, eager_curve, _ = _epoch(data, "gpu", 2, steps=3)
    compiled, compiled_curve, _ = _epoch(data, "gpu", 2, steps=3, compile=True)
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4)
    assert compiled["train_top1_error"] == eager["train_top1_error"]
    assert [s for s, _ in compiled_curve] == [s for s, _ in eager_curve] == [2, 3]
