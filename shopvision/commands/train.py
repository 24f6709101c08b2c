"""shopvision train: ResNet (or EfficientNet-Lite0) training with DDP via torchrun, tracked in MLflow."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from . import add_root_flag, add_step, positive_int

ORDER = 20
PREEMPTED_EXIT = 143  # 128 + SIGTERM: the job was stopped, a checkpoint was written


def _with_preset(args: argparse.Namespace) -> argparse.Namespace:
    """With --preset, parse the train arguments again over the preset's values, so a flag given
    on the command line still wins (argparse's own rules, abbreviations included)."""
    from shopvision.components.training.presets import train_defaults

    defaults = train_defaults(args.preset)
    parser = argparse.ArgumentParser(prog="shopvision")
    steps = parser.add_subparsers(dest="command")
    add_parser(steps)
    steps.choices["train"].set_defaults(**defaults)
    again = parser.parse_args(["train", *args.raw_argv[args.raw_argv.index("train") + 1 :]])
    again.raw_argv = args.raw_argv
    return again


def _config(args: argparse.Namespace):
    from shopvision.components.training.train import TrainConfig

    if getattr(args, "preset", None):
        args = _with_preset(args)

    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    values["data"], values["out"] = str(args.data), str(args.out)
    if args.depth:
        values["arch"] = f"resnet{args.depth}"
    return TrainConfig(**values)


def _run(args: argparse.Namespace) -> None:
    from shopvision.components.errors import StepError
    from shopvision.components.training import distributed, launch
    from shopvision.components.training.train import Preempted, run
    from shopvision.components.training.train_data import train_labels
    from shopvision.components.training.train_record import resolve_tracking_uri

    cfg = _config(args)
    if distributed.under_torchrun() or (args.nodes == 1 and args.nproc_per_node == 1):
        try:
            run(cfg)
        except Preempted as exc:
            print(f"shopvision train: {exc}", file=sys.stderr)
            sys.exit(PREEMPTED_EXIT)
        return
    # Launcher: check what would otherwise fail in every worker, then start torchrun.
    from shopvision.components.training.tracking import check_tracking_server

    train_labels(Path(args.data))
    check_tracking_server(resolve_tracking_uri(args.tracking_uri))
    worker_args = args.raw_argv[args.raw_argv.index("train") + 1 :]
    port = args.master_port or (launch.free_port() if args.nodes == 1 else 29500)
    code = launch.run_torchrun(
        launch.torchrun_command(
            worker_args,
            nodes=args.nodes,
            nproc_per_node=args.nproc_per_node,
            node_rank=args.node_rank,
            master_addr=args.master_addr,
            master_port=port,
        )
    )
    if code != 0:
        if code == PREEMPTED_EXIT or code == -15:
            sys.exit(PREEMPTED_EXIT)
        raise StepError(f"training workers failed (torchrun exit status {code}); see the worker output above")


def add_parser(steps) -> None:
    from shopvision.components.training.architectures import ARCHITECTURES, RESNET_DEPTHS
    from shopvision.components.training.presets import PRESETS

    p = add_step(
        steps,
        "train",
        "train a ResNet (default 34) on DATA/train, validate on DATA/val, track in MLflow",
        _run,
    )
    p.add_argument(
        "data",
        type=Path,
        help="the output of 'shopvision balance' or 'augment' (a manifest), or DATA/train/<category>/*.jpg "
        "and DATA/val/<category>/*.jpg",
    )
    p.add_argument("--out", type=Path, required=True, help="checkpoints, model_best/, run.json, history")
    add_root_flag(p)
    p.add_argument("--arch", choices=ARCHITECTURES, default="resnet34")
    p.add_argument("--depth", type=int, choices=RESNET_DEPTHS, help="short for --arch resnet<DEPTH>")
    p.add_argument("--epochs", type=positive_int, default=10)
    p.add_argument("--batch-size", type=positive_int, default=32, help="per process (GPU)")
    p.add_argument("--workers", type=int, default=2, help="data-loader processes per training process")
    p.add_argument("--nodes", type=positive_int, default=1)
    p.add_argument(
        "--nproc-per-node", type=positive_int, default=1, help="GPUs per node (CPU processes without)"
    )
    p.add_argument("--node-rank", type=int, default=0, help="this node's rank when --nodes > 1")
    p.add_argument("--master-addr", default="127.0.0.1", help="rank-0 node's address when --nodes > 1")
    p.add_argument("--master-port", type=int, help="rendezvous port (default: free port; 29500 multi-node)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--image-size", type=positive_int, default=224)
    p.add_argument(
        "--pretrained",
        help="'imagenet' (efficientnet_lite0/1/2: their weights install offline), a state-dict path, "
        "s3://, runs:/, models:/",
    )
    p.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="a named recipe's values for every option below (an option given here still wins)",
    )
    recipe = p.add_argument_group(
        "recipe levers (all off by default; README's accuracy section measures them)"
    )
    recipe.add_argument(
        "--augment",
        choices=["crop-flip", "trivialaugment", "randaugment"],
        default="crop-flip",
        help="online augmentation after the random crop and flip",
    )
    recipe.add_argument("--random-erasing", type=float, default=0.0, help="probability of an erased box")
    recipe.add_argument("--mixup", type=float, default=0.0, help="mixup Beta alpha (0: off)")
    recipe.add_argument("--cutmix", type=float, default=0.0, help="cutmix Beta alpha (0: off)")
    recipe.add_argument("--warmup-epochs", type=int, default=0, help="linear warm-up before the cosine")
    recipe.add_argument(
        "--head-lr-scale", type=float, default=1.0, help="the new head's learning rate = --lr times this"
    )
    recipe.add_argument(
        "--ema", type=float, default=0.0, help="per-step decay of a weight average kept as the model (0: off)"
    )
    recipe.add_argument(
        "--low-res-size", type=positive_int, help="training size of the first --low-res-epochs epochs"
    )
    recipe.add_argument("--low-res-epochs", type=int, default=0)
    p.add_argument("--freeze-backbone", action="store_true", help="train the classifier head only")
    p.add_argument("--resume", help="'auto' (continue from OUT/latest.pt when present) or a checkpoint path")
    p.add_argument("--keep-checkpoints", type=positive_int, default=3, help="epoch_<k>.pt files to keep")
    p.add_argument(
        "--amp", choices=["auto", "bf16", "off"], default="auto", help="auto: bf16 on GPU, off on CPU"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument(
        "--decode",
        choices=["cpu", "gpu", "auto"],
        default="auto",
        help="cpu: Pillow in the loader workers; gpu: workers read bytes, the batch is decoded and "
        "augmented on the GPU (on a CPU: in the training process); auto: gpu on CUDA, else cpu",
    )
    p.add_argument(
        "--sync-every",
        type=positive_int,
        help="steps between host reads of loss/accuracy and the SIGTERM check (default: 50 on CUDA, 1 on CPU)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"
    )
    p.add_argument("--experiment", default="shopvision")
    p.add_argument("--run-name")
    p.add_argument("--max-steps-per-epoch", type=positive_int, help="cap steps per epoch (smoke tests)")
