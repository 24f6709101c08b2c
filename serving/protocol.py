"""Wire formats of the prediction server: Open Inference Protocol v2, KServe v1 and the upload route.

Plain functions from request bytes to image bytes or float arrays, and from predictions to response
bodies; they know nothing of torch or of the model (KServe's split: the protocol layer never touches
the network). Every client mistake raises `ProtocolError` with the HTTP status it deserves.

Open Inference Protocol notes (https://kserve.github.io/website/ "Open Inference Protocol"):
- BYTES elements in JSON are strings; an encoded photo is sent base64-encoded, as KServe's REST
  clients do (a `data:image/...;base64,` prefix is accepted too).
- The binary tensor data extension is accepted for inputs: the `Inference-Header-Content-Length`
  header gives the length of the JSON part, and an input whose `parameters.binary_data_size` is set
  takes that many bytes from what follows it, in input order (BYTES: each element is a 4-byte
  little-endian length and the bytes; FP32: little-endian floats, row-major). Responses are JSON.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError

from .schemas import InferenceRequest, RequestInput, V1Request

HEADER_LENGTH = "inference-header-content-length"
OUTPUTS = ("labels", "probabilities", "confident")
# Memory that parsing one JSON value costs, at most (measured with pydantic 2 on CPython 3.11: 68 bytes
# per float in a list at the peak, 51 per empty list or object): `json_cost` counts one per ',', '['
# and '{', so a list of floats, whose text is ~17x smaller than its parsed form, is budgeted in full.
JSON_BYTES_PER_VALUE = 72


class ProtocolError(Exception):
    """A request the server will not run; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --- requests -------------------------------------------------------------------------------------


def check_photo_count(count: int, max_photos: int) -> None:
    """413 for a request carrying more photos than one request may: checked on the parsed request,
    before a single photo is decoded, so a request of 20,000 tiny photos costs no decoding at all."""
    if count > max_photos:
        raise ProtocolError(
            413,
            f"this request carries {count} photos; the server takes at most {max_photos} per request "
            "(--max-photos): send them in several requests",
        )


def json_part(body: bytes, header_length: str | None) -> bytes:
    """The JSON part of an inference body: all of it, or what Inference-Header-Content-Length says
    (a header that does not fit is refused by `parse_infer_request`)."""
    if header_length is not None and header_length.isdigit() and 0 < int(header_length) <= len(body):
        return body[: int(header_length)]
    return body


def json_cost(data: bytes) -> int:
    """Upper estimate of the memory parsing this JSON takes: the text plus JSON_BYTES_PER_VALUE per
    value (one per ',', '[' and '{'; commas inside strings count too, which only overestimates)."""
    values = data.count(b",") + data.count(b"[") + data.count(b"{") + 1
    return len(data) + JSON_BYTES_PER_VALUE * values


def parse_json(model: type[BaseModel], data: bytes) -> Any:
    """Validate a JSON body: 400 when it is not JSON at all, 422 when it is JSON of the wrong shape."""
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise ProtocolError(400, f"malformed JSON: {errors[0]['msg']}") from None
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:5])
        raise ProtocolError(422, f"the request does not fit the {model.__name__} schema: {details}") from None


def parse_infer_request(body: bytes, header_length: str | None) -> tuple[InferenceRequest, dict[int, bytes]]:
    """The request and, per input index, its binary data (binary tensor data extension)."""
    binary = b""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            length = -1
        if not 0 < length <= len(body):
            raise ProtocolError(
                400,
                f"Inference-Header-Content-Length {header_length[:40]!r} does not fit a {len(body)}-byte body",
            )
        body, binary = body[:length], body[length:]
    request = parse_json(InferenceRequest, body)
    raw: dict[int, bytes] = {}
    offset = 0
    for index, item in enumerate(request.inputs):
        size = (item.parameters or {}).get("binary_data_size")
        if size is None:
            continue
        if header_length is None:
            raise ProtocolError(
                400, "binary_data_size given without an Inference-Header-Content-Length header"
            )
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise ProtocolError(400, f"input {item.name!r}: binary_data_size {size!r} overruns the body")
        raw[index] = binary[offset : offset + size]
        offset += size
    if offset != len(binary):
        raise ProtocolError(400, f"{len(binary) - offset} bytes after the JSON header belong to no input")
    return request, raw


def _shape(item: RequestInput) -> list[int]:
    shape = item.shape
    if not shape or any(not isinstance(d, int) or d < 0 for d in shape):
        raise ProtocolError(
            400, f"input {item.name!r}: shape must be a list of non-negative integers, got {shape[:8]}"
        )
    return shape


def _flatten(data: Any) -> list:
    if not isinstance(data, list):
        return [data]
    flat: list = []
    stack = [iter(data)]
    while stack:
        for element in stack[-1]:
            if isinstance(element, list):
                stack.append(iter(element))
                break
            flat.append(element)
        else:
            stack.pop()
    return flat


