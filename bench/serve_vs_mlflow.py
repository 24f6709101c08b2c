"""Benchmark: `shopvision serve` against `mlflow models serve` on the same registered model.

Why this exists: the serving issue set the goal that the prediction server answer at least 3× the
requests per second of MLflow's own scoring server for the same model, at an equal or better p99
latency. This script measures both on this machine, one after the other, under the same load, so the
claim is a number anyone can re-run:

1. registers one classifier (default: ResNet-18 at 224 px, the size the project trains and serves
   at; 12 categories, the sample data's labels; random weights, which cost exactly what trained
   ones cost) as version 1 of a model in a throw-away MLflow store (SQLite + a local artifact
   folder) with `shopvision register --onnx-photos` (and `--quantize int8` when onnx-int8 is
   among `--runtimes`), so the version carries model.onnx, checked, and model.int8.onnx; points
   @champion at it;
2. starts one `shopvision serve --model models:/NAME@champion --runtime R` per runtime in
   `--runtimes` (default torch, onnx, onnx-int8) and
   `mlflow models serve -m models:/NAME@champion --env-manager local` (the logged pyfunc, MLflow's
   defaults: one uvicorn worker) and waits until all are ready;
3. loads one server at a time: a warm-up, then `--rounds` timed rounds that alternate the order of
   the servers (ABC.., ..CBA), `--seconds` in all per server, so background load that drifts during
   the run falls on all alike (an idle server uses no CPU);
4. prints requests/s and p50/p99 latency of each, and each runtime's ratios to mlflow's, with the
   int8 file's top-1 change measured at registration beside it.

The load: `--clients` concurrent clients in one asyncio process, each sending one real product
photo (the sample's JPEGs, base64 in JSON, the same bytes to both servers) per request and sending
the next as soon as the answer arrives, for `--seconds`. shopvision gets the Open Inference Protocol
request (`/v2/models/bench-classifier/infer`, BYTES input); MLflow gets its own (`/invocations`,
`dataframe_split` with the `image` column its signature declares). Both answers are checked to name
the same top category for the same photo before timing starts (int8 is compared apart: it may
differ, and how often is what its registration tags say).

The client shares the machine with the server under test; both servers pay the same for it.
Nothing lands in the repository: everything goes to a temporary folder removed at the end.

    .venv/bin/python bench/serve_vs_mlflow.py [--seconds 30] [--rounds 2] [--clients 8] [--image-size 224]
        [--runtimes torch,onnx,onnx-int8]
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
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = REPO_ROOT / "data" / "sample" / "raw"
BIN = Path(sys.executable).parent
MODEL_NAME = "bench-classifier"
SERVED_AS = MODEL_NAME  # the OIP name defaults to the registered model's name
GOAL = 3.0  # the goal: at least this many times the requests/s of mlflow models serve
RUNTIMES = ("torch", "onnx", "onnx-int8")  # shopvision serve --runtime, one server each
MLFLOW = "mlflow models serve"
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


def sample_split(folder: Path) -> Path:
    """The sample photos as a split folder for the ONNX check and int8: every other photo of each
    category in test/, the rest in val/ (calibration), as symbolic links."""
    for category in sorted(p for p in SAMPLE.iterdir() if p.is_dir()):
        for index, photo in enumerate(sorted(category.glob("*.jpg"))):
            target = folder / ("test" if index % 2 == 0 else "val") / category.name / photo.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(photo)
    return folder


def register_model(folder: Path, arch: str, image_size: int, quantize: bool) -> tuple[str, dict[str, str]]:
    """Save, log and register the classifier with its ONNX files; (tracking URI, version tags)."""
    import mlflow
    import torch

    from shopvision.components.registry.register import register, register_summary
    from shopvision.components.training.models import ModelSpec, build_model, save_classifier
    from shopvision.components.training.tracking import log_classifier

    labels = sorted(p.name for p in SAMPLE.iterdir() if p.is_dir())
    spec = ModelSpec(arch, labels, image_size=image_size)
    torch.manual_seed(0)
    save_classifier(folder / "model", build_model(spec).eval(), spec)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("bench", artifact_location=(folder / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        log_classifier(folder / "model")
    started = time.perf_counter()
    result = register(
        run.info.run_id,
        MODEL_NAME,
        tracking_uri=uri,
        onnx_photos=sample_split(folder / "photos"),
        quantize="int8" if quantize else None,
    )
    print(f"{register_summary(result)} ({time.perf_counter() - started:.0f} s)", flush=True)
    mlflow.MlflowClient().set_registered_model_alias(MODEL_NAME, "champion", result.version)
    return uri, result.tags


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
    parser.add_argument(
        "--runtimes",
        type=lambda text: [r.strip() for r in text.split(",") if r.strip()],
        default=list(RUNTIMES),
        help=f"shopvision serve --runtime values, one server each (default {','.join(RUNTIMES)})",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.runtimes) - {"auto", *RUNTIMES})
    if unknown or not args.runtimes:
        parser.error(f"--runtimes: unknown {unknown}; choose from auto,{','.join(RUNTIMES)}")
    return args


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
        tracking_uri, tags = register_model(folder, args.arch, args.image_size, "onnx-int8" in args.runtimes)
        env = dict(
            os.environ,
            MLFLOW_TRACKING_URI=tracking_uri,
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        model_uri = f"models:/{MODEL_NAME}@champion"
        servers = {}  # name: (command, ready URL, infer URL, request body, top category of an answer)
        for runtime in args.runtimes:
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            command = [
                str(BIN / "shopvision"), "serve", "--model", model_uri, "--port", str(port),
                "--device", args.device, "--runtime", runtime, "--max-batch-size", str(args.max_batch_size),
                "--max-wait-ms", str(args.max_wait_ms), "--log-level", "warning",
            ]  # fmt: skip
            servers[f"shopvision {runtime}"] = (
                command, f"{base}/v2/health/ready", f"{base}/v2/models/{SERVED_AS}/infer",
                shopvision_body, shopvision_top,
            )  # fmt: skip
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        servers[MLFLOW] = (
            [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port)],
            f"{base}/ping", f"{base}/invocations", mlflow_body, mlflow_top,
        )  # fmt: skip
        # All stay up for the whole run (an idle server uses no CPU), so the timed rounds can
        # alternate between them and drifting background load falls on all alike.
        with ExitStack() as stack:
            groups = {
                name: stack.enter_context(
                    running(command, ready, env, folder / f"{name.replace(' ', '-')}.log")
                ).pid
                for name, (command, ready, *_) in servers.items()
            }
            answers = {
                name: check_answers(url, [body(p) for p in encoded[:4]], top)
                for name, (_, _, url, body, top) in servers.items()
            }
            rounds: dict[str, list[LoadResult]] = {name: [] for name in servers}
            for index in range(args.rounds):
                order = list(servers) if index % 2 == 0 else list(reversed(servers))
                for name in order:
                    _, _, url, body, _ = servers[name]
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
        results = {name: merged(r) for name, r in rounds.items()}

    exact = {name: a for name, a in answers.items() if "int8" not in name}
    if len(set(map(tuple, exact.values()))) != 1:
        print(f"warning: the servers disagree on the top category: {exact}")
    else:
        print(f"same top category from all but int8 for the first 4 photos: {answers[MLFLOW]}")
    for name in answers.keys() - exact.keys():
        same = sum(a == b for a, b in zip(answers[name], answers[MLFLOW], strict=True))
        print(f"{name}: same top category for {same} of the first 4 photos")
    print()
    print(
        f"{'server':<22}{'requests':>10}{'errors':>8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'cores used':>12}{'req/CPU-s':>11}"
    )
    for r in results.values():
        print(
            f"{r.server:<22}{len(r.latencies):>10}{r.errors:>8}{r.throughput:>9.1f}"
            f"{r.percentile(50) * 1000:>9.0f}{r.percentile(99) * 1000:>9.0f}"
            f"{r.server_cpu / r.seconds:>12.2f}{r.per_cpu_second:>11.2f}"
        )
    theirs = results[MLFLOW]
    print()
    for name, ours in results.items():
        if name == MLFLOW:
            continue
        ratio = ours.throughput / theirs.throughput if theirs.throughput else float("inf")
        p99_ratio = ours.percentile(99) / theirs.percentile(99)
        met = "goal met" if ratio >= GOAL and p99_ratio <= 1 else "goal not met"
        print(
            f"throughput: {name} is {ratio:.2f}x {MLFLOW} at {p99_ratio:.2f}x its p99; "
            f"{ours.per_cpu_second / theirs.per_cpu_second:.2f}x the requests per server CPU second "
            f"(goal: >= {GOAL:g}x at <= 1x p99: {met})"
        )
    if "onnx_int8_top1_flipped_percent" in tags:
        print(
            f"int8 at registration: top-1 changed on {tags['onnx_int8_top1_flipped_percent']}% of "
            f"{tags['onnx_int8_test_photos']} sample photos against fp32, accuracy change "
            f"{tags['onnx_int8_top1_change']} points (random weights: only the first number means much)"
        )
    print(
        "client CPU per request: "
        + ", ".join(
            f"{r.client_cpu / max(1, len(r.latencies)) * 1000:.1f} ms ({name})" for name, r in results.items()
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
