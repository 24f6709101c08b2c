"""What the routes of the prediction server do alike: pick the model, decode photos off the event loop,
run the batcher, read uploads, and turn every client mistake into an `ApiError` with its status."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from shopvision.components.images import ImageDecodeError

from .batcher import NotRunning, Overloaded

if TYPE_CHECKING:
    from .model import PhotoClassifier
    from .state import ServingState

DECODE_STATUS = {"not_an_image": 415, "corrupt_image": 400, "too_many_pixels": 413}
MAX_FILES = 256  # photos in one /predict upload


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
        raise ApiError(DECODE_STATUS.get(exc.reason, 400), f"{name}: {exc}") from None


async def classify_images(
    state: ServingState, model: PhotoClassifier, blobs: list[bytes], names: list[str]
) -> list:
    """Decode every photo on the pool (in parallel), then one batcher submission."""
    tensors = await asyncio.gather(
        *(
            in_thread(state, decoded, model.preprocess, blob, name)
            for blob, name in zip(blobs, names, strict=True)
        )
    )
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


async def read_uploads(request: Request) -> tuple[list[str], list[bytes]]:
    """(names, encoded photos) of a multipart upload (any field name) or of a raw image/* body."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "multipart/form-data":
        form = await request.form(max_files=MAX_FILES, max_fields=MAX_FILES)
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
