"""The HTTP layer of the prediction server: FastAPI routes over the classifier and the batcher.

Routes (the serving model is called `--model-name`, "shopvision" by default):
- Open Inference Protocol v2 (KServe, Triton): GET /v2/health/live, /v2/health/ready, /v2,
  /v2/models/{name}, /v2/models/{name}/ready; POST /v2/models/{name}/infer
- KServe v1: GET /v1/models/{name}; POST /v1/models/{name}:predict
- POST /predict: one or more uploaded photos (multipart), or one photo as the raw body
- POST /similar?k=10: the k catalogue photos most like one uploaded photo, with `--similar-index`
  (404 without); embedded by the index's own model in fp32 on a thread of its own
- GET /metrics (Prometheus), /docs (OpenAPI)

Errors are JSON `{"error": "..."}`: 4xx for every client mistake (the status says which), 503 while
not ready or overloaded, 500 only for a fault of the server itself. Nothing here touches torch: a
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
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from shopvision import __version__

from . import protocol
from .handling import (
    ApiError,
    classify_images,
    decoded,
    error,
    in_thread,
    read_uploads,
    require_json,
    run_batch,
    serving_model,
    unknown_model,
)
from .middleware import BodyLimit, RequestMetrics
from .model import InputError
from .state import ServingState

if TYPE_CHECKING:
    from PIL import Image

    from .similar import SimilarAnswer, SimilarPhotos

log = logging.getLogger("shopvision.serving")

SIMILAR_DEFAULT_K = 10
SIMILAR_MAX_K = 1000  # neighbours in one /similar answer
SIMILAR_MAX_PENDING = 64  # /similar queries waiting for or in the search thread; more: 503


def _upload_body(*, many: bool) -> dict:
    """OpenAPI request body of the upload routes: multipart file field(s), or one raw image/* body.
    (They parse their bodies themselves, so FastAPI cannot infer it.)"""
    photo = {"type": "string", "format": "binary"}
    field = {"type": "array", "items": photo} if many else photo
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": {"type": "object", "properties": {"file": field}}},
                "image/*": {"schema": photo},
            },
        }
    }


def create_app(
    state: ServingState,
    background: Sequence[Callable[[ServingState], Coroutine[Any, Any, None]]] = (),
) -> FastAPI:
    """The app over a loaded, warmed model. `background` coroutines (the alias watcher) run while it serves."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.batcher.start()
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

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error(exc.status, exc.message)

    @app.exception_handler(protocol.ProtocolError)
    async def _protocol_error(request: Request, exc: protocol.ProtocolError) -> JSONResponse:
        return error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        return error(422, f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}")

    @app.exception_handler(Exception)
    async def _server_fault(request: Request, exc: Exception) -> JSONResponse:
        log.error(
            "internal error on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc
        )
        return error(500, f"internal server error ({type(exc).__name__})")

    # --- health and metadata ---

    @app.get("/v2/health/live", tags=["v2"], summary="The process is up")
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready", tags=["v2"], summary="The model is loaded and warmed up")
    async def ready() -> JSONResponse:
        return JSONResponse({"ready": state.ready}, status_code=200 if state.ready else 503)

    @app.get("/v2", tags=["v2"], response_model=protocol.ServerMetadata, summary="Server metadata")
    async def server_metadata() -> dict:
        return {"name": "shopvision", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get(
        "/v2/models/{name}",
        tags=["v2"],
        response_model=protocol.ModelMetadata,
        responses={404: {"model": protocol.ErrorBody}},
        summary="Model metadata: inputs, outputs, labels, preprocessing",
    )
    async def model_metadata(name: str) -> dict:
        model = serving_model(state, name)
        spec = model.spec
        size = spec.image_size
        return {
            "name": settings.model_name,
            "versions": [model.version],
            "platform": "pytorch",
            "inputs": [
                {"name": protocol.IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
                {"name": protocol.PIXELS_INPUT, "datatype": "FP32", "shape": [-1, 3, size, size]},
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
            },
        }

    @app.get("/v2/models/{name}/ready", tags=["v2"], summary="Whether this model answers")
    async def model_ready(name: str) -> JSONResponse:
        if (missing := unknown_model(state, name)) is not None:
            raise missing
        return JSONResponse({"name": name, "ready": state.ready}, status_code=200 if state.ready else 503)

    # --- Open Inference Protocol v2 inference ---

    infer_body = {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}}},
        }
    }

    @app.post(
        "/v2/models/{name}/infer",
        tags=["v2"],
        summary="Classify photos (BYTES, base64 in JSON) or preprocessed tensors (FP32 N×3×S×S)",
        response_model=protocol.InferenceResponse,
        responses={s: {"model": protocol.ErrorBody} for s in (400, 404, 413, 415, 422, 503)},
        openapi_extra=infer_body,
    )
    async def infer(name: str, request: Request) -> JSONResponse:
        model = serving_model(state, name)
        header_length = request.headers.get(protocol.HEADER_LENGTH)
        if header_length is None:
            require_json(request)
        body = await request.body()
        infer_request, raw = await in_thread(state, protocol.parse_infer_request, body, header_length)
        protocol.requested_outputs(infer_request)  # unknown output names fail before any work
        if len(infer_request.inputs) != 1:
            raise ApiError(
                400,
                f"send exactly one input: {protocol.IMAGE_INPUT} (BYTES) or {protocol.PIXELS_INPUT} (FP32)",
            )
        item = infer_request.inputs[0]
        if item.datatype == "BYTES":
            blobs = await in_thread(state, protocol.image_blobs, item, raw.get(0))
            predictions = await classify_images(
                state, model, blobs, [f"input {item.name!r} element {i}" for i in range(len(blobs))]
            )
        elif item.datatype == "FP32":
            array = await in_thread(state, protocol.pixel_array, item, raw.get(0))
            try:
                tensors = await in_thread(state, model.check_pixels, array)
            except InputError as exc:
                raise ApiError(400, f"input {item.name!r}: {exc}") from None
            if not tensors:
                raise ApiError(400, f"input {item.name!r} holds no photo")
            predictions = await run_batch(state, model, tensors)
        else:
            raise ApiError(
                400, f"input {item.name!r}: datatype {item.datatype!r} not accepted; use BYTES or FP32"
            )
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
        response_model=protocol.V1Response,
        responses={s: {"model": protocol.ErrorBody} for s in (400, 404, 413, 415, 422, 503)},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/V1Request"}}},
            }
        },
    )
    async def v1_predict(name: str, request: Request) -> JSONResponse:
        model = serving_model(state, name)
        require_json(request)
        blobs = await in_thread(state, protocol.v1_images, await request.body())
        predictions = await classify_images(state, model, blobs, [f"instance {i}" for i in range(len(blobs))])
        return JSONResponse(protocol.v1_response(settings.model_name, predictions))

    # --- upload route for people and curl ---

    @app.post(
        "/predict",
        tags=["upload"],
        summary="Upload photos (multipart, any field name) and get the top-5 categories of each",
        description="`curl -F file=@photo.jpg -F file=@other.png http://HOST:PORT/predict`, or one photo "
        "as the raw body with an image/* Content-Type. `confident` is false when the top probability is "
        "under the threshold chosen at evaluation.",
        response_model=protocol.PredictResponse,
        responses={s: {"model": protocol.ErrorBody} for s in (400, 413, 415, 503)},
        openapi_extra=_upload_body(many=True),
    )
    async def predict(request: Request) -> JSONResponse:
        model = serving_model(state, settings.model_name)
        names, blobs = await read_uploads(request)
        predictions = await classify_images(state, model, blobs, names)
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
        response_model=protocol.SimilarResponse,
        responses={s: {"model": protocol.ErrorBody} for s in (400, 404, 413, 415, 422, 503)},
        openapi_extra=_upload_body(many=False),
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
        names, blobs = await read_uploads(request)
        if len(blobs) != 1:
            raise ApiError(400, f"send exactly one photo to /similar, got {len(blobs)}")
        image = await in_thread(state, decoded, finder.decode, blobs[0], names[0])
        answer = await find_similar(finder, image, k)
        return JSONResponse(
            protocol.similar_response(
                names[0], finder.size, answer.neighbours, answer.embedding if embedding else None
            )
        )

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/", include_in_schema=False)
    async def index() -> dict:
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

    def openapi() -> dict:
        # The inference routes parse their bodies themselves (for precise 400/415/422 answers);
        # their request schemas are added here so /docs still shows them.
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (protocol.InferenceRequest, protocol.V1Request):
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=state.metrics)
    return app
