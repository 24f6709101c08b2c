"""Process-group set-up for torchrun, and the few collective helpers training needs.

torchrun (ours, or a Kubeflow TrainJob/PyTorchJob's) sets RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT; without them we run as a single process with no process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: str = "auto") -> Context:
    """Join the process group (NCCL on GPU, gloo on CPU) and pick this process's device."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        chosen = torch.device("cuda", torch.cuda.current_device())
    else:
        chosen = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", device_id=chosen if use_cuda else None
        )
    return Context(rank, local_rank, world_size, chosen)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], ctx: Context) -> list[float]:
    """Sum per-rank numbers over all ranks (exact metrics with uneven shards); float64 on the wire."""
    return sum_over_ranks(torch.tensor(values, dtype=torch.float64, device=ctx.device), ctx).tolist()


def sum_over_ranks(tensor: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Sum a device tensor over all ranks in place, without reading it on the host: the caller
    decides when to pay for the sync (`.tolist()`), so counters can live on the GPU between reads."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()
