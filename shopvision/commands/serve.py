"""shopvision serve: the prediction server (Open Inference Protocol v2, KServe v1, uploads, /metrics,
and POST /similar over an embedding index with --similar-index)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from . import add_step, positive_int

ORDER = 70


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _run(args: argparse.Namespace) -> None:
    import uvicorn

    from shopvision.components.data.images import DEFAULT_MAX_PIXELS
    from shopvision.components.errors import StepError
    from shopvision.components.training.model_source import MLFLOW_SCHEMES
    from shopvision.components.training.train_record import resolve_tracking_uri
    from shopvision.serving.app import create_app
    from shopvision.serving.live_quality import find_baseline
    from shopvision.serving.model import torch_threads
    from shopvision.serving.registry_watch import (
        AliasWatcher,
        load_version,
        parse_registry_uri,
        resolve,
        served_name,
    )
    from shopvision.serving.settings import ServerSettings, auto_forward_workers, available_cores
    from shopvision.serving.state import ServingState

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    log = logging.getLogger("shopvision.serving")
    parsed = parse_registry_uri(args.model)
    if args.watch_alias and (parsed is None or parsed[1] is None):
        raise StepError(f"--watch-alias needs --model models:/NAME@ALIAS, not {args.model}")
    if args.max_queue < max(args.max_photos, args.max_batch_size):
        raise StepError(
            f"--max-queue {args.max_queue} must be at least --max-photos ({args.max_photos}) and "
            f"--max-batch-size ({args.max_batch_size}): a request that fits would never be admitted"
        )
    if args.model.startswith(MLFLOW_SCHEMES):
        import mlflow

        mlflow.set_tracking_uri(resolve_tracking_uri(args.tracking_uri))

    similar = None
    if args.similar_index is not None:  # before the classifier: a wrong folder fails in seconds
        from shopvision.serving.similar import SimilarPhotos

        try:
            similar = SimilarPhotos(
                args.similar_index,
                device=args.device,
                max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
                max_aspect_ratio=args.max_aspect_ratio,
            )
        except ValueError as exc:  # a device this machine does not have
            raise StepError(str(exc)) from None
        similar.warm_up()
        log.info("similar photos: %s", similar.describe())

    ref = resolve(args.model)
    log.info("model %s", ref.describe())
    cores = available_cores()
    # On a CPU each forward worker gets an equal share of the cores, whichever runtime runs the pass.
    cpu_workers = args.forward_workers or auto_forward_workers("cpu", cores)
    cpu_threads = args.threads_per_worker or max(1, cores // cpu_workers)
    options = {
        "device": args.device,
        "precision": args.precision,
        "max_pixels": args.max_pixels or DEFAULT_MAX_PIXELS,
        "max_aspect_ratio": args.max_aspect_ratio,
        "runtime": args.runtime,
        "threads": cpu_threads,
    }
    warm_up = (1, args.max_batch_size)

    def load(model_ref):
        return load_version(model_ref, warm_up=warm_up, **options)

    try:
        model = load(ref)
    except ValueError as exc:  # device or precision this machine does not have
        raise StepError(str(exc)) from None
    settings = ServerSettings(
        model_name=served_name(args.model, args.model_name),
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_body_bytes=int(args.max_body_mb * 2**20),
        decode_threads=args.decode_threads,
        max_photos=args.max_photos,
        max_queue=args.max_queue,
        max_aspect_ratio=args.max_aspect_ratio,
        json_budget_bytes=int(args.json_budget_mb * 2**20),
        request_timeout=args.request_timeout,
        max_concurrency=args.max_concurrency,
        max_connections=args.max_connections,
    )
    settings.forward_workers = args.forward_workers or auto_forward_workers(model.device.type, cores)
    # Decoding threads run small torch ops on the CPU: one thread each, so they do not fight the
    # forward passes for cores.
    decode_init, forward_init = torch_threads(1), None
    if model.device.type == "cpu":
        forward_init = torch_threads(cpu_threads)
    log.info(
        "runtime %s: %d forward worker(s) on %d core(s), batches of up to %d photos gathered for up to "
        "%g ms; serving as %r",
        model.runtime_name if not model.threads else f"{model.runtime_name} ({model.threads} thread(s) each)",
        settings.forward_workers,
        cores,
        settings.max_batch_size,
        settings.max_wait_ms,
        settings.model_name,
    )
    log.info(
        "limits: %d photos per request, %d in progress, aspect ratio %g:1, %g MiB JSON budget, "
        "%g s per request, %d requests and %d connections at once",
        settings.max_photos,
        settings.max_queue,
        settings.max_aspect_ratio,
        args.json_budget_mb,
        settings.request_timeout,
        settings.max_concurrency,
        settings.max_connections,
    )
    state = ServingState(
        model,
        settings,
        source=ref.requested,
        forward_init=forward_init,
        decode_init=decode_init,
        similar=similar,
        # on a CPU the search thread gets a forward worker's share of the cores
        similar_init=forward_init,
    )
    quality = _live_quality(args, state, ref, model, load)
    baselines = {}  # version -> its drift baseline, fetched by the watcher's loading thread

    def load_watched(model_ref):
        new = load(model_ref)
        baselines[new.version] = find_baseline(model_ref)
        return new

    def swap_watched(new, model_ref) -> None:
        state.swap(new, model_ref)
        quality.serve(new, baselines.pop(new.version, None))

    background = []
    if args.watch_alias:
        watcher = AliasWatcher(
            ref, interval=args.watch_alias, load=load_watched, swap=swap_watched, metrics=state.metrics
        )
        background.append(lambda _state: watcher.run())
        log.info("watching %s every %g s", args.model, args.watch_alias)
    uvicorn.run(
        create_app(state, background, quality),
        host=args.host,
        port=args.port,
        workers=1,  # one process owns the GPU; concurrency comes from batching
        log_level=args.log_level,
        access_log=args.access_log,
        timeout_graceful_shutdown=10,
        # uvicorn's own bound: beyond this many connections or requests at once it answers a plain
        # 503 itself (the app's JSON 503 of --max-concurrency comes first for POST requests).
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=5,  # idle keep-alive connections count against that bound
    )


def _live_quality(args: argparse.Namespace, state, ref, model, load):
    """Drift against the served version's baseline, and the prediction log and shadow when asked for."""
    from shopvision.components.errors import StepError
    from shopvision.serving.drift import WindowSpec
    from shopvision.serving.live_quality import LiveQuality, find_baseline
    from shopvision.serving.model import torch_threads
    from shopvision.serving.prediction_log import PredictionLog
    from shopvision.serving.registry_watch import resolve
    from shopvision.serving.shadow import ShadowChallenger

    registry = state.metrics.registry
    prediction_log = None
    if args.prediction_log is not None:
        try:  # a folder that cannot be written fails now, not silently in the writer thread
            args.prediction_log.parent.mkdir(parents=True, exist_ok=True)
            args.prediction_log.open("ab").close()
        except OSError as exc:
            raise StepError(f"--prediction-log {args.prediction_log}: {exc.strerror or exc}") from None
        prediction_log = PredictionLog(
            args.prediction_log,
            registry,
            max_bytes=int(args.prediction_log_max_mb * 2**20),
            backups=args.prediction_log_backups,
        )
    shadow = None
    if args.shadow is not None:
        shadow = ShadowChallenger(
            args.shadow,
            lambda: load(resolve(args.shadow)),  # on the shadow's thread: a failure is only counted
            registry,
            fraction=args.shadow_fraction,
            thread_init=torch_threads(1),
        )
    window = WindowSpec(
        photos=args.drift_window, minutes=args.drift_window_minutes, min_photos=args.drift_min_photos
    )
    quality = LiveQuality(
        registry, state.settings.model_name, window, prediction_log=prediction_log, shadow=shadow
    )
    quality.serve(model, find_baseline(ref, args.drift_baseline))
    return quality


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, got {text}")
    return value