def decode_base64(text: Any, where: str) -> bytes:
    if not isinstance(text, str):
        raise ProtocolError(400, f"{where}: expected a base64 string, got {type(text).__name__}")
    if text.startswith("data:"):
        text = text.split(",", 1)[-1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(400, f"{where}: not valid base64") from None


def image_blobs(item: RequestInput, raw: bytes | None, max_photos: int) -> list[bytes]:
    """The encoded photos of a BYTES input; 413 beyond `max_photos`, declared or sent."""
    count = math.prod(_shape(item))
    check_photo_count(count, max_photos)
    if raw is not None:
        blobs, offset = [], 0
        while offset < len(raw):
            if offset + 4 > len(raw):
                raise ProtocolError(
                    400, f"input {item.name!r}: binary BYTES data ends inside a length prefix"
                )
            (size,) = struct.unpack_from("<I", raw, offset)
            offset += 4
            if offset + size > len(raw):
                raise ProtocolError(
                    400, f"input {item.name!r}: binary element {len(blobs)} overruns the data"
                )
            blobs.append(raw[offset : offset + size])
            offset += size
            check_photo_count(len(blobs), max_photos)  # stop at once when the shape understates it
    else:
        if item.data is None:
            raise ProtocolError(400, f"input {item.name!r} has no data")
        values = _flatten(item.data)
        check_photo_count(len(values), max_photos)
        blobs = [decode_base64(v, f"input {item.name!r} element {i}") for i, v in enumerate(values)]
    if len(blobs) != count:
        raise ProtocolError(
            400, f"input {item.name!r}: shape {item.shape[:8]} says {count} elements, data has {len(blobs)}"
        )
    if not blobs:
        raise ProtocolError(400, f"input {item.name!r} holds no photo")
    return blobs


def pixel_array(
    item: RequestInput, raw: bytes | None, photo_shape: tuple[int, int, int], max_photos: int
) -> np.ndarray:
    """The N×C×H×W float array of an FP32 input. The declared shape is checked against the model's
    photo shape and `max_photos` before the data is looked at, so a huge declared shape costs nothing."""
    shape = _shape(item)
    if len(shape) != 4 or tuple(shape[1:]) != tuple(photo_shape):
        expected = "×".join(str(d) for d in photo_shape)
        raise ProtocolError(
            400, f"input {item.name!r}: expected a tensor of shape N×{expected}, got {shape[:8]}"
        )
    check_photo_count(shape[0], max_photos)
    if shape[0] == 0:
        raise ProtocolError(400, f"input {item.name!r} holds no photo")
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != 4 * count:
            raise ProtocolError(
                400, f"input {item.name!r}: shape {shape} needs {4 * count} bytes, got {len(raw)}"
            )
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)
    if item.data is None:
        raise ProtocolError(400, f"input {item.name!r} has no data")
    try:
        array = np.asarray(item.data, dtype=np.float32)
    except (ValueError, TypeError, OverflowError):
        raise ProtocolError(
            400, f"input {item.name!r}: data must be numbers in a regular (flat or nested) list"
        ) from None
    if array.size != count:
        raise ProtocolError(
            400, f"input {item.name!r}: shape {shape} says {count} values, data has {array.size}"
        )
    return array.reshape(shape)


def requested_outputs(request: InferenceRequest) -> tuple[str, ...]:
    if not request.outputs:
        return OUTPUTS
    names = tuple(o.name for o in request.outputs)
    unknown = [n for n in names if n not in OUTPUTS]
    if unknown:
        raise ProtocolError(400, f"unknown output {unknown[0]!r}; this model has {', '.join(OUTPUTS)}")
    return names


def v1_images(body: bytes, max_photos: int) -> list[bytes]:
    """The photos of a KServe v1 request: {"instances": [{"image": {"b64": "..."}}, ...]}; 413 beyond
    `max_photos`, before any is decoded."""
    request = parse_json(V1Request, body)
    check_photo_count(len(request.instances), max_photos)
    return [decode_base64(inst.image.b64, f"instance {i}") for i, inst in enumerate(request.instances)]


# --- responses ------------------------------------------------------------------------------------
# `predictions` are objects with labels, probabilities, confident and model_version (model.Prediction).


def infer_response(
    model_name: str, request: InferenceRequest, predictions: Sequence[Any], threshold: float
) -> dict:
    n, k = len(predictions), len(predictions[0].labels)
    tensors = {
        "labels": (
            [n, k],
            "BYTES",
            [label for p in predictions for label in p.labels],
        ),
        "probabilities": ([n, k], "FP32", [prob for p in predictions for prob in p.probabilities]),
        "confident": ([n], "BOOL", [p.confident for p in predictions]),
    }
    return {
        "model_name": model_name,
        "model_version": predictions[0].model_version,
        "id": request.id,
        "parameters": {"confidence_threshold": threshold},
        "outputs": [
            {"name": name, "shape": tensors[name][0], "datatype": tensors[name][1], "data": tensors[name][2]}
            for name in requested_outputs(request)
        ],
    }


def v1_response(model_name: str, predictions: Sequence[Any]) -> dict:
    return {
        "predictions": [
            {"labels": list(p.labels), "probabilities": list(p.probabilities), "confident": p.confident}
            for p in predictions
        ],
        "model_name": model_name,
        "model_version": predictions[0].model_version,
    }


def predict_response(
    model_name: str, files: Sequence[str], predictions: Sequence[Any], threshold: float
) -> dict:
    return {
        "model_name": model_name,
        "model_version": predictions[0].model_version,
        "confidence_threshold": threshold,
        "predictions": [
            {
                "file": file,
                "top": [
                    {"label": label, "probability": prob}
                    for label, prob in zip(p.labels, p.probabilities, strict=True)
                ],
                "confident": p.confident,
            }
            for file, p in zip(files, predictions, strict=True)
        ],
    }


def similar_response(
    file: str, index_size: int, neighbours: Sequence[Any], embedding: Sequence[float] | None = None
) -> dict:
    """`neighbours` are objects with rank, similarity, category, product_id and path (similar.SimilarPhoto)."""
    body = {
        "file": file,
        "k": len(neighbours),
        "index_size": index_size,
        "neighbours": [
            {
                "rank": n.rank,
                "similarity": n.similarity,
                "category": n.category,
                "product_id": n.product_id,
                "path": n.path,
            }
            for n in neighbours
        ],
    }
    if embedding is not None:
        body["embedding"] = [float(v) for v in embedding]
    return body
