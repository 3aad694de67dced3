"""Reading a request: the body's encoding, JSON or plain text, the query string, and validation by
the application's schemas. Every mistake becomes an ApiError that names it (never a 500).
"""

from __future__ import annotations

import codecs
import json
import re

import numpy as np
from flask import current_app, request
from gunicorn.http.errors import NoMoreData, ParseException
from werkzeug.exceptions import ClientDisconnected
from pydantic import ValidationError

from service.errors import ApiError, bad_body, bad_field, from_validation, repeated_setting


def _schemas():
    return current_app.extensions["chargen"].schemas


# A request is two levels deep ({"prompt": ["a", "b"]}); the parser (and whatever walks its result)
# recurses once per level, and a 1 MiB body of [ would recurse a million times: RecursionError, a 500.
MAX_JSON_DEPTH = 32
# A JSON string, whose brackets are text. Unrolled, so the expression runs in C without backtracking;
# on the UTF-8 bytes, where " and \ never occur inside a character of several bytes.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_STEP = np.zeros(256, np.int64)  # byte -> change of depth
_STEP[list(b"[{")] = 1
_STEP[list(b"]}")] = -1


def json_depth(body: bytes) -> int:
    """How deeply `body` nests arrays and objects, without parsing it (invalid JSON gets a number
    too; the parser then says what is wrong with it)."""
    outside_strings = np.frombuffer(_STRING.sub(b"", body), np.uint8)
    return int(np.cumsum(_STEP[outside_strings]).max(initial=0))


def _parse_json(body: bytes) -> dict:
    if body.startswith(codecs.BOM_UTF8):  # JSON is UTF-8 without one, but some tools write it
        body = body[len(codecs.BOM_UTF8):]
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_body(f"the body is not UTF-8: byte 0x{body[e.start]:02x} at offset {e.start} is invalid", "invalid_encoding") from None
    depth = json_depth(body)
    if depth > MAX_JSON_DEPTH:
        raise bad_body(f"the body is JSON nested {depth} levels deep; at most {MAX_JSON_DEPTH} levels are read", "too_deep")
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except ValueError as e:
        raise bad_body(f"the body is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(data, dict):
        raise bad_body(f"the body must be a JSON object, got a JSON {_json_kind(data)}", "not_an_object")
    return data


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def _json_kind(value) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _is_json(body: bytes) -> bool:
    """JSON when declared so; otherwise (curl -d sends form-urlencoded) a body that starts with `{`
    is taken as JSON and anything else as a plain-text prompt. text/plain is always a prompt."""
    mimetype = request.mimetype
    if mimetype == "application/json" or mimetype.endswith("+json"):
        return True
    if mimetype == "text/plain":
        return False
    return body.lstrip()[:1] == b"{"


def _decode_text(body: bytes) -> str:
    charset = request.mimetype_params.get("charset", "utf-8")
    try:
        text_encoding = codecs.lookup(charset)._is_text_encoding  # not base64, zlib, rot13 and the like
    except LookupError:
        text_encoding = False
    if not text_encoding:
        raise bad_body(f"unknown charset {charset[:40]!r} in Content-Type: name a text encoding (utf-8 by default)",
                       "invalid_encoding")
    try:
        return body.decode(charset)
    except UnicodeDecodeError as e:
        raise bad_body(f"the body is not valid {charset}: byte 0x{body[e.start]:02x} at offset {e.start} is invalid "
                       "(send UTF-8, or name the charset in Content-Type)", "invalid_encoding") from None
    except UnicodeError as e:  # the codecs that refuse everything ("undefined") or decode no bytes as text (punycode)
        raise bad_body(f"the body cannot be read as {charset[:40]}: {str(e)[:200]} (send UTF-8, or name the charset in "
                       "Content-Type)", "invalid_encoding") from None


def _query() -> dict:
    return {k: v[0] if len(v) == 1 else v for k, v in request.args.to_dict(flat=False).items()}


def _repeated(query: dict, error: ValidationError) -> ApiError | None:
    """The error for a setting the query string gives more than once where it takes one value (a
    list reaches the schema only where every alternative refused it for its type; stop may repeat)."""
    errors = error.errors(include_url=False)
    name = errors[0]["loc"][0] if errors[0]["loc"] else None
    values = query.get(name)
    if isinstance(values, list) and all(e["type"].endswith("_type") for e in errors if e["loc"][:1] == (name,)):
        return repeated_setting(name, len(values))
    return None


def _read_body() -> bytes:
    if request.mimetype == "multipart/form-data":  # curl -F: its boundaries and part headers would become the prompt
        raise ApiError(415, "multipart/form-data is not read: send the prompt as plain text (curl -d or --data-binary) "
                            "or a JSON body (Content-Type: application/json)", code="unsupported_media_type")
    try:
        body = request.get_data(cache=False)  # a Content-Length over the limit is a 413 here already
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        if request.content_length is None and len(body) >= limit:
            # Werkzeug cuts a chunked body at the limit instead of refusing it; reading on refuses it
            request.stream.read(1)
    except (ParseException, NoMoreData) as e:  # gunicorn reads a chunked body as the app reads it
        raise bad_body(f"the request's chunked body is malformed: {str(e)[:200] or type(e).__name__}", "malformed_body") from None
    except (OSError, ClientDisconnected):  # the kernel's wait for the client ran out (gunicorn_conf.when_ready), or it left
        raise bad_body("the request's body stopped short: it ended before its Content-Length or its last chunk, or nothing "
                       "more came for CHARGEN_CLIENT_TIMEOUT seconds", "incomplete_body") from None
    return body


def _validate(schema, data: dict, *, strict: bool):
    try:
        return schema.model_validate(data, strict=strict)
    except ValidationError as e:
        raise from_validation(e) from None


def read_generate():
    """The validated GenerateRequest and whether it came as plain text."""
    body = _read_body()
    schema = _schemas().generate
    if _is_json(body):
        data = _parse_json(body)
        if request.args:
            name = next(iter(request.args))
            raise bad_field(name, f"query-string setting {name!r} with a JSON body: put settings in the JSON body "
                                  "(the query string is read for plain-text prompts only)", "unexpected_query")
        return _validate(schema, data, strict=True), False
    data = _query()
    if "json_schema" in data:  # a JSON Schema is a JSON object: the query string has text only
        raise bad_field("json_schema", "json_schema is read from a JSON body only (Content-Type: application/json); "
                                       "the query string takes regex and grammar", "unsupported")
    if body:
        if "prompt" in data:
            raise bad_field("prompt", "the prompt is given twice: in the body and in the query string", "duplicate_prompt")
        data["prompt"] = _decode_text(body)
    try:
        req = schema.model_validate(data, strict=False)
    except ValidationError as e:
        raise _repeated(data, e) or from_validation(e) from None
    if req.n != 1:
        raise bad_field("n", "plain-text answers hold one choice; ask for n > 1 with a JSON body", "unsupported")
    if req.logprobs:
        raise bad_field("logprobs", "plain-text answers carry no logprobs; ask for them with a JSON body", "unsupported")
    return req, True


def read_json(schema):
    body = _read_body()
    if not _is_json(body):
        raise ApiError(415, "this endpoint takes a JSON body (Content-Type: application/json)", code="unsupported_media_type")
    return _validate(schema, _parse_json(body), strict=True)
