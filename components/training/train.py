"""The train step: a torchvision ResNet (or EfficientNet-Lite0) with DDP, tracked in MLflow.

Runs as one torchrun worker (or a single process). Reads top to bottom like the torchvision
reference recipe: build the model, load the data, then for each epoch `train_one_epoch`, `evaluate`,
checkpoint and log. Side effects that must happen once (MLflow, files) happen on rank 0 only, in
`RunRecorder`.

The loop never waits for the GPU inside a step: loss and accuracy are summed into a small tensor on
the device, and the host reads it (with the pre-emption flag) every `sync_every` steps and at the
end of the epoch, so the CPU keeps queueing work ahead of the GPU.
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

from ..data.manifest import parse_roots
from ..errors import StepError
from . import checkpoints, distributed
from .gpu_decode import BytesBatchPreparer, resolve_decode
from .models import ModelSpec, build_model, head_prefix, load_backbone, save_classifier
from .recipe import Augmentation, BatchMixer, ema_model, hard_targets, parameter_groups, warmup_cosine
from .train_data import loaders, tensor_batches, train_labels
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
    decode: str = "auto"  # cpu (Pillow in the workers), gpu (batched decode_jpeg on the device), auto
    sync_every: int | None = None  # steps between host reads of counters and SIGTERM; None: 50 CUDA, 1 CPU
    # The recipe's levers (recipe.py), all off by default.
    augment: str = "crop-flip"  # crop-flip, trivialaugment, randaugment
    random_erasing: float = 0.0
    mixup: float = 0.0  # Beta alpha; 0 = off
    cutmix: float = 0.0
    warmup_epochs: int = 0
    head_lr_scale: float = 1.0
    ema: float = 0.0  # decay per step; 0 = off
    low_res_size: int | None = None
    low_res_epochs: int = 0
    # NAME=DIR: where the photos the data's manifest references lie here (default: where written)
    roots: list[str] | None = None


class _Preemption:
    """Remembers a SIGTERM so the loop can checkpoint at the next step instead of dying mid-write."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def top_k_hits(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """Correct counts at top-1 and top-k for a batch, as a 2-tensor on the logits' device (no sync)."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    hits = top.eq(targets[:, None])
    return torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])


def top_k_correct(logits: torch.Tensor, targets: torch.Tensor, k: int) -> tuple[int, int]:
    """Correct counts at top-1 and top-k for a batch."""
    top1, topk = top_k_hits(logits, targets, k).tolist()
    return top1, topk


# The per-epoch counters that live on the device between host reads.
LOSS_SUM, CORRECT, SEEN, NONFINITE = range(4)


def sync_interval(cfg: TrainConfig, ctx) -> int:
    """Steps between host reads: a read on CUDA drains the queue of work ahead of the GPU; on a CPU
    every op has already finished, so reading each step costs nothing and SIGTERM is seen at once."""
    if cfg.sync_every:
        return cfg.sync_every
    return 50 if ctx.device.type == "cuda" else 1


