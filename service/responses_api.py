"""OpenAI's Responses API, /v1/responses: a formatter over the chat pipeline (service/openai_api.py).

`instructions` is a system message, `input` a user message's text or a list of messages; they are
written into a transcript as /v1/chat/completions writes its messages, and the model's continuation
is the one output message. Nothing is stored: previous_response_id, tools, reasoning and the like
are refused by name (service/schemas.py RESPONSES_UNSUPPORTED). A response that reaches
max_output_tokens is "incomplete", as OpenAI's are.

Streamed, the events are those OpenAI's API sends for one text message, each with its `event:`
line and a sequence_number: response.created, response.in_progress, response.output_item.added,
response.content_part.added, response.output_text.delta per chunk, response.output_text.done,
response.content_part.done, response.output_item.done, then response.completed (or
response.incomplete) with the usage. There is no [DONE]: the stream ends there.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Iterator

from flask import Blueprint, jsonify

from service.api import Generation, Result, authorize, compiled, sampling_of, state
from service.openai_api import chat_generation
from service.reading import read_json
from service.scheduler import Chunk
from service.schemas import ANY_OBJECT

bp = Blueprint("responses", __name__, url_prefix="/v1")
bp.before_request(authorize)


def _messages(req) -> list[tuple[str, str, str | None]]:
    """The request's instructions and input as (role, text, name) chat messages."""
    messages = [("system", req.instructions, None)] if req.instructions is not None else []
    if isinstance(req.input, str):
        return messages + [("user", req.input, None)]
    for m in req.input:
        text = m.content if isinstance(m.content, str) else "".join(part.text for part in m.content)
        messages.append((m.role, text, None))
    return messages


@bp.post("/responses")
def responses():
    st = state()
    req = read_json(st.schemas.responses)
    served = st.served(req.model)
    text_format = req.text.format if req.text is not None else None
    gen = chat_generation(served, _messages(req), sampling=sampling_of(req, served), seed=None, stop=None,
                          max_chars=req.max_output_tokens or st.settings.default_max_chars, stream=bool(req.stream),
                          constraint=_constraint(text_format, served))
    now = time.time()
    head = {"id": "resp_" + secrets.token_hex(24), "object": "response", "created_at": int(now)}
    settings = {"instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": gen.model,
                "parallel_tool_calls": False, "previous_response_id": None, "reasoning": None, "store": False,
                "temperature": req.temperature,
                "text": {"format": text_format.model_dump(by_alias=True, exclude_none=True) if text_format else {"type": "text"}}, "tool_choice": "none", "tools": [],
                "top_p": req.top_p, "truncation": "auto", "user": req.user, "metadata": req.metadata or {}}
    item_id = "msg_" + secrets.token_hex(24)
    headers = {"X-Seed": str(gen.seed)}
    if req.stream:
        return gen.respond(_events(gen, head, settings, item_id), "text/event-stream", headers, error=_error_event)
    result = gen.result()
    text, status = result.choices[0].text, _status(result)
    return jsonify(_response(head, settings, status, [_message(item_id, text, status)], result, gen)), 200, headers


def _constraint(text_format, served):
    """text.format's JSON formats, held exactly as chat's response_format holds them (a json_schema
    without a schema, like json_object, is any JSON object); None for text."""
    if text_format is None or text_format.type == "text":
        return None
    schema = ANY_OBJECT if text_format.type == "json_object" or text_format.schema_ is None else text_format.schema_
    return compiled(served, "text", f"text.format {text_format.type}", "json_schema", schema)


def _status(result: Result) -> str:
    """incomplete where max_output_tokens cut the text, or a constrained text stopped short of a whole match."""
    choice = result.choices[0]
    return "incomplete" if choice.finish_reason == "length" or choice.incomplete else "completed"


def _incomplete(status: str, result: Result | None) -> dict | None:
    """OpenAI's incomplete_details: max_output_tokens, or no reason it names (a constrained text that
    reached a point its format could not go on from with the model's characters)."""
    if status != "incomplete":
        return None
    return {"reason": "max_output_tokens" if result is None or result.choices[0].finish_reason == "length" else None}


def _part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message(item_id: str, text: str | None, status: str) -> dict:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [] if text is None else [_part(text)]}


def _response(head: dict, settings: dict, status: str, output: list, result: Result | None, gen: Generation) -> dict:
    body = {**head, "status": status, "error": None,
            "incomplete_details": _incomplete(status, result),
            **settings, "output": output, "usage": None}
    if result is not None:
        prompt, completion = result.usage["prompt_chars"], result.usage["completion_chars"]
        body["completed_at"] = int(time.time())
        body["usage"] = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": gen.job.streams[0].cached_chars},
                         "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
                         "total_tokens": prompt + completion}
    return body


def _event(kind: str, number: int, **fields) -> bytes:
    data = json.dumps({"type": kind, "sequence_number": number, **fields}, ensure_ascii=False, separators=(",", ":"))
    return f"event: {kind}\ndata: {data}\n\n".encode()


def _error_event(body: dict) -> bytes:
    """A failure after the stream has begun: OpenAI's error event (with the error object too, which
    the openai client raises)."""
    error = body["error"]
    data = {"type": "error", "code": error["code"], "message": error["message"], "param": error["param"], "error": error}
    return f"event: error\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def _events(gen: Generation, head: dict, settings: dict, item_id: str) -> Iterator[bytes]:
    number = iter(range(1 << 62))
    started = _response(head, settings, "in_progress", [], None, gen)
    yield _event("response.created", next(number), response=started)
    yield _event("response.in_progress", next(number), response=started)
    at = {"output_index": 0}
    yield _event("response.output_item.added", next(number), **at, item=_message(item_id, None, "in_progress"))
    part = {"item_id": item_id, **at, "content_index": 0}
    yield _event("response.content_part.added", next(number), **part, part=_part(""))
    pieces = []
    for item in gen.run():
        if isinstance(item, Chunk):
            pieces.append(item.text)
            yield _event("response.output_text.delta", next(number), **part, delta=item.text, logprobs=[])
            continue
        text, status = "".join(pieces), _status(item)
        yield _event("response.output_text.done", next(number), **part, text=text, logprobs=[])
        yield _event("response.content_part.done", next(number), **part, part=_part(text))
        message = _message(item_id, text, status)
        yield _event("response.output_item.done", next(number), **at, item=message)
        yield _event("response.completed" if status == "completed" else "response.incomplete", next(number),
                     response=_response(head, settings, status, [message], item, gen))
