"""What the routes of the prediction server do alike: pick the model, decode photos off the event loop,
run the batcher, read uploads, and turn every client mistake into an `ApiError` with its status."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from shopvision.components.data.images import ImageDecodeError

from .batcher import NotRunning, Overloaded
from .protocol import ProtocolError

if TYPE_CHECKING:
    from .model import PhotoClassifier
    from .state import ServingState

log = logging.getLogger("shopvision.serving")

DECODE_STATUS = {"not_an_image": 415, "corrupt_image": 400, "too_many_pixels": 413, "aspect_ratio": 422}
# What a client is told about a photo that cannot be decoded: the verdict in our words, never the
# decoder's own message (a library's internals); too_many_pixels and aspect_ratio carry our own detail.
DECODE_MESSAGES = {
    "not_an_image": "not a recognised image format (JPEG, PNG, WebP, GIF, BMP or TIFF)",
    "corrupt_image": "the image data is corrupt or truncated",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def unknown_model(state: ServingState, name: str) -> ApiError | None:
    served = state.settings.model_name
    return (
        None if name == served else ApiError(404, f"model {name!r} not found; this server serves {served!r}")
    )


def serving_model(state: ServingState, name: str) -> PhotoClassifier:
    """The model now serving under `name`; 404 for another name, 503 before the server is ready."""
    if (missing := unknown_model(state, name)) is not None:
        raise missing
    if not state.ready:
        raise ApiError(503, "the server is not ready")
    return state.model


async def in_thread(state: ServingState, function: Callable, *args) -> Any:
    """`function(*args)` on the decoding pool, so parsing and decoding never block the event loop."""
    return await asyncio.get_running_loop().run_in_executor(state.decode_pool, function, *args)


def decoded(convert: Callable[[bytes], Any], blob: bytes, name: str) -> Any:
    """`convert(blob)` (a model's decoder), with bad photos as the client errors they are."""
    if not blob:
        raise ApiError(400, f"{name} is empty")
    try:
        return convert(blob)
    except ImageDecodeError as exc:
        status = DECODE_STATUS.get(exc.reason, 400)
        detail = DECODE_MESSAGES.get(exc.reason, DECODE_MESSAGES["corrupt_image"])
        if exc.reason == "too_many_pixels":
            detail = f"{exc.detail} (--max-pixels)"
        elif exc.reason == "aspect_ratio":
            detail = exc.detail
        raise ApiError(status, f"{name}: {detail}") from None


async def classify_images(
    state: ServingState, model: PhotoClassifier, blobs: list[bytes], names: list[str]
) -> list:
    """Admit the photos (503 when the server holds too many already), decode every one on the pool
    in parallel, then one batcher submission. A request that is cancelled (its deadline, a client
    that left) drops its decodes not yet started and its photos still waiting."""
    with state.admission.admit(len(blobs)):
        loop = asyncio.get_running_loop()
        decodes = [
            loop.run_in_executor(state.decode_pool, decoded, model.preprocess, blob, name)
            for blob, name in zip(blobs, names, strict=True)
        ]
        try:
            tensors = await asyncio.gather(*decodes)
        except BaseException:  # one bad photo, or cancelled: the decodes not yet started never run
            for decode in decodes:
                decode.cancel()
            raise
        return await run_batch(state, model, tensors)


async def run_batch(state: ServingState, model: PhotoClassifier, tensors: list) -> list:
    try:
        return await state.batcher.submit(model, tensors)
    except (Overloaded, NotRunning) as exc:
        raise ApiError(503, str(exc)) from None


def require_json(request: Request) -> None:
    media = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if not (media == "application/json" or media.endswith("+json")):
        raise ApiError(415, f"Content-Type {media!r} not accepted here: send application/json")


async def read_uploads(request: Request, max_photos: int) -> tuple[list[str], list[bytes]]:
    """(names, encoded photos) of a multipart upload (any field name) or of a raw image/* body;
    413 for more than `max_photos` files (the parser stops at the first one too many)."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "multipart/form-data":
        try:
            form = await request.form(max_files=max_photos, max_fields=max_photos)
        except HTTPException as exc:
            if str(exc.detail).startswith("Too many files"):
                raise ApiError(
                    413,
                    f"this upload carries more than {max_photos} photos; the server takes at most "
                    f"{max_photos} per request (--max-photos): send them in several requests",
                ) from None
            raise ApiError(400, f"malformed multipart upload: {exc.detail}") from None
        try:
            uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            names = [u.filename or f"file {i}" for i, u in enumerate(uploads)]
            blobs = [await u.read() for u in uploads]
        finally:
            await form.close()
        if not uploads:
            raise ApiError(400, "no file in the upload: send the photos as multipart file fields")
    elif media.startswith("image/") or media == "application/octet-stream":
        names, blobs = ["body"], [await request.body()]
    else:
        raise ApiError(
            415,
            f"Content-Type {media or 'none'!r} not accepted here: upload multipart/form-data or image/*",
        )
    return names, blobs


def install_error_handlers(app: FastAPI) -> None:
    """Every error is JSON `{"error": "..."}`: the client's mistakes with their own status and our own
    words; a fault of the server as a bare 500 (type, message and traceback go to the log only)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error(exc.status, exc.message)

    @app.exception_handler(ProtocolError)
    async def _protocol_error(request: Request, exc: ProtocolError) -> JSONResponse:
        return error(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        return error(422, f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}")

    @app.exception_handler(Exception)
    async def _server_fault(request: Request, exc: Exception) -> JSONResponse:
        log.error(
            "internal error on %s %s: %s: %s",
            request.method,
            request.url.path,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
        return error(500, "internal server error; the server log has the details")