@torch.no_grad()
def _count(counters: torch.Tensor, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
    """Add one step to the device counters: in-place kernels only, nothing read back."""
    loss = loss.detach().double()
    counters[LOSS_SUM] += loss * len(targets)
    counters[CORRECT] += logits.argmax(dim=1).eq(targets).sum()
    counters[SEEN] += len(targets)
    counters[NONFINITE] += (~torch.isfinite(loss)).double()


def _read(counters: torch.Tensor, preemption, ctx, step: int, curve: list | None) -> bool:
    """The one host sync every `sync_every` steps: any rank pre-empted, any loss non-finite (one
    all-reduce), and this rank's running loss for `curve`. True when every rank must stop now."""
    flags = torch.cat(
        [
            counters[NONFINITE:],
            torch.full((1,), float(preemption.requested), dtype=torch.float64, device=ctx.device),
        ]
    )
    distributed.sum_over_ranks(flags, ctx)
    nonfinite, preempted, loss_sum, _, seen = torch.cat([flags, counters[:NONFINITE]]).tolist()
    if nonfinite:
        raise StepError(
            f"training diverged: the loss was not finite in a step before step {step}; lower --lr"
        )
    if curve is not None and seen:
        curve.append((step, loss_sum / seen))
    return preempted > 0


def train_one_epoch(
    model,
    loader,
    optimizer,
    criterion,
    ctx,
    autocast,
    cfg,
    preemption,
    prepare=None,
    curve=None,
    *,
    ema=None,
    mixer=None,
    epoch: int = 0,
) -> dict:
    """One pass over `loader`; `prepare` turns a batch into device tensors (default: move them),
    `mixer` mixes it (mixup/cutmix), and `ema` averages the weights after each step.

    The host reads the counters before step 0, every `sync_interval` steps and at the end, so a
    SIGTERM stops every rank within that many steps. `curve`, when given, gets (step, this rank's
    mean loss so far) at each read.
    """
    model.train()
    if cfg.freeze_backbone:
        # A frozen backbone keeps its normalisation statistics too, or its features drift under the head.
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    prepare = prepare or tensor_batches(ctx, cfg.channels_last and ctx.device.type == "cuda")
    stats = getattr(prepare, "stats", None)  # the bytes path counts its decoder fallbacks
    if stats:
        stats.new_epoch()
    every = sync_interval(cfg, ctx)
    counters = torch.zeros(4, dtype=torch.float64, device=ctx.device)
    started, steps = time.monotonic(), 0
    for step, batch in enumerate(loader):
        if step % every == 0 and _read(counters, preemption, ctx, step, curve):
            return {"interrupted": True}
        if cfg.max_steps_per_epoch and step >= cfg.max_steps_per_epoch:
            break
        images, targets = prepare(batch)
        if mixer is not None:
            images, targets = mixer(images, targets, epoch * 1_000_000 + step)
        with autocast():
            logits = model(images)
            loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update_parameters(model)
        _count(counters, loss, logits, hard_targets(targets))
        steps += 1
    decoded = [stats.fallback, stats.on_device] if stats else []
    totals = torch.cat([counters, torch.tensor(decoded, dtype=torch.float64).to(ctx.device)])
    distributed.sum_over_ranks(totals, ctx)
    loss_sum, correct, seen, nonfinite, *rest = torch.cat([totals, counters[[LOSS_SUM, SEEN]]]).tolist()
    *decoded, local_loss_sum, local_seen = rest
    elapsed = time.monotonic() - started
    if nonfinite:
        raise StepError(
            f"training diverged: the loss was not finite in a step before step {steps}; lower --lr"
        )
    if curve is not None and local_seen:
        curve.append((steps, local_loss_sum / local_seen))
    metrics = {
        "train_loss": loss_sum / max(seen, 1),
        "train_top1_error": 1 - correct / max(seen, 1),
        "images_per_second": seen / max(elapsed, 1e-9),
    }
    if stats:
        metrics["decode_fallbacks"], metrics["decoded_on_device"] = decoded
    return metrics


@torch.inference_mode()
def evaluate(model, loader, criterion, ctx, autocast) -> dict:
    """Top-1/top-5 error over the whole val set: every rank sums its shard, then all-reduce."""
    model.eval()
    counters = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # loss sum, top-1, top-5, count
    for images, targets in loader:
        images = images.to(ctx.device, non_blocking=True)
        targets = targets.to(ctx.device, non_blocking=True)
        with autocast():
            logits = model(images)
        counters[0] += criterion(logits.float(), targets).double() * len(targets)
        counters[1:3] += top_k_hits(logits, targets, 5)
        counters[3] += len(targets)
    loss_sum, correct1, correct5, count = distributed.sum_over_ranks(counters, ctx).tolist()
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


def uses_bf16(cfg: TrainConfig, ctx) -> bool:
    return cfg.amp == "bf16" or (cfg.amp == "auto" and ctx.device.type == "cuda")


def batch_preparer(cfg: TrainConfig, ctx, decode: str, train_set, spec: ModelSpec):
    """How a training batch reaches the model: moved as tensors (`cpu`), or decoded and augmented on
    the device (`gpu`: bf16 when autocast is, channels_last on CUDA)."""
    channels_last = cfg.channels_last and ctx.device.type == "cuda"
    if decode == "gpu":
        dtype = torch.bfloat16 if uses_bf16(cfg, ctx) else torch.float32
        return BytesBatchPreparer(train_set, spec, cfg.seed, ctx.device, dtype, channels_last)
    return tensor_batches(ctx, channels_last)


def autocast_factory(cfg: TrainConfig, ctx):
    """A no-argument context factory: bf16 autocast on GPU (or when asked), a disabled one otherwise."""
    if uses_bf16(cfg, ctx):
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
    groups = parameter_groups(model, head_prefix(cfg.arch), cfg.lr, cfg.head_lr_scale)
    optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.warmup_epochs:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.epochs, cfg.warmup_epochs))
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs, 1))
    aug = Augmentation(
        policy=cfg.augment,
        erasing=cfg.random_erasing,
        image_size=cfg.image_size,
        low_res_size=cfg.low_res_size,
        low_res_epochs=cfg.low_res_epochs,
    )
    mixer = BatchMixer(len(labels), cfg.mixup, cfg.cutmix, cfg.seed)
    ema = ema_model(model, cfg.ema)
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
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
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
    decode = resolve_decode(cfg.decode, ctx.device)
    if decode == "gpu" and ctx.device.type != "cuda":
        notes.append("--decode gpu without CUDA: photos are decoded in the training process on the CPU")
    train_loader, val_loader, sampler = loaders(
        data, spec, ctx, cfg.batch_size, cfg.workers, cfg.seed, decode, aug, parse_roots(cfg.roots)
    )
    prepare = batch_preparer(cfg, ctx, decode, train_loader.dataset, spec)
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
            "ema": ema.state_dict() if ema is not None else None,
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
            trained = train_one_epoch(
                net,
                train_loader,
                optimizer,
                criterion,
                ctx,
                autocast,
                cfg,
                preemption,
                prepare,
                ema=ema,
                mixer=mixer if mixer.active else None,
                epoch=epoch,
            )
            if trained.get("interrupted"):
                if ctx.is_main:
                    checkpoints.save_interrupted(out, state_at(epoch))
                    recorder.interrupted(epoch)
                distributed.barrier(ctx)
                raise Preempted(epoch, out)
            judged = ema.module if ema is not None else net  # the EMA weights are what is kept
            metrics = {**trained, **evaluate(judged, val_loader, criterion, ctx, autocast), "lr": lr}
            scheduler.step()
            improved = is_better(metrics, best)
            if improved:
                best = {"epoch": epoch, **metrics}
            if ctx.is_main:
                checkpoints.save(
                    out, state_at(epoch + 1), epoch=epoch, is_best=improved, keep=cfg.keep_checkpoints
                )
                if improved:
                    save_classifier(out / BEST_MODEL_DIR, ema.module if ema is not None else model, spec)
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
