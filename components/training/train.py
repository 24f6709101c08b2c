"""The train step: a torchvision ResNet (or EfficientNet-Lite0) with DDP, tracked in MLflow.

Runs as one torchrun worker (or a single process). Reads top to bottom like the torchvision
reference recipe: build the model, load the data, then for each epoch `train_one_epoch`, `evaluate`,
checkpoint and log. Side effects that must happen once (MLflow, files) happen on rank 0 only, in
`RunRecorder`.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import StepError
from . import checkpoints, distributed
from .models import (
    ModelSpec,
    build_model,
    eval_transform,
    head_prefix,
    load_backbone,
    save_classifier,
    train_transform,
)
from .train_data import loaders, train_labels
from .train_record import RunRecorder

BEST_MODEL_DIR = "model_best"


@dataclass
class TrainConfig:
    data: str
    out: str
    arch: str = "resnet34"
    epochs: int = 10
    batch_size: int = 32
    workers: int = 2
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    image_size: int = 224
    pretrained: str | None = None
    freeze_backbone: bool = False
    resume: str | None = None  # "auto", a checkpoint path, or None
    keep_checkpoints: int = 3
    amp: str = "auto"  # auto (bf16 on GPU), bf16, off
    channels_last: bool = True
    compile: bool = False
    seed: int = 0
    device: str = "auto"
    tracking_uri: str | None = None
    experiment: str = "shopvision"
    run_name: str | None = None
    max_steps_per_epoch: int | None = None  # for smoke tests on big data


class _Preemption:
    """Remembers a SIGTERM so the loop can checkpoint at the next step instead of dying mid-write."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def top_k_correct(logits: torch.Tensor, targets: torch.Tensor, k: int) -> tuple[int, int]:
    """Correct counts at top-1 and top-k for a batch."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    hits = top.eq(targets[:, None])
    return int(hits[:, 0].sum()), int(hits.any(dim=1).sum())


def train_one_epoch(model, loader, optimizer, criterion, ctx, autocast, cfg, preemption) -> dict:
    model.train()
    if cfg.freeze_backbone:
        # A frozen backbone keeps its normalisation statistics too, or its features drift under the head.
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    loss_sum, seen, started = 0.0, 0, time.monotonic()
    for step, (images, targets) in enumerate(loader):
        if distributed.any_rank(preemption.requested, ctx):
            return {"interrupted": True}
        if cfg.max_steps_per_epoch and step >= cfg.max_steps_per_epoch:
            break
        images = images.to(ctx.device, non_blocking=True)
        targets = targets.to(ctx.device, non_blocking=True)
        if cfg.channels_last and ctx.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast():
            loss = criterion(model(images), targets)
        if not torch.isfinite(loss):
            raise StepError(f"training diverged: loss is {loss.item()} at step {step}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(targets)
        seen += len(targets)
    loss_total, seen_total = distributed.all_reduce_sum([loss_sum, seen], ctx)
    elapsed = time.monotonic() - started
    return {
        "train_loss": loss_total / max(seen_total, 1),
        "images_per_second": seen_total / max(elapsed, 1e-9),
    }


@torch.inference_mode()
def evaluate(model, loader, criterion, ctx, autocast) -> dict:
    """Top-1/top-5 error over the whole val set: every rank sums its shard, then all-reduce."""
    model.eval()
    loss_sum, correct1, correct5, count = 0.0, 0, 0, 0
    for images, targets in loader:
        images, targets = images.to(ctx.device), targets.to(ctx.device)
        with autocast():
            logits = model(images)
        loss_sum += criterion(logits.float(), targets).item() * len(targets)
        c1, c5 = top_k_correct(logits, targets, 5)
        correct1, correct5, count = correct1 + c1, correct5 + c5, count + len(targets)
    loss_sum, correct1, correct5, count = distributed.all_reduce_sum(
        [loss_sum, correct1, correct5, count], ctx
    )
    return {
        "val_loss": loss_sum / count,
        "val_top1_error": 1 - correct1 / count,
        "val_top5_error": 1 - correct5 / count,
        "val_images": count,
    }


def is_better(metrics: dict, best: dict | None) -> bool:
    """Lowest top-1 error wins; a tie goes to the lower top-5 error."""
    if best is None:
        return True
    return (metrics["val_top1_error"], metrics["val_top5_error"]) < (
        best["val_top1_error"],
        best["val_top5_error"],
    )


def autocast_factory(cfg: TrainConfig, ctx):
    """A no-argument context factory: bf16 autocast on GPU (or when asked), a disabled one otherwise."""
    use_bf16 = cfg.amp == "bf16" or (cfg.amp == "auto" and ctx.device.type == "cuda")
    if use_bf16:
        return lambda: torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16)
    return lambda: torch.autocast(device_type=ctx.device.type, enabled=False)


def build_training_model(cfg: TrainConfig, spec: ModelSpec, ctx) -> tuple[nn.Module, list[str]]:
    """The model on its device as training sees it (pretrained backbone, frozen parts, memory layout),
    and notes for the run's log. Public so bench/train_throughput.py measures exactly this."""
    from .weights import fetch_pretrained

    model = build_model(spec)
    notes = []
    if cfg.pretrained:
        left = load_backbone(model, spec.arch, fetch_pretrained(cfg.pretrained, spec.arch))
        notes.append(
            f"pretrained backbone from {cfg.pretrained}; {len(left)} tensors left at init (the head)"
        )
    if cfg.freeze_backbone:
        head = head_prefix(spec.arch)
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.startswith(head)
    model = model.to(ctx.device)
    if cfg.channels_last and ctx.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, notes


