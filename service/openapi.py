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
    "422": ("A field is wrong (type, range, unknown field, a rule across fields); `param` names it. A constraint "
            "(regex, grammar, json_schema, response_format) that cannot be compiled for the model (malformed, too large "
            "once compiled, too slow to compile, characters the model's vocabulary lacks, no string at all) is code "
            "invalid_constraint, answered before anything is generated, streamed requests too."),
    "429": "Every batch slot and queue place is taken; retry after `Retry-After` seconds.",
    "503": "The model is still loading; retry after `Retry-After` seconds.",
    "504": "The request passed its deadline (CHARGEN_REQUEST_TIMEOUT).",
}


def _events(data: str) -> dict:
    # The schema of a text/event-stream describes one event (OpenAPI 3.1; 3.2 calls it itemSchema).
    return {"schema": {"type": "object", "required": ["data"], "properties": {"data": {"type": "string", "description": data}}}}


# Structured output, said once for the three generating endpoints' answers.
CONSTRAINED = (" A choice of a constrained request (regex, grammar, json_schema, response_format) has `incomplete` "
               "(boolean) beside its finish_reason, streamed in the event or chunk that carries the finish_reason: false "
               "when the text is a whole match, true when it is only the start of one (finish_reason length, a stop "
               "sequence, cancelled); and `constraint_error` (string) where a limit on the constraint's work (a grammar "
               "too ambiguous to follow further) ended the text there.")


def document(schemas: Schemas, version: str) -> dict:
    _, top = models_json_schema([(schemas.generate, "validation"), (schemas.completion, "validation"),
                                 (schemas.chat, "validation"), (schemas.score, "validation"), (schemas.tokenize, "validation"),
                                 (schemas.detokenize, "validation"), (schemas.root_tokenize, "validation"),
                                 (schemas.root_detokenize, "validation"), (schemas.responses, "validation"),
                                 (schemas.inspect, "validation"),
                                 (ErrorResponse, "validation")],
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
                "fields but prompt, with the same names, limits and defaults, n only 1, logprobs only 0 and json_schema only in a "
                "JSON body (the header X-Incomplete says whether a constrained answer not streamed is a whole match). With a JSON "
                "body the query string must be empty. (OpenAPI cannot tie parameters to one body type, so they are "
                "described here rather than listed as parameters.)"),
            "requestBody": {"required": False, "content": {
                "application/json": {"schema": ref["GenerateRequest"]},
                "text/plain": {"schema": {"type": "string", "maxLength": schemas.settings.max_prompt_chars,
                                          "description": "The prompt"}}}},
            "responses": {"200": {"description": "The continuation(s)." + CONSTRAINED, "content": {
                "application/json": {"schema": {"type": "object"}},
                "text/event-stream": _events('JSON: {"index", "text"} (and "logprobs") per chunk; last {"done": true, ...}; '
                                            'or {"error": {...}} if generation fails after the first chunk'),
                "text/plain": {"schema": {"type": "string"}}}}, **errors},
            **secured}},
        "/v1/completions": {"post": {
            "summary": "OpenAI-compatible completions (one token is one character)",
            "requestBody": {"required": True, "content": {"application/json": {"schema": ref["CompletionRequest"]}}},
            "responses": {"200": {"description": "A text_completion object, or with `stream: true` server-sent events "
                                                 "ending with `data: [DONE]`." + CONSTRAINED,
                                  "content": {"application/json": {"schema": {"type": "object"}},
                                              "text/event-stream": _events("JSON: a text_completion chunk; last [DONE]")}},
                          **errors, **not_json},
            **secured}},
        "/v1/chat/completions": {"post": {
            "summary": "OpenAI-compatible chat completions (one token is one character)",
            "description": ("The messages are written into a transcript (CHARGEN_CHAT_TEMPLATE, by default `NAME:\\ncontent\\n\\n` "
                            "with each role's speaker name from CHARGEN_CHAT_NAMES) ending with the assistant's name; the reply "
                            "is the model's continuation, up to where the next message would begin (and, with response_format "
                            "json_object or json_schema, JSON that keeps to it). Tools, functions, audio and content parts "
                            "other than text are refused (422)."),
            "requestBody": {"required": True, "content": {"application/json": {"schema": ref["ChatRequest"]}}},
            "responses": {"200": {"description": "A chat.completion object, or with `stream: true` server-sent events of "
                                                 "chat.completion.chunk objects ending with `data: [DONE]`." + CONSTRAINED,
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
        # ---- OpenAI's Responses API and vLLM's tokenizer endpoints (service/responses_api.py, service/tokenizer_api.py)
        "/v1/responses": {"post": {
            "summary": "OpenAI's Responses API over the chat pipeline (one token is one character; nothing is stored)",
            "description": ("`instructions` and `input` are written into a transcript as /v1/chat/completions writes its "
                            "messages; the one output message is the model's continuation, `incomplete` when it reaches "
                            "max_output_tokens. text.format's JSON formats hold the output as chat's response_format does. "
                            "Tools, stored responses (store: true, previous_response_id) and reasoning are refused (422)."),
            "requestBody": {"required": True, "content": {"application/json": {"schema": ref["ResponsesRequest"]}}},
            "responses": {"200": {"description": "A response object, or with `stream: true` the Responses API's server-sent "
                                                 "events (response.created ... response.completed or response.incomplete)",
                                  "content": {"application/json": {"schema": {"type": "object"}},
                                              "text/event-stream": _events("JSON: a Responses API event (its `type` is the "
                                                                           "`event:` line)")}},
                          **errors, **not_json},
            **secured}},
        "/tokenizer_info": {"get": {
            "summary": "vLLM's tokenizer_info for a character tokenizer: one token is one character",
            "description": ("tokenizer_class, vocab_size, bos_token (the start: the character an empty prompt is read after), "
                            "eos_token and pad_token (null: none), model_max_length (null: no context window), "
                            "max_prompt_chars, chat_template (Jinja, the layout of /v1/chat/completions' transcripts) and "
                            "unknown_characters (how characters outside the vocabulary are read)."),
            "parameters": [{"name": "model", "in": "query", "required": False,
                            "schema": {"type": "string", "enum": schemas.models.names},
                            "description": "The model (default: the default model)"}],
            "responses": {"200": json_ok, "401": errors["401"], "404": errors["404"], "414": errors["414"],
                          "503": errors["503"]}, **secured}},
        "/tokenize": {"post": {
            "summary": "vLLM's tokenize: a text as character ids (tokens, count, max_model_len), with the characters "
                       "outside the vocabulary listed (replaced, dropped) as /v1/completions reads them",
            "description": "vLLM's completion form (`prompt`); its chat form (`messages`) is not taken: a 422 names the field.",
            "requestBody": {"required": True, "content": {"application/json": {"schema": ref["RootTokenizeRequest"]}}},
            "responses": {"200": json_ok, **errors, **not_json}, **secured}},
        "/detokenize": {"post": {
            "summary": "vLLM's detokenize: character ids back to text (prompt); ids outside the vocabulary are dropped "
                       "and listed (dropped)",
            "requestBody": {"required": True, "content": {"application/json": {"schema": ref["RootDetokenizeRequest"]}}},
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
                                          "description": "The model to describe (default: the default model; given once)"}],
                          "responses": {"200": json_ok, "404": errors["404"], "414": errors["414"], "422": errors["422"],
                                        "503": errors["503"]}}},
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
