"""The app's OpenAPI schema describes the POST bodies (from the pydantic models), their
responses and the OpenAI error body, with every $ref resolvable: no server needed."""

import json

import pytest

from serve_app.app import fastapi_app
from serve_app.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

ENDPOINTS = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
             "/v1/embeddings": EmbeddingRequest}
STREAMS = {"/v1/completions", "/v1/chat/completions"}


@pytest.fixture(scope="module")
def schema():
    return fastapi_app.openapi()


def _refs(node):
    if isinstance(node, dict):
        if "$ref" in node:
            yield node["$ref"]
        for v in node.values():
            yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


@pytest.mark.parametrize("path, model", ENDPOINTS.items())
def test_request_body_is_the_model(schema, path, model):
    operation = schema["paths"][path]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": f"#/components/schemas/{model.__name__}"}
    published = schema["components"]["schemas"][model.__name__]
    assert set(published["properties"]) == set(model.model_fields)
    assert set(published.get("required", [])) == {
        name for name, f in model.model_fields.items() if f.is_required()}
    for status in ("400", "401", "404", "413", "503"):
        error = operation["responses"][status]["content"]["application/json"]["schema"]
        assert error == {"$ref": "#/components/schemas/ErrorResponse"}
    assert ("text/event-stream" in operation["responses"]["200"]["content"]) == (path in STREAMS)


def test_refs_resolve_and_no_defs_left(schema):
    names = schema["components"]["schemas"]
    for ref in _refs(schema):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in names, ref
    assert "$defs" not in json.dumps(schema)


def test_error_body_and_prompt_shape(schema):
    names = schema["components"]["schemas"]
    assert names["ErrorDetail"]["required"] == ["message", "type"]
    prompt = names["CompletionRequest"]["properties"]["prompt"]
    assert [alt["type"] for alt in prompt["anyOf"]] == ["string", "array", "array", "array"]
    given = names["EmbeddingRequest"]["properties"]["input"]
    assert [alt["type"] for alt in given["anyOf"]] == ["string", "array", "array", "array"]


# Not chat: its schema cannot say that only an assistant message may leave out content.
@pytest.mark.parametrize("path, model", [("/v1/completions", CompletionRequest),
                                         ("/v1/embeddings", EmbeddingRequest)])
def test_schemathesis_loads_it_and_draws_valid_bodies(schema, path, model):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    operation = schemathesis.openapi.from_dict(schema)[path]["POST"]

    @settings(max_examples=10, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def drawn(case):
        model.model_validate(json.loads(json.dumps(case.body)))

    drawn()
