"""The generation API: /v1/generate (JSON, plain text, streaming) and OpenAI's /v1/completions and
/v1/models. A thin layer: read and validate the request, hand a Job to the scheduler, turn what
comes back into JSON, server-sent events or text.
"""

from __future__ import annotations

import codecs
import hmac
import json
import logging
import secrets
import socket
import time

from flask import Blueprint, Response, current_app, g, jsonify, request
from pydantic import ValidationError

from service import metrics
from service.errors import ApiError, bad_body, bad_field, deadline_exceeded, from_validation, loading, queue_full
from service.scheduler import ClientGone, Job, NotReady, QueueFull

bp = Blueprint("api", __name__, url_prefix="/v1")
log = logging.getLogger("chargen")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def state():
    return current_app.extensions["chargen"]


@bp.before_request
def _authorize():
    key = state().settings.api_key
    if key is None or request.method == "OPTIONS":  # CORS preflights carry no credentials
        return
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "missing or wrong API key: send the header `Authorization: Bearer <key>`",
                       type="authentication_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": 'Bearer realm="chargen"'})


# ---------------------------------------------------------------- reading requests


def _parse_json(body: bytes) -> dict:
    if body.startswith(codecs.BOM_UTF8):  # JSON is UTF-8 without one, but some tools write it
        body = body[len(codecs.BOM_UTF8):]
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_body(f"the body is not UTF-8: byte 0x{body[e.start]:02x} at offset {e.start} is invalid", "invalid_encoding") from None
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
        codecs.lookup(charset)
    except LookupError:
        raise bad_body(f"unknown charset {charset!r} in Content-Type", "invalid_encoding") from None
    try:
        return body.decode(charset)
    except UnicodeDecodeError as e:
        raise bad_body(f"the body is not valid {charset}: byte 0x{body[e.start]:02x} at offset {e.start} is invalid "
                       "(send UTF-8, or name the charset in Content-Type)", "invalid_encoding") from None


def _query() -> dict:
    return {k: v[0] if len(v) == 1 else v for k, v in request.args.to_dict(flat=False).items()}


def _read_body() -> bytes:
    body = request.get_data(cache=False)  # a Content-Length over the limit is a 413 here already
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    if request.content_length is None and len(body) >= limit:
        # Werkzeug cuts a chunked body at the limit instead of refusing it; reading on refuses it
        request.stream.read(1)
    return body


def _validate(schema, data: dict, *, strict: bool):
    try:
        return schema.model_validate(data, strict=strict)
    except ValidationError as e:
        raise from_validation(e) from None


def read_generate():
    """The validated GenerateRequest and whether it came as plain text."""
    body = _read_body()
    schema = state().schemas.generate
    if _is_json(body):
        data = _parse_json(body)
        if request.args:
            name = next(iter(request.args))
            raise bad_field(name, f"query-string setting {name!r} with a JSON body: put settings in the JSON body "
                                  "(the query string is read for plain-text prompts only)", "unexpected_query")
        return _validate(schema, data, strict=True), False
    data = _query()
    if body:
        if "prompt" in data:
            raise bad_field("prompt", "the prompt is given twice: in the body and in the query string", "duplicate_prompt")
        data["prompt"] = _decode_text(body)
    req = _validate(schema, data, strict=False)
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


# ---------------------------------------------------------------- running jobs


def _choices(prompts: list[str], n: int, *, max_chars: int, temperature: float, top_k: int, top_p: float,
             seed: int | None, stop, logprobs: int) -> tuple[list, int]:
    from model.engine import GenerationRequest
    from model.sampling import SamplingSettings

    st = state()
    if seed is None:
        seed = secrets.randbits(32)
    stop = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
    sampling = SamplingSettings(temperature=temperature, top_k=top_k, top_p=top_p)
    logprobs = min(logprobs, len(st.scheduler.engine.vocab))
    requests = [GenerationRequest(prompt, max_chars=max_chars, sampling=sampling, seed=seed + i * n + j, stop=stop,
                                  logprobs=logprobs)
                for i, prompt in enumerate(prompts) for j in range(n)]
    return requests, seed


