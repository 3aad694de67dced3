"""The generation API: one request pipeline, and its native formats on /v1/generate (JSON, plain
text, streamed or not).

Every generation endpoint takes the same path (as llama.cpp's server does): the handler reads and
validates its request (service/reading.py), turns it into a Generation (one Job: the request's
choices, submitted to the engine loop), and formats what the one pipeline, Generation.run(), yields:
a Chunk per choice as text arrives, then the Result. The formatters below write native JSON, plain
text and server-sent events; service/openai_api.py writes OpenAI's shapes. A new endpoint is a new
formatter over run().
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import socket
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from flask import Blueprint, Response, current_app, g, jsonify, request

from service import metrics
from service.errors import ApiError, deadline_exceeded, loading, queue_full
from service.reading import read_generate
from service.scheduler import Chunk, ClientGone, Job, NotReady, QueueFull

bp = Blueprint("api", __name__, url_prefix="/v1")
log = logging.getLogger("chargen")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def state():
    return current_app.extensions["chargen"]


def authorize():
    """The API key check of every /v1 blueprint (a before_request hook)."""
    key = state().settings.api_key
    if key is None or request.method == "OPTIONS":  # CORS preflights carry no credentials
        return
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "missing or wrong API key: send the header `Authorization: Bearer <key>`",
                       type="authentication_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": 'Bearer realm="chargen"'})


bp.before_request(authorize)


@bp.app_errorhandler(ClientGone)
def _client_gone(_):
    # nginx's "client closed request": no client reads it, the access log and metrics do
    return Response(status=499)


def require_ready() -> None:
    if not state().scheduler.ready:
        raise loading()


def internal_error(request_id: str) -> ApiError:
    """The 500 of a generation that failed after it was accepted; the server log has the cause."""
    return ApiError(500, f"internal server error (request id {request_id}); the server log has details",
                    type="server_error", code="internal_error")


def sse(data) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def client_gone_check(environ) -> Callable[[], bool]:
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


# ---------------------------------------------------------------- the pipeline


@dataclass
class Choice:
    text: str
    finish_reason: str
    logprobs: list  # [CharLogprob] of every character when asked for; empty for streamed answers (the chunks had them)


@dataclass
class Result:
    seed: int
    choices: list[Choice]  # in request order: prompt by prompt, n each
    usage: dict  # prompt_chars and dropped_chars count each prompt once
    timings: dict


class Generation:
    """One request's generations, submitted to the engine loop.

    Built in the request context, which run() does not need: a streamed body is read after the view
    has returned. Choice k = i * n + j (prompt i, its j-th choice) uses seed + k.
    """

    def __init__(self, prompts: list[str], n: int, *, max_chars: int, temperature: float, top_k: int, top_p: float,
                 seed: int | None, stop: str | list[str] | None, logprobs: int, stream: bool):
        from model.engine import GenerationRequest
        from model.sampling import SamplingSettings

        require_ready()
        st = state()
        self.seed = secrets.randbits(32) if seed is None else seed
        self.logprobs = min(logprobs, len(st.scheduler.engine.vocab))
        self.stream, self.n = stream, n
        self.request_id, self.model = g.request_id, st.settings.name
        stop = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
        sampling = SamplingSettings(temperature=temperature, top_k=top_k, top_p=top_p)
        requests = [GenerationRequest(prompt, max_chars=max_chars, sampling=sampling, seed=self.seed + i * n + j,
                                      stop=stop, logprobs=self.logprobs)
                    for i, prompt in enumerate(prompts) for j in range(n)]
        sock = request.environ.get("gunicorn.socket")
        self.job = Job(requests, incremental=stream or self.logprobs > 0, deadline=g.arrived + st.settings.request_timeout,
                       arrived=g.arrived, fd=sock.fileno() if sock is not None else None)
        self._scheduler, self._timeout = st.scheduler, st.settings.request_timeout
        self._gone = client_gone_check(request.environ)
        try:
            st.scheduler.submit(self.job)
        except NotReady:
            raise loading() from None
        except QueueFull:
            raise queue_full() from None

    def run(self) -> Iterator[Chunk | Result]:
        """Chunks as text is generated (streamed answers only), then the Result. Raises ClientGone when
        the client hangs up (the job is cancelled), and the ApiError (504, 500) of a job the loop ended."""
        job = self.job
        kept = [[] for _ in job.requests]  # logprobs of an answer that is not streamed
        try:
            for chunks in self._scheduler.events(job, self._gone):
                for c in chunks:
                    if self.stream:
                        yield c
                    else:
                        kept[c.index].extend(c.logprobs)
            if job.error == "deadline":
                raise deadline_exceeded(self._timeout)
            if job.error:
                raise internal_error(self.request_id)
            yield Result(self.seed, [Choice(s.text, s.finish_reason, lps) for s, lps in zip(job.streams, kept)],
                         _usage(job, self.n), _timings(job))
        finally:
            _observe(job)

    def result(self) -> Result:
        """Wait for the whole answer (not streamed)."""
        *_, result = self.run()
        return result

    def respond(self, body: Iterable[bytes], mimetype: str, headers: dict, *, error: Callable[[dict], bytes] = sse) -> Response:
        """A streamed response of the formatter's `body`. The status line goes out first, so an error
        becomes the stream's last item, written by `error`; a client that hung up just ends it."""
        def guarded():
            try:
                yield from body
            except ClientGone:
                return
            except ApiError as e:
                yield error(e.body())
            except Exception:
                log.exception("unexpected error while streaming request %s", self.request_id)
                yield error(internal_error(self.request_id).body())

        return Response(guarded(), mimetype=mimetype, headers={**headers, **SSE_HEADERS})


