"""The HTTP layer of the prediction server: FastAPI routes over the classifier and the batcher.

Routes (the serving model is called `--model-name`; by default the registered model's name when
serving models:/NAME@ALIAS or models:/NAME/V, else "shopvision"):
- Open Inference Protocol v2 (KServe, Triton): GET /v2/health/live, /v2/health/ready, /v2,
  /v2/models/{name}, /v2/models/{name}/ready; POST /v2/models/{name}/infer
- KServe v1: GET /v1/models/{name}; POST /v1/models/{name}:predict
- POST /predict: one or more uploaded photos (multipart), or one photo as the raw body
- POST /similar?k=10: the k catalogue photos most like one uploaded photo, with `--similar-index`
  (404 without); embedded by the index's own model in fp32 on a thread of its own
- GET /metrics (Prometheus), /docs (OpenAPI)
- GET / for a browser (Accept: text/html): the photo-check page (`page/`); for anyone else the JSON
  index of the routes

Errors are JSON `{"error": "..."}`: 4xx for every client mistake (the status says which), 503 while
not ready or overloaded, 504 past the request deadline, 500 only for a fault of the server itself
(with no detail: that goes to the log). Every route caps photos per request (413, before any is
decoded) and admits photos against one bound for the whole server (503, before decoding); the
bounds are in `settings.py`, the shared ones in `limits.py`. Nothing here touches torch: a
request is parsed (`protocol.py`), its photos are decoded on a thread pool by the model's own
`preprocess`, and the tensors go to the batcher with the model that preprocessed them
(`handling.py`); what the routes share lives in `state.py`, the ASGI middleware in `middleware.py`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Query, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response

from shopvision import __version__

from . import protocol, schemas
from .handling import (
    ApiError,
    classify_images,
    decoded,
    in_thread,
    install_error_handlers,
    read_uploads,
    require_json,
    run_batch,
    serving_model,
    unknown_model,
)
from .middleware import BodyLimit, Deadline, RequestMetrics, WorkLimit
from .model import InputError
from .page import add_page_routes, page_response, wants_html
from .state import ServingState

if TYPE_CHECKING:
    from PIL import Image

    from .live_quality import LiveQuality
    from .similar import SimilarAnswer, SimilarPhotos

log = logging.getLogger("shopvision.serving")

SIMILAR_DEFAULT_K = 10
SIMILAR_MAX_K = 1000  # neighbours in one /similar answer
SIMILAR_MAX_PENDING = 64  # /similar queries waiting for or in the search thread; more: 503


def create_app(
    state: ServingState,
    background: Sequence[Callable[[ServingState], Coroutine[Any, Any, None]]] = (),
    quality: LiveQuality | None = None,
) -> FastAPI:
    """The app over a loaded, warmed model. `background` coroutines (the alias watcher) run while it serves.
    `quality` (live_quality.py) watches the answers: drift, the prediction log, the shadow challenger."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.batcher.start()
        if quality is not None:
            quality.start()
        tasks = [asyncio.create_task(make(state)) for make in background]
        state.ready = True
        log.info("ready: serving %s as %r", state.model.describe(), state.settings.model_name)
        try:
            yield
        finally:
            state.ready = False
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await state.batcher.stop()
            if quality is not None:
                await asyncio.to_thread(quality.stop)
            state.decode_pool.shutdown(wait=False, cancel_futures=True)
            if state.similar_pool is not None:
                state.similar_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="shopvision prediction server",
        version=__version__,
        description="Top categories for marketplace product photos: Open Inference Protocol v2, "
        'KServe v1 and a plain upload route. Errors are JSON `{"error": "..."}`.',
        lifespan=lifespan,
    )
    app.state.serving = state
    settings = state.settings

    install_error_handlers(app)

    def watched(predictions: list, **photos) -> list:
        """The answers, after `quality` saw them (counters and bounded queues only: it never waits)."""
        if quality is not None:
            quality.observe(predictions, **photos)
        return predictions

    # --- health and metadata ---

    @app.get("/v2/health/live", tags=["v2"], summary="The process is up")
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready", tags=["v2"], summary="The model is loaded and warmed up")
    async def ready() -> JSONResponse:
        return JSONResponse({"ready": state.ready}, status_code=200 if state.ready else 503)

    @app.get("/v2", tags=["v2"], response_model=schemas.ServerMetadata, summary="Server metadata")
    async def server_metadata() -> dict:
        return {"name": "shopvision", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get(
        "/v2/models/{name}",
        tags=["v2"],
        response_model=schemas.ModelMetadata,
        responses={404: {"model": schemas.ErrorBody}},
        summary="Model metadata: inputs, outputs, labels, preprocessing",
    )
    async def model_metadata(name: str) -> dict:
        model = serving_model(state, name)
        spec = model.spec
        size = spec.image_size
        return {
            "name": settings.model_name,
            "versions": [model.version],
            "platform": model.platform,
            "inputs": [
                {"name": schemas.IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
                {"name": schemas.PIXELS_INPUT, "datatype": "FP32", "shape": [-1, 3, size, size]},
            ],
            "outputs": [
                {"name": "labels", "datatype": "BYTES", "shape": [-1, model.k]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, model.k]},
                {"name": "confident", "datatype": "BOOL", "shape": [-1]},
            ],
            "parameters": {
                "arch": spec.arch,
                "labels": spec.labels,
                "confidence_threshold": model.threshold,
                "confidence_threshold_source": model.threshold_source,
                "preprocessing": {
                    "resize_shorter_side": spec.resize_size,
                    "center_crop": size,
                    "scale": "0..1",
                    "mean": list(spec.mean),
                    "std": list(spec.std),
                    "layout": "NCHW, RGB",
                },
                "source": state.source,
                "device": str(model.device),
                "precision": model.precision,
                "runtime": model.runtime_name,  # torch, onnx or onnx-int8 (serve --runtime)
                "threads_per_pass": model.threads,  # CPU threads of one forward pass (0: a GPU)
                "limits": {  # what one request may carry (more: 413/422 before any work)
                    "max_photos_per_request": settings.max_photos,
                    "max_pixels_per_photo": model.max_pixels,
                    "max_aspect_ratio": model.max_aspect_ratio,
                    "max_body_bytes": settings.max_body_bytes,
                    "request_timeout_s": settings.request_timeout,
                },
            },
        }

    @app.get("/v2/models/{name}/ready", tags=["v2"], summary="Whether this model answers")
    async def model_ready(name: str) -> JSONResponse:
        if (missing := unknown_model(state, name)) is not None:
            raise missing
        return JSONResponse({"name": name, "ready": state.ready}, status_code=200 if state.ready else 503)

    # --- Open Inference Protocol v2 inference ---

    @app.post(
        "/v2/models/{name}/infer",
        tags=["v2"],
        summary="Classify photos (BYTES, base64 in JSON) or preprocessed tensors (FP32 N×3×S×S)",
        response_model=schemas.InferenceResponse,
        responses={s: {"model": schemas.ErrorBody} for s in (400, 404, 413, 415, 422, 503, 504)},
        openapi_extra=schemas.json_body(schemas.InferenceRequest),
    )
    async def infer(name: str, request: Request) -> JSONResponse:
        model = serving_model(state, name)
        header_length = request.headers.get(protocol.HEADER_LENGTH)
        if header_length is None:
            require_json(request)
        body = await request.body()
        cost = await in_thread(state, protocol.json_cost, protocol.json_part(body, header_length))
        async with state.json_budget.reserve(cost):  # parsed JSON is what costs: photos are cheap
            infer_request, raw = await in_thread(state, protocol.parse_infer_request, body, header_length)
            protocol.requested_outputs(infer_request)  # unknown output names fail before any work
            if len(infer_request.inputs) != 1:
                raise ApiError(
                    400,
                    f"send exactly one input: {schemas.IMAGE_INPUT} (BYTES) or {schemas.PIXELS_INPUT} (FP32)",
                )
            item = infer_request.inputs[0]
            if item.datatype not in ("BYTES", "FP32"):
                raise ApiError(
                    400, f"input {item.name!r}: datatype {item.datatype!r} not accepted; use BYTES or FP32"
                )
            if item.datatype == "BYTES":
                blobs = await in_thread(state, protocol.image_blobs, item, raw.get(0), settings.max_photos)
            else:
                array = await in_thread(
                    state, protocol.pixel_array, item, raw.get(0), model.input_shape, settings.max_photos
                )
            item.data = raw = None  # the parsed JSON values: freed before the photos are worked on
        if item.datatype == "BYTES":
            predictions = await classify_images(
                state, model, blobs, [f"input {item.name!r} element {i}" for i in range(len(blobs))]
            )
            watched(predictions, blobs=blobs)
        else:
            with state.admission.admit(len(array)):
                try:
                    tensors = await in_thread(state, model.check_pixels, array)
                except InputError as exc:
                    raise ApiError(400, f"input {item.name!r}: {exc}") from None
                del array
                predictions = watched(await run_batch(state, model, tensors), tensors=tensors)
        return JSONResponse(
            protocol.infer_response(settings.model_name, infer_request, predictions, model.threshold)
        )

    # --- KServe v1 ---

    @app.get("/v1/models/{name}", tags=["v1"], summary="Whether this model answers (KServe v1)")
    async def v1_model(name: str) -> dict:
        serving_model(state, name)
        return {"name": name, "ready": state.ready}

    @app.post(
        "/v1/models/{name}:predict",
        tags=["v1"],
        summary='Classify base64 photos: {"instances": [{"image": {"b64": "..."}}]}',
        response_model=schemas.V1Response,
        responses={s: {"model": schemas.ErrorBody} for s in (400, 404, 413, 415, 422, 503, 504)},
        openapi_extra=schemas.json_body(schemas.V1Request),
    )
    async def v1_predict(name: str, request: Request) -> JSONResponse:
        model = serving_model(state, name)
        require_json(request)
        body = await request.body()
        async with state.json_budget.reserve(await in_thread(state, protocol.json_cost, body)):
            blobs = await in_thread(state, protocol.v1_images, body, settings.max_photos)
        predictions = await classify_images(state, model, blobs, [f"instance {i}" for i in range(len(blobs))])
        watched(predictions, blobs=blobs)
        return JSONResponse(protocol.v1_response(settings.model_name, predictions))

    # --- upload route for people and curl ---

    @app.post(
        "/predict",
        tags=["upload"],
        summary="Upload photos (multipart, any field name) and get the top-5 categories of each",
        description="`curl -F file=@photo.jpg -F file=@other.png http://HOST:PORT/predict`, or one photo "
        "as the raw body with an image/* Content-Type. `confident` is false when the top probability is "
        "under the threshold chosen at evaluation.",
        response_model=schemas.PredictResponse,
        responses={s: {"model": schemas.ErrorBody} for s in (400, 413, 415, 422, 503, 504)},
        openapi_extra=schemas.upload_body(many=True),
    )
    async def predict(request: Request) -> JSONResponse:
        model = serving_model(state, settings.model_name)
        names, blobs = await read_uploads(request, settings.max_photos)
        predictions = watched(await classify_images(state, model, blobs, names), blobs=blobs)
        return JSONResponse(
            protocol.predict_response(settings.model_name, names, predictions, model.threshold)
        )

    # --- similar catalogue photos ---

    async def find_similar(finder: SimilarPhotos, image: Image.Image, k: int) -> SimilarAnswer:
        """Embed and search on the similar thread; 503 when too many queries already wait for it."""
        if state.similar_pending >= SIMILAR_MAX_PENDING:
            raise ApiError(503, f"{state.similar_pending} similar-photo queries already waiting; retry later")
        state.similar_pending += 1
        try:
            started = time.perf_counter()
            answer = await asyncio.get_running_loop().run_in_executor(
                state.similar_pool, finder.find, image, k
            )
        except RuntimeError as exc:  # the pool was shut down: the server is stopping
            if "shutdown" not in str(exc):
                raise
            raise ApiError(503, "the server is shutting down") from None
        finally:
            state.similar_pending -= 1
        state.metrics.observe_similar(time.perf_counter() - started)
        return answer

    @app.post(
        "/similar",
        tags=["similar"],
        summary="Upload one photo and get the k most similar catalogue photos (needs --similar-index)",
        description="`curl -F file=@photo.jpg 'http://HOST:PORT/similar?k=10'`, or the photo as the raw "
        "body with an image/* Content-Type. Exact cosine search over the index given with "
        "`--similar-index`, embedded by that index's own model (not the served champion) in fp32. "
        "k larger than the index returns the whole index, ranked. 404 when the server has no index.",
        response_model=schemas.SimilarResponse,
        responses={s: {"model": schemas.ErrorBody} for s in (400, 404, 413, 415, 422, 503, 504)},
        openapi_extra=schemas.upload_body(many=False),
    )
    async def similar(
        request: Request,
        k: int = Query(SIMILAR_DEFAULT_K, ge=1, le=SIMILAR_MAX_K, description="neighbours to return"),
        embedding: bool = Query(False, description="also return the query photo's embedding"),
    ) -> JSONResponse:
        finder = state.similar
        if finder is None:
            raise ApiError(
                404,
                "this server has no similar-photo index: start it with --similar-index DIR "
                "(an index made by 'shopvision features')",
            )
        if not state.ready:
            raise ApiError(503, "the server is not ready")
        names, blobs = await read_uploads(request, settings.max_photos)
        if len(blobs) != 1:
            raise ApiError(400, f"send exactly one photo to /similar, got {len(blobs)}")
        image = await in_thread(state, decoded, finder.decode, blobs[0], names[0])
        answer = await find_similar(finder, image, k)
        return JSONResponse(
            protocol.similar_response(
                names[0], finder.size, answer.neighbours, answer.embedding if embedding else None
            )
        )

    @app.get(
        "/v2/models/{name}/drift",
        tags=["ops"],
        responses={404: {"model": schemas.ErrorBody}},
        summary="Live answer statistics over the window, drift scores against the version's baseline, "
        "the shadow challenger and the prediction log (what /metrics shows, as JSON)",
    )
    async def drift(name: str) -> dict:
        if (missing := unknown_model(state, name)) is not None:
            raise missing
        if quality is None:
            raise ApiError(404, "this server does not watch its answers")
        return {"name": settings.model_name, **quality.snapshot()}

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/", include_in_schema=False, response_model=None)
    async def index(request: Request) -> dict | Response:
        if wants_html(request):  # a browser: the photo-check page (page/)
            return page_response()
        return {
            "model_name": settings.model_name,
            "model_version": state.model.version,
            "docs": "/docs",
            "routes": [
                "/predict",
                f"/v2/models/{settings.model_name}/infer",
                f"/v1/models/{settings.model_name}:predict",
                *(["/similar"] if state.similar is not None else []),
            ],
        }

    add_page_routes(app, state)

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = schemas.with_request_schemas(
                get_openapi(
                    title=app.title, version=app.version, description=app.description, routes=app.routes
                )
            )
        return app.openapi_schema

    app.openapi = openapi
    # Added innermost first: RequestMetrics sees every answer, 503s and 504s of the others included.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(Deadline, seconds=settings.request_timeout)
    app.add_middleware(WorkLimit, max_requests=settings.max_concurrency, metrics=state.metrics)
    app.add_middleware(RequestMetrics, metrics=state.metrics)
    return app
