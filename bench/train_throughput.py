"""Benchmark: training images/s per data path and batch size, against the model alone and the
torchvision reference recipe.

Why this exists: the training issues ask that `shopvision train` keep a GPU busy, at least 3,000
images/s per GPU for ResNet-50 at 224 px including data loading from JPEG files. A number alone says
little (it depends on the device, the cores feeding it and the photo size), so for each depth and
batch size it measures, in one run, on the same photos and loader workers:

- **synthetic**: the loop of `shopvision train` (`train_one_epoch()`, the model from
  `build_training_model()`, bf16 autocast and channels_last on GPU) fed one batch of random tensors
  already on the device: what the model and loop can do with no data loading at all;
- **decode cpu**: the same loop fed by `loaders(decode="cpu")`: Pillow decode and augmentation in the
  loader workers;
- **decode gpu**: the same loop fed by `loaders(decode="gpu")`: workers read bytes, the batch is
  decoded with `decode_jpeg(device="cuda")` and augmented on the GPU (on a CPU: torchvision's CPU
  decoder in the training process);
- **reference**: the loop of torchvision's `references/classification/train.py` with its defaults
  (`ImageFolder` with PIL decoding, fp32, contiguous layout, the loss read every step).

The gap between synthetic and a decode column is what the data path costs. Each run warms up
(`--warmup` steps, not timed: cuDNN autotuning, loader workers starting), then times `--steps` steps
from the first batch request to the host read of the counters after the last step. On a GPU it also
samples the GPU's utilisation (nvidia-smi) during the timed steps.

    .venv/bin/python bench/train_throughput.py                       # ResNet-18/34/50 at 224 px
    .venv/bin/python bench/train_throughput.py --depths 50 --batch-sizes 128,256 --workers 16 --steps 50

Photos: `--raw` (default: the grocery-store set in ../shared when present, else the project's sample)
is cleaned into a temporary folder, then linked as often as needed so that one epoch holds every timed
step. Nothing is written into the repository.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from shopvision.components.data.clean import clean
from shopvision.components.training import distributed
from shopvision.components.training.models import ModelSpec
from shopvision.components.training.train import (
    TrainConfig,
    autocast_factory,
    batch_preparer,
    build_training_model,
    train_one_epoch,
)
from shopvision.components.training.train_data import loaders

REPO_ROOT = Path(__file__).resolve().parents[1]
GROCERY = REPO_ROOT.parent / "shared" / "datasets" / "grocery-store" / "raw"
SAMPLE = REPO_ROOT / "data" / "sample" / "raw"
GPU_GOAL = 3000.0  # images/s per GPU, ResNet-50 at 224 px, bf16, channels_last


def prepare_photos(raw: Path, work: Path, images_needed: int) -> Path:
    """Clean RAW into WORK/data/{train,val}; train is hard-linked up to `images_needed` photos."""
    cleaned = work / "cleaned"
    clean(raw, cleaned, size=224)
    data = work / "data"
    photos = sorted(cleaned.glob("*/*.jpg"))
    if not photos:
        sys.exit(f"error: no photo in {raw} could be cleaned")
    rounds = -(-images_needed // len(photos))
    for category in sorted({p.parent.name for p in photos}):
        (data / "train" / category).mkdir(parents=True)
        (data / "val" / category).mkdir(parents=True)
    for photo in photos:
        os.link(photo, data / "val" / photo.parent.name / photo.name)
        for k in range(rounds):
            os.link(photo, data / "train" / photo.parent.name / f"{photo.stem}.copy{k}.jpg")
    return data


class SyntheticBatches:
    """One batch of random photos, already on the device in the model's layout, `steps` times."""

    def __init__(self, batch_size: int, classes: int, image_size: int, ctx, channels_last: bool) -> None:
        images = torch.randn(batch_size, 3, image_size, image_size, device=ctx.device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        self.batch = images, torch.randint(0, classes, (batch_size,), device=ctx.device)
        self.steps = 0

    def __iter__(self):
        return (self.batch for _ in range(self.steps))


class GpuUtilisation:
    """Mean GPU utilisation (%) while the block runs, from `nvidia-smi -lms 100`; None without it."""

    def __init__(self, device: torch.device) -> None:
        self.command = shutil.which("nvidia-smi") if device.type == "cuda" else None
        self.index = device.index or 0
        self.mean: float | None = None

    def __enter__(self):
        self.process = None
        if self.command:
            query = [self.command, f"--id={self.index}", "--query-gpu=utilization.gpu"]
            query += ["--format=csv,noheader,nounits", "-lms", "100"]
            self.process = subprocess.Popen(query, stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.process:
            self.process.terminate()
            samples = [float(v) for v in self.process.communicate()[0].split() if v.isdigit()]
            self.mean = sum(samples) / len(samples) if samples else None


def shopvision_run(
    data: Path, depth: int, batch_size: int, mode: str, args, ctx
) -> tuple[float, float | None]:
    """images/s (and GPU utilisation) of `shopvision train`'s loop fed by `mode`: synthetic, cpu, gpu."""
    labels = sorted(p.name for p in (data / "train").iterdir())
    cfg = TrainConfig(
        data=str(data),
        out="",
        arch=f"resnet{depth}",
        batch_size=batch_size,
        workers=args.workers,
        image_size=args.image_size,
        device=args.device,
        decode=mode if mode != "synthetic" else "cpu",
        sync_every=args.sync_every,
    )
    spec = ModelSpec(cfg.arch, labels, image_size=cfg.image_size)
    model, _ = build_training_model(cfg, spec, ctx)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    channels_last = cfg.channels_last and ctx.device.type == "cuda"
    if mode == "synthetic":
        loader, prepare = SyntheticBatches(batch_size, len(labels), cfg.image_size, ctx, channels_last), None
    else:
        loader, _, _ = loaders(data, spec, ctx, batch_size, cfg.workers, 0, mode)
        prepare = batch_preparer(cfg, ctx, mode, loader.dataset, spec)
    criterion, autocast = nn.CrossEntropyLoss(), autocast_factory(cfg, ctx)
    not_preempted = SimpleNamespace(requested=False)

    def steps(count: int) -> dict:
        cfg.max_steps_per_epoch = count
        if isinstance(loader, SyntheticBatches):
            loader.steps = count
        return train_one_epoch(
            model, loader, optimizer, criterion, ctx, autocast, cfg, not_preempted, prepare
        )

    steps(args.warmup)
    with GpuUtilisation(ctx.device) as utilisation:
        measured = steps(args.steps)
    if measured.get("decode_fallbacks"):
        print(f"note: {measured['decode_fallbacks']:.0f} photos fell back to Pillow in decode {mode}")
    return measured["images_per_second"], utilisation.mean


def reference_loader(data: Path, args, device: torch.device) -> torch.utils.data.DataLoader:
    """torchvision's reference data pipeline: ImageFolder (PIL), RandomResizedCrop + flip.

    Its loader workers persist across the warm-up and the timed steps, as ours do (`loaders()`):
    otherwise the reference would start its workers again inside the timed steps and lose time that
    has nothing to do with its loop.
    """
    import torchvision
    from torchvision import transforms

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(args.image_size),
            transforms.RandomHorizontalFlip(),
            transforms.PILToTensor(),
            transforms.ConvertImageDtype(torch.float),
            transforms.Normalize(mean, std),
        ]
    )
    dataset = torchvision.datasets.ImageFolder(str(data / "train"), transform)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
    )


