"""A dependency-free progress bar for long steps: redraws on a terminal, logs every 10% otherwise.

Shared by every stage, so it sits in components/ itself and imports nothing of the stages.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        self.total = max(total, 0)
        self.label = label
        self.stream = stream or sys.stderr
        self.done = 0
        self.started = time.monotonic()
        self._interactive = self.stream.isatty()
        self._last_decile = -1
        self._last_draw = 0.0

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if self._interactive:
            if now - self._last_draw >= 0.1 or self.done >= self.total:
                self._last_draw = now
                self.stream.write("\r" + self._line(now))
                self.stream.flush()
        else:
            decile = (10 * self.done // self.total) if self.total else 10
            if decile != self._last_decile:
                self._last_decile = decile
                self.stream.write(self._line(now) + "\n")
                self.stream.flush()

    def close(self) -> None:
        if self._interactive:
            self.stream.write("\n")
            self.stream.flush()

    def _line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        fraction = self.done / self.total if self.total else 1.0
        width = 30
        bar = "#" * int(width * fraction) + "-" * (width - int(width * fraction))
        return f"{self.label} [{bar}] {self.done}/{self.total} {self.done / elapsed:.0f}/s"