def _usage(job: Job, per_prompt: int) -> dict:
    firsts = job.streams[::per_prompt]
    return {"prompt_chars": sum(s.prompt_chars for s in firsts),
            "completion_chars": sum(len(s.text) for s in job.streams),
            "dropped_chars": sum(s.dropped_chars for s in firsts)}


def _timings(job: Job) -> dict:
    if job.generating is None:
        return {"queue_ms": None, "prompt_ms": None, "generation_ms": None, "chars_per_second": None}
    generation = job.finished - job.generating
    chars = sum(len(s.text) for s in job.streams)
    return {"queue_ms": round((job.started - job.submitted) * 1e3, 3),
            "prompt_ms": round(job.prompt_seconds * 1e3, 3),
            "generation_ms": round(generation * 1e3, 3),
            "chars_per_second": round(chars / generation, 1) if generation > 0 else None}


def _observe(job: Job) -> None:
    if job.first_char is not None:
        metrics.first_char_seconds.observe(job.first_char - job.arrived)
    if job.started is not None:
        metrics.queue_seconds.observe(job.started - job.submitted)


# ---------------------------------------------------------------- /v1/generate


@bp.post("/generate")
def generate():
    req, plain = read_generate()
    gen = Generation([req.prompt], req.n, max_chars=req.max_chars, temperature=req.temperature, top_k=req.top_k,
                     top_p=req.top_p, seed=req.seed, stop=req.stop, logprobs=req.logprobs, stream=req.stream)
    gen_id = "gen-" + secrets.token_hex(12)
    headers = {"X-Seed": str(gen.seed)}
    if req.stream:
        if plain:
            return gen.respond(_text(gen), "text/plain", headers, error=_text_error)
        return gen.respond(_events(gen, gen_id), "text/event-stream", headers)
    result = gen.result()
    if plain:
        usage = result.usage
        headers.update({"X-Finish-Reason": result.choices[0].finish_reason, "X-Prompt-Chars": str(usage["prompt_chars"]),
                        "X-Completion-Chars": str(usage["completion_chars"]), "X-Dropped-Chars": str(usage["dropped_chars"])})
        return Response(result.choices[0].text, mimetype="text/plain", headers=headers)
    choices = [{"index": i, "text": c.text, "finish_reason": c.finish_reason} for i, c in enumerate(result.choices)]
    if gen.logprobs:
        for choice, c in zip(choices, result.choices):
            choice["logprobs"] = _logprobs(c.logprobs)
    return jsonify({"id": gen_id, "model": gen.model, "seed": result.seed, "choices": choices,
                    "usage": result.usage, "timings": result.timings}), 200, headers


def _events(gen: Generation, gen_id: str) -> Iterator[bytes]:
    for item in gen.run():
        if isinstance(item, Chunk):
            event = {"index": item.index, "text": item.text}
            if gen.logprobs:
                event["logprobs"] = _logprobs(item.logprobs)
            yield sse(event)
        else:
            yield sse({"done": True, "id": gen_id, "model": gen.model, "seed": item.seed,
                       "choices": [{"index": i, "finish_reason": c.finish_reason} for i, c in enumerate(item.choices)],
                       "usage": item.usage, "timings": item.timings})


def _text(gen: Generation) -> Iterator[bytes]:
    for item in gen.run():
        if isinstance(item, Chunk):
            yield item.text.encode()


def _text_error(body: dict) -> bytes:
    return ("\n" + json.dumps(body) + "\n").encode()


def _logprobs(lps: list) -> list:
    return [{"char": lp.char, "logprob": lp.logprob, "top": [{"char": c, "logprob": v} for c, v in lp.top]} for lp in lps]
