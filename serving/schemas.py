"""Request and response schemas of the prediction server: what /docs shows, and what the routes
that parse their own bodies validate against (`protocol.parse_json`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

IMAGE_INPUT = "image"  # BYTES [N]: encoded photos
PIXELS_INPUT = "pixels"  # FP32 [N,3,S,S]: photos preprocessed by the client


class ErrorBody(BaseModel):
    error: str


class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    parameters: dict[str, Any] = Field(description="labels, preprocessing and the confidence threshold")


class RequestInput(BaseModel):
    name: str = Field(description=f"`{IMAGE_INPUT}` (BYTES) or `{PIXELS_INPUT}` (FP32)")
    shape: list[int]
    datatype: str = Field(description="BYTES: base64-encoded photos; FP32: N×3×S×S preprocessed tensor")
    parameters: dict[str, Any] | None = None
    data: Any = Field(default=None, description="row-major, flat or nested; absent with binary data")


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


class V1Image(BaseModel):
    b64: str


class V1Instance(BaseModel):
    image: V1Image


class V1Request(BaseModel):
    instances: list[V1Instance] = Field(min_length=1)


class V1Prediction(BaseModel):
    labels: list[str]
    probabilities: list[float]
    confident: bool


class V1Response(BaseModel):
    predictions: list[V1Prediction]
    model_name: str
    model_version: str


class TopCategory(BaseModel):
    label: str
    probability: float


class PhotoResult(BaseModel):
    file: str
    top: list[TopCategory]
    confident: bool


class PredictResponse(BaseModel):
    model_name: str
    model_version: str
    confidence_threshold: float
    predictions: list[PhotoResult]


class SimilarNeighbour(BaseModel):
    rank: int = Field(description="1 = most similar")
    similarity: float = Field(description="cosine similarity of the two embeddings")
    category: str
    product_id: str
    path: str = Field(description="the photo's path in the catalogue the index was built from")


class SimilarResponse(BaseModel):
    file: str
    k: int = Field(description="neighbours returned: the k asked for, or the index size when smaller")
    index_size: int
    neighbours: list[SimilarNeighbour]
    embedding: list[float] | None = Field(
        default=None, description="the query's L2-normalised embedding (with ?embedding=true)"
    )


def upload_body(*, many: bool) -> dict:
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


def json_body(model: type[BaseModel]) -> dict:
    """OpenAPI request body of a route that parses its JSON body itself (see `with_request_schemas`)."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    }


def with_request_schemas(schema: dict) -> dict:
    """The app's OpenAPI schema with the request bodies of the self-parsing routes added, so /docs
    still shows them (they parse their bodies themselves, for precise 400/413/415/422 answers)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (InferenceRequest, V1Request):
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
    return schema
