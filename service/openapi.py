"""/openapi.json, generated from the request schemas that validate requests (service/schemas.py)."""

from __future__ import annotations

from pydantic.json_schema import models_json_schema

from service.schemas import ErrorResponse, Schemas

ERRORS = {
    "400": "The body cannot be parsed (broken JSON, not UTF-8, a JSON value that is not an object).",
    "401": "CHARGEN_API_KEY is set and the request has no `Authorization: Bearer <key>` or a wrong one.",
    "413": "The body is larger than CHARGEN_MAX_BODY_BYTES.",
    "422": "A field is wrong (type, range, unknown field); `param` names it.",
    "429": "Every batch slot and queue place is taken; retry after `Retry-After` seconds.",
    "503": "The model is still loading; retry after `Retry-After` seconds.",
    "504": "The request passed its deadline (CHARGEN_REQUEST_TIMEOUT).",
}


def document(schemas: Schemas, version: str) -> dict:
    _, top = models_json_schema([(schemas.generate, "validation"), (schemas.completion, "validation"),
                                 (ErrorResponse, "validation")], ref_template="#/components/schemas/{model}")
    components = top["$defs"]
    ref = {name: {"$ref": f"#/components/schemas/{name}"} for name in components}
    generate_fields = components["GenerateRequest"]["properties"]
    errors = {code: {"description": text, "content": {"application/json": {"schema": ref["ErrorResponse"]}}}
              for code, text in ERRORS.items()}
    secured = {"security": [{"bearer": []}]} if schemas.settings.api_key else {}
    json_ok = {"content": {"application/json": {"schema": {"type": "object"}}}}

    paths = {
        "/v1/generate": {"post": {
            "summary": "Continue a prompt",
            "description": (
                "JSON in, JSON out; with `stream: true`, server-sent events: one `data: {\"index\", \"text\"}` event per "
                "chunk and a last `data: {\"done\": true, ...}` event with finish reasons, usage and timings. "
                "A body that is not JSON (or Content-Type text/plain) is the prompt itself; the other fields then come "
                "from the query string and the answer is text/plain (streamed as it is generated with stream=1)."),
            "parameters": [{"name": name, "in": "query", "required": False, "schema": schema,
                            "description": schema.get("description", "")}
                           for name, schema in generate_fields.items() if name != "prompt"],
            "requestBody": {"required": False, "content": {
                "application/json": {"schema": ref["GenerateRequest"]},
                "text/plain": {"schema": {"type": "string", "description": "The prompt"}}}},
            "responses": {"200": {"description": "The continuation(s)", "content": {
                "application/json": {"schema": {"type": "object"}},
                "text/event-stream": {"schema": {"type": "string"}},
                "text/plain": {"schema": {"type": "string"}}}}, **errors},
            **secured}},
        "/v1/completions": {"post": {
            "summary": "OpenAI-compatible completions (one token is one character)",
            "requestBody": {"required": True, "content": {"application/json": {"schema": ref["CompletionRequest"]}}},
            "responses": {"200": {"description": "A text_completion object, or server-sent events ending with `data: [DONE]`",
                                  **json_ok}, **errors},
            **secured}},
        "/v1/models": {"get": {"summary": "The model this server serves (OpenAI format)",
                               "responses": {"200": json_ok, **errors}, **secured}},
        "/v1/models/{model}": {"get": {"summary": "One model (OpenAI format)",
                                       "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
                                       "responses": {"200": json_ok, "404": {"description": "No such model",
                                                                      "content": {"application/json": {"schema": ref["ErrorResponse"]}}}},
                                       **secured}},
        "/health": {"get": {"summary": "200 once this worker's model is loaded, 503 before",
                            "responses": {"200": json_ok, "503": errors["503"]}}},
        "/info": {"get": {"summary": "The model's metadata, the engine's settings, the limits and defaults",
                          "responses": {"200": json_ok, "503": errors["503"]}}},
        "/metrics": {"get": {"summary": "Prometheus metrics of all workers",
                             "responses": {"200": {"description": "Prometheus text format",
                                                   "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/openapi.json": {"get": {"summary": "This document", "responses": {"200": json_ok}}},
    }
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "chargen", "version": version,
                 "description": "Character-level text generation. Every error has the shape of ErrorResponse."},
        "paths": paths,
        "components": {"schemas": components},
    }
    if schemas.settings.api_key:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc
