"""Training checkpoints: epoch_<k>.pt (the last few), latest.pt and model_best.pt, written atomically.

A checkpoint holds everything needed to continue exactly: weights, optimizer, scheduler, scaler,
the next epoch, the best metrics so far, RNG states and the model spec. It contains only tensors and
plain Python values, so it loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import torch

from ..errors import StepError

LATEST = "latest.pt"
BEST = "model_best.pt"
_EPOCH = re.compile(r"^epoch_(\d+)\.pt$")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save(out: Path, checkpoint: dict, *, epoch: int, is_best: bool, keep: int) -> None:
    """Write epoch_<epoch>.pt, point latest.pt (and model_best.pt when best) at it, prune old epochs."""
    out.mkdir(parents=True, exist_ok=True)
    epoch_file = out / f"epoch_{epoch}.pt"
    _atomic_save(checkpoint, epoch_file)
    for name in [LATEST] + ([BEST] if is_best else []):
        tmp = out / f".{name}.link"
        tmp.unlink(missing_ok=True)
        try:
            os.link(epoch_file, tmp)  # a second name, not a second copy of the bytes
        except OSError:
            _atomic_save(checkpoint, tmp)
        os.replace(tmp, out / name)
    epochs = sorted((int(m.group(1)), p) for p in out.iterdir() if (m := _EPOCH.match(p.name)))
    for _, path in epochs[: max(0, len(epochs) - keep)]:
        path.unlink()


def save_interrupted(out: Path, checkpoint: dict) -> None:
    """On pre-emption: latest.pt only; the interrupted epoch restarts on resume."""
    out.mkdir(parents=True, exist_ok=True)
    _atomic_save(checkpoint, out / LATEST)


def load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise StepError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