def _submit(requests: list, *, deltas: bool) -> Job:
    st = state()
    sock = request.environ.get("gunicorn.socket")
    job = Job(requests, deltas=deltas, deadline=g.arrived + st.settings.request_timeout, arrived=g.arrived,
              fd=sock.fileno() if sock is not None else None)
    try:
        st.scheduler.submit(job)
    except NotReady:
        raise loading() from None
    except QueueFull:
        raise queue_full() from None
    return job


def _require_ready():
    if not state().scheduler.ready:
        raise loading()


def client_gone_check(environ):
    """A cheap test of whether the client closed its connection: gunicorn hands us the socket, and a
    peek that reads end-of-file means the peer is gone. Without a socket (test client), never."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return lambda: False

    def gone() -> bool:
        try:
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except ValueError:  # TLS sockets refuse flags; rely on failed writes there
            return False
        except OSError:
            return True

    return gone


def _wait(job: Job) -> list:
    """Wait for a job that is not streamed; returns the deltas it produced (logprobs requests)."""
    collected = []
    for items in state().scheduler.events(job, client_gone_check(request.environ)):
        collected.extend(items)
    return collected


def _raise_job_error(job: Job):
    if job.error == "deadline":
        raise deadline_exceeded(state().settings.request_timeout)
    if job.error:
        raise ApiError(500, f"generation failed (request id {g.request_id}); the server log has details",
                       type="server_error", code="internal_error")


def _observe(job: Job) -> None:
    if job.first_char is not None:
        metrics.first_char_seconds.observe(job.first_char - job.arrived)
    if job.started is not None:
        metrics.queue_seconds.observe(job.started - job.submitted)


def _timings(job: Job, completion_chars: int) -> dict:
    if job.generating is None:
        return {"queue_ms": None, "prompt_ms": None, "generation_ms": None, "chars_per_second": None}
    generation = job.finished - job.generating
    return {"queue_ms": round((job.started - job.submitted) * 1e3, 3),
            "prompt_ms": round(job.prompt_seconds * 1e3, 3),
            "generation_ms": round(generation * 1e3, 3),
            "chars_per_second": round(completion_chars / generation, 1) if generation > 0 else None}


def _usage(job: Job, per_prompt: int) -> dict:
    firsts = job.streams[::per_prompt]
    return {"prompt_chars": sum(s.prompt_chars for s in firsts),
            "completion_chars": sum(len(s.text) for s in job.streams),
            "dropped_chars": sum(s.dropped_chars for s in firsts)}


def _logprobs_json(lps) -> list:
    return [{"char": lp.char, "logprob": lp.logprob, "top": [{"char": c, "logprob": v} for c, v in lp.top]} for lp in lps]


def _guard(chunks, request_id: str, *, events: bool):
    """A response body that turns an unexpected error in the middle of a stream into an error event
    (the status line has gone out already) instead of a cut connection."""
    try:
        yield from chunks
    except Exception:
        log.exception("unexpected error while streaming request %s", request_id)
        body = ApiError(500, f"internal server error (request id {request_id}); the server log has details",
                        type="server_error", code="internal_error").body()
        yield _sse(body) if events else ("\n" + json.dumps(body) + "\n").encode()


def _sse(data) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def _merge(items: list, job: Job) -> list[tuple[int, str, list]]:
    """Deltas that arrived together -> one (index, text, logprobs) per choice, in arrival order.
    (Deltas only arrive once every choice of the job has started, so job.streams is complete.)"""
    merged: dict[int, list] = {}
    for d in items:
        i = job.streams.index(d.stream) if len(job.streams) > 1 else 0
        entry = merged.setdefault(i, [i, [], []])
        entry[1].append(d.text)
        entry[2].extend(d.logprobs)
    return [(i, "".join(texts), lps) for i, texts, lps in merged.values()]


# ---------------------------------------------------------------- /v1/generate


@bp.post("/generate")
def generate():
    req, plain = read_generate()
    _require_ready()
    requests, seed = _choices([req.prompt], req.n, max_chars=req.max_chars, temperature=req.temperature, top_k=req.top_k,
                              top_p=req.top_p, seed=req.seed, stop=req.stop, logprobs=req.logprobs)
    job = _submit(requests, deltas=req.stream or req.logprobs > 0)
    gen_id = "gen-" + secrets.token_hex(12)
    headers = {"X-Seed": str(seed)}
    if req.stream:
        body = _text_stream(job) if plain else _generate_events(job, gen_id, seed)
        mimetype = "text/plain" if plain else "text/event-stream"
        return Response(body, mimetype=mimetype, headers={**headers, **SSE_HEADERS})

    try:
        collected = _wait(job)
    except ClientGone:
        return Response(status=499)
    _observe(job)
    _raise_job_error(job)
    usage = _usage(job, req.n)
    if plain:
        s = job.streams[0]
        headers.update({"X-Finish-Reason": s.finish_reason, "X-Prompt-Chars": str(usage["prompt_chars"]),
                        "X-Completion-Chars": str(usage["completion_chars"]), "X-Dropped-Chars": str(usage["dropped_chars"])})
        return Response(s.text, mimetype="text/plain", headers=headers)
    choices = [{"index": i, "text": s.text, "finish_reason": s.finish_reason} for i, s in enumerate(job.streams)]
    if req.logprobs:
        for choice, s in zip(choices, job.streams):
            choice["logprobs"] = _logprobs_json(lp for d in collected if d.stream is s for lp in d.logprobs)
    return jsonify({"id": gen_id, "model": state().settings.name, "seed": seed, "choices": choices,
                    "usage": usage, "timings": _timings(job, usage["completion_chars"])}), 200, headers


def _generate_events(job: Job, gen_id: str, seed: int):
    scheduler, request_id, timeout = state().scheduler, g.request_id, state().settings.request_timeout
    gone = client_gone_check(request.environ)
    model_name = state().settings.name

    def body():
        try:
            for items in scheduler.events(job, gone):
                for i, text, lps in _merge(items, job):
                    if text:
                        chunk = {"index": i, "text": text}
                        if job.requests[0].logprobs:
                            chunk["logprobs"] = _logprobs_json(lps)
                        yield _sse(chunk)
            if job.error:
                yield _sse(_job_error_body(job, request_id, timeout))
                return
            usage = _usage(job, len(job.streams))
            yield _sse({"done": True, "id": gen_id, "model": model_name, "seed": seed,
                        "choices": [{"index": i, "finish_reason": s.finish_reason} for i, s in enumerate(job.streams)],
                        "usage": usage, "timings": _timings(job, usage["completion_chars"])})
        except ClientGone:
            return
        finally:
            _observe(job)

    return _guard(body(), request_id, events=True)


def _job_error_body(job: Job, request_id: str, timeout: float) -> dict:
    """The error event of a stream the loop ended early (called outside the request context)."""
    if job.error == "deadline":
        return deadline_exceeded(timeout).body()
    return ApiError(500, f"generation failed (request id {request_id}); the server log has details",
                    type="server_error", code="internal_error").body()


def _text_stream(job: Job):
    scheduler, request_id, timeout = state().scheduler, g.request_id, state().settings.request_timeout
    gone = client_gone_check(request.environ)

    def body():
        try:
            for items in scheduler.events(job, gone):
                text = "".join(d.text for d in items)
                if text:
                    yield text.encode()
            if job.error:
                yield ("\n" + json.dumps(_job_error_body(job, request_id, timeout)) + "\n").encode()
        except ClientGone:
            return
        finally:
            _observe(job)

    return _guard(body(), request_id, events=False)


# ---------------------------------------------------------------- OpenAI: /v1/completions, /v1/models


@bp.post("/completions")
def completions():
    st = state()
    req = read_json(st.schemas.completion)
    _require_ready()
    s = st.settings
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    n = req.n or 1
    if len(prompts) * n > s.max_n:
        raise bad_field("n", f"{len(prompts)} prompts x n={n} is more than the {s.max_n} choices a request may have (CHARGEN_MAX_N)",
                        "out_of_range")
    if req.echo and req.logprobs:
        raise bad_field("echo", "echo with logprobs is not supported (the prompt's characters are not scored)", "unsupported")
    logprobs = req.logprobs or 0
    requests, seed = _choices(prompts, n, max_chars=req.max_tokens or s.default_max_chars,
                              temperature=s.default_temperature if req.temperature is None else req.temperature,
                              top_k=s.default_top_k if req.top_k is None else req.top_k,
                              top_p=s.default_top_p if req.top_p is None else req.top_p,
                              seed=req.seed, stop=req.stop, logprobs=logprobs)
    job = _submit(requests, deltas=bool(req.stream) or logprobs > 0)
    head = {"id": "cmpl-" + secrets.token_hex(12), "object": "text_completion", "created": int(time.time()), "model": s.name}
    echo = [prompts[k // n] if req.echo else "" for k in range(len(requests))]
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return Response(_completion_events(job, head, echo, logprobs, include_usage, n), mimetype="text/event-stream",
                        headers={"X-Seed": str(seed), **SSE_HEADERS})

    try:
        collected = _wait(job)
    except ClientGone:
        return Response(status=499)
    _observe(job)
    _raise_job_error(job)
    choices = []
    for k, stream in enumerate(job.streams):
        lps = [lp for d in collected if d.stream is stream for lp in d.logprobs]
        choices.append({"text": echo[k] + stream.text, "index": k,
                        "logprobs": _openai_logprobs(lps, 0) if logprobs else None,
                        "finish_reason": stream.finish_reason})
    return jsonify({**head, "choices": choices, "usage": _openai_usage(job, n)}), 200, {"X-Seed": str(seed)}


def _openai_usage(job: Job, n: int) -> dict:
    usage = _usage(job, n)
    return {"prompt_tokens": usage["prompt_chars"], "completion_tokens": usage["completion_chars"],
            "total_tokens": usage["prompt_chars"] + usage["completion_chars"]}


def _openai_logprobs(lps: list, offset: int) -> dict:
    offsets, at = [], offset
    for lp in lps:
        offsets.append(at)
        at += len(lp.char)
    return {"tokens": [lp.char for lp in lps], "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [dict(lp.top) for lp in lps], "text_offset": offsets}


def _completion_events(job: Job, head: dict, echo: list[str], logprobs: int, include_usage: bool, n: int):
    scheduler, request_id, timeout = state().scheduler, g.request_id, state().settings.request_timeout
    gone = client_gone_check(request.environ)

    def chunk(index: int, text: str, lps, finish_reason=None) -> bytes:
        return _sse({**head, "choices": [{"text": text, "index": index, "logprobs": lps, "finish_reason": finish_reason}]})

    def body():
        offsets = [0] * len(job.requests)
        try:
            for k, text in enumerate(echo):
                if text:
                    yield chunk(k, text, None)
            for items in scheduler.events(job, gone):
                for k, text, lps in _merge(items, job):
                    if text:
                        yield chunk(k, text, _openai_logprobs(lps, offsets[k]) if logprobs else None)
                        offsets[k] += len(text)
            if job.error:
                yield _sse(_job_error_body(job, request_id, timeout))
                return
            for k, stream in enumerate(job.streams):
                yield chunk(k, "", None, stream.finish_reason)
            if include_usage:
                yield _sse({**head, "choices": [], "usage": _openai_usage(job, n)})
            yield _sse("[DONE]")
        except ClientGone:
            return
        finally:
            _observe(job)

    return _guard(body(), request_id, events=True)


@bp.get("/models")
def models():
    _require_ready()
    return jsonify({"object": "list", "data": [_model_card()]})


@bp.get("/models/<path:model_id>")
def model(model_id: str):
    _require_ready()
    if model_id != state().settings.name:
        raise ApiError(404, f"no model {model_id!r}; this server serves {state().settings.name!r}", param="model",
                       code="model_not_found")
    return jsonify(_model_card())


def _model_card() -> dict:
    st = state()
    return {"id": st.settings.name, "object": "model", "created": st.model_created(), "owned_by": "chargen"}
