"""Every error the service answers, in one JSON shape (OpenAI's):

    {"error": {"message": "...", "type": "...", "param": "field or null", "code": "..."}}

Client mistakes are ApiErrors raised where they are found; Werkzeug's HTTP errors (404, 405, 413)
and unexpected exceptions are turned into the same shape here. An unexpected exception is logged
with the request id and answered as a 500 that quotes the id, never with a stack trace.
"""

from __future__ import annotations

import logging

from flask import Flask, g, jsonify
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

log = logging.getLogger("chargen")

# Werkzeug errors -> (type, code)
HTTP_KINDS = {
    400: ("invalid_request_error", "bad_request"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "body_too_large"),
    414: ("invalid_request_error", "uri_too_long"),
    415: ("invalid_request_error", "unsupported_media_type"),
    431: ("invalid_request_error", "headers_too_large"),
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_body(message: str, code: str) -> ApiError:
    return ApiError(400, message, code=code)


def bad_field(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(422, message, param=param, code=code)


def repeated_setting(name: str, times: int) -> ApiError:
    """A query-string setting that takes one value, given `times` times."""
    return bad_field(name, f"{name} is given {times} times in the query string: give it once", "repeated_setting")


def loading(retry_after: int = 2) -> ApiError:
    return ApiError(503, "the model is loading; try again shortly", type="unavailable_error", code="model_loading",
                    headers={"Retry-After": str(retry_after)})


def queue_full(retry_after: int = 1) -> ApiError:
    return ApiError(429, "the server is busy: every generation slot and queue place is taken; try again shortly",
                    type="rate_limit_error", code="queue_full", headers={"Retry-After": str(retry_after)})


def shutting_down(retry_after: int = 1) -> ApiError:
    """A request still running when its worker had to stop (a deploy, a scale-down): another worker
    answers the retry."""
    return ApiError(503, "the server is shutting down and this request did not finish within CHARGEN_GRACEFUL_TIMEOUT; "
                    "send it again", type="unavailable_error", code="shutting_down",
                    headers={"Retry-After": str(retry_after)})


def deadline_exceeded(seconds: float) -> ApiError:
    return ApiError(504, f"the request did not finish within its deadline of {seconds:g} s (CHARGEN_REQUEST_TIMEOUT)",
                    type="timeout_error", code="deadline_exceeded")


# pydantic error type -> our code (the schemas raise out_of_range and unsupported themselves)
_CODES = {"extra_forbidden": "unknown_field", "missing": "missing_field", "out_of_range": "out_of_range",
          "unsupported": "unsupported"}


def from_validation(error: ValidationError) -> ApiError:
    """A 422 naming the first wrong field (the message says how many more fields are wrong)."""
    errors = error.errors(include_url=False)
    field = errors[0]["loc"][:1]
    # A field with alternative types (stop: text or list) gets one error per alternative; the one
    # that is not a plain type mismatch is the one about what the client sent.
    siblings = [e for e in errors if e["loc"][:1] == field]
    first = next((e for e in siblings if not e["type"].endswith("_type")), siblings[0])
    param = str(field[0]) if field else None  # a setting named "" (?=5) is named so
    kind = first["type"]
    if kind in _CODES:
        code = _CODES[kind]
    elif kind.endswith(("_type", "_parsing")) or kind in ("int_from_float", "union_tag_invalid"):
        code = "wrong_type"
    elif kind.startswith(("greater_than", "less_than", "too_long", "too_short", "string_too", "finite_number")):
        code = "out_of_range"
    else:
        code = "invalid_value"
    if kind == "extra_forbidden":  # the whole path: a field inside a list of objects is named as messages.0.tool_calls
        message = f"unknown field {'.'.join(str(p) for p in first['loc'] if not _is_union_tag(p))!r}"
    else:
        where = ".".join(str(p) for p in first["loc"] if not _is_union_tag(p)) or "body"
        message = f"{where}: {first['msg']}"
        if kind != "missing" and "input" in first and not isinstance(first["input"], (dict, list)):
            message += f" (got {_short(first['input'])})"
    others = len({e["loc"][:1] for e in errors}) - 1
    if others:
        message += f" (and {others} more wrong field{'s' if others > 1 else ''})"
    return bad_field(param, message, code)


def _is_union_tag(part) -> bool:
    # pydantic names the union member it tried ("str", "list[str]", "constrained-str") in the location
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none") or "[" in part
                                      or part.startswith("constrained-"))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def error_response(error: ApiError):
    response = jsonify(error.body())
    response.status_code = error.status
    response.headers.update(error.headers)
    return response


def register(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def api_error(e: ApiError):
        return error_response(e)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        status = e.code or 500
        type_, code = HTTP_KINDS.get(status, ("invalid_request_error", "http_error"))
        message = e.description or e.name
        if status == 404:
            message = "no such route; see /openapi.json for the API"
        elif status == 405:
            allowed = e.valid_methods if getattr(e, "valid_methods", None) else []
            message = f"method not allowed here; allowed: {', '.join(sorted(allowed))}"
        elif status == 413:
            limit = app.config.get("MAX_CONTENT_LENGTH")
            message = f"the request body is larger than the limit of {limit} bytes (CHARGEN_MAX_BODY_BYTES)"
        headers = {k: v for k, v in e.get_headers() if k.lower() not in ("content-type", "content-length")}
        return error_response(ApiError(status, message, type=type_, code=code, headers=headers))

    @app.errorhandler(Exception)
    def unexpected(e: Exception):
        request_id = getattr(g, "request_id", "?")
        log.exception("unexpected error in request %s", request_id)
        return error_response(ApiError(500, f"internal server error (request id {request_id}); the server log has details",
                                       type="server_error", code="internal_error"))
