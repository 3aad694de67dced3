"""/openapi.json, generated from the request schemas that validate requests (service/schemas.py)."""

from __future__ import annotations

from pydantic.json_schema import models_json_schema

from service.reading import MAX_JSON_DEPTH
from service.schemas import ErrorResponse, Schemas

ERRORS = {
    "400": ("The body cannot be parsed (broken JSON, not UTF-8, a JSON value that is not an object, "
            f"JSON nested more than {MAX_JSON_DEPTH} levels deep)."),
    "401": "CHARGEN_API_KEY is set and the request has no `Authorization: Bearer <key>` or a wrong one.",
    "404": "`model` names no model of this server (code model_not_found; the message lists them).",
    "413": "The body is larger than CHARGEN_MAX_BODY_BYTES.",
    "414": "The request line (the URL with its query string) is longer than the server reads (4094 bytes).",
    "422": "A field is wrong (type, range, unknown field, a rule across fields); `param` names it.",
    "429": "Every batch slot and queue place is taken; retry after `Retry-After` seconds.",
    "503": "The model is still loading; retry after `Retry-After` seconds.",
    "504": "The request passed its deadline (CHARGEN_REQUEST_TIMEOUT).",
}


def _events(data: str) -> dict:
    # The schema of a text/event-stream describes one event (OpenAPI 3.1; 3.2 calls it itemSchema).
    return {"schema": {"type": "object", "required": ["data"], "properties": {"data": {"type": "string", "description": data}}}}