def _live_quality_flags(p: argparse.ArgumentParser) -> None:
    from shopvision.serving.drift import DEFAULT_MIN_PHOTOS, DEFAULT_WINDOW_PHOTOS
    from shopvision.serving.prediction_log import DEFAULT_BACKUPS, DEFAULT_MAX_MB
    from shopvision.serving.shadow import DEFAULT_FRACTION

    p.add_argument(
        "--drift-window",
        type=positive_int,
        metavar="PHOTOS",
        default=DEFAULT_WINDOW_PHOTOS,
        help="drift statistics over the last PHOTOS answered photos",
    )
    p.add_argument(
        "--drift-window-minutes",
        type=positive_float,
        metavar="MINUTES",
        help="drift statistics over the photos of the last MINUTES instead (at most 100,000 photos)",
    )
    p.add_argument(
        "--drift-min-photos",
        type=positive_int,
        default=DEFAULT_MIN_PHOTOS,
        help="photos the window must hold before drift scores are given",
    )
    p.add_argument(
        "--drift-baseline",
        metavar="FILE|URI",
        help="the drift baseline (default: the one logged with the served version, or drift_baseline.json "
        "beside a model folder)",
    )
    p.add_argument(
        "--prediction-log",
        type=Path,
        metavar="FILE",
        help="append one JSON line per answered photo (time, model version, top-5, confidence; never the "
        "photo) to FILE, rotated; written by a background thread, dropped (and counted) when it lags",
    )
    p.add_argument(
        "--prediction-log-max-mb",
        type=positive_float,
        default=DEFAULT_MAX_MB,
        help="size of FILE before rotating",
    )
    p.add_argument(
        "--prediction-log-backups",
        type=int,
        default=DEFAULT_BACKUPS,
        help="rotated files kept (FILE.1 ...); the log holds at most (backups + 1) x max-mb",
    )
    p.add_argument(
        "--shadow",
        metavar="MODEL",
        help="a challenger (models:/NAME@challenger, ...) run off the answer path on a fraction of photos: "
        "its agreement with the served answers, confidence and latency go to /metrics and the drift route",
    )
    p.add_argument(
        "--shadow-fraction",
        type=_fraction,
        default=DEFAULT_FRACTION,
        help="share of answered photos the challenger also sees",
    )