def run(cfg: TrainConfig) -> dict:
    """Train to the end (or to pre-emption); returns the best metrics. Called on every rank."""
    ctx = distributed.init(cfg.device)
    try:
        return _run(cfg, ctx)
    finally:
        distributed.shutdown()


def _run(cfg: TrainConfig, ctx) -> dict:
    data, out = Path(cfg.data), Path(cfg.out)
    torch.manual_seed(cfg.seed + ctx.rank)
    labels = train_labels(data)
    spec = ModelSpec(cfg.arch, labels, image_size=cfg.image_size)
    model, notes = build_training_model(cfg, spec, ctx)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs, 1))
    scaler = torch.amp.GradScaler(enabled=False)  # bf16 needs no loss scaling; kept for checkpoint format
    start_epoch, best, resumed_run = 0, None, None
    checkpoint_path = _resume_path(cfg, out)
    if checkpoint_path:
        state = checkpoints.load(checkpoint_path)
        if state["spec"]["labels"] != labels or state["spec"]["arch"] != cfg.arch:
            raise StepError(f"{checkpoint_path} was trained on other categories or another architecture")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best, resumed_run = state["epoch"], state.get("best"), state.get("mlflow_run_id")
        checkpoints.restore_rng(state["rng"])
        torch.manual_seed(cfg.seed + ctx.rank + 1000 * start_epoch)
        notes.append(f"resumed from {checkpoint_path} at epoch {start_epoch}")
    net = (
        DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
        if ctx.distributed
        else model
    )
    if cfg.compile:
        net = torch.compile(net)
    train_loader, val_loader, sampler = loaders(
        data, labels, train_transform(spec), eval_transform(spec), ctx, cfg.batch_size, cfg.workers, cfg.seed
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    autocast = autocast_factory(cfg, ctx)
    preemption = _Preemption()
    recorder = RunRecorder(cfg, ctx, spec, resumed_run) if ctx.is_main else None
    if recorder:
        recorder.start(
            data,
            world_size=ctx.world_size,
            device=str(ctx.device),
            notes=notes,
            train_images=len(train_loader.dataset),
            val_images=len(val_loader.dataset),
        )

    def state_at(next_epoch: int) -> dict:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": next_epoch,
            "best": best,
            "rng": checkpoints.rng_state(),
            "spec": json.loads(spec.to_json()),
            "config": asdict(cfg),
            "mlflow_run_id": recorder.run_id if recorder else None,
        }

    try:
        for epoch in range(start_epoch, cfg.epochs):
            sampler.set_epoch(epoch)
            lr = optimizer.param_groups[0]["lr"]
            trained = train_one_epoch(net, train_loader, optimizer, criterion, ctx, autocast, cfg, preemption)
            if trained.get("interrupted"):
                if ctx.is_main:
                    checkpoints.save_interrupted(out, state_at(epoch))
                    recorder.interrupted(epoch)
                distributed.barrier(ctx)
                raise Preempted(epoch, out)
            metrics = {**trained, **evaluate(net, val_loader, criterion, ctx, autocast), "lr": lr}
            scheduler.step()
            improved = is_better(metrics, best)
            if improved:
                best = {"epoch": epoch, **metrics}
            if ctx.is_main:
                checkpoints.save(
                    out, state_at(epoch + 1), epoch=epoch, is_best=improved, keep=cfg.keep_checkpoints
                )
                if improved:
                    save_classifier(out / BEST_MODEL_DIR, model, spec)
                recorder.epoch(epoch, metrics, improved)
            distributed.barrier(ctx)
        if ctx.is_main:
            recorder.finish(out / BEST_MODEL_DIR, best)
    finally:
        preemption.restore()
    return best or {}


def _resume_path(cfg: TrainConfig, out: Path) -> Path | None:
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        latest = out / checkpoints.LATEST
        return latest if latest.is_file() else None
    path = Path(cfg.resume)
    if not path.is_file():
        raise StepError(f"--resume {cfg.resume}: no such checkpoint")
    return path


class Preempted(Exception):
    """SIGTERM arrived: a checkpoint was written; the CLI exits with 143 and a resume hint."""

    def __init__(self, epoch: int, out: Path) -> None:
        super().__init__(
            f"pre-empted (SIGTERM) during epoch {epoch}: checkpoint written to {out / checkpoints.LATEST}; "
            f"run again with --resume auto to continue"
        )
