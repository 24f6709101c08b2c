"""How `shopvision train` starts its workers: itself (one process) or through torchrun.

A Kubeflow TrainJob/PyTorchJob runs torchrun for us and sets RANK, WORLD_SIZE, MASTER_ADDR...;
then the same `shopvision train` command is the worker. On one machine we run torchrun ourselves
with the same arguments, so local and cluster training share one entry point.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Sequence


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(
    worker_args: Sequence[str],
    *,
    nodes: int,
    nproc_per_node: int,
    node_rank: int,
    master_addr: str,
    master_port: int,
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nodes}",
        f"--nproc-per-node={nproc_per_node}",
        f"--node-rank={node_rank}",
        f"--master-addr={master_addr}",
        f"--master-port={master_port}",
        "-m",
        "shopvision.cli",
        "train",
        *worker_args,
    ]


def run_torchrun(command: list[str]) -> int:
    """Run torchrun in the foreground; SIGTERM/SIGINT go to it (it forwards them to the workers)."""
    process = subprocess.Popen(command)

    def forward(signum, frame) -> None:
        process.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return process.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
