"""Benchmark: training images/s of `shopvision train`'s loop against the torchvision reference recipe.

Why this exists: the training issue asks that `shopvision train` keep a GPU busy, at least 3,000
images/s per GPU for ResNet-50 at 224 px including data loading from JPEG files. A number alone says
little about the code (it depends on the device, the cores feeding it and the photo size), so each
depth is measured twice in the same run, on the same photos, batch size and loader workers:

- **shopvision**: the real pieces of `shopvision train` — `PhotoFolder` + `train_transform` through
  `loaders()`, the model from `build_training_model()` (channels_last on GPU) and `train_one_epoch()` with its bf16
  autocast on GPU — on one process;
- **torchvision reference**: the loop of torchvision's `references/classification/train.py` with its
  defaults: `ImageFolder` with PIL decoding, RandomResizedCrop + flip, fp32, contiguous layout.

Each run warms up (`--warmup` steps, not timed: cuDNN autotuning, loader workers starting), then times
`--steps` steps from the first batch request to the last optimizer step, data loading included. It
prints images/s for both and their ratio. On a CPU both loops spend their time in the same fp32
convolutions, so expect a ratio near 1; bf16 and channels_last pay off on a GPU.

    .venv/bin/python bench/train_throughput.py                       # ResNet-18/34/50 at 224 px
    .venv/bin/python bench/train_throughput.py --depths 50 --batch-size 256 --workers 16 --steps 50

Photos: `--raw` (default: the grocery-store set in ../shared when present, else the project's sample)
is cleaned into a temporary folder, then linked as often as needed so that one epoch holds every timed
step. Nothing is written into the repository.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from shopvision.components.data.clean import clean
from shopvision.components.training import distributed
from shopvision.components.training.models import ModelSpec, eval_transform, train_transform
from shopvision.components.training.train import (
    TrainConfig,
    autocast_factory,
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


def shopvision_run(data: Path, depth: int, args, ctx) -> float:
    labels = sorted(p.name for p in (data / "train").iterdir())
    cfg = TrainConfig(
        data=str(data),
        out="",
        arch=f"resnet{depth}",
        batch_size=args.batch_size,
        workers=args.workers,
        image_size=args.image_size,
        device=args.device,
    )
    spec = ModelSpec(cfg.arch, labels, image_size=cfg.image_size)
    model, _ = build_training_model(cfg, spec, ctx)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    train_loader, _, _ = loaders(
        data, labels, train_transform(spec), eval_transform(spec), ctx, cfg.batch_size, cfg.workers, 0
    )
    criterion, autocast = nn.CrossEntropyLoss(), autocast_factory(cfg, ctx)
    not_preempted = SimpleNamespace(requested=False)
    cfg.max_steps_per_epoch = args.warmup
    train_one_epoch(model, train_loader, optimizer, criterion, ctx, autocast, cfg, not_preempted)
    cfg.max_steps_per_epoch = args.steps
    return train_one_epoch(model, train_loader, optimizer, criterion, ctx, autocast, cfg, not_preempted)[
        "images_per_second"
    ]


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


def reference_run(data: Path, depth: int, args, device: torch.device) -> float:
    """torchvision's reference recipe, defaults: ImageFolder (PIL), fp32, contiguous tensors."""
    import torchvision

    loader = reference_loader(data, args, device)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raw", type=Path, default=GROCERY if GROCERY.is_dir() else SAMPLE)
    parser.add_argument("--depths", default="18,34,50", help="comma-separated ResNet depths")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 256 on GPU, 16 on CPU")
    parser.add_argument("--workers", type=int, default=None, help="loader processes (default: all cores)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 50 GPU, 8 CPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args()
    if not args.raw.is_dir():
        parser.error(f"--raw {args.raw} is not a folder")
    try:
        depths = [int(d) for d in args.depths.split(",")]
    except ValueError:
        parser.error(f"--depths must be comma-separated integers, got {args.depths!r}")
    if bad := [d for d in depths if d not in (18, 34, 50, 101, 152)]:
        parser.error(f"unknown ResNet depth(s) {bad}: choose from 18, 34, 50, 101, 152")
    ctx = distributed.init(args.device)
    on_gpu = ctx.device.type == "cuda"
    args.batch_size = args.batch_size or (256 if on_gpu else 16)
    args.steps = args.steps or (50 if on_gpu else 8)
    if args.workers is None:
        args.workers = os.cpu_count() or 1
    if on_gpu:
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(ctx.device) if on_gpu else f"CPU, {os.cpu_count()} cores"
    print(f"device:   {name}; torch {torch.__version__}")
    print(
        f"setup:    {args.image_size} px, batch {args.batch_size}, {args.workers} loader workers, "
        f"{args.warmup} warm-up + {args.steps} timed steps; shopvision in "
        f"{'bf16 autocast, channels_last' if on_gpu else 'fp32'}, reference in fp32"
    )
    with tempfile.TemporaryDirectory(prefix="shopvision-bench-train-") as work:
        data = prepare_photos(args.raw, Path(work), (args.warmup + args.steps + 1) * args.batch_size)
        print(f"photos:   {args.raw} ({len(list((data / 'val').glob('*/*.jpg')))} after clean)\n")
        print(f"{'model':10} {'shopvision img/s':>17} {'reference img/s':>16} {'ratio':>6}")
        for depth in depths:
            ours = shopvision_run(data, depth, args, ctx)
            reference = reference_run(data, depth, args, ctx.device)
            print(f"{'resnet' + str(depth):10} {ours:17.1f} {reference:16.1f} {ours / reference:5.2f}×")
            if depth == 50 and on_gpu and args.image_size == 224:
                verdict = "meets" if ours >= GPU_GOAL else "misses"
                print(f"           {verdict} the goal of {GPU_GOAL:,.0f} images/s per GPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
