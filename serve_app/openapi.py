"""The request and error bodies in the app's OpenAPI schema: the routes read a raw
``Request`` (for the body-size limit and our own error bodies), so FastAPI cannot see
their pydantic models; this publishes them, and the OpenAI error body, by hand."""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel

from serve_app.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    MAX_EMBEDDING_INPUTS,
    LoadLoRAAdapterRequest,
    UnloadLoRAAdapterRequest,
)

_REF = "#/components/schemas/{model}"

# path -> (request model, response model; None: a text/plain answer) of each POST endpoint
_BODIES: dict[str, tuple[type[BaseModel], type[BaseModel] | None]] = {
    "/v1/completions": (CompletionRequest, CompletionResponse),
    "/v1/chat/completions": (ChatCompletionRequest, ChatCompletionResponse),
    "/v1/embeddings": (EmbeddingRequest, EmbeddingResponse),
    "/v1/load_lora_adapter": (LoadLoRAAdapterRequest, None),
    "/v1/unload_lora_adapter": (UnloadLoRAAdapterRequest, None),
}

_ERRORS = {
    400: "Invalid request: malformed JSON, a wrong type or a value out of range",
    401: "Missing or wrong API key",
    404: "No such model (or LoRA adapter)",
    409: "The LoRA adapter is in use by unfinished requests",
    413: "Request body larger than max_body_bytes",
    503: "The engine is unavailable (restarting or shutting down)",
}
_STREAMS = {"/v1/completions", "/v1/chat/completions"}  # stream=true answers text/event-stream
_ERRORS_OF = {  # the statuses an endpoint answers, where not 400, 401, 404, 413, 503
    "/v1/load_lora_adapter": (400, 401, 413, 503),
    "/v1/unload_lora_adapter": (400, 401, 404, 409, 413, 503),
}

# What CompletionRequest's "before" validator accepts, which pydantic reports as `Any` ({}).
_PROMPT = {
    "title": "Prompt",
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1},
        {"type": "array", "items": {"type": "integer"}, "minItems": 1},
        {"type": "array", "items": {"type": "array", "items": {"type": "integer"}, "minItems": 1},
         "minItems": 1},
    ],
}

# The same for EmbeddingRequest's ``input`` (text must not be empty; OpenAI's limit on inputs).
_INPUT = {
    "title": "Input",
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1,
         "maxItems": MAX_EMBEDDING_INPUTS},
        {"type": "array", "items": {"type": "integer"}, "minItems": 1},
        {"type": "array", "items": {"type": "array", "items": {"type": "integer"}, "minItems": 1},
         "minItems": 1, "maxItems": MAX_EMBEDDING_INPUTS},
    ],
}

_ERROR_SCHEMAS = {
    "ErrorDetail": {
        "title": "ErrorDetail",
        "type": "object",
        "properties": {
            "message": {"type": "string"},
            "type": {"type": "string"},
            "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "code": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
        "required": ["message", "type"],
    },
    "ErrorResponse": {
        "title": "ErrorResponse",
        "type": "object",
        "properties": {"error": {"$ref": _REF.format(model="ErrorDetail")}},
        "required": ["error"],
    },
}


def publish_request_schemas(app: FastAPI) -> None:
    """Makes ``app.openapi()`` describe the POST bodies, their 200 responses and the
    error responses. Call once, after the routes' module has been set up."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = _with_bodies(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi


def _with_bodies(schema: dict) -> dict:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    _add_components(components, _ERROR_SCHEMAS)
    errors = {str(status): {"description": text, "content": {"application/json": {
        "schema": {"$ref": _REF.format(model="ErrorResponse")}}}}
        for status, text in _ERRORS.items()}
    for path, (request, response) in _BODIES.items():
        statuses = _ERRORS_OF.get(path, (400, 401, 404, 413, 503))
        operation = schema.get("paths", {}).get(path, {}).get("post")
        if operation is None:  # the route is not mounted (or not in the schema)
            continue
        operation["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": _REF.format(model=_component(components, request,
                                                              "validation"))}}}}
        if response is None:
            ok = {"text/plain": {"schema": {"type": "string"}}}
        else:
            ok = {"application/json": {"schema": {"$ref": _REF.format(
                model=_component(components, response, "serialization"))}}}
            if path in _STREAMS:
                ok["text/event-stream"] = {"schema": {"type": "string"}}
        operation["responses"] = {"200": {"description": "Successful Response", "content": ok},
                                  **{str(s): errors[str(s)] for s in statuses}}
    return schema


def _component(components: dict, model: type[BaseModel], mode: str) -> str:
    """Adds ``model`` (and its ``$defs``) to ``components``; returns its name there."""
    body = model.model_json_schema(ref_template=_REF, mode=mode)
    _add_components(components, body.pop("$defs", {}))
    if model is CompletionRequest and body["properties"].get("prompt") == {"title": "Prompt"}:
        body["properties"]["prompt"] = _PROMPT
    if model is EmbeddingRequest and body["properties"].get("input") == {"title": "Input"}:
        body["properties"]["input"] = _INPUT
    _add_components(components, {model.__name__: body})
    return model.__name__


def _add_components(components: dict, new: dict) -> None:
    for name, body in new.items():
        # Two models of one name would make the refs ambiguous.
        assert components.get(name, body) == body, f"two OpenAPI schemas named {name!r}"
        components[name] = body