def reference_run(data: Path, depth: int, batch_size: int, args, device: torch.device) -> float:
    """torchvision's reference recipe, defaults: ImageFolder (PIL), fp32, contiguous tensors."""
    import torchvision

    loader = reference_loader(data, SimpleNamespace(**{**vars(args), "batch_size": batch_size}), device)
    classes = len(loader.dataset.classes)
    model = getattr(torchvision.models, f"resnet{depth}")(num_classes=classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss()
    model.train()

    def steps(count: int) -> float:
        started, seen = time.monotonic(), 0
        for step, (images, targets) in enumerate(loader):
            if step >= count:
                break
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            loss = criterion(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss.item()  # the reference logs the loss every step, which waits for the GPU
            seen += len(targets)
        return seen / (time.monotonic() - started)

    steps(args.warmup)
    return steps(args.steps)


MODES = ("synthetic", "cpu", "gpu", "reference")


def _ints(text: str, flag: str, parser) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        parser.error(f"{flag} must be comma-separated integers, got {text!r}")
    if any(v < 1 for v in values):
        parser.error(f"{flag} must be positive, got {text!r}")
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raw", type=Path, default=GROCERY if GROCERY.is_dir() else SAMPLE)
    parser.add_argument("--depths", default="18,34,50", help="comma-separated ResNet depths")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument(
        "--batch-sizes", "--batch-size", default=None, help="comma-separated (default: 256 on GPU, 16 on CPU)"
    )
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated from {', '.join(MODES)}")
    parser.add_argument("--workers", type=int, default=None, help="loader processes (default: all cores)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 50 GPU, 8 CPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--sync-every", type=int, default=None, help="as shopvision train's (default: its own)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args()
    if not args.raw.is_dir():
        parser.error(f"--raw {args.raw} is not a folder")
    depths = _ints(args.depths, "--depths", parser)
    if bad := [d for d in depths if d not in (18, 34, 50, 101, 152)]:
        parser.error(f"unknown ResNet depth(s) {bad}: choose from 18, 34, 50, 101, 152")
    modes = args.modes.split(",")
    if bad := [m for m in modes if m not in MODES]:
        parser.error(f"unknown mode(s) {bad}: choose from {', '.join(MODES)}")
    ctx = distributed.init(args.device)
    on_gpu = ctx.device.type == "cuda"
    batch_sizes = (
        _ints(args.batch_sizes, "--batch-sizes", parser) if args.batch_sizes else [256 if on_gpu else 16]
    )
    args.steps = args.steps or (50 if on_gpu else 8)
    if args.workers is None:
        args.workers = os.cpu_count() or 1
    if on_gpu:
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(ctx.device) if on_gpu else f"CPU, {os.cpu_count()} cores"
    print(f"device:   {name}; torch {torch.__version__}")
    print(
        f"setup:    {args.image_size} px, {args.workers} loader workers, {args.warmup} warm-up + "
        f"{args.steps} timed steps; shopvision in {'bf16 autocast, channels_last' if on_gpu else 'fp32'}, "
        f"reference in fp32; images/s (GPU utilisation %)"
    )
    with tempfile.TemporaryDirectory(prefix="shopvision-bench-train-") as work:
        data = prepare_photos(args.raw, Path(work), (args.warmup + args.steps + 1) * max(batch_sizes))
        print(f"photos:   {args.raw} ({len(list((data / 'val').glob('*/*.jpg')))} after clean)\n")
        header = "".join(f"{'decode ' + m if m in ('cpu', 'gpu') else m:>16}" for m in modes)
        print(f"{'model':10} {'batch':>5}{header}")
        for depth in depths:
            for batch_size in batch_sizes:
                cells, results = [], {}
                for mode in modes:
                    if mode == "reference":
                        rate, used = reference_run(data, depth, batch_size, args, ctx.device), None
                    else:
                        rate, used = shopvision_run(data, depth, batch_size, mode, args, ctx)
                    results[mode] = rate
                    cells.append(f"{rate:9.1f}" + (f" ({used:3.0f}%)" if used is not None else " " * 7))
                row = f"{'resnet' + str(depth):10} {batch_size:5d}" + "".join(f"{c:>16}" for c in cells)
                print(row.rstrip())
                loaded = [results[m] for m in ("cpu", "gpu") if m in results]
                if depth == 50 and on_gpu and args.image_size == 224 and loaded:
                    verdict = "meets" if max(loaded) >= GPU_GOAL else "misses"
                    print(f"{'':16} {verdict} the goal of {GPU_GOAL:,.0f} images/s per GPU with data loading")
    return 0


if __name__ == "__main__":
    sys.exit(main())