def add_parser(steps) -> None:
    from shopvision.serving.settings import DEVICES, PRECISIONS, RUNTIMES, ServerSettings

    defaults = ServerSettings()
    p = add_step(
        steps,
        "serve",
        "serve a model over HTTP: Open Inference Protocol v2, KServe v1, POST /predict uploads, /metrics",
        _run,
    )
    p.add_argument(
        "--model",
        required=True,
        help="models:/NAME@ALIAS (resolved to a version at start), models:/NAME/VERSION, runs:/..., "
        "a training output folder, a model folder or a checkpoint",
    )
    p.add_argument(
        "--similar-index",
        type=Path,
        metavar="DIR",
        help="an index made by 'shopvision features': enables POST /similar (top-k similar catalogue "
        "photos for an uploaded one), embedded by the index's own model in fp32",
    )
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 in a container")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--device", default="auto", help=f"{', '.join(DEVICES)} or cuda:N (auto: GPU when present)"
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="autocast dtype (auto: bf16 on GPUs that have it, else fp16; fp32 on CPU)",
    )
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="auto",
        help="what runs the forward pass: torch, onnx (the version's model.onnx in ONNX Runtime, CPU), "
        "onnx-int8 (its model.int8.onnx); auto: PyTorch bf16 on a GPU, on the CPU int8 when at most "
        "1%% of test answers changed at export, else onnx, else torch",
    )
    p.add_argument(
        "--max-batch-size",
        type=positive_int,
        default=defaults.max_batch_size,
        help="most photos in one forward pass",
    )
    p.add_argument(
        "--max-wait-ms",
        type=non_negative_float,
        default=defaults.max_wait_ms,
        help="longest a photo waits for others to share its forward pass",
    )
    p.add_argument(
        "--watch-alias",
        type=positive_float,
        metavar="SECONDS",
        help="poll the registry alias this often; hot-swap to a new champion",
    )
    p.add_argument(
        "--model-name",
        help="the name in /v2/models/NAME and /v1/models/NAME (default: the registered model's name "
        f"for models:/NAME@ALIAS and models:/NAME/V, else {defaults.model_name!r})",
    )
    p.add_argument(
        "--max-body-mb",
        type=positive_float,
        default=defaults.max_body_bytes / 2**20,
        help="largest request body, MiB",
    )
    p.add_argument(
        "--max-pixels",
        type=positive_int,
        default=None,
        help="largest photo (width × height) decoded (default: the clean step's 64 million)",
    )
    p.add_argument(
        "--max-aspect-ratio",
        type=positive_float,
        default=defaults.max_aspect_ratio,
        help="largest ratio of a photo's longer side to its shorter one (more: 422); bounds what one "
        "photo costs once resized",
    )
    p.add_argument(
        "--max-photos",
        type=positive_int,
        default=defaults.max_photos,
        help="most photos in one request, on every route (more: 413, before any is decoded)",
    )
    p.add_argument(
        "--max-queue",
        type=positive_int,
        default=defaults.max_queue,
        help="most photos in progress at once, being decoded or waiting for or in a forward pass "
        "(more: 503, before decoding)",
    )
    p.add_argument(
        "--json-budget-mb",
        type=positive_float,
        default=defaults.json_budget_bytes / 2**20,
        help="estimated memory that JSON bodies being parsed may take together, MiB (a JSON float "
        "list takes ~17x its text); a body over it alone: 413, others wait",
    )
    p.add_argument(
        "--request-timeout",
        type=positive_float,
        metavar="SECONDS",
        default=defaults.request_timeout,
        help="longest from request (body upload included) to answer; later: 504 and its photos dropped",
    )
    p.add_argument(
        "--max-concurrency",
        type=positive_int,
        default=defaults.max_concurrency,
        help="POST requests in progress at once (more: 503 in JSON; health, metadata and metrics exempt)",
    )
    p.add_argument(
        "--max-connections",
        type=positive_int,
        default=defaults.max_connections,
        help="uvicorn's limit_concurrency: open connections or requests beyond which uvicorn itself "
        "answers a plain-text 503",
    )
    p.add_argument(
        "--decode-threads",
        type=positive_int,
        default=defaults.decode_threads,
        help="threads decoding and preprocessing photos (default: the cores of the container's CPU "
        "quota, at most 8)",
    )
    p.add_argument(
        "--forward-workers",
        type=positive_int,
        help="forward passes in flight at once (default: 1 on a GPU, one per core up to 4 on a CPU)",
    )
    p.add_argument(
        "--threads-per-worker",
        type=positive_int,
        help="CPU threads per forward pass (default: the cores shared among the forward workers)",
    )
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    p.add_argument("--access-log", action="store_true", help="log every request (uvicorn access log)")
    _live_quality_flags(p)
