"""A real `mlflow server` process for tests, on 127.0.0.1 and a free port, stopped with its children.

    with running_mlflow_server(tmp_path) as (url, process):
        mlflow.set_tracking_uri(url)
        ...

or `start_mlflow_server` / `stop_mlflow_server` for fixtures that manage the lifetime themselves.
The backend store is SQLite under tmp_path unless `backend_uri` says otherwise (e.g. postgresql://);
artifacts are proxied by the server into tmp_path/artifacts, as in the cluster deployment.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_mlflow_server(tmp_path: Path, backend_uri: str | None = None) -> tuple[str, subprocess.Popen]:
    """Start `mlflow server` and wait until /health answers; returns (url, process)."""
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    backend_uri = backend_uri or f"sqlite:///{tmp_path / 'mlflow.db'}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        str(bin_dir / "mlflow"),
        "server",
        "--backend-store-uri",
        backend_uri,
        "--artifacts-destination",
        str(tmp_path / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = dict(os.environ)
    # Without this the server forks ~7 job-runner workers (~265 MB each) that tests never use.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"  # the server starts uvicorn by name
    env.pop("MLFLOW_TRACKING_URI", None)
    log_path = tmp_path / "mlflow-server.log"
    with open(log_path, "wb") as log:  # a file, not a pipe: a full pipe would block the server
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
            start_new_session=True,  # its own process group, so stopping it stops its workers too
        )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"mlflow server exited with {process.returncode} before it was healthy:\n{_tail(log_path)}"
            )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return url, process
        except OSError:
            pass
        time.sleep(0.25)
    stop_mlflow_server(process)
    raise RuntimeError(
        f"mlflow server at {url} not healthy after {STARTUP_TIMEOUT_S:g} s:\n{_tail(log_path)}"
    )


def stop_mlflow_server(process: subprocess.Popen) -> None:
    """Terminate the server's process group (server and workers), then kill what is left."""
    group = process.pid  # start_new_session=True made the server the leader of its own group
    _signal_group(group, signal.SIGTERM)
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=STOP_TIMEOUT_S)
    deadline = time.monotonic() + 5.0  # workers can outlive the server by a moment
    while _signal_group(group, 0) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _signal_group(group, signal.SIGKILL):
        process.wait(timeout=10)


def _signal_group(group: int, sig: int) -> bool:
    """Send `sig` to the group; False when no process is left in it."""
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        return False
    return True


@contextmanager
def running_mlflow_server(
    tmp_path: Path, backend_uri: str | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    url, process = start_mlflow_server(tmp_path, backend_uri)
    try:
        yield url, process
    finally:
        stop_mlflow_server(process)


def _tail(log_path: Path, lines: int = 40) -> str:
    text = log_path.read_text(errors="replace") if log_path.exists() else "(no output)"
    return "\n".join(text.splitlines()[-lines:])
