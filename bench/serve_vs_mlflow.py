"""Benchmark: `shopvision serve` against `mlflow models serve` on the same registered model.

Why this exists: the serving issue set the goal that the prediction server answer at least 3× the
requests per second of MLflow's own scoring server for the same model, at an equal or better p99
latency. This script measures both on this machine, one after the other, under the same load, so the
claim is a number anyone can re-run:

1. registers one classifier (default: ResNet-18 at 224 px, the size the project trains and serves
   at; 12 categories, the sample data's labels; random weights, which cost exactly what trained
   ones cost) as version 1 of a model in a throw-away MLflow store (SQLite + a local artifact
   folder) and points @champion at it;
2. starts `shopvision serve --model models:/NAME@champion` and
   `mlflow models serve -m models:/NAME@champion --env-manager local` (the logged pyfunc, MLflow's
   defaults: one uvicorn worker) and waits until both are ready;
3. loads one server at a time: a warm-up, then `--rounds` timed rounds that alternate between the
   servers (ABBA...), `--seconds` in all per server, so background load that drifts during the run
   falls on both alike (an idle server uses no CPU);
4. prints requests/s and p50/p99 latency of both, and the ratios.

The load: `--clients` concurrent clients in one asyncio process, each sending one real product
photo (the sample's JPEGs, base64 in JSON, the same bytes to both servers) per request and sending
the next as soon as the answer arrives, for `--seconds`. shopvision gets the Open Inference Protocol
request (`/v2/models/bench-classifier/infer`, BYTES input); MLflow gets its own (`/invocations`,
`dataframe_split` with the `image` column its signature declares). Both answers are checked to name
the same top category for the same photo before timing starts.

The client shares the machine with the server under test; both servers pay the same for it.
Nothing lands in the repository: everything goes to a temporary folder removed at the end.

    .venv/bin/python bench/serve_vs_mlflow.py [--seconds 30] [--rounds 2] [--clients 8] [--image-size 224]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = REPO_ROOT / "data" / "sample" / "raw"
BIN = Path(sys.executable).parent
MODEL_NAME = "bench-classifier"
SERVED_AS = MODEL_NAME  # the OIP name defaults to the registered model's name
GOAL = 3.0  # the goal: at least this many times the requests/s of mlflow models serve
START_TIMEOUT_S = 300.0


@dataclass
class LoadResult:
    server: str
    seconds: float
    latencies: list[float]  # of the successful requests, seconds
    errors: int
    server_cpu: float  # CPU seconds the server's processes used during the timed load
    client_cpu: float  # CPU seconds this (client) process used meanwhile

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.seconds

    @property
    def per_cpu_second(self) -> float:
        """Requests answered per CPU second the server used: its efficiency, whatever its CPU share."""
        return len(self.latencies) / self.server_cpu if self.server_cpu else float("nan")

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else float("nan")


def group_cpu_seconds(group: int) -> float:
    """User + system CPU seconds of the live processes in a process group (a server and its workers)."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended meanwhile
            continue
        fields = text[text.rfind(")") + 2 :].split()  # after "pid (comm) "; fields[2] is the group
        if int(fields[2]) == group:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def register_model(folder: Path, arch: str, image_size: int) -> str:
    """Save, log and register the classifier; returns the tracking URI of the store."""
    import mlflow
    import torch

    from shopvision.components.training.models import ModelSpec, build_model, save_classifier
    from shopvision.components.training.tracking import log_classifier

    labels = sorted(p.name for p in SAMPLE.iterdir() if p.is_dir())
    spec = ModelSpec(arch, labels, image_size=image_size)
    torch.manual_seed(0)
    save_classifier(folder / "model", build_model(spec).eval(), spec)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("bench", artifact_location=(folder / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = log_classifier(folder / "model", registered_model_name=MODEL_NAME)
    mlflow.MlflowClient().set_registered_model_alias(MODEL_NAME, "champion", info.registered_model_version)
    return uri


def wait_until(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"error: the server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        with suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.5)
    sys.exit(f"error: {url} not ready after {START_TIMEOUT_S:g} s:\n{log_path.read_text()[-3000:]}")


@contextmanager
def running(command: list[str], ready_url: str, env: dict[str, str], log_path: Path):
    """A server process (and its children) for the duration of the block."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        wait_until(ready_url, process, log_path)
        yield process
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def shopvision_body(photo: str) -> dict:
    return {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [photo]}]}


def shopvision_top(answer: dict) -> str:
    return answer["outputs"][0]["data"][0]


def mlflow_body(photo: str) -> dict:
    return {"dataframe_split": {"columns": ["image"], "data": [[photo]]}}


def mlflow_top(answer: dict) -> str:
    return answer["predictions"][0]["label_1"]


async def load(url: str, bodies: list[dict], clients: int, seconds: float) -> tuple[list[float], int]:
    """Closed-loop clients for `seconds`: latencies of the answered requests, and the failures."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=clients), timeout=timeout
    ) as session:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds

        async def client(index: int) -> None:
            nonlocal errors
            n = index
            while (sent := loop.time()) < end:
                body = bodies[n % len(bodies)]
                n += clients
                try:
                    async with session.post(url, json=body) as response:
                        await response.read()
                        ok = response.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                if ok:
                    latencies.append(loop.time() - sent)
                else:
                    errors += 1

        await asyncio.gather(*(client(i) for i in range(clients)))
    return latencies, errors


def check_answers(url: str, bodies: list[dict], top) -> list[str]:
    import json

    answers = []
    for body in bodies:
        request = urllib.request.Request(
            url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=300) as response:
            answers.append(top(json.loads(response.read())))
    return answers


def measure(
    name: str,
    url: str,
    bodies: list[dict],
    args: argparse.Namespace,
    seconds: float,
    warmup: float,
    group: int,
) -> LoadResult:
    if warmup:
        asyncio.run(load(url, bodies, args.clients, warmup))
    load_before = os.getloadavg()[0]
    server_before, client_before = group_cpu_seconds(group), time.process_time()
    latencies, errors = asyncio.run(load(url, bodies, args.clients, seconds))
    result = LoadResult(
        name,
        seconds,
        latencies,
        errors,
        server_cpu=group_cpu_seconds(group) - server_before,
        client_cpu=time.process_time() - client_before,
    )
    print(
        f"  {name:<20} {seconds:>4g} s: {result.throughput:6.1f} req/s, server used "
        f"{result.server_cpu / seconds:.2f} cores; load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    return result


def merged(results: list[LoadResult]) -> LoadResult:
    return LoadResult(
        results[0].server,
        sum(r.seconds for r in results),
        [x for r in results for x in r.latencies],
        sum(r.errors for r in results),
        sum(r.server_cpu for r in results),
        sum(r.client_cpu for r in results),
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=30.0, help="timed load per server, in all (default 30)"
    )
    parser.add_argument("--warmup", type=float, default=5.0, help="untimed load first (default 5)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="alternating timed rounds the seconds are split into (default 2)",
    )
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--arch", default="resnet18", help="model architecture (default resnet18)")
    parser.add_argument("--image-size", type=int, default=224, help="model input size (default 224)")
    parser.add_argument("--photos", type=int, default=48, help="distinct sample photos to cycle through")
    parser.add_argument("--max-batch-size", type=int, default=32, help="shopvision serve --max-batch-size")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="shopvision serve --max-wait-ms")
    parser.add_argument("--device", default="auto", help="shopvision serve --device")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    every = sorted(SAMPLE.rglob("*.jpg"))
    photos = every[:: max(1, len(every) // args.photos)][: args.photos]  # spread over the categories
    encoded = [base64.b64encode(p.read_bytes()).decode("ascii") for p in photos]
    print(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; model: {args.arch} at "
        f"{args.image_size} px; {len(photos)} photos (mean {statistics.mean(len(p.read_bytes()) for p in photos) / 1024:.0f} KiB)",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        folder = Path(tmp)
        tracking_uri = register_model(folder, args.arch, args.image_size)
        env = dict(
            os.environ,
            MLFLOW_TRACKING_URI=tracking_uri,
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        model_uri = f"models:/{MODEL_NAME}@champion"
        ours_port, theirs_port = free_port(), free_port()
        ours_command = [
            str(BIN / "shopvision"), "serve", "--model", model_uri, "--port", str(ours_port),
            "--device", args.device, "--max-batch-size", str(args.max_batch_size),
            "--max-wait-ms", str(args.max_wait_ms), "--log-level", "warning",
        ]  # fmt: skip
        theirs_command = [
            str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
            "-h", "127.0.0.1", "-p", str(theirs_port),
        ]  # fmt: skip
        ours_base, theirs_base = f"http://127.0.0.1:{ours_port}", f"http://127.0.0.1:{theirs_port}"
        servers = {  # name: (url, request bodies, top category of an answer)
            "shopvision serve": (f"{ours_base}/v2/models/{SERVED_AS}/infer", shopvision_body, shopvision_top),
            "mlflow models serve": (f"{theirs_base}/invocations", mlflow_body, mlflow_top),
        }
        # Both stay up for the whole run (an idle server uses no CPU), so the timed rounds can
        # alternate between them and drifting background load falls on both alike.
        with (
            running(ours_command, f"{ours_base}/v2/health/ready", env, folder / "shopvision.log") as ours,
            running(theirs_command, f"{theirs_base}/ping", env, folder / "mlflow.log") as theirs,
        ):
            groups = {"shopvision serve": ours.pid, "mlflow models serve": theirs.pid}
            answers = {
                name: check_answers(url, [body(p) for p in encoded[:4]], top)
                for name, (url, body, top) in servers.items()
            }
            rounds: dict[str, list[LoadResult]] = {name: [] for name in servers}
            for index in range(args.rounds):
                order = list(servers) if index % 2 == 0 else list(reversed(servers))
                for name in order:
                    url, body, _ = servers[name]
                    rounds[name].append(
                        measure(
                            name,
                            url,
                            [body(p) for p in encoded],
                            args,
                            args.seconds / args.rounds,
                            args.warmup if index == 0 else 0.0,
                            groups[name],
                        )
                    )
        results = [merged(r) for r in rounds.values()]

    if len(set(map(tuple, answers.values()))) != 1:
        print(f"warning: the servers disagree on the top category: {answers}")
    else:
        print(f"same top category from both for the first 4 photos: {answers['shopvision serve']}")
    print()
    print(
        f"{'server':<22}{'requests':>10}{'errors':>8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'cores used':>12}{'req/CPU-s':>11}"
    )
    for r in results:
        print(
            f"{r.server:<22}{len(r.latencies):>10}{r.errors:>8}{r.throughput:>9.1f}"
            f"{r.percentile(50) * 1000:>9.0f}{r.percentile(99) * 1000:>9.0f}"
            f"{r.server_cpu / r.seconds:>12.2f}{r.per_cpu_second:>11.2f}"
        )
    ours, theirs = results
    ratio = ours.throughput / theirs.throughput if theirs.throughput else float("inf")
    p99_ratio = ours.percentile(99) / theirs.percentile(99)
    print()
    print(f"throughput: shopvision serve is {ratio:.2f}x mlflow models serve (goal: >= {GOAL:g}x)")
    print(f"p99 latency: shopvision serve's is {p99_ratio:.2f}x mlflow's (goal: <= 1)")
    print(
        f"requests per server CPU second: shopvision serve is {ours.per_cpu_second / theirs.per_cpu_second:.2f}x "
        "mlflow models serve (independent of how much CPU other work left each)"
    )
    print(
        f"client CPU per request: {ours.client_cpu / max(1, len(ours.latencies)) * 1000:.1f} ms (shopvision), "
        f"{theirs.client_cpu / max(1, len(theirs.latencies)) * 1000:.1f} ms (mlflow)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