def document(schemas: Schemas, version: str) -> dict:
    _, top = models_json_schema([(schemas.generate, "validation"), (schemas.completion, "validation"),
                                 (schemas.chat, "validation"), (schemas.score, "validation"), (schemas.tokenize, "validation"),
                                 (schemas.detokenize, "validation"), (schemas.inspect, "validation"), (ErrorResponse, "validation")],
                                ref_template="#/components/schemas/{model}")
    components = top["$defs"]
    ref = {name: {"$ref": f"#/components/schemas/{name}"} for name in components}
    errors = {code: {"description": text, "content": {"application/json": {"schema": ref["ErrorResponse"]}}}
              for code, text in ERRORS.items()}
    not_json = {"415": {"description": "The body is not JSON (Content-Type: application/json).",
                        "content": {"application/json": {"schema": ref["ErrorResponse"]}}}}
    secured = {"security": [{"bearer": []}]} if schemas.settings.api_key else {}
    json_ok = {"content": {"application/json": {"schema": {"type": "object"}}}}

    paths = {
        "/v1/generate": {"post": {
            "summary": "Continue a prompt",
            "description": (
                "JSON in, JSON out; with `stream: true`, server-sent events: one `data: {\"index\", \"text\"}` event per "
                "chunk and a last `data: {\"done\": true, ...}` event with finish reasons, usage and timings. "
                "A body that is not JSON (or Content-Type text/plain) is the prompt itself; the answer is then text/plain, "
                "the text followed by one newline (streamed as it is generated with stream=1), and the settings come from the query string: GenerateRequest's "
                "fields but prompt, with the same names, limits and defaults, n only 1 and logprobs only 0. With a JSON "
                "body the query string must be empty. (OpenAPI cannot tie parameters to one body type, so they are "
                "described here rather than listed as parameters.)"),
            "requestBody": {"required": False, "content": {
                "application/json": {"schema": ref["GenerateRequest"]},
                "text/plain": {"schema": {"type": "string", "maxLength": schemas.settings.max_prompt_chars,
                                          "description": "The prompt"}}}},
            "responses": {"200": {"description": "The continuation(s)", "content": {
                "application/json": {"schema": {"type": "object"}},
                "text/event-stream": _events('JSON: {"index", "text"} (and "logprobs") per chunk; last {"done": true, ...}; '
                                            'or {"error": {...}} if generation fails after the first chunk'),
                "text/plain": {"schema": {"type": "string"}}}}, **errors},
            **secured}},
        "/v1/completions": {"post": {
            "summary": "OpenAI-compatible completions (one token is one character)",
            "requestBody": {"required": True, "content": {"application/json": {"schema": ref["CompletionRequest"]}}},
            "responses": {"200": {"description": "A text_completion object, or with `stream: true` server-sent events "
                                                 "ending with `data: [DONE]`",
                                  "content": {"application/json": {"schema": {"type": "object"}},
                                              "text/event-stream": _events("JSON: a text_completion chunk; last [DONE]")}},
                          **errors, **not_json},
            **secured}},
        "/v1/chat/completions": {"post": {
            "summary": "OpenAI-compatible chat completions (one token is one character)",
            "description": ("The messages are written into a transcript (CHARGEN_CHAT_TEMPLATE, by default `NAME:\\ncontent\\n\\n` "
                            "with each role's speaker name from CHARGEN_CHAT_NAMES) ending with the assistant's name; the reply "
                            "is the model's continuation, up to where the next message would begin. Tools, functions, audio, "
                            "content parts other than text and response formats other than text are refused (422)."),
            "requestBody": {"required": True, "content": {"application/json": {"schema": ref["ChatRequest"]}}},
            "responses": {"200": {"description": "A chat.completion object, or with `stream: true` server-sent events of "
                                                 "chat.completion.chunk objects ending with `data: [DONE]`",
                                  "content": {"application/json": {"schema": {"type": "object"}},
                                              "text/event-stream": _events("JSON: a chat.completion.chunk; last [DONE]")}},
                          **errors, **not_json},
            **secured}},
        "/v1/score": {"post": {
            "summary": "Score a text: nats and bits per character (as `chargen evaluate`), per character on request",
            "requestBody": {"required": True, "content": {"application/json": {"schema": ref["ScoreRequest"]}}},
            "responses": {"200": json_ok, **errors, **not_json}, **secured}},
        "/v1/tokenize": {"post": {
            "summary": "A text as the model's character ids, with the characters outside its vocabulary (replaced or dropped)",
            "requestBody": {"required": True, "content": {"application/json": {"schema": ref["TokenizeRequest"]}}},
            "responses": {"200": json_ok, **errors, **not_json}, **secured}},
        "/v1/detokenize": {"post": {
            "summary": "Character ids back to text (ids outside the vocabulary are dropped and listed)",
            "requestBody": {"required": True, "content": {"application/json": {"schema": ref["DetokenizeRequest"]}}},
            "responses": {"200": json_ok, **errors, **not_json}, **secured}},
        "/v1/inspect": {"post": {
            "summary": "Look inside: the network's hidden states, cell states and gates after each character of a text, "
                       "what it predicted next, and the cells that follow features of the text",
            "description": ("Computed from the model's own weights (those of its model.onnx), from the zero state. `layers[]` "
                            "holds the layers asked for, each with the quantities asked for; `next[t]` is what the model "
                            "predicted after reading chars[0..t]: the character that came (null after the last), its "
                            "probability, and the 5 most likely. With cells > 0, `ranking` (per feature, the cells by |r|) and "
                            "`saturation` (per layer and gate). 404 also when `layers`, `quantities` or `gates` name "
                            "something the model lacks (codes layer_not_found, quantity_not_found)."),
            "requestBody": {"required": True, "content": {"application/json": {"schema": ref["InspectRequest"]}}},
            "responses": {"200": json_ok, **errors, **not_json}, **secured}},
        "/v1/models": {"get": {"summary": "The models this server serves (OpenAI format, with chargen's fields)",
                               "responses": {"200": json_ok, **errors}, **secured}},
        "/v1/models/{model}": {"get": {"summary": "One model (OpenAI format)",
                                       "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"},
                                                       "example": schemas.models.default}],
                                       "responses": {"200": json_ok, "404": {"description": "No such model",
                                                                      "content": {"application/json": {"schema": ref["ErrorResponse"]}}}},
                                       **secured}},
        "/health": {"get": {"summary": "200 once this worker's model is loaded, 503 before and while it shuts down (readiness)",
                            "responses": {"200": json_ok, "503": errors["503"]}}},
        "/health/live": {"get": {"summary": "200 whenever this worker answers HTTP, loading or shutting down too (liveness)",
                                 "responses": {"200": json_ok}}},
        "/info": {"get": {"summary": "A model's metadata (every model's in `models`), the engine's settings, the limits and defaults",
                          "parameters": [{"name": "model", "in": "query", "required": False,
                                          "schema": {"type": "string", "enum": schemas.models.names},
                                          "description": "The model to describe (default: the default model)"}],
                          "responses": {"200": json_ok, "404": errors["404"], "414": errors["414"], "503": errors["503"]}}},
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
