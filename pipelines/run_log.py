"""What a local pipeline run shows: one line per finished task, the whole kfp.local log in a file.

kfp.local writes everything to standard output: its own records for each task (executing, streamed
logs, status, every output with its artifact's URI and metadata) and each task's streamed output,
indented. On the sample data that is some 700 lines, the result in the last few. While `RunLog` is
entered all of it goes to WORKDIR/pipeline.log (and, with `verbose`, to the terminal as well, as
before), and the terminal gets, as each task finishes, its name, status, seconds and a one-line
summary: the step's own (what clean, split, balance, augment and audit return), or one made from
the task's outputs where the step returns something else (a fingerprint, a count, a run id, a
version), and under it any warning the step gave ("warning: ..."), which the closing lines may
refer to. A failing task shows its own error lines (the exception its step raised) and the log path.

Tasks are seen by wrapping kfp.local's `task_dispatcher.run_single_task_implementation`, which both
the DAG orchestrator and a single task call for every container task (kfp 2.17; local caching, off
by default, would skip it, and a cache hit would show no line). kfp.local runs a ParallelFor's
iterations (clean's shards) in threads, each task in one thread, so a task's text is what its thread
writes (the capture is per thread). kfp's warning that the project image
is not a Python image (every task runs in this Python environment: SubprocessRunner, no venv) is
written once to the log instead of once per task.
"""

from __future__ import annotations

import builtins
import contextlib
import re
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TextIO

LOG_NAME = "pipeline.log"
BASE_IMAGE_WARNING = r"You may be attempt?ing to run a task that uses custom or non-Python base image"
ERROR_LINES_SHOWN = 20
WARNINGS_SHOWN = 5
_STATUS_RECORD = re.compile(r" - (INFO|ERROR) - Task .* finished with status ")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TASK_INDENT = "    "  # kfp.local's indented_print: a task's own output, as opposed to kfp's records


class _Stream:
    """A text stream for sys.stdout / sys.stderr during the run: the log, the terminal with --verbose,
    and the current task's text, kept for its summary and its error lines."""

    def __init__(self, log: TextIO, terminal: TextIO | None) -> None:
        self.log, self.terminal = log, terminal
        self._local = threading.local()  # the text of the task this thread runs

    @property
    def task(self) -> list[str] | None:
        return getattr(self._local, "task", None)

    @task.setter
    def task(self, captured: list[str] | None) -> None:
        self._local.task = captured

    def write(self, text: str) -> int:
        self.log.write(_ANSI.sub("", text))  # kfp colours task names and statuses for a terminal
        if self.terminal is not None:
            self.terminal.write(text)
        if self.task is not None:
            self.task.append(text)
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        if self.terminal is not None:
            self.terminal.flush()

    def isatty(self) -> bool:
        return False


class RunLog:
    """Enter around a kfp.local pipeline call; `failed` names the first task that failed, if any."""

    def __init__(self, workdir: Path, *, verbose: bool = False, terminal: TextIO | None = None) -> None:
        self.path = Path(workdir) / LOG_NAME
        self.verbose = verbose
        self.terminal = terminal or sys.stdout
        self.failed: str | None = None
        self.tasks: list[tuple[str, str, float, str]] = []  # (task, status, seconds, summary)
        self._stack = contextlib.ExitStack()

    def say(self, line: str) -> None:
        # Not print(): kfp.local's indented_print swaps builtins.print while a task runs, from threads
        # when tasks run in parallel (ParallelFor), and these lines are not a task's.
        self.terminal.write(line + "\n")
        self.terminal.flush()

    @staticmethod
    def strip(text: str) -> str:
        """kfp's text without its terminal colours."""
        return _ANSI.sub("", text)

    def __enter__(self) -> RunLog:
        try:
            self._enter(self._stack)
        except BaseException:
            self._stack.close()
            raise
        return self

    def _enter(self, stack: contextlib.ExitStack) -> None:
        from kfp.local import task_dispatcher

        # kfp.local's indented_print saves and restores builtins.print around each task; tasks that
        # run in threads (ParallelFor) interleave those saves, which can leave the indenting print in
        # place for the rest of the process. Whatever the run leaves, the process gets its own back.
        stack.callback(setattr, builtins, "print", builtins.print)
        log = stack.enter_context(open(self.path, "w", encoding="utf-8"))  # noqa: SIM115 (closed by the stack)
        self.stream = _Stream(log, self.terminal if self.verbose else None)
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message=BASE_IMAGE_WARNING, category=RuntimeWarning)
        stack.enter_context(contextlib.redirect_stdout(self.stream))
        stack.enter_context(contextlib.redirect_stderr(self.stream))
        print(
            "kfp.local: every task runs in this Python environment (SubprocessRunner, use_venv=False), "
            "not in its base image: kfp's RuntimeWarning, for every task, that the project image may "
            "not be a Python image is left out of this log"
        )
        original = task_dispatcher.run_single_task_implementation

        def run_task(*args, **kwargs):
            component = kwargs.get("component_name") or args[1]
            return self._run_task(component.removeprefix("comp-"), original, args, kwargs)

        task_dispatcher.run_single_task_implementation = run_task
        stack.callback(setattr, task_dispatcher, "run_single_task_implementation", original)

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _run_task(self, task: str, original: Callable, args, kwargs):
        self.stream.task = captured = []
        started = time.monotonic()
        try:
            outputs, status = original(*args, **kwargs)
        except BaseException:
            self._finished(task, "FAILURE", time.monotonic() - started, {}, "".join(captured))
            raise
        finally:
            self.stream.task = None
        self._finished(task, status.name, time.monotonic() - started, outputs, "".join(captured))
        return outputs, status

    def _finished(self, task: str, status: str, seconds: float, outputs: Mapping, text: str) -> None:
        summary = task_summary(task, outputs) if status == "SUCCESS" else ""
        self.tasks.append((task, status, seconds, summary))
        self.say(f"  {task:<17} {status:<7} {seconds:6.1f} s  {summary}".rstrip())
        for line in warning_lines(outputs, text):
            self.say(f"      {line}")
        if status != "SUCCESS":
            self.failed = self.failed or task
            for line in error_lines(text):
                self.say(f"      {line}")
            self.say(f"      full log: {self.path}")


def task_summary(task: str, outputs: Mapping) -> str:
    """One line for a finished task, from its outputs (parameters, and artifacts with their metadata)."""
    value = outputs.get("Output")
    metrics = getattr(outputs.get("metrics"), "metadata", None) or {}
    if task == "fingerprint-data" and isinstance(value, str):
        return f"content fingerprint {value[:12]}"
    if task == "fetch-photos":
        return _count(value, "photo")
    if task == "plan-clean-shards" and isinstance(value, list):
        return f"{_count(len(value), 'shard')} for clean"
    if task == "frozen-test-set":
        return (
            f"{_count(value, 'photo')} frozen in test" if value else "none yet (frozen at a first promotion)"
        )
    if task == "train-model":
        shown = [
            f"{label} {metrics[key]:.4f}"
            for key, label in (("val_top1_error", "val top-1 error"), ("val_top5_error", "top-5 error"))
            if isinstance(metrics.get(key), int | float)
        ]
        return ", ".join(shown) + (
            f"; MLflow run {outputs.get('run_id', '')}" if outputs.get("run_id") else ""
        )
    if task == "evaluate-model":
        shown = [
            f"{label} {metrics[key]:.4f}"
            for key, label in (
                ("test_top1_accuracy", "top-1"),
                ("test_top5_accuracy", "top-5"),
                ("test_macro_category_accuracy", "macro-category"),
            )
            if key in metrics
        ]
        photos = f"{int(metrics['test_images'])} test photos: " if "test_images" in metrics else ""
        return photos + ", ".join(shown)
    if task == "register-model":
        return f"version {value}"
    if task == "promote-model":
        champion = outputs.get("champion") or ""
        if outputs.get("promoted"):
            return f"PROMOTED: @champion -> version {champion}"
        return "REJECTED: " + (f"@champion stays version {champion}" if champion else "no @champion set")
    if isinstance(value, str):
        return step_summary(task, value)
    return ", ".join(f"{k} {v}" for k, v in outputs.items() if isinstance(v, str | int | float | bool))


def _count(value, noun: str) -> str:
    return f"{value} {noun}" + ("" if value == 1 else "s")


def step_summary(task: str, text: str, width: int = 150) -> str:
    """A step's own summary on one line: its first line without the step's name (the task's name says
    it), and the indented lines under it when all of it fits in `width` (clean's drop reasons)."""
    first, *rest = [line for line in text.splitlines() if line.strip() and "warning: " not in line] or [""]
    step, sep, after = first.partition(": ")
    if sep and task.split("-")[0] == step:
        first = after
    joined = "; ".join([first, *(" ".join(line.split()) for line in rest)])
    return joined if len(joined) <= width else first


def _own_lines(text: str) -> list[str]:
    """The lines a task printed itself (kfp.local streams them indented), up to kfp's status record."""
    own = []
    for line in _ANSI.sub("", text).splitlines():
        if _STATUS_RECORD.search(line):
            break
        if line.startswith(_TASK_INDENT) and line.strip():
            own.append(line[len(_TASK_INDENT) :].rstrip())
    return own


def warning_lines(outputs: Mapping, text: str, limit: int = WARNINGS_SHOWN) -> list[str]:
    """The warnings a task's step gave ("warning: ..." lines), in its returned summary or its output."""
    value = outputs.get("Output")
    found: list[str] = []
    for line in [*(value.splitlines() if isinstance(value, str) else []), *_own_lines(text)]:
        _, sep, warning = line.partition("warning: ")
        if sep and f"warning: {warning.strip()}" not in found:
            found.append(f"warning: {warning.strip()}")
    return found[:limit]


def error_lines(text: str, limit: int = ERROR_LINES_SHOWN) -> list[str]:
    """A failed task's own error: the exception at the end of its last traceback, else its last lines."""
    own = _own_lines(text)
    starts = [i for i, line in enumerate(own) if line.startswith("Traceback (most recent call last)")]
    if starts:
        after = own[starts[-1] + 1 :]
        message = [i for i, line in enumerate(after) if not line.startswith(" ")]
        if message:
            return after[message[0] :][:limit]
    return own[-min(limit, 10) :]
